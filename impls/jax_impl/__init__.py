"""JAX (with optax) as a framework: RNN and RvNN families, every strategy JAX can express.

Strategies, as implemented here:

* RNN ``loop``: a jitted cell called from a Python loop over time steps;
  gradients come from ``jax.value_and_grad`` over that Python loop.
* RNN ``compiled``: training is ``jax.lax.scan`` over time under one ``jit``
  (forward, backward and optimiser update together); inference a
  ``lax.while_loop`` that stops after the longest example.
* RNN ``fused``: ``jax.experimental.rnn.lstm`` (cuDNN) on a CUDA GPU only.
* RNN ``plain``: the yardstick, not a contender: one jitted ``lax.scan`` over every step
  of the whole padded batch (no masking, no early stop), each example's output read at
  its last real token (exact for a unidirectional RNN); training is ``jax.jit`` of
  ``value_and_grad`` plus the optimiser update.
* RvNN ``recursive``: one jitted call per tree node, following each tree.
* RvNN ``levels``: one jitted call per tree height (in calls of W nodes), and in
  training one jitted backward call per forward call.
* RvNN ``compiled``: ``lax.scan`` over a static schedule of node groups under one ``jit``,
  its backward pass written out (``jax.custom_vjp``).

Every strategy pads batches into the shape classes of ``bench.batches``, so a cell
compiles a few programs, not one per batch shape; ``info()['compiles']`` counts them.

Threads: XLA's CPU client sizes its thread pool from the environment variable
``PJRT_NPROC`` when the backend starts, so the runner should export
``PJRT_NPROC=<threads>`` for each cell's process; the constructor sets it too
when JAX's backend has not started yet, and ``info()`` says what was applied.

This module must not import jax: the registry reads ``NOT_APPLICABLE`` without
loading the framework.
"""

NOT_APPLICABLE = {
    ("elman", "fused"): "jax.experimental.rnn wraps only cuDNN's LSTM; JAX has no fused "
                        "Elman (tanh RNN) layer",
    ("lstm", "fused", "cpu"): "JAX has no fused LSTM kernel for the CPU: jax.experimental.rnn "
                              "lowers only to cuDNN (CUDA) and MIOpen (ROCm)",
}
