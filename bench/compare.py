"""Regression gate: ``python -m bench compare BASE NEW [--threshold 10%]``.

Cells are matched by their configuration (``cell_id``). For each matched
``ok`` cell and each throughput metric the gate looks at the raw repeats:

* *outside the noise*: a one-sided Mann-Whitney U test says NEW is slower than
  BASE at level ``ALPHA`` (exact distribution for small samples);
* *slower than the threshold*: the bootstrap confidence interval of the
  slowdown (1 - median(NEW) / median(BASE)) reaches the threshold, i.e. the
  data are consistent with a slowdown at least that large.

Only when both hold is the change a regression, and only regressions make the
exit code 1. Under no change the false-alarm rate is at most ALPHA; a real
slowdown equal to the threshold is caught whenever the samples separate,
which ``tests/test_compare.py`` checks on synthetic data.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np

ALPHA = 0.01
CONFIDENCE = 0.95
BOOTSTRAP = 2000
METRICS = ("train_samples_per_s", "infer_samples_per_s")  # higher is better


@dataclass(frozen=True)
class Threshold:
    """A slowdown threshold parsed from ``10%``, ``0.1`` or ``median:10%``."""

    fraction: float

    @classmethod
    def parse(cls, text: str) -> "Threshold":
        raw = str(text).strip()
        if ":" in raw:
            stat, raw = raw.split(":", 1)
            if stat.strip() != "median":
                raise ValueError("only median thresholds are supported, not %r" % stat)
        try:
            value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
        except ValueError:
            raise ValueError("threshold %r is not a number or percentage" % text) from None
        if not 0 < value < 1:
            raise ValueError("threshold must be between 0 and 100%%, got %r" % text)
        return cls(value)


@lru_cache(maxsize=None)
def _u_counts(n: int, m: int) -> Tuple[int, ...]:
    """Number of arrangements giving each U statistic (0..n*m), no ties."""
    # f[i][j] = counts for i x-samples and j y-samples, built by the last element's origin.
    prev = [(1,) for _ in range(m + 1)]  # i = 0: only U = 0
    for i in range(1, n + 1):
        cur = [(1,)]  # j = 0: only U = 0
        for j in range(1, m + 1):
            # largest element is an x (adds j to U) or a y (adds nothing)
            a, b = prev[j], cur[j - 1]
            size = i * j + 1
            counts = [0] * size
            for u, c in enumerate(a):
                counts[u + j] += c
            for u, c in enumerate(b):
                counts[u] += c
            cur.append(tuple(counts))
        prev = cur
    return prev[m]


def mann_whitney_less(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided p-value for 'x tends to be smaller than y'.

    U counts pairs (x_i > y_j) (ties count 1/2); small U means x is smaller.
    Exact for n, m <= 30 without ties, normal approximation otherwise.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        return 1.0
    diff = x[:, None] - y[None, :]
    u = float((diff > 0).sum() + 0.5 * (diff == 0).sum())
    ties = bool((diff == 0).any())
    if n <= 30 and m <= 30 and not ties:
        counts = _u_counts(n, m)
        total = math.comb(n + m, n)
        return sum(counts[: int(u) + 1]) / total
    mean = n * m / 2.0
    sd = math.sqrt(n * m * (n + m + 1) / 12.0)
    z = (u + 0.5 - mean) / sd  # continuity correction
    return 0.5 * math.erfc(-z / math.sqrt(2))


def slowdown_ci(base: Sequence[float], new: Sequence[float], seed: int = 0,
                confidence: float = CONFIDENCE, rounds: int = BOOTSTRAP) -> Tuple[float, float, float]:
    """Slowdown 1 - median(new)/median(base) with a bootstrap percentile interval."""
    base, new = np.asarray(base, float), np.asarray(new, float)
    point = 1.0 - np.median(new) / np.median(base)
    rng = np.random.default_rng(seed)
    bb = np.median(rng.choice(base, size=(rounds, base.size)), axis=1)
    nb = np.median(rng.choice(new, size=(rounds, new.size)), axis=1)
    dist = 1.0 - nb / bb
    lo, hi = np.percentile(dist, [50 * (1 - confidence), 100 - 50 * (1 - confidence)])
    return float(point), float(lo), float(hi)


@dataclass(frozen=True)
class Change:
    label: str
    metric: str
    base_median: float
    new_median: float
    slowdown: float
    ci_low: float
    ci_high: float
    p_slower: float
    verdict: str   # regression | slower (within threshold) | noise | faster


def judge(base: Sequence[float], new: Sequence[float], threshold: Threshold,
          alpha: float = ALPHA, seed: int = 0) -> Tuple[str, float, Tuple[float, float, float]]:
    """Verdict for one metric's raw samples (higher is better)."""
    p_slower = mann_whitney_less(new, base)
    p_faster = mann_whitney_less(base, new)
    point, lo, hi = slowdown_ci(base, new, seed=seed)
    if p_slower < alpha and hi >= threshold.fraction:
        verdict = "REGRESSION"
    elif p_slower < alpha:
        verdict = "slower, within threshold"
    elif p_faster < alpha:
        verdict = "faster"
    else:
        verdict = "no change (noise)"
    return verdict, p_slower, (point, lo, hi)


def _load(path: str) -> List[Dict]:
    from .report import load_run  # local import: report pulls nothing heavy at import time
    from .runner import read_records
    if os.path.isfile(path):
        return read_records(path)
    return load_run(path)[0]


def _identity(rec: Dict) -> Tuple:
    m = rec.get("machine") or {}
    return (m.get("cpu"), m.get("cores"), m.get("gpu"))


def compare_records(base: List[Dict], new: List[Dict], threshold: Threshold,
                    force: bool = False) -> Tuple[List[Change], List[str]]:
    """Changes of every matched ok cell, and the problems that block a fair comparison."""
    problems = []
    for what, key in (("schema versions", lambda r: r.get("schema_version")),
                      ("machines", _identity), ("thread counts", lambda r: r.get("threads"))):
        a, b = {key(r) for r in base}, {key(r) for r in new}
        if a != b:
            problems.append("different %s: %s vs %s" % (what, sorted(map(str, a)), sorted(map(str, b))))
    if problems and not force:
        return [], problems
    by_id = {r["cell_id"]: r for r in base if r.get("status") == "ok"}
    changes = []
    for rec in new:
        old = by_id.get(rec.get("cell_id"))
        if old is None or rec.get("status") != "ok":
            continue
        label = "%s/%s/%s %s b%s %s" % (rec["framework"], rec["model"], rec["strategy"],
                                       rec["task"], rec["batch_size"], rec["device"])
        for metric in METRICS:
            a, b = old.get(metric) or [], rec.get(metric) or []
            if len(a) < 2 or len(b) < 2:
                continue
            verdict, p, (point, lo, hi) = judge(a, b, threshold)
            changes.append(Change(label, metric, float(np.median(a)), float(np.median(b)),
                                  point, lo, hi, p, verdict))
    return changes, problems


def format_table(changes: Sequence[Change]) -> str:
    head = "| cell | metric | base | new | slowdown [95% CI] | p(slower) | verdict |"
    lines = [head, "|---|---|---:|---:|---|---:|---|"]
    for c in changes:
        lines.append("| %s | %s | %.4g | %.4g | %+.1f%% [%+.1f, %+.1f] | %.3g | %s |" % (
            c.label, c.metric.replace("_samples_per_s", ""), c.base_median, c.new_median,
            100 * c.slowdown, 100 * c.ci_low, 100 * c.ci_high, c.p_slower, c.verdict))
    return "\n".join(lines)


def main(args) -> int:
    threshold = Threshold.parse(args.threshold)
    base, new = _load(args.base), _load(args.new)
    if not base or not new:
        sys.stderr.write("error: no records in %s\n" % (args.base if not base else args.new))
        return 2
    changes, problems = compare_records(base, new, threshold, force=args.force)
    if problems and not args.force:
        sys.stderr.write("refusing to compare (use --force to override):\n  %s\n"
                         % "\n  ".join(problems))
        return 2
    for p in problems:
        sys.stderr.write("warning (forced): %s\n" % p)
    if not changes:
        sys.stderr.write("no matching ok cells with repeats in both runs\n")
        return 0
    print(format_table(changes))
    bad = [c for c in changes if c.verdict == "REGRESSION"]
    print("\n%d comparisons, %d regressions (threshold %.0f%%, alpha %g)"
          % (len(changes), len(bad), 100 * threshold.fraction, ALPHA))
    return 1 if bad else 0
