"""Elman RNN and LSTM on CNTK 2.7 (in the worker): strategies ``loop`` and ``fused``.

* ``loop``: the time loop unrolled in Python into one static CNTK graph per
  padded length T (built on first use, cached); the batch runs on CNTK's
  batch axis, padded steps keep h (and c) through ``element_select``.
* ``fused``: CNTK's own recurrence, ``layers.Recurrence(layers.LSTM)`` /
  ``layers.RNNStep(tanh)`` over the dynamic sequence axis (each example only
  as long as it is), ``sequence.last`` for the classified state. Canonical
  LSTM gate blocks [i, f, g, o] are loaded into CNTK's [i, g, f, o] layout.
* ``compiled``: not applicable (see ``NOT_APPLICABLE``).

The graphs are built and run in the worker process (``worker_rnn.py``); this
class prepares each batch's feeds and sends requests
(``common.CNTKImplementation``). Feeds (float32, batch on CNTK's batch axis):
``y`` [B, C] and ``w`` [B, 1] (``common.label_feeds``), ``tok`` [B, T] (token
ids: CNTK gathers with float indices), and for ``loop`` ``live`` [B, T, 1] (1
on real steps); ``fused`` sends ``lengths`` [B] instead, and the worker cuts
each sequence to its length.
"""

from __future__ import annotations

import numpy as np

from bench.batches import SeqBatch

from .common import CNTKImplementation, label_feeds


class RNN(CNTKImplementation):
    family = "rnn"

    def _batch_arrays(self, batch):
        if not isinstance(batch, SeqBatch):
            raise TypeError("the RNN family needs a SeqBatch, got %s" % type(batch).__name__)
        y, w = label_feeds(batch.labels, self.cfg.num_classes)
        feeds = {"y": y, "w": w, "tok": batch.tokens.astype(np.float32)}
        if self.strategy == "fused":
            feeds["lengths"] = np.asarray(batch.lengths, np.int32)
        else:
            steps = np.arange(batch.tokens.shape[1])
            feeds["live"] = (steps[None, :] < batch.lengths[:, None]).astype(np.float32)[:, :, None]
        return feeds
