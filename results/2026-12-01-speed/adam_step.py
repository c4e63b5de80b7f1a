"""Seconds of one torch Adam step over the quick cell's Tree-LSTM parameters (SST vocabulary
21701 x embed 100, hidden 150): torch's default for-loop implementation, foreach, and fused.

Why ``impls/torch_impl/common.make_optimizer`` asks for ``fused=True``: the update is the same
(the last check prints the largest difference after five steps with weight decay), while the
default makes several passes over the [V, D] embedding. Rounds alternate the three, medians of 15.

Run: ``python results/2026-12-01-speed/adam_step.py`` (2 threads, as the quick preset).
"""

import time

import numpy as np
import torch

SHAPES = [(21701, 100), (100, 450), (450,), (300, 750), (750,), (150, 5), (5,)]


def optimiser(**kw):
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    return torch.optim.Adam(params, lr=1e-3, **kw)


def main():
    torch.set_num_threads(2)
    opts = {"default": optimiser(), "foreach": optimiser(foreach=True),
            "fused": optimiser(fused=True)}
    times = {k: [] for k in opts}
    for _ in range(15):
        for k, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print("%-8s %.2f ms (min %.2f, max %.2f)" % (k, 1e3 * np.median(v), 1e3 * min(v),
                                                     1e3 * max(v)))
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(1000))
    b = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.Adam([a], lr=1e-3, weight_decay=1e-4)
    ob = torch.optim.Adam([b], lr=1e-3, weight_decay=1e-4, fused=True)
    for _ in range(5):
        g = torch.randn(1000)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    print("largest difference after 5 steps: %.3g" % float((a - b).detach().abs().max()))


if __name__ == "__main__":
    main()
