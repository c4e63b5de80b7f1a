"""Shared Chainer plumbing for both families.

Device and thread setup, the parameter ``Chain``, the optimisers with the
suite's constants, the masked cross-entropy, eager training steps, and the
measurement helpers.

A subclass supplies the model:

* ``_build()``: create ``self.model`` (a ``chainer.Chain`` holding the native
  parameters) and return the names of native parameters that must stay frozen
  (a framework's second bias, held at zero);
* ``_load_native(params)`` / ``_canonical(read)``: the one place where the
  canonical layout is converted to and from the native one (``read(param)``
  gives a parameter's array or its gradient, so values and gradients share the
  conversion);
* ``prepare(batch)`` and ``_forward(prepared) -> (rows [R, C] logits, labels int32[R])``
  for the loss, ``_logits(prepared) -> [B, C]``.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

import chainer
import chainer.functions as F

from bench.interface import ADAGRAD, ADAM, DeviceUnavailable, Implementation

from . import NOT_APPLICABLE

_BLAS_LIMIT = {}


class _AdaGradRule(chainer.optimizers.ada_grad.AdaGradRule):
    """Chainer's AdaGrad rule with the accumulator starting at ADAGRAD['initial_accumulator'].

    Chainer's own rule starts it at zero; the update itself is unchanged:
    ``h += g^2; p -= lr * g / (sqrt(h) + eps)`` (eps outside the root).
    """

    def init_state(self, param):
        super().init_state(param)
        self.state["h"].fill(ADAGRAD["initial_accumulator"])


class _AdaGrad(chainer.optimizers.AdaGrad):
    def create_update_rule(self):
        return _AdaGradRule(self.hyperparam)


def make_optimizer(cfg):
    """The optimiser named by cfg with the suite's shared constants.

    Chainer's Adam puts eps on the raw second moment after folding the bias
    corrections into the step size (``alpha_t = lr sqrt(1-b2^t)/(1-b1^t)``,
    ``p -= alpha_t m / (sqrt(v) + eps)``), as Keras and MXNet do; the paper's
    form differs only in how eps scales (negligible at eps = 1e-8).
    """
    if cfg.optimizer == "sgd":
        return chainer.optimizers.SGD(lr=cfg.lr)
    if cfg.optimizer == "adam":
        return chainer.optimizers.Adam(alpha=cfg.lr, beta1=ADAM["beta1"], beta2=ADAM["beta2"],
                                       eps=ADAM["eps"])
    if cfg.optimizer == "adagrad":
        return _AdaGrad(lr=cfg.lr, eps=ADAGRAD["eps"])
    raise ValueError("unknown optimizer %r" % cfg.optimizer)


def masked_xent(logits, labels: np.ndarray, count: int):
    """Mean softmax cross-entropy over rows with label >= 0.

    logits Variable[R, C], labels int32[R] (device array), count =
    ``bench.targets.labelled_count(labels)`` (a host int, so no device round trip)
    -> Variable[]. Chainer's ``normalize`` would divide on the device and gives 0/0
    on the GPU when no row is labelled; the count is never 0.
    """
    per_row = F.softmax_cross_entropy(logits, labels, ignore_label=-1, reduce="no")
    return F.sum(per_row) * np.float32(1.0 / count)


class ChainerImplementation(Implementation):
    framework = "chainer"
    not_applicable = NOT_APPLICABLE
    # chainer.optimizer_hooks.WeightDecay on every trained parameter's update rule: a 'pre'
    # hook, ``g += rate * p`` before the rule's update (coupled L2); built in load_params
    weight_decay_refusal = None

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.xp = self.dev.xp
        self.model: Optional[chainer.Chain] = None
        self._frozen = self._build()
        self.model.to_device(self.dev)
        self._opt = None

    # --- framework hooks (bench.interface) ---
    def apply_threads(self, threads):
        """Cap NumPy's BLAS pool (Chainer computes with NumPy on the CPU; it has no knob of its own).

        The runner sets OMP_NUM_THREADS and friends before the process starts;
        threadpoolctl also covers an interactive process where they were not set.
        """
        out = {"chainer_threads": "none (NumPy/BLAS does the work)"}
        try:
            from threadpoolctl import threadpool_info, threadpool_limits
        except ImportError:
            out["blas_threads"] = "threadpoolctl not installed; OMP_NUM_THREADS applies"
            return out
        _BLAS_LIMIT["ctl"] = threadpool_limits(limits=int(threads), user_api="blas")
        out["blas_threads"] = [[i.get("internal_api"), i.get("num_threads")] for i in threadpool_info()]
        return out

    def pick_device(self, device):
        if device == "gpu":
            from chainer.backends import cuda
            if not cuda.available:
                raise DeviceUnavailable("Chainer has no GPU here (CuPy is not installed or finds no "
                                        "CUDA device)")
            return chainer.get_device("@cupy:0")
        return chainer.get_device("@numpy")

    # --- parameters (the subclass's model hooks: see the module doc) ---
    def _native(self) -> Dict[str, chainer.Parameter]:
        return dict(self.model.namedparams())

    def _set(self, param: chainer.Parameter, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, np.float32)
        if tuple(param.shape) != value.shape:
            raise ValueError("native parameter %s is %s, got %s" % (param.name, param.shape, value.shape))
        param.array[...] = self.dev.send(value)

    def load_params(self, params):
        self._load_native(self._checked(params))
        self.model.cleargrads()
        self._opt = make_optimizer(self.cfg)
        self._opt.setup(self.model)
        native = self._native()
        for name in self._frozen:
            # the second bias of a two-bias layer stays zero: only the first one is b
            native[name].update_rule.enabled = False
        if self.cfg.weight_decay:
            for name, param in native.items():
                if name not in self._frozen:
                    param.update_rule.add_hook(
                        chainer.optimizer_hooks.WeightDecay(float(self.cfg.weight_decay)))

    def export_params(self):
        return self._canonical(lambda p: _host(p.array))

    def _grads(self):
        return self._canonical(lambda p: np.zeros(p.shape, np.float32) if p.grad is None
                               else _host(p.grad))

    # --- work ---
    def _loss(self, prepared):
        rows, labels, count = self._forward(prepared)
        return masked_xent(rows, labels, count)

    def logits(self, prepared):
        with chainer.no_backprop_mode(), chainer.using_config("train", False):
            return self._logits(prepared).array

    def loss_and_grads(self, prepared):
        self.model.cleargrads()
        loss = self._loss(prepared)
        loss.backward()
        return float(_host(loss.array)), {k: np.asarray(v, np.float32)
                                          for k, v in self._grads().items()}

    def train_step(self, prepared):
        self.model.cleargrads()
        loss = self._loss(prepared)
        loss.backward()
        self._opt.update()
        return loss.array

    def sync(self):
        # NumPy work is done when a call returns; CuPy queues kernels on a stream
        if self.device == "gpu":
            self.dev.device.synchronize()

    def to_numpy(self, value):
        if isinstance(value, chainer.Variable):
            value = value.array
        return _host(value)

    def info(self):
        return {"threads": self.thread_info, "type_check": bool(chainer.config.type_check),
                "device": str(self.dev)}

    def gemm_ops(self, n):
        rng = np.random.default_rng(0)
        a = self.dev.send(rng.standard_normal((n, n)).astype(np.float32))
        b = self.dev.send(rng.standard_normal((n, n)).astype(np.float32))

        def product():
            with chainer.no_backprop_mode():
                return F.matmul(a, b)
        return product, (lambda out: self.sync())

def _host(array) -> np.ndarray:
    return np.asarray(chainer.backend.CpuDevice().send(array))


def linear_weight(value: np.ndarray) -> np.ndarray:
    """Canonical ``x @ W`` weight (in, out) -> ``F.linear``'s (out, in), and back (it is a transpose)."""
    return np.ascontiguousarray(value.T)
