"""Shared by the Keras RNN and RvNN classes: backend, threads, device, parameters, optimiser,
loss, and each backend's training step.

A subclass supplies

* ``modes``: strategy -> ``"eager"``, ``"graph"`` or ``"xla"`` (how the model runs, below);
* ``_build_model() -> keras.Model``, built, whose ``call(inputs, static)`` returns logits
  ``[M, C]`` at M classification points. ``inputs`` is a (nested) tuple of backend tensors;
  ``static`` is Python data: for ``graph`` / ``xla`` it is hashable and fixes the shapes
  (compilers specialise on it), for ``eager`` it may be any schedule object;
* ``_param_variables()``: canonical name -> the ``keras.Variable`` holding it (shapes are the
  canonical ones, so loading and exporting copy without reshaping);
* ``prepare(batch) -> Prepared``.

Execution modes, per backend (the training step is the documented Keras 3 custom-loop
pattern of each backend):

=======  ==============================  ================================  =========================
mode     torch                           jax                               tensorflow
=======  ==============================  ================================  =========================
eager    eager, ``loss.backward()``      ``jax.value_and_grad`` over       eager ``tf.GradientTape``
                                         ``stateless_call``; the Python
                                         loop calls a jitted function
                                         per step / node / height
                                         (``cell_function``)
graph    eager (Keras' default on        one ``jax.jit`` for forward,      ``tf.function`` without
         torch: ``jit_compile="auto"``   backward and                      XLA (Keras' default on a
         is off there)                   ``optimizer.stateless_apply``     CPU-only machine)
xla      not applicable (see             one ``jax.jit``, as ``graph``     ``tf.function(jit_compile
         ``TORCH_COMPILE_REASON``)                                         =True)``
=======  ==============================  ================================  =========================

The optimiser update runs the way ``Model.fit`` runs it, whatever the mode: ``jax.jit`` of
``stateless_apply`` on jax and ``tf.function`` of ``optimizer.apply`` on tensorflow (an eager
Keras update is ~10 dispatches per variable), Keras' own fused ``torch._foreach`` update on
torch. The strategies differ in how the model's forward and backward run.

On jax the parameters and optimiser state live as arrays in the implementation while it
trains (updated functionally, donated to the jitted step) and are written back to the Keras
variables by ``export_params``.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from typing import Dict, Optional

import numpy as np

import keras
from keras import ops

from bench.interface import DeviceUnavailable, Implementation, counted, one_line
from impls.keras_optimizers import keras_optimizer

from . import NOT_APPLICABLE, NOT_APPLICABLE_BY_ENTRY

BACKEND = keras.backend.backend()
FRAMEWORK = "keras-" + BACKEND

if BACKEND == "torch":
    import torch
elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp
elif BACKEND == "tensorflow":
    import tensorflow as tf
else:  # numpy / openvino backends have no gradients: nothing to benchmark
    raise ImportError("keras backend %r is not one of torch, jax, tensorflow" % BACKEND)


MODES = ("eager", "graph", "xla")


# --- threads and device ---

_THREADS: Dict = {}


def _jax_backend_started() -> Optional[bool]:
    try:
        from jax._src import xla_bridge  # no public query in jax 0.10
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # an internal that moved
        return None


def read(variable):
    """A variable's current value as a tensor, read once.

    On tensorflow a Keras variable is itself a tensor and every op using it reads it again;
    a read inside a ``tf.while_loop`` body has no gradient XLA can compile (its accumulator
    has no fixed size), so loops take their weights read once, outside.
    """
    if BACKEND == "tensorflow":
        return tf.convert_to_tensor(variable)
    return ops.convert_to_tensor(variable)


def to_numpy(value) -> np.ndarray:
    """A backend tensor (or Keras variable) as NumPy.

    On torch and tensorflow, ``keras.ops.convert_to_numpy`` goes through ``np.array(tensor)``,
    which with NumPy 2 warns on every call (their ``__array__`` takes no ``copy``);
    ``.numpy()`` is the same conversion without the warning.
    """
    if isinstance(value, keras.Variable):
        value = value.value
    if BACKEND == "torch" and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if BACKEND == "tensorflow" and tf.is_tensor(value):
        return np.asarray(value.numpy())
    return np.asarray(ops.convert_to_numpy(value))


JIT_CELLS = BACKEND == "jax"


def cell_function(fn, compiled: bool):
    """``fn`` for a per-node / per-step call of an eager strategy; ``jax.jit(fn)`` on jax.

    JAX's op-by-op autodiff costs ~1 ms per op here (linearising each primitive), about 15x
    what a node's dozen ops cost once jitted (measured: a 300-node Tree-LSTM gradient takes
    7.3 s op by op, 1.1 s with each node function jitted). Raw JAX code, and Keras itself on
    jax (which jits every step unless ``run_eagerly``), compile such functions; so the eager
    strategies on jax keep their Python loop and their one call per node / step, each call
    a jitted function of ``keras.ops``.
    """
    if compiled and BACKEND == "jax":
        return jax.jit(fn)
    return fn


def row_of(x, i):
    """``x[i]`` for an index that may be traced (inside a jitted per-node / per-step function).

    The eager strategies on jax read their step's or leaf's row inside the jitted function:
    slicing outside, op by op, compiles one XLA executable per distinct static index (~90 ms
    each here; a 1000-step sequence took 94 s the first time), and Keras' jax ``unstack`` is
    exactly that. The price: each call's gradient is a full-size [n, ...] update, so the
    backward pass costs O(n^2) row copies (raw JAX code pays the same).
    """
    shape = tuple(ops.shape(x))
    start = (i,) + (0,) * (len(shape) - 1)
    return ops.reshape(ops.slice(x, start, (1,) + shape[1:]), shape[1:])


# --- optimiser and loss ---

def decayed(grads, values, wd):
    """Coupled L2: ``g + wd * theta`` for each gradient and parameter value (the gradients
    themselves at 0), before the optimiser's update (bench.reference.optimizer_steps)."""
    if not wd:
        return grads
    return [g + wd * v for g, v in zip(grads, values)]


def masked_xent(logits, labels):
    """Mean softmax cross-entropy over rows with label >= 0 (logits [M, C], labels int32[M])."""
    keep = ops.greater_equal(labels, 0)
    per_row = keras.losses.sparse_categorical_crossentropy(ops.where(keep, labels, 0), logits,
                                                           from_logits=True)
    count = ops.maximum(ops.sum(ops.cast(keep, "float32")), 1.0)
    return ops.sum(ops.where(keep, per_row, 0.0)) / count


class Prepared:
    """A batch ready for the model: inputs and static data for the loss and for the logits.

    ``inputs`` / ``static`` give the logits at the loss's classification points, with
    ``labels`` int32[M]; ``logit_inputs`` / ``logit_static`` give them at each example's
    classification point ([B, C]); they are the same objects where the two coincide.
    """

    __slots__ = ("inputs", "static", "labels", "logit_inputs", "logit_static", "size")

    def __init__(self, inputs, static, labels, size, logit_inputs=None, logit_static=None):
        self.inputs, self.static, self.labels, self.size = inputs, static, labels, size
        self.logit_inputs = inputs if logit_inputs is None else logit_inputs
        self.logit_static = static if logit_inputs is None else logit_static


# --- the base class ---

class KerasImplementation(Implementation):
    framework = FRAMEWORK
    # the package's table is every backend's; the registry adds the entry's own
    not_applicable = {**NOT_APPLICABLE, **NOT_APPLICABLE_BY_ENTRY.get("keras-" + BACKEND, {})}
    modes: Dict[str, str] = {}
    # coupled L2 added to the gradients before ``optimizer.apply`` (each engine's
    # ``decayed``), never Keras' own ``weight_decay=``, which is decoupled (AdamW-like)
    weight_decay_refusal = None

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.mode = self.modes[strategy]
        self.traces: Counter = Counter()
        self._last = None
        self._loaded = False
        with self._scope():
            self.model = self._build_model()
            self._params = self._param_variables()
            self._vars = list(self.model.trainable_variables)
            slot = {id(v): i for i, v in enumerate(self._vars)}
            if sorted(slot[id(v)] for v in self._params.values()) != list(range(len(self._vars))):
                raise AssertionError("canonical parameters and the model's variables differ")
            self._slot = OrderedDict((name, slot[id(v)]) for name, v in self._params.items())
            self.optimizer = keras_optimizer(cfg.optimizer, cfg.lr)
            self.optimizer.build(self._vars)
            # load_params restores these, so compiled steps keep capturing the same variables.
            self._opt_initial = [np.array(to_numpy(v)) for v in self.optimizer.variables]
        self._engine = {"torch": _TorchEngine, "jax": _JaxEngine,
                        "tensorflow": _TFEngine}[BACKEND](self)
        self._built_decay = cfg.weight_decay   # the decay the engine's train step applies
        self._probe_decay = None               # set_weight_decay's other decay

    def apply_threads(self, threads):
        """Apply the backend's own thread knobs (first call in a process decides); report them."""
        threads = int(threads)
        if _THREADS:
            out = dict(_THREADS)
            out["requested"] = threads
            return out
        notes = []
        if BACKEND == "torch":
            torch.set_num_threads(threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError as exc:  # only settable before torch's first parallel work
                notes.append("inter-op pool already started: %s" % one_line(exc))
            _THREADS.update(intra_op=torch.get_num_threads(), inter_op=torch.get_num_interop_threads(),
                            how="torch.set_num_threads / set_num_interop_threads(1)")
        elif BACKEND == "tensorflow":
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
                how = "tf.config.threading before TF's runtime started (inter-op 1)"
            except RuntimeError as exc:
                how = "TF's runtime had started; its pools are unchanged (%s)" % one_line(exc)
            _THREADS.update(intra_op=tf.config.threading.get_intra_op_parallelism_threads(),
                            inter_op=tf.config.threading.get_inter_op_parallelism_threads(), how=how)
        else:
            started = _jax_backend_started()
            if started is False:
                # XLA's CPU client sizes its pool from PJRT_NPROC when the backend starts.
                os.environ["PJRT_NPROC"] = str(threads)
                jax.devices()
                _THREADS.update(intra_op=threads, how="PJRT_NPROC=%d before XLA's backend started"
                                % threads)
            else:
                env = os.environ.get("PJRT_NPROC")
                _THREADS.update(intra_op=int(env) if env and env.isdigit() else None,
                                how="XLA's backend had started (PJRT_NPROC=%s)" % env)
            _THREADS["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        _THREADS["notes"] = notes
        out = dict(_THREADS)
        out["requested"] = threads
        return out

    def pick_device(self, device):
        """The Keras device name for 'cpu' / 'gpu'; Unavailable when the backend sees no GPU.

        Torch gets no device index: Keras creates a torch variable as
        ``Parameter(...).to(device)``, and ``.to("cpu:0")`` of a CPU tensor is a copy, which would
        leave the variable a non-leaf tensor that never receives a gradient.
        """
        index = "" if BACKEND == "torch" else ":0"
        if device == "cpu":
            return "cpu" + index
        if BACKEND == "torch":
            ok = torch.cuda.is_available()
        elif BACKEND == "tensorflow":
            ok = bool(tf.config.list_physical_devices("GPU"))
        else:
            try:
                ok = bool(jax.devices("gpu"))
            except RuntimeError:
                ok = False
        if not ok:
            raise DeviceUnavailable("keras-%s sees no GPU" % BACKEND)
        return "gpu" + index

    def set_weight_decay(self, weight_decay):
        """The engine's (compiled) train step keeps the decay it was built with; at another
        decay (the gate's probe) a step is the engine's gradients, then the same optimiser's
        update of the decayed gradients (``_Engine.apply_decayed``)."""
        super().set_weight_decay(weight_decay)
        wd = self.cfg.weight_decay
        self._probe_decay = None if wd == self._built_decay else wd

    # -- subclass hooks --
    def _build_model(self):
        raise NotImplementedError

    def _param_variables(self) -> "OrderedDict[str, keras.Variable]":
        raise NotImplementedError

    def _describe(self) -> Dict:
        """Strategy facts for info()."""
        return {}

    # -- helpers --
    def _scope(self):
        return keras.device(self.dev)

    def _tensor(self, value, dtype=None):
        """A NumPy array as a backend tensor on this implementation's device."""
        with self._scope():
            return ops.convert_to_tensor(np.asarray(value), dtype=dtype)

    def _need_params(self):
        if not self._loaded:
            raise RuntimeError("load_params first")

    def _forward(self, inputs, static):
        return self.model(inputs, static=static)

    # --- parameters ---
    def load_params(self, params):
        params = self._checked(params)
        with self._scope():
            for name, var in self._params.items():
                var.assign(params[name])
            for var, value in zip(self.optimizer.variables, self._opt_initial):
                var.assign(value)
            self._engine.load()
        self._loaded = True

    def export_params(self):
        self._need_params()
        values = self._engine.values()
        return OrderedDict((name, np.array(to_numpy(values[i]), dtype=np.float32))
                           for name, i in self._slot.items())

    # --- work ---
    def logits(self, prepared):
        self._need_params()
        with self._scope():
            out = self._engine.logits(prepared)
        self._last = out
        return out

    def loss_and_grads(self, prepared):
        self._need_params()
        with self._scope():
            loss, grads = self._engine.loss_and_grads(prepared)
        return (float(to_numpy(loss)),
                OrderedDict((name, np.array(self._engine.dense(grads[i]), np.float32))
                            for name, i in self._slot.items()))

    def train_step(self, prepared):
        self._need_params()
        with self._scope():
            if self._probe_decay is not None:
                loss, grads = self._engine.loss_and_grads(prepared)
                self._engine.apply_decayed(grads, self._probe_decay)
            else:
                loss = self._engine.train(prepared)
        self._last = loss
        return loss

    def sync(self):
        self._engine.sync(self._last)

    def to_numpy(self, value):
        return to_numpy(value)

    # --- measurement ---
    def device_peak_bytes(self):
        if self.device != "gpu":
            return None
        try:
            if BACKEND == "torch":
                return int(torch.cuda.max_memory_allocated())
            if BACKEND == "tensorflow":
                return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
            stats = jax.devices("gpu")[0].memory_stats() or {}
            return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None
        except (RuntimeError, ValueError, KeyError):
            return None

    def gemm_ops(self, n):
        rng = np.random.default_rng(0)
        a = self._tensor(rng.standard_normal((n, n)).astype(np.float32))
        b = self._tensor(rng.standard_normal((n, n)).astype(np.float32))

        def product():
            with self._scope():
                return ops.matmul(a, b)
        return product, self._engine.sync
    def info(self):
        executor = {
            "torch": {"eager": "eager", "graph": "eager (Keras' default on torch)"},
            "jax": {"eager": "Python loop under jax.value_and_grad over stateless_call, "
                             "each step / node / height one jax.jit call",
                    "graph": "jax.jit", "xla": "jax.jit"},
            "tensorflow": {"eager": "eager (tf.GradientTape)",
                           "graph": "tf.function without XLA",
                           "xla": "tf.function(jit_compile=True)"},
        }[BACKEND][self.mode]
        out = {
            "backend": BACKEND,
            "keras": keras.__version__,
            "backend_version": _backend_version(),
            "device": self.dev,
            "threads": dict(self.thread_info),
            "mode": self.mode,
            "executor": executor,
            "optimizer": type(self.optimizer).__name__,
            "optimizer_update": {"torch": "eager (Keras' torch._foreach update)",
                                 "jax": "jax.jit(optimizer.stateless_apply)",
                                 "tensorflow": "tf.function(optimizer.apply)"}[BACKEND],
            "traces": dict(self.traces),
        }
        out.update(self._describe())
        return out


def _backend_version() -> str:
    return {"torch": lambda: torch.__version__, "jax": lambda: jax.__version__,
            "tensorflow": lambda: tf.__version__}[BACKEND]()


# --- the three backends' training steps ---

class _TorchEngine:
    """Stateful Keras variables; gradients by ``loss.backward()`` into ``variable.value.grad``."""

    def __init__(self, impl: KerasImplementation):
        self.impl = impl
        self.cuda = impl.device == "gpu"

    def load(self):
        pass

    def values(self):
        return [v.value for v in self.impl._vars]

    def dense(self, grad):
        return to_numpy(grad)

    def logits(self, p):
        with torch.no_grad():
            return self.impl._forward(p.logit_inputs, p.logit_static)

    def loss_and_grads(self, p):
        impl = self.impl
        for v in impl._vars:
            v.value.grad = None
        loss = masked_xent(impl._forward(p.inputs, p.static), p.labels)
        loss.backward()
        grads = [v.value.grad if v.value.grad is not None else torch.zeros_like(v.value)
                 for v in impl._vars]
        return loss.detach(), grads

    def train(self, p):
        loss, grads = self.loss_and_grads(p)
        self.apply_decayed(grads, self.impl.cfg.weight_decay)
        return loss

    def apply_decayed(self, grads, wd):
        with torch.no_grad():
            if wd:   # coupled L2: g + wd * theta, before the optimiser's update
                grads = [g + wd * v.value for g, v in zip(grads, self.impl._vars)]
            self.impl.optimizer.apply(grads, self.impl._vars)

    def sync(self, last):
        if self.cuda:
            torch.cuda.synchronize()


class _JaxEngine:
    """Pure functions of (trainable, non-trainable, optimiser) values, the Keras 3 JAX pattern."""

    def __init__(self, impl: KerasImplementation):
        self.impl = impl
        model, opt = impl.model, impl.optimizer
        self.tv = self.ntv = self.ov = None

        def loss_fn(tv, ntv, inputs, static, labels):
            logits, _ = model.stateless_call(tv, ntv, inputs, static)
            return masked_xent(logits, labels)

        def logits_fn(tv, ntv, inputs, static):
            return model.stateless_call(tv, ntv, inputs, static)[0]

        grad_fn = jax.value_and_grad(loss_fn)
        wd = impl.cfg.weight_decay

        def train_fn(tv, ntv, ov, inputs, static, labels):
            loss, grads = grad_fn(tv, ntv, inputs, static, labels)
            tv, ov = opt.stateless_apply(ov, decayed(grads, tv, wd), tv)
            return loss, tv, ov

        def apply_fn(tv, ov, grads):
            tv, ov = opt.stateless_apply(ov, decayed(grads, tv, wd), tv)
            return tv, ov

        self._opt = opt
        self._probe_apply = {}

        if impl.mode == "eager":
            self._logits = logits_fn
            self._grads = grad_fn
            self._apply = jax.jit(counted(impl.traces, "apply", apply_fn), donate_argnums=(0, 1))
            self._train = None
        else:
            self._logits = jax.jit(counted(impl.traces, "logits", logits_fn), static_argnums=(3,))
            self._grads = jax.jit(counted(impl.traces, "grads", grad_fn), static_argnums=(3,))
            self._train = jax.jit(counted(impl.traces, "train", train_fn), static_argnums=(4,),
                                  donate_argnums=(0, 2))

    def load(self):
        # Fresh buffers: the jitted step donates (reuses) them, the Keras variables keep theirs.
        self.tv = [jnp.array(v.value, copy=True) for v in self.impl._vars]
        self.ntv = [v.value for v in self.impl.model.non_trainable_variables]
        self.ov = [jnp.asarray(np.array(x, copy=True)) for x in self.impl._opt_initial]

    def values(self):
        for var, value in zip(self.impl._vars, self.tv):
            var.assign(value)
        return self.tv

    def dense(self, grad):
        return to_numpy(grad)

    def logits(self, p):
        return self._logits(self.tv, self.ntv, p.logit_inputs, p.logit_static)

    def loss_and_grads(self, p):
        return self._grads(self.tv, self.ntv, p.inputs, p.static, p.labels)

    def train(self, p):
        if self._train is not None:
            loss, self.tv, self.ov = self._train(self.tv, self.ntv, self.ov, p.inputs, p.static,
                                                 p.labels)
        else:
            loss, grads = self._grads(self.tv, self.ntv, p.inputs, p.static, p.labels)
            self.tv, self.ov = self._apply(self.tv, self.ov, grads)
        return loss

    def apply_decayed(self, grads, wd):
        """One update at decay ``wd`` (another than the built one: the gate's probe)."""
        if wd not in self._probe_apply:
            opt = self._opt

            def apply_fn(tv, ov, grads):
                return opt.stateless_apply(ov, decayed(grads, tv, wd), tv)

            self._probe_apply[wd] = jax.jit(counted(self.impl.traces, "apply_probe", apply_fn))
        self.tv, self.ov = self._probe_apply[wd](self.tv, self.ov, grads)

    def sync(self, last):
        jax.block_until_ready((last, self.tv, self.ov))


class _TFEngine:
    """Stateful Keras variables; gradients by ``tf.GradientTape``."""

    def __init__(self, impl: KerasImplementation):
        self.impl = impl
        sparse_ok = impl.cfg.optimizer == "sgd"
        self._sparse_ok = sparse_ok

        def grads_fn(inputs, static, labels):
            with tf.GradientTape() as tape:
                loss = masked_xent(impl._forward(inputs, static), labels)
            return loss, tape.gradient(loss, impl._vars)

        def for_optimizer(grads, wd=impl.cfg.weight_decay):
            # The embedding's gradient is IndexedSlices (one row per lookup). Keras' SGD applies
            # it as an exact scatter-subtract; Keras' Adagrad would square each duplicate row
            # separately (not the square of their sum) and Adam decays every row anyway, so
            # those get the dense gradient, as on the other backends. With a weight decay every
            # row decays: dense, and g + wd * theta.
            if wd:
                return decayed([tf.convert_to_tensor(g) for g in grads],
                               [v.value for v in impl._vars], wd)
            return [g if sparse_ok or not isinstance(g, tf.IndexedSlices) else tf.convert_to_tensor(g)
                    for g in grads]

        self._for_optimizer = for_optimizer

        def logits_fn(inputs, static):
            return impl._forward(inputs, static)

        def train_fn(inputs, static, labels):
            loss, grads = grads_fn(inputs, static, labels)
            impl.optimizer.apply(for_optimizer(grads), impl._vars)
            return loss

        def apply_fn(grads):
            impl.optimizer.apply(for_optimizer(grads), impl._vars)

        if impl.mode == "eager":
            self._logits, self._grads = logits_fn, grads_fn
            self._apply = tf.function(counted(impl.traces, "apply", apply_fn), reduce_retracing=True,
                                      autograph=False)
            self._train = None
        else:
            # XLA compiles per concrete shape anyway, and its loops need static trip counts;
            # the plain graph is traced once for relaxed (None) shapes.
            compile_args = dict(jit_compile=impl.mode == "xla",
                                reduce_retracing=impl.mode == "graph", autograph=False)
            self._logits = tf.function(counted(impl.traces, "logits", logits_fn), **compile_args)
            self._grads = tf.function(counted(impl.traces, "grads", grads_fn), **compile_args)
            self._train = tf.function(counted(impl.traces, "train", train_fn), **compile_args)

    def load(self):
        pass

    def values(self):
        return [v.value for v in self.impl._vars]

    def dense(self, grad):
        return tf.convert_to_tensor(grad).numpy()

    def logits(self, p):
        return self._logits(p.logit_inputs, p.logit_static)

    def loss_and_grads(self, p):
        return self._grads(p.inputs, p.static, p.labels)

    def train(self, p):
        if self._train is not None:
            return self._train(p.inputs, p.static, p.labels)
        loss, grads = self._grads(p.inputs, p.static, p.labels)
        self._apply(grads)
        return loss

    def apply_decayed(self, grads, wd):
        """One update at decay ``wd`` (another than the built one: the gate's probe), eagerly."""
        self.impl.optimizer.apply(self._for_optimizer(grads, wd), self.impl._vars)

    def sync(self, last):
        if last is not None:
            last.numpy()
        if self.impl.device == "gpu":
            # The loss can be ready while the optimiser's updates are still queued.
            tf.test.experimental.sync_devices()
