"""RvNN and Tree-LSTM in TensorFlow: strategies ``recursive``, ``levels``, ``compiled``.

Shapes: N nodes in the batch, B trees, D embedding, H hidden, C classes.
All three strategies run the same two cell functions (``leaf_cell``,
``internal_cell``); they differ only in how many nodes one call covers and
who drives the schedule.

* ``recursive``: eager, one cell call per node, walking each tree from its
  root in post-order (an explicit stack, so chains deeper than Python's
  recursion limit work). What most tutorials write; the baseline.
* ``levels``: eager dynamic batching. All leaves in one call, then one call
  per height: a TreeBatch level is a contiguous index range, so the node
  buffer is built by appending each level's rows (``tf.concat``) and the
  children are read with one ``tf.gather`` of [left, right] index pairs, which
  reshapes straight into the ``[h_l; h_r]`` rows the matmul needs.
* ``compiled``: the level schedule over the padded static form
  (``TreeBatch.padded_bucketed()``: node buffer plus a ``zero`` row read by
  padding and a ``sink`` row written by it) inside ``tf.function``: a
  ``tf.while_loop`` over heights that gathers children from and
  ``tensor_scatter_nd_update``s into a [N+2, H] buffer. The input signature
  leaves every dimension open, so one trace serves every batch
  (``info()['traces']``).

XLA for ``compiled``: measured on the quick preset (SST, first 12 batches of
25, D 100, H 150, 2 threads, CPU), all variants in one process, alternating
passes, on a shared 2-core machine (best / median of 7 passes, examples/s;
the 12 batches have 3 distinct bucketed shapes)::

    Tree-LSTM                  train       infer      first train call  warm-up pass
    graph, levels trimmed    438 / 293   1819 /  957      1.3 s            1.3 s
    graph, padded shapes     229 / 126    600 /  384      1.2 s            2.8 s
    XLA,   padded shapes     300 / 169    953 /  551      5.6 s           16.0 s
    RvNN
    graph, levels trimmed   1085 / 683   2442 / 2206      0.9 s            0.7 s
    XLA,   padded shapes     996 / 532   2506 / 1364      4.5 s           10.5 s

XLA needs static shapes, and on SST the bucketed width times the real number
of levels is ~5.6x the real internal nodes (2524 vs 453 per batch), which
costs more than XLA's fusion saves. Without XLA the graph cuts each level to
its real width in-graph (widths and real leaf / level counts come from
``prepare``), so it computes exactly what ``levels`` does, with one trace for
all shapes. So ``compiled`` runs as a graph without XLA (``COMPILED_XLA``);
``xla=True`` selects the static-shape XLA variant (``info()['xla']``).
"""

from __future__ import annotations

import numpy as np

from bench.targets import class_points

from .common import TFImplementation, masked_xent, tf

COMPILED_XLA = False


def leaf_cell(model, x, W_leaf, b_leaf):
    """x float32[n, D] -> (h, c) float32[n, H] (c is None for the RvNN)."""
    # bias_add rather than "+": its gradient is one op, not a broadcast reduction
    # (eager execution pays per op, forward and backward).
    z = tf.nn.bias_add(tf.matmul(x, W_leaf), b_leaf)
    if model == "rvnn":
        return tf.tanh(z), None
    # Blocks [i, o | u]: one sigmoid and one tanh over contiguous blocks keep the
    # op count (what eager per-node execution pays for) low.
    gates, u = tf.split(z, [2 * W_leaf.shape[1] // 3, -1], axis=1)
    i, o = tf.split(tf.sigmoid(gates), 2, axis=1)
    c = i * tf.tanh(u)
    return o * tf.tanh(c), c


def internal_cell(model, hlr, c_l, c_r, W, b):
    """hlr float32[n, 2H] = [h_l; h_r], c_l / c_r float32[n, H] -> (h, c) float32[n, H]."""
    z = tf.nn.bias_add(tf.matmul(hlr, W), b)
    if model == "rvnn":
        return tf.tanh(z), None
    gates, u = tf.split(z, [4 * W.shape[1] // 5, -1], axis=1)  # [i, f_l, f_r, o | u]
    i, f_l, f_r, o = tf.split(tf.sigmoid(gates), 4, axis=1)
    c = tf.add_n([i * tf.tanh(u), f_l * c_l, f_r * c_r])
    return o * tf.tanh(c), c


class RvNN(TFImplementation):
    family = "rvnn"

    def __init__(self, cfg, strategy, device="cpu", threads=1, xla=None):
        """``xla`` overrides COMPILED_XLA for ``compiled`` (used to measure the choice)."""
        super().__init__(cfg, strategy, device, threads)
        if xla is not None and strategy != "compiled":
            raise ValueError("xla applies to the compiled strategy only")
        self.graph = strategy == "compiled"
        self.xla = strategy == "compiled" and (COMPILED_XLA if xla is None else bool(xla))
        # Trimming needs dynamic shapes, which XLA does not take.
        self.trim = self.graph and not self.xla
        self._tree = cfg.model == "treelstm"
        self._shapes = set()

    def _weights(self):
        v = self._vars
        internal = ("U", "b_U") if self._tree else ("W", "b")
        return v["W_leaf"], v["b_leaf"], v[internal[0]], v[internal[1]]

    # --- batches ---
    def prepare(self, batch):
        """TreeBatch -> what the strategy reads (device tensors; host ints for the walk).

        Labels: ``labels`` int32[B] (root mode) or int32[N] / int32[N+2] (all mode).
        recursive: ``leaf_token`` one int32[1] tensor per node (None inside),
        plus host ``left`` / ``right`` / ``root``.
        levels: ``leaf_token`` int32[N0], ``level_lr`` one int32[n_h, 2] per
        height h >= 1, ``root`` int32[B].
        compiled: the PaddedTrees arrays plus ``level_lr`` int32[L, W, 2],
        ``level_width`` int32[L], ``levels`` / ``leaves`` int32[] (real counts),
        ``buffer_rows`` int32[] (padded nodes + zero + sink).
        """
        mode = self.cfg.loss_mode
        with tf.device(self.dev):
            put = lambda a: tf.identity(tf.constant(a))  # noqa: E731 (identity moves it to the device)
            if self.strategy == "recursive":
                return {"leaf_token": [put(np.array([t], np.int32)) if t >= 0 else None
                                       for t in batch.token],
                        "left": batch.left.tolist(), "right": batch.right.tolist(),
                        "root": batch.root.tolist(),
                        "labels": put(class_points(batch, mode).labels)}
            if self.strategy == "levels":
                o = batch.level_offsets
                return {"leaf_token": put(batch.token[:o[1]]),
                        "level_lr": [put(np.stack([batch.left[o[h]:o[h + 1]],
                                                   batch.right[o[h]:o[h + 1]]], axis=1))
                                     for h in range(1, batch.num_levels)],
                        "root": put(batch.root),
                        "labels": put(class_points(batch, mode).labels)}
            pt = batch.padded_bucketed()
            self._shapes.add(pt.shape_key)
            widths = np.diff(batch.level_offsets)[1:]
            level_width = np.zeros(pt.level_node.shape[0], np.int32)
            level_width[:widths.size] = widths
            return {"leaf_node": put(pt.leaf_node), "leaf_token": put(pt.leaf_token),
                    "level_node": put(pt.level_node),
                    "level_lr": put(np.stack([pt.level_left, pt.level_right], axis=-1)),
                    "level_width": put(level_width),
                    "levels": put(np.int32(batch.num_levels - 1)),
                    "leaves": put(np.int32(batch.level_offsets[1])),
                    "buffer_rows": put(np.int32(pt.num_nodes + 2)),
                    "root": put(pt.root),
                    "labels": put(class_points(pt, mode).labels)}

    def _signature(self):
        spec = tf.TensorSpec
        return {"leaf_node": spec([None], tf.int32), "leaf_token": spec([None], tf.int32),
                "level_node": spec([None, None], tf.int32),
                "level_lr": spec([None, None, 2], tf.int32),
                "level_width": spec([None], tf.int32),
                "levels": spec([], tf.int32), "leaves": spec([], tf.int32),
                "buffer_rows": spec([], tf.int32),
                "root": spec([None], tf.int32), "labels": spec([None], tf.int32)}

    # --- model: hidden states, float32[rows, H], rows as the labels are laid out ---
    def _recursive(self, p, all_nodes):
        model, (W_leaf, b_leaf, W, b) = self.cfg.model, self._weights()
        E, left, right = self._vars["E"], p["left"], p["right"]
        h = [None] * len(left)
        c = [None] * len(left)
        for root in p["root"]:
            stack = [(root, False)]
            while stack:
                n, children_done = stack.pop()
                if left[n] < 0:
                    h[n], c[n] = leaf_cell(model, tf.gather(E, p["leaf_token"][n]), W_leaf, b_leaf)
                elif children_done:
                    a, z = left[n], right[n]
                    h[n], c[n] = internal_cell(model, tf.concat([h[a], h[z]], axis=1),
                                               c[a], c[z], W, b)
                else:
                    stack.extend([(n, True), (right[n], False), (left[n], False)])
        return tf.concat(h if all_nodes else [h[r] for r in p["root"]], axis=0)

    def _levels(self, p, all_nodes):
        model, (W_leaf, b_leaf, W, b) = self.cfg.model, self._weights()
        H = self.cfg.hidden
        buf_h, buf_c = leaf_cell(model, tf.gather(self._vars["E"], p["leaf_token"]), W_leaf, b_leaf)
        for lr in p["level_lr"]:
            hlr = tf.reshape(tf.gather(buf_h, lr), [-1, 2 * H])
            c_l = c_r = None
            if self._tree:
                c_l, c_r = tf.unstack(tf.gather(buf_c, lr), 2, axis=1)
            h, c = internal_cell(model, hlr, c_l, c_r, W, b)
            buf_h = tf.concat([buf_h, h], axis=0)
            if self._tree:
                buf_c = tf.concat([buf_c, c], axis=0)
        return buf_h if all_nodes else tf.gather(buf_h, p["root"])

    def _compiled(self, p, all_nodes):
        model, (W_leaf, b_leaf, W, b) = self.cfg.model, self._weights()
        H = self.cfg.hidden
        n_buf = p["buffer_rows"]
        leaf_node, leaf_token = p["leaf_node"], p["leaf_token"]
        if self.trim:
            leaf_node, leaf_token = leaf_node[:p["leaves"]], leaf_token[:p["leaves"]]
        h, c = leaf_cell(model, tf.gather(self._vars["E"], leaf_token), W_leaf, b_leaf)
        where = leaf_node[:, None]
        buf_h = tf.tensor_scatter_nd_update(tf.zeros([n_buf, H]), where, h)
        buf_c = tf.tensor_scatter_nd_update(tf.zeros([n_buf, H]), where, c) if self._tree else None

        def body(i, buf_h, *buf_c):
            node, lr = p["level_node"][i], p["level_lr"][i]
            if self.trim:
                node, lr = node[:p["level_width"][i]], lr[:p["level_width"][i]]
            hlr = tf.reshape(tf.gather(buf_h, lr), [-1, 2 * H])
            c_l = c_r = None
            if self._tree:
                c_l, c_r = tf.unstack(tf.gather(buf_c[0], lr), 2, axis=1)
            h, c = internal_cell(model, hlr, c_l, c_r, W, b)
            buf_h = tf.tensor_scatter_nd_update(buf_h, node[:, None], h)
            if not self._tree:
                return i + 1, buf_h
            return i + 1, buf_h, tf.tensor_scatter_nd_update(buf_c[0], node[:, None], c)

        state = (tf.constant(0), buf_h) + ((buf_c,) if self._tree else ())
        out = tf.while_loop(lambda i, *_: i < p["levels"], body, state,
                            maximum_iterations=tf.shape(p["level_node"])[0])
        buf_h = out[1]
        return buf_h if all_nodes else tf.gather(buf_h, p["root"])

    def _hidden(self, p, all_nodes):
        return {"recursive": self._recursive, "levels": self._levels,
                "compiled": self._compiled}[self.strategy](p, all_nodes)

    def _head(self, h):
        return tf.nn.bias_add(tf.matmul(h, self._vars["W_o"]), self._vars["b_o"])

    def _logits(self, p):
        return self._head(self._hidden(p, all_nodes=False))

    def _loss(self, p):
        return masked_xent(self._head(self._hidden(p, all_nodes=self.cfg.loss_mode == "all")),
                           p["labels"])

    def info(self):
        out = super().info()
        if self.graph:
            out["trimmed_levels"] = self.trim
            out["padded_shapes"] = len(self._shapes)
        return out
