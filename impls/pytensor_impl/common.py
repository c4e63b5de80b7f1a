"""Shared by the PyTensor and Theano RNN/RvNN classes: the library adapter, loss,
optimisers, compiled vector-Jacobian products and the base class.

Everything symbolic goes through ``Lib``, so the same graph code runs on
PyTensor and on Theano 1.0.5 (``impls.theano_impl`` only names the backend).

Two ways to run a model, chosen by strategy:

* whole graph (``compiled``): the subclass returns symbolic inputs, logits and
  loss; the base compiles ``logits``, ``loss + grads`` and ``train`` (loss with
  the optimiser's updates) lazily, on first use, so the runner's first-call
  time includes compilation;
* stepwise (``loop``, ``recursive``, ``levels``): Python drives compiled
  pieces forward and backward (see ``vjp``) and returns NumPy gradients; a
  compiled ``apply`` function takes them and updates the parameters.

Loss inputs: ``labels int32[M]`` (label -1 -> class 0) and
``weights float32[M]`` of ``bench.targets.loss_weights``, made in ``prepare``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Dict, List

import numpy as np

from bench.interface import ADAGRAD, ADAM, DeviceUnavailable, Implementation
from bench.params import schema

from . import NOT_APPLICABLE

FLOAT = "float32"


class Lib:
    """The few entry points that differ between PyTensor and Theano, behind one name.

    ``T`` is the tensor module (``pytensor.tensor`` / ``theano.tensor``);
    everything used from it exists under the same name in both.
    ``BENCH_<BACKEND>_MODE`` (e.g. ``BENCH_PYTENSOR_MODE=FAST_RUN``) overrides
    the backend's default compilation mode; unset, the default is used.
    """

    def __init__(self, backend: str):
        if backend == "pytensor":
            import pytensor as th
            import pytensor.tensor as T
            self.sigmoid = T.sigmoid
        elif backend == "theano":
            import theano as th
            import theano.tensor as T
            self.sigmoid = T.nnet.sigmoid
        else:
            raise ValueError("unknown symbolic backend %r" % backend)
        # Every variable below is declared float32; this makes Python float
        # constants float32 too instead of upcasting expressions to float64.
        th.config.floatX = FLOAT
        self.backend, self.th, self.T = backend, th, T
        self.mode = os.environ.get("BENCH_%s_MODE" % backend.upper()) or None

    @property
    def version(self) -> str:
        return str(self.th.__version__)

    def function(self, inputs, outputs, updates=None, givens=None):
        return self.th.function(list(inputs), outputs, updates=updates or [],
                                givens=givens or [], on_unused_input="ignore", mode=self.mode)

    def shared(self, value, name):
        return self.th.shared(np.array(value, dtype=FLOAT), name=name)

    def grad(self, cost, wrt):
        return self.th.grad(cost, wrt, disconnected_inputs="ignore")

    def scan(self, fn, sequences, outputs_info, non_sequences=()):
        """Scan returning a list of outputs (Theano returns a bare variable for one).

        A model scan never updates shared variables: PyTensor (which asks for
        ``return_updates=False`` and then returns the outputs alone) raises if
        one would, and Theano's updates are checked here.
        """
        kwargs = dict(sequences=sequences, outputs_info=outputs_info,
                      non_sequences=list(non_sequences), strict=True)
        if self.backend == "pytensor":
            out = self.th.scan(fn, return_updates=False, **kwargs)
        else:
            out, updates = self.th.scan(fn, **kwargs)
            if updates:
                raise AssertionError("a model scan must not update shared variables")
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def describe(self) -> Dict:
        cfg = self.th.config
        out = {"backend": self.backend, "version": self.version, "floatX": cfg.floatX,
               "mode": self.mode or str(cfg.mode)}
        for key in ("linker", "cxx"):
            out[key] = str(getattr(cfg, key, ""))
        try:
            out["blas_ldflags"] = str(cfg.blas__ldflags)   # PyTensor
        except AttributeError:
            out["blas_ldflags"] = str(cfg.blas.ldflags)    # Theano
        if self.backend == "pytensor":
            from pytensor.compile.mode import get_mode
            out["linker_resolved"] = type(get_mode(self.mode).linker).__name__
        return out


# --- symbolic pieces shared by both families ---

def mean_xent(lib, logits, labels, weights):
    """Scalar: sum over rows of weight * -log softmax(logits)[label] (logits [M, C])."""
    T = lib.T
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - T.log(T.exp(z).sum(axis=1, keepdims=True))
    return -(logp[T.arange(logits.shape[0]), labels] * weights).sum()


class Optimizer:
    """SGD / Adam / Adagrad as symbolic updates of shared parameters.

    Adam: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    Adagrad: acc starts at 0.1; acc += g^2; p -= lr * g / (sqrt(acc) + eps).
    Weight decay wd (coupled L2): each ``g`` above is ``g + wd * p`` (no term at 0).
    """

    def __init__(self, lib, cfg, params: List):
        self.lib, self.kind, self.lr = lib, cfg.optimizer, np.float32(cfg.lr)
        self.wd = np.float32(cfg.weight_decay)
        self.params = params
        self.slots = {}
        if self.kind == "adam":
            self.slots["m"] = [lib.shared(np.zeros(p.get_value().shape), "m_" + p.name) for p in params]
            self.slots["v"] = [lib.shared(np.zeros(p.get_value().shape), "v_" + p.name) for p in params]
            self.step = lib.shared(np.zeros(()), "adam_t")
        elif self.kind == "adagrad":
            self.slots["acc"] = [lib.shared(np.zeros(p.get_value().shape), "acc_" + p.name)
                                 for p in params]
        elif self.kind != "sgd":
            raise ValueError("unknown optimizer %r" % self.kind)
        self.reset()

    def reset(self):
        for name, slots in self.slots.items():
            fill = ADAGRAD["initial_accumulator"] if name == "acc" else 0.0
            for s in slots:
                s.set_value(np.full(s.get_value().shape, fill, FLOAT))
        if self.kind == "adam":
            self.step.set_value(np.zeros((), FLOAT))

    def updates(self, grads):
        T, lr = self.lib.T, self.lr
        f32 = lambda x: T.cast(x, FLOAT)  # noqa: E731  (keep every update float32)
        out = []
        if self.wd:
            grads = [g + self.wd * p for g, p in zip(grads, self.params)]
        if self.kind == "sgd":
            return [(p, f32(p - lr * g)) for p, g in zip(self.params, grads)]
        if self.kind == "adagrad":
            eps = np.float32(ADAGRAD["eps"])
            for p, g, acc in zip(self.params, grads, self.slots["acc"]):
                acc_new = acc + g * g
                out += [(acc, f32(acc_new)), (p, f32(p - lr * g / (T.sqrt(acc_new) + eps)))]
            return out
        b1, b2, eps = (np.float32(ADAM[k]) for k in ("beta1", "beta2", "eps"))
        t = self.step + np.float32(1)
        c1, c2 = np.float32(1) - b1 ** t, np.float32(1) - b2 ** t
        out.append((self.step, f32(t)))
        for p, g, m, v in zip(self.params, grads, self.slots["m"], self.slots["v"]):
            m_new = b1 * m + (np.float32(1) - b1) * g
            v_new = b2 * v + (np.float32(1) - b2) * g * g
            out += [(m, f32(m_new)), (v, f32(v_new)),
                    (p, f32(p - lr * (m_new / c1) / (T.sqrt(v_new / c2) + eps)))]
        return out


def vjp(lib, inputs, outputs, residuals, wrt):
    """A compiled piece and its compiled vector-Jacobian product.

    ``fwd(*inputs) -> outputs + residuals``;
    ``bwd(*inputs, *residuals, *output_grads) -> grads of wrt`` (inputs and/or
    shared parameters). The backward graph is the framework's own ``grad`` of
    ``sum(outputs * output_grads)``, with each residual (an intermediate such as
    a pre-activation) replaced by the value the forward saved, so the
    forward's matmuls are not recomputed.
    """
    outputs, residuals = list(outputs), list(residuals)
    fwd = lib.function(inputs, outputs + residuals)
    saved = [r.type() for r in residuals]
    seeds = [o.type() for o in outputs]
    cost = sum((o * s).sum() for o, s in zip(outputs, seeds))
    grads = lib.grad(cost, list(wrt))
    bwd = lib.function(list(inputs) + saved + seeds, grads, givens=list(zip(residuals, saved)))
    return fwd, bwd


# --- the base class ---

class SymbolicImplementation(Implementation):
    framework = "pytensor"
    backend = "pytensor"          # which library Lib loads (theano_impl overrides both)
    not_applicable = NOT_APPLICABLE
    weight_decay_refusal = None   # in the symbolic updates (Optimizer.updates)

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)   # sets self.lib (apply_threads)
        self.names = list(schema(cfg))
        self.p = {name: self.lib.shared(np.zeros(shape), name)
                  for name, (shape, _) in schema(cfg).items()}
        self.opt = Optimizer(self.lib, cfg, [self.p[k] for k in self.names])
        self._built_decay = cfg.weight_decay   # the decay self.opt's compiled updates apply
        self._probe = None                     # set_weight_decay's other decay: its Optimizer
        self._fns: Dict = {}
        self.compiles: Counter = Counter()
        self.compile_seconds = 0.0
        self.calls: Counter = Counter()

    def apply_threads(self, threads):
        """Cap the BLAS/OpenMP pools loaded so far to ``threads`` and report them. The
        library is imported first, so a pool its import loads is capped too."""
        self.lib = Lib(self.backend)
        names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        out = {"requested": int(threads), "env": {k: os.environ.get(k) for k in names}}
        try:
            from threadpoolctl import threadpool_info, threadpool_limits
        except ImportError:
            out["how"] = "environment only (threadpoolctl is not installed)"
            return out
        threadpool_limits(limits=int(threads))
        out["how"] = ("threadpoolctl.threadpool_limits(%d) on the pools loaded at construction"
                      % threads)
        out["pools"] = [[i.get("internal_api"), i.get("num_threads")] for i in threadpool_info()]
        return out

    def pick_device(self, device):
        if device != "cpu":
            raise DeviceUnavailable("%s runs here on the CPU only (its GPU backends are not "
                                    "installed)" % self.backend)
        return device

    @property
    def whole_graph(self) -> bool:
        return self.strategy == "compiled"

    # --- subclass hooks ---
    def _symbolic(self) -> Dict:
        """Whole-graph strategies: {'inputs': [...], 'logits': [B, C], 'loss': scalar}."""
        raise NotImplementedError

    def _inputs(self, prepared) -> List:
        """The values for ``_symbolic()['inputs']``, in order."""
        return prepared["inputs"]

    def _stepwise_logits(self, prepared):
        raise NotImplementedError

    def _stepwise_loss_and_grads(self, prepared):
        """(loss, {canonical name: float32 gradient}) by stepwise backpropagation."""
        raise NotImplementedError

    # --- compilation, lazily and counted ---
    def _compiled(self, name, build):
        """``build()`` (which compiles) on first use, then the cached result."""
        if name not in self._fns:
            t0 = time.perf_counter()
            self._fns[name] = build()
            self.compile_seconds += time.perf_counter() - t0
            self.compiles[name] += 1
        return self._fns[name]

    def _graph(self):
        return self._compiled("graph", self._symbolic)

    def _whole(self, purpose):
        def build():
            g = self._graph()
            lib = self.lib
            if purpose == "logits":
                return lib.function(g["inputs"], g["logits"])
            params = [self.p[k] for k in self.names]
            grads = lib.grad(g["loss"], params)
            if purpose == "grads":
                return lib.function(g["inputs"], [g["loss"]] + list(grads))
            return lib.function(g["inputs"], g["loss"], updates=self.opt.updates(grads))
        return self._compiled(purpose, build)

    def _apply(self):
        def build():
            seeds = [self.p[k].type() for k in self.names]
            return self.lib.function(seeds, [], updates=self.opt.updates(seeds))
        return self._compiled("apply", build)

    def _probe_apply(self):
        """The update alone at set_weight_decay's decay (its own optimiser state)."""
        probe = self._probe

        def build():
            seeds = [self.p[k].type() for k in self.names]
            return self.lib.function(seeds, [], updates=probe.updates(seeds))
        return self._compiled("apply_decay_%g" % probe.wd, build)

    def set_weight_decay(self, weight_decay):
        """The compiled train step / update keep the decay they were built with; at another
        decay (the gate's probe) a step is ``loss_and_grads``, then an update compiled with
        an Optimizer of that decay (a small graph, where the whole-graph strategy would
        compile its forward and backward again)."""
        super().set_weight_decay(weight_decay)
        if self.cfg.weight_decay == self._built_decay:
            self._probe = None
        elif self._probe is None or self._probe.wd != np.float32(self.cfg.weight_decay):
            self._probe = Optimizer(self.lib, self.cfg, [self.p[k] for k in self.names])

    # --- parameters ---
    def load_params(self, params):
        for name, value in self._checked(params).items():
            self.p[name].set_value(np.array(value, dtype=FLOAT))
        self.opt.reset()
        if self._probe is not None:
            self._probe.reset()

    def export_params(self):
        return {k: np.array(self.p[k].get_value(), dtype=np.float32) for k in self.names}

    def value(self, name):
        """A parameter's current value (no copy: read only)."""
        return self.p[name].get_value(borrow=True)

    # --- work ---
    def logits(self, prepared):
        self.calls["logits"] += 1
        if self.whole_graph:
            return self._whole("logits")(*self._inputs(prepared))
        return self._stepwise_logits(prepared)

    def loss_and_grads(self, prepared):
        if self.whole_graph:
            out = self._whole("grads")(*self._inputs(prepared))
            loss, grads = out[0], dict(zip(self.names, out[1:]))
        else:
            loss, grads = self._stepwise_loss_and_grads(prepared)
        return float(loss), {k: np.array(grads[k], dtype=np.float32) for k in self.names}

    def train_step(self, prepared):
        self.calls["train_step"] += 1
        if self._probe is not None:
            loss, grads = self.loss_and_grads(prepared)
            self._probe_apply()(*[grads[k] for k in self.names])
            return np.float32(loss)
        if self.whole_graph:
            return self._whole("train")(*self._inputs(prepared))
        loss, grads = self._stepwise_loss_and_grads(prepared)
        self._apply()(*[grads[k] for k in self.names])
        return np.float32(loss)

    def to_numpy(self, value):
        return np.asarray(value)

    # --- measurement helpers ---
    def info(self):
        # build_seconds: graph construction, rewriting and linking; PyTensor's
        # numba backend JIT-compiles at a function's first call, which only
        # the runner's first-call time sees.
        return {"library": self.lib.describe(), "threads": self.thread_info,
                "compiled_functions": dict(self.compiles),
                "build_seconds": round(self.compile_seconds, 3),
                "calls": dict(self.calls)}

    def gemm_ops(self, n):
        T = self.lib.T
        a, b = T.matrix("a", dtype=FLOAT), T.matrix("b", dtype=FLOAT)
        fn = self.lib.function([a, b], T.dot(a, b))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, n)).astype(np.float32)
        y = rng.standard_normal((n, n)).astype(np.float32)
        return (lambda: fn(x, y)), (lambda out: None)
