"""CPU-side estimate of run.sh's duration on an H200, step by step (see NOTES.md).

Inputs: the last GPU run's records (results/2026-11-26-gpu/raw: torch cells' wall time, JAX
cells' setup time and XLA compile seconds), the quiet CPU run's records
(results/2026-11-26-cpu-2core/raw/quick: XLA compile seconds of the cells the GPU never ran),
and NEW_OVER_OLD: compile seconds of this branch's JAX cells over those of commit b18d64d,
measured on this CPU with the runner, back to back (NOTES.md gives the command).
Run from the repository root: python results/2026-12-01-gpu/estimate.py [SCALE]
(SCALE multiplies the JAX compile seconds, e.g. 0.5 for "autotuning off halves them").
"""
import glob
import json
import statistics
import sys

SCALE = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0

NEW_OVER_OLD = {("elman", "compiled"): 0.42, ("lstm", "compiled"): 0.59,
                ("rvnn", "compiled"): 0.34, ("treelstm", "compiled"): 0.43,
                ("rvnn", "levels"): 0.30, ("treelstm", "levels"): 0.23,
                ("elman", "loop"): 0.34, ("lstm", "loop"): 0.25,
                ("rvnn", "recursive"): 0.60, ("treelstm", "recursive"): 0.59,
                ("lstm", "fused"): 6 / 25}       # GPU only: programs 25 -> ~6, same kind
TORCH_COMPILED_S = 34.0   # a torch.compile cell: the quiet CPU run's 24-40 s (GPU unmeasured)
WARM_CELL_S = 1.0         # compile seconds of a JAX cell whose programs an earlier cell cached


def records(pattern):
    out = []
    for path in glob.glob(pattern, recursive=True):
        out += [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in out if r["status"] == "ok"]


gpu = records("results/2026-11-26-gpu/raw/**/records.jsonl")
cpu = [r for r in records("results/2026-11-26-cpu-2core/raw/quick/jax/records.jsonl")
       if r["framework"] == "jax"]
cpu_s = {(r["model"], r["strategy"]): r["info"]["xla_compile_seconds_in_process"] for r in cpu}
gpu_jax = {(r["model"], r["strategy"]): r for r in gpu if r["framework"] == "jax"}
# GPU compile seconds over quiet-CPU compile seconds, for the cells measured on both
k = statistics.mean(gpu_jax[c]["info"]["xla_compile_seconds_in_process"] / cpu_s[c]
                    for c in gpu_jax if c in cpu_s)
setup = statistics.mean(r["wall_s"] - r["info"]["xla_compile_seconds_in_process"]
                        for r in gpu_jax.values())
torch_wall = {(r["model"], r["strategy"], r["task"], r["batch_size"]): r["wall_s"]
              for r in gpu if r["framework"] == "torch"}
RUNNER_S = 1.3            # per cell between cells (process start, imports): steps.txt of that run


def jax_compile(cell):
    old = (gpu_jax[cell]["info"]["xla_compile_seconds_in_process"] if cell in gpu_jax
           else k * cpu_s[cell])
    return old * NEW_OVER_OLD[cell] * SCALE


def jax_work(model, strategy):
    """Timed work beyond setup: 1 warm-up + 5 train passes, 5 infer passes of 125 examples,
    at the quiet CPU run's rates (per-node and per-step calls are host-bound on a GPU too)."""
    if strategy not in ("recursive", "loop"):
        return 0.0
    r = [c for c in cpu if (c["model"], c["strategy"]) == (model, strategy)][0]
    return 750 / statistics.median(r["train_samples_per_s"]) + \
        625 / statistics.median(r["infer_samples_per_s"])


def step_seconds(cells):
    total = 0.0
    for fw, model, strategy, task, b, warm in cells:
        if fw == "torch":
            total += RUNNER_S + (TORCH_COMPILED_S if strategy == "compiled"
                                 else torch_wall[(model, strategy, task, b)])
        elif (model, strategy) == ("elman", "fused"):
            total += 0.5                         # not applicable, no process
        else:
            compile_s = WARM_CELL_S if warm else jax_compile((model, strategy))
            extra = jax_work(model, strategy) + (torch_wall[("treelstm", "levels", task, 25)] - setup
                                                 if task == "synth-left-512" else 0.0)
            total += RUNNER_S + setup + compile_s + extra
    return total


M = ("elman", "lstm", "rvnn", "treelstm")
RNN = ("elman", "lstm")
SYN = [s + str(n) for s in ("synth-balanced-", "synth-left-") for n in (8, 64, 512)]
steps = [
    ("torch-fast", [("torch", m, s, "sst", 25, False) for m in M
                    for s in (("fused",) if m in RNN else ("levels",))]),
    ("jax-trees", [("jax", m, s, "sst", 25, False) for m in ("rvnn", "treelstm")
                   for s in ("levels", "compiled")]),
    ("torch-compiled", [("torch", m, "compiled", "sst", 25, False) for m in M]),
    ("jax-rnn", [("jax", m, s, "sst", 25, False) for m in RNN for s in ("fused", "compiled")]),
    ("baselines", [(fw, m, "loop" if m in RNN else "recursive", "sst", 25, False)
                   for fw in ("torch", "jax") for m in M]),
    ("batch-sweep", [(fw, m, "fused" if m == "lstm" else "levels", "sst", b, False)
                     for fw in ("torch", "jax") for m in ("lstm", "treelstm") for b in (1, 100, 400)]),
    # JAX: only the 512-leaf/token class is new; the others load the SST cells' programs
    ("tree-sweep", [(fw, m, "fused" if m == "lstm" else "levels", t, 25,
                     fw == "jax" and t != "synth-balanced-512")
                    for fw in ("torch", "jax") for m in ("lstm", "treelstm") for t in SYN]),
]
print("GPU/CPU compile-time factor k = %.1f; JAX setup per cell %.1f s" % (k, setup))
done = 0.0
for name, cells in steps:
    s = step_seconds(cells)
    done += s
    print("%-15s %2d cells %5.0f s   cumulative %5.0f s (%4.1f min)" % (name, len(cells), s, done,
                                                                       done / 60))
