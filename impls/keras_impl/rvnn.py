"""RvNN and binary Tree-LSTM in Keras 3: strategies ``recursive``, ``levels``, ``compiled``.

Shapes: N nodes in the batch, Nl leaves, B trees, M classification points (B roots, or all
N nodes in ``all`` loss mode), D embedding, H hidden, C classes; for ``compiled``, S = the
padded node count + 2 buffer slots (``zero``, read by padding; ``sink``, written by it), L
padded steps, W padded width (``TreeBatch.padded_packed()``).

The model is a ``keras.Model``: ``keras.layers.Embedding`` for the leaf tokens (one lookup
for the batch's leaves, as tree-LSTM reference code does; a per-leaf lookup would only add
a gather per leaf), ``TreeEncoder`` (a custom ``keras.layers.Layer`` holding the canonical
``W_leaf``, ``b_leaf`` and ``W``/``b`` or ``U``/``b_U`` with their canonical shapes, written
with ``keras.ops``) and ``keras.layers.Dense`` for ``W_o``, ``b_o``. All three strategies
run the same two node functions (``leaf_state``, ``node_state``) and differ only in how
many nodes one call covers and who drives the schedule:

* ``recursive``: eager, one node function call per node, in the TreeBatch's topological
  order (children before parents; the same calls as walking each tree in post-order, and no
  recursion-depth limit on 1000-deep chains). Node states are [1, H] rows. On jax each node
  function is one ``jax.jit`` call (``common.cell_function`` says why), a leaf reading its
  embedding row itself (``common.row_of``).
* ``levels``: eager dynamic batching. All leaves in one call, then one call per height: a
  TreeBatch height is a contiguous node range, so the [N, H] state buffer is built by
  appending each height's rows (``ops.concatenate``), and the children are read with one
  ``ops.take`` of interleaved (left, right) indices that reshapes straight into the
  ``[h_l; h_r]`` rows the matmul needs. On jax the leaves and each height are one
  ``jax.jit`` call each (``leaf_buffers``, ``height_step``, the functions ``compiled`` loops
  over) on [S, H] node buffers, widths padded to powers of two so they compile for a few
  shapes (op by op, JAX compiles every op for every new width and differentiates each
  separately: ~7x slower here).
* ``compiled``: the packed static form (``TreeBatch.padded_packed``: steps of node groups
  whose children are ready, each W wide), a loop over its steps
  (``keras.ops.scan`` on jax; ``keras.ops.while_loop`` with ``maximum_iterations`` on
  tensorflow, where XLA cannot compile the gradient of ``ops.scan``'s unbounded
  ``tf.while_loop``), each step gathering children from and ``ops.scatter_update``-ing
  parents into [S, H] buffers (``height_step``); the whole training step under the
  backend's compiler with ``jit_compile`` (``jax.jit`` / ``tf.function(jit_compile=True)``),
  compiled once per bucket shape (``info()['traces']``). Not applicable on torch
  (``impls.keras_impl.TORCH_COMPILE_REASON``). Every step is computed at the width W, so
  this does more arithmetic than ``levels`` (on SST batches of 25, 1.9x the real internal
  nodes; one step per height at the widest height's width would be 8.4x).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

import keras
from keras import ops

from bench.batches import bucket, padded_array
from bench.targets import class_points

from .common import BACKEND, JIT_CELLS, KerasImplementation, Prepared, cell_function, read, row_of


def leaf_state(model, x, W_leaf, b_leaf):
    """Leaf states from embeddings x [..., D]: (h, c) [..., H] (c is None for the RvNN)."""
    z = ops.matmul(x, W_leaf) + b_leaf
    if model == "rvnn":
        return ops.tanh(z), None
    # Equal-width splits: Keras' tensorflow split with explicit indices computes the sizes
    # with several extra ops (~0.5 ms per call eagerly).
    i, o, u = ops.split(z, 3, axis=-1)
    c = ops.sigmoid(i) * ops.tanh(u)
    return ops.sigmoid(o) * ops.tanh(c), c


def node_state(model, hlr, W, b, c_l=None, c_r=None):
    """Parent states from [h_l; h_r] [..., 2H] (and child cells [..., H]): (h, c)."""
    z = ops.matmul(hlr, W) + b
    if model == "rvnn":
        return ops.tanh(z), None
    i, f_l, f_r, o, u = ops.split(z, 5, axis=-1)
    c = ops.sigmoid(i) * ops.tanh(u) + ops.sigmoid(f_l) * c_l + ops.sigmoid(f_r) * c_r
    return ops.sigmoid(o) * ops.tanh(c), c


def node_of_children(model, h_l, h_r, c_l, c_r, W, b):
    """One node from its children's states ([1, H] each): (h, c)."""
    return node_state(model, ops.concatenate([h_l, h_r], axis=-1), W, b, c_l, c_r)


def leaf_buffers(model, x, leaf_node, W_leaf, b_leaf, zeros):
    """Leaf states scattered into node buffers: x [Lf, D], leaf_node int32[Lf], zeros [S, H]
    -> (h [S, H],) or (h, c)."""
    h, c = leaf_state(model, x, W_leaf, b_leaf)
    where = ops.expand_dims(leaf_node, -1)
    if c is None:
        return (ops.scatter_update(zeros, where, h),)
    return ops.scatter_update(zeros, where, h), ops.scatter_update(zeros, where, c)


def height_step(model, W, b, buffers, node, pairs):
    """One height over node buffers: read the children of ``node`` int32[W] (``pairs``
    int32[2W], interleaved left/right) from ``buffers`` ((h,) or (h, c), each [S, H]) and
    write the parents' states into their rows; returns the new buffers."""
    H = ops.shape(buffers[0])[-1]
    hlr = ops.reshape(ops.take(buffers[0], pairs, axis=0), (-1, 2 * H))
    where = ops.expand_dims(node, -1)
    if model == "rvnn":
        h_new, _ = node_state(model, hlr, W, b)
        return (ops.scatter_update(buffers[0], where, h_new),)
    c_l, c_r = ops.split(ops.reshape(ops.take(buffers[1], pairs, axis=0), (-1, 2 * H)), 2, axis=-1)
    h_new, c_new = node_state(model, hlr, W, b, c_l, c_r)
    return (ops.scatter_update(buffers[0], where, h_new),
            ops.scatter_update(buffers[1], where, c_new))


class RecursivePlan:
    """Host-side schedule for ``recursive``: leaf count and child lists (Python ints)."""

    def __init__(self, n_leaves, left, right, rows):
        self.n_leaves, self.left, self.right = n_leaves, left, right
        self.rows = rows  # node indices to classify, or None for all nodes


class TreeEncoder(keras.layers.Layer):
    """Leaf embeddings [Nl, D] -> hidden states at the classification points [M, H]."""

    def __init__(self, model: str, units: int, strategy: str, **kwargs):
        super().__init__(**kwargs)
        self.cell_model, self.units, self.strategy = model, units, strategy
        # On jax each node is one jitted call; a leaf reads its own embedding row.
        self.jit_nodes = JIT_CELLS and strategy == "recursive"
        self._leaf_fn = cell_function(
            lambda x, i, W, b: leaf_state(model, ops.expand_dims(row_of(x, i), 0), W, b),
            self.jit_nodes)
        self._node_fn = cell_function(lambda *args: node_of_children(model, *args),
                                      self.jit_nodes)
        # On jax each height is one jitted call over [S, H] node buffers (widths bucketed).
        self.jit_levels = JIT_CELLS and strategy == "levels"
        self._leaf_buffers = cell_function(lambda *args: leaf_buffers(model, *args),
                                           self.jit_levels)
        self._height = cell_function(lambda *args: height_step(model, *args), self.jit_levels)

    def build(self, input_shape):
        D, H = input_shape[-1], self.units
        leaf, node = (H, H) if self.cell_model == "rvnn" else (3 * H, 5 * H)
        # Values come from load_params; zeros keep construction cheap and deterministic.
        self.W_leaf = self.add_weight(name="W_leaf", shape=(D, leaf), initializer="zeros")
        self.b_leaf = self.add_weight(name="b_leaf", shape=(leaf,), initializer="zeros")
        self.W = self.add_weight(name="W" if self.cell_model == "rvnn" else "U",
                                 shape=(2 * H, node), initializer="zeros")
        self.b = self.add_weight(name="b" if self.cell_model == "rvnn" else "b_U",
                                 shape=(node,), initializer="zeros")

    def call(self, x, structure, static=None):
        weights = [read(v) for v in (self.W_leaf, self.b_leaf, self.W, self.b)]
        return getattr(self, "_" + self.strategy)(x, structure, static, *weights)

    def _recursive(self, x, structure, plan, W_leaf, b_leaf, W, b):
        leaf_fn, node_fn = self._leaf_fn, self._node_fn
        if self.jit_nodes:
            states = [leaf_fn(x, i, W_leaf, b_leaf) for i in range(plan.n_leaves)]
        else:
            # [1, D] rows in one op: Keras' tensorflow matmul takes a slow tensordot path
            # for vectors.
            states = [leaf_state(self.cell_model, xi, W_leaf, b_leaf)
                      for xi in ops.split(x, plan.n_leaves, axis=0)]
        for n in range(plan.n_leaves, len(plan.left)):
            (h_l, c_l), (h_r, c_r) = states[plan.left[n]], states[plan.right[n]]
            states.append(node_fn(h_l, h_r, c_l, c_r, W, b))
        rows = range(len(states)) if plan.rows is None else plan.rows
        return ops.concatenate([states[r][0] for r in rows], axis=0)

    def _levels(self, x, structure, static, W_leaf, b_leaf, W, b):
        """structure = (rows int32[M] or None, ((pairs int32[2 W_k]) per height k >= 1));
        on jax (rows int32[M], leaf_node int32[Lf], ((node int32[W_k], pairs int32[2 W_k])
        per height)) with static = S, the node buffer rows."""
        model, H = self.cell_model, self.units
        if self.jit_levels:
            rows, leaf_node, heights = structure
            buffers = self._leaf_buffers(x, leaf_node, W_leaf, b_leaf,
                                         ops.zeros((static, H), dtype=x.dtype))
            for node, pairs in heights:
                buffers = self._height(W, b, buffers, node, pairs)
            return ops.take(buffers[0], rows, axis=0)
        rows, heights = structure
        h, c = leaf_state(model, x, W_leaf, b_leaf)
        for pairs in heights:
            hlr = ops.reshape(ops.take(h, pairs, axis=0), (-1, 2 * H))
            if model == "rvnn":
                h_new, _ = node_state(model, hlr, W, b)
            else:
                c_l, c_r = ops.split(ops.reshape(ops.take(c, pairs, axis=0), (-1, 2 * H)), 2,
                                     axis=-1)
                h_new, c_new = node_state(model, hlr, W, b, c_l, c_r)
                c = ops.concatenate([c, c_new], axis=0)
            h = ops.concatenate([h, h_new], axis=0)
        return h if rows is None else ops.take(h, rows, axis=0)

    def _compiled(self, x, structure, static, W_leaf, b_leaf, W, b):
        """structure = (leaf_node int32[Lf], level_node int32[L, W], level_pairs int32[L, 2W],
        rows int32[M] or None); static = (S,)."""
        model, H = self.cell_model, self.units
        leaf_node, level_node, level_pairs, rows = structure
        (slots,) = static
        carry = leaf_buffers(model, x, leaf_node, W_leaf, b_leaf,
                             ops.zeros((slots, H), dtype=x.dtype))

        def height(carry, xs):
            return height_step(model, W, b, carry, *xs), None

        L = level_node.shape[0]
        if L and BACKEND == "tensorflow":
            def cond(k, *carry):
                return k < L

            def body(k, *carry):
                xs = (ops.take(level_node, k, axis=0), ops.take(level_pairs, k, axis=0))
                return (k + 1,) + height(carry, xs)[0]

            carry = ops.while_loop(cond, body, (0,) + carry, maximum_iterations=L)[1:]
        elif L:
            carry, _ = ops.scan(height, carry, (level_node, level_pairs))
        return carry[0] if rows is None else ops.take(carry[0], rows, axis=0)


class TreeClassifier(keras.Model):
    """(leaf tokens, schedule) -> logits [M, C] at the requested nodes."""

    def __init__(self, cfg, strategy: str):
        super().__init__(name="keras_%s_%s" % (cfg.model, strategy))
        self.embed = keras.layers.Embedding(cfg.vocab_size, cfg.embed_dim, name="embedding")
        self.encoder = TreeEncoder(cfg.model, cfg.hidden, strategy, name=cfg.model)
        self.classify = keras.layers.Dense(cfg.num_classes, name="classify")
        self.embed.build((None,))
        self.encoder.build((None, cfg.embed_dim))
        self.classify.build((None, cfg.hidden))
        self.built = True

    def call(self, inputs, static=None):
        """inputs = (leaf tokens int32[Nl], strategy-specific structure)."""
        tokens, structure = inputs
        return self.classify(self.encoder(self.embed(tokens), structure=structure, static=static))

    def param_variables(self):
        e = self.encoder
        names = ("W", "b") if e.cell_model == "rvnn" else ("U", "b_U")
        return OrderedDict([("E", self.embed.embeddings), ("W_leaf", e.W_leaf),
                            ("b_leaf", e.b_leaf), (names[0], e.W), (names[1], e.b),
                            ("W_o", self.classify.kernel), ("b_o", self.classify.bias)])


class RvNN(KerasImplementation):
    family = "rvnn"
    modes = {"recursive": "eager", "levels": "eager", "compiled": "xla"}

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self._shapes = set()

    def _build_model(self):
        return TreeClassifier(self.cfg, self.strategy)

    def _param_variables(self):
        return self.model.param_variables()

    def _int32(self, values):
        return self._tensor(np.asarray(values, np.int32), "int32")

    def _rows(self, points):
        """The loss's rows for an encoder (None: every node row, no gather)."""
        return None if points.every_row else self._int32(points.rows)

    def prepare(self, batch):
        """Inputs for the loss (at ``bench.targets.class_points``) and for the logits (at
        the roots); the encoders take the rows to classify, None for every row."""
        n_leaves = int(batch.level_offsets[1])
        int32 = self._int32
        if self.strategy == "compiled":
            padded = batch.padded_packed()
            self._shapes.add(padded.shape_key)
            points = class_points(padded, self.cfg.loss_mode)
            pairs = np.stack([padded.level_left, padded.level_right], axis=-1)
            pairs = pairs.reshape(pairs.shape[0], -1)                        # [L, 2W]
            base = (int32(padded.leaf_node), int32(padded.level_node), int32(pairs))
            static = (padded.num_nodes + 2,)
            tokens = int32(padded.leaf_token)
            return Prepared((tokens, base + (self._rows(points),)), static,
                            int32(points.labels), batch.size,
                            (tokens, base + (int32(padded.root),)), static)
        points = class_points(batch, self.cfg.loss_mode)
        tokens = batch.token[:n_leaves]
        if self.strategy == "recursive" and self.model.encoder.jit_nodes:
            # The jitted leaf function sees all leaf embeddings: a power-of-two row count
            # keeps its compiles to a few shapes (the padding rows are never read).
            tokens = np.concatenate([tokens, np.zeros(bucket(n_leaves) - n_leaves, np.int32)])
        tokens = int32(tokens)
        if self.strategy == "recursive":
            left, right = batch.left.tolist(), batch.right.tolist()
            rows = None if points.every_row else points.rows.tolist()
            return Prepared((tokens, ()), RecursivePlan(n_leaves, left, right, rows),
                            int32(points.labels), batch.size, (tokens, ()),
                            RecursivePlan(n_leaves, left, right, batch.root.tolist()))
        o = batch.level_offsets
        if self.model.encoder.jit_levels:
            return self._prepare_buffers(batch, points)
        heights = tuple(
            int32(np.stack([batch.left[o[k]:o[k + 1]], batch.right[o[k]:o[k + 1]]], -1).ravel())
            for k in range(1, batch.num_levels))
        return Prepared((tokens, (self._rows(points), heights)), None, int32(points.labels),
                        batch.size, (tokens, (int32(batch.root), heights)), None)

    def _prepare_buffers(self, batch, points):
        """jax ``levels``: node buffers of S = bucket(N) + 2 rows (``zero`` = S - 2 is read by
        padding, ``sink`` = S - 1 written by it), leaves and each height padded to a power of
        two, so the jitted leaf and height functions compile for a few shapes only."""
        o, N = batch.level_offsets, batch.num_nodes
        zero, sink = bucket(N), bucket(N) + 1
        n_leaves = int(o[1])
        int32 = self._int32
        tokens = int32(padded_array(batch.token[:n_leaves], bucket(n_leaves), 0))
        leaf_node = int32(padded_array(np.arange(n_leaves), bucket(n_leaves), sink))
        heights = []
        for k in range(1, batch.num_levels):
            nodes = np.arange(o[k], o[k + 1])
            width = bucket(len(nodes))
            pairs = np.stack([padded_array(batch.left[nodes], width, zero),
                              padded_array(batch.right[nodes], width, zero)], -1).ravel()
            heights.append((int32(padded_array(nodes, width, sink)), int32(pairs)))
        heights = tuple(heights)
        return Prepared((tokens, (int32(points.index), leaf_node, heights)), zero + 2,
                        int32(points.labels), batch.size,
                        (tokens, (int32(batch.root), leaf_node, heights)), zero + 2)

    def _describe(self):
        enc = self.model.encoder
        out = {"encoder": "TreeEncoder (%s)" % self.strategy,
               "jit_per_node": enc.jit_nodes, "jit_per_height": enc.jit_levels}
        if self.strategy == "compiled":
            out["padded_shapes"] = sorted(self._shapes)
        return out
