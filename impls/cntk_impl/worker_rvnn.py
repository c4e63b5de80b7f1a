"""RvNN and Tree-LSTM in the CNTK worker: the graphs of ``recursive``, ``levels`` and
``compiled`` (see ``rvnn.py``).

The worker's counterpart of ``rvnn.py``, which prepares the feeds from the
``TreeBatch`` (the level arrays, the bucketed layout of ``compiled``); here they
become graphs: one per tree structure (``recursive``), per level-width
signature (``levels``) or per bucket (``compiled``), read off the feeds' shapes.
"""

import hashlib

import numpy as np

from worker_common import C, Model, Ready, cut, xent


def _static(x):
    """Drop the batch axis (one sample, so the sum is the identity): CNTK's gather wants a
    reference without dynamic axes."""
    return None if x is None else C.reduce_sum(x, axis=C.Axis.default_batch_axis())


def treelstm_leaf(z, H):
    """z [.., 3H] blocks [i, o, u]."""
    s = C.sigmoid(cut(z, 0, 2 * H))
    c = cut(s, 0, H) * C.tanh(cut(z, 2 * H, 3 * H))
    return cut(s, H, 2 * H) * C.tanh(c), c


def treelstm_node(z, c_l, c_r, H):
    """z [.., 5H] blocks [i, f_l, f_r, o, u]."""
    s = C.sigmoid(cut(z, 0, 4 * H))
    c = cut(s, 0, H) * C.tanh(cut(z, 4 * H, 5 * H)) + cut(s, H, 2 * H) * c_l + cut(s, 2 * H, 3 * H) * c_r
    return cut(s, 3 * H, 4 * H) * C.tanh(c), c


class RvNNModel(Model):
    STRUCTURE = ("left", "right", "root")   # what ``recursive`` is wired from (no feeds)

    # --- graphs ---
    def _ready(self, feeds):
        n_leaves = feeds["leaf_tok"].shape[1]
        if self.strategy == "recursive":
            structure = [feeds.pop(name) for name in self.STRUCTURE]
            digest = hashlib.sha1()
            for arr in structure:
                digest.update(np.ascontiguousarray(arr, np.int64).tobytes())
                digest.update(b"|")
            ready = Ready(("recursive", n_leaves, digest.hexdigest()), feeds)
            ready.left, ready.right, ready.roots = (arr.tolist() for arr in structure)
            return ready
        levels = sum(1 for name in feeds if name.startswith("lr"))
        widths = tuple(feeds["lr%d" % k].shape[1] // 2 for k in range(levels))
        return Ready((self.strategy, n_leaves, widths, feeds["roots"].shape[1], feeds["y"].shape[1]),
                     feeds)

    def _build(self, key, ready):
        if self.strategy == "recursive":
            return self._build_recursive(ready)
        return self._build_levels(key)

    def _tree_io(self, P):
        return {"y": C.input_variable((P, self.C), name="y"),
                "w": C.input_variable((P, 1), name="w")}

    def _leaf(self, x):
        p = self.params
        z = C.times(x, p["W_leaf"]) + p["b_leaf"]
        if self.model == "rvnn":
            return C.tanh(z), None
        return treelstm_leaf(z, self.H)

    def _node(self, hl, hr, cl, cr):
        if self.model == "rvnn":
            return C.tanh(C.times(C.splice(hl, hr, axis=-1), self.params["W"]) + self.params["b"]), None
        z = C.times(C.splice(hl, hr, axis=-1), self.params["U"]) + self.params["b_U"]
        return treelstm_node(z, cl, cr, self.H)

    def _levels_up(self, inputs, hbuf, cbuf, widths):
        """One gather + cell per level (``widths[k]`` nodes at level k), appended to the
        node buffers; adds the index input ``lr<k>`` of each level to ``inputs``."""
        H = self.H
        for k, n in enumerate(widths):
            idx = inputs["lr%d" % k] = C.input_variable(2 * n, name="lr%d" % k)
            hlr = C.reshape(C.gather(hbuf, idx), (n, 2 * H))
            cl = cr = None
            if cbuf is not None:
                clr = C.reshape(C.gather(cbuf, idx), (n, 2 * H))
                cl, cr = cut(clr, 0, H), cut(clr, H, 2 * H)
            h, c = self._node(cut(hlr, 0, H), cut(hlr, H, 2 * H), cl, cr)
            hbuf = C.splice(hbuf, _static(h), axis=0)
            if cbuf is not None:
                cbuf = C.splice(cbuf, _static(c), axis=0)
        return hbuf, cbuf

    def _build_levels(self, key):
        """Dynamic batching: all leaves in one product, then one gather + product per height.

        ``compiled`` runs it on a bucketed static layout, so that one graph serves every
        batch of the same bucket: node buffer rows 0 = a zero row (padding reads it), 1..Lf'
        the leaves, then W' rows per level for L' levels (Lf', W', L' next powers of two; the
        rows of padding entries hold values nothing reads). In ``all`` mode its loss is
        taken over every row (weight 0 off the labelled nodes), so its shape is fixed too."""
        _, n_leaves, widths, B, P = key
        inputs = self._tree_io(P)
        inputs["leaf_tok"] = C.input_variable(n_leaves, name="leaf_tok")
        inputs["roots"] = C.input_variable(B, name="roots")
        # CNTK's gather wants a reference without dynamic axes (and its backprop fails when
        # its output has none), so the node buffers drop the batch axis (one sample: the
        # reduction is the identity) and the gathered rows have it again, from the indices.
        hbuf, cbuf = map(_static, self._leaf(C.gather(self.params["E"], inputs["leaf_tok"])))
        if self.strategy == "compiled":
            zero = C.constant(np.zeros((1, self.H), np.float32))
            hbuf = C.splice(zero, hbuf, axis=0)
            cbuf = None if cbuf is None else C.splice(zero, cbuf, axis=0)
        hbuf, cbuf = self._levels_up(inputs, hbuf, cbuf, widths)
        logits = self._head(C.gather(hbuf, inputs["roots"]))
        points = logits if self.loss_mode == "root" else self._head(hbuf)
        return self._finish(inputs, logits, xent(points, inputs["y"], inputs["w"]))

    def _build_recursive(self, ready):
        """One cell per node, wired as the tree is: no batching across nodes. Leaf
        embeddings come from one gather (a gather per leaf would make a dense [V, D]
        gradient per leaf), each leaf row is sliced out and goes through its own cell."""
        left, right, roots = ready.left, ready.right, ready.roots
        n_leaves, N = ready.key[1], len(left)
        P = len(roots) if self.loss_mode == "root" else N
        inputs = self._tree_io(P)
        inputs["leaf_tok"] = C.input_variable(n_leaves, name="leaf_tok")
        x = C.gather(self.params["E"], inputs["leaf_tok"])                   # [Lf, D]
        hs, cs = [None] * N, [None] * N
        for n in range(N):      # children come before parents in a TreeBatch
            if left[n] < 0:
                hs[n], cs[n] = self._leaf(C.slice(x, 0, n, n + 1))
            else:
                l, r = left[n], right[n]
                hs[n], cs[n] = self._node(hs[l], hs[r], cs[l], cs[r])
        stack = lambda rows: rows[0] if len(rows) == 1 else C.splice(*rows, axis=0)
        logits = self._head(stack([hs[r] for r in roots]))
        points = logits if self.loss_mode == "root" else self._head(stack(hs))
        return self._finish(inputs, logits, xent(points, inputs["y"], inputs["w"]))

    def _detail(self):
        return {
            "levels": "one static graph per level-width signature: one gather + product + "
                      "splice per tree height, the batch as one CNTK sample",
            "recursive": "one static graph per tree structure, one cell per node (no batching "
                         "across nodes), the batch as one CNTK sample",
            "compiled": "the levels schedule on a bucketed static layout (leaves, level count "
                        "and level width padded to powers of two): one graph per bucket",
        }[self.strategy]
