"""The gradient-flow study's report section (``python -m bench study gradients``): its
tables and plot, from the ``gradients.jsonl`` files anywhere under a run directory."""

from __future__ import annotations

import glob
import itertools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import study_gradients as sg
from ..config import UsageError
from ..params import MODELS
from .markdown import fmt, md_table


COLOURS = {"elman": "tab:blue", "lstm": "tab:orange", "rvnn": "tab:green", "treelstm": "tab:red"}
STYLES = {"sequence": "-", "parse": "-", "left": "--", "balanced": ":", sg.MAPPED: ":"}
SHAPE_NAMES = {"sequence": "tokens in order", "parse": "parse tree", "left": "left-branching",
               "balanced": "balanced", sg.MAPPED: "left-branching, Elman's weights"}
SHAPE_ORDER = ("sequence", "parse", "balanced", "left", sg.MAPPED)
PLOT_MIN_COUNT = 5   # SST distances reached by fewer states are left out of the plot


def load_gradient_rows(run_dir: str) -> List[Dict]:
    rows: List[Dict] = []
    for path in sorted(glob.glob(os.path.join(run_dir, "**", sg.ROWS_FILE), recursive=True)):
        try:
            rows.extend(sg.read_rows(path))
        except ValueError as exc:    # a damaged file is named, never half-read
            raise UsageError(str(exc)) from None
    return rows


def load_gradient_meta(run_dir: str) -> List[Dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "**", sg.META_FILE), recursive=True)):
        with open(path, encoding="utf-8") as fh:
            out.append(json.load(fh))
    return out


def training_table(metas: Sequence[Dict]) -> Optional[str]:
    """What the study's training budget did, per model: loss, dev accuracy, recurrent radii."""
    rows = []
    for meta in metas:
        for model in MODELS:
            t = (meta.get("training") or {}).get(model)
            if not t:
                continue
            radii = [t.get("recurrent_radius_init"), t.get("recurrent_radius_trained")]
            rows.append([model, str(t.get("steps", "-")), fmt(t.get("seconds"), "%.0f"),
                         "%s -> %s" % (fmt(t.get("first_loss"), "%.3f"), fmt(t.get("last50_loss"), "%.3f")),
                         "%s -> %s" % tuple(fmt(100 * a if a is not None else None, "%.1f") for a in
                                            (t.get("dev_accuracy_init"), t.get("dev_accuracy_trained"))),
                         "%s -> %s" % tuple("-" if not r else "%.2f (%.2f-%.2f)" % (
                             float(np.mean(r)), min(r), max(r)) for r in radii)])
    if not rows:
        return None
    return md_table(["model", "Adam steps", "seconds", "loss (first step -> mean of last 50)",
                     "dev accuracy % (init -> trained)",
                     "recurrent blocks' spectral radius, mean (min-max): init -> trained"], rows)


def _synth_cells(got: Sequence[Optional[Dict]]) -> List[str]:
    """A synthetic row's cells: the fit at the longest inputs measured, then the farthest
    state's drop per input length (``-`` where that length was not measured)."""
    big = [g for g in got if g][-1]
    factor = 10 ** big["slope"] if big["slope"] is not None else None
    return [fmt(big["slope"], "%.3f"), fmt(factor, "%.2f")] + [
        "%s (d=%s)" % (fmt(g["drop"], "%.1f"), g["max_distance"]) if g else "-" for g in got]


def _synth_table(summ: Sequence[Dict]) -> str:
    """Synthetic inputs: the fit at the longest inputs, and the farthest state per length."""
    leaves = sorted({r["leaves"] for r in summ if r["task"] == "synth"})
    by = {(r["phase"], r["model"], r["shape"], r["leaves"]): r for r in summ if r["task"] == "synth"}
    rows = []
    for phase, model, shape in itertools.product(("init", "trained"), MODELS, SHAPE_ORDER):
        got = [by.get((phase, model, shape, n)) for n in leaves]
        if any(got):
            rows.append([phase, model, SHAPE_NAMES[shape]] + _synth_cells(got))
    return md_table(["phase", "model", "input", "log10 norm per unit distance (fit, %d leaves)"
                     % leaves[-1] if leaves else "fit", "factor per unit"]
                    + ["log10 farthest / loss, %d leaves" % n for n in leaves], rows)


def _sst_table(rows: Sequence[Dict]) -> str:
    """SST dev sentences: the fit and the farthest state per model and input."""
    # real sentences thin out with distance (SST's longest has 49 words): the fit and the
    # farthest distance use the distances reached by at least PLOT_MIN_COUNT states, as the plot
    real = sg.summary_rows([r for r in rows if r["task"] != "synth" and r["count"] >= PLOT_MIN_COUNT])
    out = [[r["phase"], r["model"], SHAPE_NAMES[r["shape"]], str(r["states"]), str(r["max_distance"]),
            fmt(r["slope"], "%.3f"), fmt(r["drop"], "%.1f")] for r in real]
    return md_table(["phase", "model", "input", "states", "max distance (>= %d states)"
                     % PLOT_MIN_COUNT,
                     "log10 norm per unit distance (fit)", "log10 farthest / loss"], out)


def gradient_tables(rows: Sequence[Dict]) -> Tuple[str, str]:
    """(synthetic table, SST table) in Markdown."""
    return _synth_table(sg.summary_rows(rows)), _sst_table(rows)


def _colour(model: str, shape: str) -> str:
    return "black" if shape == sg.MAPPED else COLOURS[model]


def _curve(rows: Sequence[Dict], phase: str, model: str, shape: str, task, leaves) -> List[Dict]:
    """One curve's points (median log10 norm per distance), in order of distance; SST
    distances reached by fewer than PLOT_MIN_COUNT states are left out."""
    return sorted((r for r in rows if r["phase"] == phase and r["model"] == model
                   and r["shape"] == shape and r["task"] == task
                   and r.get("leaves") == leaves and r.get("log10_median") is not None
                   and (task == "synth" or r["count"] >= PLOT_MIN_COUNT)),
                  key=lambda r: r["distance"])


def _distance_axis(ax, rows: Sequence[Dict], phase: str, task, leaves) -> None:
    """log10 norm against distance from the loss, one curve and IQR band per model and input."""
    for model, shape in itertools.product(MODELS, SHAPE_ORDER):
        pts = _curve(rows, phase, model, shape, task, leaves)
        if not pts:
            continue
        d = [r["distance"] for r in pts]
        ax.plot(d, [r["log10_median"] for r in pts], STYLES[shape],
                color=_colour(model, shape), marker="o" if len(d) < 20 else None, ms=3,
                label="%s, %s" % (model, SHAPE_NAMES[shape]))
        ax.fill_between(d, [r["log10_q25"] for r in pts], [r["log10_q75"] for r in pts],
                        color=_colour(model, shape), alpha=0.12, lw=0)
    ax.set_xlabel("distance from the loss")
    ax.set_ylabel("log10 ||dL/dh|| (median, IQR band)")


def _farthest_axis(ax, summ: Sequence[Dict], phase: str) -> None:
    """The farthest state's norm over the loss's against the synthetic inputs' length."""
    for model, shape in itertools.product(MODELS, SHAPE_ORDER):
        far = sorted((r for r in summ if r["phase"] == phase and r["model"] == model
                      and r["shape"] == shape and r["task"] == "synth"
                      and r["drop"] is not None), key=lambda r: r["leaves"])
        if far:
            ax.plot([r["leaves"] for r in far], [r["drop"] for r in far],
                    STYLES[shape], color=_colour(model, shape), marker="o", ms=4,
                    label="%s, %s" % (model, SHAPE_NAMES[shape]))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (leaves)")
    ax.set_ylabel("log10 (norm at farthest / norm at the loss)")


def _finish_row(row_axes, phase: str, real_task: Optional[str], longest: Optional[int]) -> None:
    """Titles, grid and legends of one phase's row of axes."""
    ax_real, ax_syn, ax_len = row_axes
    ax_real.set_title("%s: %s dev (distance: steps from the last token / edges from "
                      "the root)" % (phase, real_task or "-"), fontsize=9)
    ax_syn.set_title("%s: synthetic inputs of %s tokens" % (phase, longest or "-"), fontsize=9)
    ax_len.set_title("%s: farthest state (first token / deepest leaf) vs length" % phase,
                     fontsize=9)
    for ax in row_axes:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)


def gradient_plot(rows: Sequence[Dict], path: str) -> None:
    """log10 norm against distance: rows init / trained; columns SST, the longest synthetic
    inputs, and the farthest state against input length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    phases = [p for p in ("init", "trained") if any(r["phase"] == p for r in rows)]
    leaves = sorted({r["leaves"] for r in rows if r["task"] == "synth"})
    real = sorted({r["task"] for r in rows if r["task"] != "synth"})
    summ = sg.summary_rows(rows)
    fig, axes = plt.subplots(len(phases), 3, figsize=(17, 4.6 * len(phases)), squeeze=False)
    real_task, longest = real[0] if real else None, leaves[-1] if leaves else None
    for row_axes, phase in zip(axes, phases):
        ax_real, ax_syn, ax_len = row_axes
        _distance_axis(ax_real, rows, phase, real_task, None)
        _distance_axis(ax_syn, rows, phase, "synth", longest)
        _farthest_axis(ax_len, summ, phase)
        _finish_row(row_axes, phase, real_task, longest)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gradient_section(run_dir: str, out_dir: str) -> Tuple[Optional[str], List[str]]:
    """Markdown for the gradient-flow study and the plots written (None: no study here)."""
    rows = load_gradient_rows(run_dir)
    if not rows:
        return None, []
    gradient_plot(rows, os.path.join(out_dir, "gradient_flow.png"))
    synth, sst = gradient_tables(rows)
    training = training_table(load_gradient_meta(run_dir))
    first = rows[0]
    text = [
        "Norm of d loss / d h for every step's (RNN) or node's (tree) hidden state against its "
        "distance from the loss: steps from the last token, or edges from the root (root loss, "
        "each example's own loss). Computed by the NumPy reference's backward pass in float64 "
        "(`python -m bench study gradients`), hidden %s, embedding %s, seed %s; `trained` after "
        "%s Adam steps (lr %g, batch 25) on SST 5-class root labels, the same parameters probed "
        "everywhere. Synthetic inputs: SST words drawn at their training frequency, read in order "
        "by the RNNs and as balanced / left-branching trees by the tree models, random labels."
        % (first.get("hidden"), first.get("embed_dim"), first.get("seed"), first.get("train_steps"),
           first.get("lr") or 0),
        "",
        "Fit: a straight line through the median log10 norms against distance (weighted by the "
        "states at each distance); its slope is the decay per unit distance, 10^slope the factor. "
        "*log10 farthest / loss*: median log10 norm at the largest distance (d) minus at "
        "distance 0 (the last token or the root).", "",
        "### The training budget", "",
        training or "_no gradients.json beside the rows_", "",
        "The recurrent blocks are those of the readout study (`bench/readout.py`): Elman `W_h`; "
        "LSTM `W_h`'s four gate blocks; RvNN `W`'s two child blocks; Tree-LSTM `U`'s ten.", "",
        "### Synthetic inputs", "", synth, "",
        "### SST dev sentences", "", sst, "",
        "![gradient flow](gradient_flow.png)"]
    return "\n".join(text), ["gradient_flow.png"]
