"""Shared by the JAX RNN and RvNN classes: threads, device, parameters, optimiser, bookkeeping.

Subclasses supply three things and get the whole interface:

* ``_loss(params, prepared) -> scalar``: differentiable in ``params``;
* ``_logits(params, prepared) -> [B, C]``;
* ``jit_strategies``: the strategies for which those two are pure functions of array pytrees that
  can run under a single ``jax.jit`` (``compiled``, ``fused``); for the others
  they are Python code calling smaller jitted pieces (``loop``, ``recursive``,
  ``levels``), in which case ``jax.value_and_grad`` runs over the Python code
  and only the optimiser update is jitted.
"""

from __future__ import annotations

import os
import platform
import threading
import contextlib
from collections import Counter
from typing import Dict, List, Optional

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import optax

from bench.batches import padded_rows
from bench.interface import ADAGRAD, ADAM, DeviceUnavailable, Implementation, counted, one_line

from . import NOT_APPLICABLE

# --- threads: XLA's CPU client reads PJRT_NPROC once, when the backend starts ---

_THREADS: Dict = {}
_COMPILES = {"count": 0, "seconds": 0.0}
_LOCK = threading.Lock()
# (implementation, phase) of the calls in progress: compiles are charged to the innermost
_ACTIVE: List = []
PHASES = ("train", "infer")


def _backend_started() -> Optional[bool]:
    try:
        from jax._src import xla_bridge  # no public query exists in jax 0.10
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # an internal that moved: say we do not know
        return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _count_compiles(event, duration, **kwargs):
    """JAX reports every XLA compilation (and every persistent-cache load) with this event."""
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES["count"] += 1
        _COMPILES["seconds"] += float(duration)
        if _ACTIVE:
            impl, phase = _ACTIVE[-1]
            impl._compiles[phase] += 1
            impl._compile_s[phase] += float(duration)
            impl._compiled_programs[phase][str(kwargs.get("fun_name", "?"))] += 1


def _count_cache_hits(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits" and _ACTIVE:
        impl, phase = _ACTIVE[-1]
        impl._cache_hits[phase] += 1


def _install_compile_listener():
    if not _COMPILES.get("installed"):
        jax.monitoring.register_event_duration_secs_listener(_count_compiles)
        jax.monitoring.register_event_listener(_count_cache_hits)
        _COMPILES["installed"] = True


# --- optimiser ---

def make_optimizer(cfg):
    """optax transformation for cfg.optimizer with the suite's shared hyper-parameters.

    Note optax's Adagrad adds eps inside the square root (g / sqrt(acc + eps)),
    PyTorch and Keras outside it (g / (sqrt(acc) + eps)); with eps=1e-7 and the
    accumulator >= 0.1 the two differ by under 1e-6 relative.

    Weight decay (coupled L2) is ``optax.add_decayed_weights`` chained *before* the
    optimiser, so its moments / accumulator see ``g + wd * theta`` (chained after the
    scaling it would be a decoupled, AdamW-like decay). At 0 the chain is not built: the
    transformation is the one without decay.
    """
    if cfg.optimizer == "sgd":
        opt = optax.sgd(cfg.lr)
    elif cfg.optimizer == "adam":
        opt = optax.adam(cfg.lr, b1=ADAM["beta1"], b2=ADAM["beta2"], eps=ADAM["eps"])
    elif cfg.optimizer == "adagrad":
        opt = optax.adagrad(cfg.lr, initial_accumulator_value=ADAGRAD["initial_accumulator"],
                            eps=ADAGRAD["eps"])
    else:
        raise ValueError("unknown optimizer %r" % cfg.optimizer)
    if cfg.weight_decay:
        opt = optax.chain(optax.add_decayed_weights(float(cfg.weight_decay)), opt)
    return opt


# --- losses shared by both families ---

def softmax_xent(logits, labels):
    """Mean cross-entropy over rows with label >= 0 (logits [M, C], labels int32[M])."""
    keep = labels >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[:, None], axis=-1)[:, 0]
    count = jnp.maximum(jnp.sum(keep), 1).astype(logits.dtype)
    return -jnp.sum(jnp.where(keep, picked, 0.0)) / count


def classify(W_o, b_o, h):
    """Logits [M, C] from hidden states h [M, H]."""
    return h @ W_o + b_o


def _inputs(prepared, phase):
    """What the model functions of ``phase`` take. A prepared batch may hold its real example
    count ``size`` (a Python int, which a jitted function would take as an argument) and one
    set of arrays per phase where training and inference run on different shapes (a jitted
    function specialises on every array it is given, used or not)."""
    if not isinstance(prepared, dict) or "size" not in prepared:
        return prepared
    if phase in prepared:
        return prepared[phase]
    return {k: v for k, v in prepared.items() if k != "size"}


# --- the base class ---

class JaxImplementation(Implementation):
    framework = "jax"
    not_applicable = NOT_APPLICABLE   # refused before JAX starts (bench.interface)
    jit_strategies: tuple = ()  # strategies whose whole step runs under one jax.jit
    weight_decay_refusal = None  # optax.add_decayed_weights before the update (make_optimizer)

    @property
    def whole_jit(self) -> bool:
        return self.strategy in self.jit_strategies

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        _install_compile_listener()
        # TF32 would otherwise be JAX's default for float32 matmuls on recent GPUs;
        # the suite compares float32 with float32.
        jax.config.update("jax_default_matmul_precision", "highest")
        self.opt = make_optimizer(cfg)
        self._built_decay = cfg.weight_decay   # the decay self.opt and the jitted steps have
        self._probe = None        # (optimiser, jitted update) of set_weight_decay's other decay
        self._probe_state = None
        self.params = None
        self.opt_state = None
        self._opt_init = None
        self.traces: Counter = Counter()
        self._compiles = Counter()
        self._compile_s = Counter()
        self._cache_hits = Counter()
        self._compiled_programs = {p: Counter() for p in PHASES}
        self._last = None
        self._build_jits()

    @contextlib.contextmanager
    def _phase(self, phase):
        """Charge the XLA compilations inside the block to ``phase`` of this instance."""
        _ACTIVE.append((self, phase))
        try:
            yield
        finally:
            _ACTIVE.pop()

    def rows(self, n: int) -> int:
        """Padded example count of a batch of ``n`` (bench.batches.padded_rows)."""
        return padded_rows(n, self.batch_size)

    def apply_threads(self, threads):
        """Size XLA's CPU thread pool to ``threads`` if JAX's backend has not started yet.

        Returns what the process actually runs with: ``requested``, ``applied``
        (the pool size XLA was started with, as far as it can be known),
        ``matched`` and ``how``. The first call in a process decides; later calls
        with another count report a mismatch instead of pretending.
        """
        with _LOCK:
            if not _THREADS:
                started = _backend_started()
                if started is False:
                    before = os.environ.get("PJRT_NPROC")
                    os.environ["PJRT_NPROC"] = str(int(threads))
                    jax.devices()  # start the backend now so the pool size is pinned and known
                    how = "PJRT_NPROC=%d set before XLA's backend started" % threads
                    if before not in (None, str(threads)):
                        how += " (replacing PJRT_NPROC=%s from the environment)" % before
                    _THREADS.update(applied=int(threads), how=how)
                else:
                    env = os.environ.get("PJRT_NPROC") or os.environ.get("NPROC")
                    try:
                        applied, how = int(env), "backend already started; PJRT_NPROC/NPROC=%s" % env
                    except (TypeError, ValueError):
                        applied = _cpu_count()
                        how = "backend already started without PJRT_NPROC: XLA's default, one per core"
                    if started is None:
                        how += " (could not tell whether the backend had started)"
                    _THREADS.update(applied=applied, how=how)
                _THREADS["xla_flags"] = os.environ.get("XLA_FLAGS", "")
            out = dict(_THREADS)
        out["requested"] = int(threads)
        out["matched"] = out["applied"] == int(threads)
        return out

    def pick_device(self, device):
        """The jax device for 'cpu' or 'gpu'; Unavailable when JAX has no GPU backend."""
        if device == "cpu":
            return jax.devices("cpu")[0]
        try:
            gpus = jax.devices("gpu")
        except Exception as exc:  # RuntimeError: unknown backend / failed to initialise
            raise DeviceUnavailable("no GPU device: %s" % one_line(exc)) from None
        if not gpus:
            raise DeviceUnavailable("no GPU device: jax lists none")
        return gpus[0]

    # -- subclass hooks --
    def _loss(self, params, prepared):
        raise NotImplementedError

    def _logits(self, params, prepared):
        raise NotImplementedError

    def _build_jits(self):
        opt = self.opt

        def apply(params, opt_state, grads):
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        if self.whole_jit:
            loss = self._loss

            def step(params, opt_state, prepared):
                value, grads = jax.value_and_grad(loss)(params, prepared)
                params, opt_state = apply(params, opt_state, grads)
                return value, params, opt_state

            self._value_and_grad = jax.jit(counted(self.traces, "value_and_grad",
                                                        jax.value_and_grad(loss)))
            self._train = jax.jit(counted(self.traces, "train_step", step), donate_argnums=(0, 1))
            self._logits_call = jax.jit(counted(self.traces, "logits", self._logits))
        else:
            self._value_and_grad = jax.value_and_grad(self._loss)
            update = jax.jit(counted(self.traces, "optimizer_update", apply), donate_argnums=(0, 1))
            vg = self._value_and_grad

            def step(params, opt_state, prepared):
                value, grads = vg(params, prepared)
                params, opt_state = update(params, opt_state, grads)
                return value, params, opt_state

            self._train = step
            self._logits_call = self._logits

    # -- parameters --
    def load_params(self, params):
        checked = self._checked(params)
        # Private copies: device_put may alias host memory on the CPU, and the
        # jitted update donates (overwrites) its parameter buffers.
        self.params = {k: jax.device_put(np.array(v, np.float32, copy=True), self.dev)
                       for k, v in checked.items()}
        with jax.default_device(self.dev):
            # One jitted program, where eager optax would compile a small one per parameter
            # shape (~0.5 s each on a GPU); its outputs are committed to the device like the
            # parameters (a jitted step that got an uncommitted step count first and a
            # committed one next would compile twice).
            if self._opt_init is None:
                self._opt_init = jax.jit(self.opt.init)
            self.opt_state = jax.device_put(self._opt_init(self.params), self.dev)
        self._probe_state = None   # a fresh probe optimiser state too (set_weight_decay)
        self._last = None

    def export_params(self):
        return {k: np.array(v, dtype=np.float32, copy=True) for k, v in self.params.items()}

    def set_weight_decay(self, weight_decay):
        """The timed step (``self.opt`` inside its jitted programs) keeps the decay it was
        built with; another decay (the gate's probe) steps as ``_probe_step`` does, with
        ``make_optimizer`` of that decay: one small update program to compile, where the
        whole-step strategies would compile the whole step again."""
        super().set_weight_decay(weight_decay)
        if self.cfg.weight_decay == self._built_decay:
            self._probe = self._probe_state = None
            return
        opt = make_optimizer(self.cfg)

        def apply(params, opt_state, grads):
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self._probe = (opt, jax.jit(counted(self.traces, "optimizer_update_probe", apply)))
        self._probe_state = None

    def _probe_step(self, prepared):
        """One step at set_weight_decay's decay: the strategy's own gradients
        (``loss_and_grads``), then the probe optimiser's update."""
        value, grads = self.loss_and_grads(prepared)
        opt, update = self._probe
        with jax.default_device(self.dev):
            if self._probe_state is None:
                self._probe_state = opt.init(self.params)
            grads = {k: jax.device_put(g, self.dev) for k, g in grads.items()}
            self.params, self._probe_state = update(self.params, self._probe_state, grads)
        self._last = None
        return value

    # -- work --
    def logits(self, prepared):
        with jax.default_device(self.dev), self._phase("infer"):
            out = self._logits_call(self.params, _inputs(prepared, "infer"))
        self._last = out
        return self._real_rows(out, prepared)

    def _real_rows(self, out, prepared):
        """Logits of the real examples. A batch padded to more rows (a partial last batch, the
        verification batch) is cut on the host: a device slice would compile a program per size;
        those batches are never inside a timed loop."""
        size = prepared.get("size") if isinstance(prepared, dict) else None
        if size is None or size == out.shape[0]:
            return out
        return np.asarray(jax.device_get(out))[:size]

    def loss_and_grads(self, prepared):
        with jax.default_device(self.dev), self._phase("train"):
            value, grads = self._value_and_grad(self.params, _inputs(prepared, "train"))
            value = float(value)
        return value, {k: np.array(g, dtype=np.float32) for k, g in grads.items()}

    def train_step(self, prepared):
        if self._probe is not None:
            return self._probe_step(prepared)
        with jax.default_device(self.dev), self._phase("train"):
            value, self.params, self.opt_state = self._train(self.params, self.opt_state,
                                                             _inputs(prepared, "train"))
        self._last = value
        return value

    def sync(self):
        jax.block_until_ready((self._last, self.params))

    def to_numpy(self, value):
        return np.asarray(jax.device_get(value))

    def _put(self, array, dtype=np.int32):
        return jax.device_put(np.asarray(array, dtype=dtype, order="C"), self.dev)

    # -- measurement helpers --
    def device_peak_bytes(self):
        if self.device != "gpu":
            return None
        stats = self.dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return int(peak) if peak is not None else None

    def info(self):
        import jaxlib
        return {
            "jax_version": jax.__version__,
            "jaxlib_version": getattr(jaxlib, "__version__", "unknown"),
            "optax_version": optax.__version__,
            "python": platform.python_version(),
            "platform": self.dev.platform,
            "device_kind": getattr(self.dev, "device_kind", str(self.dev)),
            "x64": bool(jax.config.jax_enable_x64),
            "matmul_precision": jax.config.jax_default_matmul_precision,
            "threads": self.thread_info,
            "traces": dict(self.traces),
            "traces_total": int(sum(self.traces.values())),
            "xla_compiles_in_process": _COMPILES["count"],
            "xla_compile_seconds_in_process": round(_COMPILES["seconds"], 3),
            "compiles": self.compile_counts(),
        }

    def compile_counts(self) -> Dict:
        """XLA compilations this instance caused, by phase: ``train`` (train steps and
        gradients), ``infer`` (logits); seconds as JAX reports them; the programs by name.
        A persistent compilation cache is not used; ``cache_hits`` would show one if the
        environment enabled it (JAX_COMPILATION_CACHE_DIR), and ``cache`` says warm then."""
        out = {p: int(self._compiles[p]) for p in PHASES}
        out.update({p + "_s": round(float(self._compile_s[p]), 3) for p in PHASES})
        out["programs"] = {p: dict(self._compiled_programs[p]) for p in PHASES}
        hits = int(sum(self._cache_hits.values()))
        out["outside_calls_in_process"] = int(_COMPILES["count"]) - out["train"] - out["infer"]
        out["cache_hits"] = hits
        out["cache"] = "warm" if hits else ("cold" if jax.config.jax_compilation_cache_dir
                                            else "off")
        out["counted_by"] = "jax.monitoring backend_compile_duration events during each call"
        return out

    def gemm_ops(self, n):
        rng = np.random.default_rng(0)
        a = jax.device_put(rng.standard_normal((n, n)).astype(np.float32), self.dev)
        b = jax.device_put(rng.standard_normal((n, n)).astype(np.float32), self.dev)
        matmul = jax.jit(jnp.matmul)
        return (lambda: matmul(a, b)), (lambda out: out.block_until_ready())
