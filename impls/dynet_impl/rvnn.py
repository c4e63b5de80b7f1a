"""RvNN and binary Tree-LSTM in DyNet: strategies ``recursive`` and ``levels``.

Shapes: D embedding, H hidden, C classes. A node state is ``h`` (RvNN) or
``(h, c)`` (Tree-LSTM).

* ``recursive``: one expression per node, ``(H,)`` each, built while walking
  each tree in post-order (an explicit order computed in ``prepare``, so deep
  chains do not hit Python's recursion limit); leaves use ``dy.lookup`` per
  token, classification one ``affine_transform`` per classified node. With
  the ``dynet-autobatch`` entry DyNet batches these node expressions itself
  when the graph runs.
* ``levels``: one batched expression per height, ``((H,), W_h)`` for the W_h
  nodes of height h (the TreeBatch already orders nodes by height, so a node's
  batch position is its index minus the level's offset). Children are gathered
  from the levels they live in with ``pick_batch_elems`` and
  ``concatenate_to_batch`` (see ``common.group_plan``).
"""

from __future__ import annotations

from typing import List

import numpy as np

from bench.batches import TreeBatch
from bench.targets import class_points

from .common import DynetImplementation, gather, group_plan, identity, transpose


def postorder(batch: TreeBatch) -> List[int]:
    """Node indices tree by tree, each tree in post-order from its root."""
    out = []
    for root in batch.root:
        stack, seen = [int(root)], []
        while stack:  # reversed pre-order (node, right, left) is post-order
            n = stack.pop()
            seen.append(n)
            if batch.left[n] >= 0:
                stack.append(int(batch.left[n]))
                stack.append(int(batch.right[n]))
        out.extend(reversed(seen))
    return out


class Recursive:
    """A TreeBatch as Python lists, in the order the recursive walk visits nodes."""

    def __init__(self, batch: TreeBatch, loss_mode: str):
        self.order = postorder(batch)
        self.token = [int(t) for t in batch.token]
        self.left = [int(i) for i in batch.left]
        self.right = [int(i) for i in batch.right]
        self.roots = [int(r) for r in batch.root]
        points = class_points(batch, loss_mode)
        keep = points.labels >= 0
        self.points = [int(n) for n in points.index[keep]]
        self.labels = [int(y) for y in points.labels[keep]]


class Levels:
    """A TreeBatch as per-height gather plans."""

    def __init__(self, batch: TreeBatch, loss_mode: str):
        o = batch.level_offsets
        self.leaf_tokens = [int(t) for t in batch.token[:o[1]]]
        self.children = []
        for h in range(1, batch.num_levels):
            nodes = np.arange(o[h], o[h + 1])
            kids = []
            for side in (batch.left, batch.right):
                targets = side[nodes]
                kids.append(group_plan(targets, batch.height[targets], o))
            self.children.append(tuple(kids))
        self.roots = group_plan(batch.root, batch.height[batch.root], o)
        points = class_points(batch, loss_mode)
        labelled = points.index[points.labels >= 0]
        # every node classified: one batched loss term per height; else one for all points
        groups = (np.split(labelled, np.searchsorted(labelled, o[1:-1])) if points.every_row
                  else [labelled])
        self.point_plans = [(group_plan(g, batch.height[g], o), [int(batch.label[n]) for n in g])
                            for g in groups if g.size]
        self.count = sum(len(labels) for _, labels in self.point_plans)


class RvNN(DynetImplementation):
    family = "rvnn"

    def _build_params(self):
        D, H = self.cfg.embed_dim, self.cfg.hidden
        lstm = self.cfg.model == "treelstm"
        self.W_leaf = self.pc.add_parameters(((3 if lstm else 1) * H, D))
        self.b_leaf = self.pc.add_parameters(((3 if lstm else 1) * H,))
        self.W = self.pc.add_parameters(((5 if lstm else 1) * H, 2 * H))
        self.b = self.pc.add_parameters(((5 if lstm else 1) * H,))
        self.slots["W_leaf"] = (self.W_leaf,) + transpose()
        self.slots["b_leaf"] = (self.b_leaf,) + identity()
        self.slots["U" if lstm else "W"] = (self.W,) + transpose()
        self.slots["b_U" if lstm else "b"] = (self.b,) + identity()

    def prepare(self, batch):
        kind = Recursive if self.strategy == "recursive" else Levels
        return kind(batch, self.cfg.loss_mode)

    # -- one node (recursive) or one height (levels): the same expressions --
    def _leaf(self, x):
        dy, H = self.dy, self.cfg.hidden
        z = dy.affine_transform([self.b_leaf, self.W_leaf, x])
        if self.cfg.model == "rvnn":
            return dy.tanh(z), None
        i = dy.logistic(dy.pick_range(z, 0, H))
        o = dy.logistic(dy.pick_range(z, H, 2 * H))
        u = dy.tanh(dy.pick_range(z, 2 * H, 3 * H))
        c = dy.cmult(i, u)
        return dy.cmult(o, dy.tanh(c)), c

    def _node(self, hl, cl, hr, cr):
        dy, H = self.dy, self.cfg.hidden
        z = dy.affine_transform([self.b, self.W, dy.concatenate([hl, hr])])
        if self.cfg.model == "rvnn":
            return dy.tanh(z), None
        i = dy.logistic(dy.pick_range(z, 0, H))
        fl = dy.logistic(dy.pick_range(z, H, 2 * H))
        fr = dy.logistic(dy.pick_range(z, 2 * H, 3 * H))
        o = dy.logistic(dy.pick_range(z, 3 * H, 4 * H))
        u = dy.tanh(dy.pick_range(z, 4 * H, 5 * H))
        c = dy.cmult(i, u) + dy.cmult(fl, cl) + dy.cmult(fr, cr)
        return dy.cmult(o, dy.tanh(c)), c

    def _graph(self, ready, loss: bool):
        if self.strategy == "recursive":
            return self._recursive(ready, loss)
        return self._levels(ready, loss)

    def _recursive(self, ready: Recursive, loss: bool):
        dy = self.dy
        n_nodes = len(ready.token)
        h, c = [None] * n_nodes, [None] * n_nodes
        for n in ready.order:
            if ready.left[n] < 0:
                h[n], c[n] = self._leaf(dy.lookup(self.E, ready.token[n]))
            else:
                a, b = ready.left[n], ready.right[n]
                h[n], c[n] = self._node(h[a], c[a], h[b], c[b])
        if not loss:
            return dy.concatenate_cols([self.classify(h[n]) for n in ready.roots])
        if not ready.points:
            return None
        terms = [dy.pickneglogsoftmax(self.classify(h[n]), y)
                 for n, y in zip(ready.points, ready.labels)]
        return dy.esum(terms) * (1.0 / len(terms))

    def _levels(self, ready: Levels, loss: bool):
        dy = self.dy
        h, c = self._leaf(dy.lookup_batch(self.E, ready.leaf_tokens))
        hs, cs = [h], [c]
        lstm = self.cfg.model == "treelstm"
        for left, right in ready.children:
            h, c = self._node(gather(dy, hs, left), gather(dy, cs, left) if lstm else None,
                              gather(dy, hs, right), gather(dy, cs, right) if lstm else None)
            hs.append(h)
            cs.append(c)
        if not loss:
            return self.classify(gather(dy, hs, ready.roots))
        if not ready.count:
            return None
        terms = [self.batched_loss(self.classify(gather(dy, hs, plan)), labels)
                 for plan, labels in ready.point_plans]
        return dy.esum(terms) * (1.0 / ready.count)
