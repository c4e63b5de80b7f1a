"""RvNN and Tree-LSTM in Caffe: strategies ``levels`` and ``recursive``.

Shapes: B trees, N nodes (TreeBatch order: by height, children first), Lf
leaves (nodes ``0..Lf-1``), D embedding, H hidden. A node's children are
read as ``[h_l; h_r]`` ([2H], or [n, 2H] for a level).

* ``levels``: one net per number of levels L (``levels_net``). Level 0: all
  leaves, ``Embed`` + the leaf cell. Level k: ``BatchReindex`` gathers the
  children's rows (left, right interleaved: [2n, H], reshaped to [n, 2H]),
  the node cell runs on the n nodes, and ``Concat`` appends them to the rows
  so far (as torch's ``levels`` does with ``cat``), so the rows are TreeBatch
  node order. Roots (or every node) go through the output layer and the loss.
  The level sizes come from the shapes of the index inputs, which Caffe
  propagates on every forward, so nets are cached per L only.
* ``recursive``: one call per node from Python, tree by tree in post-order
  (precomputed in ``prepare``), on one-row cell nets: the leaf cell
  ``[1, D] -> h (, c)`` and the internal cell ``[1, H] x 2 (, c x 2) -> h (, c)``.
  An ``Embed`` net fetches all leaf embeddings in one gather; the output
  layer and loss run once over the classification points. Training then goes
  back node by node, parents first: each node's activations, saved at its
  forward, are put back into the cell net, the gradient of its outputs is
  set as the top diff, ``Backward`` runs, and the input diffs go to its
  children (and the leaves' to the ``Embed`` net). Parameter gradients
  accumulate in the shared master blobs, as Caffe accumulates every diff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from bench.batches import TreeBatch
from bench.targets import class_points

from .common import CaffeImplementation, NetHandle, Proto


# --- cells, as layers (rows [n, *]) ---

def leaf_cell(p: Proto, cfg, x: str, tag: str) -> Tuple[str, Optional[str]]:
    """``h = tanh(x W_leaf + b_leaf)``, or the Tree-LSTM leaf; returns the (h, c) blob names."""
    H = cfg.hidden
    if cfg.model == "rvnn":
        z = p.ip("leaf" + tag, x, "zl" + tag, H, ("W_leaf", "b_leaf"))
        return p.act("TanH", z, "h" + tag), None
    z = p.ip("leaf" + tag, x, "zl" + tag, 3 * H, ("W_leaf", "b_leaf"))      # [i, o, u]
    z_io, z_u = "zio" + tag, "zu" + tag
    p.slice(z, [z_io, z_u], axis=1, points=(2 * H,))
    s_io = p.act("Sigmoid", z_io, "sio" + tag)
    i, o = "i" + tag, "o" + tag
    p.slice(s_io, [i, o], axis=1)
    u = p.act("TanH", z_u, "u" + tag)
    c = p.eltwise("PROD", [i, u], "c" + tag)
    return _lstm_out(p, o, c, tag), c


def node_cell(p: Proto, cfg, hlr: str, c_l: Optional[str], c_r: Optional[str],
              tag: str) -> Tuple[str, Optional[str]]:
    """``h = tanh([h_l; h_r] W + b)``, or the Tree-LSTM internal node."""
    H = cfg.hidden
    if cfg.model == "rvnn":
        z = p.ip("node" + tag, hlr, "zn" + tag, H, ("W", "b"))
        return p.act("TanH", z, "h" + tag), None
    z = p.ip("node" + tag, hlr, "zn" + tag, 5 * H, ("U", "b_U"))          # [i, f_l, f_r, o, u]
    z_g, z_u = "zg" + tag, "zu" + tag
    p.slice(z, [z_g, z_u], axis=1, points=(4 * H,))
    s_g = p.act("Sigmoid", z_g, "sg" + tag)
    i, f_l, f_r, o = ("%s%s" % (k, tag) for k in ("i", "fl", "fr", "o"))
    p.slice(s_g, [i, f_l, f_r, o], axis=1)
    u = p.act("TanH", z_u, "u" + tag)
    iu = p.eltwise("PROD", [i, u], "iu" + tag)
    fc_l = p.eltwise("PROD", [f_l, c_l], "fcl" + tag)
    fc_r = p.eltwise("PROD", [f_r, c_r], "fcr" + tag)
    c = p.eltwise("SUM", [iu, fc_l, fc_r], "c" + tag)
    return _lstm_out(p, o, c, tag), c


def _lstm_out(p: Proto, o: str, c: str, tag: str) -> str:
    tc = p.act("TanH", c, "tc" + tag)
    return p.eltwise("PROD", [o, tc], "h" + tag)


# --- levels: one net per number of levels ---

def levels_net(cfg, num_levels: int) -> Proto:
    H = cfg.hidden
    lstm = cfg.model == "treelstm"
    p = Proto("%s_levels_L%d" % (cfg.model, num_levels))
    x = p.embed("embed", p.input("leaf_tokens", (1,)), "x", cfg.vocab_size, cfg.embed_dim)
    h_all, c_all = leaf_cell(p, cfg, x, "_0")
    for k in range(1, num_levels):
        lr = p.input("lr_%d" % k, (2,))
        hlr = p.reshape(p.gather(h_all, lr, "gh_%d" % k), "hlr_%d" % k, (-1, 2 * H))
        c_l = c_r = None
        if lstm:
            clr = p.reshape(p.gather(c_all, lr, "gc_%d" % k), "clr_%d" % k, (-1, 2 * H))
            c_l, c_r = "cl_%d" % k, "cr_%d" % k
            p.slice(clr, [c_l, c_r], axis=1)
        h, c = node_cell(p, cfg, hlr, c_l, c_r, "_%d" % k)
        h_all = p.concat([h_all, h], "hall_%d" % k, axis=0)
        if lstm and k < num_levels - 1:
            c_all = p.concat([c_all, c], "call_%d" % k, axis=0)
        elif lstm:
            p.silence(c)   # the last level's c feeds nothing
    if lstm and num_levels == 1:
        p.silence(c_all)
    root = p.gather(h_all, p.input("roots", (1,)), "h_root")
    p.ip("out", root, "logits", cfg.num_classes, ("W_o", "b_o"))
    if cfg.loss_mode == "root":
        p.softmax_loss("logits", p.input("labels", (1,)))
    else:
        # construction-time shapes: one leaf and one node per level, so num_levels rows
        labels = p.input("labels", (num_levels,))
        p.ip("out_all", h_all, "logits_all", cfg.num_classes, ("W_o", "b_o"))
        p.softmax_loss("logits_all", labels)
    return p


# --- recursive: one-row cell nets, driven from Python ---

def embed_net(cfg) -> Proto:
    """All leaf embeddings in one gather; loss_weight on x lets a set diff drive its backward."""
    p = Proto("%s_embed" % cfg.model)
    p.embed("embed", p.input("tokens", (1,)), "x", cfg.vocab_size, cfg.embed_dim, loss_weight=1)
    return p


def _outputs(p: Proto, h: str, c: Optional[str]) -> None:
    """Name the cell's outputs "h" (and "c"): a c that the cell also reads gets its own copy
    (Split), so the diff set on the output is not overwritten by the cell's own backward."""
    p.add("Split", "h_out", [h], ["h"])
    if c is not None:
        p.split(c, ["c", "c_use_" + c])


def leaf_net(cfg) -> Proto:
    p = Proto("%s_leaf" % cfg.model, force_backward=True)
    h, c = leaf_cell(p, cfg, p.input("xin", (1, cfg.embed_dim)), "_leaf")
    _outputs(p, h, c)
    return p


def node_net(cfg) -> Proto:
    H = cfg.hidden
    p = Proto("%s_node" % cfg.model, force_backward=True)
    hlr = p.concat([p.input("hl", (1, H)), p.input("hr", (1, H))], "hlr", axis=1)
    c_l = c_r = None
    if cfg.model == "treelstm":
        c_l, c_r = p.input("cl", (1, H)), p.input("cr", (1, H))
    h, c = node_cell(p, cfg, hlr, c_l, c_r, "_node")
    _outputs(p, h, c)
    return p


def head_net(cfg) -> Proto:
    p = Proto("%s_head" % cfg.model, force_backward=True)
    p.ip("out", p.input("hid", (1, cfg.hidden)), "logits", cfg.num_classes, ("W_o", "b_o"))
    p.softmax_loss("logits", p.input("labels", (1,)))
    return p


class CellNet:
    """A one-row cell net with cached NumPy views of its blobs (fixed shapes, so stable)."""

    def __init__(self, handle: NetHandle, inputs, lstm: bool):
        self.handle = handle
        net = handle.net
        # One forward first: a Split top takes its bottom's memory (ShareData) on every
        # forward, so views taken before the first one would point at released memory.
        net._forward(0, handle.last)
        self.inputs = [net.blobs[n].data[0] for n in inputs]
        self.input_diffs = [net.blobs[n].diff[0] for n in inputs]
        self.h = net.blobs["h"].data[0]
        self.h_diff = net.blobs["h"].diff[0]
        self.c = net.blobs["c"].data[0] if lstm else None
        self.c_diff = net.blobs["c"].diff[0] if lstm else None
        # every blob's data: what Backward reads (inputs, activations, outputs)
        self.state = [b.data for b in net.blobs.values()]
        self.fwd = lambda: net._forward(0, handle.last)
        self.bwd = lambda: net._backward(handle.last, 0)

    def save(self) -> List[np.ndarray]:
        return [a.copy() for a in self.state]

    def restore(self, saved: List[np.ndarray]) -> None:
        for a, s in zip(self.state, saved):
            a[...] = s


@dataclass
class PreparedTrees:
    labels: np.ndarray                 # float32 [P]: labels at the loss points
    roots: np.ndarray                  # float32 [B] (levels) / int64 [B] (recursive)
    leaf_tokens: np.ndarray            # float32 [Lf]
    num_levels: int = 0
    level_lr: Optional[List[np.ndarray]] = None              # levels: float32 [2n] per level >= 1
    order: Optional[List[Tuple[int, int, int]]] = None       # recursive: (node, left, right)
    points: Optional[np.ndarray] = None                      # recursive: int64 [P] loss rows
    num_nodes: int = 0


class RvNN(CaffeImplementation):
    family = "rvnn"

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.lstm = cfg.model == "treelstm"
        self.nets: Dict[int, NetHandle] = {}
        if strategy == "recursive":
            c_in = ("cl", "cr") if self.lstm else ()
            self.embed = self.make_net(embed_net(cfg))
            self.leaf = CellNet(self.make_net(leaf_net(cfg)), ("xin",), self.lstm)
            self.node = CellNet(self.make_net(node_net(cfg)), ("hl", "hr") + c_in, self.lstm)
            self.head = self.make_net(head_net(cfg))

    # --- data ---
    def prepare(self, batch: TreeBatch) -> PreparedTrees:
        if not isinstance(batch, TreeBatch):
            raise TypeError("the RvNN family needs a TreeBatch, got %s" % type(batch).__name__)
        points = class_points(batch, self.cfg.loss_mode)
        n_leaves = int(batch.level_offsets[1])
        out = PreparedTrees(labels=np.asarray(points.labels, np.float32),
                            roots=np.asarray(batch.root, np.float32),
                            leaf_tokens=np.asarray(batch.token[:n_leaves], np.float32),
                            num_levels=batch.num_levels, num_nodes=batch.num_nodes)
        if self.strategy == "levels":
            out.level_lr = [lr.reshape(-1).astype(np.float32) for lr in batch.level_children()]
            return out
        out.order = batch.postorder()
        out.roots = np.asarray(batch.root, np.int64)
        out.points = points.index.astype(np.int64)
        return out

    # --- levels ---
    def _levels(self, ready: PreparedTrees) -> NetHandle:
        handle = self.nets.get(ready.num_levels)
        if handle is None:
            handle = self.nets[ready.num_levels] = self.make_net(levels_net(self.cfg,
                                                                            ready.num_levels))
        handle.set_input("leaf_tokens", ready.leaf_tokens)
        for k, lr in enumerate(ready.level_lr, start=1):
            handle.set_input("lr_%d" % k, lr)
        handle.set_input("roots", ready.roots)
        handle.set_input("labels", ready.labels)
        return handle

    # --- recursive ---
    def _recursive_forward(self, ready: PreparedTrees, saved: Optional[list]):
        """Every node's h (and c) [N, H], one cell call per node; saves activations if asked."""
        self.embed.set_input("tokens", ready.leaf_tokens)
        self.embed.forward()
        x = self.embed.data("x")
        N, H = ready.num_nodes, self.cfg.hidden
        hs = np.empty((N, H), np.float32)
        cs = np.empty((N, H), np.float32) if self.lstm else None
        leaf, node = self.leaf, self.node
        for n, left, right in ready.order:
            if left < 0:
                cell = leaf
                cell.inputs[0][...] = x[n]
            else:
                cell = node
                cell.inputs[0][...] = hs[left]
                cell.inputs[1][...] = hs[right]
                if cs is not None:
                    cell.inputs[2][...] = cs[left]
                    cell.inputs[3][...] = cs[right]
            cell.fwd()
            hs[n] = cell.h
            if cs is not None:
                cs[n] = cell.c
            if saved is not None:
                saved[n] = cell.save()
        return hs, cs

    def _head(self, hid: np.ndarray, labels: np.ndarray) -> NetHandle:
        self.head.set_input("hid", hid)
        self.head.set_input("labels", labels)
        return self.head

    # --- the two calls ---
    def _logits(self, ready):
        if self.strategy == "levels":
            handle = self._levels(ready)
            handle.forward(end="out")
        else:
            hs, _ = self._recursive_forward(ready, None)
            handle = self._head(hs[ready.roots], np.zeros(len(ready.roots), np.float32))
            handle.forward(end="out")
        return handle.data("logits").copy()

    def _forward_backward(self, ready):
        self.store.zero_diffs()
        grads = dict(self.store.diff)
        if self.strategy == "levels":
            handle = self._levels(ready)
            loss = handle.forward()
            handle.backward()
            return loss, grads
        saved = [None] * ready.num_nodes
        hs, cs = self._recursive_forward(ready, saved)
        head = self._head(hs[ready.points], ready.labels)
        loss = head.forward()
        head.backward()
        dh = np.zeros_like(hs)
        dh[ready.points] += head.diff("hid")
        dc = np.zeros_like(cs) if cs is not None else None
        dx = np.empty((len(ready.leaf_tokens), self.cfg.embed_dim), np.float32)
        leaf, node = self.leaf, self.node
        for n, left, right in reversed(ready.order):
            cell = leaf if left < 0 else node
            cell.restore(saved[n])
            cell.h_diff[...] = dh[n]
            if dc is not None:
                cell.c_diff[...] = dc[n]
            cell.bwd()
            if left < 0:
                dx[n] = cell.input_diffs[0]
            else:
                dh[left] += cell.input_diffs[0]
                dh[right] += cell.input_diffs[1]
                if dc is not None:
                    dc[left] += cell.input_diffs[2]
                    dc[right] += cell.input_diffs[3]
        self.embed.diff("x")[...] = dx
        self.embed.backward()
        return loss, grads

    def info(self):
        out = super().info()
        out["strategy_detail"] = {
            "levels": "net per level count: Embed + leaf cell, per level BatchReindex gather "
                      "+ cell + Concat",
            "recursive": "one pycaffe call per node on one-row cell nets, post-order; backward "
                         "node by node with saved activations restored",
        }[self.strategy]
        if self.strategy == "levels":
            out["net_levels"] = sorted(self.nets)
        return out
