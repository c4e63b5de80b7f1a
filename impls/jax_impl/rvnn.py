"""RvNN and binary Tree-LSTM in JAX: strategies ``recursive``, ``levels`` and ``compiled``.

Shapes: N nodes, Nl leaves, Nb = bucketed node count + 2 buffer rows (the
layout of PaddedTrees: the last two are ``zero`` and ``sink``), D
embedding, H hidden, C classes. A node state is ``(h,)`` (RvNN) or ``(h, c)``
(Tree-LSTM), each ``[..., H]``; the same two functions compute one node
(``[H]``) or a whole group of nodes (``[W, H]``). Padding entries read the
``zero`` row and write out of bounds (dropped: see ``write_rows``).

* ``recursive``: one jitted call per node, following each tree from its root
  (post-order, with an explicit stack so a 1000-deep chain does not hit
  Python's recursion limit). The batch's leaf tokens are embedded in one
  lookup first, as tree-LSTM reference code does, and each leaf call reads
  its row: a per-leaf ``E[token]`` would make every leaf's backward a dense
  [V, D] gradient.
  ``jax.value_and_grad`` differentiates the Python traversal, so the backward
  pass also runs node by node.
* ``levels``: one jitted call for all leaves, then one per height, each
  gathering children from and scattering parents into node buffers [Nb, H];
  the width of each height is padded to a power of two, Nb to a power of two
  plus 2, so the number of traces stays small.
* ``compiled``: forward, loss, backward and optimiser update in one ``jit``:
  the leaves in one batched op, then ``lax.scan`` over a static schedule of
  node groups [S, W] (gathers, node function, scatter into the buffers). The
  schedule packs nodes into groups of width W in height order, a node never
  sharing a group with its descendants (``TreeBatch.packed_groups``), so narrow
  high levels do not each pay for the widest one; S and W are bucketed.
"""

from __future__ import annotations

from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.batches import TreeBatch, step_bucket

from .common import JaxImplementation, classify, softmax_xent


# levels: narrower heights are padded to this width; the few padded rows cost
# less than compiling a forward and a backward for widths 1, 2, 4 and 8
LEVEL_WIDTH_MIN = 16


def _bucket(n: int) -> int:
    """Next power of two >= n (0 for 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def leaf_state(model, W_leaf, b_leaf, x):
    """Leaf states from embeddings x [..., D]."""
    z = x @ W_leaf + b_leaf
    if model == "rvnn":
        return (jnp.tanh(z),)
    i, o, u = jnp.split(z, 3, axis=-1)
    c = jax.nn.sigmoid(i) * jnp.tanh(u)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def node_state(model, W, b, left, right):
    """Parent states from child states ``left``/``right`` (tuples of [..., H])."""
    z = jnp.concatenate([left[0], right[0]], axis=-1) @ W + b
    if model == "rvnn":
        return (jnp.tanh(z),)
    i, fl, fr, o, u = jnp.split(z, 5, axis=-1)
    c = (jax.nn.sigmoid(i) * jnp.tanh(u) + jax.nn.sigmoid(fl) * left[1]
         + jax.nn.sigmoid(fr) * right[1])
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def write_targets(nodes: np.ndarray, width: int, rows: int) -> np.ndarray:
    """int32[width]: ``nodes`` (ascending), then distinct indices past the buffer's ``rows``.

    Padding writes go out of bounds and are dropped (see ``write_rows``), so
    every index of a write is distinct and the write can promise JAX unique,
    sorted indices.
    """
    out = rows + np.arange(width, dtype=np.int32)
    out[:len(nodes)] = nodes
    return out


def write_rows(buf, rows, values):
    """buf with ``values[k]`` written to row ``rows[k]``; out-of-bounds rows (padding) are dropped.

    Every row of a node buffer starts at zero and is written exactly once, so
    adding is writing; scatter-add is linear in ``buf``, which keeps the
    backward pass free of the zeroing scatter (and of the buffer copies XLA
    inserts around it in a loop) that the transpose of a scatter-set needs.
    Unique indices matter too: for a scatter that might hit a row twice,
    JAX's derivative tracks which update won with an extra scatter and compare
    over the whole buffer [Nb, H] at every step.
    """
    return buf.at[rows].add(values, mode="drop", unique_indices=True, indices_are_sorted=True)


def _weights(model, p):
    if model == "rvnn":
        return (p["W_leaf"], p["b_leaf"]), (p["W"], p["b"])
    return (p["W_leaf"], p["b_leaf"]), (p["U"], p["b_U"])


class RvNN(JaxImplementation):
    family = "rvnn"
    jit_strategies = ("compiled",)
    # compiled: "packed" groups (TreeBatch.packed_groups) or "heights", one group per
    # height at the widest height's width: the plain level schedule of PaddedTrees
    schedule = "packed"

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        model, H = cfg.model, cfg.hidden
        self._all_nodes = cfg.loss_mode == "all"
        if strategy == "recursive":
            def embed(E, tokens):
                return E[tokens]

            def leaf(W_leaf, b_leaf, x, i):
                return leaf_state(model, W_leaf, b_leaf, x[i])

            def node(W, b, left, right):
                return node_state(model, W, b, left, right)

            self._embed = jax.jit(self._traced("embed", embed))
            self._leaf = jax.jit(self._traced("leaf", leaf))
            self._node = jax.jit(self._traced("node", node))
        elif strategy == "levels":
            def leaves(W_leaf, b_leaf, E, tokens, where, rows):
                states = leaf_state(model, W_leaf, b_leaf, E[tokens])
                return tuple(write_rows(jnp.zeros((rows, H), jnp.float32), where, s)
                             for s in states)

            def level(W, b, bufs, node, left, right):
                new = node_state(model, W, b, tuple(buf[left] for buf in bufs),
                                 tuple(buf[right] for buf in bufs))
                return tuple(write_rows(buf, node, s) for buf, s in zip(bufs, new))

            self._leaves = jax.jit(self._traced("leaves", leaves), static_argnums=(5,))
            self._level = jax.jit(self._traced("level", level))
        if strategy != "compiled":
            def readout(W_o, b_o, h, points):
                return classify(W_o, b_o, h[points])

            def loss_head(W_o, b_o, h, points, labels):
                return softmax_xent(classify(W_o, b_o, h[points]), labels)

            self._readout = jax.jit(self._traced("readout", readout))
            self._loss_head = jax.jit(self._traced("loss_head", loss_head))

    # --- preparation (untimed) ---
    def prepare(self, batch: TreeBatch):
        if not isinstance(batch, TreeBatch):
            raise TypeError("the RvNN family takes a TreeBatch, not %s" % type(batch).__name__)
        if self.strategy == "recursive":
            return self._prepare_recursive(batch)
        if self.strategy == "levels":
            return self._prepare_levels(batch)
        return self._prepare_compiled(batch)

    def _loss_points(self, batch: TreeBatch, rows: int) -> Tuple[np.ndarray, np.ndarray]:
        """Rows of the hidden states the loss reads, and their labels (-1: ignored)."""
        if not self._all_nodes:
            return batch.root, batch.label[batch.root]
        labels = np.full(rows, -1, np.int32)
        labels[:batch.num_nodes] = batch.label
        return np.arange(rows, dtype=np.int32), labels

    def _prepare_recursive(self, batch):
        # Leaf tokens and (in 'all' mode) the stack of node states are padded to
        # powers of two: the leaf call reads a row of x [Nl, D] and eager JAX
        # compiles every op once per shape, so exact sizes would compile per batch.
        n_leaves = int(batch.level_offsets[1])
        leaf_tokens = np.zeros(_bucket(n_leaves), np.int32)
        leaf_tokens[:n_leaves] = batch.token[:n_leaves]
        rows = _bucket(batch.num_nodes) if self._all_nodes else batch.size
        if self._all_nodes:
            labels = np.full(rows, -1, np.int32)
            labels[:batch.num_nodes] = batch.label
        else:
            labels = batch.label[batch.root]
        return {"leaf_tokens": self._put(leaf_tokens),
                "left": batch.left.tolist(), "right": batch.right.tolist(),
                "roots": batch.root.tolist(), "rows": rows,
                "root_rows": self._put(np.arange(batch.size)),
                "points": self._put(np.arange(rows)), "labels": self._put(labels)}

    def _prepare_levels(self, batch):
        o = batch.level_offsets
        n_leaves = int(o[1])
        rows = _bucket(batch.num_nodes) + 2
        zero = rows - 2
        leaf_tokens = np.zeros(_bucket(n_leaves), np.int32)
        leaf_tokens[:n_leaves] = batch.token[:n_leaves]
        leaf_where = write_targets(np.arange(n_leaves), leaf_tokens.size, rows)
        levels = []
        for h in range(1, batch.num_levels):
            idx = np.arange(o[h], o[h + 1])
            width = max(LEVEL_WIDTH_MIN, _bucket(idx.size))
            left = np.full(width, zero, np.int32)
            right = np.full(width, zero, np.int32)
            left[:idx.size], right[:idx.size] = batch.left[idx], batch.right[idx]
            levels.append((self._put(write_targets(idx, width, rows)), self._put(left),
                           self._put(right)))
        points, labels = self._loss_points(batch, rows)
        return {"rows": rows, "leaf_tokens": self._put(leaf_tokens),
                "leaf_where": self._put(leaf_where), "levels": levels,
                "roots": self._put(batch.root), "points": self._put(points),
                "labels": self._put(labels)}

    def _prepare_compiled(self, batch):
        """PaddedTrees' buffer layout (zero and sink rows, labels), with the level
        arrays replaced by the group schedule [S, W] and padding writes out of bounds."""
        n_leaves = int(batch.level_offsets[1])
        padded = batch.padded(num_nodes=_bucket(batch.num_nodes), num_leaves=_bucket(n_leaves))
        if self.schedule == "packed":
            width = batch.group_width()
        else:
            width = _bucket(int(np.diff(batch.level_offsets)[1:].max(initial=1)))
        groups = batch.packed_groups(width)
        steps = step_bucket(len(groups))
        rows = padded.num_nodes + 2
        node = np.tile(write_targets(np.zeros(0, np.int32), width, rows), (steps, 1))
        left = np.full((steps, width), padded.zero, np.int32)
        right = np.full((steps, width), padded.zero, np.int32)
        for s, grp in enumerate(groups):
            node[s] = write_targets(grp, width, rows)
            left[s, :grp.size], right[s, :grp.size] = batch.left[grp], batch.right[grp]
        points, labels = self._loss_points(batch, rows)
        leaf_node = write_targets(np.arange(n_leaves), padded.leaf_token.size, rows)
        return {"leaf_token": self._put(padded.leaf_token), "leaf_node": self._put(leaf_node),
                "node": self._put(node), "left": self._put(left), "right": self._put(right),
                "label": self._put(padded.label), "roots": self._put(batch.root),
                "points": self._put(points), "labels": self._put(labels)}

    # --- hidden states: a list of node states (recursive) or buffers [Nb, H] ---
    def _states_recursive(self, p, prep):
        leaf_w, node_w = _weights(self.cfg.model, p)
        x = self._embed(p["E"], prep["leaf_tokens"])   # [bucket(Nl), D]
        left, right = prep["left"], prep["right"]
        states: List = [None] * len(left)
        for root in prep["roots"]:
            stack = [(root, False)]
            while stack:
                n, children_done = stack.pop()
                if left[n] < 0:
                    states[n] = self._leaf(*leaf_w, x, n)  # leaves are nodes 0..Nl-1
                elif children_done:
                    states[n] = self._node(*node_w, states[left[n]], states[right[n]])
                else:
                    stack += [(n, True), (right[n], False), (left[n], False)]
        return states

    def _buffer_levels(self, p, prep):
        leaf_w, node_w = _weights(self.cfg.model, p)
        bufs = self._leaves(*leaf_w, p["E"], prep["leaf_tokens"], prep["leaf_where"],
                            prep["rows"])
        for node, left, right in prep["levels"]:
            bufs = self._level(*node_w, bufs, node, left, right)
        return bufs[0]

    def _buffer_compiled(self, p, prep):
        model, H = self.cfg.model, self.cfg.hidden
        rows = prep["label"].shape[0]
        (W_leaf, b_leaf), (W, b) = _weights(model, p)
        leaf = leaf_state(model, W_leaf, b_leaf, p["E"][prep["leaf_token"]])
        bufs = tuple(write_rows(jnp.zeros((rows, H), jnp.float32), prep["leaf_node"], s)
                     for s in leaf)

        def step(bufs, group):
            node, left, right = group
            new = node_state(model, W, b, tuple(buf[left] for buf in bufs),
                             tuple(buf[right] for buf in bufs))
            return tuple(write_rows(buf, node, s) for buf, s in zip(bufs, new)), None

        bufs, _ = lax.scan(step, bufs, (prep["node"], prep["left"], prep["right"]))
        return bufs[0]

    # --- hooks for the base class ---
    def _logits(self, p, prep):
        if self.strategy == "recursive":
            states = self._states_recursive(p, prep)
            h = jnp.stack([states[r][0] for r in prep["roots"]])
            return self._readout(p["W_o"], p["b_o"], h, prep["root_rows"])
        if self.strategy == "levels":
            return self._readout(p["W_o"], p["b_o"], self._buffer_levels(p, prep), prep["roots"])
        return classify(p["W_o"], p["b_o"], self._buffer_compiled(p, prep)[prep["roots"]])

    def _loss(self, p, prep):
        if self.strategy == "recursive":
            states = self._states_recursive(p, prep)
            if self._all_nodes:
                pad = [jnp.zeros_like(states[0][0])] * (prep["rows"] - len(states))
                h = jnp.stack([s[0] for s in states] + pad)
            else:
                h = jnp.stack([states[r][0] for r in prep["roots"]])
            return self._loss_head(p["W_o"], p["b_o"], h, prep["points"], prep["labels"])
        if self.strategy == "levels":
            return self._loss_head(p["W_o"], p["b_o"], self._buffer_levels(p, prep),
                                   prep["points"], prep["labels"])
        h = self._buffer_compiled(p, prep)[prep["points"]]
        return softmax_xent(classify(p["W_o"], p["b_o"], h), prep["labels"])

    def info(self):
        out = super().info()
        out["buckets"] = {
            "recursive": None,
            "levels": "node buffer: power of two + 2 rows; leaves: power of two; each "
                      "height's width: power of two >= %d" % LEVEL_WIDTH_MIN,
            "compiled": "node buffer and leaves: power of two; groups: count a multiple of 8, "
                        "width a power of two (packed: >= 8, near internal nodes per height; "
                        "heights: the widest height's)",
        }[self.strategy]
        if self.strategy == "compiled":
            out["schedule"] = self.schedule
        return out
