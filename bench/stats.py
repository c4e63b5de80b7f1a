"""Statistics of raw samples, the one place they are computed: medians, quartiles, percentiles,
mean and spread, and the bootstrap intervals of a slowdown.

Samples come as a record stores them: a list that may hold None, NaN or inf
where a repeat failed. ``median``, ``quartiles`` and ``iqr`` use the finite ones
only; the bootstrap intervals take samples already filtered by the caller
(``bench.compare`` filters them and names the cells it cannot judge).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from .records import finite_samples

CONFIDENCE = 0.95   # of the bootstrap intervals
BOOTSTRAP = 2000    # resamples per interval


def percentile(samples: Sequence[float], q: float) -> float:
    x = np.asarray(samples, np.float64)
    return float(np.percentile(x, q)) if x.size else float("nan")


def median(xs) -> Optional[float]:
    """Median of the finite samples in xs (a record's list; None and NaN skipped), or None."""
    fin = finite_samples(xs)
    return float(np.median(fin)) if fin else None


def quartiles(xs) -> Optional[Tuple[float, float]]:
    """(q1, q3) of the finite samples in xs, or None with fewer than two of them."""
    fin = finite_samples(xs)
    if len(fin) < 2:
        return None
    q1, q3 = np.percentile(fin, [25, 75])
    return float(q1), float(q3)


def iqr(xs) -> Optional[float]:
    """Interquartile range of the finite samples in xs, or None with fewer than two."""
    q = quartiles(xs)
    return q[1] - q[0] if q else None


def mean_std(xs: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (0 for one value) of the values that are not None;
    (None, None) when there are none. Accuracies over seeds: a NaN is not dropped."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def percentile_interval(dist, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """The central ``confidence`` interval of a bootstrap distribution."""
    tail = 50 * (1 - confidence)
    lo, hi = np.percentile(dist, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_medians(rng: np.random.Generator, xs: np.ndarray, rounds: int) -> np.ndarray:
    """Medians of ``rounds`` resamples of xs, each drawn with replacement at xs's size."""
    return np.median(rng.choice(xs, size=(rounds, xs.size)), axis=1)


def slowdown_ci(base: Sequence[float], new: Sequence[float], seed: int = 0,
                confidence: float = CONFIDENCE, rounds: int = BOOTSTRAP) -> Tuple[float, float, float]:
    """Slowdown 1 - median(new)/median(base) with a bootstrap percentile interval
    (the two sides resampled independently)."""
    base, new = np.asarray(base, float), np.asarray(new, float)
    point = 1.0 - np.median(new) / np.median(base)
    rng = np.random.default_rng(seed)
    bb = bootstrap_medians(rng, base, rounds)
    nb = bootstrap_medians(rng, new, rounds)
    lo, hi = percentile_interval(1.0 - nb / bb, confidence)
    return float(point), lo, hi


def paired_slowdown_ci(base: Sequence[float], new: Sequence[float], seed: int = 0,
                       confidence: float = CONFIDENCE, rounds: int = BOOTSTRAP
                       ) -> Tuple[float, float, float]:
    """Slowdown 1 - new/base of the median round (log ratios), with a bootstrap percentile
    interval that resamples whole rounds (pairs stay together)."""
    d = np.log(np.asarray(base, float) / np.asarray(new, float))
    point = 1.0 - math.exp(-float(np.median(d)))
    boot = bootstrap_medians(np.random.default_rng(seed), d, rounds)
    lo, hi = percentile_interval(1.0 - np.exp(-boot), confidence)
    return float(point), lo, hi
