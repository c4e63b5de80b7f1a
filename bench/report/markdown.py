"""Markdown building blocks every report section shares: a table and a number cell."""

from __future__ import annotations

from typing import List

import numpy as np


def fmt(x, spec="%.3g") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return spec % x


def md_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |"
            for row in rows]
    return "\n".join(out)


def nan0(x) -> float:
    """The std of a single seed is NaN; show it as 0."""
    return 0.0 if x != x else float(x)
