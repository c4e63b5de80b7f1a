"""Reports from records only: ``python -m bench report RUN_DIR [--out DIR]``.

Writes ``report.md`` (GitHub-readable tables), ``summary.csv`` (one row per
cell; its columns are a stable contract) and PNG plots. Everything is derived
from ``records.jsonl`` and ``env.json`` files under RUN_DIR, so a published
report can be rebuilt from its raw files. pandas and matplotlib are imported
in this package only.

Records are read through ``bench.runs`` and ``bench.records`` (corrupt lines
refuse, earlier generations are not read, the last record of a cell wins);
medians, IQRs and ``repeats`` use finite samples only (``bench.stats``).
Outputs are written into a scratch directory and renamed into place, so an
interrupted report leaves the previous outputs whole.

pandas is required (``UsageError`` naming the install command without it);
matplotlib is optional: without it the report and CSV are complete, with a line
saying why there are no plots.

One job per module:

* ``summary``: the summary table (``summarise``) and accuracy over seeds;
* ``markdown``: the table and number cells every section uses;
* ``sections``: the run report's Markdown sections;
* ``anchors``: the learning-parity goals and their verdicts;
* ``figures``: the plots, one function per figure;
* ``gradients``, ``readout``: the studies' sections;
* ``write``: report.md, summary.csv and plots of a run directory;
* ``readme``: the README's generated blocks.
"""

from ..runs import incomplete_runs, load_run
from .anchors import anchors_rows
from .figures import plots, throughput_bars
from .readme import readme_blocks, update_readme
from .summary import SUMMARY_COLUMNS, accuracy_table, machine_label, machine_peaks, summarise
from .sections import plain_section, wrapper_rows
from .write import write_report

__all__ = ["SUMMARY_COLUMNS", "accuracy_table", "anchors_rows", "incomplete_runs", "load_run",
           "machine_label", "machine_peaks", "plain_section", "plots", "readme_blocks", "summarise",
           "throughput_bars", "update_readme", "wrapper_rows", "write_report"]
