"""The run report's PNG plots, one function per figure (the studies draw their own)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from .summary import QUARTILE_COLUMNS, accuracy_table


def newest_run_per_cell(df, envs: List[Dict]):
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
    sub = newest_run_per_cell(sub, envs or [])
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


def _pyplot():
    """matplotlib's pyplot on the file-only backend (a report never opens a window)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _timed_train(df):
    """Timed cells with a training throughput (accuracy cells are not throughput measurements)."""
    return df[(df["status"] == "ok") & df["train_samples_per_s"].notna() & df["accuracy"].isna()]


def _throughput_axis(ax, m) -> None:
    """One model's horizontal bars, one row per framework/strategy."""
    from matplotlib.ticker import NullFormatter
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
    ax.set_xlabel("examples / s (log scale)")
    ax.grid(axis="x", alpha=0.3)


def throughput_figure(df, envs: Optional[List[Dict]] = None):
    """Throughput by framework and strategy, on the most common (task, batch, device);
    inference-only cells too; error bars span the interquartile range of the repeats."""
    main, per = throughput_bars(df, envs)
    if not per:
        return None
    plt = _pyplot()
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
        _throughput_axis(ax, per[model])
        ax.set_title(model)
    axes.flat[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Throughput: %s, batch %s, %s (median of repeats, bars: IQR; the newest run "
                 "of each cell)" % main)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig


def _log_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def batch_size_figure(df, envs: Optional[List[Dict]] = None):
    """Training throughput against batch size on SST, for the cells timed at several."""
    bs = _timed_train(df)
    bs = bs[bs["task"] == "sst"]
    multi = bs.groupby(["framework", "model", "strategy", "device"])["batch_size"].nunique()
    if multi.empty or multi.max() <= 1:
        return None
    swept = set(m for (_, m, _, _), n in multi.items() if n > 1)
    models = [m for m in ("lstm", "treelstm", "elman", "rvnn") if m in swept]
    fig, axes = _pyplot().subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for (fw, st, dev), g in bs[bs["model"] == model].groupby(["framework", "strategy", "device"]):
            if g["batch_size"].nunique() > 1:
                # one point per batch size: the median over runs that measured it
                g = g.groupby("batch_size", as_index=False)["train_samples_per_s"].median()
                ax.plot(g["batch_size"], g["train_samples_per_s"], marker="o",
                        label="%s/%s (%s)" % (fw, st, dev))
        _log_axes(ax, "batch size (examples)", "train examples / s", "%s on SST" % model)
        if ax.get_lines():
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def tree_size_figure(df, envs: Optional[List[Dict]] = None):
    """Training tokens per second against tree size / sequence length (synthetic sweep)."""
    syn = _timed_train(df)
    syn = syn[syn["task"].str.startswith("synth-")].copy()
    if syn.empty:
        return None
    syn["shape"] = syn["task"].str.split("-").str[1]
    syn["leaves"] = syn["task"].str.split("-").str[2].astype(int)
    shapes = sorted(set(syn["shape"]))
    fig, axes = _pyplot().subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for (fw, model, st), g in syn[syn["shape"] == shape].groupby(["framework", "model", "strategy"]):
            g = g.groupby("leaves", as_index=False)["train_samples_per_s"].median()
            ax.plot(g["leaves"], g["train_samples_per_s"] * g["leaves"], marker="o",
                    label="%s/%s/%s" % (fw, model, st))
        _log_axes(ax, "tokens per example (tree leaves = sequence length)", "train tokens / s",
                  "%s trees (synthetic)" % {"left": "left-branching",
                                            "right": "right-branching"}.get(shape, shape))
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def accuracy_figure(df, envs: Optional[List[Dict]] = None):
    """Test accuracy by framework (mean and std over seeds), one panel per task."""
    acc = accuracy_table(df)
    if acc.empty:
        return None
    groups = list(acc.groupby(["task"]))
    tallest = max(len(g) for _, g in groups)
    fig, axes = _pyplot().subplots(1, len(groups), figsize=(5.5 * len(groups), 1.2 + 0.32 * tallest),
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
    return fig


# The report's plots in the order report.md shows them: (file name, figure or None).
FIGURES = (("throughput.png", throughput_figure), ("batch_size.png", batch_size_figure),
           ("tree_size.png", tree_size_figure), ("accuracy.png", accuracy_figure))


def plots(df, out_dir: str, envs: Optional[List[Dict]] = None) -> List[str]:
    """PNG plots; returns the file names written."""
    plt = _pyplot()
    written = []
    for name, figure in FIGURES:
        fig = figure(df, envs)
        if fig is None:
            continue
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(name)
    return written
