"""MXNet 1.9.1 (Gluon) implementations of both families.

* ``rnn.RNN``: Elman RNN and LSTM with strategies ``loop`` (imperative NDArray
  ops under ``autograd.record``, a Python loop over time steps), ``fused``
  (``gluon.rnn.RNN`` / ``gluon.rnn.LSTM``: the fused ``RNN`` operator, oneDNN
  on the CPU, cuDNN on the GPU) and ``compiled`` (the loop as
  ``contrib.foreach`` in a hybridized ``HybridBlock``: one cached graph).
* ``rvnn.RvNN``: RvNN and Tree-LSTM with strategies ``recursive`` (one
  imperative call per node), ``levels`` (one batched step per tree height) and
  ``compiled`` (levels over the padded static form, unrolled over the bucketed
  height count in a hybridized ``HybridBlock``, one cached graph per bucket).

Threads: MXNet's operator pool is OpenMP, set per process with
``MXSetNumOMPThreads`` (see ``MXNetImplementation.apply_threads``); its engine worker count
(``MXNET_CPU_WORKER_NTHREADS``, default 1) is read when MXNet starts and is
left at 1 so that one operator at a time uses the OpenMP pool.

This module must stay importable without MXNet (the registry reads
``NOT_APPLICABLE`` before deciding whether to import the framework).
"""

from bench.interface import NO_PLAIN

# Every (model, strategy) of both families is expressible in MXNet Gluon (the plain
# yardstick is written for three frameworks only).
NOT_APPLICABLE = dict(NO_PLAIN)
