"""One strategy per (framework, model): the fastest one a run measured, else the preferred one.

The parity and readout presets (and ``run --fastest-from RUN_DIR``) compare
frameworks at their best strategy only; this module decides which that is.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from . import registry
from .config import PREFERENCE, CellConfig, UsageError
from .interface import REFERENCE_STRATEGIES, STRATEGIES
from .stats import median


def fastest_strategies(run_dir: str, skip_corrupt: bool = False) -> Dict[Tuple[str, str, str], str]:
    """{(framework, model, device): strategy} of the fastest ok record in RUN_DIR.

    Training throughput decides (inference where a cell has none). The ``plain``
    yardstick is never picked: it measures what a user would write, not a strategy.
    """
    from .runs import load_run   # only when a run directory is read: cells never need it
    if not os.path.isdir(run_dir):
        raise UsageError("--fastest-from %s: not a directory" % run_dir)
    records, _ = load_run(run_dir, skip_corrupt=skip_corrupt)
    if not records:
        raise UsageError("--fastest-from %s: no records there" % run_dir)
    best: Dict[Tuple[str, str, str], Tuple[str, float]] = {}
    for r in records:
        if r.get("status") != "ok" or r.get("strategy") in REFERENCE_STRATEGIES:
            continue
        speed = median(r.get("train_samples_per_s")) or median(r.get("infer_samples_per_s"))
        key = (r["framework"], r["model"], r["device"])
        if speed and speed > best.get(key, ("", 0.0))[1]:
            best[key] = (r["strategy"], speed)
    return {key: strategy for key, (strategy, _) in best.items()}


def preferred_strategy(cell: CellConfig) -> Optional[str]:
    """The first strategy of PREFERENCE the cell's family has and its framework does not refuse."""
    for s in PREFERENCE:
        if s in STRATEGIES[cell.family] and not registry.not_applicable(
                cell.framework, cell.model, s, cell.device):
            return s
    return None


def keep_fastest(cells: List[CellConfig], run_dir: Optional[str], skip_corrupt: bool = False
                 ) -> List[CellConfig]:
    """One strategy per (framework, model): the fastest ok one in RUN_DIR's records.

    Without a run directory, or for a pair it did not time, the first strategy of
    PREFERENCE that is not statically not-applicable is kept.
    """
    best = fastest_strategies(run_dir, skip_corrupt) if run_dir else {}
    out = []
    for c in cells:
        chosen = best.get((c.framework, c.model, c.device))
        if chosen is None:
            chosen = preferred_strategy(c)
        if c.strategy == chosen:
            out.append(c)
    return out
