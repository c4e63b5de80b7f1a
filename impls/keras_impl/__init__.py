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

The torch backend's ``compiled`` cells raise ``NotApplicable`` from the
constructor (see ``common.TORCH_COMPILE_REASON``); it cannot be a static entry
here because this package, and so this table, is shared by all three backends.

This module must not import keras: the registry reads ``NOT_APPLICABLE``
before the backend is chosen.
"""

# Every (model, strategy) is expressible with Keras layers and ops; backend-specific refusals
# (torch + compiled) are raised by the constructor.
NOT_APPLICABLE = {}
