"""Shared TensorFlow plumbing for both families.

Process setup (threads, devices, log noise), canonical parameters held as
``tf.Variable``s, the Keras optimisers, the masked cross-entropy loss, the
eager-or-``tf.function`` execution of logits / gradients / training steps, and
the measurement helpers (GEMM FLOP/s, device peak memory).

A subclass supplies the model: ``_make_variables`` (only if the variables live
somewhere special, e.g. inside a Keras layer), ``prepare``, ``_signature`` (for
graph strategies), ``_logits(prepared) -> [B, C]`` and ``_loss(prepared) -> []``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from . import NOT_APPLICABLE  # also sets the log environment before TF is imported

# Known lines TF's C++ side writes where TF_CPP_MIN_LOG_LEVEL=2 cannot hold
# them back: the start-up banner (printed before TF's logging is initialised;
# TF_ENABLE_ONEDNN_OPTS=0 would silence it only by switching oneDNN off) and an
# ERROR-level notice on the first bool transpose (Keras' RNN mask), which says
# oneDNN falls back to Eigen for that op.
_KNOWN_NOISE = ("All log messages before absl::InitializeLog() is called",
                "oneDNN custom operations are on",
                "oneDNN supports DT_BOOL only on platforms with AVX-512")


@contextlib.contextmanager
def known_noise_filtered():
    """Capture file descriptor 2 for the block; write back every line except _KNOWN_NOISE."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not any(n in line for n in _KNOWN_NOISE)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


def _import_tensorflow():
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with known_noise_filtered():
        import tensorflow
    return tensorflow


# Keras layers and optimisers here run on TensorFlow whatever the caller's
# environment says (a Keras-on-torch setting would silently change the backend);
# importing tensorflow already imports keras, so this goes first.
if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "tensorflow"
tf = _import_tensorflow()
import keras  # noqa: E402

from bench.interface import DeviceUnavailable, Implementation  # noqa: E402
from impls.keras_optimizers import keras_optimizer  # noqa: E402


def _quiet() -> None:
    """Silence Python-side TF/absl logging (C++ noise is TF_CPP_MIN_LOG_LEVEL's job)."""
    try:
        import absl.logging
        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    tf.get_logger().setLevel(logging.ERROR)
    tf.autograph.set_verbosity(0)


_quiet()

def device_name(device: str) -> str:
    return "/GPU:0" if device == "gpu" else "/CPU:0"


def masked_xent(logits, labels):
    """Mean softmax cross-entropy over rows with label >= 0 (divided by max(1, count)).

    logits float32[R, C], labels int32[R] -> float32[].
    """
    keep = labels >= 0
    safe = tf.where(keep, labels, tf.zeros_like(labels))
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
    weight = tf.cast(keep, logits.dtype)
    return tf.reduce_sum(xent * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)


def dense(grad, var):
    """A gradient as a dense tensor shaped like ``var`` (None -> zeros)."""
    if grad is None:
        return tf.zeros_like(var)
    if isinstance(grad, tf.IndexedSlices):
        return tf.math.unsorted_segment_sum(grad.values, grad.indices, tf.shape(var)[0])
    return grad


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "numpy"):
        return value.numpy()
    return np.asarray(value)


def gemm_ops(device: str, n: int):
    """(product, finish) for an n x n x n float32 matmul (``bench.flops.time_gemm`` times it);
    reading one element waits for the queued products (GPU execution is async)."""
    with tf.device(device_name(device)):
        a = tf.random.stateless_normal((n, n), seed=(1, 2), dtype=tf.float32)
        b = tf.random.stateless_normal((n, n), seed=(3, 4), dtype=tf.float32)

    def product():
        with tf.device(device_name(device)):
            return tf.matmul(a, b)
    return product, (lambda out: out[0, 0].numpy())


def peak_bytes(device: str) -> Optional[int]:
    """Peak device memory TF's allocator has handed out (GPU only; None on the CPU)."""
    if device != "gpu":
        return None
    try:
        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    except (ValueError, RuntimeError):
        return None


class TFImplementation(Implementation):
    """Parameters, optimiser and execution shared by every TF strategy.

    ``self.graph``: run logits / gradients / train steps as ``tf.function`` with
    ``self._signature()`` as input signature (one trace for every batch of the
    same structure); ``self.xla``: compile those functions with XLA.
    """

    framework = "tensorflow"
    not_applicable = NOT_APPLICABLE
    # coupled L2 added to the gradients in the train step (``_for_optimizer``), never Keras'
    # own ``weight_decay=``, which is decoupled (AdamW-like: ``var -= lr * wd * var``)
    weight_decay_refusal = None

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.graph = False
        self.xla = False
        self._vars = None           # OrderedDict canonical name -> tf.Variable
        self._var_list: List = []
        self._opt = None
        self._opt_initial = []
        self._built_decay = cfg.weight_decay  # the decay the traced train function applies
        self._probe_opt = None                # set_weight_decay's other decay: eager optimiser
        self._traces: Dict[str, int] = {}
        self._fns = {}
        self._last = None
        # compiles by phase: traces of each tf.function, and with XLA one compilation per
        # distinct argument shape (TF keeps no count of its own that Python can read)
        self._compiles = {"train": 0, "infer": 0}
        self._compile_s = {"train": 0.0, "infer": 0.0}
        self._xla_keys = set()
        self._tracing = None   # the function being traced, while tf.function traces it

    # Both hooks must run before TF executes any op. Afterwards TF refuses changes with a
    # RuntimeError: that is caught and ``info()["setup_notes"]`` says what stayed in force.
    def apply_threads(self, threads):
        """intra-op = ``threads`` (the pool one op parallelises over); inter-op = 1 (graph
        ops run one at a time), the suite's policy (bench.environment sets
        TF_NUM_INTEROP_THREADS=1 too), so a cell never computes on more than ``threads``
        cores."""
        notes = []
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            notes.append("thread pools were fixed when TF started earlier in this process")
        return {"notes": notes}

    def pick_device(self, device):
        """TF's device name; a GPU grows its memory on demand, a CPU cell hides the GPUs."""
        gpus = tf.config.list_physical_devices("GPU")
        if device == "gpu" and not gpus:
            raise DeviceUnavailable("no GPU visible to TensorFlow")
        self._device_notes = []
        if device == "gpu":
            for gpu in gpus:
                try:
                    # Grow on demand so the reported peak is what the model used, not
                    # TF's default grab of nearly all device memory.
                    tf.config.experimental.set_memory_growth(gpu, True)
                except (RuntimeError, ValueError):
                    self._device_notes.append("GPU memory growth could not be set "
                                              "(runtime already started)")
        elif gpus:
            try:
                # Keras picks cuDNN whenever a GPU is visible; hide it for CPU cells.
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                self._device_notes.append("GPUs stay visible (runtime already started); ops are "
                                          "pinned to the CPU")
        return device_name(device)

    # --- hooks for subclasses ---
    def _make_variables(self, params) -> "OrderedDict[str, tf.Variable]":
        """Canonical name -> variable holding ``_to_storage(name, value)``."""
        return OrderedDict((k, tf.Variable(self._to_storage(k, v), name=k, dtype=tf.float32))
                           for k, v in params.items())

    def _to_storage(self, name, value: np.ndarray) -> np.ndarray:
        """Canonical layout -> the layout the variable holds (identity unless a layer differs)."""
        return value

    def _from_storage(self, name, value: np.ndarray) -> np.ndarray:
        return value

    def _signature(self):
        raise NotImplementedError

    def _logits(self, prepared):
        raise NotImplementedError

    def _loss(self, prepared):
        raise NotImplementedError

    # --- parameters ---
    def load_params(self, params):
        params = self._checked(params)
        with tf.device(self.dev):
            if self._vars is None:
                self._vars = self._make_variables(params)
                self._var_list = list(self._vars.values())
                self._opt = keras_optimizer(self.cfg.optimizer, self.cfg.lr)
                # Built eagerly so tf.function never creates variables, and so the
                # freshly built state can be restored on the next load.
                self._opt.build(self._var_list)
                self._opt_initial = [(v, v.numpy()) for v in self._opt.variables]
                self._build_functions()
            else:
                # Assign in place: traced functions keep capturing the same variables.
                for name, var in self._vars.items():
                    var.assign(self._to_storage(name, params[name]))
                for var, value in self._opt_initial:
                    var.assign(value)
            if self.cfg.weight_decay != self._built_decay:
                # a fresh optimiser for the probe (set_weight_decay), built eagerly
                self._probe_opt = keras_optimizer(self.cfg.optimizer, self.cfg.lr)
                self._probe_opt.build(self._var_list)

    def export_params(self):
        self._need_params()
        return OrderedDict((k, np.array(self._from_storage(k, v.numpy()), dtype=np.float32))
                           for k, v in self._vars.items())

    def _need_params(self):
        if self._vars is None:
            raise RuntimeError("load_params first")

    # --- execution ---
    def _build_functions(self):
        impls = {"logits": self._logits_body, "grads": self._grads_body, "train": self._train_body}
        for name, body in impls.items():
            if self.graph:
                self._fns[name] = tf.function(self._counted(name, body),
                                              input_signature=[self._signature()],
                                              jit_compile=self.xla, autograph=False)
            else:
                self._fns[name] = body

    def _counted(self, name, body):
        def traced(prepared):
            # Runs only while tracing: counts how often tf.function (re)traced.
            self._traces[name] = self._traces.get(name, 0) + 1
            self._tracing = name
            try:
                with tf.device(self.dev):
                    return body(prepared)
            finally:
                self._tracing = None
        return traced

    def _logits_body(self, prepared):
        return self._logits(prepared)

    def _tape_loss(self, prepared):
        with tf.GradientTape() as tape:
            loss = self._loss(prepared)
        return loss, tape.gradient(loss, self._var_list)

    def _grads_body(self, prepared):
        loss, grads = self._tape_loss(prepared)
        return loss, [dense(g, v) for g, v in zip(grads, self._var_list)]

    def _grads_numpy(self, grads):
        """Dense gradients in storage layout -> canonical NumPy."""
        return OrderedDict((name, np.asarray(self._from_storage(name, g.numpy()), np.float32))
                           for name, g in zip(self._vars, grads))

    def _train_body(self, prepared):
        loss, grads = self._tape_loss(prepared)
        self._opt.apply_gradients(zip(self._for_optimizer(grads), self._var_list))
        return loss

    def set_weight_decay(self, weight_decay):
        """The traced train function keeps the decay it was built with (another would trace
        and, with XLA, compile it again); at another decay (the gate's probe) a step is the
        traced gradients, then ``_for_optimizer`` and a fresh optimiser's update, eagerly."""
        super().set_weight_decay(weight_decay)
        if self.cfg.weight_decay == self._built_decay:
            self._probe_opt = None

    def _probe_step(self, prepared):
        loss, grads = self._call("grads", "train", prepared)
        self._probe_opt.apply_gradients(zip(self._for_optimizer(grads), self._var_list))
        return loss

    def _for_optimizer(self, grads):
        """Gradients as the optimiser should see them.

        With a weight decay wd (``self.cfg.weight_decay``), every gradient is dense and
        ``g + wd * var``: coupled L2, before the optimiser's moments or accumulator. At 0
        nothing is added (and the embedding's may stay sparse, as below).

        The embedding gradient is tf.IndexedSlices (rows of E that were read).
        SGD applies it sparsely (a scatter-subtract, exact: duplicate rows add
        as a dense update would). Adagrad needs one row per index (its square
        of a sum is not the sum of squares) and is exact sparse after that:
        untouched rows get g = 0, which changes neither them nor their
        accumulator. Adam's moments decay on every row, so it gets a dense
        gradient, as in the other frameworks.
        """
        out = []
        wd = float(self.cfg.weight_decay)
        for g, var in zip(grads, self._var_list):
            if wd:
                # every row decays, read by the batch or not: a dense gradient
                g = dense(g, var) + wd * var
            elif isinstance(g, tf.IndexedSlices):
                if self.cfg.optimizer == "adagrad":
                    rows, where = tf.unique(g.indices)
                    g = tf.IndexedSlices(tf.math.unsorted_segment_sum(g.values, where, tf.shape(rows)[0]),
                                         rows, g.dense_shape)
                elif self.cfg.optimizer != "sgd":
                    g = dense(g, var)
            elif g is None:
                g = tf.zeros_like(var)
            out.append(g)
        return out

    def _call(self, name, phase, prepared):
        """Run function ``name``, charging a trace (and with XLA a new argument shape, which
        XLA compiles) to ``phase`` with the seconds of that call."""
        if isinstance(prepared, dict) and "size" in prepared:
            # padded to more rows; training and inference may run on different shapes
            prepared = prepared[phase] if phase in prepared else \
                {k: v for k, v in prepared.items() if k != "size"}
        if not self.graph:
            return self._fns[name](prepared)
        traces = self._traces.get(name, 0)
        key = None
        if self.xla:
            key = (name,) + tuple((k, tuple(v.shape)) for k, v in sorted(prepared.items())
                                  if hasattr(v, "shape"))
        fresh = key is not None and key not in self._xla_keys
        t0 = time.perf_counter() if fresh or traces == 0 else None
        out = self._fns[name](prepared)
        traced = self._traces.get(name, 0) - traces
        if fresh:
            self._xla_keys.add(key)
        if traced or fresh:
            self._compiles[phase] += 1 if fresh else traced
            tf.nest.map_structure(lambda t: t.numpy(), out)   # the call's work is done
            self._compile_s[phase] += time.perf_counter() - t0
        return out

    def logits(self, prepared):
        self._need_params()
        with tf.device(self.dev):
            out = self._call("logits", "infer", prepared)
        self._last = out
        return self._real_rows(out, prepared)

    def _real_rows(self, out, prepared):
        """The logits of the batch's real examples where prepare padded it to more rows
        (``size``: a partial last batch or the verification batch; an eager slice)."""
        size = prepared.get("size") if isinstance(prepared, dict) else None
        return out if size is None or size == out.shape[0] else out[:size]

    def loss_and_grads(self, prepared):
        self._need_params()
        with tf.device(self.dev):
            loss, grads = self._call("grads", "train", prepared)
        return float(loss.numpy()), self._grads_numpy(grads)

    def train_step(self, prepared):
        self._need_params()
        if self._probe_opt is not None:
            with tf.device(self.dev):
                loss = self._last = self._probe_step(prepared)
            return loss
        with tf.device(self.dev):
            loss = self._call("train", "train", prepared)
        self._last = loss
        return loss

    def compile_counts(self) -> Dict:
        out = dict(self._compiles)
        out.update({k + "_s": round(v, 3) for k, v in self._compile_s.items()})
        out["counted_by"] = ("tf.function traces%s; seconds: the calls that traced or compiled, "
                             "their one run included (TF reports no compile time)"
                             % (" and distinct argument shapes of its jit_compile (XLA) functions"
                                if self.xla else ""))
        return out

    def sync(self):
        if self._last is not None:
            self._last.numpy()
        if self.device == "gpu":
            # The loss can be ready while the optimiser's updates are still queued.
            tf.test.experimental.sync_devices()

    def to_numpy(self, value):
        return to_numpy(value)

    # --- measurement ---
    def device_peak_bytes(self):
        return peak_bytes(self.device)

    def gemm_ops(self, n):
        return gemm_ops(self.device, n)

    def info(self):
        out = {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "device": self.dev,
            "threads_requested": self.threads,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "setup_notes": self.thread_info["notes"] + self._device_notes,
            "graph": self.graph,
            "xla": self.xla,
            "traces": dict(self._traces),
            "compiles": self.compile_counts(),
            "embedding_update": "dense (weight decay)" if self.cfg.weight_decay else
                                {"sgd": "sparse", "adagrad": "sparse (deduplicated rows)",
                                 "adam": "dense"}[self.cfg.optimizer],
            "optimizer": type(self._opt).__name__ if self._opt is not None else self.cfg.optimizer,
        }
        if self.device == "gpu":
            try:
                details = tf.config.experimental.get_device_details(
                    tf.config.list_physical_devices("GPU")[0])
                out["gpu"] = details.get("device_name")
            except (IndexError, RuntimeError, ValueError):
                pass
        return out
