"""Tables of the issue-16 campaign (campaign.sh): one row per kind of comparison.

    python results/2026-12-01-ab/summarise.py > results/2026-12-01-ab/summary.md
"""

import glob
import json
import os
import re
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    groups = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(HERE, "*", "ab.json"))):
        name = os.path.basename(os.path.dirname(path))
        kind = re.sub(r"-\d+$", "", name)
        summary = json.load(open(path))
        for row in summary["verdicts"]:
            groups[(kind, row["cell"].split(" ")[0], row["metric"])].append(row)
    print("| comparison | cell | metric | runs | REGRESSION | improvement | other verdicts | "
          "measured slowdown: median [min, max] | 95% CI width (median) | judged on |")
    print("|---|---|---|---:|---:|---:|---|---|---:|---|")
    for (kind, cell, metric), rows in sorted(groups.items()):
        verdicts = [r["verdict"] for r in rows]
        reg = sum(v.startswith("REGRESSION") for v in verdicts)
        imp = sum(v.startswith("improvement") for v in verdicts)
        other = defaultdict(int)
        for v in verdicts:
            if not v.startswith(("REGRESSION", "improvement")):
                other[v.split(" (")[0]] += 1
        slow = [100 * r["slowdown"] for r in rows if "slowdown" in r]
        width = [100 * (r["ci_high"] - r["ci_low"]) for r in rows if "slowdown" in r]
        basis = defaultdict(int)
        for r in rows:
            b = r.get("basis", "")
            basis["on-CPU rates" if "on-CPU" in b else "quiet rounds" if "quiet rounds" in b
                  else "all rounds"] += 1
        print("| %s | %s | %s | %d | %d | %d | %s | %+.1f%% [%+.1f, %+.1f] | %.1f pts | %s |" % (
            kind, cell, metric.replace("_samples_per_s", ""), len(rows), reg, imp,
            ", ".join("%s %d" % kv for kv in sorted(other.items())) or "-",
            np.median(slow), min(slow), max(slow), np.median(width),
            ", ".join("%s %d" % kv for kv in sorted(basis.items()))))


if __name__ == "__main__":
    main()
