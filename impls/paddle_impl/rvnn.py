"""RvNN and Tree-LSTM in Paddle: strategies ``recursive``, ``levels`` and ``compiled``.

Shapes: N nodes, n0 leaves, D embedding, H hidden, C classes; the node state
is h (RvNN) or (h, c) (Tree-LSTM), each row H wide. Parameters keep their
canonical names and layouts (no native layer exists for tree cells).

* ``recursive``: eager, one leaf or internal cell call per node with [1, *]
  rows, in the batch's topological order (children before parents).
* ``levels``: eager; all leaves in one call, then one call per height that
  gathers the children of every node of that height across the batch from
  the states computed so far (the levels concatenated in node order, so a
  node's index is its row).
* ``compiled``: ``levels`` on ``TreeBatch.padded_packed()`` (steps of node
  groups whose children are ready, padded to a multiple of BLOCK = 4) under
  ``paddle.jit.to_static``: a leaf
  program writes the leaves into a node buffer [N + 2, H] (rows ``zero`` and
  ``sink`` at the end) with ``paddle.scatter``; a block program runs BLOCK
  unrolled levels of gather -> cell -> scatter on that buffer and is chained
  by a Python loop. Programs are cached per bucket shape (N, W), not per
  depth. Whole-depth unrolling is what a static program could hold (Paddle
  3.3.1 cannot differentiate a ``while`` under to_static, see ``rnn.py``) but
  costs one program per depth bucket and long builds for deep trees.
"""

from __future__ import annotations

import numpy as np

from bench.batches import TreeBatch
from bench.targets import class_points

from .common import PaddleImplementation, mean_xent, param_layer

BLOCK = 4  # levels per static program


def leaf_cell(model, L, x):
    """x [M, D] -> (h,) or (h, c), each [M, H]."""
    import paddle
    import paddle.nn.functional as F
    z = x @ L.W_leaf + L.b_leaf
    if model == "rvnn":
        return (paddle.tanh(z),)
    i, o, u = paddle.split(z, 3, axis=-1)
    c = F.sigmoid(i) * paddle.tanh(u)
    return F.sigmoid(o) * paddle.tanh(c), c


def node_cell(model, L, left, right):
    """Children states (h,) / (h, c), rows [M, H] -> the parents' state."""
    import paddle
    import paddle.nn.functional as F
    hlr = paddle.concat([left[0], right[0]], axis=-1)      # [M, 2H]
    if model == "rvnn":
        return (paddle.tanh(hlr @ L.W + L.b),)
    i, fl, fr, o, u = paddle.split(hlr @ L.U + L.b_U, 5, axis=-1)
    c = F.sigmoid(i) * paddle.tanh(u) + F.sigmoid(fl) * left[1] + F.sigmoid(fr) * right[1]
    return F.sigmoid(o) * paddle.tanh(c), c


def leaf_program(model, L, empty, leaf_node, leaf_token):
    """to_static body: the node buffers [N + 2, H] holding the leaves (padding -> sink)."""
    import paddle
    import paddle.nn.functional as F
    state = leaf_cell(model, L, F.embedding(leaf_token, L.E))
    return tuple(paddle.scatter(empty, leaf_node, s) for s in state)


def level_program(model, L, level_node, level_left, level_right, *state):
    """to_static body: BLOCK levels (level_* int64[BLOCK, W]) applied to the node buffers."""
    import paddle
    state = list(state)
    for lv in range(BLOCK):
        left = [paddle.gather(s, level_left[lv]) for s in state]
        right = [paddle.gather(s, level_right[lv]) for s in state]
        new = node_cell(model, L, left, right)
        state = [paddle.scatter(s, level_node[lv], x) for s, x in zip(state, new)]
    return tuple(state)


class RvNN(PaddleImplementation):
    family = "rvnn"

    def _build(self):
        cfg = self.cfg
        V, D, H, C = cfg.vocab_size, cfg.embed_dim, cfg.hidden, cfg.num_classes
        shapes = {"E": (V, D), "W_o": (H, C), "b_o": (C,)}
        if cfg.model == "rvnn":
            shapes.update(W_leaf=(D, H), b_leaf=(H,), W=(2 * H, H), b=(H,))
        else:
            shapes.update(W_leaf=(D, 3 * H), b_leaf=(3 * H,), U=(2 * H, 5 * H), b_U=(5 * H,))
        return param_layer(shapes)

    # --- preparation (untimed) ---
    def prepare(self, batch: TreeBatch):
        if not isinstance(batch, TreeBatch):
            raise TypeError("the RvNN family takes a TreeBatch, not %s" % type(batch).__name__)
        if self.strategy == "compiled":
            pt = batch.padded_packed().steps_multiple_of(BLOCK)
            points = class_points(pt, self.cfg.loss_mode)
            out = self._targets(points.labels)
            t = lambda a: self._tensor(a, np.int64)  # noqa: E731
            out["roots"], out["points"] = t(pt.root), t(points.index)
            out["empty"] = self._tensor(np.zeros((pt.num_nodes + 2, self.cfg.hidden)), np.float32)
            out["leaves"] = (t(pt.leaf_node), t(pt.leaf_token))
            out["blocks"] = [(t(pt.level_node[k:k + BLOCK]), t(pt.level_left[k:k + BLOCK]),
                              t(pt.level_right[k:k + BLOCK]))
                             for k in range(0, pt.level_node.shape[0], BLOCK)]
            return out
        points = class_points(batch, self.cfg.loss_mode)
        out = self._targets(points.labels)
        out["points"] = self._tensor(points.index, np.int64)
        out["roots"] = self._tensor(batch.root, np.int64)
        levels = batch.levels
        if self.strategy == "levels":
            out["leaf_token"] = self._tensor(batch.token[levels[0]], np.int64)
            out["levels"] = [(self._tensor(batch.left[idx], np.int64),
                              self._tensor(batch.right[idx], np.int64)) for idx in levels[1:]]
        else:
            # One tiny index tensor per leaf, made here so the timed loop only computes.
            out["leaf_token"] = [self._tensor(batch.token[i:i + 1], np.int64) for i in levels[0]]
            out["children"] = [(int(batch.left[n]), int(batch.right[n]))
                               for idx in levels[1:] for n in idx]
        return out

    # --- hidden states at the classified points ---
    def _hidden_points(self, prep, points="points"):
        import paddle
        self.calls[self.strategy] += 1
        if self.strategy == "compiled":
            return paddle.gather(self._all_states_compiled(prep), prep[points])
        states = self._all_states_recursive(prep) if self.strategy == "recursive" \
            else self._all_states_levels(prep)
        return paddle.gather(states, prep[points])

    def _logits_of(self, prepared):
        # logits are always at the roots; the loss may use every node
        h = self._hidden_points(prepared, "roots")
        return h @ self.layer.W_o + self.layer.b_o

    def _loss(self, prepared):
        h = self._hidden_points(prepared, "points")
        return mean_xent(h @ self.layer.W_o + self.layer.b_o, prepared["labels"],
                         prepared["weights"])

    def _all_states_compiled(self, prep):
        """h [N + 2, H] of the padded node buffer: a leaf program, then level blocks."""
        model = self.cfg.model

        def leaves(L, *tensors):
            return leaf_program(model, L, *tensors)

        def levels(L, *tensors):
            return level_program(model, L, *tensors)

        state = self._static("leaves", leaves)(prep["empty"], *prep["leaves"])
        state = state if isinstance(state, (tuple, list)) else (state,)
        block = self._static("levels", levels)
        for indices in prep["blocks"]:
            state = block(*indices, *state)
            state = state if isinstance(state, (tuple, list)) else (state,)
        return state[0]

    def _all_states_recursive(self, prep):
        """h [N, H] for every node, one cell call per node."""
        import paddle
        import paddle.nn.functional as F
        L, model = self.layer, self.cfg.model
        states = [leaf_cell(model, L, F.embedding(tok, L.E)) for tok in prep["leaf_token"]]
        for left, right in prep["children"]:
            states.append(node_cell(model, L, states[left], states[right]))
        return paddle.concat([s[0] for s in states], axis=0)

    def _all_states_levels(self, prep):
        """h [N, H] for every node, one cell call per height."""
        import paddle
        import paddle.nn.functional as F
        L, model = self.layer, self.cfg.model
        done = leaf_cell(model, L, F.embedding(prep["leaf_token"], L.E))
        for left, right in prep["levels"]:
            new = node_cell(model, L, [paddle.gather(s, left) for s in done],
                            [paddle.gather(s, right) for s in done])
            done = [paddle.concat([s, n], axis=0) for s, n in zip(done, new)]
        return done[0]
