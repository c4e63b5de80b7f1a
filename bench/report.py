"""Reports from records only: ``python -m bench report RUN_DIR [--out DIR]``.

Writes ``report.md`` (GitHub-readable tables), ``summary.csv`` (one row per
cell; its columns are a stable contract) and PNG plots. Everything is derived
from ``records.jsonl`` and ``env.json`` files under RUN_DIR, so a published
report can be rebuilt from its raw files. pandas and matplotlib are imported
here only.

Records are read through ``bench.records`` (corrupt lines refuse, earlier
generations are not read, the last record of a cell wins); medians, IQRs and
``repeats`` use finite samples only. Outputs are written into a scratch
directory and renamed into place, so an interrupted report leaves the previous
outputs whole.

pandas is required (``UsageError`` naming the install command without it);
matplotlib is optional: without it the report and CSV are complete, with a line
saying why there are no plots.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import UsageError
from .coverage import coverage_rows
from .interface import BASELINE_STRATEGY
from .params import family
from .stats import iqr, median, quartiles
from .records import ENV, RECORDS, atomic_write, finite_samples, latest, read_records, run_files

SUMMARY_COLUMNS = [
    "framework", "model", "strategy", "task", "device", "batch_size", "threads", "status",
    "train_samples_per_s", "infer_samples_per_s", "latency_ms_p50", "compile_s", "peak_rss_mb",
    "speedup_vs_baseline", "roofline_pct", "accuracy",
    # beyond the contract
    "train_iqr", "infer_iqr", "repeats", "latency_ms_p95", "device_peak_mb", "infer_speedup_vs_baseline",
    "dev_accuracy", "seed", "hidden", "embed_dim", "framework_version", "reason", "cell_id", "run",
    "threads_applied", "epochs", "loss_mode", "machine", "train_mode", "cell_wall_s", "timed_s",
    "overhead_s",
    "compiles_train", "compiles_infer", "compile_cache",
    "own_gemm_pct", "machine_gemm_flops", "noisy", "noisy_why", "weight_decay",
]
# Quartiles of the throughput repeats: in the frame for the plots' error bars, not in the CSV.
QUARTILE_COLUMNS = ["train_q1", "train_q3", "infer_q1", "infer_q3"]
# Phases a cell reports (bench.cell.PHASES) and their column names in the overhead table.
OVERHEAD_PHASES = (("startup", "process start"), ("data", "data"), ("imports", "imports"),
                   ("pool", "pool"), ("first_call", "first call"), ("gate", "gate"),
                   ("warmup", "warm-up"), ("latency", "latency"), ("gemm", "GEMM peak"),
                   ("accuracy", "accuracy"), ("exit", "exit"))


def require_pandas() -> None:
    """Refuse in one line where pandas is missing (a report without it would be a second,
    hand-written copy of every table)."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise UsageError("python -m bench report needs pandas (and matplotlib for the plots): "
                         "pip install pandas matplotlib, or let `nox -s report` install both") from None


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def load_run(run_dir: str, skip_corrupt: bool = False) -> Tuple[List[dict], List[dict]]:
    """Records and env.json files of a run directory and its sub-directories.

    Hidden directories are not read (``.generations/`` holds the earlier runs
    that ``run --overwrite`` kept); within one records file the last record of
    a cell wins (``--retry-failed`` appends a cell's new record).
    """
    recs, envs = [], []
    for path in run_files(run_dir):
        where = os.path.relpath(os.path.dirname(path), run_dir)
        # The same cell may come from several runs (a sweep repeats the quick
        # preset's batch 25): tables name the run a row comes from.
        recs.extend(dict(r, run=r.get("run", where))
                    for r in latest(read_records(path, skip_corrupt=skip_corrupt)))
        env_path = os.path.join(os.path.dirname(path), ENV)
        if os.path.exists(env_path):
            with open(env_path, encoding="utf-8") as fh:
                try:
                    env = json.load(fh)
                except ValueError as exc:
                    raise UsageError("%s: not JSON (%s)" % (env_path, exc)) from None
            env["_dir"] = os.path.relpath(os.path.dirname(path), run_dir)
            envs.append(env)
    return recs, envs


def _repeats(r: Dict) -> int:
    """Samples behind the row's medians: finite ones, the fewest over its throughput metrics."""
    counts = [len(finite_samples(r.get(m))) for m in ("train_samples_per_s", "infer_samples_per_s")
              if r.get(m)]
    return min(counts) if counts else 0


def _timed_and_overhead(r: Dict) -> Tuple[Optional[float], Optional[float]]:
    """Seconds of timed passes, and everything else the cell's wall took (the runner's
    overhead): from phase_s and cell_wall_s, where the record has them."""
    phases, wall = r.get("phase_s"), r.get("cell_wall_s")
    if not isinstance(phases, dict) or not isinstance(wall, (int, float)):
        return None, None
    timed = float(phases.get("timed", 0.0))
    return timed, max(0.0, float(wall) - timed)


def machine_label(m: Optional[Dict]) -> str:
    """The hardware a record was measured on, as compare identifies it (hostname aside)."""
    if not m:
        return "unknown"
    return "%s (%s cores)%s" % (m.get("cpu"), m.get("cores"), ", " + m["gpu"] if m.get("gpu") else "")


def _group_key(r: Dict) -> Tuple:
    """Cells that differ only in strategy (and seed), on the same hardware, are comparable."""
    return (r["framework"], r["model"], r["task"], r["device"], r["batch_size"], r["threads"],
            r.get("hidden"), r.get("seed"), float(r.get("weight_decay") or 0.0),
            machine_label(r.get("machine")))


def _threads_applied(r: Dict) -> Optional[int]:
    """What the framework says it applied, where it says so (DyNet's CPU backend runs one)."""
    t = (r.get("info") or {}).get("threads")
    if isinstance(t, dict) and isinstance(t.get("applied"), int):
        return t["applied"]
    return None


def _compiles(r: Dict) -> Dict:
    """What the framework counted (``info['compiles']``: programs compiled for training and
    for inference over the whole cell), or {} where it does not count."""
    c = (r.get("info") or {}).get("compiles")
    return c if isinstance(c, dict) else {}


def _true(value) -> bool:
    """True for a True flag as pandas holds it (bool or numpy.bool_); False for None or NaN."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _peak_key(r: Dict) -> Tuple:
    return (machine_label(r.get("machine")), r.get("device"), r.get("threads"))


def machine_peaks(records: List[Dict]) -> Dict[Tuple, float]:
    """The machine's float32 GEMM peak per (machine, device, threads): the fastest rate seen
    in these records, from the run's own probe (``machine_gemm_flops``, NumPy's BLAS) or any
    framework's GEMM (``gemm_flops``), all timed alike (``bench.flops.time_gemm``). Roofline %
    divides by it, so a framework with a slow GEMM is not flattered by its own."""
    peaks: Dict[Tuple, float] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        for value in (r.get("gemm_flops"), r.get("machine_gemm_flops")):
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                key = _peak_key(r)
                peaks[key] = max(peaks.get(key, 0.0), float(value))
    return peaks


def summarise(records: List[Dict]):
    """The summary table: one row per cell, with medians, speedups and roofline."""
    import pandas as pd
    rows = []
    peaks = machine_peaks(records)
    for r in records:
        train, infer = median(r.get("train_samples_per_s")), median(r.get("infer_samples_per_s"))
        tq = quartiles(r.get("train_samples_per_s")) or (train, train)
        iq = quartiles(r.get("infer_samples_per_s")) or (infer, infer)
        timed, overhead = _timed_and_overhead(r)
        acc = r.get("accuracy") or {}
        achieved = None   # matmul FLOP/s the cell reached (training where it trains)
        if train and r.get("train_flops_per_sample"):
            achieved = train * r["train_flops_per_sample"]
        elif infer and r.get("infer_flops_per_sample"):
            achieved = infer * r["infer_flops_per_sample"]
        gemm, peak = r.get("gemm_flops"), peaks.get(_peak_key(r))
        roof = 100.0 * achieved / peak if achieved and peak else None
        own = 100.0 * achieved / gemm if achieved and gemm else None
        noise = r.get("noise") if isinstance(r.get("noise"), dict) else {}
        rows.append({
            "framework": r["framework"], "model": r["model"], "strategy": r["strategy"],
            "task": r["task"], "device": r["device"], "batch_size": r["batch_size"],
            "threads": r["threads"], "status": r["status"],
            "train_samples_per_s": train, "infer_samples_per_s": infer,
            "latency_ms_p50": r.get("latency_ms_p50"), "compile_s": r.get("compile_s"),
            "peak_rss_mb": r.get("peak_rss_mb"), "speedup_vs_baseline": None,
            "roofline_pct": roof, "own_gemm_pct": own, "machine_gemm_flops": peak,
            "noisy": r.get("noisy"), "noisy_why": noise.get("noisy_why") if r.get("noisy") else None,
            "weight_decay": float(r.get("weight_decay") or 0.0),
            "accuracy": acc.get("test"),
            "train_iqr": iqr(r.get("train_samples_per_s")),
            "infer_iqr": iqr(r.get("infer_samples_per_s")),
            "repeats": _repeats(r),
            "latency_ms_p95": r.get("latency_ms_p95"), "device_peak_mb": r.get("device_peak_mb"),
            "infer_speedup_vs_baseline": None, "dev_accuracy": acc.get("dev"),
            "seed": r.get("seed"), "hidden": r.get("hidden"), "embed_dim": r.get("embed_dim"),
            "framework_version": r.get("framework_version"), "reason": r.get("reason", ""),
            "cell_id": r.get("cell_id"), "run": r.get("run", "."), "_key": _group_key(r),
            "threads_applied": _threads_applied(r),
            "epochs": acc.get("epochs") if r.get("accuracy") else None,
            "loss_mode": (r.get("config") or {}).get("loss_mode", "root"),
            "machine": machine_label(r.get("machine")),
            "train_mode": (r.get("config") or {}).get("train_mode", "full"),
            "cell_wall_s": r.get("cell_wall_s"), "timed_s": timed, "overhead_s": overhead,
            "train_q1": tq[0], "train_q3": tq[1], "infer_q1": iq[0], "infer_q3": iq[1],
            "compiles_train": _compiles(r).get("train"),
            "compiles_infer": _compiles(r).get("infer"),
            "compile_cache": _compiles(r).get("cache"),
        })
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS + QUARTILE_COLUMNS + ["_key"])
    # Speedup over the framework's own baseline strategy (loop / recursive), same everything else.
    for i, row in df.iterrows():
        base = df[(df["_key"] == row["_key"]) & (df["status"] == "ok") &
                  (df["strategy"] == BASELINE_STRATEGY[family(row["model"])])]
        if row["status"] != "ok" or base.empty:
            continue
        same_run = base[base["run"] == row["run"]]
        b = (same_run if not same_run.empty else base).iloc[0]
        if row["train_samples_per_s"] and b["train_samples_per_s"]:
            df.at[i, "speedup_vs_baseline"] = row["train_samples_per_s"] / b["train_samples_per_s"]
        if row["infer_samples_per_s"] and b["infer_samples_per_s"]:
            df.at[i, "infer_speedup_vs_baseline"] = row["infer_samples_per_s"] / b["infer_samples_per_s"]
    return df.drop(columns=["_key"])


def _fmt(x, spec="%.3g") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return spec % x


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |"
            for row in rows]
    return "\n".join(out)


def _env_section(envs: List[Dict], records: Sequence[Dict] = ()) -> str:
    if not envs:
        return "_no env.json found_\n"
    rows = []
    for e in envs:
        m = e.get("machine") or {}
        gpu = e.get("gpu") or {}
        # env.json names the frameworks its run probed; a run written in several
        # steps by an older runner may name only the last step's, so the records'
        # own versions fill in.
        versions = dict(e.get("frameworks") or {})
        for r in records:
            if r.get("run", ".") == e.get("_dir", ".") and r.get("framework_version"):
                versions.setdefault(r["framework"], r["framework_version"])
        fws = ", ".join("%s %s" % (k, v) for k, v in sorted(versions.items()) if v)
        rows.append([e.get("_dir", "."), fws or "-", e.get("python", "-"),
                     "%s (%s cores)" % (m.get("cpu"), m.get("cores")),
                     "%s %s" % (gpu.get("name", "none"), gpu.get("driver", "")),
                     str(e.get("threads")), (e.get("git_commit") or "-")[:12], e.get("time", "-")])
    return _md_table(["run", "frameworks", "python", "CPU", "GPU", "threads", "commit", "time"], rows)


def _machines_section(records: Sequence[Dict]) -> str:
    """Where the timed cells ran, when that was more than one host (a cluster run)."""
    timed = [r for r in records if r.get("status") == "ok"]
    hosts: Dict[str, Dict[str, int]] = {}
    for r in timed:
        per = hosts.setdefault(machine_label(r.get("machine")), {})
        host = (r.get("machine") or {}).get("hostname") or "-"
        per[host] = per.get(host, 0) + 1
    if sum(len(v) for v in hosts.values()) < 2:
        return ""
    rows = [[label, ", ".join("%s (%d)" % kv for kv in sorted(per.items())), str(sum(per.values()))]
            for label, per in sorted(hosts.items())]
    return ("Timed cells ran on several hosts. Results tables rank cells of one kind of machine "
            "together, never across kinds.\n\n"
            + _md_table(["machine", "hosts (timed cells)", "timed cells"], rows))


def _task_order(task: str) -> Tuple:
    """sst, sst2, listops, then synthetic tasks by shape and size (8 before 64 before 512)."""
    if task.startswith("synth-"):
        _, shape, n = task.split("-")
        return (1, shape, int(n))
    return (0, task, 0)


def _threads_cell(r) -> str:
    applied = r["threads_applied"]
    if applied is None or applied != applied or int(applied) == int(r["threads"]):
        return str(int(r["threads"]))
    return "%d (%d applied)" % (int(r["threads"]), int(applied))


# Frameworks that run on another one's backend: the cost of the wrapper is their ratio.
WRAPPERS = {"keras-torch": "torch", "keras-jax": "jax", "keras-tensorflow": "tensorflow"}


def wrapper_rows(df) -> List[List[str]]:
    """Keras (per backend) against the raw backend, same model, strategy, task and batch."""
    ok = df[(df["status"] == "ok") & df["accuracy"].isna()]
    med = (ok.groupby(["framework", "model", "strategy", "task", "device", "batch_size"])
           [["train_samples_per_s", "infer_samples_per_s"]].median())
    def ratio(a, c):
        return _fmt(c / a, "%.2fx") if a and c and a == a and c == c else "-"

    rows = []
    for key, r in med.iterrows():
        fw, rest = key[0], key[1:]
        raw = WRAPPERS.get(fw)
        if raw is None or (raw,) + rest not in med.index:
            continue
        b = med.loc[(raw,) + rest]
        rows.append(["%s vs %s" % (fw, raw), rest[0], rest[1], rest[2], str(rest[4]),
                     "%s / %s" % (_fmt(r["train_samples_per_s"], "%.0f"),
                                  _fmt(b["train_samples_per_s"], "%.0f")),
                     ratio(r["train_samples_per_s"], b["train_samples_per_s"]),
                     ratio(r["infer_samples_per_s"], b["infer_samples_per_s"])])
    return rows


def _wrapper_section(df) -> str:
    rows = wrapper_rows(df)
    if not rows:
        return "_no Keras cell with a matching raw-backend cell in this run_"
    return ("Raw backend time over Keras time per step (above 1x: the Keras layer costs that "
            "factor; below 1x: Keras is faster).\n\n" + _md_table(
                ["pair", "model", "strategy", "task", "batch", "train ex/s (Keras / raw)",
                 "train cost", "infer cost"], rows))


def _compile_cell(r) -> str:
    # a first call served by a warm on-disk cache is not a compile time: keep it out
    if r["compile_cache"] == "warm":
        return "(warm cache)"
    return _fmt(r["compile_s"], "%.2f")


def _compiles_cell(r) -> str:
    train, infer = r["compiles_train"], r["compiles_infer"]
    if train is None or infer is None or train != train or infer != infer:   # NaN in pandas
        return "-"
    return "%d / %d" % (train, infer)


def _results_section(df, records: List[Dict]) -> str:
    parts = []
    # Accuracy cells (the parity preset) time a token pool with few repeats as a by-product
    # of training; they are not throughput measurements and stay out of these tables.
    ok = df[(df["status"] == "ok") & df["accuracy"].isna()]
    # Records from several kinds of machine (a heterogeneous cluster) are never ranked together.
    several_machines = ok["machine"].nunique() > 1
    keys = sorted({(t, d, b, m) for t, d, b, m in zip(ok["task"], ok["device"], ok["batch_size"],
                                                      ok["machine"])},
                  key=lambda k: (_task_order(k[0]), k[1], k[2], k[3]))
    for task, device, batch, machine in keys:
        block = ok[(ok["task"] == task) & (ok["device"] == device) & (ok["batch_size"] == batch)
                   & (ok["machine"] == machine)]
        several_runs = block["run"].nunique() > 1
        for model in [m for m in ("elman", "lstm", "rvnn", "treelstm") if m in set(block["model"])]:
            sub = block[block["model"] == model].sort_values(
                ["train_samples_per_s", "infer_samples_per_s"], ascending=False, na_position="last")
            rows = []
            for _, r in sub.iterrows():
                rows.append([
                    r["framework"], r["strategy"],
                    "%s ± %s" % (_fmt(r["train_samples_per_s"], "%.1f"), _fmt(r["train_iqr"], "%.1f")),
                    "%s ± %s" % (_fmt(r["infer_samples_per_s"], "%.1f"), _fmt(r["infer_iqr"], "%.1f")),
                    _fmt(r["speedup_vs_baseline"], "%.1fx"),
                    _fmt(r["infer_speedup_vs_baseline"], "%.1fx"),
                    "%s / %s" % (_fmt(r["latency_ms_p50"], "%.2f"), _fmt(r["latency_ms_p95"], "%.2f")),
                    _compile_cell(r), _compiles_cell(r), _fmt(r["peak_rss_mb"], "%.0f"),
                    _fmt(r["device_peak_mb"], "%.0f"), _fmt(r["roofline_pct"], "%.2f"),
                    _fmt(r["own_gemm_pct"], "%.2f"),
                    _threads_cell(r), str(int(r["repeats"])) + (" noisy" if _true(r["noisy"]) else "")]
                    + ([r["run"]] if several_runs else []))
            where = ", on %s" % machine if several_machines else ""
            parts.append("### %s, %s, batch %s, %s%s\n\n" % (task, model, batch, device, where) + _md_table(
                ["framework", "strategy", "train ex/s (median ± IQR)", "infer ex/s (median ± IQR)",
                 "train speedup", "infer speedup", "batch-1 latency p50 / p95 ms", "compile s",
                 "compiles (train/infer)", "peak RSS MB", "device peak MB",
                 "% of machine peak", "% of own GEMM", "threads", "repeats"]
                + (["run"] if several_runs else []), rows))
    skipped = [r for r in records if r["status"] != "ok"]
    if skipped:
        rows = [[r["framework"], r["model"], r["strategy"], r["task"], r["device"],
                 r["status"], r.get("reason", "")] for r in skipped]
        parts.append("### Cells not timed\n\n" + _md_table(
            ["framework", "model", "strategy", "task", "device", "status", "reason"], rows))
    return "\n\n".join(parts) if parts else "_no timed cells_"


def accuracy_table(df):
    """Mean and std of accuracy over seeds for cells that ran an accuracy budget."""
    # readout cells (reservoir training) have their own table (bench.report_studies)
    acc = df[(df["status"] == "ok") & df["accuracy"].notna() & (df["train_mode"] == "full")]
    if acc.empty:
        return acc
    # One row per training budget: cells of different epochs, losses or weight decays never
    # average together.
    grouped = acc.groupby(["task", "model", "loss_mode", "epochs", "weight_decay", "framework",
                           "strategy"])
    out = grouped.agg(test_mean=("accuracy", "mean"), test_std=("accuracy", "std"),
                      dev_mean=("dev_accuracy", "mean"), dev_std=("dev_accuracy", "std"),
                      seeds=("seed", "nunique")).reset_index()
    return out


def _nan0(x) -> float:
    """The std of a single seed is NaN; show it as 0."""
    return 0.0 if x != x else float(x)


def _accuracy_section(df) -> str:
    acc = accuracy_table(df)
    if acc.empty:
        return "_no cell in this run trained for accuracy (see the `parity` preset)_"
    rows = [[r["task"], r["model"], r["loss_mode"], _fmt(r["epochs"], "%g"), r["framework"], r["strategy"],
             "%.1f ± %.1f" % (100 * r["dev_mean"], 100 * _nan0(r["dev_std"])),
             "%.1f ± %.1f" % (100 * r["test_mean"], 100 * _nan0(r["test_std"])),
             int(r["seeds"])] for _, r in acc.iterrows()]
    return _md_table(["task", "model", "loss", "epochs", "framework", "strategy",
                      "dev accuracy %", "test accuracy %", "seeds"], rows)


# Published anchors (Socher et al. 2013, SST root accuracy without pretrained vectors).
ANCHORS = {("sst", "treelstm"): ("RNTN", 45.7), ("sst", "rvnn"): ("plain RvNN", 43.2),
           ("sst2", "treelstm"): ("RNTN", 85.4), ("sst2", "rvnn"): ("plain RvNN", 82.4)}
ANCHOR_TASKS = {"sst": "fine-grained", "sst2": "binary"}
PARITY_SPREAD_POINTS = 1.0


def anchors_rows(df) -> List[List[str]]:
    """Each learning-parity goal with what this run measured and whether it is met.

    Every row names its training budget (epochs): frameworks are compared, and
    anchors judged, within one budget.
    """
    acc = accuracy_table(df)
    if acc.empty:
        return []
    rows = []
    for (task, epochs), tree in acc[acc["model"] == "treelstm"].groupby(["task", "epochs"]):
        if len(tree) > 1:
            spread = 100 * (tree["test_mean"].max() - tree["test_mean"].min())
            rows.append(["%s, %g epochs: every framework's Tree-LSTM within %g point of the others"
                         % (task, epochs, PARITY_SPREAD_POINTS),
                         "spread <= %g" % PARITY_SPREAD_POINTS, "spread %.1f (%s)" % (
                             spread, ", ".join("%s %.1f" % (r["framework"], 100 * r["test_mean"])
                                               for _, r in tree.iterrows())),
                         "met" if spread <= PARITY_SPREAD_POINTS else "missed"])
    for (task, model), (name, target) in ANCHORS.items():
        g = acc[(acc["task"] == task) & (acc["model"] == model)]
        if g.empty:
            rows.append(["%s %s at or above %s (%s SST)" % (task, model, name, ANCHOR_TASKS[task]),
                         ">= %.1f" % target, "not measured (no %s %s parity cells)" % (task, model),
                         "not measured"])
        for _, r in g.iterrows():
            mean = 100 * r["test_mean"]
            rows.append(["%s %s (%s, %g epochs) at or above %s" % (task, model, r["framework"],
                                                                  r["epochs"], name),
                         ">= %.1f" % target, "%.1f ± %.1f (%d seeds)" % (
                             mean, 100 * _nan0(r["test_std"]), r["seeds"]),
                         "met" if mean >= target else "missed"])
    lo = acc[acc["task"] == "listops"]
    for (fw, epochs), g in lo.groupby(["framework", "epochs"]):
        t, s = g[g["model"] == "treelstm"], g[g["model"] == "lstm"]
        if len(t) and len(s):
            diff = 100 * (t["test_mean"].iloc[0] - s["test_mean"].iloc[0])
            rows.append(["listops (%s, %g epochs): Tree-LSTM vs LSTM" % (fw, epochs), "report the gap",
                         "%+.1f points (%.1f vs %.1f)" % (diff, 100 * t["test_mean"].iloc[0],
                                                          100 * s["test_mean"].iloc[0]),
                         "tree better" if diff > 0 else "tree not better"])
    return rows


def _anchors_section(df) -> str:
    rows = anchors_rows(df)
    if not rows:
        return "_no accuracy cells in this run_"
    return _md_table(["goal", "target", "measured (test accuracy %)", "verdict"], rows)


def _newest_run_per_cell(df, envs: List[Dict]):
    """Where several runs timed the same framework/model/strategy, the rows of the newest
    run only (by env.json time): a later run may measure changed code. Tables keep every run."""
    when = {e.get("_dir", "."): e.get("time") or "" for e in envs}
    newest = df.assign(_t=df["run"].map(lambda r: when.get(r, "")))
    last = newest.groupby(["framework", "model", "strategy"])["_t"].transform("max")
    return newest[newest["_t"] == last].drop(columns=["_t"])


def throughput_bars(df, envs: Optional[List[Dict]] = None):
    """What the throughput plot shows: (task, batch, device) -> {model: rows}.

    The most common (task, batch size, device) of the timed cells, each cell's newest run;
    one row per framework/strategy with train and inference medians and their quartiles.
    Inference-only cells are rows too (no train bar). Rows sorted by train, then inference.
    """
    timed = df[(df["status"] == "ok") & df["accuracy"].isna()
               & (df["train_samples_per_s"].notna() | df["infer_samples_per_s"].notna())]
    if timed.empty:
        return None, {}
    main = timed.groupby(["task", "batch_size", "device"]).size().idxmax()
    sub = timed[(timed["task"] == main[0]) & (timed["batch_size"] == main[1])
                & (timed["device"] == main[2])]
    sub = _newest_run_per_cell(sub, envs or [])
    values = ["train_samples_per_s", "infer_samples_per_s"] + QUARTILE_COLUMNS
    per = {}
    for model in [m for m in ("elman", "lstm", "rvnn", "treelstm") if m in set(sub["model"])]:
        rows = sub[sub["model"] == model].groupby(["framework", "strategy"], as_index=False)[
            values].median()
        rows["_order"] = rows["train_samples_per_s"].fillna(0)
        per[model] = rows.sort_values(["_order", "infer_samples_per_s"]).drop(columns=["_order"])
    return main, per


def _error_bars(rows, metric: str):
    """Asymmetric x error bars from the quartiles: [median - q1, q3 - median], never negative."""
    med = rows["%s_samples_per_s" % metric]
    lo = (med - rows["%s_q1" % metric]).clip(lower=0).fillna(0)
    hi = (rows["%s_q3" % metric] - med).clip(lower=0).fillna(0)
    return np.vstack([lo.to_numpy(dtype=float), hi.to_numpy(dtype=float)])


def plots(df, out_dir: str, envs: Optional[List[Dict]] = None) -> List[str]:
    """PNG plots; returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    written = []
    ok = df[(df["status"] == "ok") & df["train_samples_per_s"].notna() & df["accuracy"].isna()]

    # 1. Throughput by framework and strategy, on the most common (task, batch, device);
    # inference-only cells too; error bars span the interquartile range of the repeats.
    main, per = throughput_bars(df, envs)
    if per:
        models = list(per)
        cols = min(2, len(models))
        rows_n = -(-len(models) // cols)
        tallest = max(len(t) for t in per.values())
        # horizontal bars, one row per framework/strategy, sorted: readable with 30 rows
        fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, rows_n * (1.2 + 0.26 * tallest)),
                                 squeeze=False)
        for ax in axes.flat[len(models):]:
            ax.axis("off")
        for ax, model in zip(axes.flat, models):
            m = per[model]
            y = np.arange(len(m))
            train = m["train_samples_per_s"].notna().to_numpy()
            infer = m["infer_samples_per_s"].notna().to_numpy()
            for shown, metric, shift, color, name in ((train, "train", 0.2, "tab:blue", "train"),
                                                      (infer, "infer", -0.2, "tab:orange", "inference")):
                if shown.any():
                    ax.barh(y[shown] + shift, m["%s_samples_per_s" % metric][shown], height=0.4,
                            color=color, label=name, xerr=_error_bars(m[shown], metric), capsize=2,
                            error_kw={"elinewidth": 0.8})
            ax.set_xscale("log")
            # whole decades around every bar and whisker, so the axis always has labelled ticks
            ends = m[["train_q1", "infer_q1", "train_q3", "infer_q3", "train_samples_per_s",
                      "infer_samples_per_s"]].to_numpy(dtype=float)
            ends = ends[np.isfinite(ends) & (ends > 0)]
            if ends.size:
                ax.set_xlim(10 ** np.floor(np.log10(ends.min())), 10 ** np.ceil(np.log10(ends.max())))
            ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels collide on short spans
            ax.set_yticks(y)
            ax.set_yticklabels(["%s %s%s" % (a, b, "" if t else " (inference only)")
                                for a, b, t in zip(m["framework"], m["strategy"], train)], fontsize=8)
            ax.set_ylim(-0.7, len(m) - 0.3)
            ax.set_title(model)
            ax.set_xlabel("examples / s (log scale)")
            ax.grid(axis="x", alpha=0.3)
        axes.flat[0].legend(fontsize=8, loc="lower right")
        fig.suptitle("Throughput: %s, batch %s, %s (median of repeats, bars: IQR; the newest run "
                     "of each cell)" % main)
        fig.tight_layout(rect=(0, 0, 1, 0.98))
        fig.savefig(os.path.join(out_dir, "throughput.png"), dpi=110)
        plt.close(fig)
        written.append("throughput.png")

    # 2. Throughput against batch size.
    bs = ok[ok["task"] == "sst"]
    multi = bs.groupby(["framework", "model", "strategy", "device"])["batch_size"].nunique()
    if not multi.empty and multi.max() > 1:
        swept = set(m for (_, m, _, _), n in multi.items() if n > 1)
        models = [m for m in ("lstm", "treelstm", "elman", "rvnn") if m in swept]
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
        for ax, model in zip(axes[0], models):
            for (fw, st, dev), g in bs[bs["model"] == model].groupby(["framework", "strategy", "device"]):
                if g["batch_size"].nunique() > 1:
                    # one point per batch size: the median over runs that measured it
                    g = g.groupby("batch_size", as_index=False)["train_samples_per_s"].median()
                    ax.plot(g["batch_size"], g["train_samples_per_s"], marker="o",
                            label="%s/%s (%s)" % (fw, st, dev))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("batch size (examples)")
            ax.set_ylabel("train examples / s")
            ax.set_title("%s on SST" % model)
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "batch_size.png"), dpi=110)
        plt.close(fig)
        written.append("batch_size.png")

    # 3. Throughput against tree size / sequence length (synthetic sweep).
    syn = ok[ok["task"].str.startswith("synth-")].copy()
    if not syn.empty:
        syn["shape"] = syn["task"].str.split("-").str[1]
        syn["leaves"] = syn["task"].str.split("-").str[2].astype(int)
        shapes = sorted(set(syn["shape"]))
        fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            for (fw, model, st), g in syn[syn["shape"] == shape].groupby(["framework", "model", "strategy"]):
                g = g.groupby("leaves", as_index=False)["train_samples_per_s"].median()
                ax.plot(g["leaves"], g["train_samples_per_s"] * g["leaves"], marker="o",
                        label="%s/%s/%s" % (fw, model, st))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens per example (tree leaves = sequence length)")
            ax.set_ylabel("train tokens / s")
            ax.set_title("%s trees (synthetic)" % {"left": "left-branching",
                                                   "right": "right-branching"}.get(shape, shape))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "tree_size.png"), dpi=110)
        plt.close(fig)
        written.append("tree_size.png")

    # 4. Accuracy by framework.
    acc = accuracy_table(df)
    if not acc.empty:
        groups = list(acc.groupby(["task"]))
        tallest = max(len(g) for _, g in groups)
        fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 1.2 + 0.32 * tallest),
                                 squeeze=False)
        for ax, (task, g) in zip(axes[0], groups):
            g = g.sort_values(["model", "epochs", "framework"], ascending=False)
            # the budget joins the label only where the task has more than one
            several = g["epochs"].nunique() > 1
            labels = ["%s %s%s" % (m, f, ", %g epochs" % e if several else "")
                      for m, f, e in zip(g["model"], g["framework"], g["epochs"])]
            budget = g["epochs"].rank(method="dense").astype(int) - 1
            ax.barh(range(len(g)), 100 * g["test_mean"], xerr=100 * g["test_std"].fillna(0),
                    capsize=3, color=[("tab:green", "tab:olive", "tab:cyan")[b % 3] for b in budget])
            ax.set_yticks(range(len(g)))
            ax.set_yticklabels(labels, fontsize=8)
            ax.set_xlabel("test accuracy % (mean ± std over seeds)")
            ax.set_title(task if isinstance(task, str) else task[0])
            ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=110)
        plt.close(fig)
        written.append("accuracy.png")
    return written


def incomplete_runs(records: List[Dict], envs: List[Dict]) -> Dict[str, Tuple[int, int]]:
    """{framework: (cells recorded, cells planned)} for each framework whose run directory's
    env.json planned cells that have no record there (interrupted, or still running)."""
    out: Dict[str, Tuple[int, int]] = {}
    for env in envs:
        where = env.get("_dir", ".")
        for fw, ids in (env.get("planned_cells") or {}).items():
            planned = set(ids)
            have = {r.get("cell_id") for r in records
                    if r.get("run", ".") == where and r.get("framework") == fw}
            missing = planned - have
            if missing:
                done, total = out.get(fw, (0, 0))
                out[fw] = (done + len(planned) - len(missing), total + len(planned))
    return out


def _overhead_section(df) -> str:
    """Where each cell's time went: the timed passes, and the runner's overhead by phase."""
    rows, totals = [], {}
    have = df[df["cell_wall_s"].notna() & df["overhead_s"].notna()]
    if have.empty:
        return "_no record here has per-phase times (records older than this runner)_"
    for _, r in have.sort_values(["framework", "model", "strategy"]).iterrows():
        phases = r["_phase_s"] or {}
        rows.append(["%s/%s/%s" % (r["framework"], r["model"], r["strategy"]),
                     "%s b%s" % (r["task"], r["batch_size"]), _fmt(r["cell_wall_s"], "%.1f"),
                     _fmt(r["timed_s"], "%.1f"), "%s (%s%%)" % (
                         _fmt(r["overhead_s"], "%.1f"),
                         _fmt(100 * r["overhead_s"] / r["cell_wall_s"] if r["cell_wall_s"] else None,
                              "%.0f"))]
                    + [_fmt(phases.get(key), "%.1f") for key, _ in OVERHEAD_PHASES])
        t = totals.setdefault(r["framework"], [0, 0.0, 0.0, 0.0])
        t[0] += 1
        t[1] += r["cell_wall_s"]
        t[2] += r["timed_s"]
        t[3] += r["overhead_s"]
    summary = _md_table(["framework", "cells", "wall s", "timed s", "overhead s", "overhead share"],
                        [[fw, str(n), "%.0f" % w, "%.0f" % t, "%.0f" % o,
                          "%.0f%%" % (100 * o / w if w else 0)] for fw, (n, w, t, o) in totals.items()])
    detail = _md_table(["cell", "task", "wall s", "timed s", "overhead s (share)"]
                       + [name for _, name in OVERHEAD_PHASES], rows)
    return ("Each cell's wall time from the runner's side: the timed passes, and the rest (the "
            "runner's overhead: process start, imports, data, pool, first call, the equivalence "
            "gate, warm-up, latency and GEMM-peak probes, exit), seconds per phase.\n\n"
            + summary + "\n\n" + detail)


def _coverage_section(records, incomplete: Optional[Dict[str, Tuple[int, int]]] = None) -> str:
    rows = coverage_rows(records, incomplete)
    header = ["framework", "entries", "RNN", "RvNN", "equivalence verified", "CPU timed",
              "GPU timed", "status / reason"]
    return _md_table(header, [[r[h] for h in header] for r in rows])


def _study_sections(run_dir: str, out_dir: str, records) -> Tuple[List[str], List[str]]:
    """Markdown lines and plots of the studies whose data the run holds (none: nothing)."""
    from .report_studies import gradient_section, readout_section
    md: List[str] = []
    text, images = gradient_section(run_dir, out_dir)
    if text:
        md += ["## Gradient flow", "", text, ""]
    text = readout_section(records)
    if text:
        md += ["## Reservoir readout vs full training", "", text, ""]
    return md, images


def write_report(run_dir: str, out_dir: str, skip_corrupt: bool = False) -> str:
    """Write report.md, summary.csv and plots into out_dir; returns the report's path.

    Each output is written in a scratch directory inside out_dir and renamed
    into place only when all are done, report.md last. A run directory that
    holds only a study (``gradients.jsonl``) gets a report of its study alone.
    """
    from .report_studies import load_gradient_rows
    records, envs = load_run(run_dir, skip_corrupt=skip_corrupt)
    if not records and not load_gradient_rows(run_dir):
        raise UsageError("no records under %s (expected %s files)" % (run_dir, RECORDS))
    require_pandas()   # after the records: a corrupt or empty run is named first
    os.makedirs(out_dir, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".report-", dir=out_dir)
    try:
        if records:
            _write_outputs(records, envs, run_dir, stage)
        else:
            _write_study_outputs(run_dir, stage)
        names = sorted(os.listdir(stage), key=lambda n: n == "report.md")
        for name in names:
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    path = os.path.join(out_dir, "report.md")
    print("wrote %s, summary.csv and %d plots" % (path, sum(n.endswith(".png") for n in names)))
    return path


def _write_study_outputs(run_dir: str, out_dir: str) -> None:
    studies, _ = _study_sections(run_dir, out_dir, [])
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(["# Study report", "", "Built from `%s` by `python -m bench report`."
                            % os.path.basename(os.path.abspath(run_dir)), ""] + studies) + "\n")


NO_MATPLOTLIB = "no plots: matplotlib is not installed here (pip install matplotlib)"


def _write_outputs(records: List[Dict], envs: List[Dict], run_dir: str, out_dir: str) -> None:
    df = summarise(records)
    df.to_csv(os.path.join(out_dir, "summary.csv"), index=False, float_format="%.6g",
              columns=SUMMARY_COLUMNS)
    if have_matplotlib():
        images = plots(df, out_dir, envs)
    else:
        images = []
        sys.stderr.write("report: %s; report.md and summary.csv are complete\n" % NO_MATPLOTLIB)
    df["_phase_s"] = [r.get("phase_s") if isinstance(r.get("phase_s"), dict) else None
                      for r in records]
    incomplete = incomplete_runs(records, envs)
    counts = df["status"].value_counts().to_dict()
    md = ["# Benchmark report", "",
          "Built from `%s` by `python -m bench report`; every number below comes from the raw "
          "records beside it. Throughputs are medians over repeats with the interquartile range; "
          "speedups are over the framework's own baseline strategy (`loop` / `recursive`); "
          "%% of machine peak (the roofline) is achieved matmul FLOP/s over the machine's float32 "
          "GEMM peak at the same threads: the fastest GEMM measured in the run, by the runner's "
          "own probe or any framework's matmul, all timed alike; %% of own GEMM divides by the "
          "cell's framework's GEMM instead. `noisy` after the repeats: while the cell was timed, "
          "its threads waited for a CPU more than 10%% of the time, or the hypervisor stole more "
          "than 5%% (the record's `noise`). Only cells that passed the equivalence check against "
          "the NumPy reference are timed." % os.path.basename(os.path.abspath(run_dir)), "",
          "Cells: " + ", ".join("%s %d" % kv for kv in sorted(counts.items())), ""]
    if incomplete:
        md += ["**Incomplete:** %s (their runs were interrupted or are still going; "
               "`--resume` completes them)." % ", ".join(
                   "%s %d of %d planned cells" % (fw, done, total)
                   for fw, (done, total) in sorted(incomplete.items())), ""]
    md += ["## Environment", "", _env_section(envs, records), ""]
    machines = _machines_section(records)
    if machines:
        md += ["## Machines", "", machines, ""]
    md += ["## Coverage", "", _coverage_section(records, incomplete), "",
           "## Results", "", _results_section(df, records), "",
           "## Where each cell's time goes", "", _overhead_section(df), "",
           "## What Keras costs over its backend", "", _wrapper_section(df), "",
           "## Accuracy", "", _accuracy_section(df), "",
           "## Learning-parity goals", "", _anchors_section(df), ""]
    studies, _ = _study_sections(run_dir, out_dir, records)   # their plots sit in their sections
    md += studies
    if images:
        md += ["## Plots", ""] + ["![%s](%s)" % (img[:-4].replace("_", " "), img) for img in images]
    elif not have_matplotlib():
        md += ["## Plots", "", "_%s._" % (NO_MATPLOTLIB[0].upper() + NO_MATPLOTLIB[1:])]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md) + "\n")


def readme_blocks(run_dirs: List[str], skip_corrupt: bool = False) -> Dict[str, str]:
    """Markdown blocks for the README, generated from published runs."""
    require_pandas()
    records: List[Dict] = []
    for d in run_dirs:
        records.extend(load_run(d, skip_corrupt=skip_corrupt)[0])
    df = summarise(records)
    ok = df[(df["status"] == "ok") & df["accuracy"].isna() & (df["batch_size"] == 25)
            & (df["task"] == "sst")]
    rows = []
    for (model, device), g in ok.groupby(["model", "device"], sort=False):
        g = g.sort_values("train_samples_per_s", ascending=False)
        best = g.iloc[0]
        slow = g[g["strategy"] == BASELINE_STRATEGY[family(model)]]
        rows.append([model, device, "%s/%s" % (best["framework"], best["strategy"]),
                     _fmt(best["train_samples_per_s"], "%.0f"),
                     _fmt(best["infer_samples_per_s"], "%.0f"),
                     ", ".join("%s %.0f" % (r["framework"], r["train_samples_per_s"])
                               for _, r in slow.iterrows() if r["train_samples_per_s"] > 0) or "-"])
    summary = _md_table(["model", "device", "fastest framework/strategy (train)", "train ex/s",
                         "infer ex/s", "baseline strategy train ex/s (loop/recursive)"], rows)
    return {"coverage": _coverage_section(records), "summary": summary,
            "accuracy": _accuracy_section(df), "anchors": _anchors_section(df)}


def update_readme(readme: str, run_dirs: List[str], skip_corrupt: bool = False) -> None:
    """Rewrite the README's generated blocks (between <!-- NAME:start --> and <!-- NAME:end -->)."""
    with open(readme, encoding="utf-8") as fh:
        text = fh.read()
    for name, block in readme_blocks(run_dirs, skip_corrupt=skip_corrupt).items():
        start, end = "<!-- %s:start -->" % name, "<!-- %s:end -->" % name
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + start + "\n" + block + "\n" + end + tail
    atomic_write(readme, text)
