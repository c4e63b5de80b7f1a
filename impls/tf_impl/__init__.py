"""TensorFlow (2.x, Keras 3) implementations of both families.

* ``rnn.RNN``: Elman RNN and LSTM with strategies ``loop`` (eager Python loop
  over time steps), ``fused`` (``keras.layers.SimpleRNN`` / ``keras.layers.LSTM``,
  cuDNN on GPU where Keras can use it), ``compiled`` (the loop as a
  ``tf.while_loop`` under ``tf.function``) and ``plain`` (the yardstick: the
  same Keras layer unmasked over the padded batch, each row's output at its
  last real token gathered).
* ``rvnn.RvNN``: RvNN and Tree-LSTM with strategies ``recursive`` (one eager
  call per node, walking each tree), ``levels`` (eager, one batched step per
  tree height) and ``compiled`` (levels over the padded static form under
  ``tf.function``).

This module must stay importable without TensorFlow (the registry reads
``NOT_APPLICABLE`` before deciding whether to import the framework).
"""

import os

# The runner sets this before the cell starts; the default covers other callers.
# Only effective if TF has not been imported yet in this process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Every (model, strategy) of both families is expressible in TensorFlow.
NOT_APPLICABLE = {}
