"""Shared by the torch RNN and RvNN classes.

* device and thread setup (the ``pick_device`` and ``apply_threads`` hooks);
* ``TorchImplementation``: parameter storage, optimiser, loss, gradients,
  sync, peak memory, GEMM peak and ``info()``; subclasses supply the forward
  pass (``_points(prepared) -> (hidden [P, H], labels int64[P], count)``);
* the one place where canonical weights map to ``nn.RNN`` / ``nn.LSTM``
  layout and back (``fused_from_canonical`` and friends).

Parameters are held as ``torch.nn.Parameter`` in the layout the strategy
computes with; for every strategy but ``fused`` that is the canonical layout
itself (row vectors, ``x @ W``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from bench.interface import ADAGRAD, ADAM, DeviceUnavailable, Implementation, one_line
from bench.params import schema

from . import NOT_APPLICABLE


# --- device ---

def force_ieee_fp32() -> Dict[str, str]:
    """Full float32 in cuBLAS and cuDNN RNNs: torch's default lets cuDNN use
    TF32 (10-bit mantissa) on Ampere and later, which is not the float32 the
    suite compares, and fails the 1e-4 logits tolerance at hidden 150."""
    cudnn_rnn = getattr(torch.backends.cudnn, "rnn", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_rnn is not None and hasattr(cudnn_rnn, "fp32_precision"):
        # the new API only: torch refuses a mix of the two
        cudnn_rnn.fp32_precision = "ieee"
        matmul.fp32_precision = "ieee"
        return {"cudnn_rnn_fp32": cudnn_rnn.fp32_precision, "matmul_fp32": matmul.fp32_precision}
    torch.backends.cudnn.allow_tf32 = False
    matmul.allow_tf32 = False
    return {"cudnn_rnn_fp32": "ieee", "matmul_fp32": "ieee"}


def to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").numpy()
    return np.asarray(value)


def long_tensor(array, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, np.int64), device=device)


# --- optimiser ---

def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    """The suite's optimisers with its shared constants (bench.interface).

    ``weight_decay=`` of torch.optim's SGD, Adam and Adagrad is the suite's coupled L2:
    ``grad = grad.add(param, alpha=weight_decay)`` before the update (Adam's
    ``decoupled_weight_decay`` stays False; that is AdamW). At 0 torch skips it.

    Each runs torch's fused kernel (``fused=True``: one pass over each parameter, the same
    update): the default for-loop Adam made several passes over the [V, D] embedding,
    10.4 ms a step against 2.0 fused on 2 CPU threads, a quarter of a batch-25 Tree-LSTM
    training step (results/2026-12-01-speed/NOTES.md).
    """
    params = list(params)
    wd = float(cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=wd, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(ADAM["beta1"], ADAM["beta2"]),
                                eps=ADAM["eps"], weight_decay=wd, fused=True)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr,
                                   initial_accumulator_value=ADAGRAD["initial_accumulator"],
                                   eps=ADAGRAD["eps"], weight_decay=wd, fused=True)
    raise ValueError("unknown optimizer %r" % cfg.optimizer)


# --- canonical <-> nn.RNN / nn.LSTM layout (the only place that knows it) ---
#
# torch keeps W_ih (G, D), W_hh (G, H) for ``x @ W_ih.T`` and two biases.
# Its LSTM gate order is i, f, g, o like the canonical one, so the mapping is a
# transpose; the canonical single bias goes to bias_ih and bias_hh stays a
# frozen zero (were both trained, SGD would move the effective bias twice).

FUSED_FROZEN = ("bias_hh_l0",)


def fused_from_canonical(p: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {
        "weight_ih_l0": np.ascontiguousarray(p["W_x"].T),
        "weight_hh_l0": np.ascontiguousarray(p["W_h"].T),
        "bias_ih_l0": p["b"],
        "bias_hh_l0": np.zeros_like(p["b"]),
    }


def fused_to_canonical(t: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {
        "W_x": np.ascontiguousarray(t["weight_ih_l0"].T),
        "W_h": np.ascontiguousarray(t["weight_hh_l0"].T),
        "b": t["bias_ih_l0"] + t["bias_hh_l0"],
    }


def fused_grads_to_canonical(g: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    # d loss / d b equals the gradient of either torch bias; bias_hh has none (frozen).
    return {
        "W_x": np.ascontiguousarray(g["weight_ih_l0"].T),
        "W_h": np.ascontiguousarray(g["weight_hh_l0"].T),
        "b": g["bias_ih_l0"],
    }


# --- torch.compile bookkeeping ---

def dynamo_counts() -> Dict[str, int]:
    """Process-wide dynamo counters (graphs compiled, frames, graph breaks)."""
    from torch._dynamo.utils import counters
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames": int(counters["frames"]["total"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def private_compile_cache() -> str:
    """Point Inductor's on-disk caches (compiled graphs, kernels) at a fresh directory of this
    process, removed at exit. Inductor caches by default in a directory shared by every process
    of the user, so a cell's first call would be cheaper after an earlier run compiled the same
    graph: compile_s is meant to be a cold compile. A directory given in
    TORCHINDUCTOR_CACHE_DIR is kept (the record then says whether it served anything)."""
    if "dir" not in _CACHE:
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
            _CACHE["dir"], _CACHE["private"] = os.environ["TORCHINDUCTOR_CACHE_DIR"], False
        else:
            _CACHE["dir"], _CACHE["private"] = tempfile.mkdtemp(prefix="bench-inductor-"), True
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE["dir"]
            atexit.register(shutil.rmtree, _CACHE["dir"], True)
    return _CACHE["dir"]


_CACHE: Dict = {}


# torch's compile-time metrics: a frame's compilation (dynamo and Inductor's forward), and
# the backward graph Inductor compiles at the first backward through it
_COMPILE_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


class CompileMeter:
    """Graphs torch.compile built and seconds it spent, charged to the phase of the call
    (``train``: train steps and gradients; ``infer``: logits) in which they happened."""

    def __init__(self):
        self.graphs = {"train": 0, "infer": 0}
        self.seconds = {"train": 0.0, "infer": 0.0}

    @staticmethod
    def _state():
        from torch._dynamo.utils import compilation_time_metrics, counters
        return (int(counters["stats"]["unique_graphs"]),
                tuple(len(compilation_time_metrics.get(k, ())) for k in _COMPILE_TIMERS))

    @contextlib.contextmanager
    def phase(self, name):
        graphs, lengths = self._state()
        try:
            yield
        finally:
            from torch._dynamo.utils import compilation_time_metrics
            now_graphs, now_lengths = self._state()
            self.graphs[name] += now_graphs - graphs
            for key, before, after in zip(_COMPILE_TIMERS, lengths, now_lengths):
                if after > before:
                    self.seconds[name] += float(sum(compilation_time_metrics[key][before:after]))

    def counts(self) -> Dict:
        out = dict(self.graphs)
        out.update({k + "_s": round(v, 3) for k, v in self.seconds.items()})
        out["counted_by"] = ("torch._dynamo unique_graphs (each a compile or recompile) and its "
                             "compilation_time_metrics, around each call")
        return out


def compile_scope():
    """Tracing settings for our compiled functions, scoped to our calls.

    Two dynamo defaults defeat ``dynamic=True`` here: duck sizing gives equal
    sizes one symbol (B == H == 3 in a tiny test), so the graph only fits
    shapes where they stay equal, and ``nn.Parameter`` shapes are forced
    static, so every model size recompiles. Without them one graph per grad
    mode serves every batch and model size (sizes 0 and 1 still specialise).
    """
    import torch.fx.experimental._config as fx_config
    stack = contextlib.ExitStack()
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    stack.enter_context(torch._dynamo.config.patch(force_parameter_static_shapes=False))
    return stack


class TorchImplementation(Implementation):
    framework = "torch"
    not_applicable = NOT_APPLICABLE

    # names of torch-layout tensors that never train (see fused_from_canonical)
    frozen = ()
    # torch.optim's own coupled decay (make_optimizer), built in load_params from self.cfg;
    # a frozen bias takes no decay (the trained one carries the canonical bias, which does)
    weight_decay_refusal = None

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self._precision = force_ieee_fp32() if self.dev.type == "cuda" else {}
        self._dynamo_start = dynamo_counts() if strategy == "compiled" else None
        self._meter = CompileMeter() if strategy == "compiled" else None
        if strategy == "compiled":
            private_compile_cache()
        self.params: "OrderedDict[str, torch.nn.Parameter]" = OrderedDict()
        self.opt: Optional[torch.optim.Optimizer] = None

    def apply_threads(self, threads):
        """Set intra-op and inter-op threads; report what actually holds afterwards.

        ``set_num_interop_threads`` works once per process and only before any
        inter-op work, so a second implementation in the same process (tests)
        keeps the first value; the record says so instead of failing.
        """
        out = {"threads_requested": threads}
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
            out["interop_set"] = True
        except RuntimeError as exc:
            out["interop_set"] = False
            out["interop_error"] = one_line(exc)
        out["intra_op_threads"] = torch.get_num_threads()
        out["interop_threads"] = torch.get_num_interop_threads()
        return out

    def pick_device(self, device):
        if device == "gpu":
            if not torch.cuda.is_available():
                raise DeviceUnavailable("no CUDA device: torch %s sees none (built with CUDA %s)"
                                        % (torch.__version__, torch.version.cuda))
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --- layout hooks (identity except for fused RNNs) ---
    def _to_layout(self, p: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return p

    def _from_layout(self, t: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return t

    def _grads_from_layout(self, g: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return g

    def _canonical_parameters(self) -> "OrderedDict[str, torch.nn.Parameter]":
        """Fresh zero parameters in canonical layout, on the device."""
        return OrderedDict((name, torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32,
                                                                  device=self.dev)))
                           for name, (shape, _) in schema(self.cfg).items())

    # --- parameters ---
    def load_params(self, params):
        values = self._to_layout(self._checked(params))
        if set(values) != set(self.params):
            raise AssertionError("layout names %s != parameter names %s"
                                 % (sorted(values), sorted(self.params)))
        with torch.no_grad():
            for name, value in values.items():
                self.params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        for name, p in self.params.items():
            p.requires_grad_(name not in self.frozen)
            p.grad = None
        self.opt = make_optimizer(self.cfg, [p for n, p in self.params.items()
                                             if n not in self.frozen])

    def export_params(self):
        values = {k: to_numpy(v).astype(np.float32, copy=True) for k, v in self.params.items()}
        out = self._from_layout(values)
        return OrderedDict((name, np.asarray(out[name], np.float32))
                           for name in schema(self.cfg))

    # --- the forward pass, supplied by subclasses ---
    def _points(self, prepared):
        """(hidden [P, H] at the classification points, labels int64 [P], count of labels >= 0)."""
        raise NotImplementedError

    def _logits_rows(self, prepared):
        """Hidden states [B, H] at each example's classification point."""
        raise NotImplementedError

    def _output(self, hidden):
        return hidden @ self.params["W_o"] + self.params["b_o"]

    def _loss(self, prepared):
        hidden, labels, count = self._points(prepared)
        # ignore_index drops unlabelled points; dividing the sum by the count
        # (not 'mean') keeps an all-unlabelled batch at 0 instead of NaN.
        total = F.cross_entropy(self._output(hidden), labels, ignore_index=-1, reduction="sum")
        return total / count

    # --- work ---
    def _phase(self, name):
        return self._meter.phase(name) if self._meter is not None else contextlib.nullcontext()

    def logits(self, prepared):
        with torch.no_grad(), self._phase("infer"):
            return self._output(self._logits_rows(prepared))

    def loss_and_grads(self, prepared):
        for p in self.params.values():
            p.grad = None
        with self._phase("train"):
            loss = self._loss(prepared)
            loss.backward()
        grads = {}
        for name, p in self.params.items():
            if name in self.frozen:
                continue
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[name] = to_numpy(g).astype(np.float32, copy=True)
            p.grad = None
        out = self._grads_from_layout(grads)
        return float(loss.detach()), {name: np.asarray(out[name], np.float32)
                                      for name in schema(self.cfg)}

    def train_step(self, prepared):
        self.opt.zero_grad(set_to_none=True)
        with self._phase("train"):
            loss = self._loss(prepared)
            loss.backward()
        self.opt.step()
        return loss.detach()

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def to_numpy(self, value):
        return to_numpy(value)

    # --- measurement helpers ---
    def device_peak_bytes(self):
        if self.dev.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.dev))
        return None

    def info(self):
        out = {"torch": torch.__version__, "device": str(self.dev)}
        out.update(self.thread_info)
        out["intra_op_threads_now"] = torch.get_num_threads()
        if self.dev.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(self.dev)
            out["cuda"] = torch.version.cuda
            out["cudnn_version"] = torch.backends.cudnn.version()
            out["cudnn_enabled"] = bool(torch.backends.cudnn.enabled)
            out.update(self._precision)
        else:
            out["mkldnn"] = bool(torch.backends.mkldnn.is_available())
        if self._dynamo_start is not None:
            now = dynamo_counts()
            out["compile"] = {k: now[k] - self._dynamo_start[k] for k in now}
            out["compile"]["scope"] = "process-wide dynamo counters since construction"
            # with these on, a warm on-disk cache makes the first call cheaper than a cold compile
            from torch._functorch import config as functorch_config
            from torch._inductor import config as inductor_config
            out["compile"]["fx_graph_cache"] = bool(inductor_config.fx_graph_cache)
            out["compile"]["autograd_cache"] = bool(getattr(functorch_config,
                                                            "enable_autograd_cache", False))
            out["compiles"] = self._meter.counts()
            # an on-disk cache that served a graph makes its compile cheaper than a cold one
            from torch._dynamo.utils import counters
            hits = int(counters["inductor"].get("fxgraph_cache_hit", 0)
                       + counters["aot_autograd"].get("autograd_cache_hit", 0))
            out["compiles"]["cache_hits"] = hits
            out["compiles"]["cache"] = "warm" if hits else "cold"
            out["compiles"]["cache_dir"] = ("private to the process, empty at start"
                                            if _CACHE.get("private") else _CACHE.get("dir"))
        return out

    def gemm_ops(self, n):
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(self.dev)
        b = torch.randn(n, n, generator=gen).to(self.dev)
        return (lambda: a @ b), (lambda out: self.sync())
