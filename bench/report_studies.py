"""Report sections for the studies: gradient flow (``study gradients``) and reservoir readout.

``bench.report.write_report`` adds them when a run directory holds their data:
``gradients.jsonl`` files (anywhere under it) and records of ``readout`` cells.
Like the rest of the report they are derived from those files only.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import study_gradients as sg
from .config import UsageError
from .params import MODELS
from .stats import mean_std, median

COLOURS = {"elman": "tab:blue", "lstm": "tab:orange", "rvnn": "tab:green", "treelstm": "tab:red"}
STYLES = {"sequence": "-", "parse": "-", "left": "--", "balanced": ":", sg.MAPPED: ":"}
SHAPE_NAMES = {"sequence": "tokens in order", "parse": "parse tree", "left": "left-branching",
               "balanced": "balanced", sg.MAPPED: "left-branching, Elman's weights"}
SHAPE_ORDER = ("sequence", "parse", "balanced", "left", sg.MAPPED)
PLOT_MIN_COUNT = 5   # SST distances reached by fewer states are left out of the plot


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _f(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else spec % x


# --- gradient flow ----------------------------------------------------------------

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
            rows.append([model, str(t.get("steps", "-")), _f(t.get("seconds"), "%.0f"),
                         "%s -> %s" % (_f(t.get("first_loss"), "%.3f"), _f(t.get("last50_loss"), "%.3f")),
                         "%s -> %s" % tuple(_f(100 * a if a is not None else None, "%.1f") for a in
                                            (t.get("dev_accuracy_init"), t.get("dev_accuracy_trained"))),
                         "%s -> %s" % tuple("-" if not r else "%.2f (%.2f-%.2f)" % (
                             float(np.mean(r)), min(r), max(r)) for r in radii)])
    if not rows:
        return None
    return _md_table(["model", "Adam steps", "seconds", "loss (first step -> mean of last 50)",
                      "dev accuracy % (init -> trained)",
                      "recurrent blocks' spectral radius, mean (min-max): init -> trained"], rows)


def gradient_tables(rows: Sequence[Dict]) -> Tuple[str, str]:
    """(synthetic table, SST table) in Markdown."""
    summ = sg.summary_rows(rows)
    leaves = sorted({r["leaves"] for r in summ if r["task"] == "synth"})
    synth_rows = []
    by = {(r["phase"], r["model"], r["shape"], r["leaves"]): r for r in summ if r["task"] == "synth"}
    for phase in ("init", "trained"):
        for model in MODELS:
            for shape in SHAPE_ORDER:
                got = [by.get((phase, model, shape, n)) for n in leaves]
                if not any(got):
                    continue
                big = [g for g in got if g][-1]
                cells = ["%s (d=%s)" % (_f(g["drop"], "%.1f"), g["max_distance"]) if g else "-"
                         for g in got]
                synth_rows.append([phase, model, SHAPE_NAMES[shape], _f(big["slope"], "%.3f"),
                                   _f(10 ** big["slope"] if big["slope"] is not None else None,
                                      "%.2f")] + cells)
    synth = _md_table(["phase", "model", "input", "log10 norm per unit distance (fit, %d leaves)"
                       % leaves[-1] if leaves else "fit", "factor per unit"]
                      + ["log10 farthest / loss, %d leaves" % n for n in leaves], synth_rows)
    sst_rows = []
    # real sentences thin out with distance (SST's longest has 49 words): the fit and the
    # farthest distance use the distances reached by at least PLOT_MIN_COUNT states, as the plot
    real = sg.summary_rows([r for r in rows if r["task"] != "synth" and r["count"] >= PLOT_MIN_COUNT])
    for r in real:
        sst_rows.append([r["phase"], r["model"], SHAPE_NAMES[r["shape"]], str(r["states"]),
                         str(r["max_distance"]), _f(r["slope"], "%.3f"), _f(r["drop"], "%.1f")])
    sst = _md_table(["phase", "model", "input", "states", "max distance (>= %d states)"
                     % PLOT_MIN_COUNT,
                     "log10 norm per unit distance (fit)", "log10 farthest / loss"], sst_rows)
    return synth, sst


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
    for row_axes, phase in zip(axes, phases):
        ax_real, ax_syn, ax_len = row_axes
        for model in MODELS:
            for shape in SHAPE_ORDER:
                colour = "black" if shape == sg.MAPPED else COLOURS[model]
                for ax, task, n in ((ax_real, real[0] if real else None, None),
                                    (ax_syn, "synth", leaves[-1] if leaves else None)):
                    pts = sorted((r for r in rows if r["phase"] == phase and r["model"] == model
                                  and r["shape"] == shape and r["task"] == task
                                  and r.get("leaves") == n and r.get("log10_median") is not None
                                  and (task == "synth" or r["count"] >= PLOT_MIN_COUNT)),
                                 key=lambda r: r["distance"])
                    if not pts:
                        continue
                    d = [r["distance"] for r in pts]
                    ax.plot(d, [r["log10_median"] for r in pts], STYLES[shape],
                            color=colour, marker="o" if len(d) < 20 else None, ms=3,
                            label="%s, %s" % (model, SHAPE_NAMES[shape]))
                    ax.fill_between(d, [r["log10_q25"] for r in pts], [r["log10_q75"] for r in pts],
                                    color=colour, alpha=0.12, lw=0)
                far = sorted((r for r in summ if r["phase"] == phase and r["model"] == model
                              and r["shape"] == shape and r["task"] == "synth"
                              and r["drop"] is not None), key=lambda r: r["leaves"])
                if far:
                    ax_len.plot([r["leaves"] for r in far], [r["drop"] for r in far],
                                STYLES[shape], color=colour, marker="o", ms=4,
                                label="%s, %s" % (model, SHAPE_NAMES[shape]))
        ax_real.set_title("%s: %s dev (distance: steps from the last token / edges from "
                          "the root)" % (phase, real[0] if real else "-"), fontsize=9)
        ax_syn.set_title("%s: synthetic inputs of %s tokens" % (phase, leaves[-1] if leaves else "-"),
                         fontsize=9)
        ax_len.set_title("%s: farthest state (first token / deepest leaf) vs length" % phase,
                         fontsize=9)
        for ax in (ax_real, ax_syn):
            ax.set_xlabel("distance from the loss")
            ax.set_ylabel("log10 ||dL/dh|| (median, IQR band)")
        ax_len.set_xscale("log", base=2)
        ax_len.set_xlabel("tokens (leaves)")
        ax_len.set_ylabel("log10 (norm at farthest / norm at the loss)")
        for ax in row_axes:
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=7)
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


# --- readout vs full training --------------------------------------------------------

def _cpu(r: Dict) -> str:
    return ((r.get("machine") or {}).get("cpu") or "?").replace(" ", "_")


def _mode(r: Dict) -> str:
    return (r.get("config") or {}).get("train_mode", "full")


def _pct(mean, std) -> str:
    return "-" if mean is None else "%.1f ± %.1f" % (100 * mean, 100 * std)


def main_radius(records: Sequence[Dict]) -> Optional[float]:
    """The spectral radius most readout cells used (a preset's), which the main table shows."""
    counts: Dict[float, int] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("accuracy") and _mode(r) == "readout":
            rho = r["accuracy"].get("spectral_radius")
            counts[rho] = counts.get(rho, 0) + 1
    return max(sorted(counts), key=lambda k: counts[k]) if counts else None


def radius_rows(records: Sequence[Dict]) -> Tuple[List[float], List[List[str]]]:
    """Seed 0's dev / test accuracy per spectral radius, for every (task, model, framework)
    measured at more than one radius."""
    per: Dict[Tuple, Dict[float, Dict]] = {}
    for r in records:
        # failed cells count too: a radius whose features the check refused says so
        if r.get("status") in ("ok", "failed") and r.get("accuracy") and _mode(r) == "readout" \
                and r.get("seed") == 0:
            key = (r["task"], r["model"], r["framework"], r["device"])
            per.setdefault(key, {})[r["accuracy"].get("spectral_radius")] = r["accuracy"]
    keep = {k: v for k, v in per.items() if len(v) > 1}
    radii = sorted({rho for v in keep.values() for rho in v})
    order = {t: i for i, t in enumerate(("sst", "sst2", "listops"))}
    rows = []
    for key in sorted(keep, key=lambda k: (order.get(k[0], 9), MODELS.index(k[1])
                                           if k[1] in MODELS else 9, k[2], k[3])):
        cells = []
        for rho in radii:
            a = keep[key].get(rho)
            if a is not None and not a.get("verified", True):
                cells.append("not equivalent (%.1e)" % a.get("verify_max_abs", float("nan")))
                continue
            cells.append("-" if a is None else "%s / %s" % (_f(100 * a["dev"], "%.1f"),
                                                            _f(100 * a["test"], "%.1f")))
        rows.append(list(key[:3]) + cells)
    return radii, rows


def readout_rows(records: Sequence[Dict]) -> List[List[str]]:
    """One row per (task, model, framework) with readout cells, beside the full-training
    cells of the same task, model and framework (one row per full budget)."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("accuracy")]
    main = main_radius(ok)
    groups: Dict[Tuple, Dict[str, List[Dict]]] = {}
    for r in ok:
        key = (r["task"], r["model"], r["framework"], r["device"])
        if _mode(r) == "readout":
            if r["accuracy"].get("spectral_radius") != main:
                continue        # other radii: the sensitivity table
            sub = "readout"
        else:
            # one row per budget and machine: seconds from two machines never mix
            sub = "full %g %s %s" % (r["accuracy"].get("epochs") or 0,
                                     (r.get("config") or {}).get("loss_mode", "root"), _cpu(r))
        groups.setdefault(key, {}).setdefault(sub, []).append(r)
    order = {t: i for i, t in enumerate(("sst", "sst2", "listops"))}
    out = []
    for key in sorted(groups, key=lambda k: (order.get(k[0], 9), MODELS.index(k[1])
                                             if k[1] in MODELS else 9, k[2], k[3])):
        g = groups[key]
        ro = g.get("readout")
        if not ro:
            continue
        test, test_sd = mean_std([r["accuracy"].get("test") for r in ro])
        dev, dev_sd = mean_std([r["accuracy"].get("dev") for r in ro])
        ro_s = median([r["accuracy"]["train_s"] for r in ro])
        ro_load = median([r.get("load_avg_1m_at_start") or 0 for r in ro])
        floor, _ = mean_std([r["accuracy"].get("majority_test") for r in ro])
        radius = sorted({r["accuracy"].get("spectral_radius") for r in ro})
        alphas = sorted({r["accuracy"].get("alpha") for r in ro})
        here = {_cpu(r) for r in ro}
        # budgets measured on the readout cells' machine first
        fulls = sorted((k for k in g if k != "readout"),
                       key=lambda k: (k.split()[3] not in here, k)) or [None]
        for sub in fulls:
            fr = g.get(sub) or []
            f_test, f_sd = mean_std([r["accuracy"].get("test") for r in fr])
            f_s = median([r["accuracy"]["train_s"] for r in fr])
            f_load = median([r.get("load_avg_1m_at_start") or 0 for r in fr])
            budget = "-" if sub is None else "%s epochs, %s loss" % tuple(sub.split()[1:3])
            other = sorted({_cpu(r) for r in fr} - {_cpu(r) for r in ro})
            if other:
                budget += " (other machine: %s)" % ", ".join(o.replace("_", " ") for o in other)
            out.append([
                key[0], key[1], key[2], "/".join(sorted({r["strategy"] for r in ro})),
                ", ".join("%g" % x for x in radius), ", ".join("%g" % a for a in alphas),
                _pct(dev, dev_sd), _pct(test, test_sd), _f(100 * floor if floor is not None
                                                           else None, "%.1f"),
                _f(ro_s, "%.1f"), budget,
                _pct(f_test, f_sd), _f(f_s, "%.0f"),
                _f(100 * (f_test - test) if f_test is not None else None, "%+.1f"),
                _f(f_s / ro_s if f_s and ro_s else None, "%.0fx"),
                "%d / %s" % (len(ro), len(fr) if fr else "-"),
                "%s / %s" % (_f(ro_load, "%.1f"), _f(f_load, "%.1f"))])
    return out


def readout_section(records: Sequence[Dict]) -> Optional[str]:
    rows = readout_rows(records)
    if not rows:
        return None
    radii, sens = radius_rows(records)
    extra = "" if not sens else (
        "\n\nSensitivity to the spectral radius (seed 0; dev / test accuracy %%, alpha chosen on "
        "dev at each radius; the table above uses rho %g). *not equivalent*: the framework's "
        "float32 features left the float64 reference's by more than the check allows (the "
        "largest difference in brackets): past the edge of chaos rounding errors grow along "
        "the input, and the cell is failed rather than fitted.\n\n" % main_radius(records) + _md_table(
            ["task", "model", "framework"] + ["rho %g" % rho for rho in radii], sens))
    return _readout_text(rows) + extra


def _readout_text(rows: List[List[str]]) -> str:
    return (
        "Reservoir (echo-state) training: the canonical initialisation with the recurrent / "
        "composition blocks scaled to spectral radius rho (`bench/readout.py` says what that "
        "means per model), every weight frozen, and only the readout fitted by ridge "
        "regression on one-hot root labels (strength alpha per example chosen on dev from "
        "1e-6..10). Features are each framework's own forward pass, checked against the "
        "reference before the fit. *Train s*: readout = extracting train and dev features "
        "plus the fit; full = the accuracy budget's training loop. Both include compiles; "
        "they are wall-clock seconds of one-thread cells on a shared machine (the load "
        "column gives the 1-minute load average at the cells' start): read the ratio's order "
        "of magnitude, not its digits. *Cost*: full-training test accuracy minus readout's, "
        "in points. *Majority class*: the test accuracy of always answering the most frequent "
        "training label, the floor a readout has to beat.\n\n" + _md_table(
            ["task", "model", "framework", "strategy", "rho", "alpha", "readout dev %",
             "readout test %", "majority class test %", "readout train s", "full budget",
             "full test %", "full train s",
             "cost (points)", "time saved", "seeds (readout / full)", "load (readout / full)"],
            rows))
