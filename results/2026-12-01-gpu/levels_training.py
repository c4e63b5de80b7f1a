"""Why JAX `levels` trained 25x slower than it inferred on the H200 (README, "Running on a GPU").

Times, in one process and alternating, on the first SST batches of 25 (per batch, median):
  infer      the `levels` forward: one jitted call for the leaves, one per height chunk
  old train  jax.value_and_grad over that Python loop of jitted calls (how `levels` trained
             before): JAX linearises each jitted call from Python, then transposes each
  new train  `levels` as it trains now: the same forward calls, one jitted backward call per
             forward call, one call for the leaves' backward and the optimiser update
and counts the jitted calls each makes. With hidden 150 the CPU computes long enough to hide
most host work; with hidden 8 it does not, which is the GPU's regime (its kernels take
microseconds). Usage, from the repository root (jax and optax installed):
    PJRT_NPROC=2 python results/2026-12-01-gpu/levels_training.py [HIDDEN] [MODEL]
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.batches import batch_examples, make_tree_batch
from bench.params import ModelConfig, init_params
from bench.tasks import load_task
from impls.jax_impl.rvnn import (RvNN, _node_names, group_forward, leaf_gates, local_loss,
                                 put_rows)

hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 150
model = sys.argv[2] if len(sys.argv) > 2 else "rvnn"
data = load_task("sst", seed=0)
cfg = ModelConfig(model, vocab_size=len(data.vocab), embed_dim=min(100, hidden), hidden=hidden,
                  num_classes=5, optimizer="adam", lr=1e-3)
impl = RvNN(cfg, "levels", threads=2)
impl.batch_size = 25
impl.load_params(init_params(cfg, 0))
pool = [make_tree_batch(g) for g in batch_examples(data.train, 25, seed=0, bucket=True,
                                                    drop_last=True)[:5]]
ready = [impl.prepare(b) for b in pool]
W_name, b_name = _node_names(model)
calls = {"n": 0}


def counted(f):
    jitted = jax.jit(f)

    def call(*args):
        calls["n"] += 1
        return jitted(*args)
    return call


@counted
def leaves(W_leaf, b_leaf, E, token, where, R):
    states = leaf_gates(model, E[token] @ W_leaf + b_leaf)
    return tuple(put_rows(jnp.zeros((R.shape[0], hidden)), where.reshape(-1), s.reshape(-1, hidden))
                 for s in states)


@counted
def level(W, b, bufs, node, left, right):
    return group_forward(model, W, b, bufs, node, left, right)[0]


@counted
def head(W_o, b_o, h, labels, scale):
    return local_loss(W_o, b_o, h, labels, scale)


def row_labels(prep):
    """Each buffer row's label (-1: none), gathered once from the prepared calls."""
    labels = np.full(prep["rows"], -1, np.int32)
    parts = [(c[0], c[3]) for c in prep["calls"]] + [(prep["leaves"][1], prep["leaves"][3])]
    for rows, labs in parts:
        rows, labs = np.asarray(rows).reshape(-1), np.asarray(labs).reshape(-1)
        labels[rows[rows < prep["rows"]]] = labs[rows < prep["rows"]]
    return jnp.asarray(labels)


def old_loss(p, prep, labels):
    """The loss as a Python loop of jitted calls (the forward of `infer`, then one head)."""
    token, where = prep["leaves"][:2]
    bufs = leaves(p["W_leaf"], p["b_leaf"], p["E"], token, where, jnp.zeros(prep["rows"]))
    for node, left, right, _, _ in prep["calls"]:
        bufs = level(p[W_name], p[b_name], bufs, node, left, right)
    return head(p["W_o"], p["b_o"], bufs[0], labels, prep["scale"])


old_train = jax.value_and_grad(old_loss)
labels = {id(r): row_labels(r) for r in ready}
work = {
    "infer": lambda r: impl.logits(r),
    "old train": lambda r: old_train(impl.params, r, labels[id(r)]),
    "new train": lambda r: impl.train_step(r),
}
times = {k: [] for k in work}
counts = {}
for rnd in range(6):
    for name, f in work.items():
        calls["n"] = 0
        t0 = time.perf_counter()
        jax.block_until_ready([f(r) for r in ready])
        if rnd:  # the first round compiles
            times[name].append((time.perf_counter() - t0) / len(ready) * 1e3)
        counts[name] = calls["n"] / len(ready)
heights = np.mean([b.num_levels for b in pool])
print("%s levels, hidden %d, SST batches of 25 (%.0f heights, %.0f level calls on average)"
      % (model, hidden, heights, np.mean([len(r["calls"]) for r in ready])))
for name in work:
    print("  %-9s %7.2f ms a batch" % (name, np.median(times[name])))
print("  old train / infer %.1fx, new train / infer %.1fx; old loop's Python-side jitted calls "
      "in a step: %d (each linearised and transposed from Python)"
      % (np.median(times["old train"]) / np.median(times["infer"]),
         np.median(times["new train"]) / np.median(times["infer"]), counts["old train"]))
