"""The run report's Markdown sections, from the summary table and the records."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..coverage import coverage_rows
from ..interface import REFERENCE_STRATEGIES
from .markdown import fmt, md_table, nan0
from .summary import accuracy_table, machine_label, training_label


# Phases a cell reports (bench.cell.PHASES) and their column names in the overhead table.
OVERHEAD_PHASES = (("startup", "process start"), ("data", "data"), ("imports", "imports"),
                   ("pool", "pool"), ("first_call", "first call"), ("gate", "gate"),
                   ("warmup", "warm-up"), ("latency", "latency"), ("gemm", "GEMM peak"),
                   ("accuracy", "accuracy"), ("exit", "exit"))


def env_section(envs: List[Dict], records: Sequence[Dict] = ()) -> str:
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
    return md_table(["run", "frameworks", "python", "CPU", "GPU", "threads", "commit", "time"], rows)


def machines_section(records: Sequence[Dict]) -> str:
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
            + md_table(["machine", "hosts (timed cells)", "timed cells"], rows))


def coverage_section(records, incomplete: Optional[Dict[str, Tuple[int, int]]] = None) -> str:
    rows = coverage_rows(records, incomplete)
    header = ["framework", "entries", "RNN", "RvNN", "equivalence verified", "CPU timed",
              "GPU timed", "status / reason"]
    return md_table(header, [[r[h] for h in header] for r in rows])


def _task_order(task: str) -> Tuple:
    """sst, sst2, listops, then synthetic tasks by shape and size (8 before 64 before 512)."""
    if task.startswith("synth-"):
        _, shape, n = task.split("-")
        return (1, shape, int(n))
    return (0, task, 0)


def _true(value) -> bool:
    """True for a True flag as pandas holds it (bool or numpy.bool_); False for None or NaN."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _threads_cell(r) -> str:
    applied = r["threads_applied"]
    if applied is None or applied != applied or int(applied) == int(r["threads"]):
        return str(int(r["threads"]))
    return "%d (%d applied)" % (int(r["threads"]), int(applied))


def _compile_cell(r) -> str:
    # a first call served by a warm on-disk cache is not a compile time: keep it out
    if r["compile_cache"] == "warm":
        return "(warm cache)"
    return fmt(r["compile_s"], "%.2f")


def _compiles_cell(r) -> str:
    train, infer = r["compiles_train"], r["compiles_infer"]
    if train is None or infer is None or train != train or infer != infer:   # NaN in pandas
        return "-"
    return "%d / %d" % (train, infer)


RESULTS_HEADER = ["framework", "strategy", "train ex/s (median ± IQR)", "infer ex/s (median ± IQR)",
                  "train speedup", "infer speedup", "batch-1 latency p50 / p95 ms", "compile s",
                  "compiles (train/infer)", "peak RSS MB", "device peak MB",
                  "% of machine peak", "% of own GEMM", "threads", "repeats"]


def _result_row(r) -> List[str]:
    """One timed cell of a results table (columns RESULTS_HEADER)."""
    return [
        r["framework"], r["strategy"],
        "%s ± %s" % (fmt(r["train_samples_per_s"], "%.1f"), fmt(r["train_iqr"], "%.1f")),
        "%s ± %s" % (fmt(r["infer_samples_per_s"], "%.1f"), fmt(r["infer_iqr"], "%.1f")),
        fmt(r["speedup_vs_baseline"], "%.1fx"),
        fmt(r["infer_speedup_vs_baseline"], "%.1fx"),
        "%s / %s" % (fmt(r["latency_ms_p50"], "%.2f"), fmt(r["latency_ms_p95"], "%.2f")),
        _compile_cell(r), _compiles_cell(r), fmt(r["peak_rss_mb"], "%.0f"),
        fmt(r["device_peak_mb"], "%.0f"), fmt(r["roofline_pct"], "%.2f"),
        fmt(r["own_gemm_pct"], "%.2f"),
        _threads_cell(r), str(int(r["repeats"])) + (" (budget)" if _true(r["repeats_cut"]) else "")
        + (" noisy" if _true(r["noisy"]) else "")]


def _model_tables(block, task: str, batch, device: str, where: str) -> List[str]:
    """One table per model of a block of cells (one task, device, batch size and machine),
    fastest first; a run column where the block comes from several runs."""
    several_runs = block["run"].nunique() > 1
    out = []
    for model in [m for m in ("elman", "lstm", "rvnn", "treelstm") if m in set(block["model"])]:
        sub = block[block["model"] == model].sort_values(
            ["train_samples_per_s", "infer_samples_per_s"], ascending=False, na_position="last")
        rows = [_result_row(r) + ([r["run"]] if several_runs else []) for _, r in sub.iterrows()]
        out.append("### %s, %s, batch %s, %s%s\n\n" % (task, model, batch, device, where)
                   + md_table(RESULTS_HEADER + (["run"] if several_runs else []), rows))
    return out


def _untimed_table(records: List[Dict]) -> Optional[str]:
    skipped = [r for r in records if r["status"] != "ok"]
    if not skipped:
        return None
    rows = [[r["framework"], r["model"], r["strategy"], r["task"], r["device"],
             r["status"], r.get("reason", "")] for r in skipped]
    return "### Cells not timed\n\n" + md_table(
        ["framework", "model", "strategy", "task", "device", "status", "reason"], rows)


def results_section(df, records: List[Dict]) -> str:
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
        where = ", on %s" % machine if several_machines else ""
        parts += _model_tables(block, task, batch, device, where)
    untimed = _untimed_table(records)
    if untimed:
        parts.append(untimed)
    return "\n\n".join(parts) if parts else "_no timed cells_"


def _against(fast, plain, metric: str) -> str:
    """A strategy's throughput over the plain loop's, and whether their IQRs overlap."""
    a, b = fast[metric + "_samples_per_s"], plain[metric + "_samples_per_s"]
    if not (a and b and a == a and b == b):
        return "-"
    if fast[metric + "_q3"] < plain[metric + "_q1"]:
        verdict = "behind"
    elif fast[metric + "_q1"] > plain[metric + "_q3"]:
        verdict = "ahead"
    else:
        verdict = "IQRs overlap"
    return "%.2fx (%s)" % (a / b, verdict)


def plain_section(df) -> str:
    """Each framework's fastest strategy against its ``plain`` yardstick (the loop a user
    writes first), same model, task, batch, device and run."""
    ok = df[(df["status"] == "ok") & df["accuracy"].isna()]
    rows = []
    # cells that differ in strategy only (summary._group_key), from one run
    for _, cells in ok.groupby(["_key", "run"], sort=True):
        is_plain = cells["strategy"].isin(REFERENCE_STRATEGIES)
        if not is_plain.any() or is_plain.all():
            continue
        plain = cells[is_plain].iloc[0]
        others = cells[~is_plain]
        fast = others.loc[others["train_samples_per_s"].fillna(0).idxmax()]
        rows.append(["%s/%s" % (plain["framework"], plain["model"]),
                     "%s b%s %s" % (plain["task"], plain["batch_size"], plain["device"]),
                     fast["strategy"],
                     "%s / %s" % (fmt(fast["train_samples_per_s"], "%.0f"),
                                  fmt(plain["train_samples_per_s"], "%.0f")),
                     _against(fast, plain, "train"),
                     "%s / %s" % (fmt(fast["infer_samples_per_s"], "%.0f"),
                                  fmt(plain["infer_samples_per_s"], "%.0f")),
                     _against(fast, plain, "infer")])
    if not rows:
        return "_no `plain` cell in this run (PyTorch, JAX and TensorFlow have one per RNN)_"
    return ("`plain` is the loop a user would write first: the framework's stock recurrent "
            "layer or scan over the whole padded batch, each example's last real output "
            "gathered. Each framework's fastest strategy (by training throughput) should at "
            "least match it; `behind` / `ahead`: the interquartile ranges do not overlap.\n\n"
            + md_table(["framework/model", "cell", "fastest strategy",
                        "train ex/s (fastest / plain)", "train ratio",
                        "infer ex/s (fastest / plain)", "infer ratio"], rows))


def overhead_section(df) -> str:
    """Where each cell's time went: the timed passes, and the runner's overhead by phase."""
    rows, totals = [], {}
    have = df[df["cell_wall_s"].notna() & df["overhead_s"].notna()]
    if have.empty:
        return "_no record here has per-phase times (records older than this runner)_"
    for _, r in have.sort_values(["framework", "model", "strategy"]).iterrows():
        phases = r["_phase_s"] or {}
        rows.append(["%s/%s/%s" % (r["framework"], r["model"], r["strategy"]),
                     "%s b%s" % (r["task"], r["batch_size"]), fmt(r["cell_wall_s"], "%.1f"),
                     fmt(r["timed_s"], "%.1f"), "%s (%s%%)" % (
                         fmt(r["overhead_s"], "%.1f"),
                         fmt(100 * r["overhead_s"] / r["cell_wall_s"] if r["cell_wall_s"] else None,
                             "%.0f"))]
                    + [fmt(phases.get(key), "%.1f") for key, _ in OVERHEAD_PHASES])
        t = totals.setdefault(r["framework"], [0, 0.0, 0.0, 0.0])
        t[0] += 1
        t[1] += r["cell_wall_s"]
        t[2] += r["timed_s"]
        t[3] += r["overhead_s"]
    summary = md_table(["framework", "cells", "wall s", "timed s", "overhead s", "overhead share"],
                        [[fw, str(n), "%.0f" % w, "%.0f" % t, "%.0f" % o,
                          "%.0f%%" % (100 * o / w if w else 0)] for fw, (n, w, t, o) in totals.items()])
    detail = md_table(["cell", "task", "wall s", "timed s", "overhead s (share)"]
                      + [name for _, name in OVERHEAD_PHASES], rows)
    return ("Each cell's wall time from the runner's side: the timed passes, and the rest (the "
            "runner's overhead: process start, imports, data, pool, first call, the equivalence "
            "gate, warm-up, latency and GEMM-peak probes, exit), seconds per phase.\n\n"
            + summary + "\n\n" + detail)


# Frameworks that run on another one's backend: the cost of the wrapper is their ratio.
WRAPPERS = {"keras-torch": "torch", "keras-jax": "jax", "keras-tensorflow": "tensorflow"}


def wrapper_rows(df) -> List[List[str]]:
    """Keras (per backend) against the raw backend, same model, strategy, task and batch."""
    ok = df[(df["status"] == "ok") & df["accuracy"].isna()]
    med = (ok.groupby(["framework", "model", "strategy", "task", "device", "batch_size"])
           [["train_samples_per_s", "infer_samples_per_s"]].median())
    def ratio(a, c):
        return fmt(c / a, "%.2fx") if a and c and a == a and c == c else "-"

    rows = []
    for key, r in med.iterrows():
        fw, rest = key[0], key[1:]
        raw = WRAPPERS.get(fw)
        if raw is None or (raw,) + rest not in med.index:
            continue
        b = med.loc[(raw,) + rest]
        rows.append(["%s vs %s" % (fw, raw), rest[0], rest[1], rest[2], str(rest[4]),
                     "%s / %s" % (fmt(r["train_samples_per_s"], "%.0f"),
                                  fmt(b["train_samples_per_s"], "%.0f")),
                     ratio(r["train_samples_per_s"], b["train_samples_per_s"]),
                     ratio(r["infer_samples_per_s"], b["infer_samples_per_s"])])
    return rows


def wrapper_section(df) -> str:
    rows = wrapper_rows(df)
    if not rows:
        return "_no Keras cell with a matching raw-backend cell in this run_"
    return ("Raw backend time over Keras time per step (above 1x: the Keras layer costs that "
            "factor; below 1x: Keras is faster).\n\n" + md_table(
                ["pair", "model", "strategy", "task", "batch", "train ex/s (Keras / raw)",
                 "train cost", "infer cost"], rows))


def accuracy_section(df) -> str:
    acc = accuracy_table(df)
    if acc.empty:
        return "_no cell in this run trained for accuracy (see the `parity` preset)_"
    rows = [[r["task"], r["model"], r["loss_mode"], fmt(r["epochs"], "%g"), training_label(r),
             r["framework"], r["strategy"], "%.1f ± %.1f" % (100 * r["dev_mean"], 100 * nan0(r["dev_std"])),
             "%.1f ± %.1f" % (100 * r["test_mean"], 100 * nan0(r["test_std"])),
             int(r["seeds"])] for _, r in acc.iterrows()]
    return md_table(["task", "model", "loss", "epochs", "optimiser", "framework", "strategy",
                     "dev accuracy %", "test accuracy %", "seeds"], rows)
