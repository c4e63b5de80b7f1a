"""Shared by the Paddle RNN and RvNN classes: device, threads, parameters, loss, optimiser.

A subclass builds a ``paddle.nn.Layer`` holding its native parameters and
supplies three things:

* ``_native_layout() -> {native name: canonical name or None}`` and the two
  converters ``_to_native`` / ``_to_canonical`` (the only place where the
  canonical layout meets a framework layout);
* ``_hidden_points(prepared) -> [M, H]``: hidden states at the classified points;
* ``prepare(batch)``.

Loss: ``mean_xent(logits [M, C], labels int64[M], weights float32[M])`` with
``weights`` of ``bench.targets.loss_weights`` precomputed in ``prepare``, so
ignored points cost nothing and the mean divides by the labelled count.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Dict

import numpy as np

from bench.interface import ADAGRAD, ADAM, DeviceUnavailable, Implementation
from bench.targets import loss_weights

from . import NOT_APPLICABLE

def mean_xent(logits, labels, weights):
    """Weighted sum of -log softmax at the label: the mean over labelled rows (a scalar)."""
    import paddle
    import paddle.nn.functional as F
    logp = F.log_softmax(logits, axis=-1)
    picked = paddle.take_along_axis(logp, labels.unsqueeze(-1), axis=-1).squeeze(-1)
    return -(picked * weights).sum()


def make_optimizer(cfg, parameters):
    """paddle.optimizer for cfg.optimizer with the suite's shared hyper-parameters.

    Paddle's Adam applies eps as ``eps * sqrt(1 - beta2^t)`` on the raw second
    moment, which is the paper's ``m_hat / (sqrt(v_hat) + eps)``; Adagrad puts
    eps outside the square root, as the suite specifies.

    Weight decay: a float ``weight_decay=`` is ``L2Decay(coeff)``, which the optimiser
    adds to each gradient before its update (``grad + coeff * param``: coupled L2;
    AdamW is the decoupled one). At 0 none is given, as before.
    """
    import paddle
    wd = float(cfg.weight_decay) or None
    if cfg.optimizer == "sgd":
        return paddle.optimizer.SGD(learning_rate=cfg.lr, parameters=parameters,
                                    weight_decay=wd)
    if cfg.optimizer == "adam":
        return paddle.optimizer.Adam(learning_rate=cfg.lr, beta1=ADAM["beta1"],
                                     beta2=ADAM["beta2"], epsilon=ADAM["eps"],
                                     parameters=parameters, weight_decay=wd)
    if cfg.optimizer == "adagrad":
        return paddle.optimizer.Adagrad(learning_rate=cfg.lr, epsilon=ADAGRAD["eps"],
                                        initial_accumulator_value=ADAGRAD["initial_accumulator"],
                                        parameters=parameters, weight_decay=wd)
    raise ValueError("unknown optimizer %r" % cfg.optimizer)


def param_layer(shapes: Dict[str, tuple], sublayers: Dict = None):
    """A ``paddle.nn.Layer`` with one float32 parameter per (name, shape), plus sublayers.

    Values are always loaded afterwards (``load_params``), so they start at zero.
    """
    import paddle

    layer = paddle.nn.Layer()
    for name, shape in shapes.items():
        p = layer.create_parameter(list(shape), dtype="float32",
                                   default_initializer=paddle.nn.initializer.Constant(0.0))
        layer.add_parameter(name, p)
    for name, sub in (sublayers or {}).items():
        layer.add_sublayer(name, sub)
    return layer


def static_layer(params, body):
    """A Layer whose forward is ``body(params, *inputs)``, converted by ``paddle.jit.to_static``."""
    import paddle

    class Static(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.params = params

        def forward(self, inputs):  # to_static takes no *args: one tuple of tensors
            return body(self.params, *inputs)

    compiled = paddle.jit.to_static(Static(), full_graph=True)

    def call(*inputs):
        return compiled(tuple(inputs))

    call.layer = compiled
    return call


class PaddleImplementation(Implementation):
    framework = "paddle"
    not_applicable = NOT_APPLICABLE

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.layer = self._build()
        self.opt = None
        self.calls: Counter = Counter()
        self._last = None
        self._static_fns = {}  # name -> paddle.jit.to_static function (compiled strategies)

    # --- framework hooks (bench.interface) ---
    def apply_threads(self, threads):
        """Size Paddle's CPU math pool; returns what was applied."""
        import paddle
        from paddle.base import core
        # The math library's pool is process-wide; the first request decides and
        # a later different one is applied again (it is a plain setter).
        core.set_num_threads(int(threads))
        # to_static programs run on Paddle's PIR interpreter, which by default
        # dispatches ops to its own worker threads on top of the math library's
        # pool; serial mode keeps them in the calling thread, so ``threads`` is
        # closer to the truth (and the blocks ran faster for it here).
        paddle.set_flags({"FLAGS_new_executor_serial_run": True})
        return dict(requested=int(threads), math_library_threads=int(threads),
                    how="paddle.base.core.set_num_threads(%d); "
                        "FLAGS_new_executor_serial_run=True" % threads,
                    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
                    MKL_NUM_THREADS=os.environ.get("MKL_NUM_THREADS"))

    def pick_device(self, device):
        """Select the Paddle device (process-wide: ``paddle.set_device``)."""
        import paddle
        if device == "gpu":
            if not paddle.device.is_compiled_with_cuda():
                raise DeviceUnavailable("this paddlepaddle wheel is the CPU build (not compiled "
                                        "with CUDA)")
            if paddle.device.cuda.device_count() < 1:
                raise DeviceUnavailable("paddle sees no CUDA device")
            paddle.set_device("gpu:0")
            return "gpu:0"
        paddle.set_device("cpu")
        return "cpu"

    # --- subclass hooks ---
    def _build(self):
        """A paddle.nn.Layer holding every native parameter."""
        raise NotImplementedError

    def _to_native(self, canonical: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Native parameter name -> value (default: the same names)."""
        return dict(canonical)

    def _to_canonical(self, native: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Inverse of ``_to_native``; also maps gradients (given zeros for ``frozen``)."""
        return dict(native)

    def _hidden_points(self, prepared):
        """Hidden states [M, H] at the classified points of ``prepared``."""
        raise NotImplementedError

    # --- parameters ---
    def _params(self):
        return dict(self.layer.named_parameters())

    frozen = ()  # native names held constant: differentiated through, never updated
    weight_decay_refusal = None   # the optimiser's L2Decay (make_optimizer), from load_params

    def _trainable(self):
        return [p for n, p in self._params().items() if n not in self.frozen]

    def load_params(self, params):
        native = self._to_native(self._checked(params))
        current = self._params()
        if set(native) != set(current):
            raise AssertionError("native layout mismatch: %s vs %s"
                                 % (sorted(native), sorted(current)))
        for name, p in current.items():
            p.set_value(np.ascontiguousarray(native[name], np.float32))
        self.opt = make_optimizer(self.cfg, self._trainable())

    def export_params(self):
        out = self._to_canonical({n: np.array(p.numpy(), np.float32)
                                  for n, p in self._params().items()})
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    # --- work ---
    def _logits_of(self, prepared):
        h = self._hidden_points(prepared)
        return h @ self.layer.W_o + self.layer.b_o

    def _loss(self, prepared):
        return mean_xent(self._logits_of(prepared), prepared["labels"], prepared["weights"])

    def logits(self, prepared):
        import paddle
        with paddle.no_grad():
            out = self._logits_of(prepared)
        self._last = out
        return out

    def loss_and_grads(self, prepared):
        loss = self._loss(prepared)
        loss.backward()
        grads = {}
        for name, p in self._params().items():
            g = p.grad
            grads[name] = (np.zeros(p.shape, np.float32) if g is None or name in self.frozen
                           else np.array(g.numpy(), np.float32))
        self.layer.clear_gradients()
        return float(loss.numpy()), self._to_canonical(grads)

    def train_step(self, prepared):
        loss = self._loss(prepared)
        loss.backward()
        self.opt.step()
        self.layer.clear_gradients()  # frozen parameters' gradients too
        self._last = loss
        return loss

    def sync(self):
        import paddle
        if self.device == "gpu":
            paddle.device.synchronize()
        elif self._last is not None:
            # Eager CPU kernels run synchronously; reading back a scalar also
            # waits for anything still queued.
            np.asarray(self._last.numpy())

    def to_numpy(self, value):
        if hasattr(value, "numpy"):
            return np.asarray(value.numpy())
        return np.asarray(value)

    def _tensor(self, array, dtype):
        import paddle
        return paddle.to_tensor(np.ascontiguousarray(array, dtype=dtype))

    def _targets(self, labels):
        safe, weights = loss_weights(labels, np.int64)
        return {"labels": self._tensor(safe, np.int64), "weights": self._tensor(weights, np.float32)}

    # --- compiled strategies ---
    def _static(self, name, fn):
        """``fn(layer, *tensors)`` under ``paddle.jit.to_static``, built once.

        to_static converts only ``nn.Layer`` methods or free functions, so the
        body runs as the ``forward`` of a small Layer owning the parameters;
        Paddle keeps one program per distinct input shape. Its cache does not
        key on grad mode, and a program first traced under ``no_grad`` later
        drops the embedding's gradient (seen in 3.3.1), so inference and
        training get separate programs.
        """
        import paddle
        name += "" if paddle.is_grad_enabled() else ":no_grad"
        if name not in self._static_fns:
            self._static_fns[name] = static_layer(self.layer, fn)
        return self._static_fns[name]

    # --- measurement helpers ---
    def device_peak_bytes(self):
        if self.device != "gpu":
            return None
        import paddle
        return int(paddle.device.cuda.max_memory_allocated())

    def info(self):
        import paddle
        out = {
            "paddle_version": paddle.__version__,
            "device": paddle.get_device(),
            "threads": dict(self.thread_info),
            "calls": dict(self.calls),
        }
        try:
            from threadpoolctl import threadpool_info
            out["threadpools"] = [[i.get("internal_api"), i.get("num_threads")]
                                  for i in threadpool_info()]
        except ImportError:
            pass
        if self._static_fns:
            out["static_programs"] = {}
            for name, fn in self._static_fns.items():
                try:
                    out["static_programs"][name] = len(fn.layer.forward.program_cache)
                except Exception:  # the cache's API is internal; its absence is not an error
                    out["static_programs"][name] = None
        return out

    def gemm_ops(self, n):
        import paddle
        rng = np.random.default_rng(0)
        a = paddle.to_tensor(rng.standard_normal((n, n)).astype(np.float32))
        b = paddle.to_tensor(rng.standard_normal((n, n)).astype(np.float32))
        return (lambda: a @ b), (lambda out: out.numpy())
