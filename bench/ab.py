"""``python -m bench ab --base ENV --new ENV [run filters]``: an interleaved A/B regression check.

Two separate runs taken at different times differ by drift and by whatever else the
machine was doing, and no test on their samples can remove that (``bench compare``
refuses noisy cells for this reason). Here each cell runs alternately in the two
environments, in ABBA order over ``--rounds`` rounds (round 0: base then new, round 1:
new then base, ...), every time in a fresh process, so drift and load hit both sides
alike. Each round gives one ratio per metric (``round_value``: the median of each
process's time-calibrated samples, those that other work did not disturb where there are
enough); the verdict is ``bench.compare.judge_paired``: the one-sided
exact Wilcoxon signed-rank test on the per-round log ratios at ``compare.ALPHA``, and a
bootstrap interval of the median ratio (resampling rounds) against the threshold, the
same rule ``compare`` applies to unpaired samples.

ENV is one of:

* a Python interpreter (a path to an executable file), running this checkout's code;
* a virtual environment (a directory with ``bin/python``), e.g. a venv per release of a
  framework, or ``nox:FW`` for this checkout's ``nox`` venv of framework FW;
* a git ref (``git:REF``, or any name ``git rev-parse`` resolves that is not a path): that
  commit checked out into a temporary worktree (removed afterwards), run with this
  interpreter.

``--base-env`` / ``--new-env KEY=VALUE`` set environment variables on one side only.

Records of both sides are kept: ``OUT/base/records.jsonl`` and ``OUT/new/records.jsonl``
(each record with ``ab``: side, round, order, environment), so ``bench report`` reads
either side and nothing measured is lost; ``OUT/ab.md`` and ``OUT/ab.json`` hold the
verdicts with every round's values.

Exit codes as ``compare``: 0 no regression and no lost cell; 1 a regression, or a cell
that was ok in base but failed in new; 2 a refusal (bad ENV, an occupied --out); 3 the
environment failed (a full disk); 130 interrupted (what finished is kept).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import registry
from .cluster import nox_python
from .compare import ALPHA, IMPROVEMENT, METRICS, REGRESSION, Threshold, judge_paired
from .config import CellConfig, UsageError
from .environment import NOISY_WAIT, describe, git_commit
from .records import ENV, RECORDS, EnvironmentProblem, RunLock, append_record, atomic_write, occupied
from .runner import ROOT, iter_probes, run_in_subprocess

DEFAULT_ROUNDS = 12
SIDES = ("base", "new")


@dataclass
class Side:
    name: str                   # base | new
    spec: str                   # as given on the command line
    python: str
    root: str                   # the code the cells run (this checkout or a worktree)
    env: Dict[str, str] = field(default_factory=dict)
    worktree: Optional[str] = None   # removed at the end

    def describe(self) -> Dict:
        return {"spec": self.spec, "python": self.python, "root": self.root, "env": self.env,
                "git_commit": git_commit(self.root)}


def _interpreter_of_venv(path: str) -> Optional[str]:
    for rel in ("bin/python", "Scripts/python.exe"):
        candidate = os.path.join(path, rel)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _git_commit_of(ref: str, root: str = ROOT) -> Optional[str]:
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", ref + "^{commit}"],
                              cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def resolve(spec: str, name: str, env: Optional[Dict[str, str]] = None, root: str = ROOT) -> Side:
    """The side an ENV names; UsageError (one line) when it names nothing usable."""
    env = dict(env or {})
    text = spec.strip()
    if not text:
        raise UsageError("--%s is empty: give an interpreter, a venv, nox:FW or a git ref" % name)
    if text.startswith("nox:"):
        fw = text[4:]
        python = nox_python(root, fw)
        if not python:
            raise UsageError("--%s %s: no nox venv for %r in %s/.nox (make it with nox -s "
                             "\"bench_framework(framework='%s')\")" % (name, spec, fw, root, fw))
        return Side(name, spec, python, root, env)
    ref = text[4:] if text.startswith("git:") else None
    if ref is None and os.path.exists(text):
        return Side(name, spec, _interpreter_at(text, spec, name), root, env)
    return _worktree_side(ref if ref is not None else text, spec, name, env, root)


def _interpreter_at(text: str, spec: str, name: str) -> str:
    """The interpreter an existing path names: itself, or a venv's ``bin/python``."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        python = _interpreter_of_venv(path)
        if not python:
            raise UsageError("--%s %s: a directory without bin/python (not a venv)" % (name, spec))
        return python
    if not os.access(path, os.X_OK):
        raise UsageError("--%s %s: not an executable interpreter" % (name, spec))
    return path


def _worktree_side(ref: str, spec: str, name: str, env: Dict[str, str], root: str) -> Side:
    """The commit a git ref names, checked out into a temporary worktree (``release`` removes
    it), run with this interpreter."""
    commit = _git_commit_of(ref, root)
    if not commit:
        raise UsageError("--%s %s: not an interpreter, a venv, nox:FW or a git ref of %s"
                         % (name, spec, root))
    tmp = tempfile.mkdtemp(prefix="bench-ab-%s-" % name)
    done = subprocess.run(["git", "worktree", "add", "--detach", tmp, commit], cwd=root,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError("--%s %s: git worktree add failed: %s"
                         % (name, spec, (done.stderr.strip().splitlines() or ["?"])[-1]))
    return Side(name, spec + " (%s)" % commit[:12], sys.executable, tmp, env, worktree=tmp)


def release(side: Side, root: str = ROOT) -> None:
    if side.worktree:
        subprocess.run(["git", "worktree", "remove", "--force", side.worktree], cwd=root,
                       capture_output=True, timeout=120)
        shutil.rmtree(side.worktree, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True, timeout=120)


def parse_env_items(items: Optional[Sequence[str]], flag: str) -> Dict[str, str]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise UsageError("%s takes KEY=VALUE, not %r" % (flag, item))
        out[key] = value
    return out


QUIET_SAMPLES = 3   # a process is quiet for a metric with at least this many quiet samples
MIN_ROUNDS = 7      # the fewest paired rounds whose exact test can reach alpha 0.01


def round_value(rec: Dict, metric: str) -> Dict:
    """One process's values of a metric: ``wall`` (the median rate of its samples that no
    other work disturbed, when there are ``QUIET_SAMPLES`` of them, else of all), ``quiet``
    (there were), ``cpu`` (the median on-CPU rate: each sample's rate / (1 - its run-queue
    wait share), None where the waits are unknown) and ``wait`` (the median wait share)."""
    good = _rated_samples(rec, metric)
    if rec.get("status") != "ok" or not good:
        return {"wall": None, "quiet": False, "cpu": None, "wait": None}
    quiet = [v for v, w in good if w is not None and w <= NOISY_WAIT]
    known = [(v, w) for v, w in good if w is not None and w < 1]
    enough = len(quiet) >= QUIET_SAMPLES
    return {"wall": float(np.median(quiet if enough else [v for v, _ in good])),
            "quiet": enough,
            "cpu": _on_cpu_rate(known) if len(known) == len(good) else None,
            "wait": float(np.median([w for _, w in known])) if known else None}


def _rated_samples(rec: Dict, metric: str) -> List[Tuple[float, Optional[float]]]:
    """(rate, run-queue wait share or None) of each finite positive sample of a metric."""
    samples = rec.get(metric) or []
    waits = rec.get(metric.split("_")[0] + "_wait_shares") or [None] * len(samples)
    return [(v, w) for v, w in zip(samples, waits)
            if isinstance(v, (int, float)) and np.isfinite(v) and v > 0]


def _on_cpu_rate(known: List[Tuple[float, float]]) -> float:
    return float(np.median([v / (1 - w) for v, w in known]))


@dataclass
class CellAB:
    cfg: CellConfig
    # metric -> side -> one round_value dict per round
    values: Dict[str, Dict[str, List[Dict]]] = field(default_factory=dict)
    failures: Dict[str, List[str]] = field(default_factory=lambda: {"base": [], "new": []})
    noisy: Dict[str, int] = field(default_factory=lambda: {"base": 0, "new": 0})
    rounds_done: int = 0

    def pairs(self, metric: str, kind: str) -> List[Tuple[float, float]]:
        """(base, new) per round: ``quiet`` wall rates of rounds quiet on both sides, ``wall``
        or ``cpu`` rates of every round where both sides have one."""
        per = self.values.get(metric) or {"base": [], "new": []}
        key = "cpu" if kind == "cpu" else "wall"
        return [(a[key], b[key]) for a, b in zip(per["base"], per["new"])
                if a[key] and b[key] and (kind != "quiet" or (a["quiet"] and b["quiet"]))]

    def measured(self) -> List[str]:
        return [m for m, per in self.values.items()
                if any(v["wall"] for v in per["base"] + per["new"])]

    def add(self, name: str, r: int, rec: Dict) -> List[str]:
        """A side's record of round ``r``: its values per metric, its failure, whether it was
        noisy; returns the rates to show ("infer 123.4 (busy)")."""
        shown = []
        for metric in METRICS:
            got = round_value(rec, metric)
            self.values.setdefault(metric, {"base": [], "new": []})[name].append(got)
            if got["wall"]:
                shown.append("%s %.4g%s" % (metric.split("_")[0], got["wall"],
                                            "" if got["quiet"] else " (busy)"))
        if rec.get("status") != "ok":
            self.failures[name].append("round %d: %s: %s" % (
                r, rec.get("status"), rec.get("reason", "")))
        if rec.get("noisy") is True:
            self.noisy[name] += 1
        return shown

    def quiet_rounds(self) -> int:
        """Rounds quiet on both sides, for the metric that has the fewest (0: none measured)."""
        counts = [len(self.pairs(m, "quiet")) for m in self.measured()]
        return min(counts) if counts else 0


BUSY_WAIT_GAP = 0.15   # sides whose median waits differ more than this: on-CPU rates may mislead


def verdicts(cell: CellAB, threshold: Threshold) -> List[Dict]:
    """One row per measured metric of a cell. Quiet rounds when there are ``MIN_ROUNDS`` of
    them (wall-clock rates, what the suite publishes); on a machine too busy for that, every
    round's on-CPU rates, which keep the time spent waiting for a CPU (the load) out of both
    sides, and say so."""
    return [_verdict(cell, metric, threshold) for metric in cell.measured()]


def _verdict(cell: CellAB, metric: str, threshold: Threshold) -> Dict:
    per = cell.values[metric]
    quiet, cpu, wall = (cell.pairs(metric, k) for k in ("quiet", "cpu", "wall"))
    waits = {side: [v["wait"] for v in per[side] if v["wait"] is not None] for side in SIDES}
    row = {"cell": cell.cfg.label(), "cell_id": cell.cfg.key(), "metric": metric,
           "rounds_run": cell.rounds_done, "quiet_rounds": len(quiet),
           "values": per, "noisy_base": cell.noisy["base"], "noisy_new": cell.noisy["new"],
           "median_wait": {side: float(np.median(w)) if w else None
                           for side, w in waits.items()}}
    kind, pairs, basis = _basis(quiet, cpu, wall, cell.rounds_done)
    row.update(rounds=len(pairs), basis=basis)
    gap = row["median_wait"]
    if kind == "cpu" and None not in gap.values() and abs(gap["base"] - gap["new"]) > BUSY_WAIT_GAP:
        row["warning"] = ("the sides waited for a CPU differently (base %.0f%%, new %.0f%%): "
                          "on-CPU rates cannot see a change in how a side uses the cores; "
                          "rerun on a quieter machine" % (100 * gap["base"], 100 * gap["new"]))
    row.update(_judgement(cell, kind, pairs, threshold))
    return row


def _basis(quiet: List, cpu: List, wall: List, rounds_run: int) -> Tuple[str, List, str]:
    """The rounds a verdict rests on: (which rates, their (base, new) pairs, the words)."""
    if len(quiet) >= MIN_ROUNDS:
        return "quiet", quiet, "wall-clock rates of the quiet rounds"
    if len(cpu) >= MIN_ROUNDS:
        return "cpu", cpu, "on-CPU rates (busy machine: %d of %d rounds quiet)" % (
            len(quiet), rounds_run)
    return "wall", wall, "wall-clock rates of every round (busy machine)"


def _judgement(cell: CellAB, kind: str, pairs: List[Tuple[float, float]],
               threshold: Threshold) -> Dict:
    """The verdict of the pairs (``compare.judge_paired``), or why there is none."""
    if cell.failures["new"] and not cell.failures["base"]:
        return {"verdict": "LOST", "why": "failed in new: " + cell.failures["new"][0]}
    if len(pairs) < 2:
        return {"verdict": "not compared", "why": "fewer than 2 complete rounds"}
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    verdict, p, (point, lo, hi) = judge_paired(a, b, threshold)
    if kind != "quiet":
        verdict += " (busy: on-CPU rates)" if kind == "cpu" else " (busy)"
    return dict(verdict=verdict, p_slower=p, slowdown=point, ci_low=lo, ci_high=hi,
                base_median=float(np.median(a)), new_median=float(np.median(b)))


def format_table(rows: Sequence[Dict]) -> str:
    lines = ["| cell | metric | rounds used / run | base | new | slowdown [95% CI] | p(slower) | "
             "noisy processes b/n | verdict |", "|---|---|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        if "slowdown" in r:
            nums = "%.4g | %.4g | %+.1f%% [%+.1f, %+.1f] | %.3g" % (
                r["base_median"], r["new_median"], 100 * r["slowdown"], 100 * r["ci_low"],
                100 * r["ci_high"], r["p_slower"])
        else:
            nums = "- | - | - | -"
        lines.append("| %s | %s | %d / %d | %s | %d/%d | %s |" % (
            r["cell"], r["metric"].replace("_samples_per_s", ""), r["rounds"], r["rounds_run"], nums,
            r["noisy_base"], r["noisy_new"], r["verdict"] + (": " + r["why"] if r.get("why") else "")
            + (" (%s)" % r["warning"] if r.get("warning") else "")))
    return "\n".join(lines)


def run_ab(cells: Sequence[CellConfig], base: Side, new: Side, rounds: int, threshold: Threshold,
           out_dir: str, stream=None, on_record: Optional[Callable[[Dict], None]] = None,
           max_rounds: Optional[int] = None) -> int:
    """Run every cell ``rounds`` times on each side, ABBA, and on (to ``max_rounds``, default
    twice ``rounds``) until ``rounds`` rounds were quiet on both sides; write records and
    verdicts."""
    max_rounds = max(rounds, max_rounds if max_rounds is not None else 2 * rounds)
    out = stream or sys.stderr
    sides = {"base": base, "new": new}
    os.makedirs(out_dir, exist_ok=True)
    lock = RunLock(out_dir).acquire()
    try:
        _refuse_occupied(out_dir)
        probes = _probe_sides(sides, cells, out_dir)
        cells = _applicable(cells, out)
        total = len(cells) * rounds * 2
        out.write("ab: %d cells x %d rounds (up to %d while the machine is busy) x 2 sides = "
                  "%d cell processes or more, into %s\n  base: %s\n  new:  %s\n"
                  % (len(cells), rounds, max_rounds, total, out_dir, base.spec, new.spec))
        run = _Campaign(sides, probes, out_dir, out, total, on_record)
        results: List[CellAB] = []
        try:
            for cfg in cells:
                results.append(CellAB(cfg))
                run.run_cell(results[-1], rounds, max_rounds)
        finally:
            rows = [row for cell in results for row in verdicts(cell, threshold)]
            _write_verdicts(out_dir, {
                "base": base.describe(), "new": new.describe(), "rounds": rounds,
                "threshold": threshold.fraction, "alpha": ALPHA,
                "complete": len(results) == len(cells) and all(
                    c.rounds_done >= rounds for c in results),
                "verdicts": rows})
    finally:
        lock.release()
    return _print_outcome(rows, results, threshold, rounds, run.done)


def _refuse_occupied(out_dir: str) -> None:
    for name in SIDES:
        busy = occupied(os.path.join(out_dir, name))
        if busy:
            raise UsageError("%s already holds an A/B run (%s); give a new --out"
                             % (out_dir, ", ".join(busy)))


def _probe_sides(sides: Dict[str, Side], cells: Sequence[CellConfig], out_dir: str) -> Dict:
    """Each side's framework probes, written with its environment into ``OUT/SIDE/``;
    UsageError when a side lacks a framework of the cells."""
    fws = sorted({c.framework for c in cells})
    probes = {}
    for name, side in sides.items():
        probes[name] = dict(iter_probes(fws, python=side.python, root=side.root, extra=side.env))
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        env = describe({k: v.get("detail") if v.get("ok") else None
                        for k, v in probes[name].items()},
                       sorted({c.threads for c in cells})[0], side.root)
        env.update(framework_probes=probes[name], ab=dict(side.describe(), side=name))
        atomic_write(os.path.join(folder, ENV), json.dumps(env, indent=2, sort_keys=True))
    for name in SIDES:
        bad = [fw for fw in fws if not probes[name][fw].get("ok")]
        if bad:
            raise UsageError("%s side (%s): %s" % (name, sides[name].spec, "; ".join(
                "%s unavailable: %s" % (fw, probes[name][fw].get("detail")) for fw in bad)))
    return probes


def _applicable(cells: Sequence[CellConfig], out) -> List[CellConfig]:
    """The cells the registry does not rule out, saying which it skips and why."""
    static = [(c, registry.not_applicable(c.framework, c.model, c.strategy, c.device))
              for c in cells]
    for c, why in static:
        if why:
            out.write("ab: skipping %s: not applicable: %s\n" % (c.label(), why))
    kept = [c for c, why in static if not why]
    if not kept:
        raise UsageError("no cell of the filters is applicable")
    return kept


@dataclass
class _Campaign:
    """What the cell processes of one A/B run share: the sides, where records go, progress."""
    sides: Dict[str, Side]
    probes: Dict[str, Dict]
    out_dir: str
    out: Any                    # the progress stream
    total: int                  # cell processes planned (more when rounds go on)
    on_record: Optional[Callable[[Dict], None]]
    done: int = 0
    t0: float = field(default_factory=time.time)

    def run_cell(self, cell: CellAB, rounds: int, max_rounds: int) -> None:
        r = 0
        # Rounds go on past --rounds (up to max_rounds) until --rounds of them were
        # quiet on both sides: a busy spell costs time, not the verdict.
        # Only while that looks reachable: at least half the rounds so far were quiet.
        while r < rounds or (cell.quiet_rounds() < rounds and r < max_rounds
                             and 2 * cell.quiet_rounds() >= r
                             and not cell.failures["base"] and not cell.failures["new"]):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for name in order:
                self.run_process(cell, r, name, "".join(s[0] for s in order))
            r += 1
            cell.rounds_done = r

    def run_process(self, cell: CellAB, r: int, name: str, order: str) -> None:
        """One cell process on one side: its record kept, its values added to the cell."""
        side = self.sides[name]
        try:
            rec = run_in_subprocess(cell.cfg, self.probes[name][cell.cfg.framework].get("detail"),
                                    python=side.python, result_dir=self.out_dir,
                                    root=side.root, extra_env=side.env)
        except OSError as exc:   # the cell could not write its result
            raise EnvironmentProblem("cannot write a cell's result in %s: %s" % (
                self.out_dir, exc.strerror or exc)) from None
        rec["ab"] = {"side": name, "round": r, "order": order, "env": side.spec}
        path = os.path.join(self.out_dir, name, RECORDS)
        try:
            append_record(path, rec)
        except OSError as exc:
            raise EnvironmentProblem("cannot write %s: %s" % (path, exc.strerror or exc)) from None
        if self.on_record:
            self.on_record(rec)
        self.done += 1
        shown = cell.add(name, r, rec)
        self.out.write("[%d/%d %ds] %s round %d %-4s %s%s\n" % (
            self.done, max(self.total, self.done), time.time() - self.t0, cell.cfg.label(), r,
            name, rec.get("status"), (": " + ", ".join(shown)) if shown else
            ": " + rec.get("reason", "")))
        self.out.flush()


def _write_verdicts(out_dir: str, summary: Dict) -> None:
    try:
        atomic_write(os.path.join(out_dir, "ab.json"), json.dumps(summary, indent=2))
        atomic_write(os.path.join(out_dir, "ab.md"), _markdown(summary))
    except OSError as exc:
        raise EnvironmentProblem("cannot write the verdicts into %s: %s (the records "
                                 "of both sides are kept)" % (out_dir, exc.strerror or exc)
                                 ) from None


def _print_outcome(rows: List[Dict], results: List[CellAB], threshold: Threshold, rounds: int,
                   done: int) -> int:
    """The verdict table and a one-line count on stdout; the exit code (1: a regression or a
    lost cell)."""
    print(format_table(rows))
    bad = [r for r in rows if r["verdict"].startswith((REGRESSION, "LOST"))]
    better = [r for r in rows if r["verdict"].startswith(IMPROVEMENT)]
    noisy = sum(c.noisy["base"] + c.noisy["new"] for c in results)
    print("\n%d comparisons, %d regressions or lost, %d improvements (threshold %.0f%%, alpha %g, "
          "%d+ rounds ABBA); %d of %d cell processes were noisy" % (
              len(rows), len(bad), len(better), 100 * threshold.fraction, ALPHA, rounds, noisy, done))
    return 1 if bad else 0


def _markdown(summary: Dict) -> str:
    lines = ["# A/B: %s vs %s" % (summary["base"]["spec"], summary["new"]["spec"]), "",
             "Each cell ran alternately in the two environments, ABBA over %d rounds, each time in "
             "a fresh process; the verdict is the one-sided Wilcoxon signed-rank test on the "
             "per-round log ratios (alpha %g) and a bootstrap 95%% interval of the median "
             "slowdown against the %.0f%% threshold (`python -m bench ab`)."
             % (summary["rounds"], summary["alpha"], 100 * summary["threshold"]), ""]
    if not summary["complete"]:
        lines += ["**Incomplete:** the run was interrupted; verdicts use the rounds that finished.", ""]
    lines += [format_table(summary["verdicts"]), ""]
    for side in ("base", "new"):
        d = summary[side]
        lines.append("- %s: `%s` (python %s, code %s, commit %s%s)" % (
            side, d["spec"], d["python"], d["root"], d["git_commit"],
            ", env " + " ".join("%s=%s" % kv for kv in sorted(d["env"].items())) if d["env"] else ""))
    return "\n".join(lines) + "\n"
