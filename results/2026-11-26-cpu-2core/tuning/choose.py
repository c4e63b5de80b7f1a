"""The tuned parity variant's choice, from tune.py's search.jsonl: for each (model, task), the
dev accuracy averaged over the seeds searched, per (optimiser, lr, weight decay) and epoch,
and the pick: the highest mean dev among the settings searched with the most seeds (3).
Test accuracy is not read for the choice; the final runs report it.

    python choose.py search.jsonl > selection.md
"""

import collections
import json
import sys


def main(path):
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    runs = collections.defaultdict(dict)      # (model, task, setting, epoch) -> {seed: dev}
    for r in rows:
        setting = (r["optimizer"], r["lr"], r["weight_decay"])
        runs[(r["model"], r["task"], setting, r["epoch"])][r["seed"]] = r["dev"]
    out = ["# Tuned parity: the dev-set search", "",
           "Mean dev root accuracy % over the seeds each setting ran (seeds in brackets), after "
           "each epoch; Adam unless named, batch 25, torch `levels`, 1 thread. The pick per "
           "model and task is the highest mean among the settings searched with 3 seeds.", ""]
    for model, task in sorted({k[:2] for k in runs}):
        mine = {k[2:]: v for k, v in runs.items() if k[:2] == (model, task)}
        settings = sorted({s for s, _ in mine})
        epochs = sorted({e for _, e in mine})
        most = max(len(v) for v in mine.values())
        pick = max(((len(v), sum(v.values()) / len(v), s, e) for (s, e), v in mine.items()
                    if len(v) == most), key=lambda t: t[1])
        out += ["## %s, %s" % (task, model), "",
                "| optimiser, lr, decay (seeds) | " + " | ".join("ep %d" % e for e in epochs) + " |",
                "|---|" + "---|" * len(epochs)]
        for s in settings:
            seeds = max(len(mine.get((s, e), {})) for e in epochs)
            cells = []
            for e in epochs:
                v = mine.get((s, e))
                text = "%.1f" % (sum(v.values()) / len(v)) if v else "-"
                cells.append("**%s**" % text if (s, e) == pick[2:] else text)
            out.append("| %s lr %g, wd %g (%d) | %s |" % (s[0], s[1], s[2], seeds, " | ".join(cells)))
        out += ["", "Pick: %s lr %g, weight decay %g, %d epochs (mean dev %.1f over %d seeds)."
                % (pick[2][0], pick[2][1], pick[2][2], pick[3], pick[1], pick[0]), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "search.jsonl")
