"""RvNN and Tree-LSTM in MXNet Gluon: strategies ``recursive``, ``levels``, ``compiled``.

Shapes: N nodes in the batch, Lf leaves, W_h nodes of height h, D embedding,
H hidden, C classes; the node order is the TreeBatch's (height, tree, left to
right), so children always come before parents.

* ``recursive``: one imperative call per node, in that order (a post-order
  walk of each tree gives the same dependencies) on [1, D] / [1, 2H] rows;
  the leaf tokens are embedded in one lookup first, as tree-LSTM reference
  code does.
* ``levels``: dynamic batching, imperative. All leaves in one ``take`` +
  ``FullyConnected``; then per height one ``take`` of the (left, right) pairs
  from the buffer of states so far ([2 W_h, H] -> [W_h, 2H]), one
  ``FullyConnected`` and the gates, the new rows appended (``concat``), so
  buffer row n is node n.
* ``compiled``: ``levels`` on the packed static form
  (``TreeBatch.padded_packed``: steps of node groups whose children are
  ready) in a hybridized ``HybridBlock``: a
  [N+2, H] buffer (``zero`` and ``sink`` rows last), leaves and each level
  written with ``scatter_nd`` (each real row is written once, so adding the
  scattered rows to the zero buffer is a write; padding writes only go to
  ``sink``, which nothing reads), children read with ``take``. The loop over
  steps is unrolled, so each bucket shape (``PaddedTrees.shape_key``) gets
  its own block and cached graph (``info()['compiled_shapes']``); the weights
  are inputs, shared by every block.

Native layout: the canonical names, with every weight matrix but ``E`` stored
transposed for ``FullyConnected`` ((out, in)).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from mxnet import gluon, nd

from bench.params import schema
from bench.targets import class_points

from .common import Labels, MXNetImplementation, linear_weight, split_list

_WEIGHTS = {"rvnn": ("E", "W_leaf", "b_leaf", "W", "b", "W_o", "b_o"),
            "treelstm": ("E", "W_leaf", "b_leaf", "U", "b_U", "W_o", "b_o")}


def _leaf(F, tree, x, W_leaf, b_leaf, H):
    """x [R, D] -> (h [R, H], c [R, H] or None)."""
    z = F.FullyConnected(x, W_leaf, b_leaf, num_hidden=(3 if tree else 1) * H)
    if not tree:
        return F.tanh(z), None
    i, o, u = split_list(z, 3, axis=1)
    c = F.sigmoid(i) * F.tanh(u)
    return F.sigmoid(o) * F.tanh(c), c


def _internal(F, tree, hlr, c_l, c_r, W, b, H):
    """hlr [R, 2H], c_l / c_r [R, H] (Tree-LSTM) -> (h [R, H], c [R, H] or None)."""
    z = F.FullyConnected(hlr, W, b, num_hidden=(5 if tree else 1) * H)
    if not tree:
        return F.tanh(z), None
    i, f_l, f_r, o, u = split_list(z, 5, axis=1)
    c = F.sigmoid(i) * F.tanh(u) + F.sigmoid(f_l) * c_l + F.sigmoid(f_r) * c_r
    return F.sigmoid(o) * F.tanh(c), c


class _StaticLevels(gluon.HybridBlock):
    """One bucket shape of the padded form -> logits.

    Inputs: leaf_node / leaf_token [Lf], level_node [L, W], level_pairs [L, 2W]
    (left, right interleaved), root [B], then the weights. Output: root logits
    [B, C], and with ``all_nodes`` also logits of every buffer row [N+2, C].
    """

    def __init__(self, tree, rows, levels, H, C, all_nodes, **kw):
        super().__init__(**kw)
        self._tree, self._rows, self._levels = tree, rows, levels
        self._H, self._C, self._all = H, C, all_nodes

    def hybrid_forward(self, F, leaf_node, leaf_token, level_node, level_pairs, root,
                       E, W_leaf, b_leaf, W, b, W_o, b_o):
        H, tree, shape = self._H, self._tree, (self._rows, self._H)
        h, c = _leaf(F, tree, F.take(E, leaf_token), W_leaf, b_leaf, H)
        where = F.reshape(leaf_node, (1, -1))
        buf_h = F.scatter_nd(h, where, shape=shape)
        buf_c = F.scatter_nd(c, where, shape=shape) if tree else None
        for lvl in range(self._levels):
            pairs = F.reshape(F.slice_axis(level_pairs, axis=0, begin=lvl, end=lvl + 1), (-1,))
            where = F.slice_axis(level_node, axis=0, begin=lvl, end=lvl + 1)     # [1, W]
            hlr = F.reshape(F.take(buf_h, pairs), (-1, 2 * H))
            c_l = c_r = None
            if tree:
                c_l, c_r = split_list(F.reshape(F.take(buf_c, pairs), (-1, 2 * H)), 2, axis=1)
            h, c = _internal(F, tree, hlr, c_l, c_r, W, b, H)
            buf_h = buf_h + F.scatter_nd(h, where, shape=shape)
            if tree:
                buf_c = buf_c + F.scatter_nd(c, where, shape=shape)
        root_logits = F.FullyConnected(F.take(buf_h, root), W_o, b_o, num_hidden=self._C)
        if not self._all:
            return root_logits
        return root_logits, F.FullyConnected(buf_h, W_o, b_o, num_hidden=self._C)


class RvNN(MXNetImplementation):
    family = "rvnn"

    def _build(self):
        self._tree = self.cfg.model == "treelstm"
        for name, (shape, _) in schema(self.cfg).items():
            self._new_param(name, shape[::-1] if self._transposed(name, shape) else shape)
        self._blocks = {}
        return []

    @staticmethod
    def _transposed(name, shape):
        return len(shape) == 2 and name != "E"

    # --- the one place where canonical <-> native layouts meet ---
    def _load_native(self, p):
        for name, value in p.items():
            self._set(name, linear_weight(value) if self._transposed(name, value.shape) else value)

    def _canonical(self, read):
        out = {}
        for name in self._params:
            value = read(name)
            out[name] = np.ascontiguousarray(value.T if self._transposed(name, value.shape)
                                             else value, np.float32)
        return out

    # --- work ---
    def prepare(self, batch):
        ctx = self.dev

        def arr(x):
            return nd.array(np.asarray(x), ctx=ctx, dtype="int32")

        ready = dict(B=batch.size, N=batch.num_nodes)
        if self.strategy == "compiled":
            pt = batch.padded_packed()
            level_node = pt.level_node
            pairs = np.stack([pt.level_left, pt.level_right], axis=2)             # [L, W, 2]
            pairs = pairs.reshape(level_node.shape[0], 2 * level_node.shape[1])
            if level_node.size == 0:
                # only single-leaf trees: MXNet 1.x reads a 0 in a shape as "unknown", so
                # give it one all-padding level instead (writes sink, reads zero)
                level_node = np.full((1, 1), pt.sink, np.int32)
                pairs = np.full((1, 2), pt.zero, np.int32)
            points = class_points(pt, self.cfg.loss_mode)
            ready.update(key=pt.shape_key, rows=pt.num_nodes + 2, levels=int(level_node.shape[0]),
                         inputs=[arr(pt.leaf_node), arr(pt.leaf_token), arr(level_node),
                                 arr(pairs), arr(pt.root)],
                         every_row=points.every_row, y=Labels(points.labels, ctx))
            return SimpleNamespace(**ready)
        # rows to classify: host ints for recursive, a device index for levels
        index = (lambda idx: [int(n) for n in idx]) if self.strategy == "recursive" else arr
        points = class_points(batch, self.cfg.loss_mode)
        o = batch.level_offsets
        ready.update(root=index(batch.root), points=None if points.every_row else index(points.rows),
                     y=Labels(points.labels, ctx),
                     leaf_token=arr(batch.token[:o[1]]), leaves=int(o[1]))
        if self.strategy == "recursive":
            ready["left"] = [int(x) for x in batch.left]
            ready["right"] = [int(x) for x in batch.right]
        else:
            ready["pairs"] = [arr(np.stack([batch.left[o[h]:o[h + 1]], batch.right[o[h]:o[h + 1]]],
                                           axis=1).reshape(-1))
                              for h in range(1, batch.num_levels)]
        return SimpleNamespace(**ready)

    def _weights(self):
        return [self._w(name) for name in _WEIGHTS[self.cfg.model]]

    def _states(self, r, at):
        """Hidden states at rows ``at`` (every node for None): [R, H]."""
        E, W_leaf, b_leaf, W, b = self._weights()[:5]
        H, tree = self.cfg.hidden, self._tree
        if self.strategy == "recursive":
            h, c = [None] * r.N, [None] * r.N
            # One lookup for all leaves: take's backward writes a dense [V, D]
            # gradient per call, so a lookup per leaf would cost O(V D) per leaf.
            x = nd.take(E, r.leaf_token)                                          # [Lf, D]
            rows = list(nd.split(x, num_outputs=r.leaves, axis=0)) if r.leaves > 1 else [x]
            for n in range(r.N):
                left, right = r.left[n], r.right[n]
                if left < 0:
                    h[n], c[n] = _leaf(nd, tree, rows[n], W_leaf, b_leaf, H)      # leaves are 0..Lf-1
                else:
                    h[n], c[n] = _internal(nd, tree, nd.concat(h[left], h[right], dim=1),
                                           c[left], c[right], W, b, H)
            return nd.concat(*(h if at is None else [h[i] for i in at]), dim=0)
        buf_h, buf_c = _leaf(nd, tree, nd.take(E, r.leaf_token), W_leaf, b_leaf, H)
        for pairs in r.pairs:
            hlr = nd.reshape(nd.take(buf_h, pairs), (-1, 2 * H))
            c_l = c_r = None
            if tree:
                c_l, c_r = split_list(nd.reshape(nd.take(buf_c, pairs), (-1, 2 * H)), 2, axis=1)
            h, c = _internal(nd, tree, hlr, c_l, c_r, W, b, H)
            buf_h = nd.concat(buf_h, h, dim=0)
            if tree:
                buf_c = nd.concat(buf_c, c, dim=0)
        return buf_h if at is None else nd.take(buf_h, at)

    def _compiled(self, r):
        block = self._blocks.get(r.key)
        if block is None:
            block = _StaticLevels(self._tree, r.rows, r.levels, self.cfg.hidden,
                                  self.cfg.num_classes, r.every_row)
            block.hybridize(static_alloc=True, static_shape=True)
            self._blocks[r.key] = block
        return block(*r.inputs, *self._weights())

    def _head(self, h):
        return nd.FullyConnected(h, self._w("W_o"), self._w("b_o"), num_hidden=self.cfg.num_classes)

    def _forward(self, r):
        if self.strategy == "compiled":
            out = self._compiled(r)
            return (out[1] if r.every_row else out), r.y
        return self._head(self._states(r, r.points)), r.y

    def _logits(self, r):
        if self.strategy == "compiled":
            out = self._compiled(r)
            return out[0] if r.every_row else out
        return self._head(self._states(r, r.root))

    def info(self):
        out = super().info()
        if self.strategy == "compiled":
            out["compiled_shapes"] = [list(k) for k in self._blocks]
        return out
