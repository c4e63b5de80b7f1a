"""RvNN and Tree-LSTM on PyTensor (and, through ``Lib``, Theano).

Shapes: N nodes, n0 leaves, M rows per cell call, D embedding, H hidden, C
classes; a node's state is (h,) for the RvNN and (h, c) for the Tree-LSTM,
each row H wide. ``z`` is a cell's pre-activation ([M, H]/[M, 3H] at leaves,
[M, H]/[M, 5H] inside).

* ``recursive``: compiled leaf and internal cells called once per node (M = 1),
  children before parents; backward calls their compiled VJPs once per node,
  parents before children, scattering child gradients in NumPy.
* ``levels``: the same compiled cells called once per height (M = nodes of
  that height across the batch); children are gathered by index.
* ``compiled``: one graph: leaves in one matmul, written into a node buffer
  [N + 2, H] with ``set_subtensor``; ``scan`` over the steps of the packed
  static form (``TreeBatch.padded_packed``: groups of nodes whose children
  are ready) gathers children from the buffer and writes parents back
  (padding reads row ``zero``, writes row ``sink``); the framework
  differentiates through the scan.
"""

from __future__ import annotations

import numpy as np

from bench.batches import TreeBatch
from bench.targets import class_points, loss_weights

from .common import FLOAT, SymbolicImplementation, mean_xent, vjp


def leaf_cell(lib, model, W_leaf, b_leaf, x):
    """x [M, D] -> (state list, z). Gate widths come from the graph (see ``rnn.cell``)."""
    T = lib.T
    z = T.dot(x, W_leaf) + b_leaf
    if model == "rvnn":
        return [T.tanh(z)], z
    sig = lib.sigmoid
    H = W_leaf.shape[1] // 3
    c = sig(z[:, :H]) * T.tanh(z[:, 2 * H:])
    return [sig(z[:, H:2 * H]) * T.tanh(c), c], z


def node_cell(lib, model, W, b, left, right):
    """Children states (lists of [M, H]) -> (parent state list, z)."""
    T = lib.T
    H = W.shape[0] // 2
    z = T.dot(T.concatenate([left[0], right[0]], axis=1), W) + b
    if model == "rvnn":
        return [T.tanh(z)], z
    sig = lib.sigmoid
    gate = [z[:, k * H:(k + 1) * H] for k in range(5)]     # i, f_l, f_r, o, u
    c = sig(gate[0]) * T.tanh(gate[4]) + sig(gate[1]) * left[1] + sig(gate[2]) * right[1]
    return [sig(gate[3]) * T.tanh(c), c], z


class RvNN(SymbolicImplementation):
    family = "rvnn"

    @property
    def _n_state(self):
        return 1 if self.cfg.model == "rvnn" else 2

    @property
    def _node_params(self):
        return ("W", "b") if self.cfg.model == "rvnn" else ("U", "b_U")

    # --- preparation (untimed) ---
    def prepare(self, batch: TreeBatch):
        if not isinstance(batch, TreeBatch):
            raise TypeError("the RvNN family takes a TreeBatch, not %s" % type(batch).__name__)
        classified = class_points(batch, self.cfg.loss_mode)
        points = classified.index.astype(np.int32)
        labels, weights = loss_weights(classified.labels)
        out = {"roots": batch.root.astype(np.int32), "points": points,
               "labels": labels, "weights": weights, "num_nodes": batch.num_nodes}
        if self.strategy == "compiled":
            pt = batch.padded_packed(bucketed=False)   # at least one step: scan needs one
            i32 = lambda a: np.ascontiguousarray(a, np.int32)  # noqa: E731
            out["inputs"] = [i32(pt.leaf_node), i32(pt.leaf_token), i32(pt.level_node),
                             i32(pt.level_left), i32(pt.level_right),
                             np.int32(pt.num_nodes + 2), out["roots"], points, labels, weights]
            return out
        levels = batch.levels
        if self.strategy == "levels":
            groups = levels
        else:
            groups = [levels[0][i:i + 1] for i in range(len(levels[0]))]
            groups += [idx[i:i + 1] for idx in levels[1:] for i in range(len(idx))]
        n_leaf_groups = 1 if self.strategy == "levels" else len(levels[0])
        # (first node, end) of each group: levels are contiguous index ranges
        out["leaf_groups"] = [(int(g[0]), int(g[-1]) + 1, batch.token[g].astype(np.int32))
                              for g in groups[:n_leaf_groups]]
        out["node_groups"] = [(int(g[0]), int(g[-1]) + 1, batch.left[g].astype(np.int64),
                               batch.right[g].astype(np.int64)) for g in groups[n_leaf_groups:]]
        return out

    # --- compiled: one scan over heights ---
    def _symbolic(self):
        lib, T, p = self.lib, self.lib.T, self.p
        model, n = self.cfg.model, self._n_state
        leaf_node, leaf_token = T.ivector("leaf_node"), T.ivector("leaf_token")
        level_node, level_left, level_right = (T.imatrix(k) for k in
                                               ("level_node", "level_left", "level_right"))
        rows, roots, points = T.iscalar("rows"), T.ivector("roots"), T.ivector("points")
        labels, weights = T.ivector("labels"), T.vector("weights", dtype=FLOAT)
        leaf, _ = leaf_cell(lib, model, p["W_leaf"], p["b_leaf"], p["E"][leaf_token])
        empty = T.zeros((rows, p["W_o"].shape[0]), dtype=FLOAT)
        buffers = [T.set_subtensor(empty[leaf_node], s) for s in leaf]

        def step(node, left, right, *rest):
            bufs, (W, b) = list(rest[:n]), rest[n:]
            new, _ = node_cell(lib, model, W, b, [x[left] for x in bufs],
                               [x[right] for x in bufs])
            return [T.set_subtensor(x[node], s) for x, s in zip(bufs, new)]

        final = lib.scan(step, sequences=[level_node, level_left, level_right],
                         outputs_info=buffers,
                         non_sequences=[p[k] for k in self._node_params])
        h = final[0][-1]                                          # [N + 2, H]
        classify = lambda rows_: T.dot(h[rows_], p["W_o"]) + p["b_o"]  # noqa: E731
        inputs = [leaf_node, leaf_token, level_node, level_left, level_right, rows, roots,
                  points, labels, weights]
        return {"inputs": inputs, "logits": classify(roots),
                "loss": mean_xent(lib, classify(points), labels, weights)}

    # --- recursive / levels: compiled cells driven from Python ---
    def _pieces(self):
        def build():
            lib, T, p = self.lib, self.lib.T, self.p
            model, n = self.cfg.model, self._n_state
            W, b = (p[k] for k in self._node_params)
            tok = T.ivector("token")
            x = p["E"][tok]
            state, z = leaf_cell(lib, model, p["W_leaf"], p["b_leaf"], x)
            leaf, leaf_bwd = vjp(lib, [tok], state, [z], [x, p["W_leaf"], p["b_leaf"]])
            kids = [[T.matrix(side + k, dtype=FLOAT) for k in ("h", "c")[:n]]
                    for side in ("left_", "right_")]
            state, z = node_cell(lib, model, W, b, kids[0], kids[1])
            node, node_bwd = vjp(lib, kids[0] + kids[1], state, [z],
                                 kids[0] + kids[1] + [W, b])
            h = T.matrix("h", dtype=FLOAT)
            labels, weights = T.ivector("labels"), T.vector("weights", dtype=FLOAT)
            logits = T.dot(h, p["W_o"]) + p["b_o"]
            loss = mean_xent(lib, logits, labels, weights)
            return {"leaf": leaf, "leaf_bwd": leaf_bwd, "node": node, "node_bwd": node_bwd,
                    "head": lib.function([h], logits),
                    "head_bwd": lib.function([h, labels, weights],
                                             [loss] + lib.grad(loss, [h, p["W_o"], p["b_o"]]))}
        return self._compiled("pieces", build)

    def _forward_nodes(self, prep, keep):
        """Every node's state (list of [N, H]); with ``keep`` the saved z of every call."""
        f, n, H = self._pieces(), self._n_state, self.cfg.hidden
        state = [np.zeros((prep["num_nodes"], H), np.float32) for _ in range(n)]
        saved = []
        for start, end, tokens in prep["leaf_groups"]:
            out = f["leaf"](tokens)
            for s, o in zip(state, out[:n]):
                s[start:end] = o
            saved.append(out[n] if keep else None)
        for start, end, left, right in prep["node_groups"]:
            out = f["node"](*([s[left] for s in state] + [s[right] for s in state]))
            for s, o in zip(state, out[:n]):
                s[start:end] = o
            saved.append(out[n] if keep else None)
        return state, saved

    def _stepwise_logits(self, prep):
        state, _ = self._forward_nodes(prep, keep=False)
        return self._pieces()["head"](state[0][prep["roots"]])

    def _stepwise_loss_and_grads(self, prep):
        f, n = self._pieces(), self._n_state
        state, saved = self._forward_nodes(prep, keep=True)
        points = prep["points"]
        loss, d_points, g_Wo, g_bo = f["head_bwd"](state[0][points], prep["labels"],
                                                   prep["weights"])
        d = [np.zeros_like(s) for s in state]
        d[0][points] += d_points                       # points are distinct nodes
        Wn, bn = self._node_params
        grads = {k: np.zeros(self.value(k).shape, np.float32) for k in self.names}
        n_leaf = len(prep["leaf_groups"])
        for k in range(len(prep["node_groups"]) - 1, -1, -1):
            start, end, left, right = prep["node_groups"][k]
            args = [s[left] for s in state] + [s[right] for s in state]
            out = f["node_bwd"](*(args + [saved[n_leaf + k]] + [g[start:end] for g in d]))
            # each node has one parent, so within a call no child repeats
            for g, dl, dr in zip(d, out[:n], out[n:2 * n]):
                g[left] += dl
                g[right] += dr
            grads[Wn] += out[2 * n]
            grads[bn] += out[2 * n + 1]
        for k in range(n_leaf - 1, -1, -1):
            start, end, tokens = prep["leaf_groups"][k]
            dx, g_W, g_b = f["leaf_bwd"](*([tokens, saved[k]] + [g[start:end] for g in d]))
            np.add.at(grads["E"], tokens, dx)          # a token may occur twice
            grads["W_leaf"] += g_W
            grads["b_leaf"] += g_b
        grads["W_o"], grads["b_o"] = g_Wo, g_bo
        return float(loss), grads
