"""torch ``fused`` against ``plain`` (and any other RNN strategy) in one process, rounds
alternating, on the quick cell's pool (SST, batch 25, the harness's bucketed draw, 2 threads):
training examples per second, median of 8 rounds of 3 pool passes. Separate cell processes
on a shared 2-core machine differ by more than the strategies do; this is the paired view.

Run from the repository root:
``PYTHONPATH=. python results/2026-12-01-speed/rnn_layer_ab.py lstm fused plain``
"""

import sys
import time

import numpy as np
import torch

from bench import registry
from bench.batches import batch_examples, make_batch
from bench.cell import model_config
from bench.config import CellConfig
from bench.params import init_params
from bench.tasks import load_task


def main():
    torch.set_num_threads(2)
    model, strategies = sys.argv[1], sys.argv[2:]
    dataset = load_task("sst", seed=0)
    groups = batch_examples(dataset.train, 25, seed=0, bucket=True, drop_last=True)[:5]
    pool = [make_batch("rnn", g) for g in groups]
    impls = {}
    for s in strategies:
        mcfg = model_config(CellConfig("torch", model, s), dataset)
        impl = registry.load("torch", model)(mcfg, s, "cpu", 2)
        impl.batch_size = 25
        impl.load_params(init_params(mcfg, 0))
        impls[s] = (impl, [impl.prepare(b) for b in pool])
    rates = {s: [] for s in impls}
    n = sum(b.size for b in pool)
    for _ in range(8):
        for s, (impl, ready) in impls.items():
            t0 = time.perf_counter()
            for _ in range(3):
                for r in ready:
                    impl.train_step(r)
            impl.sync()
            rates[s].append(3 * n / (time.perf_counter() - t0))
    for s, v in rates.items():
        print("%s %s train ex/s: median %.0f (min %.0f, max %.0f)"
              % (model, s, np.median(v), min(v), max(v)))


if __name__ == "__main__":
    main()
