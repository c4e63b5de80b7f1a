"""Where a Tree-LSTM training step's time goes on the CPU, and the ceiling its GEMM shapes allow.

Issue 21 asks the best Tree-LSTM strategy for >= 35% (batch 25) / >= 50% (batch 100) of the
machine's float32 GEMM peak in training, or a profile showing where the rest goes. For the
quick preset's cell (SST, hidden 150, embed 100, 2 threads) and each batch size this script
measures, in one process:

* ``step``: the strategy's training step over the cell's own pool (the harness's batches:
  ``bench.cell``'s bucketed draw), as achieved model FLOP/s (``bench.flops.train_flops``:
  real nodes only, 3x forward) over the machine's GEMM peak (``time_gemm``, n = 512, the
  probe the report divides by);
* ``gemm_only``: the very GEMMs that step must run (per batch: the leaf product, one
  [n_h, 2H] x [2H, 5H] product per height h, the classifier, and the two backward products
  of each), timed back to back on preallocated tensors with nothing else in between: the
  ceiling any implementation of this dynamic-batching schedule can reach here (rounds
  alternate the step and its GEMMs, medians over ``--repeats`` rounds);
* ``profile``: torch.profiler's self CPU time of one pass, by kind of operator.

Last, batch-1 inference latency: operators per call and what its FLOPs would take at the peak.

Run from the repository root: ``PYTHONPATH=. python results/2026-12-01-speed/treelstm_ceiling.py``
(``--strategy levels|compiled``; ``--json`` for the raw figures).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
import torch

from bench import registry
from bench.batches import batch_examples, make_batch
from bench.cell import model_config
from bench.config import CellConfig
from bench.environment import limit_blas_threads
from bench.flops import numpy_gemm_ops, time_gemm, train_flops
from bench.params import init_params
from bench.tasks import load_task

KINDS = (("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmv", "aten::mv",
                   "aten::matmul", "aten::linear")),
         ("gather / scatter / copy", ("aten::index", "aten::index_select", "aten::embedding",
                                      "aten::cat", "aten::index_copy", "aten::copy_",
                                      "aten::index_add_", "aten::embedding_dense_backward",
                                      "aten::index_put_", "aten::scatter_add_", "aten::gather",
                                      "aten::slice", "aten::split", "aten::chunk", "aten::view",
                                      "aten::narrow", "aten::unsafe_split")),
         ("elementwise", ("aten::sigmoid", "aten::tanh", "aten::mul", "aten::add", "aten::addcmul",
                          "aten::sigmoid_backward", "aten::tanh_backward", "aten::sub",
                          "aten::add_", "aten::mul_", "aten::zero_", "aten::fill_", "aten::sum",
                          "aten::div", "aten::sqrt", "aten::lerp_", "aten::addcdiv_",
                          "aten::addcmul_", "aten::_foreach_")))


def gemm_shapes(cfg, batch, loss_mode="root"):
    """(m, k, n) of every forward product of one Tree-LSTM step over ``batch``."""
    D, H, C = cfg.embed_dim, cfg.hidden, cfg.num_classes
    sizes = np.diff(batch.level_offsets)
    out = [(int(sizes[0]), D, 3 * H)]                       # leaves: i, o, u
    out += [(int(n), 2 * H, 5 * H) for n in sizes[1:]]      # one product per height
    out.append((batch.size if loss_mode == "root" else batch.num_nodes, H, C))
    return out


def gemm_pass(shapes):
    """A function running the forward and backward products of ``shapes`` back to back."""
    ops = []
    for m, k, n in shapes:
        x, w, dy = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
        ops.append((x, w, dy))

    def once():
        for x, w, dy in ops:
            torch.mm(x, w)          # forward
            torch.mm(dy, w.t())     # d input
            torch.mm(x.t(), dy)     # d weight
    return once


def profile_kinds(impl, ready):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in ready:
            impl.train_step(r)
    total = 0.0
    by = defaultdict(float)
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total
        total += t
        for kind, names in KINDS:
            if ev.key in names or any(ev.key.startswith(n) for n in names if n.endswith("_")):
                by[kind] += t
                break
        else:
            by["other (autograd, optimiser glue, dispatch)"] += t
    return {k: v / total for k, v in sorted(by.items(), key=lambda kv: -kv[1])}


def measure(strategy, batch_size, threads, pool_batches, repeats):
    torch.set_num_threads(threads)
    limit_blas_threads(threads)
    cfg = CellConfig("torch", "treelstm", strategy, batch_size=batch_size, threads=threads,
                     pool_batches=pool_batches)
    dataset = load_task("sst", seed=0)
    mcfg = model_config(cfg, dataset)
    groups = batch_examples(dataset.train, batch_size, seed=0, bucket=True,
                            drop_last=True)[:pool_batches]
    pool = [make_batch("rvnn", g) for g in groups]
    impl = registry.load("torch", "treelstm")(mcfg, strategy, "cpu", threads)
    impl.batch_size = batch_size
    impl.load_params(init_params(mcfg, 0))
    ready = [impl.prepare(b) for b in pool]
    for _ in range(2):
        for r in ready:
            impl.train_step(r)
    flops = sum(train_flops(mcfg, b) for b in pool)
    shapes = [s for b in pool for s in gemm_shapes(mcfg, b)]
    gemms = gemm_pass(shapes)
    gemms()
    # rounds alternate the step and its GEMMs alone, so a noisy moment hits both
    steps, gemm_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for r in ready:
            impl.train_step(r)
        impl.sync()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gemms()
        gemm_times.append(time.perf_counter() - t0)
    step_s, gemm_s = float(np.median(steps)), float(np.median(gemm_times))
    ratios = [g / s for g, s in zip(gemm_times, steps)]
    heights = [len(np.diff(b.level_offsets)) for b in pool]
    small = [s for s in shapes if s[0] < 32]
    return {"strategy": strategy, "batch_size": batch_size, "threads": threads,
            "examples": sum(b.size for b in pool), "heights_mean": float(np.mean(heights)),
            "products_per_step": len(shapes) / len(pool) * 3,
            "products_under_32_rows_share": len(small) / len(shapes),
            "step_s": step_s, "step_flops_s": flops / step_s, "gemm_only_s": gemm_s,
            "gemm_only_flops_s": flops / gemm_s,
            "gemm_share_by_round": [float(np.min(ratios)), float(np.median(ratios)),
                                    float(np.max(ratios))],
            "profile": profile_kinds(impl, ready)}


def latency(strategy, threads, samples=20):
    """Batch-1 inference on the first dev sentences, as the cell's latency phase calls it:
    median ms, operators dispatched per call (torch.profiler), tree heights, and the time
    its matmul FLOPs would take at the GEMM peak."""
    from torch.profiler import ProfilerActivity, profile
    from bench.flops import forward_flops
    torch.set_num_threads(threads)
    cfg = CellConfig("torch", "treelstm", strategy, batch_size=1, threads=threads)
    dataset = load_task("sst", seed=0)
    mcfg = model_config(cfg, dataset)
    impl = registry.load("torch", "treelstm")(mcfg, strategy, "cpu", threads)
    impl.batch_size = 1
    impl.load_params(init_params(mcfg, 0))
    batches = [make_batch("rvnn", [e]) for e in dataset.splits["dev"][:samples]]
    ready = [impl.prepare(b) for b in batches]
    for r in ready:
        impl.logits(r)
    times = []
    for _ in range(5):
        for r in ready:
            t0 = time.perf_counter()
            impl.logits(r)
            impl.sync()
            times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in ready:
            impl.logits(r)
    ops = sum(ev.count for ev in prof.key_averages() if ev.key.startswith("aten::"))
    return {"strategy": strategy, "latency_ms_p50": 1e3 * float(np.median(times)),
            "aten_ops_per_call": ops / len(ready),
            "heights_mean": float(np.mean([len(np.diff(b.level_offsets)) for b in batches])),
            "nodes_mean": float(np.mean([b.num_nodes for b in batches])),
            "flops_per_call": float(np.mean([forward_flops(mcfg, b) for b in batches]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="levels", choices=("levels", "compiled"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-batches", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    limit_blas_threads(args.threads)
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    # the best of three probes each: the peak is what the machine can do, and a shared
    # machine's noise only ever lowers a probe
    peak = max(max(time_gemm(*numpy_gemm_ops()), time_gemm(lambda: a @ b, lambda out: None))
               for _ in range(3))
    rows = [measure(args.strategy, bs, args.threads, args.pool_batches, args.repeats)
            for bs in args.batch_sizes]
    lat = latency(args.strategy, args.threads)
    if args.json:
        print(json.dumps({"peak_flops_s": peak, "rows": rows, "latency": lat}, indent=1))
        return
    print("machine float32 GEMM peak (n=512, %d threads): %.1f GFLOP/s" % (args.threads, peak / 1e9))
    print("| batch | heights | products/step | under 32 rows | step: GFLOP/s (% peak) | "
          "its GEMMs alone: GFLOP/s (% peak) | GEMMs alone / step, per round (min, median, "
          "max) | step time in GEMM / gather+copy / elementwise / other |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["profile"]
        print("| %d | %.1f | %.0f | %.0f%% | %.1f (%.0f%%) | %.1f (%.0f%%) | %s | %s |" % (
            r["batch_size"], r["heights_mean"], r["products_per_step"],
            100 * r["products_under_32_rows_share"], r["step_flops_s"] / 1e9,
            100 * r["step_flops_s"] / peak, r["gemm_only_flops_s"] / 1e9,
            100 * r["gemm_only_flops_s"] / peak,
            ", ".join("%.2f" % x for x in r["gemm_share_by_round"]),
            " / ".join("%.0f%%" % (100 * p.get(k, 0)) for k in
                       ("gemm", "gather / scatter / copy", "elementwise",
                        "other (autograd, optimiser glue, dispatch)"))))
    print()
    print("batch 1 (%s, first %d dev sentences): p50 %.3f ms; %.0f nodes, %.1f heights, %.0f "
          "operators per call (%.1f us each); its %.2f MFLOP take %.3f ms at the GEMM peak" % (
              lat["strategy"], 20, lat["latency_ms_p50"], lat["nodes_mean"], lat["heights_mean"],
              lat["aten_ops_per_call"], 1e3 * lat["latency_ms_p50"] / lat["aten_ops_per_call"],
              lat["flops_per_call"] / 1e6, 1e3 * lat["flops_per_call"] / peak))


if __name__ == "__main__":
    main()
