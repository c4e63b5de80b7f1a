"""RvNN and Tree-LSTM in PyTorch: strategies ``recursive``, ``levels`` and ``compiled``.

Shapes: B trees, N nodes in the batch (TreeBatch order: by height, children
first), Lf leaves (nodes ``0..Lf-1``), D embedding, H hidden; a node's
children are read as ``hlr = [h_l; h_r]`` ([2H] or [n, 2H]).

* ``recursive``: one call per node, tree by tree in post-order (children,
  then parent), as a recursive implementation visits them; the order is
  precomputed in ``prepare`` so deep trees do not hit Python's recursion
  limit. Each node computes its own h (and c) from [D] / [2H] vectors. The
  embedding rows of all leaves are fetched with one gather first: a per-leaf
  lookup would make autograd build a dense [V, D] gradient per leaf.
* ``levels``: dynamic batching. Level 0 (all leaves of the batch): one
  gather from E and one product. Level k: one gather of the children's rows
  (left/right interleaved, so ``[2n, H]`` views as ``[n, 2H]``), one
  product and its gates, written in place into the level's rows of node
  buffers allocated once per call (``levels_forward``). Training runs the
  same forward inside ``LevelsFunction``, whose backward is written out: the
  heights in reverse, children's gradients added with ``index_add_``, the
  node weights' gradient one product over all heights.
* ``compiled``: the static form ``TreeBatch.padded_packed()`` under
  ``torch.compile``: node buffer ``[N' + 2, H]`` (rows ``zero`` and ``sink``),
  steps of packed node groups ``W'`` wide, written with out-of-place
  ``index_copy``. The steps run in compiled chunks of ``LEVEL_CHUNK`` (step
  count padded with all-padding steps), so one graph serves every bucket;
  shapes are dynamic. (``static_form = "heights"`` runs one step per height
  at the widest height's width, ``padded_bucketed()``: ~4x the padded rows.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from bench.batches import TreeBatch
from bench.targets import ClassPoints, class_points

from .common import TorchImplementation, compile_scope, long_tensor

# Levels per compiled call (a 30-level SST batch is 32 padded levels: 8 calls).
# A chunk's compile time grows with its unroll length; the call overhead it
# saves is tens of microseconds against a level's [W', 2H] x [2H, 5H] product.
LEVEL_CHUNK = 4


# --- cells: work on one node ([D] / [2H]) or on rows ([n, D] / [n, 2H]) ---
# Fewer, fused kernels matter in both strategies (eager cost is per op):
# addmm/addmv instead of product + bias, addcmul for the forget terms, and
# gate blocks taken with split/chunk, whose backward is one cat (a slice's
# backward zero-fills a full-width gradient per slice).

def affine(x, W, b):
    return torch.addmm(b, x, W) if x.dim() == 2 else torch.addmv(b, W.t(), x)


def rvnn_leaf(x, W_leaf, b_leaf):
    return torch.tanh(affine(x, W_leaf, b_leaf)), None


def rvnn_node(hlr, c_l, c_r, W, b):
    return torch.tanh(affine(hlr, W, b)), None


def treelstm_leaf(x, W_leaf, b_leaf):
    z = affine(x, W_leaf, b_leaf)
    H = z.shape[-1] // 3
    z_io, z_u = z.split([2 * H, H], dim=-1)
    i, o = torch.sigmoid(z_io).chunk(2, dim=-1)
    c = i * torch.tanh(z_u)
    return o * torch.tanh(c), c


def treelstm_node(hlr, c_l, c_r, U, b_U):
    z = affine(hlr, U, b_U)
    H = z.shape[-1] // 5
    z_g, z_u = z.split([4 * H, H], dim=-1)
    i, f_l, f_r, o = torch.sigmoid(z_g).chunk(4, dim=-1)   # one kernel for four gates
    c = torch.addcmul(torch.addcmul(i * torch.tanh(z_u), f_l, c_l), f_r, c_r)
    return o * torch.tanh(c), c


CELLS = {
    "rvnn": (rvnn_leaf, rvnn_node, ("W_leaf", "b_leaf"), ("W", "b")),
    "treelstm": (treelstm_leaf, treelstm_node, ("W_leaf", "b_leaf"), ("U", "b_U")),
}


# --- levels: the cells again, in place. Given a level's product z, they apply its gates in
# place (z then holds the activations the backward reads) and write the level's h (and c)
# into its rows of the node buffers. An SST batch is ~12-30 heights of kernels a few hundred
# floats wide, so the cost is per kernel: no appends, no fresh tensors for the gates, and a
# backward written out (LevelsFunction) instead of autograd's node per operator. ---

def rvnn_leaf_into(z, h_out, c_out):
    torch.tanh(z, out=h_out)


def rvnn_node_into(z, c_l, c_r, h_out, c_out):
    torch.tanh(z, out=h_out)


def treelstm_leaf_into(z, h_out, c_out):
    H = h_out.shape[1]
    z_io, z_u = z.split([2 * H, H], dim=1)
    i, o = z_io.sigmoid_().chunk(2, dim=1)
    torch.mul(i, z_u.tanh_(), out=c_out)
    torch.tanh(c_out, out=h_out).mul_(o)


def treelstm_node_into(z, c_l, c_r, h_out, c_out):
    H = h_out.shape[1]
    z_g, z_u = z.split([4 * H, H], dim=1)
    i, f_l, f_r, o = z_g.sigmoid_().chunk(4, dim=1)
    # the order of treelstm_node's sums: i * u first, then the two forget terms
    torch.mul(i, z_u.tanh_(), out=c_out).addcmul_(f_l, c_l).addcmul_(f_r, c_r)
    torch.tanh(c_out, out=h_out).mul_(o)


INTO = {"rvnn": (rvnn_leaf_into, rvnn_node_into),
        "treelstm": (treelstm_leaf_into, treelstm_node_into)}
_sigmoid_grad = torch.ops.aten.sigmoid_backward.grad_input   # dy * y (1 - y), into its out
_tanh_grad = torch.ops.aten.tanh_backward.grad_input         # dy (1 - y^2), into its out


@dataclass
class LevelBuffers:
    """One forward pass of ``levels``: node states and what the backward reads."""
    h: torch.Tensor                 # [N, H], leaves first, then each height's rows
    c: Optional[torch.Tensor]       # [N, H] (Tree-LSTM)
    z_leaf: torch.Tensor            # [Lf, 3H] activated leaf gates (RvNN: pre-activations)
    z: torch.Tensor                 # [N - Lf, 5H] activated node gates (RvNN: [.., H])
    hlr: torch.Tensor               # [N - Lf, 2H] each node's children's h
    clr: Optional[torch.Tensor]     # [N - Lf, 2H] each node's children's c (Tree-LSTM)


def levels_forward(model: str, x, W_leaf, b_leaf, W, b, sizes: List[int],
                   level_lr: List[torch.Tensor]) -> LevelBuffers:
    """Every node's state, a height at a time: the leaves in one product, then per height one
    gather of the children's rows (left/right interleaved, so [2n, H] views as [n, 2H]), one
    product and its gates, all written into rows of buffers allocated once per call."""
    leaf_into, node_into = INTO[model]
    H = W.shape[0] // 2
    N, Lf = sum(sizes), sizes[0]
    out = LevelBuffers(h=x.new_empty(N, H), c=x.new_empty(N, H) if model == "treelstm" else None,
                       z_leaf=x.new_empty(Lf, W_leaf.shape[1]), z=x.new_empty(N - Lf, W.shape[1]),
                       hlr=x.new_empty(N - Lf, 2 * H),
                       clr=x.new_empty(N - Lf, 2 * H) if model == "treelstm" else None)
    hs, zs, hlrs = out.h.split(sizes), out.z.split(sizes[1:]), out.hlr.split(sizes[1:])
    cs = out.c.split(sizes) if out.c is not None else [None] * len(sizes)
    clrs = out.clr.split(sizes[1:]) if out.clr is not None else [None] * len(zs)
    leaf_into(torch.addmm(b_leaf, x, W_leaf, out=out.z_leaf), hs[0], cs[0])
    for k, lr in enumerate(level_lr):
        torch.index_select(out.h, 0, lr, out=hlrs[k].view(-1, H))
        c_l = c_r = None
        if out.c is not None:
            torch.index_select(out.c, 0, lr, out=clrs[k].view(-1, H))
            c_l, c_r = clrs[k].view(-1, 2, H).unbind(1)
        node_into(torch.addmm(b, hlrs[k], W, out=zs[k]), c_l, c_r, hs[k + 1], cs[k + 1])
    return out


def _treelstm_cell_grad(dh, dc_in, c, act, dz, clr=None):
    """Tree-LSTM cells' backward, a level at a time: the gradient of the pre-activations into
    ``dz``, from dh, the memory's gradient from above (``dc_in``) and the activations
    ``act`` (leaves [i, o, u]; nodes [i, f_l, f_r, o, u], with their children's memories
    ``clr`` [n, 2, H]). Returns the memory's gradient, which nodes pass on to the children."""
    H = dh.shape[1]
    gates = act.shape[1] - H            # the sigmoid blocks; u, the tanh block, is last
    i, o, u = act[:, :H], act[:, gates - H:gates], act[:, gates:]
    di, do, du = dz[:, :H], dz[:, gates - H:gates], dz[:, gates:]
    tc = torch.tanh(c)
    torch.mul(dh, tc, out=do)
    dc = dh * o
    _tanh_grad(dc, tc, grad_input=dc).add_(dc_in)
    torch.mul(dc, u, out=di)
    torch.mul(dc, i, out=du)
    if clr is not None:                 # the forget blocks: d f_l = dc c_l, d f_r = dc c_r
        torch.mul(dc.unsqueeze(1), clr, out=dz[:, H:3 * H].view(-1, 2, H))
    _sigmoid_grad(dz[:, :gates], act[:, :gates], grad_input=dz[:, :gates])
    _tanh_grad(du, u, grad_input=du)
    return dc


class LevelsFunction(torch.autograd.Function):
    """``levels_forward``'s h of every node, with its backward written out: the heights in
    reverse, each one's gate gradients into rows of one [N - Lf, 5H] buffer, its children's
    gradients added to their rows (index_add_), and the node weights' gradient as one product
    over all heights at the end."""

    @staticmethod
    def forward(ctx, x, W_leaf, b_leaf, W, b, model, sizes, level_lr):
        buf = levels_forward(model, x, W_leaf, b_leaf, W, b, sizes, level_lr)
        # (not dataclasses.astuple: it deep-copies the tensors)
        ctx.save_for_backward(x, W_leaf, W, *(getattr(buf, f.name) for f in fields(buf)))
        ctx.sizes, ctx.level_lr = sizes, level_lr
        return buf.h

    @staticmethod
    def backward(ctx, dh_all):
        x, W_leaf, W, *saved = ctx.saved_tensors
        buf, sizes = LevelBuffers(*saved), ctx.sizes
        H = W.shape[0] // 2
        dH = dh_all.clone()
        dZ, dz_leaf = torch.empty_like(buf.z), torch.empty_like(buf.z_leaf)
        # per-level views, as in the forward: index_add_ writes through them into dH, dC
        dHs, hs, zs, dZs = dH.split(sizes), buf.h.split(sizes), buf.z.split(sizes[1:]), \
            dZ.split(sizes[1:])
        if buf.c is not None:
            dC = torch.zeros_like(buf.c)
            dCs, cs, clrs = dC.split(sizes), buf.c.split(sizes), buf.clr.split(sizes[1:])
        for k in reversed(range(len(ctx.level_lr))):
            lr, dz = ctx.level_lr[k], dZs[k]
            if buf.c is not None:
                dc = _treelstm_cell_grad(dHs[k + 1], dCs[k + 1], cs[k + 1], zs[k], dz,
                                         clrs[k].view(-1, 2, H))
                f_lr = zs[k][:, H:3 * H].view(-1, 2, H)
                dC.index_add_(0, lr, (dc.unsqueeze(1) * f_lr).view(-1, H))
            else:
                _tanh_grad(dHs[k + 1], hs[k + 1], grad_input=dz)
            dH.index_add_(0, lr, torch.mm(dz, W.t()).view(-1, H))
        if buf.c is not None:
            _treelstm_cell_grad(dHs[0], dCs[0], cs[0], buf.z_leaf, dz_leaf)
        else:
            _tanh_grad(dHs[0], hs[0], grad_input=dz_leaf)
        need = ctx.needs_input_grad
        return (torch.mm(dz_leaf, W_leaf.t()) if need[0] else None,
                torch.mm(x.t(), dz_leaf) if need[1] else None,
                dz_leaf.sum(0) if need[2] else None,
                torch.mm(buf.hlr.t(), dZ) if need[3] else None,
                dZ.sum(0) if need[4] else None,
                None, None, None)


# --- compiled pieces: one top-level function per model, so each has its own
# code object and so its own dynamo cache (closures would share one) ---

def _rvnn_leaves(E, W_leaf, b_leaf, leaf_token, leaf_node, rows):
    h, _ = rvnn_leaf(F.embedding(leaf_token, E), W_leaf, b_leaf)
    return h.new_zeros(rows, h.shape[1]).index_copy(0, leaf_node, h)


def _treelstm_leaves(E, W_leaf, b_leaf, leaf_token, leaf_node, rows):
    h, c = treelstm_leaf(F.embedding(leaf_token, E), W_leaf, b_leaf)
    zeros = h.new_zeros(rows, h.shape[1])
    return zeros.index_copy(0, leaf_node, h), zeros.index_copy(0, leaf_node, c)


def _rvnn_levels(hbuf, level_node, level_lr, W, b):
    # level_node [K, W'], level_lr [K, 2W'] (left, right interleaved)
    H = hbuf.shape[1]
    for k in range(level_node.shape[0]):
        h, _ = rvnn_node(hbuf.index_select(0, level_lr[k]).view(-1, 2 * H), None, None, W, b)
        hbuf = hbuf.index_copy(0, level_node[k], h)
    return hbuf


def _treelstm_levels(hbuf, cbuf, level_node, level_lr, U, b_U):
    H = hbuf.shape[1]
    for k in range(level_node.shape[0]):
        lr = level_lr[k]
        clr = cbuf.index_select(0, lr).view(-1, 2, H)
        h, c = treelstm_node(hbuf.index_select(0, lr).view(-1, 2 * H), clr[:, 0], clr[:, 1],
                             U, b_U)
        hbuf = hbuf.index_copy(0, level_node[k], h)
        cbuf = cbuf.index_copy(0, level_node[k], c)
    return hbuf, cbuf


_COMPILED = {}


def compiled_tree_fns(model: str):
    """(leaves, levels) compiled once per process: instances share their graphs."""
    if model not in _COMPILED:
        fns = {"rvnn": (_rvnn_leaves, _rvnn_levels),
               "treelstm": (_treelstm_leaves, _treelstm_levels)}[model]
        _COMPILED[model] = tuple(torch.compile(f, dynamic=True) for f in fns)
    return _COMPILED[model]


def _rows(points: ClassPoints, device) -> Optional[torch.Tensor]:
    """The classified rows as an index tensor; None where every row is (no gather)."""
    return None if points.every_row else long_tensor(points.rows, device)


@dataclass
class PreparedTrees:
    labels: torch.Tensor            # int64[P]: labels at the classification points
    count: float                    # labelled points, at least 1
    points: Optional[torch.Tensor]  # int64[P] rows of the node buffer; None: all rows
    roots: torch.Tensor             # int64[B]
    leaf_token: torch.Tensor        # int64[Lf] (compiled: [Lf'])
    # recursive
    order: Optional[List[Tuple[int, int, int]]] = None   # (node, left, right), post-order
    num_nodes: int = 0
    root_list: Optional[List[int]] = None
    # levels
    level_lr: Optional[List[torch.Tensor]] = None        # per level >= 1: int64[2n]
    level_sizes: Optional[List[int]] = None              # nodes per level, leaves first
    # compiled
    leaf_node: Optional[torch.Tensor] = None             # int64[Lf']
    level_node: Optional[torch.Tensor] = None            # int64[L'', W']
    level_lr_padded: Optional[torch.Tensor] = None       # int64[L'', 2W']
    rows: int = 0                                        # N' + 2


class RvNN(TorchImplementation):
    family = "rvnn"
    # compiled: "packed" (TreeBatch.padded_packed) or "heights" (padded_bucketed)
    static_form = "packed"

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.params = self._canonical_parameters()
        self._leaf, self._node, self._leaf_names, self._node_names = CELLS[cfg.model]
        if strategy == "compiled":
            self._c_leaves, self._c_levels = compiled_tree_fns(cfg.model)

    # --- data ---
    def prepare(self, batch: TreeBatch) -> PreparedTrees:
        if not isinstance(batch, TreeBatch):
            raise TypeError("the RvNN family needs a TreeBatch, got %s" % type(batch).__name__)
        dev = self.dev
        if self.strategy == "compiled":
            return self._prepare_padded(batch)
        points = class_points(batch, self.cfg.loss_mode)
        n_leaves = int(batch.level_offsets[1])
        out = PreparedTrees(labels=long_tensor(points.labels, dev),
                            count=float(points.count),
                            points=_rows(points, dev),
                            roots=long_tensor(batch.root, dev),
                            leaf_token=long_tensor(batch.token[:n_leaves], dev))
        if self.strategy == "recursive":
            out.order = batch.postorder()
            out.num_nodes = batch.num_nodes
            out.root_list = batch.root.tolist()
        else:
            out.level_lr = [long_tensor(lr.reshape(-1), dev) for lr in batch.level_children()]
            out.level_sizes = np.diff(batch.level_offsets).tolist()
        return out

    def _prepare_padded(self, batch):
        dev = self.dev
        p = batch.padded_packed() if self.static_form == "packed" else batch.padded_bucketed()
        p = p.steps_multiple_of(LEVEL_CHUNK)
        chunks, width = p.level_node.shape
        lr = np.stack([p.level_left, p.level_right], axis=-1)
        points = class_points(p, self.cfg.loss_mode)
        return PreparedTrees(labels=long_tensor(points.labels, dev),
                             count=float(points.count),
                             points=_rows(points, dev),
                             roots=long_tensor(p.root, dev),
                             leaf_token=long_tensor(p.leaf_token, dev),
                             leaf_node=long_tensor(p.leaf_node, dev),
                             level_node=long_tensor(p.level_node, dev),
                             level_lr_padded=long_tensor(lr.reshape(chunks, 2 * width), dev),
                             rows=p.num_nodes + 2)

    # --- forward: the hidden state of every node ([N, H] / [N' + 2, H]) ---
    def _recursive(self, ready: PreparedTrees) -> List[torch.Tensor]:
        p = self.params
        W_leaf, b_leaf = (p[n] for n in self._leaf_names)
        W, b = (p[n] for n in self._node_names)
        leaf, node = self._leaf, self._node
        xs = F.embedding(ready.leaf_token, p["E"]).unbind(0)
        hs: List[Optional[torch.Tensor]] = [None] * ready.num_nodes
        cs: List[Optional[torch.Tensor]] = [None] * ready.num_nodes
        for n, left, right in ready.order:
            if left < 0:
                hs[n], cs[n] = leaf(xs[n], W_leaf, b_leaf)
            else:
                hs[n], cs[n] = node(torch.cat([hs[left], hs[right]]), cs[left], cs[right], W, b)
        return hs

    def _levels(self, ready: PreparedTrees) -> torch.Tensor:
        p = self.params
        x = F.embedding(ready.leaf_token, p["E"])
        weights = [p[n] for n in self._leaf_names + self._node_names]
        if torch.is_grad_enabled():
            return LevelsFunction.apply(x, *weights, self.cfg.model, ready.level_sizes,
                                        ready.level_lr)
        return levels_forward(self.cfg.model, x, *weights, ready.level_sizes, ready.level_lr).h

    def _compiled(self, ready: PreparedTrees) -> torch.Tensor:
        p = self.params
        W, b = (p[n] for n in self._node_names)
        leaf_args = (p["E"], *(p[n] for n in self._leaf_names), ready.leaf_token,
                     ready.leaf_node, ready.rows)
        with compile_scope():
            if self.cfg.model == "rvnn":
                hbuf = self._c_leaves(*leaf_args)
                for s in range(0, ready.level_node.shape[0], LEVEL_CHUNK):
                    hbuf = self._c_levels(hbuf, ready.level_node[s:s + LEVEL_CHUNK],
                                          ready.level_lr_padded[s:s + LEVEL_CHUNK], W, b)
            else:
                hbuf, cbuf = self._c_leaves(*leaf_args)
                for s in range(0, ready.level_node.shape[0], LEVEL_CHUNK):
                    hbuf, cbuf = self._c_levels(hbuf, cbuf, ready.level_node[s:s + LEVEL_CHUNK],
                                                ready.level_lr_padded[s:s + LEVEL_CHUNK], W, b)
        return hbuf

    def _hidden_at(self, ready: PreparedTrees, idx: Optional[torch.Tensor],
                   rows: Optional[List[int]]) -> torch.Tensor:
        if self.strategy == "recursive":
            hs = self._recursive(ready)
            return torch.stack(hs if rows is None else [hs[r] for r in rows])
        h = self._levels(ready) if self.strategy == "levels" else self._compiled(ready)
        return h if idx is None else h.index_select(0, idx)

    def _points(self, ready):
        rows = ready.root_list if ready.points is not None else None
        return self._hidden_at(ready, ready.points, rows), ready.labels, ready.count

    def _logits_rows(self, ready):
        return self._hidden_at(ready, ready.roots, ready.root_list)

    def info(self):
        out = super().info()
        out["strategy_detail"] = {
            "recursive": "one call per node, per-tree post-order, leaf embeddings in one gather",
            "levels": "one gather + product per tree height, in place; backward written out",
            "compiled": "torch.compile(dynamic=True): leaves + %d-step chunks on the %s "
                        "static form" % (LEVEL_CHUNK, self.static_form),
        }[self.strategy]
        return out
