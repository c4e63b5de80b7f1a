"""PaddlePaddle (3.x, dygraph) as a framework: RNN and RvNN families.

Strategies, as implemented here:

* RNN ``loop``: eager Python loop over time steps, one cell per step.
* RNN ``fused``: ``paddle.nn.SimpleRNN`` / ``paddle.nn.LSTM``, whose forward is
  Paddle's single ``rnn`` operator (a C++ kernel on the CPU, cuDNN on a GPU).
  The canonical weights map onto it exactly (``common.py`` documents the map).
* RNN ``compiled``: blocks of 8 unrolled steps, each a ``paddle.jit.to_static``
  program, chained by a Python loop over blocks (time padded to a multiple of
  8, so the same programs serve every length; ``rnn.py`` says why the whole
  loop is not one program).
* RvNN ``recursive``: eager, one cell call per tree node.
* RvNN ``levels``: eager, one cell call per tree height across the batch.
* RvNN ``compiled``: ``levels`` on the packed static form
  (``TreeBatch.padded_packed()``) as ``paddle.jit.to_static`` programs: one
  for the leaves, then blocks of 4 unrolled steps chained by a Python loop.

Threads: ``paddle.base.core.set_num_threads`` sizes the CPU math library's
pool (MKL/oneDNN); the runner's OMP_NUM_THREADS caps OpenMP; static programs
run with ``FLAGS_new_executor_serial_run`` (no executor worker threads).
``info()`` reports all three.

This module must not import paddle: the registry reads ``NOT_APPLICABLE``
without loading the framework.
"""

from bench.interface import NO_PLAIN

NOT_APPLICABLE = dict(NO_PLAIN)
