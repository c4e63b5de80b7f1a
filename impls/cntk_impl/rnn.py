"""Elman RNN and LSTM on CNTK 2.7 (in the worker): strategies ``loop`` and ``fused``.

* ``loop``: the time loop unrolled in Python into one static CNTK graph per
  padded length T (built on first use, cached); the batch runs on CNTK's
  batch axis, padded steps keep h (and c) through ``element_select``.
* ``fused``: CNTK's own recurrence, ``layers.Recurrence(layers.LSTM)`` /
  ``layers.RNNStep(tanh)`` over the dynamic sequence axis (each example only
  as long as it is), ``sequence.last`` for the classified state. Canonical
  LSTM gate blocks [i, f, g, o] are loaded into CNTK's [i, g, f, o] layout.
* ``compiled``: not applicable (see ``NOT_APPLICABLE``).

The work runs in the worker process (``worker.py``); this class only sends
requests (``common.CNTKImplementation``).
"""

from __future__ import annotations

import numpy as np

from bench.batches import SeqBatch

from .common import CNTKImplementation


class RNN(CNTKImplementation):
    family = "rnn"

    def _batch_arrays(self, batch):
        if not isinstance(batch, SeqBatch):
            raise TypeError("the RNN family needs a SeqBatch, got %s" % type(batch).__name__)
        return {"tokens": np.asarray(batch.tokens, np.int32),
                "lengths": np.asarray(batch.lengths, np.int32),
                "labels": np.asarray(batch.labels, np.int32)}
