"""Shared by the NumPy RNN and RvNN classes: the reference, in float32."""

from __future__ import annotations

import time

import numpy as np

from bench import reference
from bench.interface import DeviceUnavailable, Implementation, refuse_not_applicable

from . import NOT_APPLICABLE


class NumpyReference(Implementation):
    framework = "numpy"
    trains = False  # the reference has no optimiser: its cells time inference only

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        refuse_not_applicable(NOT_APPLICABLE, cfg.model, strategy)
        if device != "cpu":
            raise DeviceUnavailable("numpy runs on the CPU only")
        self.params = None

    def load_params(self, params):
        self.params = self._checked(params)

    def export_params(self):
        return {k: v.copy() for k, v in self.params.items()}

    def logits(self, prepared):
        return reference.logits(self.cfg, self.params, prepared, np.float32)

    def loss_and_grads(self, prepared):
        loss, grads = reference.loss_and_grads(self.cfg, self.params, prepared, np.float32)
        return loss, {k: v.astype(np.float32) for k, v in grads.items()}

    def train_step(self, prepared):
        raise NotImplementedError("numpy cells are inference only (no optimiser)")

    def info(self):
        try:
            from threadpoolctl import threadpool_info
        except ImportError:
            return {}
        return {"blas_threads": [[i.get("internal_api"), i.get("num_threads")]
                                 for i in threadpool_info()]}

    def gemm_flops(self, n=512, repeats=10):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n)).astype(np.float32)
        b = rng.standard_normal((n, n)).astype(np.float32)
        a @ b
        best = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best.append(time.perf_counter() - t0)
        return 2.0 * n ** 3 / float(np.median(best))
