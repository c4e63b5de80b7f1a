"""The learning-parity goals: each published anchor and the spread between frameworks,
with what a run measured and whether it is met."""

from __future__ import annotations

from typing import List

from ..config import parity
from .markdown import md_table, nan0
from .summary import accuracy_table, training_label


# Published anchors (Socher et al. 2013, SST root accuracy without pretrained vectors).
ANCHORS = {("sst", "treelstm"): ("RNTN", 45.7), ("sst", "rvnn"): ("plain RvNN", 43.2),
           ("sst2", "treelstm"): ("RNTN", 85.4), ("sst2", "rvnn"): ("plain RvNN", 82.4)}
ANCHOR_TASKS = {"sst": "fine-grained", "sst2": "binary"}
PARITY_SPREAD_POINTS = 1.0
# Rows trained as the parity preset trains are labelled by their epochs alone; any other
# optimiser, learning rate or weight decay (a tuned variant) is named in the row.
PARITY_TRAINING = (parity().base.optimizer, parity().base.lr)
BUDGET = ["epochs", "optimizer", "lr", "weight_decay"]   # rows compared within one budget


def _budget(r) -> str:
    """"3 epochs", or "5 epochs, adam lr 0.001, wd 1e-05" for a row not trained as parity."""
    extra = training_label(r, default=PARITY_TRAINING)
    return "%g epochs" % r["epochs"] + (", " + extra if extra else "")


def anchors_rows(df) -> List[List[str]]:
    """Each learning-parity goal with what this run measured and whether it is met.

    Every row names its training budget (epochs): frameworks are compared, and
    anchors judged, within one budget.
    """
    acc = accuracy_table(df)
    if acc.empty:
        return []
    rows = []
    for task, tree in acc[acc["model"] == "treelstm"].groupby(["task"] + BUDGET, dropna=False):
        if len(tree) > 1:
            spread = 100 * (tree["test_mean"].max() - tree["test_mean"].min())
            rows.append(["%s, %s: every framework's Tree-LSTM within %g point of the others"
                         % (task[0], _budget(tree.iloc[0]), PARITY_SPREAD_POINTS),
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
            rows.append(["%s %s (%s, %s) at or above %s" % (task, model, r["framework"],
                                                            _budget(r), name),
                         ">= %.1f" % target, "%.1f ± %.1f (%d seeds)" % (
                             mean, 100 * nan0(r["test_std"]), r["seeds"]),
                         "met" if mean >= target else "missed"])
    lo = acc[acc["task"] == "listops"]
    for (fw, *_), g in lo.groupby(["framework"] + BUDGET, dropna=False):
        t, s = g[g["model"] == "treelstm"], g[g["model"] == "lstm"]
        if len(t) and len(s):
            diff = 100 * (t["test_mean"].iloc[0] - s["test_mean"].iloc[0])
            rows.append(["listops (%s, %s): Tree-LSTM vs LSTM" % (fw, _budget(g.iloc[0])),
                         "report the gap",
                         "%+.1f points (%.1f vs %.1f)" % (diff, 100 * t["test_mean"].iloc[0],
                                                          100 * s["test_mean"].iloc[0]),
                         "tree better" if diff > 0 else "tree not better"])
    return rows


def anchors_section(df) -> str:
    rows = anchors_rows(df)
    if not rows:
        return "_no accuracy cells in this run_"
    table = md_table(["goal", "target", "measured (test accuracy %)", "verdict"], rows)
    acc = accuracy_table(df)
    other = [training_label(r, default=PARITY_TRAINING) for _, r in acc.iterrows()]
    if any(other):
        table = ("_A row naming a learning rate or weight decay is a budget other than the "
                 "parity preset's (%s lr %g, no decay), e.g. a tuned variant; the run's notes "
                 "say how it was chosen._\n\n" % PARITY_TRAINING) + table
    return table
