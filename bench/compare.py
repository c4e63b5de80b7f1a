"""Regression gate: ``python -m bench compare BASE NEW [--threshold 10%]``.

Cells are matched by their configuration (``cell_id``). For each matched
``ok`` cell and each throughput metric the gate looks at the raw repeats:

* *outside the noise*: a one-sided Mann-Whitney U test says NEW is slower than
  BASE at level ``ALPHA`` (exact distribution for small samples);
* *slower than the threshold*: the bootstrap confidence interval of the
  slowdown (1 - median(NEW) / median(BASE)) reaches the threshold, i.e. the
  data are consistent with a slowdown at least that large.

Only when both hold is the change a regression. Under no change the
false-alarm rate is at most ALPHA; a real slowdown equal to the threshold is
caught whenever the samples separate, which ``tests/test_compare.py`` checks
on synthetic data. A speed-up is judged the same way in the other direction: an
*improvement* when it is significant and its interval reaches the threshold,
*faster, within threshold* when it is significant only. Where so few repeats
were taken that no arrangement of them could reach ALPHA (3 against 3: at best
p = 0.05), the verdict says so instead of "no change".

A cell that is ``ok`` in BASE but missing, not ``ok`` or without finite
samples in NEW is a *lost cell*: a regression the statistics cannot see.
Statistics use finite samples only, and a metric with fewer than two in BASE
is listed as not compared, never as "no change".

A cell that was *noisy* in either run (its record's ``noisy``: while it was
timed, its threads waited for a CPU more than 10% of the time, or the
hypervisor stole more than 5%; ``bench.environment.NoiseProbe``) gets no
verdict: it is listed with why, and judged only with ``--force`` (its verdict
then says "(noisy)"). Two separate runs on a busy machine differ by load, which
no test on their samples removes; ``python -m bench ab`` alternates the two
sides instead.

Exit codes: 0 no regression and no lost cell; 1 a regression, or a lost cell
(unless ``--allow-missing``); 2 a refusal (different machines, thread counts
or unknown schema versions without ``--force``; unreadable records; noisy
cells left unjudged, when nothing above gave 1).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .records import KNOWN_SCHEMAS, finite_samples, latest, read_records
from .runs import load_run
from .stats import median, paired_slowdown_ci, slowdown_ci

ALPHA = 0.01
METRICS = ("train_samples_per_s", "infer_samples_per_s")  # higher is better
COMPARABLE_SCHEMAS = KNOWN_SCHEMAS   # 2 added statuses; timing fields are those of 1


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
    verdict: str   # see VERDICTS


REGRESSION, IMPROVEMENT = "REGRESSION", "improvement"
NO_CHANGE = "no change (noise)"
VERDICTS = (REGRESSION, "slower, within threshold", NO_CHANGE, "faster, within threshold",
            IMPROVEMENT, "too few repeats to tell")


def smallest_p(n: int, m: int) -> float:
    """The smallest one-sided p-value the exact test can give for n vs m samples (no ties)."""
    return 1.0 / math.comb(n + m, n) if n and m else 1.0


def _significant(p_slower: float, p_faster: float, lo: float, hi: float, threshold: Threshold,
                 alpha: float) -> Optional[str]:
    """The rule both tests share: a significant change is a regression (or an improvement)
    when its interval reaches the threshold, else within it; None when neither side is
    significant."""
    if p_slower < alpha:
        return REGRESSION if hi >= threshold.fraction else "slower, within threshold"
    if p_faster < alpha:
        return IMPROVEMENT if lo <= -threshold.fraction else "faster, within threshold"
    return None


def judge(base: Sequence[float], new: Sequence[float], threshold: Threshold,
          alpha: float = ALPHA, seed: int = 0) -> Tuple[str, float, Tuple[float, float, float]]:
    """Verdict for one metric's raw samples (higher is better); one of VERDICTS."""
    p_slower = mann_whitney_less(new, base)
    p_faster = mann_whitney_less(base, new)
    point, lo, hi = slowdown_ci(base, new, seed=seed)
    verdict = _significant(p_slower, p_faster, lo, hi, threshold, alpha)
    if verdict is None:
        # No outcome of so few repeats could be significant: "no change" would be a guess.
        blind = len(base) <= 30 and len(new) <= 30 and smallest_p(len(base), len(new)) >= alpha
        verdict = "too few repeats to tell" if blind else NO_CHANGE
    return verdict, p_slower, (point, lo, hi)


def _load(path: str, skip_corrupt: bool = False) -> List[Dict]:
    """The records of a file or a run directory, the last record of each cell in each file."""
    if os.path.isfile(path):
        return latest(read_records(path, skip_corrupt=skip_corrupt))
    return load_run(path, skip_corrupt=skip_corrupt)[0]


def _identity(rec: Dict) -> Tuple:
    m = rec.get("machine") or {}
    return (m.get("cpu"), m.get("cores"), m.get("gpu"))


def _timed(recs: Sequence[Dict]) -> List[Dict]:
    return [r for r in recs if r.get("status") == "ok"]


def _schema_family(rec: Dict):
    """Schema versions whose timings mean the same compare as one (1 and 2 differ in statuses)."""
    return "1-2" if rec.get("schema_version") in COMPARABLE_SCHEMAS else rec.get("schema_version")


def _label(rec: Dict) -> str:
    return "%s/%s/%s %s b%s %s" % (rec["framework"], rec["model"], rec["strategy"],
                                   rec["task"], rec["batch_size"], rec["device"])


@dataclass(frozen=True)
class Lost:
    """A cell that is ok in BASE and cannot be judged in NEW: missing, not ok, or no finite samples."""

    label: str
    why: str


def compare_records(base: List[Dict], new: List[Dict], threshold: Threshold,
                    force: bool = False) -> Tuple[List[Change], List[str]]:
    """Changes of every matched ok cell, and the problems that block a fair comparison."""
    changes, problems, _, _ = compare_runs(base, new, threshold, force)
    return changes, problems


def noisy_why(rec: Dict) -> str:
    noise = rec.get("noise") if isinstance(rec.get("noise"), dict) else {}
    return noise.get("noisy_why") or "flagged noisy"


def _mismatches(base: List[Dict], new: List[Dict]) -> List[str]:
    """What makes the two runs' timings incomparable: schema versions, machines, threads."""
    problems = []
    for what, key in (("schema versions", _schema_family),
                      ("machines", _identity), ("thread counts", lambda r: r.get("threads"))):
        # Only timed cells say where timings come from: a cluster run's static cells carry
        # its head's fingerprint, and a lost cell has none.
        pick = _timed if what == "machines" else list
        a, b = {key(r) for r in pick(base)}, {key(r) for r in pick(new)}
        if a != b:
            problems.append("different %s: %s vs %s" % (what, sorted(map(str, a)), sorted(map(str, b))))
    return problems


def _moved(base: List[Dict], by_id: Dict[str, Dict]) -> List[str]:
    """Cells timed on one kind of machine in BASE and another in NEW. Runs on a cluster of
    several kinds of machine have the same set on both sides, yet a cell may have moved."""
    moved = [(old, by_id[old["cell_id"]]) for old in _timed(latest(base))
             if old["cell_id"] in by_id and _timed([by_id[old["cell_id"]]])
             and _identity(old) != _identity(by_id[old["cell_id"]])]
    if not moved:
        return []
    old, rec = moved[0]
    return ["%d cells ran on different machines in BASE and NEW (e.g. %s: %s vs %s)"
            % (len(moved), _label(old), _identity(old), _identity(rec))]


@dataclass
class _Outcome:
    """What ``compare_runs`` found, cell by cell."""

    changes: List[Change] = field(default_factory=list)
    lost: List[Lost] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)   # metrics not compared


def _judge_metric(label: str, metric: str, old: Dict, rec: Dict, threshold: Threshold,
                  noisy: bool, out: _Outcome) -> None:
    """One metric of a cell ok on both sides: a change, a lost cell or a metric not compared."""
    raw_a, raw_b = old.get(metric) or [], rec.get(metric) or []
    a, b = finite_samples(raw_a), finite_samples(raw_b)
    if not raw_a:
        return   # BASE never measured it (an inference-only cell)
    if len(a) < 2:
        out.skipped.append("%s %s: BASE has %d finite samples of %d; not compared"
                           % (label, metric, len(a), len(raw_a)))
    elif len(b) < 2 or len(b) < len(raw_b):
        out.lost.append(Lost(label, "%s in NEW has %d finite samples of %d"
                             % (metric, len(b), len(raw_b))))
    else:
        verdict, p, (point, lo, hi) = judge(a, b, threshold)
        out.changes.append(Change(label, metric, median(a), median(b), point, lo, hi, p,
                                  verdict + (" (noisy)" if noisy else "")))


def _judge_cell(old: Dict, rec: Optional[Dict], threshold: Threshold, force: bool,
                noisy: Optional[List[str]], out: _Outcome) -> None:
    """A cell ok in BASE against its record in NEW (None: missing there)."""
    label = _label(old)
    if rec is None:
        out.lost.append(Lost(label, "missing in NEW"))
        return
    if rec.get("status") != "ok":
        out.lost.append(Lost(label, "%s in NEW: %s" % (rec.get("status"), rec.get("reason", ""))))
        return
    loud = [(side, r) for side, r in (("BASE", old), ("NEW", rec)) if r.get("noisy") is True]
    if loud and not force:
        if noisy is not None:
            noisy.append("%s: noisy in %s (%s)" % (label, " and ".join(s for s, _ in loud),
                                                   noisy_why(loud[0][1])))
        return
    for metric in METRICS:
        _judge_metric(label, metric, old, rec, threshold, bool(loud), out)


def compare_runs(base: List[Dict], new: List[Dict], threshold: Threshold, force: bool = False,
                 noisy: Optional[List[str]] = None
                 ) -> Tuple[List[Change], List[str], List[Lost], List[str]]:
    """(changes, problems that block a fair comparison, lost cells, metrics not compared).

    ``noisy`` (a list) collects the cells left unjudged because a side was noisy; with
    ``force`` they are judged, their verdicts marked."""
    by_id = {r["cell_id"]: r for r in latest(new)}
    problems = _mismatches(base, new) or _moved(base, by_id)
    if problems and not force:
        return [], problems, [], []
    out = _Outcome()
    for old in latest(base):
        if old.get("status") == "ok":
            _judge_cell(old, by_id.get(old["cell_id"]), threshold, force, noisy, out)
    return out.changes, problems, out.lost, out.skipped


def format_table(changes: Sequence[Change]) -> str:
    head = "| cell | metric | base | new | slowdown [95% CI] | p(slower) | verdict |"
    lines = [head, "|---|---|---:|---:|---|---:|---|"]
    for c in changes:
        lines.append("| %s | %s | %.4g | %.4g | %+.1f%% [%+.1f, %+.1f] | %.3g | %s |" % (
            c.label, c.metric.replace("_samples_per_s", ""), c.base_median, c.new_median,
            100 * c.slowdown, 100 * c.ci_low, 100 * c.ci_high, c.p_slower, c.verdict))
    return "\n".join(lines)


def _print_findings(changes: Sequence[Change], problems: Sequence[str], lost: Sequence[Lost],
                    skipped: Sequence[str], noisy: Sequence[str], allow: bool) -> None:
    """Forced problems and metrics not compared (stderr), the table, lost and noisy cells."""
    for p in problems:
        sys.stderr.write("warning (forced): %s\n" % p)
    for line in skipped:
        sys.stderr.write("not compared: %s\n" % line)
    if changes:
        print(format_table(changes))
    else:
        sys.stderr.write("no matching ok cells with finite repeats in both runs\n")
    if lost:
        print("\nlost cells (ok in BASE, not judged in NEW%s):" % ("; accepted by --allow-missing"
                                                                   if allow else ""))
        for item in lost:
            print("  %s: %s" % (item.label, item.why))
    if noisy:
        print("\nnot judged, noisy (the machine was busy while they were timed; rerun on a quiet "
              "machine, use `python -m bench ab`, or --force):")
        for line in noisy:
            print("  " + line)


def _tally(changes: Sequence[Change], lost: Sequence[Lost], threshold: Threshold) -> str:
    bad = [c for c in changes if c.verdict.startswith(REGRESSION)]
    better = [c for c in changes if c.verdict.startswith(IMPROVEMENT)]
    blind = [c for c in changes if c.verdict == "too few repeats to tell"]
    return ("%d comparisons, %d regressions, %d improvements, %d lost cells (threshold %.0f%%, "
            "alpha %g)%s" % (len(changes), len(bad), len(better), len(lost), 100 * threshold.fraction,
                             ALPHA, "; %d with too few repeats to tell (no outcome of so few could "
                             "reach p < %g: rerun with more --repeats)" % (len(blind), ALPHA)
                             if blind else ""))


def main(args) -> int:
    threshold = args.threshold if isinstance(args.threshold, Threshold) else \
        Threshold.parse(args.threshold)
    skip = getattr(args, "skip_corrupt", False)
    base, new = _load(args.base, skip), _load(args.new, skip)
    if not base or not new:
        sys.stderr.write("error: no records in %s\n" % (args.base if not base else args.new))
        return 2
    noisy: List[str] = []
    changes, problems, lost, skipped = compare_runs(base, new, threshold, force=args.force,
                                                    noisy=noisy)
    if problems and not args.force:
        sys.stderr.write("refusing to compare (use --force to override):\n  %s\n"
                         % "\n  ".join(problems))
        return 2
    allow = getattr(args, "allow_missing", False)
    _print_findings(changes, problems, lost, skipped, noisy, allow)
    print("\n" + _tally(changes, lost, threshold))
    if any(c.verdict.startswith(REGRESSION) for c in changes) or (lost and not allow):
        return 1
    return 2 if noisy else 0


# --- paired rounds (``bench ab``): each round ran BASE and NEW back to back ---

def _signed_rank_counts(doubled_ranks: Sequence[int]) -> Dict[int, int]:
    """How many of the 2^n sign assignments give each (doubled) positive rank sum."""
    counts = {0: 1}
    for r in doubled_ranks:
        nxt = dict(counts)
        for total, c in counts.items():
            nxt[total + r] = nxt.get(total + r, 0) + c
        counts = nxt
    return counts


def signed_rank_greater(d: Sequence[float]) -> float:
    """One-sided exact Wilcoxon signed-rank p-value for 'the differences d tend to be > 0'.

    Zero differences are dropped; tied magnitudes get their average rank, and the null
    distribution is enumerated over sign flips of those very ranks (exact with ties: ranks
    are doubled to whole numbers)."""
    x = np.asarray([v for v in d if v != 0 and math.isfinite(v)], float)
    n = x.size
    if n == 0:
        return 1.0
    order = np.argsort(np.abs(x), kind="mergesort")
    ranks = np.empty(n)
    mags = np.abs(x)[order]
    i = 0
    while i < n:
        j = i
        while j + 1 < n and mags[j + 1] == mags[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    doubled = [int(round(2 * r)) for r in ranks]
    observed = sum(r for r, v in zip(doubled, x) if v > 0)
    counts = _signed_rank_counts(doubled)
    return sum(c for total, c in counts.items() if total >= observed) / float(2 ** n)


TOO_FEW_ROUNDS = "too few rounds to tell"


def judge_paired(base: Sequence[float], new: Sequence[float], threshold: Threshold,
                 alpha: float = ALPHA, seed: int = 0
                 ) -> Tuple[str, float, Tuple[float, float, float]]:
    """Verdict from paired rounds (higher is better): the same rule as ``judge``, with the
    signed-rank test on the per-round log ratios in place of Mann-Whitney."""
    base, new = np.asarray(base, float), np.asarray(new, float)
    d = np.log(base / new)          # > 0: NEW slower in that round
    p_slower = signed_rank_greater(d)
    p_faster = signed_rank_greater(-d)
    point, lo, hi = paired_slowdown_ci(base, new, seed=seed)
    verdict = _significant(p_slower, p_faster, lo, hi, threshold, alpha)
    if verdict is None:   # no outcome of so few rounds could reach alpha: say so
        verdict = TOO_FEW_ROUNDS if 0.5 ** int(np.count_nonzero(d)) >= alpha else NO_CHANGE
    return verdict, p_slower, (point, lo, hi)
