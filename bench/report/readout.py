"""The reservoir-readout study's report section: readout cells beside full training of the
same task, model and framework, and their sensitivity to the spectral radius."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from ..params import MODELS
from ..stats import mean_std, median
from .markdown import fmt, md_table


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


TASK_ORDER = ("sst", "sst2", "listops")


def _cell_key(r: Dict) -> Tuple:
    return (r["task"], r["model"], r["framework"], r["device"])


def _table_order(key: Tuple) -> Tuple:
    """Sort key of a (task, model, framework, device): tasks in TASK_ORDER, models in MODELS."""
    return (TASK_ORDER.index(key[0]) if key[0] in TASK_ORDER else 9,
            MODELS.index(key[1]) if key[1] in MODELS else 9, key[2], key[3])


def _radius_cell(a: Optional[Dict]) -> str:
    """Dev / test accuracy at one radius, or why there is none."""
    if a is not None and not a.get("verified", True):
        return "not equivalent (%.1e)" % a.get("verify_max_abs", float("nan"))
    return "-" if a is None else "%s / %s" % (fmt(100 * a["dev"], "%.1f"), fmt(100 * a["test"], "%.1f"))


def radius_rows(records: Sequence[Dict]) -> Tuple[List[float], List[List[str]]]:
    """Seed 0's dev / test accuracy per spectral radius, for every (task, model, framework)
    measured at more than one radius."""
    per: Dict[Tuple, Dict[float, Dict]] = {}
    for r in records:
        # failed cells count too: a radius whose features the check refused says so
        if r.get("status") in ("ok", "failed") and r.get("accuracy") and _mode(r) == "readout" \
                and r.get("seed") == 0:
            per.setdefault(_cell_key(r), {})[r["accuracy"].get("spectral_radius")] = r["accuracy"]
    keep = {k: v for k, v in per.items() if len(v) > 1}
    radii = sorted({rho for v in keep.values() for rho in v})
    rows = [list(key[:3]) + [_radius_cell(keep[key].get(rho)) for rho in radii]
            for key in sorted(keep, key=_table_order)]
    return radii, rows


def _readout_groups(ok: Sequence[Dict], main: Optional[float]) -> Dict[Tuple, Dict[str, List[Dict]]]:
    """{(task, model, framework, device): {"readout" or a full budget: cells}}; readout cells
    at the main radius only (other radii: the sensitivity table)."""
    groups: Dict[Tuple, Dict[str, List[Dict]]] = {}
    for r in ok:
        if _mode(r) == "readout":
            if r["accuracy"].get("spectral_radius") != main:
                continue
            sub = "readout"
        else:
            # one row per budget and machine: seconds from two machines never mix
            sub = "full %g %s %s" % (r["accuracy"].get("epochs") or 0,
                                     (r.get("config") or {}).get("loss_mode", "root"), _cpu(r))
        groups.setdefault(_cell_key(r), {}).setdefault(sub, []).append(r)
    return groups


def _side(cells: Sequence[Dict]) -> Dict:
    """Test accuracy over seeds (mean, std), and the median training seconds and load."""
    test, test_sd = mean_std([r["accuracy"].get("test") for r in cells])
    return {"test": test, "test_sd": test_sd,
            "seconds": median([r["accuracy"]["train_s"] for r in cells]),
            "load": median([r.get("load_avg_1m_at_start") or 0 for r in cells])}


def _readout_cells(ro: Sequence[Dict], side: Dict) -> List[str]:
    """The readout cells' columns: strategy, rho, alpha, accuracies, majority class, seconds."""
    dev, dev_sd = mean_std([r["accuracy"].get("dev") for r in ro])
    floor, _ = mean_std([r["accuracy"].get("majority_test") for r in ro])
    return ["/".join(sorted({r["strategy"] for r in ro})),
            ", ".join("%g" % x for x in sorted({r["accuracy"].get("spectral_radius") for r in ro})),
            ", ".join("%g" % a for a in sorted({r["accuracy"].get("alpha") for r in ro})),
            _pct(dev, dev_sd), _pct(side["test"], side["test_sd"]),
            fmt(100 * floor if floor is not None else None, "%.1f"), fmt(side["seconds"], "%.1f")]


def _full_budgets(g: Dict[str, List[Dict]], ro: Sequence[Dict]) -> List[Optional[str]]:
    """The full-training budgets beside the readout cells, those measured on the readout cells'
    machine first; [None] where there is none."""
    here = {_cpu(r) for r in ro}
    return sorted((k for k in g if k != "readout"), key=lambda k: (k.split()[3] not in here, k)) or [None]


def _full_cells(sub: Optional[str], fr: Sequence[Dict], ro: Sequence[Dict], ro_side: Dict) -> List[str]:
    """One full budget's columns, and how it compares with the readout cells."""
    budget = "-" if sub is None else "%s epochs, %s loss" % tuple(sub.split()[1:3])
    other = sorted({_cpu(r) for r in fr} - {_cpu(r) for r in ro})
    if other:
        budget += " (other machine: %s)" % ", ".join(o.replace("_", " ") for o in other)
    f = _side(fr)
    return [budget, _pct(f["test"], f["test_sd"]), fmt(f["seconds"], "%.0f"),
            fmt(100 * (f["test"] - ro_side["test"]) if f["test"] is not None else None, "%+.1f"),
            fmt(f["seconds"] / ro_side["seconds"] if f["seconds"] and ro_side["seconds"] else None,
                "%.0fx"),
            "%d / %s" % (len(ro), len(fr) if fr else "-"),
            "%s / %s" % (fmt(ro_side["load"], "%.1f"), fmt(f["load"], "%.1f"))]


def readout_rows(records: Sequence[Dict]) -> List[List[str]]:
    """One row per (task, model, framework) with readout cells, beside the full-training
    cells of the same task, model and framework (one row per full budget)."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("accuracy")]
    groups = _readout_groups(ok, main_radius(ok))
    out = []
    for key in sorted(groups, key=_table_order):
        g = groups[key]
        ro = g.get("readout")
        if not ro:
            continue
        side = _side(ro)
        head = list(key[:3]) + _readout_cells(ro, side)
        out += [head + _full_cells(sub, g.get(sub) or [], ro, side) for sub in _full_budgets(g, ro)]
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
        "the input, and the cell is failed rather than fitted.\n\n" % main_radius(records) + md_table(
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
        "training label, the floor a readout has to beat.\n\n" + md_table(
            ["task", "model", "framework", "strategy", "rho", "alpha", "readout dev %",
             "readout test %", "majority class test %", "readout train s", "full budget",
             "full test %", "full train s",
             "cost (points)", "time saved", "seeds (readout / full)", "load (readout / full)"],
            rows))
