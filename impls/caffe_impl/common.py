"""Shared Caffe plumbing for both families.

* ``Proto``: prototxt text for a ``Net`` (Caffe's only model description),
  recording which layers use which canonical parameters;
* ``ParamStore``: the master parameter blobs, in canonical layout, held by a
  small net of their own; ``CaffeImplementation.make_net`` puts these very
  blobs (data and diff) into every layer of every net that uses them, the way
  Caffe itself shares a named ``param`` between layers;
* ``Optimizer``: the suite's SGD / Adam / AdaGrad in NumPy, in place on the
  master data with the diffs as gradients (see the package docstring for why
  not Caffe's solvers);
* ``CaffeImplementation``: parameters, loss and gradients, training step,
  threads and measurement helpers; subclasses supply ``prepare``, ``_logits``
  and ``_forward_backward``, and the ``_*_extra`` hooks where a parameter
  lives outside the store (the fused LSTM's weights).

Importing this module loads Caffe (and its OpenBLAS; see ``_openblas_coretype``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def _openblas_coretype() -> Optional[str]:
    """The OpenBLAS kernel set to ask for on this CPU, or None to let OpenBLAS choose.

    Debian 11's OpenBLAS (0.3.13) predates AMD's family 19h (Zen 3 / Zen 4): there its
    runtime CPU detection falls back to the generic ``Prescott`` (SSE3) kernels, about
    3x slower at sgemm here than its ``Zen`` kernels (the ones it picks for family 17h).
    """
    if os.environ.get("OPENBLAS_CORETYPE"):
        return None
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "cpu family", "flags") and key not in info:
                    info[key] = value.strip()
                if len(info) == 3:
                    break
    except OSError:
        return None
    try:
        family = int(info.get("cpu family", "0"))
    except ValueError:
        return None
    flags = info.get("flags", "").split()
    if info.get("vendor_id") == "AuthenticAMD" and family >= 0x19 and "avx2" in flags:
        return "Zen"
    return None


# Net::Init logs every layer at INFO; glog reads this once, when caffe loads.
os.environ.setdefault("GLOG_minloglevel", "2")
# OpenBLAS reads OPENBLAS_CORETYPE once, when it loads with caffe; it is unset again
# afterwards so that no other process started from here inherits it.
_CORETYPE = None if "caffe" in sys.modules else _openblas_coretype()  # else: chosen already
if _CORETYPE:
    os.environ["OPENBLAS_CORETYPE"] = _CORETYPE
try:
    import caffe  # noqa: E402
finally:
    if _CORETYPE:
        del os.environ["OPENBLAS_CORETYPE"]

from bench.environment import limit_blas_threads  # noqa: E402
from bench.interface import ADAGRAD, ADAM, DeviceUnavailable, Implementation  # noqa: E402
from bench.params import schema  # noqa: E402

from . import NOT_APPLICABLE  # noqa: E402

caffe.set_mode_cpu()


def openblas_info() -> Dict:
    """Caffe's OpenBLAS: its build configuration and the kernel set it runs (``corename``)."""
    out = {"coretype_requested": _CORETYPE or os.environ.get("OPENBLAS_CORETYPE"),
           "coretype_note": ("set by impls.caffe_impl: this OpenBLAS does not know this CPU "
                             "and would run its generic Prescott kernels") if _CORETYPE else None}
    try:
        import ctypes
        lib = ctypes.CDLL("libopenblas.so.0")   # the copy caffe loaded (same soname)
        for name in ("openblas_get_corename", "openblas_get_config"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            out[name[len("openblas_get_"):]] = fn().decode()
    except (OSError, AttributeError) as exc:
        out["error"] = str(exc)
    return out


def _caffe_root() -> str:
    """The tree Caffe was unpacked into (``.../root`` of ``fetch_debs.sh``; ``/`` if installed)."""
    return os.path.realpath(os.path.join(os.path.dirname(caffe.__file__), *[".."] * 5))


def blas_pools() -> List[Dict]:
    """Every BLAS / OpenMP pool loaded in this process: library, version, threads, and
    whether it came with Caffe (the BLAS Caffe runs on) or with a pip wheel (NumPy, SciPy)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    root = _caffe_root()
    return [{"api": i.get("internal_api"), "threads": i.get("num_threads"),
             "version": i.get("version"), "library": os.path.basename(i.get("filepath", "")),
             "with_caffe": root != os.sep
             and os.path.realpath(i.get("filepath", "")).startswith(root + os.sep)}
            for i in threadpool_info()]


# --- prototxt ---

def _shape(dims: Sequence[int]) -> str:
    return "shape { %s }" % " ".join("dim: %d" % int(d) for d in dims)


class Proto:
    """A NetParameter as prototxt text, built layer by layer.

    ``param_layers`` maps a layer name to the canonical parameter names of its
    blobs, in order: those blobs are replaced by the master blobs after the
    net is created (``CaffeImplementation.make_net``). Inside one net the same
    names are Caffe ``param`` names, so Caffe shares them at ``Net::Init`` and
    only one throwaway copy is allocated per net.
    """

    def __init__(self, name: str, force_backward: bool = False):
        self.name = name
        self.force_backward = force_backward
        self.inputs: List[Tuple[str, Tuple[int, ...]]] = []
        self.layers: List[str] = []
        self.param_layers: "OrderedDict[str, Tuple[str, ...]]" = OrderedDict()

    def input(self, name: str, shape: Sequence[int]) -> str:
        self.inputs.append((name, tuple(int(d) for d in shape)))
        return name

    def add(self, type_: str, name: str, bottoms: Sequence[str], tops: Sequence[str],
            params: Sequence[str] = (), body: str = "", loss_weights: Sequence[float] = ()) -> str:
        parts = ['name: "%s"' % name, 'type: "%s"' % type_]
        parts += ['bottom: "%s"' % b for b in bottoms]
        parts += ['top: "%s"' % t for t in tops]
        parts += ['param { name: "%s" }' % p for p in params]
        parts += ["loss_weight: %g" % w for w in loss_weights]
        if body:
            parts.append(body)
        self.layers.append("layer { %s }" % " ".join(parts))
        if params:
            self.param_layers[name] = tuple(params)
        return tops[0] if tops else name

    # -- the layer kinds used here --
    def embed(self, name, bottom, top, vocab, dim, loss_weight=None):
        return self.add("Embed", name, [bottom], [top], ("E",),
                        "embed_param { num_output: %d input_dim: %d bias_term: false }"
                        % (dim, vocab), () if loss_weight is None else (loss_weight,))

    def ip(self, name, bottom, top, n_out, params, axis=1):
        """``top = bottom @ W (+ b)`` over the axes from ``axis`` on (``transpose``: W is [in, out])."""
        return self.add("InnerProduct", name, [bottom], [top], params,
                        "inner_product_param { num_output: %d bias_term: %s axis: %d "
                        "transpose: true }" % (n_out, "true" if len(params) > 1 else "false",
                                               axis))

    def act(self, kind, bottom, top):
        return self.add(kind, top, [bottom], [top])

    def eltwise(self, op, bottoms, top):
        return self.add("Eltwise", top, list(bottoms), [top],
                        body="eltwise_param { operation: %s }" % op)

    def slice(self, bottom, tops, axis, points=()):
        body = "slice_param { axis: %d %s}" % (axis, "".join("slice_point: %d " % p
                                                              for p in points))
        return self.add("Slice", "slice_" + bottom, [bottom], list(tops), body=body)

    def concat(self, bottoms, top, axis):
        return self.add("Concat", top, list(bottoms), [top],
                        body="concat_param { axis: %d }" % axis)

    def reshape(self, bottom, top, dims):
        return self.add("Reshape", top, [bottom], [top],
                        body="reshape_param { %s }" % _shape(dims))

    def gather(self, bottom, index, top):
        """Rows ``bottom[index]`` along axis 0 (``BatchReindex``; backward sums repeated rows)."""
        return self.add("BatchReindex", top, [bottom, index], [top])

    def split(self, bottom, tops):
        return self.add("Split", "split_" + bottom, [bottom], list(tops))

    def silence(self, bottom):
        return self.add("Silence", "silence_" + bottom, [bottom], [])

    def softmax_loss(self, logits, labels, top="loss"):
        """Mean cross-entropy over rows whose label is not -1 (0 when there is none)."""
        return self.add("SoftmaxWithLoss", top, [logits, labels], [top],
                        body="loss_param { ignore_label: -1 normalization: VALID }")

    def text(self) -> str:
        head = ['name: "%s"' % self.name]
        if self.force_backward:
            head.append("force_backward: true")
        if self.inputs:
            head.append('layer { name: "input" type: "Input" %s input_param { %s } }'
                        % (" ".join('top: "%s"' % n for n, _ in self.inputs),
                           " ".join(_shape(s) for _, s in self.inputs)))
        return "\n".join(head + self.layers) + "\n"


def net_from_text(text: str):
    """A TRAIN-phase ``caffe.Net`` from prototxt text (pycaffe 1.0 reads nets from files only)."""
    fd, path = tempfile.mkstemp(suffix=".prototxt", prefix="bench_caffe_")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return caffe.Net(path, caffe.TRAIN)
    finally:
        os.unlink(path)


class NetHandle:
    """A built net with its layer indices, and bookkeeping for the copied-in LSTM blobs."""

    def __init__(self, net, build_s: float):
        self.net = net
        self.build_s = build_s
        self.index = {name: i for i, name in enumerate(net._layer_names)}
        self.last = len(net.layers) - 1
        self.version = -1   # parameter version copied in (fused LSTM only)

    def set_input(self, name: str, value: np.ndarray) -> None:
        blob = self.net.blobs[name]
        if tuple(blob.shape) != value.shape:
            blob.reshape(*value.shape)
        blob.data[...] = value

    def forward(self, end: Optional[str] = None) -> float:
        """Run layers 0..end (inclusive; all by default); returns the summed loss."""
        return self.net._forward(0, self.last if end is None else self.index[end])

    def backward(self) -> None:
        self.net._backward(self.last, 0)

    def data(self, name: str) -> np.ndarray:
        return self.net.blobs[name].data

    def diff(self, name: str) -> np.ndarray:
        return self.net.blobs[name].diff


# --- master parameters ---

# Canonical parameters grouped as the layers that own them (weight, bias).
GROUPS = {
    "elman": (("E",), ("W_x", "b"), ("W_h",), ("W_o", "b_o")),
    "lstm": (("E",), ("W_x", "b"), ("W_h",), ("W_o", "b_o")),
    "rvnn": (("E",), ("W_leaf", "b_leaf"), ("W", "b"), ("W_o", "b_o")),
    "treelstm": (("E",), ("W_leaf", "b_leaf"), ("U", "b_U"), ("W_o", "b_o")),
}


class ParamStore:
    """Master blobs for canonical parameters (layout = canonical shapes), owned by a small net."""

    def __init__(self, cfg, names: Sequence[str]):
        shapes = {k: v[0] for k, v in schema(cfg).items()}
        p = Proto("params")
        for group in GROUPS[cfg.model]:
            if not set(group) <= set(names):
                continue
            w = group[0]
            if w == "E":
                p.embed("p_E", p.input("in_E", (1,)), "out_E", *shapes["E"])
            else:
                n_in, n_out = shapes[w]
                p.ip("p_" + w, p.input("in_" + w, (1, n_in)), "out_" + w, n_out, group)
        self.net = net_from_text(p.text())
        self.blob = OrderedDict()
        for lname, group in p.param_layers.items():
            for j, name in enumerate(group):
                self.blob[name] = self.net.params[lname][j]
        # NumPy views of each blob's memory (never reshaped, so they stay valid)
        self.data = OrderedDict((k, b.data) for k, b in self.blob.items())
        self.diff = OrderedDict((k, b.diff) for k, b in self.blob.items())
        for k, v in self.data.items():
            if tuple(v.shape) != tuple(shapes[k]):
                raise AssertionError("master blob %s has shape %s, canonical %s"
                                     % (k, v.shape, shapes[k]))

    def zero_diffs(self) -> None:
        for d in self.diff.values():
            d[...] = 0.0


# --- optimiser ---

class Optimizer:
    """The suite's optimisers on float32 NumPy arrays, updated in place.

    SGD ``p -= lr g``; Adam ``p -= lr m_hat / (sqrt(v_hat) + eps)``; AdaGrad
    ``a += g^2; p -= lr g / (sqrt(a) + eps)`` with ``a`` starting at
    ``ADAGRAD['initial_accumulator']`` (Caffe's AdaGradSolver starts at 0 and
    its Adam puts eps outside the bias correction). Weight decay wd (coupled L2): each
    ``g`` above is ``g + wd * p`` (nothing is added at 0; Caffe's own ``weight_decay``
    belongs to its solvers, which this model does not use).
    """

    def __init__(self, cfg):
        self.kind = cfg.optimizer
        self.lr = float(cfg.lr)
        self.wd = np.float32(cfg.weight_decay)
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self.state: Dict[str, Dict[str, np.ndarray]] = {}

    def _slot(self, key, p):
        st = self.state.get(key)
        if st is None:
            st = {"tmp": np.empty_like(p)}
            if self.kind == "adam":
                st["m"] = np.zeros_like(p)
                st["v"] = np.zeros_like(p)
            elif self.kind == "adagrad":
                st["acc"] = np.full_like(p, ADAGRAD["initial_accumulator"])
            self.state[key] = st
        return st

    def step(self, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]) -> None:
        self.t += 1
        lr = np.float32(self.lr)
        if self.kind == "adam":
            b1, b2 = ADAM["beta1"], ADAM["beta2"]
            c1 = np.float32(lr / (1.0 - b1 ** self.t))
            c2 = np.float32(1.0 / np.sqrt(1.0 - b2 ** self.t))
        for key, g in grads.items():
            p = params[key]
            if self.wd:
                g = g + self.wd * p
            st = self._slot(key, p)
            tmp = st["tmp"]
            if self.kind == "sgd":
                np.multiply(g, lr, out=tmp)
            elif self.kind == "adam":
                m, v = st["m"], st["v"]
                m *= np.float32(b1)
                np.multiply(g, np.float32(1.0 - b1), out=tmp)
                m += tmp
                v *= np.float32(b2)
                np.multiply(g, g, out=tmp)
                tmp *= np.float32(1.0 - b2)
                v += tmp
                np.sqrt(v, out=tmp)            # sqrt(v_hat) + eps = sqrt(v) * c2 + eps
                tmp *= c2
                tmp += np.float32(ADAM["eps"])
                np.divide(m, tmp, out=tmp)
                tmp *= c1
            else:
                acc = st["acc"]
                np.multiply(g, g, out=tmp)
                acc += tmp
                np.sqrt(acc, out=tmp)
                tmp += np.float32(ADAGRAD["eps"])
                np.divide(g, tmp, out=tmp)
                tmp *= lr
            p -= tmp


# --- the implementation base ---

class CaffeImplementation(Implementation):
    framework = "caffe"
    not_applicable = NOT_APPLICABLE
    weight_decay_refusal = None   # in the NumPy optimiser (Optimizer.step)

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.store = ParamStore(cfg, self._store_names())
        self.opt = Optimizer(cfg)
        self.version = 0          # bumped whenever parameters change
        self.nets_built = 0
        self.net_build_s = 0.0

    def apply_threads(self, threads):
        """Cap the BLAS pools loaded now (Caffe's OpenBLAS and NumPy's); ``info()["blas_pools"]``
        reports what holds."""
        limit_blas_threads(int(threads))
        return {"requested": int(threads),
                "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    def pick_device(self, device):
        if device != "cpu":
            raise DeviceUnavailable("this Caffe is Debian's CPU_ONLY build (libcaffe1); a GPU "
                                    "needs a CUDA build of Caffe")
        return device

    def set_weight_decay(self, weight_decay):
        super().set_weight_decay(weight_decay)
        self.opt = Optimizer(self.cfg)   # fresh state; load_params follows

    # --- hooks ---
    def _store_names(self) -> Sequence[str]:
        """Canonical parameters held in master blobs (all, unless a layer keeps its own)."""
        return list(schema(self.cfg))

    def _extra_params(self) -> Dict[str, np.ndarray]:
        """Parameters outside the store (name -> array updated in place by the optimiser)."""
        return {}

    def _load_extra(self, params: Dict[str, np.ndarray]) -> None:
        pass

    def _export_extra(self) -> Dict[str, np.ndarray]:
        return {}

    def _grads_extra(self, grads: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Canonical gradients from the extra parameters' gradients (copies)."""
        return {}

    def _forward_backward(self, prepared) -> Tuple[float, Dict[str, np.ndarray]]:
        """Loss, and gradient arrays keyed like the store and ``_extra_params`` (views)."""
        raise NotImplementedError

    def _logits(self, prepared) -> np.ndarray:
        raise NotImplementedError

    # --- nets ---
    def make_net(self, proto: Proto) -> NetHandle:
        """Build a net and give its layers the master blobs (data and diff shared)."""
        t0 = time.perf_counter()
        handle = NetHandle(net_from_text(proto.text()), 0.0)
        layers = handle.net.layers
        for lname, names in proto.param_layers.items():
            blobs = layers[handle.index[lname]].blobs
            for j, name in enumerate(names):
                blobs[j] = self.store.blob[name]
        handle.build_s = time.perf_counter() - t0
        self.nets_built += 1
        self.net_build_s += handle.build_s
        return handle

    # --- parameters ---
    def load_params(self, params):
        values = self._checked(params)
        for name, arr in self.store.data.items():
            arr[...] = values[name]
        self._load_extra(values)
        self.opt.reset()
        self.version += 1

    def export_params(self):
        out = {k: v.astype(np.float32, copy=True) for k, v in self.store.data.items()}
        out.update(self._export_extra())
        return OrderedDict((name, np.asarray(out[name], np.float32)) for name in schema(self.cfg))

    def _param_arrays(self) -> Dict[str, np.ndarray]:
        out = dict(self.store.data)
        out.update(self._extra_params())
        return out

    # --- work ---
    def logits(self, prepared):
        return self._logits(prepared)

    def loss_and_grads(self, prepared):
        loss, grads = self._forward_backward(prepared)
        out = {k: np.array(grads[k], np.float32) for k in self.store.data}
        out.update(self._grads_extra(grads))
        return float(loss), OrderedDict((name, out[name]) for name in schema(self.cfg))

    def train_step(self, prepared):
        loss, grads = self._forward_backward(prepared)
        self.opt.step(self._param_arrays(), grads)
        self.version += 1
        return np.float32(loss)

    # --- measurement helpers ---
    def info(self):
        return {"caffe": getattr(caffe, "__version__", "unknown"), "mode": "cpu",
                "threads": self.thread_info, "blas_pools": blas_pools(), "openblas": openblas_info(),
                "nets_built": self.nets_built, "net_build_s": round(self.net_build_s, 4),
                "optimizer": "%s in NumPy on the master blobs (Caffe solvers drive one Net; "
                             "this model is one Net per shape)" % self.cfg.optimizer}

    def gemm_ops(self, n):
        """An n x n x n product through Caffe's InnerProduct layer (its BLAS sgemm)."""
        p = Proto("gemm")
        p.add("InnerProduct", "mm", [p.input("a", (n, n))], ["c"],
              body="inner_product_param { num_output: %d bias_term: false transpose: true }" % n)
        net = net_from_text(p.text())
        rng = np.random.default_rng(0)
        net.blobs["a"].data[...] = rng.standard_normal((n, n))
        net.params["mm"][0].data[...] = rng.standard_normal((n, n))
        return (lambda: net._forward(0, 1)), (lambda out: None)
