"""Summary statistics of raw timing samples: the one place they are computed."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from .records import finite_samples

FIELDS = ("n", "min", "max", "mean", "std", "median", "q1", "q3", "iqr")


@dataclass(frozen=True)
class Stats:
    n: int
    min: float
    max: float
    mean: float
    std: float
    median: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        """Statistics of finite samples; an empty sequence gives n=0 and NaNs."""
        x = np.asarray([s for s in samples if s is not None and math.isfinite(s)], np.float64)
        if x.size == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan, nan)
        q1, med, q3 = np.percentile(x, [25, 50, 75])
        return cls(int(x.size), float(x.min()), float(x.max()), float(x.mean()),
                   float(x.std(ddof=1)) if x.size > 1 else 0.0, float(med), float(q1), float(q3))

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d["iqr"] = self.iqr
        return d


def percentile(samples: Sequence[float], q: float) -> float:
    x = np.asarray(samples, np.float64)
    return float(np.percentile(x, q)) if x.size else float("nan")


def median(xs) -> Optional[float]:
    """Median of the finite samples in xs (a record's list; None and NaN skipped), or None."""
    fin = finite_samples(xs)
    return float(np.median(fin)) if fin else None
