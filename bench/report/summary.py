"""The summary table: one row per cell, with medians, quartiles, speedups and roofline
(``summarise``), and the accuracy over seeds of the cells that trained for accuracy."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from ..interface import BASELINE_STRATEGY
from ..params import family
from ..records import finite_samples
from ..stats import iqr, median, quartiles


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
    "optimizer", "lr", "repeats_cut",
]
# Quartiles of the throughput repeats: in the frame for the plots' error bars, not in the CSV.
QUARTILE_COLUMNS = ["train_q1", "train_q3", "infer_q1", "infer_q3"]


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
    config = r.get("config") or {}
    return (r["framework"], r["model"], r["task"], r["device"], r["batch_size"], r["threads"],
            r.get("hidden"), r.get("seed"), float(r.get("weight_decay") or 0.0),
            config.get("optimizer"), config.get("lr"), machine_label(r.get("machine")))


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


def _achieved_flops(r: Dict, train: Optional[float], infer: Optional[float]) -> Optional[float]:
    """Matmul FLOP/s the cell reached (training where it trains), or None."""
    if train and r.get("train_flops_per_sample"):
        return train * r["train_flops_per_sample"]
    if infer and r.get("infer_flops_per_sample"):
        return infer * r["infer_flops_per_sample"]
    return None


def _cell_columns(r: Dict) -> Dict:
    """What the cell was: its configuration, where it ran and with what."""
    config = r.get("config") or {}
    return {
        "framework": r["framework"], "model": r["model"], "strategy": r["strategy"],
        "task": r["task"], "device": r["device"], "batch_size": r["batch_size"],
        "threads": r["threads"], "status": r["status"], "reason": r.get("reason", ""),
        "weight_decay": float(r.get("weight_decay") or 0.0),
        "optimizer": config.get("optimizer", "adam"), "lr": config.get("lr"),
        "seed": r.get("seed"), "hidden": r.get("hidden"), "embed_dim": r.get("embed_dim"),
        "framework_version": r.get("framework_version"), "cell_id": r.get("cell_id"),
        "run": r.get("run", "."), "threads_applied": _threads_applied(r),
        "loss_mode": config.get("loss_mode", "root"), "train_mode": config.get("train_mode", "full"),
        "machine": machine_label(r.get("machine")), "_key": _group_key(r)}


def _throughput_columns(r: Dict, peaks: Dict[Tuple, float]) -> Dict:
    """Medians and quartiles of the throughput repeats, and the roofline they reach."""
    train, infer = median(r.get("train_samples_per_s")), median(r.get("infer_samples_per_s"))
    tq = quartiles(r.get("train_samples_per_s")) or (train, train)
    iq = quartiles(r.get("infer_samples_per_s")) or (infer, infer)
    achieved = _achieved_flops(r, train, infer)
    gemm, peak = r.get("gemm_flops"), peaks.get(_peak_key(r))
    return {
        "train_samples_per_s": train, "infer_samples_per_s": infer,
        "train_iqr": iqr(r.get("train_samples_per_s")), "infer_iqr": iqr(r.get("infer_samples_per_s")),
        "train_q1": tq[0], "train_q3": tq[1], "infer_q1": iq[0], "infer_q3": iq[1],
        "repeats": _repeats(r), "speedup_vs_baseline": None, "infer_speedup_vs_baseline": None,
        "roofline_pct": 100.0 * achieved / peak if achieved and peak else None,
        "own_gemm_pct": 100.0 * achieved / gemm if achieved and gemm else None,
        "machine_gemm_flops": peak}


def _cost_columns(r: Dict) -> Dict:
    """Latency, memory, compiles, where the cell's time went, and whether it was noisy."""
    timed, overhead = _timed_and_overhead(r)
    compiles = _compiles(r)
    noise = r.get("noise") if isinstance(r.get("noise"), dict) else {}
    return {
        "latency_ms_p50": r.get("latency_ms_p50"), "latency_ms_p95": r.get("latency_ms_p95"),
        "compile_s": r.get("compile_s"), "peak_rss_mb": r.get("peak_rss_mb"),
        "device_peak_mb": r.get("device_peak_mb"),
        "cell_wall_s": r.get("cell_wall_s"), "timed_s": timed, "overhead_s": overhead,
        "compiles_train": compiles.get("train"), "compiles_infer": compiles.get("infer"),
        "compile_cache": compiles.get("cache"),
        "noisy": r.get("noisy"), "noisy_why": noise.get("noisy_why") if r.get("noisy") else None,
        # the cell's time budget took fewer samples than its repeats (bench.cell, step 6)
        "repeats_cut": r.get("repeats_cut")}


def _accuracy_columns(r: Dict) -> Dict:
    acc = r.get("accuracy") or {}
    return {"accuracy": acc.get("test"), "dev_accuracy": acc.get("dev"), "epochs": acc.get("epochs")}


def _add_speedups(df) -> None:
    """Speedup over the framework's own baseline strategy (loop / recursive), same everything
    else; the baseline of the row's own run where that run timed one."""
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


def summarise(records: List[Dict]):
    """The summary table: one row per cell, with medians, speedups and roofline."""
    import pandas as pd
    peaks = machine_peaks(records)
    rows = [dict(_cell_columns(r), **_throughput_columns(r, peaks), **_cost_columns(r),
                 **_accuracy_columns(r)) for r in records]
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS + QUARTILE_COLUMNS + ["_key"])
    _add_speedups(df)
    return df   # `_key` (_group_key) stays for sections that compare strategies; not in the CSV


def accuracy_table(df):
    """Mean and std of accuracy over seeds for cells that ran an accuracy budget."""
    # readout cells (reservoir training) have their own table (bench.report.readout)
    acc = df[(df["status"] == "ok") & df["accuracy"].notna() & (df["train_mode"] == "full")]
    if acc.empty:
        return acc
    # One row per training budget: cells of different epochs, losses, optimisers, learning
    # rates or weight decays never average together.
    grouped = acc.groupby(["task", "model", "loss_mode", "epochs", "optimizer", "lr",
                           "weight_decay", "framework", "strategy"], dropna=False)
    out = grouped.agg(test_mean=("accuracy", "mean"), test_std=("accuracy", "std"),
                      dev_mean=("dev_accuracy", "mean"), dev_std=("dev_accuracy", "std"),
                      seeds=("seed", "nunique")).reset_index()
    return out


def training_label(row, default=None) -> str:
    """The optimiser, learning rate and weight decay of an accuracy row, e.g. "adam lr 0.001,
    wd 1e-05"; with ``default`` (an (optimizer, lr) pair) only what differs from it, so that
    rows trained as the parity preset trains keep their plain labels."""
    parts = []
    lr = row["lr"]
    known = isinstance(lr, (int, float)) and math.isfinite(lr)
    if default is None or (row["optimizer"], lr) != default:
        parts.append("%s lr %g" % (row["optimizer"], lr) if known else str(row["optimizer"]))
    if row["weight_decay"]:
        parts.append("wd %g" % row["weight_decay"])
    return ", ".join(parts)
