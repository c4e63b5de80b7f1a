"""Matrix-multiply FLOPs of one forward pass, counted from the batch's real tokens and nodes.

Only the matmuls are counted (elementwise work is small next to them at
hidden 150); padding is not counted, so a strategy that computes on padding
gets no credit for it. A training step is counted as 3x the forward pass
(forward, and two matmuls per matmul in backward).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .batches import SeqBatch, TreeBatch
from .params import ModelConfig


def forward_flops(cfg: ModelConfig, batch) -> int:
    D, H, C = cfg.embed_dim, cfg.hidden, cfg.num_classes
    out = 2 * H * C * batch.size
    if isinstance(batch, SeqBatch):
        gates = 1 if cfg.model == "elman" else 4
        return out + batch.num_tokens * 2 * (D + H) * gates * H
    if isinstance(batch, TreeBatch):
        leaves = batch.num_tokens
        internal = batch.num_nodes - leaves
        leaf_w, node_w = (1, 1) if cfg.model == "rvnn" else (3, 5)
        if cfg.loss_mode == "all":
            out = 2 * H * C * batch.num_nodes
        return out + leaves * 2 * D * leaf_w * H + internal * 2 * (2 * H) * node_w * H
    raise TypeError("unknown batch type %s" % type(batch).__name__)


def train_flops(cfg: ModelConfig, batch) -> int:
    return 3 * forward_flops(cfg, batch)


# --- GEMM peak: one timing loop for every framework and for the machine probe ---

GEMM_N = 512
GEMM_REPEATS = 10
GEMM_MIN_REPEAT_S = 5e-3   # a repeat runs products back to back at least this long


def time_gemm(product, finish, n: int = GEMM_N, repeats: int = GEMM_REPEATS) -> float:
    """Achieved FLOP/s of an n x n x n float32 product, the median of ``repeats`` repeats.

    ``product()`` queues one product and returns its result; ``finish(result)`` waits until
    it is computed (a no-op where calls are synchronous). A repeat queues enough products back
    to back to last ``GEMM_MIN_REPEAT_S`` and waits for the last one, so that a dispatch or a
    device round trip is a small part of it. Every framework's ``gemm_flops`` and the
    machine probe (``machine_gemm_flops``) time through here, so their figures are alike.
    """
    finish(product())                     # first call: allocation, kernel choice, compile
    t0 = time.perf_counter()
    finish(product())
    inner = max(1, int(math.ceil(GEMM_MIN_REPEAT_S / max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = product()
        finish(out)
        times.append((time.perf_counter() - t0) / inner)
    return 2.0 * n ** 3 / float(np.median(times))


def numpy_gemm_ops(n: int = GEMM_N):
    """(product, finish) for NumPy's float32 matmul (the machine's BLAS)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    return (lambda: a @ b), (lambda out: None)


def machine_gemm_flops(threads: int, n: int = GEMM_N, repeats: int = GEMM_REPEATS) -> float:
    """The machine's float32 GEMM rate at ``threads`` threads, as this process's NumPy BLAS
    reaches it. Run it in a process whose thread environment is ``thread_env(threads)``
    (``python -m bench gemm``); here the BLAS pool is also capped where threadpoolctl is
    installed."""
    from .environment import limit_blas_threads
    limit_blas_threads(threads)
    return time_gemm(*numpy_gemm_ops(n), n=n, repeats=repeats)
