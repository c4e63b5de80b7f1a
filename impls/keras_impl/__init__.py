"""Keras 3 as a framework: one implementation, run on the torch, jax and tensorflow backends.

The registry lists it three times (``keras-torch``, ``keras-jax``,
``keras-tensorflow``); ``KERAS_BACKEND`` is set before the cell's process
starts, and ``framework`` on each class says which backend ran
(``"keras-" + keras.backend.backend()``).

Everything the model computes goes through Keras: ``keras.layers.Embedding``
and ``keras.layers.Dense`` around the recurrence, ``keras.layers.SimpleRNN`` /
``keras.layers.LSTM`` for the fused RNN, custom ``keras.layers.Layer``
subclasses written with ``keras.ops`` for everything else, Keras' loss function
and Keras optimizers. Only the training step itself is backend code, the
documented Keras 3 custom-training-loop pattern of each backend:
``loss.backward()`` (torch), ``jax.value_and_grad`` over ``stateless_call``
with ``optimizer.stateless_apply`` (jax), ``tf.GradientTape`` (tensorflow).

Execution per strategy (details in ``rnn.py``, ``rvnn.py`` and ``common.py``):

===========  ==================  ============================  =================================
strategy     torch backend       jax backend                   tensorflow backend
===========  ==================  ============================  =================================
loop         eager               Python loop, each step one    eager
                                 ``jax.jit`` call
recursive    eager               Python loop, each node one    eager
                                 ``jax.jit`` call
levels       eager               Python loop, each height one  eager
                                 ``jax.jit`` call
fused        eager (Keras'       ``jax.jit`` (Keras' default   ``tf.function``, no XLA (Keras'
             default on torch)   on jax)                       default on a CPU-only machine)
compiled     not applicable      ``jax.jit``                   ``tf.function(jit_compile=True)``
===========  ==================  ============================  =================================

On jax the eager strategies jit their per-step / per-node / per-height function: JAX's
op-by-op autodiff costs ~1 ms per op, 7-15x slower than jitting the few ops of a node
(``common.cell_function``), and raw JAX code and Keras itself (which jits every step unless
``run_eagerly``) do the same.

The torch backend's ``compiled`` cells are refused by ``NOT_APPLICABLE_BY_ENTRY``
(this package, and so ``NOT_APPLICABLE``, is shared by all three backends; the
registry adds the entry's own table).

This module must not import keras: the registry reads ``NOT_APPLICABLE``
before the backend is chosen.
"""

from bench.interface import NO_PLAIN

# Every (model, strategy) but the plain yardstick is expressible with Keras layers and ops on
# some backend.
NOT_APPLICABLE = dict(NO_PLAIN)

TORCH_COMPILE_REASON = (
    "Keras runs the torch backend eagerly; its only compiler is jit_compile=True, which wraps "
    "the step in torch.compile. Measured here (LSTM, B 25, T 16, D 100, H 150): the Keras "
    "forward traces to one graph without breaks and runs ~3x faster, but the first compile "
    "takes over 2 minutes on this 2-core machine, the time loop (and the tree level loop) is "
    "unrolled, and every new (batch size, length) shape recompiles until dynamo's recompile "
    "limit (8), after which it silently runs eagerly; a cell meets 10-30 shapes (verify batch, "
    "pool, batch-1 latency). Keras' own jit_compile='auto' keeps torch eager for this reason")

NOT_APPLICABLE_BY_ENTRY = {"keras-torch": {("*", "compiled"): TORCH_COMPILE_REASON}}
