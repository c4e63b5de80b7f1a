"""Batch-1 latency of a ``bench ab`` run, paired by round: ``bench ab`` judges throughput
only, but each of its cell processes records ``latency_ms_p50`` too.

Run from the repository root: ``python results/2026-12-01-speed/ab_latency.py
results/2026-12-01-speed/ab-torch-levels``. Prints, per cell, the median over rounds of each
side's p50 and of the per-round ratio base / new (above 1: new is faster).
"""

import json
import os
import statistics
import sys


def main(folder):
    by = {}
    for side in ("base", "new"):
        with open(os.path.join(folder, side, "records.jsonl")) as fh:
            for line in fh:
                r = json.loads(line)
                if r.get("latency_ms_p50") is None:
                    continue
                cell = "%s/%s/%s b%d" % (r["framework"], r["model"], r["strategy"], r["batch_size"])
                by.setdefault(cell, {}).setdefault(r["ab"]["round"], {})[side] = r["latency_ms_p50"]
    for cell, rounds in sorted(by.items()):
        pairs = [(v["base"], v["new"]) for v in rounds.values() if len(v) == 2]
        ratios = [b / n for b, n in pairs]
        print("%s: base %.3f ms, new %.3f ms; base/new per round: median %.2fx (%.2f-%.2f), %d rounds"
              % (cell, statistics.median(b for b, _ in pairs), statistics.median(n for _, n in pairs),
                 statistics.median(ratios), min(ratios), max(ratios), len(pairs)))


if __name__ == "__main__":
    main(sys.argv[1])
