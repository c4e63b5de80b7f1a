"""Shared MXNet (Gluon) plumbing for both families.

Thread and device setup, parameters as ``gluon.Parameter``s, the optimisers
(through ``gluon.Trainer``) with the suite's constants, the masked
cross-entropy, imperative training steps under ``autograd.record``, and the
measurement helpers.

A subclass supplies the model:

* ``_build()``: create the native parameters (``self._params``: native name ->
  ``gluon.Parameter``) and return the native names that stay frozen (a fused
  layer's second bias, held at zero);
* ``_load_native(params)`` / ``_canonical(read)``: the one place where the
  canonical layout is converted to and from the native one (``read(name)``
  gives a native parameter's array or gradient as NumPy);
* ``prepare(batch)``, ``_forward(prepared) -> (logits rows NDArray[R, C], prepared
  labels)`` for the loss, and ``_logits(prepared) -> NDArray[B, C]``.

MXNet is asynchronous: every call returns as soon as its operators are queued;
``sync`` waits for the engine.
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon, nd

from bench.interface import ADAGRAD, ADAM, DeviceUnavailable, Implementation
from bench.targets import labelled_count

from . import NOT_APPLICABLE


class _AdaGrad(mx.optimizer.AdaGrad):
    """MXNet's AdaGrad with the accumulator starting at ADAGRAD['initial_accumulator'].

    MXNet's own starts it at zero; the update is unchanged:
    ``h += g^2; p -= lr * g / sqrt(h + eps)`` (eps inside the root).
    """

    def create_state(self, index, weight):
        return nd.full(weight.shape, ADAGRAD["initial_accumulator"], ctx=weight.context,
                       dtype=weight.dtype)


def make_optimizer(cfg):
    """The optimiser named by cfg with the suite's shared constants (no weight decay, no clipping).

    MXNet's Adam folds the bias corrections into the step size
    (``lr_t = lr sqrt(1-b2^t)/(1-b1^t)``, ``p -= lr_t m / (sqrt(v) + eps)``),
    as Keras and Chainer do.
    """
    if cfg.optimizer == "sgd":
        return mx.optimizer.SGD(learning_rate=cfg.lr, momentum=0.0, wd=0.0)
    if cfg.optimizer == "adam":
        return mx.optimizer.Adam(learning_rate=cfg.lr, beta1=ADAM["beta1"], beta2=ADAM["beta2"],
                                 epsilon=ADAM["eps"], wd=0.0)
    if cfg.optimizer == "adagrad":
        return _AdaGrad(learning_rate=cfg.lr, eps=ADAGRAD["eps"], wd=0.0)
    raise ValueError("unknown optimizer %r" % cfg.optimizer)


class Labels:
    """Classification targets on the device: safe int labels (-1 -> 0), a 0/1 mask and
    1 / ``bench.targets.labelled_count``.

    All float32 NDArrays of shape [R] (``scale`` is [1]) so a hybridized graph can take them.
    """

    def __init__(self, labels: np.ndarray, ctx):
        keep = labels >= 0
        self.safe = nd.array(np.where(keep, labels, 0), ctx=ctx, dtype="float32")
        self.keep = nd.array(keep, ctx=ctx, dtype="float32")
        self.scale = nd.array([1.0 / labelled_count(labels)], ctx=ctx, dtype="float32")


def masked_xent(F, logits, safe, keep, scale):
    """Mean softmax cross-entropy over the rows with keep = 1: logits [R, C] -> [1]."""
    picked = F.pick(F.log_softmax(logits, axis=-1), safe, axis=-1)
    return F.broadcast_mul(F.sum(picked * keep, keepdims=True).reshape((1,)), -scale)


class MXNetImplementation(Implementation):
    framework = "mxnet"
    not_applicable = NOT_APPLICABLE
    # Coupled L2 added to each trained parameter's gradient before ``Trainer.step``, the
    # optimisers keeping wd=0: MXNet's own ``wd`` is coupled for SGD and Adam but not for
    # AdaGrad (1.9: ``history += g^2; w += (g / sqrt(history + eps) + wd * w) * -lr``).
    weight_decay_refusal = None

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self._params: "OrderedDict[str, gluon.Parameter]" = OrderedDict()
        frozen = set(self._build())
        for name, p in self._params.items():
            if name in frozen:
                p.grad_req = "null"
            if p._data is None:
                p.initialize(init=mx.init.Zero(), ctx=self.dev)
        self._trainable = [p for name, p in self._params.items() if name not in frozen]
        self._trainer = None

    # --- framework hooks (bench.interface); self.dev is the mx.Context ---
    def apply_threads(self, threads):
        """Set MXNet's OpenMP pool to ``threads`` (valid at any time) and report the engine's setting."""
        applied = None
        if hasattr(mx.base._LIB, "MXSetNumOMPThreads"):
            mx.base.check_call(mx.base._LIB.MXSetNumOMPThreads(ctypes.c_int(int(threads))))
            applied = int(threads)
        return {"omp_threads": applied,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "engine_worker_threads": os.environ.get("MXNET_CPU_WORKER_NTHREADS", "1 (default)"),
                "engine": os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice (default)")}

    def pick_device(self, device):
        if device == "gpu":
            if mx.context.num_gpus() == 0:
                raise DeviceUnavailable("MXNet sees no GPU (a CPU build of mxnet, or no CUDA device)")
            return mx.gpu(0)
        return mx.cpu()

    # --- parameters (the subclass's model hooks: see the module doc) ---
    def _new_param(self, name, shape):
        p = gluon.Parameter(name, shape=tuple(shape), dtype="float32", init=mx.init.Zero())
        self._params[name] = p
        return p

    def _w(self, name):
        """A native parameter's current NDArray (recorded by autograd when its grad is attached)."""
        return self._params[name].data(self.dev)

    def _set(self, name, value):
        p = self._params[name]
        value = np.ascontiguousarray(value, np.float32)
        if tuple(p.shape) != value.shape:
            raise ValueError("native parameter %s is %s, got %s" % (name, p.shape, value.shape))
        p.set_data(nd.array(value, ctx=self.dev, dtype="float32"))

    def load_params(self, params):
        self._load_native(self._checked(params))
        # a new Trainer: fresh optimiser state (Adam moments, AdaGrad sums, step count)
        self._trainer = gluon.Trainer(self._trainable, make_optimizer(self.cfg), kvstore=None)

    def export_params(self):
        return self._canonical(lambda name: self._params[name].data(self.dev).asnumpy())

    # --- work ---
    def _loss(self, prepared):
        rows, y = self._forward(prepared)
        return masked_xent(nd, rows, y.safe, y.keep, y.scale)

    def logits(self, prepared):
        return self._logits(prepared)

    def loss_and_grads(self, prepared):
        with autograd.record():
            loss = self._loss(prepared)
        loss.backward()
        grads = self._canonical(lambda name: self._params[name].grad(self.dev).asnumpy())
        return float(loss.asscalar()), {k: np.asarray(v, np.float32) for k, v in grads.items()}

    def train_step(self, prepared):
        with autograd.record():
            loss = self._loss(prepared)
        loss.backward()
        wd = self.cfg.weight_decay
        if wd:
            for p in self._trainable:
                g = p.grad(self.dev)
                g += wd * p.data(self.dev)
        self._trainer.step(1)  # the loss is already a mean: no 1/batch rescaling
        return loss

    def sync(self):
        nd.waitall()

    def to_numpy(self, value):
        if isinstance(value, nd.NDArray):
            return value.asnumpy()
        return np.asarray(value)

    def info(self):
        return {"threads": self.thread_info, "context": str(self.dev)}

    def gemm_ops(self, n):
        rng = np.random.default_rng(0)
        a = nd.array(rng.standard_normal((n, n)), ctx=self.dev, dtype="float32")
        b = nd.array(rng.standard_normal((n, n)), ctx=self.dev, dtype="float32")
        return (lambda: nd.dot(a, b)), (lambda out: out.wait_to_read())

def linear_weight(value: np.ndarray) -> np.ndarray:
    """Canonical ``x @ W`` weight (in, out) <-> ``FullyConnected``'s (out, in) (a transpose)."""
    return np.ascontiguousarray(value.T)


def split_list(x, num, axis):
    """nd/sym split that always returns a list (MXNet returns a bare array when num == 1)."""
    if num == 1:
        return [x.squeeze(axis=axis)] if axis == 0 else [x]
    return list(x.split(num_outputs=num, axis=axis, squeeze_axis=(axis == 0)))
