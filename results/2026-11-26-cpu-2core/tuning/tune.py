"""Dev-set search for the tuned parity variant (issue 20): one (model, task, optimiser, lr,
weight decay) per call, trained with the harness's own pieces (the same parameter init,
batch order and optimiser step as a parity cell's accuracy budget), with dev and test root
accuracy after every epoch. Selection uses dev only; test is recorded so that the final runs
can be checked against it, never to choose.

    PYTHONPATH=. python results/2026-11-26-cpu-2core/tuning/tune.py --model treelstm --task sst \
        --lr 2e-3 --weight-decay 1e-4 --seed 0 --epochs 8 >> results/2026-11-26-cpu-2core/tuning/search.jsonl
"""

import argparse
import json
import math
import os
import sys
import time

from bench import registry
from bench.batches import batch_examples, make_batch
from bench.cell import root_accuracy
from bench.environment import limit_blas_threads
from bench.params import ModelConfig, family, init_params
from bench.tasks import load_task


def accuracy(impl, fam, examples, batch_size):
    """Root accuracy %, scored as a parity cell scores it (bench.cell.root_accuracy)."""
    return 100.0 * root_accuracy(impl, fam, examples, batch_size)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--framework", default="torch")
    p.add_argument("--strategy", default=None)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    fam = family(a.model)
    strategy = a.strategy or ("levels" if fam == "rvnn" else "fused")
    loss_mode = "all" if fam == "rvnn" else "root"
    data = load_task(a.task, seed=0)
    mcfg = ModelConfig(a.model, vocab_size=len(data.vocab), embed_dim=100, hidden=150,
                       num_classes=data.num_classes, loss_mode=loss_mode, optimizer=a.optimizer,
                       lr=a.lr, weight_decay=a.weight_decay)
    impl = registry.load(a.framework, a.model)(mcfg, strategy, "cpu", a.threads)
    limit_blas_threads(a.threads)
    impl.load_params(init_params(mcfg, a.seed))
    steps_per_epoch = math.ceil(len(data.train) / a.batch_size)
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        for group in batch_examples(data.train, a.batch_size, seed=a.seed * 1000 + epoch):
            impl.train_step(impl.prepare(make_batch(fam, group)))
        impl.sync()
        row = {"framework": a.framework, "strategy": strategy, "model": a.model, "task": a.task,
               "optimizer": a.optimizer, "lr": a.lr, "weight_decay": a.weight_decay,
               "seed": a.seed, "batch_size": a.batch_size, "epoch": epoch + 1,
               "steps": (epoch + 1) * steps_per_epoch,
               "dev": accuracy(impl, fam, data.splits["dev"], a.batch_size),
               "test": accuracy(impl, fam, data.splits["test"], a.batch_size),
               "train_s": round(time.perf_counter() - t0, 1),
               "load_avg_1m": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
