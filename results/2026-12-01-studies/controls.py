"""A control for the readout study: what the frozen embeddings alone give a ridge readout.

Features: the mean of the example's frozen embedding rows (the canonical init of each seed:
E ~ N(0, 0.1), 100 dimensions), no recurrence or composition at all. The same ridge fit and
alpha grid as the readout cells (bench.readout), alpha chosen on dev, accuracy on test.
Run from the repository root: python results/2026-12-01-studies/controls.py
"""

import numpy as np

from bench import readout
from bench.params import ModelConfig, init_params
from bench.tasks import load_task

for task in ("sst", "sst2", "listops"):
    ds = load_task(task)
    scores = []
    for seed in (0, 1, 2):
        cfg = ModelConfig("elman", vocab_size=len(ds.vocab), embed_dim=100, hidden=150,
                          num_classes=ds.num_classes)
        E = init_params(cfg, seed)["E"].astype(np.float64)

        def feats(split):
            exs = [e for e in ds.splits[split] if e.label >= 0]
            return (np.stack([E[list(e.tokens)].mean(axis=0) for e in exs]),
                    np.array([e.label for e in exs]))

        (xt, yt), (xd, yd), (xs, ys) = feats("train"), feats("dev"), feats("test")
        fit = readout.fit_readout(xt, yt, xd, yd, ds.num_classes)
        scores.append((fit["dev"], readout.accuracy(xs, ys, fit["W"], fit["b"])))
    dev, test = np.array(scores).T
    print("%-8s mean of frozen embeddings: dev %.1f ± %.1f, test %.1f ± %.1f (3 seeds)"
          % (task, 100 * dev.mean(), 100 * dev.std(ddof=1), 100 * test.mean(), 100 * test.std(ddof=1)))
