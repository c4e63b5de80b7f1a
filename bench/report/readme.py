"""The README's generated blocks (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``),
rebuilt from published runs."""

from __future__ import annotations

from typing import Dict, List

from ..interface import BASELINE_STRATEGY
from ..params import family
from ..records import atomic_write
from ..runs import load_run
from .anchors import anchors_section
from .markdown import fmt, md_table
from .sections import accuracy_section, coverage_section
from .summary import summarise
from .write import require_pandas


def readme_blocks(run_dirs: List[str], skip_corrupt: bool = False) -> Dict[str, str]:
    """Markdown blocks for the README, generated from published runs."""
    require_pandas()
    records: List[Dict] = []
    for d in run_dirs:
        records.extend(load_run(d, skip_corrupt=skip_corrupt)[0])
    df = summarise(records)
    ok = df[(df["status"] == "ok") & df["accuracy"].isna() & (df["batch_size"] == 25)
            & (df["task"] == "sst")]
    rows = []
    for (model, device), g in ok.groupby(["model", "device"], sort=False):
        g = g.sort_values("train_samples_per_s", ascending=False)
        best = g.iloc[0]
        slow = g[g["strategy"] == BASELINE_STRATEGY[family(model)]]
        rows.append([model, device, "%s/%s" % (best["framework"], best["strategy"]),
                     fmt(best["train_samples_per_s"], "%.0f"),
                     fmt(best["infer_samples_per_s"], "%.0f"),
                     ", ".join("%s %.0f" % (r["framework"], r["train_samples_per_s"])
                               for _, r in slow.iterrows() if r["train_samples_per_s"] > 0) or "-"])
    summary = md_table(["model", "device", "fastest framework/strategy (train)", "train ex/s",
                        "infer ex/s", "baseline strategy train ex/s (loop/recursive)"], rows)
    return {"coverage": coverage_section(records), "summary": summary,
            "accuracy": accuracy_section(df), "anchors": anchors_section(df)}


def update_readme(readme: str, run_dirs: List[str], skip_corrupt: bool = False) -> None:
    """Rewrite the README's generated blocks (between <!-- NAME:start --> and <!-- NAME:end -->)."""
    with open(readme, encoding="utf-8") as fh:
        text = fh.read()
    for name, block in readme_blocks(run_dirs, skip_corrupt=skip_corrupt).items():
        start, end = "<!-- %s:start -->" % name, "<!-- %s:end -->" % name
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + start + "\n" + block + "\n" + end + tail
    atomic_write(readme, text)
