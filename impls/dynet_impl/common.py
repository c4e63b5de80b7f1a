"""Shared by the DyNet RNN and RvNN classes: configuration, parameters, loss, optimiser.

DyNet stores matrices for column vectors (``y = W x``), so a canonical
``W: (in, out)`` lives in DyNet as ``W.T: (out, in)``; embeddings are a
``LookupParameters`` of shape ``(V, D)``. Each canonical name has a *slot*:
the DyNet parameter plus the two (linear) maps between layouts, which serve
for values and gradients alike.

Subclasses supply ``_build_params()`` (adds their parameters and slots) and
``_graph(prepared, loss) -> expression``: with ``loss=False`` an expression
whose value is the logits ``(C, B)`` in batch order, with ``loss=True`` the
mean cross-entropy over the labelled classification points (or ``None`` when
there are none). Both are built on a graph renewed by the caller.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from bench.interface import ADAGRAD, ADAM, DeviceUnavailable, Implementation

from . import NOT_APPLICABLE

# DyNet reserves its memory pools at start-up and the whole reservation shows in
# the process's RSS; in 2.1.2 the pools grow on demand (a batch of 25 SST trees
# with every node classified trains in a 64 MB start), so a modest start keeps
# the peak-memory column about the model rather than about this setting.
DYNET_MEM_MB = 256
_CONFIG: Dict = {}


def autobatch_requested() -> bool:
    return os.environ.get("BENCH_DYNET_AUTOBATCH", "0").strip() == "1"


def dynet():
    """Import DyNet, configuring it first if this is the first import in the process."""
    if "dynet" not in sys.modules:
        import dynet_config
        if dynet_config.get() is None:
            # The process-wide autobatch flag only matters as a default: every
            # renew_cg below passes the requested mode explicitly.
            dynet_config.set(mem=str(DYNET_MEM_MB), random_seed=1,
                             autobatch=1 if autobatch_requested() else 0)
            _CONFIG.update(configured_by="impls.dynet_impl via dynet_config before import")
        else:
            _CONFIG.update(configured_by="dynet_config set by the caller before import")
        _CONFIG.update(mem_mb=dynet_config.get().get("mem"))
    elif not _CONFIG:
        _CONFIG.update(configured_by="dynet was imported before impls.dynet_impl (defaults or "
                                     "command-line flags); autobatching still set per graph",
                       mem_mb=None)
    import dynet as dy
    return dy


def transpose() -> Tuple[Callable, Callable]:
    """Canonical (in, out) <-> DyNet (out, in)."""
    return (lambda a: np.ascontiguousarray(a.T)), (lambda a: np.ascontiguousarray(a.T))


def identity() -> Tuple[Callable, Callable]:
    return (lambda a: np.ascontiguousarray(a)), (lambda a: np.ascontiguousarray(a))


def gate_rows(order_from: str, order_to: str, H: int, matrix: bool) -> Tuple[Callable, Callable]:
    """Canonical gate columns in ``order_from`` <-> DyNet gate rows in ``order_to``.

    For a matrix (in, G*H) the DyNet side is (G*H, in) with row blocks
    permuted; for a bias (G*H,) only the blocks are permuted.
    """
    blocks = [order_from.index(g) for g in order_to]
    rows = np.concatenate([np.arange(b * H, (b + 1) * H) for b in blocks])
    back = np.argsort(rows)
    if matrix:
        return (lambda a: np.ascontiguousarray(a.T[rows])), \
               (lambda a: np.ascontiguousarray(a[back].T))
    return (lambda a: np.ascontiguousarray(a[rows])), (lambda a: np.ascontiguousarray(a[back]))


def make_trainer(dy, pc, cfg):
    """DyNet trainer for cfg.optimizer, with clipping off (DyNet clips at norm 5 by default).

    * sgd: ``p -= lr * g``, exactly the suite's rule.
    * adam: DyNet computes ``p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``,
      i.e. eps is not rescaled by the bias correction as in PyTorch/optax;
      the two differ only where sqrt(v) is comparable to eps (~1e-8). Updates are
      dense (``set_sparse_updates(False)``) so untouched embedding rows keep
      decaying their moments as in the other frameworks.
    * adagrad: DyNet computes ``p -= lr * g / sqrt(acc + eps)`` with acc starting at
      0; the suite's initial accumulator (0.1) is seeded by ``seed_adagrad``.
    """
    if cfg.optimizer == "sgd":
        trainer = dy.SimpleSGDTrainer(pc, learning_rate=cfg.lr)
    elif cfg.optimizer == "adam":
        trainer = dy.AdamTrainer(pc, alpha=cfg.lr, beta_1=ADAM["beta1"], beta_2=ADAM["beta2"],
                                 eps=ADAM["eps"])
        trainer.set_sparse_updates(False)
    elif cfg.optimizer == "adagrad":
        trainer = dy.AdagradTrainer(pc, learning_rate=cfg.lr, eps=ADAGRAD["eps"])
    else:
        raise ValueError("unknown optimizer %r" % cfg.optimizer)
    trainer.set_clip_threshold(0.0)  # <= 0 disables clipping
    return trainer


class DynetImplementation(Implementation):
    framework = "dynet"
    not_applicable = NOT_APPLICABLE
    # Coupled L2 as the penalty wd / 2 * ||theta||^2 added to the train step's graph (its
    # gradient is wd * theta on every slot, embedding rows included), so the trainer sees
    # g + wd * theta. DyNet's own ``ParameterCollection.set_weight_decay`` shrinks the
    # weights by (1 - lambda) per update, independently of the learning rate and of the
    # optimiser's moments: another algorithm.
    weight_decay_refusal = None

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.autobatch = autobatch_requested()
        self.dy = dy = dynet()
        self.pc = dy.ParameterCollection()
        self.slots: "OrderedDict[str, Tuple]" = OrderedDict()
        V, D, H, C = cfg.vocab_size, cfg.embed_dim, cfg.hidden, cfg.num_classes
        self.E = self.pc.add_lookup_parameters((V, D))
        self.slots["E"] = (self.E,) + identity()
        self._build_params()
        self.W_o = self.pc.add_parameters((C, H))
        self.b_o = self.pc.add_parameters((C,))
        self.slots["W_o"] = (self.W_o,) + transpose()
        self.slots["b_o"] = (self.b_o,) + identity()
        # A zero-rate SGD "trainer" only clears the accumulated gradients
        # (DyNet's backward adds into them; Python exposes no reset).
        self._clearer = dy.SimpleSGDTrainer(self.pc, learning_rate=0.0)
        self._clearer.set_clip_threshold(0.0)
        self.trainer = None
        self.graphs = 0

    # -- framework hooks (bench.interface) --
    def apply_threads(self, threads):
        return {"requested": int(threads), "applied": 1,
                "how": "the dynet 2.1.2 wheel's CPU backend is single-threaded (Eigen "
                       "without OpenMP or a thread pool; no BLAS linked)"}

    def pick_device(self, device):
        if device == "gpu" and not getattr(dynet(), "HAVE_CUDA", False):
            raise DeviceUnavailable("the dynet 2.1.2 wheel is built without CUDA (dynet.HAVE_CUDA "
                                    "is False); a GPU build needs DyNet compiled from source "
                                    "with CUDA")
        return device

    # -- subclass hooks --
    def _build_params(self) -> None:
        raise NotImplementedError

    def _graph(self, prepared, loss: bool):
        raise NotImplementedError

    # -- parameters --
    def load_params(self, params):
        params = self._checked(params)
        for name, (param, to_dy, _) in self.slots.items():
            value = to_dy(params[name])
            if name == "E":
                param.init_from_array(value)
            else:
                param.set_value(value)
        # A fresh trainer resets the optimiser state, as the interface asks.
        self.trainer = make_trainer(self.dy, self.pc, self.cfg)
        if self.cfg.optimizer == "adagrad":
            self._seed_adagrad(params)

    def _seed_adagrad(self, params):
        """Set DyNet's Adagrad accumulators to the suite's 0.1.

        One update with gradient sqrt(0.1) everywhere leaves acc = 0.1 in every
        entry; the parameter values it moved are then loaded again.
        """
        dy = self.dy
        dy.renew_cg()
        g = float(np.sqrt(ADAGRAD["initial_accumulator"]))
        terms = [dy.sum_elems(p) for name, (p, _, _) in self.slots.items() if name != "E"]
        rows = dy.lookup_batch(self.E, list(range(self.cfg.vocab_size)))
        terms.append(dy.sum_batches(dy.sum_elems(rows)))
        total = dy.esum(terms) * g
        total.value()
        total.backward()
        self.trainer.update()
        for name, (param, to_dy, _) in self.slots.items():
            if name == "E":
                param.init_from_array(to_dy(params[name]))
            else:
                param.set_value(to_dy(params[name]))

    def export_params(self):
        return OrderedDict((name, from_dy(np.asarray(param.as_array(), np.float32)))
                           for name, (param, _, from_dy) in self.slots.items())

    def _grads(self):
        return OrderedDict((name, from_dy(np.asarray(param.grad_as_array(), np.float32)))
                           for name, (param, _, from_dy) in self.slots.items())

    # -- work --
    def _renew(self):
        self.dy.renew_cg(autobatching=self.autobatch)
        self.graphs += 1

    def logits(self, prepared):
        self._renew()
        out = self._graph(prepared, loss=False)
        value = out.npvalue()
        return np.asarray(value, np.float32).reshape(self.cfg.num_classes, -1).T

    def _backward(self, prepared, weight_decay: float = 0.0) -> Tuple[float, bool]:
        """Forward and backward of the loss (its value is returned), plus with a
        ``weight_decay`` the L2 penalty's gradient (``_penalty``)."""
        self._renew()
        loss = self._graph(prepared, loss=True)
        if loss is None and not weight_decay:  # no labelled point: the loss is 0, nothing moves
            return 0.0, False
        value = loss.value() if loss is not None else 0.0
        if weight_decay:
            loss = self._penalty(weight_decay) if loss is None else loss + self._penalty(weight_decay)
        loss.backward()
        return float(value), True

    def _penalty(self, weight_decay: float):
        """``weight_decay / 2 * ||theta||^2`` over every slot (all embedding rows, looked up)."""
        dy = self.dy
        terms = [dy.squared_norm(p) for name, (p, _, _) in self.slots.items() if name != "E"]
        rows = dy.lookup_batch(self.E, list(range(self.cfg.vocab_size)))
        terms.append(dy.sum_batches(dy.squared_norm(rows)))
        return dy.esum(terms) * float(weight_decay / 2.0)

    def loss_and_grads(self, prepared):
        value, had = self._backward(prepared)
        grads = self._grads() if had else OrderedDict(
            (k, np.zeros_like(v)) for k, v in self.export_params().items())
        if had:
            self._clearer.update()
        return value, grads

    def train_step(self, prepared):
        value, had = self._backward(prepared, self.cfg.weight_decay)
        if had:
            self.trainer.update()
        return value

    def to_numpy(self, value):
        return np.asarray(value)

    # -- shared graph pieces --
    def classify(self, h):
        """Logits ``(C,)`` per batch element from hidden states ``(H,)``."""
        return self.dy.affine_transform([self.b_o, self.W_o, h])

    def batched_loss(self, logits, labels: List[int]):
        """Summed cross-entropy of a batched logits expression ``((C,), n)``."""
        return self.dy.sum_batches(self.dy.pickneglogsoftmax_batch(logits, labels))

    # -- measurement --
    def info(self):
        dy = self.dy
        return {
            "dynet_version": getattr(dy, "__gitversion__", getattr(dy, "__version__", "unknown")),
            "autobatch": bool(self.autobatch),
            "autobatch_how": "dy.renew_cg(autobatching=%s) for every graph (BENCH_DYNET_AUTOBATCH=%s)"
                             % (bool(self.autobatch), os.environ.get("BENCH_DYNET_AUTOBATCH")),
            "configured": dict(_CONFIG),
            "threads": self.thread_info,
            "cuda": bool(getattr(dy, "HAVE_CUDA", False)),
            "optimizer": self.cfg.optimizer,
            "gradient_clipping": "disabled",
            "graphs_built": self.graphs,
        }

    def gemm_ops(self, n):
        """DyNet computes when asked: a product is a fresh graph, its two inputs and a forward."""
        dy = self.dy
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n)).astype(np.float32)
        b = rng.standard_normal((n, n)).astype(np.float32)

        def product():
            dy.renew_cg()
            out = dy.inputTensor(a) * dy.inputTensor(b)
            out.forward()
            return out
        return product, (lambda out: None)

def group_plan(targets: np.ndarray, source_level: np.ndarray, offsets: np.ndarray
               ) -> Tuple[List[Tuple[int, Optional[List[int]]]], Optional[List[int]]]:
    """How to gather batch elements ``targets`` (node ids) out of per-level batched states.

    Returns ``(groups, perm)``: ``groups`` is ``[(level, local indices or None
    for the whole level)]`` in level order; concatenating those picks gives
    the targets sorted by level, and ``perm`` (None when already in order)
    restores the order of ``targets``.
    """
    order = np.argsort(source_level, kind="stable")
    groups = []
    for s in np.unique(source_level):
        local = targets[order][source_level[order] == s] - offsets[s]
        width = int(offsets[s + 1] - offsets[s])
        whole = local.size == width and np.array_equal(local, np.arange(width))
        groups.append((int(s), None if whole else [int(i) for i in local]))
    back = np.argsort(order)
    perm = None if np.array_equal(back, np.arange(back.size)) else [int(i) for i in back]
    return groups, perm


def gather(dy, states: List, plan):
    """Batched expression of the elements a ``group_plan`` names, in target order."""
    groups, perm = plan
    pieces = [states[s] if local is None else dy.pick_batch_elems(states[s], local)
              for s, local in groups]
    out = pieces[0] if len(pieces) == 1 else dy.concatenate_to_batch(pieces)
    return out if perm is None else dy.pick_batch_elems(out, perm)
