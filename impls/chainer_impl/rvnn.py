"""RvNN and Tree-LSTM in Chainer: strategies ``recursive`` and ``levels``.

Shapes: N nodes in the batch, Lf leaves, W_h nodes of height h, D embedding,
H hidden, C classes; the node order is the TreeBatch's (height, tree, left to
right), so children always come before parents.

* ``recursive``: one eager call per node, in that order (a post-order walk of
  each tree gives the same dependencies): a leaf applies the leaf cell to its
  [1, D] row; an internal node concatenates its children's [1, H] states.
  The leaf tokens are embedded in one lookup first, as tree-LSTM reference
  code does (and as the other frameworks here do).
* ``levels``: dynamic batching. All leaves in one ``F.embed_id`` + ``F.linear``;
  then per height one gather of the (left, right) pairs from the buffer of
  states so far ([2 W_h, H] -> [W_h, 2H]), one ``F.linear`` and the gates, and
  the new rows appended (``F.concat``), so buffer row n is node n.
* ``compiled``: not applicable (see the package docstring).

Native layout: the canonical names, with every weight matrix but ``E`` stored
transposed for ``F.linear`` ((out, in)).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

import chainer
import chainer.functions as F

from bench.params import schema
from bench.targets import class_points

from .common import ChainerImplementation, linear_weight


class RvNN(ChainerImplementation):
    family = "rvnn"

    def _build(self):
        self._tree = self.cfg.model == "treelstm"
        self._names = list(schema(self.cfg))
        self.model = chainer.Chain()
        with self.model.init_scope():
            for name, (shape, _) in schema(self.cfg).items():
                native = shape[::-1] if self._transposed(name, shape) else shape
                setattr(self.model, name, chainer.Parameter(np.zeros(native, np.float32)))
        return []

    @staticmethod
    def _transposed(name, shape):
        return len(shape) == 2 and name != "E"

    # --- the one place where canonical <-> native layouts meet ---
    def _load_native(self, p):
        for name in self._names:
            value = p[name]
            self._set(getattr(self.model, name),
                      linear_weight(value) if self._transposed(name, value.shape) else value)

    def _canonical(self, read):
        out = {}
        for name in self._names:
            value = read(getattr(self.model, name))
            out[name] = np.ascontiguousarray(value.T if self._transposed(name, value.shape)
                                             else value, np.float32)
        return out

    # --- work ---
    def prepare(self, batch):
        send = self.dev.send
        # rows to classify: host ints for recursive, a device index for levels
        if self.strategy == "recursive":
            index = lambda idx: [int(n) for n in idx]  # noqa: E731
        else:
            index = lambda idx: send(idx.astype(np.int32))  # noqa: E731
        points = class_points(batch, self.cfg.loss_mode)
        ready = dict(N=batch.num_nodes, root=index(batch.root),
                     points=None if points.every_row else index(points.rows),
                     labels=send(points.labels.astype(np.int32)), count=points.count)
        o = batch.level_offsets
        ready["leaf_token"] = send(batch.token[:o[1]].astype(np.int32))
        if self.strategy == "recursive":
            ready["left"] = [int(x) for x in batch.left]
            ready["right"] = [int(x) for x in batch.right]
        else:
            ready["pairs"] = [send(np.stack([batch.left[o[h]:o[h + 1]], batch.right[o[h]:o[h + 1]]],
                                            axis=1).reshape(-1).astype(np.int32))
                              for h in range(1, batch.num_levels)]
        return SimpleNamespace(**ready)

    def _leaf(self, x):
        """x [R, D] -> (h [R, H], c [R, H] or None)."""
        m = self.model
        z = F.linear(x, m.W_leaf, m.b_leaf)
        if not self._tree:
            return F.tanh(z), None
        i, o, u = F.split_axis(z, 3, axis=1)
        c = F.sigmoid(i) * F.tanh(u)
        return F.sigmoid(o) * F.tanh(c), c

    def _internal(self, hlr, c_l, c_r):
        """hlr [R, 2H], c_l / c_r [R, H] (Tree-LSTM) -> (h [R, H], c [R, H] or None)."""
        m = self.model
        if not self._tree:
            return F.tanh(F.linear(hlr, m.W, m.b)), None
        i, f_l, f_r, o, u = F.split_axis(F.linear(hlr, m.U, m.b_U), 5, axis=1)
        c = F.sigmoid(i) * F.tanh(u) + F.sigmoid(f_l) * c_l + F.sigmoid(f_r) * c_r
        return F.sigmoid(o) * F.tanh(c), c

    def _states_recursive(self, r, at):
        """Hidden states at rows ``at`` (every node for None): Variable[R, H]."""
        h = [None] * r.N
        c = [None] * r.N
        # One lookup for all leaves: EmbedID's backward builds a dense [V, D]
        # gradient per call, so a lookup per leaf would cost O(V D) per leaf.
        x = F.embed_id(r.leaf_token, self.model.E)                      # [Lf, D]
        rows = F.split_axis(x, x.shape[0], axis=0) if x.shape[0] > 1 else (x,)
        for n in range(r.N):
            left, right = r.left[n], r.right[n]
            if left < 0:
                h[n], c[n] = self._leaf(rows[n])                        # leaves are nodes 0..Lf-1
            else:
                h[n], c[n] = self._internal(F.concat((h[left], h[right]), axis=1), c[left], c[right])
        return F.concat(h if at is None else [h[i] for i in at], axis=0)

    def _states_levels(self, r, at):
        H = self.cfg.hidden
        buf_h, buf_c = self._leaf(F.embed_id(r.leaf_token, self.model.E))
        for pairs in r.pairs:
            hlr = F.reshape(F.get_item(buf_h, pairs), (-1, 2 * H))
            c_l = c_r = None
            if self._tree:
                c_l, c_r = F.split_axis(F.reshape(F.get_item(buf_c, pairs), (-1, 2 * H)), 2, axis=1)
            h, c = self._internal(hlr, c_l, c_r)
            buf_h = F.concat((buf_h, h), axis=0)
            if self._tree:
                buf_c = F.concat((buf_c, c), axis=0)
        return buf_h if at is None else F.get_item(buf_h, at)

    def _states(self, r, at):
        if self.strategy == "recursive":
            return self._states_recursive(r, at)
        return self._states_levels(r, at)

    def _forward(self, r):
        m = self.model
        return F.linear(self._states(r, r.points), m.W_o, m.b_o), r.labels, r.count

    def _logits(self, r):
        m = self.model
        return F.linear(self._states(r, r.root), m.W_o, m.b_o)
