"""RvNN and Tree-LSTM on CNTK 2.7 (in the worker): strategies ``recursive``, ``levels``, ``compiled``.

The whole batch is one CNTK sample with static shapes (its node buffer is an
ordinary tensor), and graphs are built on first use and cached:

* ``recursive``: one graph per tree structure with one cell per node, wired
  as the trees are (children before parents), no batching across nodes; leaf
  embeddings come from one gather and are sliced out per leaf.
* ``levels``: one graph per level-width signature: all leaves in one product,
  then per height one gather of the children's rows (left/right interleaved,
  reshaped to [n, 2H]), one product, and a splice onto the node buffer.
* ``compiled``: the ``levels`` schedule on a bucketed static layout (leaf
  count, level count and level width padded to powers of two; a zero row that
  padding reads), so one graph serves every batch of a bucket. CNTK compiles
  every graph; what this adds over ``levels`` is static shapes, hence few graphs.

CNTK's ``gather`` wants a reference without dynamic axes, and its backprop
fails when the gathered output has none, so the node buffers of ``levels`` and
``compiled`` drop the batch axis (one sample: a ``reduce_sum`` over it is the
identity) and the gathered rows get it back from the index inputs.

The graphs are built and run in the worker process (``worker_rvnn.py``); this
class prepares each batch's feeds from the ``TreeBatch`` and sends requests
(``common.CNTKImplementation``). Feeds are float32 (CNTK gathers with float
indices) with a leading axis of 1 (the one sample): ``y`` [1, P, C] and ``w``
[1, P, 1] (``common.label_feeds``; P points: the roots, or every node / buffer
row for ``loss_mode="all"``), ``leaf_tok`` [1, Lf]; ``levels`` and ``compiled``
add ``roots`` [1, B] (rows of the node buffer) and per level k ``lr<k>``
[1, 2 n_k] (each node's left and right child rows, interleaved). ``recursive``
sends the structure (``left``, ``right``, ``root``, int32) that its graph is
wired from instead.
"""

from __future__ import annotations

import numpy as np

from bench.batches import TreeBatch
from bench.targets import class_points

from .common import CNTKImplementation, label_feeds


def _sample(a) -> np.ndarray:
    """One CNTK sample: ``a`` flattened, as float32 [1, n]."""
    return np.asarray(a, np.float32).reshape(1, -1)


class RvNN(CNTKImplementation):
    family = "rvnn"

    def _batch_arrays(self, batch):
        if not isinstance(batch, TreeBatch):
            raise TypeError("the RvNN family needs a TreeBatch, got %s" % type(batch).__name__)
        if self.strategy == "compiled":
            return self._bucketed_arrays(batch)
        arrays = self._label_arrays(class_points(batch, self.cfg.loss_mode).labels)
        arrays["leaf_tok"] = _sample(batch.token[:int(batch.level_offsets[1])])
        if self.strategy == "recursive":
            arrays.update(left=batch.left, right=batch.right, root=batch.root)
            return arrays
        for k, children in enumerate(batch.level_children()):
            arrays["lr%d" % k] = _sample(children)
        arrays["roots"] = _sample(batch.root)
        return arrays

    def _label_arrays(self, labels):
        y, w = label_feeds(labels, self.cfg.num_classes)
        return {"y": y[None], "w": w[None]}

    def _bucketed_arrays(self, batch):
        """The feeds of ``compiled``: ``TreeBatch.padded_bucketed`` laid out as the worker's
        node buffer, which grows by splicing one level after another: row 0 the zero row that
        padding reads, rows 1..Lf' the leaves, then W' rows per level for L' levels."""
        p = batch.padded_bucketed()
        n_leaves = p.leaf_node.shape[0]
        steps, width = p.level_node.shape
        row = np.zeros(p.num_nodes + 2, np.int64)     # a padded node's row: where it is written
        row[p.leaf_node] = 1 + np.arange(n_leaves)
        row[p.level_node] = 1 + n_leaves + np.arange(steps * width).reshape(steps, width)
        row[p.zero] = 0
        if self.cfg.loss_mode == "root":
            labels = p.root_label
        else:   # every buffer row is classified: labels by row, -1 off the real nodes
            labels = np.full(1 + n_leaves + steps * width, -1, np.int32)
            labels[row[:batch.num_nodes]] = batch.label
        arrays = self._label_arrays(labels)
        arrays["leaf_tok"] = _sample(p.leaf_token)
        arrays["roots"] = _sample(row[p.root])
        for k in range(steps):
            arrays["lr%d" % k] = _sample(np.stack([row[p.level_left[k]], row[p.level_right[k]]], 1))
        return arrays
