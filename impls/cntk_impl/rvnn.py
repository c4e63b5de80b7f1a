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

The work runs in the worker process (``worker.py``); this class only sends
requests (``common.CNTKImplementation``).
"""

from __future__ import annotations

import numpy as np

from bench.batches import TreeBatch

from .common import CNTKImplementation


class RvNN(CNTKImplementation):
    family = "rvnn"

    def _batch_arrays(self, batch):
        if not isinstance(batch, TreeBatch):
            raise TypeError("the RvNN family needs a TreeBatch, got %s" % type(batch).__name__)
        return {name: np.asarray(getattr(batch, name), np.int32)
                for name in ("token", "left", "right", "label", "root", "level_offsets")}
