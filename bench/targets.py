"""What a model's loss classifies: rows of its hidden states and their labels.

Every implementation and the NumPy reference take the loss modes
(``ModelConfig.loss_mode``) from here, so "root" and "all" mean one thing everywhere:

* an RNN classifies each sequence's last real step: one row per example;
* a tree model in ``root`` mode classifies each tree's root;
* a tree model in ``all`` mode classifies every row of its node buffer, in order:
  each node of a ``TreeBatch``, or each row of a ``PaddedTrees`` buffer (the
  ``zero`` and ``sink`` rows too, labelled -1).

The loss is the mean cross-entropy over the classified rows whose label is >= 0:
the sum divided by ``labelled_count`` (at least 1, so a batch without a label has
loss 0, never 0 / 0). Whatever the mode, logits are reported at the roots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from .batches import PaddedTrees, SeqBatch, TreeBatch


def labelled_count(labels) -> int:
    """Rows with a label (label >= 0), at least 1: what a mean loss divides by."""
    return max(1, int((np.asarray(labels) >= 0).sum()))


def loss_weights(labels, dtype=np.int32) -> Tuple[np.ndarray, np.ndarray]:
    """(labels with -1 -> 0 in ``dtype``, float32 weights ``(label >= 0) / labelled_count``):
    the mean loss as a weighted sum, for code that cannot skip a row."""
    labels = np.asarray(labels)
    keep = labels >= 0
    return (np.where(keep, labels, 0).astype(dtype),
            (keep / labelled_count(labels)).astype(np.float32))


@dataclass(frozen=True)
class ClassPoints:
    """The rows a loss classifies and their labels.

    ``rows`` int32[P]: the rows of the hidden states (the roots), or None when
    every row is classified, in order (the RNN's rows, the ``all`` mode's node
    buffer): code that holds all rows then classifies them without a gather.
    ``labels`` int32[P]: each classified row's label, -1 where it has none.
    """

    rows: Optional[np.ndarray]
    labels: np.ndarray

    @property
    def every_row(self) -> bool:
        return self.rows is None

    @property
    def index(self) -> np.ndarray:
        """``rows`` as an index array (0..P-1 where every row is classified)."""
        if self.rows is None:
            return np.arange(len(self.labels), dtype=np.int32)
        return self.rows

    @property
    def count(self) -> int:
        """See ``labelled_count``."""
        return labelled_count(self.labels)

    def on_rows(self, num_rows: int) -> np.ndarray:
        """int32[num_rows]: each row's label in the loss, -1 where the row is not classified."""
        out = np.full(int(num_rows), -1, np.int32)
        out[self.index] = self.labels
        return out


def class_points(batch: Union[SeqBatch, TreeBatch, PaddedTrees],
                 loss_mode: str = "root") -> ClassPoints:
    """The rows ``batch`` classifies under ``loss_mode`` (see the module doc)."""
    if isinstance(batch, SeqBatch):
        return ClassPoints(None, batch.labels)
    if loss_mode == "root":
        return ClassPoints(batch.root, batch.root_label)
    if loss_mode == "all":
        return ClassPoints(None, batch.label)
    raise ValueError("loss_mode is 'root' or 'all', not %r" % loss_mode)
