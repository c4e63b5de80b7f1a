"""Shared by the NumPy RNN and RvNN classes: the reference, in float32."""

from __future__ import annotations

import numpy as np

from bench import reference
from bench.interface import DeviceUnavailable, Implementation

from . import NOT_APPLICABLE


class NumpyReference(Implementation):
    framework = "numpy"
    trains = False  # the reference has no optimiser: its cells time inference only
    not_applicable = NOT_APPLICABLE

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.params = None

    def pick_device(self, device):
        if device != "cpu":
            raise DeviceUnavailable("numpy runs on the CPU only")
        return device

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

    def gemm_ops(self, n):
        from bench.flops import numpy_gemm_ops
        return numpy_gemm_ops(n)
