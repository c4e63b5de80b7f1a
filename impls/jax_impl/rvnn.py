"""RvNN and binary Tree-LSTM in JAX: strategies ``recursive``, ``levels`` and ``compiled``.

Shapes: N nodes, Nl leaves, B examples, D embedding, H hidden, C classes. A
node state is ``(h,)`` (RvNN) or ``(h, c)`` (Tree-LSTM), each ``[..., H]``;
a node is a linear part (``z = [h_l; h_r] W + b``, leaves ``z = x W_leaf +
b_leaf``) and its gates (``node_gates`` / ``leaf_gates``), the same code for
one node (``[H]``) or a group of nodes (``[W, H]``).

* ``recursive``: one jitted call per node, following each tree from its root
  (post-order, with an explicit stack so a 1000-deep chain does not hit
  Python's recursion limit). The batch's leaf tokens are embedded in one
  lookup first, as tree-LSTM reference code does, and each leaf call reads
  its row: a per-leaf ``E[token]`` would make every leaf's backward a dense
  [V, D] gradient. ``jax.value_and_grad`` differentiates the Python
  traversal, so the backward pass also runs node by node.
* ``levels``: dynamic batching from Python: one jitted call for the leaves,
  then one per height (a wide height in calls of W nodes), each gathering
  children from and writing parents into node buffers [R, H]. Training runs
  the same forward calls, then one backward call per forward call in reverse
  (its gates' derivative by ``jax.vjp``, recomputing nothing but reading the
  forward's pre-activations), then one call for the leaves' backward and the
  optimiser update. Each call's loss terms (its nodes' labels) are added in
  that call, so no call reads the whole buffer. Four programs train a cell's
  batches and three more infer (``info()['compiles']``). ``jax.value_and_grad``
  over the Python loop would also be correct, but JAX then linearises every
  jitted call and transposes it from Python: on SST that host work is ~10x
  the inference cost of a level (see the README, "Running on a GPU").
* ``compiled``: forward, loss, backward and optimiser update in one ``jit``:
  the leaves in chunks of ``LEAF_CHUNKS_PER_WIDTH * W``, then a static
  schedule of node groups [S, W] (``TreeBatch.packed_groups``: a node never
  shares a group with its descendants, so narrow high levels do not each pay
  for the widest one), both under ``lax.scan`` with a ``lax.cond`` that skips
  the chunks and steps past the batch's real ones. The backward pass is
  written out (``jax.custom_vjp``): differentiated automatically, each
  skipped step would store the node weights as a per-step residual.

Static shapes (``levels`` and ``compiled``) come from ``bench.batches``: the
example count padded to the cell's batch size (``padded_rows``), node rows
``node_rows`` (the last row is the zero row that padding reads; padding
writes go out of bounds and are dropped), width ``node_width`` (x4 on a GPU,
where padded slots are nearly free and every step costs kernel launches),
step counts ``count_bucket``. An SST cell runs one shape per phase for its
batches of up to 25 and one for batch-1 latency.
"""

from __future__ import annotations

from typing import List

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bench.batches import TreeBatch, count_bucket, node_rows, node_width, padded_array
from bench.interface import counted
from bench.targets import class_points

from .common import JaxImplementation, classify, softmax_xent

# leaves go in chunks of this many node widths (an SST batch of 25: chunks of 128, ~4 real)
LEAF_CHUNKS_PER_WIDTH = 4
# node widths on a GPU: padded slots cost little there, steps (kernel launches) a lot
GPU_WIDTH_FACTOR = 4
# recursive: node states are stacked for the loss in jitted pieces of this many (``_stack``)
STACK_CHUNK = 64


# --- the node functions ---

def leaf_gates(model, z):
    """Leaf states from pre-activations z [..., G_leaf] (H or 3H: blocks [i, o, u])."""
    if model == "rvnn":
        return (jnp.tanh(z),)
    i, o, u = jnp.split(z, 3, axis=-1)
    c = jax.nn.sigmoid(i) * jnp.tanh(u)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def node_gates(model, z, c_l=None, c_r=None):
    """Parent states from pre-activations z [..., G] (H or 5H: [i, f_l, f_r, o, u]) and the
    children's cells (Tree-LSTM)."""
    if model == "rvnn":
        return (jnp.tanh(z),)
    i, fl, fr, o, u = jnp.split(z, 5, axis=-1)
    c = jax.nn.sigmoid(i) * jnp.tanh(u) + jax.nn.sigmoid(fl) * c_l + jax.nn.sigmoid(fr) * c_r
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def leaf_state(model, W_leaf, b_leaf, x):
    """Leaf states from embeddings x [..., D]."""
    return leaf_gates(model, x @ W_leaf + b_leaf)


def node_state(model, W, b, left, right):
    """Parent states from child states ``left``/``right`` (tuples of [..., H])."""
    z = jnp.concatenate([left[0], right[0]], axis=-1) @ W + b
    return node_gates(model, z, *_cells(left, right))


def _cells(left, right):
    return (left[1], right[1]) if len(left) > 1 else ()


def write_targets(nodes: np.ndarray, width: int, rows: int) -> np.ndarray:
    """int32[width]: ``nodes`` (ascending), then distinct indices past the buffer's ``rows``.

    Padding writes go out of bounds and are dropped (see ``put_rows``), so every
    index of a write is distinct and the write can promise JAX unique, sorted indices.
    """
    out = rows + np.arange(width, dtype=np.int32)
    out[:len(nodes)] = nodes
    return out


def put_rows(buf, rows, values):
    """buf with ``values[k]`` written to row ``rows[k]``; out-of-bounds rows (padding) are dropped."""
    return buf.at[rows].set(values, mode="drop", unique_indices=True, indices_are_sorted=True)


def read_rows(buf, rows):
    """buf[rows], zeros for out-of-bounds rows (padding)."""
    return buf.at[rows].get(mode="fill", fill_value=0)


# --- one batched step, forward and backward: compiled's loop bodies, levels' calls ---

def group_forward(model, W, b, bufs, node, left, right):
    """Write the states of nodes ``node`` [W] (children ``left``/``right``) into ``bufs``;
    returns the buffers and the pre-activations z [W, G] the backward step reads."""
    kids_l = tuple(buf[left] for buf in bufs)
    kids_r = tuple(buf[right] for buf in bufs)
    z = jnp.concatenate([kids_l[0], kids_r[0]], axis=-1) @ W + b
    new = node_gates(model, z, *_cells(kids_l, kids_r))
    return tuple(put_rows(buf, node, s) for buf, s in zip(bufs, new)), z


def group_backward(model, W, bufs, ct_node, left, right, z):
    """From the cotangents ``ct_node`` of a group's states (a tuple of [W, H]): the gradients
    of W and b, and the cotangents of the left and right children's states (tuples of [W, H]).
    ``bufs`` are the forward's final buffers (a row is written once, so they hold every
    child); z the forward's pre-activations."""
    kids_l = tuple(buf[left] for buf in bufs)
    kids_r = tuple(buf[right] for buf in bufs)
    cells = _cells(kids_l, kids_r)
    _, vjp = jax.vjp(lambda z, *c: node_gates(model, z, *c), z, *cells)
    dz, *dcells = vjp(tuple(ct_node))
    hlr = jnp.concatenate([kids_l[0], kids_r[0]], axis=-1)                 # [W, 2H]
    dh_l, dh_r = jnp.split(dz @ W.T, 2, axis=-1)
    ct_l = (dh_l,) + tuple(dcells[:1])
    ct_r = (dh_r,) + tuple(dcells[1:])
    return hlr.T @ dz, jnp.sum(dz, axis=0), ct_l, ct_r


def leaf_backward(model, W_leaf, x, z, ct):
    """Gradients of W_leaf and b_leaf, and the cotangent of the embeddings x [Wl, D], from the
    cotangents ``ct`` of the leaves' states and their pre-activations z."""
    _, vjp = jax.vjp(lambda z: leaf_gates(model, z), z)
    (dz,) = vjp(tuple(ct))
    return x.T @ dz, jnp.sum(dz, axis=0), dz @ W_leaf.T


def local_loss(W_o, b_o, h, labels, scale):
    """Sum of the cross-entropy terms of rows with a label (>= 0), times ``scale`` (one over
    the batch's labelled points, so that the terms of every call add up to the mean)."""
    keep = labels >= 0
    logp = jax.nn.log_softmax(classify(W_o, b_o, h), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[:, None], axis=-1)[:, 0]
    return -jnp.sum(jnp.where(keep, picked, 0.0)) * scale


def _keep(carry, *_):
    """The branch that skips a padded chunk or step."""
    return carry


def _weights(model, p):
    if model == "rvnn":
        return (p["W_leaf"], p["b_leaf"]), (p["W"], p["b"])
    return (p["W_leaf"], p["b_leaf"]), (p["U"], p["b_U"])


def _node_names(model):
    return ("W", "b") if model == "rvnn" else ("U", "b_U")


def tree_buffers(model, hidden):
    """The compiled strategy's node buffer ``h`` [R, H] as a function with a written-out
    backward pass: ``f((W_leaf, b_leaf, W, b), x [K, Wl, D], idx) -> h``.

    ``idx``: ``leaf_node`` [K, Wl] (write rows, out of bounds for padding),
    ``leaf_chunks`` (real chunks), ``node`` / ``left`` / ``right`` [S, W],
    ``steps`` (real steps); R = 2 K Wl.
    """
    states = 1 if model == "rvnn" else 2

    def run(weights, x, idx, save):
        W_leaf, b_leaf, W, b = weights
        K, Wl, _ = x.shape
        bufs = tuple(jnp.zeros((2 * K * Wl, hidden), jnp.float32) for _ in range(states))

        def leaf_chunk(bufs, inputs):
            k, x_k, where_k = inputs

            def live(bufs):
                z = x_k @ W_leaf + b_leaf
                return tuple(put_rows(buf, where_k, s)
                             for buf, s in zip(bufs, leaf_gates(model, z))), z

            bufs, z = lax.cond(k < idx["leaf_chunks"], live,
                               lambda bufs: (bufs, jnp.zeros((Wl, b_leaf.shape[0]))), bufs)
            return bufs, (z if save else None)

        def step(bufs, inputs):
            k, node, left, right = inputs
            width = node.shape[0]
            bufs, z = lax.cond(k < idx["steps"],
                               lambda bufs: group_forward(model, W, b, bufs, node, left, right),
                               lambda bufs: (bufs, jnp.zeros((width, b.shape[0]))), bufs)
            return bufs, (z if save else None)

        bufs, z_leaf = lax.scan(leaf_chunk, bufs, (jnp.arange(K), x, idx["leaf_node"]))
        S = idx["node"].shape[0]
        bufs, z_node = lax.scan(step, bufs, (jnp.arange(S), idx["node"], idx["left"], idx["right"]))
        return bufs, z_leaf, z_node

    @jax.custom_vjp
    def buffers(weights, x, idx):
        return run(weights, x, idx, save=False)[0][0]

    def forward(weights, x, idx):
        bufs, z_leaf, z_node = run(weights, x, idx, save=True)
        return bufs[0], (weights, x, idx, bufs, z_leaf, z_node)

    def backward(res, ct_h):
        weights, x, idx, bufs, z_leaf, z_node = res
        W_leaf, b_leaf, W, b = weights
        cts = (ct_h,) + tuple(jnp.zeros_like(ct_h) for _ in range(states - 1))

        def step(carry, inputs):
            k, node, left, right, z = inputs

            def live(carry):
                cts, dW, db = carry
                ct_node = tuple(read_rows(ct, node) for ct in cts)
                gW, gb, ct_l, ct_r = group_backward(model, W, bufs, ct_node, left, right, z)
                # a child's cotangent already holds its own loss term: add the parent's
                cts = tuple(ct.at[left].add(a).at[right].add(c)
                            for ct, a, c in zip(cts, ct_l, ct_r))
                return cts, dW + gW, db + gb

            return lax.cond(k < idx["steps"], live, _keep, carry), None

        S = idx["node"].shape[0]
        (cts, dW, db), _ = lax.scan(step, (cts, jnp.zeros_like(W), jnp.zeros_like(b)),
                                    (jnp.arange(S), idx["node"], idx["left"], idx["right"],
                                     z_node), reverse=True)

        def leaf_chunk(carry, inputs):
            k, x_k, where_k, z = inputs

            def live(carry):
                gW, gb, dx = leaf_backward(model, W_leaf, x_k, z,
                                           tuple(read_rows(ct, where_k) for ct in cts))
                return (carry[0] + gW, carry[1] + gb), dx

            return lax.cond(k < idx["leaf_chunks"], live,
                            lambda carry: (carry, jnp.zeros_like(x_k)), carry)

        K = x.shape[0]
        (dW_leaf, db_leaf), dx = lax.scan(leaf_chunk, (jnp.zeros_like(W_leaf),
                                                       jnp.zeros_like(b_leaf)),
                                          (jnp.arange(K), x, idx["leaf_node"], z_leaf))
        return (dW_leaf, db_leaf, dW, db), dx, None

    buffers.defvjp(forward, backward)
    return buffers


class RvNN(JaxImplementation):
    family = "rvnn"
    jit_strategies = ("compiled",)

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        model = cfg.model
        self._scratch = {}   # levels: node and cotangent buffers by shape, reused across calls
        self._acc = None     # levels: gradient accumulators, zero between steps
        if strategy == "recursive":
            def embed(E, tokens):
                return E[tokens]

            def leaf(W_leaf, b_leaf, x, i):
                return leaf_state(model, W_leaf, b_leaf, x[i])

            def node(W, b, left, right):
                return node_state(model, W, b, left, right)

            self._embed = jax.jit(counted(self.traces, "embed", embed))
            self._leaf = jax.jit(counted(self.traces, "leaf", leaf))
            self._node = jax.jit(counted(self.traces, "node", node))

            def readout(W_o, b_o, h, points):
                return classify(W_o, b_o, h[points])

            def loss_head(W_o, b_o, h, points, labels):
                return softmax_xent(classify(W_o, b_o, h[points]), labels)

            def stack_chunk(*states):
                return jnp.stack(states)

            self._stack_chunk = jax.jit(counted(self.traces, "stack_chunk", stack_chunk))
            self._readout = jax.jit(counted(self.traces, "readout", readout))
            self._loss_head = jax.jit(counted(self.traces, "loss_head", loss_head))
        elif strategy == "levels":
            self._build_levels()
        else:
            self._tree_buffers = tree_buffers(model, cfg.hidden)

    def _width(self, rows):
        return node_width(rows) * (GPU_WIDTH_FACTOR if self.device == "gpu" else 1)

    # --- preparation (untimed) ---
    def prepare(self, batch: TreeBatch):
        if not isinstance(batch, TreeBatch):
            raise TypeError("the RvNN family takes a TreeBatch, not %s" % type(batch).__name__)
        if self.strategy == "recursive":
            return self._prepare_recursive(batch)
        if self.strategy == "levels":
            return self._prepare_levels(batch)
        return self._prepare_compiled(batch)

    def _prepare_recursive(self, batch):
        # The batch's leaf embeddings, the stack of root (or, in 'all' mode, node) states
        # and the labels are padded to the batch's class: the leaf call reads a row of
        # x [R/2, D] and eager JAX compiles every op once per shape.
        B = batch.size
        rows = self.rows(B)
        R = node_rows(batch.num_nodes, rows)
        n_leaves = int(batch.level_offsets[1])
        points = class_points(batch, self.cfg.loss_mode)
        stack = R if points.every_row else rows
        return {"leaf_tokens": self._put(padded_array(batch.token[:n_leaves], R // 2, 0)),
                "left": batch.left.tolist(), "right": batch.right.tolist(),
                "roots": batch.root.tolist(), "rows": stack, "size": B,
                "classified": points.index.tolist(),
                "root_rows": self._put(np.arange(rows)),
                "points": self._put(np.arange(stack)),
                "labels": self._put(padded_array(points.labels, stack, -1))}

    def _shapes(self, batch):
        """(padded examples, node rows R, node width W, leaf chunk width) of the batch's class."""
        rows = self.rows(batch.size)
        W = self._width(rows)
        return rows, node_rows(batch.num_nodes, rows), W, LEAF_CHUNKS_PER_WIDTH * W

    def _leaf_arrays(self, batch, R, Wl):
        """Leaf tokens and write rows [K, Wl], padded to R / 2 leaves (the most R rows can
        hold), and the number of chunks that hold real leaves."""
        n_leaves = int(batch.level_offsets[1])
        token = padded_array(batch.token[:n_leaves], R // 2, 0)
        where = write_targets(np.arange(n_leaves), R // 2, R)
        return token.reshape(-1, Wl), where.reshape(-1, Wl), np.int32(-(-n_leaves // Wl))

    def _prepare_compiled(self, batch):
        """The packed group schedule on the shapes of the batch's class; how many leaf chunks
        and steps are real travels as two scalars, and the rest is skipped."""
        B = batch.size
        rows, R, W, Wl = self._shapes(batch)
        zero = R - 1
        groups = batch.packed_groups(W)
        S = count_bucket(len(groups))
        node = np.tile(write_targets(np.zeros(0, np.int32), W, R), (S, 1))
        left = np.full((S, W), zero, np.int32)
        right = np.full((S, W), zero, np.int32)
        for k, grp in enumerate(groups):
            node[k] = write_targets(grp, W, R)
            left[k, :grp.size], right[k, :grp.size] = batch.left[grp], batch.right[grp]
        leaf_token, leaf_node, leaf_chunks = self._leaf_arrays(batch, R, Wl)
        roots = padded_array(batch.root, rows, zero)
        classified = class_points(batch, self.cfg.loss_mode)
        points = np.arange(R, dtype=np.int32) if classified.every_row else roots
        labels = padded_array(classified.labels, points.size, -1)
        arrays = {"leaf_token": leaf_token, "leaf_node": leaf_node, "leaf_chunks": leaf_chunks,
                  "steps": np.int32(len(groups)), "node": node, "left": left, "right": right,
                  "roots": roots, "points": points, "labels": labels}
        out = {k: self._put(v) for k, v in arrays.items()}
        out["size"] = B
        return out

    def _prepare_levels(self, batch):
        """Leaves (one call), then each height in calls of W nodes, with each node's label and
        whether its cotangent comes from a parent (roots have none)."""
        B = batch.size
        rows, R, W, Wl = self._shapes(batch)
        zero = R - 1
        points = class_points(batch, self.cfg.loss_mode)
        labels, scale = points.on_rows(batch.num_nodes), np.float32(1.0 / points.count)
        from_parent = np.ones(batch.num_nodes, bool)
        from_parent[batch.root] = False
        o = batch.level_offsets
        calls = []
        for h in range(1, batch.num_levels):
            for start in range(int(o[h]), int(o[h + 1]), W):
                idx = np.arange(start, min(start + W, int(o[h + 1])), dtype=np.int32)
                left = padded_array(batch.left[idx], W, zero)
                right = padded_array(batch.right[idx], W, zero)
                lab = padded_array(labels[idx], W, -1)
                par = padded_array(from_parent[idx], W, False, bool)
                calls.append(tuple(self._put(a) for a in (write_targets(idx, W, R), left, right))
                             + (self._put(lab), self._put(par, bool)))
        n_leaves = int(o[1])
        leaf_token, leaf_node, leaf_chunks = self._leaf_arrays(batch, R, Wl)
        leaf_labels = padded_array(labels[:n_leaves], R // 2, -1)
        leaf_parent = padded_array(from_parent[:n_leaves], R // 2, False, bool)
        leaf_labels, leaf_parent = leaf_labels.reshape(-1, Wl), leaf_parent.reshape(-1, Wl)
        roots = padded_array(batch.root, rows, zero)
        return {"size": B, "rows": R, "calls": calls, "scale": self._put(scale, np.float32),
                "leaves": tuple(self._put(a) for a in (leaf_token, leaf_node, leaf_chunks,
                                                       leaf_labels))
                + (self._put(leaf_parent, bool),),
                "roots": self._put(roots)}

    # --- levels: the programs ---
    def _build_levels(self):
        model = self.cfg.model
        states = 1 if model == "rvnn" else 2
        opt = self.opt

        def leaves_forward(W_leaf, b_leaf, E, bufs, token, where, chunks):
            """Leaf states into bufs, chunk by chunk (token / where [K, Wl]; chunks past
            ``chunks`` skipped); returns the buffers and the pre-activations [K, Wl, G_leaf]."""
            Wl = token.shape[1]
            x = E[token]                                                     # [K, Wl, D]

            def chunk(bufs, inputs):
                k, x_k, where_k = inputs

                def live(bufs):
                    z = x_k @ W_leaf + b_leaf
                    return tuple(put_rows(buf, where_k, s)
                                 for buf, s in zip(bufs, leaf_gates(model, z))), z

                return lax.cond(k < chunks, live,
                                lambda bufs: (bufs, jnp.zeros((Wl, b_leaf.shape[0]))), bufs)

            return lax.scan(chunk, bufs, (jnp.arange(x.shape[0]), x, where))

        def level_forward(W, b, bufs, node, left, right):
            return group_forward(model, W, b, bufs, node, left, right)

        def readout(W_o, b_o, h, roots):
            return classify(W_o, b_o, h[roots])

        def level_backward(W, W_o, b_o, bufs, cts, acc, node, left, right, z, labels,
                           from_parent, scale):
            """One forward call's backward: its nodes' cotangents (from their parents, set
            there, plus their own loss terms), the gradients it adds, and its children's
            cotangents (each child has one parent, so a write sets them)."""
            ct_node = [jnp.where(from_parent[:, None], read_rows(ct, node), 0.0) for ct in cts]
            loss, (gW_o, gb_o, dh) = jax.value_and_grad(local_loss, argnums=(0, 1, 2))(
                W_o, b_o, read_rows(bufs[0], node), labels, scale)
            ct_node[0] = ct_node[0] + dh
            gW, gb, ct_l, ct_r = group_backward(model, W, bufs, ct_node, left, right, z)
            cts = tuple(ct.at[left].set(a).at[right].set(c) for ct, a, c in zip(cts, ct_l, ct_r))
            acc = {"W": acc["W"] + gW, "b": acc["b"] + gb, "W_o": acc["W_o"] + gW_o,
                   "b_o": acc["b_o"] + gb_o, "loss": acc["loss"] + loss}
            return cts, acc

        names = _node_names(model)

        def leaves_backward_update(params, opt_state, acc, bufs, cts, token, where, chunks,
                                   labels, from_parent, z_leaf, scale):
            """The leaves' backward (chunk by chunk, with their loss terms), the gradients of
            the whole step, and the optimiser update; returns the loss, the gradients, the
            updated parameters and optimiser state, zeroed accumulators and the cotangent
            buffers (donated in, handed back for the next step)."""
            W_leaf, E, W_o, b_o = params["W_leaf"], params["E"], params["W_o"], params["b_o"]
            x = E[token]                                                     # [K, Wl, D]

            def chunk(carry, inputs):
                k, x_k, where_k, labels_k, parent_k, z_k = inputs

                def live(carry):
                    ct = [jnp.where(parent_k[:, None], read_rows(c, where_k), 0.0) for c in cts]
                    h = leaf_gates(model, z_k)[0]
                    loss, (gW_o, gb_o, dh) = jax.value_and_grad(local_loss, argnums=(0, 1, 2))(
                        W_o, b_o, h, labels_k, scale)
                    ct[0] = ct[0] + dh
                    gW, gb, dx = leaf_backward(model, W_leaf, x_k, z_k, ct)
                    return tuple(a + g for a, g in zip(carry, (gW, gb, gW_o, gb_o, loss))), dx

                return lax.cond(k < chunks, live, lambda c: (c, jnp.zeros_like(x_k)), carry)

            start = (jnp.zeros_like(W_leaf), jnp.zeros_like(params["b_leaf"]), acc["W_o"],
                     acc["b_o"], acc["loss"])
            (gW_leaf, gb_leaf, gW_o, gb_o, loss), dx = lax.scan(
                chunk, start, (jnp.arange(x.shape[0]), x, where, labels, from_parent, z_leaf))
            grads = {"E": jnp.zeros_like(E).at[token].add(dx),
                     "W_leaf": gW_leaf, "b_leaf": gb_leaf, names[0]: acc["W"],
                     names[1]: acc["b"], "W_o": gW_o, "b_o": gb_o}
            updates, opt_state = opt.update(grads, opt_state, params)
            zero = {k: jnp.zeros_like(v) for k, v in acc.items()}
            return loss, grads, optax.apply_updates(params, updates), opt_state, zero, cts

        jit = lambda name, f, **kw: jax.jit(counted(self.traces, name, f), **kw)  # noqa: E731
        self._l_leaves = jit("leaves_forward", leaves_forward, donate_argnums=(3,))
        self._l_level = jit("level_forward", level_forward, donate_argnums=(2,))
        self._l_readout = jit("readout", readout)
        self._l_level_back = jit("level_backward", level_backward, donate_argnums=(4, 5))
        self._l_leaves_back = jit("leaves_backward_update", leaves_backward_update,
                                  donate_argnums=(2, 4))
        self._states = states

    def _buffers(self, kind, R):
        """A node (``kind`` "h") or cotangent ("ct") buffer set of R rows. Calls donate and return
        them, so one set per shape lives on; a fresh one starts at zero, and only rows a step
        writes are ever read again (the zero row, R - 1, is never written)."""
        bufs = self._scratch.pop((kind, R), None)
        if bufs is None:
            zeros = np.zeros((R, self.cfg.hidden), np.float32)
            bufs = tuple(self._put(zeros, np.float32) for _ in range(self._states))
        return bufs

    def _zero_acc(self):
        W, b = _node_names(self.cfg.model)
        shapes = {"W": self.params[W].shape, "b": self.params[b].shape,
                  "W_o": self.params["W_o"].shape, "b_o": self.params["b_o"].shape, "loss": ()}
        return {k: self._put(np.zeros(v, np.float32), np.float32) for k, v in shapes.items()}

    def _levels_forward(self, prep):
        p = self.params
        (W_leaf, b_leaf), (W, b) = _weights(self.cfg.model, p)
        token, where, chunks = prep["leaves"][:3]
        bufs, z_leaf = self._l_leaves(W_leaf, b_leaf, p["E"], self._buffers("h", prep["rows"]),
                                      token, where, chunks)
        zs = []
        for node, left, right, _, _ in prep["calls"]:
            bufs, z = self._l_level(W, b, bufs, node, left, right)
            zs.append(z)
        return bufs, z_leaf, zs

    def _levels_logits(self, prep):
        bufs, _, _ = self._levels_forward(prep)
        out = self._l_readout(self.params["W_o"], self.params["b_o"], bufs[0], prep["roots"])
        self._scratch[("h", prep["rows"])] = bufs
        return out

    def _levels_step(self, prep):
        """Forward, backward and update; returns (loss, gradients, parameters, optimiser state)."""
        p = self.params
        W = p[_node_names(self.cfg.model)[0]]
        bufs, z_leaf, zs = self._levels_forward(prep)
        cts = self._buffers("ct", prep["rows"])
        acc = self._acc if self._acc is not None else self._zero_acc()
        self._acc = None    # donated below; restored only when the step completes
        for (node, left, right, labels, parent), z in zip(reversed(prep["calls"]), reversed(zs)):
            cts, acc = self._l_level_back(W, p["W_o"], p["b_o"], bufs, cts, acc, node, left,
                                          right, z, labels, parent, prep["scale"])
        token, where, chunks, labels, parent = prep["leaves"]
        loss, grads, params, opt_state, self._acc, cts = self._l_leaves_back(
            p, self.opt_state, acc, bufs, cts, token, where, chunks, labels, parent, z_leaf,
            prep["scale"])
        self._scratch[("h", prep["rows"])] = bufs
        self._scratch[("ct", prep["rows"])] = cts
        return loss, grads, params, opt_state

    # --- levels: the interface, without jax.value_and_grad ---
    def logits(self, prepared):
        if self.strategy != "levels":
            return super().logits(prepared)
        with jax.default_device(self.dev), self._phase("infer"):
            out = self._levels_logits(prepared)
        self._last = out
        return self._real_rows(out, prepared)

    def train_step(self, prepared):
        if self.strategy != "levels" or self._probe is not None:
            return super().train_step(prepared)
        with jax.default_device(self.dev), self._phase("train"):
            loss, _, self.params, self.opt_state = self._levels_step(prepared)
        self._last = loss
        return loss

    def loss_and_grads(self, prepared):
        if self.strategy != "levels":
            return super().loss_and_grads(prepared)
        with jax.default_device(self.dev), self._phase("train"):
            loss, grads, _, _ = self._levels_step(prepared)
            loss = float(loss)
        return loss, {k: np.array(g, dtype=np.float32) for k, g in grads.items()}

    def load_params(self, params):
        super().load_params(params)
        self._acc = None

    # --- hidden states: a list of node states (recursive) or a buffer [R, H] (compiled) ---
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

    def _buffer_compiled(self, p, prep):
        (W_leaf, b_leaf), (W, b) = _weights(self.cfg.model, p)
        idx = {k: prep[k] for k in ("leaf_node", "leaf_chunks", "node", "left", "right", "steps")}
        return self._tree_buffers((W_leaf, b_leaf, W, b), p["E"][prep["leaf_token"]], idx)

    def _stack(self, states, rows):
        """States [H] stacked to [rows, H], zero rows after them (a shape per class).

        Up to STACK_CHUNK rows (the roots of a batch) this is one ``jnp.stack``. Beyond
        (every node, in the ``all`` loss mode) it is jitted stacks of STACK_CHUNK states
        joined by one concatenate: XLA's compile time for a stack, and for the unstack
        its gradient needs, grows much faster than its operand count (a gate batch of
        ~1000 nodes took minutes to compile), while these pieces compile once per chunk
        count.
        """
        padded = states + [jnp.zeros_like(states[0])] * (rows - len(states))
        if rows <= STACK_CHUNK:
            return jnp.stack(padded)
        padded += [padded[-1]] * (-rows % STACK_CHUNK)   # rows past `rows` are cut off below
        chunks = [self._stack_chunk(*padded[i:i + STACK_CHUNK])
                  for i in range(0, len(padded), STACK_CHUNK)]
        return jnp.concatenate(chunks)[:rows]

    # --- hooks for the base class (recursive and compiled) ---
    def _logits(self, p, prep):
        if self.strategy == "recursive":
            states = self._states_recursive(p, prep)
            h = self._stack([states[r][0] for r in prep["roots"]], prep["root_rows"].shape[0])
            return self._readout(p["W_o"], p["b_o"], h, prep["root_rows"])
        return classify(p["W_o"], p["b_o"], self._buffer_compiled(p, prep)[prep["roots"]])

    def _loss(self, p, prep):
        if self.strategy == "recursive":
            states = self._states_recursive(p, prep)
            h = self._stack([states[n][0] for n in prep["classified"]], prep["rows"])
            return self._loss_head(p["W_o"], p["b_o"], h, prep["points"], prep["labels"])
        h = self._buffer_compiled(p, prep)[prep["points"]]
        return softmax_xent(classify(p["W_o"], p["b_o"], h), prep["labels"])

    def info(self):
        out = super().info()
        out["buckets"] = {
            "recursive": "bench.batches classes: examples to the batch size, leaves to half the "
                         "node rows",
            "levels": "bench.batches classes: examples to the batch size, node rows, width "
                      "node_width%s; leaves in chunks of %d widths"
                      % (" x%d (GPU)" % GPU_WIDTH_FACTOR if self.device == "gpu" else "",
                         LEAF_CHUNKS_PER_WIDTH),
            "compiled": "bench.batches classes: examples to the batch size, node rows, width "
                        "node_width%s, steps count_bucket; leaves in chunks of %d widths; "
                        "padded chunks and steps skipped"
                        % (" x%d (GPU)" % GPU_WIDTH_FACTOR if self.device == "gpu" else "",
                           LEAF_CHUNKS_PER_WIDTH),
        }[self.strategy]
        return out
