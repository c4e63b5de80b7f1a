"""``write_report``: report.md, summary.csv and the plots of a run directory, written
whole or not at all."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Dict, List, Tuple

from ..config import UsageError
from ..records import RECORDS
from ..runs import incomplete_runs, load_run
from .anchors import anchors_section
from .figures import plots
from .gradients import gradient_section, load_gradient_rows
from .readout import readout_section
from .sections import (accuracy_section, coverage_section, env_section, machines_section,
                       overhead_section, plain_section, results_section,
                       wrapper_section)
from .summary import SUMMARY_COLUMNS, summarise


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


def study_sections(run_dir: str, out_dir: str, records) -> Tuple[List[str], List[str]]:
    """Markdown lines and plots of the studies whose data the run holds (none: nothing)."""
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
    studies, _ = study_sections(run_dir, out_dir, [])
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
          "than 5%% (the record's `noise`); `(budget)`: the cell's time budget for timed passes "
          "(`timed_budget_s`) took fewer samples than its repeats, at least 3. Only cells that "
          "passed the equivalence check against the NumPy reference are timed."
          % os.path.basename(os.path.abspath(run_dir)), "",
          "Cells: " + ", ".join("%s %d" % kv for kv in sorted(counts.items())), ""]
    if incomplete:
        md += ["**Incomplete:** %s (their runs were interrupted or are still going; "
               "`--resume` completes them)." % ", ".join(
                   "%s %d of %d planned cells" % (fw, done, total)
                   for fw, (done, total) in sorted(incomplete.items())), ""]
    md += ["## Environment", "", env_section(envs, records), ""]
    machines = machines_section(records)
    if machines:
        md += ["## Machines", "", machines, ""]
    md += ["## Coverage", "", coverage_section(records, incomplete), "",
           "## Results", "", results_section(df, records), "",
           "## Against the plain loop", "", plain_section(df), "",
           "## Where each cell's time goes", "", overhead_section(df), "",
           "## What Keras costs over its backend", "", wrapper_section(df), "",
           "## Accuracy", "", accuracy_section(df), "",
           "## Learning-parity goals", "", anchors_section(df), ""]
    studies, _ = study_sections(run_dir, out_dir, records)   # their plots sit in their sections
    md += studies
    if images:
        md += ["## Plots", ""] + ["![%s](%s)" % (img[:-4].replace("_", " "), img) for img in images]
    elif not have_matplotlib():
        md += ["## Plots", "", "_%s._" % (NO_MATPLOTLIB[0].upper() + NO_MATPLOTLIB[1:])]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md) + "\n")
