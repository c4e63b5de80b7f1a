"""The suite's optimisers as stock Keras optimisers (``bench.interface`` constants).

Shared by the Keras implementation (every backend) and TensorFlow's, which trains with
Keras' optimisers too. Importing this module imports Keras, so an importer that must
choose Keras' backend (``tf_impl``) imports it after doing so.

Keras' own formulas (keras/src/optimizers): Adam adds epsilon to sqrt(v) *before* the
bias correction of the step size (``lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) +
eps)``), Adagrad *inside* the root (``g / sqrt(acc + eps)``). PyTorch and optax put
epsilon after the root of the corrected v / of acc: for Adagrad (acc >= 0.1) the
difference is ~1e-8; for Adam it shows on entries whose |g| is near eps / sqrt(1 -
b2^t), i.e. small embedding gradients. Weight decay is not Keras' (its ``weight_decay=``
is decoupled, AdamW-like): each importer adds the coupled L2 to the gradients.
"""

from __future__ import annotations

import keras

from bench.interface import ADAGRAD, ADAM


def keras_optimizer(name: str, lr: float):
    """A fresh Keras optimiser ``name`` (sgd, adam or adagrad) at learning rate ``lr``."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.0, nesterov=False)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr, beta_1=ADAM["beta1"],
                                     beta_2=ADAM["beta2"], epsilon=ADAM["eps"])
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate=lr,
                                        initial_accumulator_value=ADAGRAD["initial_accumulator"],
                                        epsilon=ADAGRAD["eps"])
    raise ValueError("unknown optimizer %r" % name)
