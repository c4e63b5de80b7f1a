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
