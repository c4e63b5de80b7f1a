"""Chainer 7.8.1 implementations of both families (define-by-run, the original).

* ``rnn.RNN``: Elman RNN and LSTM with strategies ``loop`` (eager Python loop
  over time steps) and ``fused`` (``chainer.links.NStepRNNTanh`` /
  ``chainer.links.NStepLSTM``: cuDNN on GPU, a per-step loop over
  ``F.linear`` + ``F.lstm`` on the CPU).
* ``rvnn.RvNN``: RvNN and Tree-LSTM with strategies ``recursive`` (one eager
  call per node) and ``levels`` (one batched step per tree height).

Chainer has no graph compiler or tracer that runs a model (``chainer.static_graph``
only caches a define-by-run schedule and has no control flow), so every
``compiled`` cell is not applicable.

This module must stay importable without Chainer (the registry reads
``NOT_APPLICABLE`` before deciding whether to import the framework).
"""

from bench.interface import NO_PLAIN

_NO_COMPILER = ("Chainer is define-by-run only: it has no compiler or tracer for a "
                "whole model (chainer.static_graph caches one fixed schedule and "
                "cannot express a loop of data-dependent length)")

NOT_APPLICABLE = {
    **NO_PLAIN,
    ("*", "compiled"): _NO_COMPILER,
}
