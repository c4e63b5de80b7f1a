"""Elman RNN and LSTM in Keras 3: strategies ``loop``, ``fused``, ``compiled``.

Shapes: B batch, T time steps (the batch's longest sequence, or that rounded up to a
multiple of ``TIME_BUCKET`` where a compiler specialises on shapes), D embedding,
H hidden, G = H (Elman) or 4H (LSTM) gate width, C classes.

The model is a ``keras.Model``: ``keras.layers.Embedding`` -> recurrence -> ``keras.layers.Dense``
at the last real token. Canonical parameters map one to one, with the same shapes: ``E`` is
the embedding's ``embeddings``; ``W_x``, ``W_h``, ``b`` are the recurrence's ``kernel``
(D, G), ``recurrent_kernel`` (H, G) and ``bias`` (G); ``W_o``, ``b_o`` the Dense layer's.
Keras' LSTM gate blocks are (i, f, c, o), the canonical (i, f, g, o) with g named c, so no
block is reordered.

* ``loop``: ``Recurrence``, a custom layer, runs a Python loop over the T steps with
  ``keras.ops``, eagerly. The input projection ``x W_x + b`` is one matmul for all steps up
  front (it does not depend on the recurrence); each step is ``h W_h`` plus the gates. A
  padded step keeps h and c (``ops.where`` on the step's live mask); the first
  ``min(lengths)`` steps, live for every sequence, skip the where. On jax each step is one
  ``jax.jit`` call (``common.cell_function`` says why) that reads its row of the projections
  itself (``common.row_of``), and T is bucketed as for the compiled strategies.
* ``fused``: ``keras.layers.SimpleRNN`` / ``keras.layers.LSTM`` fed ``mask=`` from the
  lengths (padded steps keep the state; the layer's last output is the state at the last
  real token), run as Keras runs a model by default on the backend: eagerly on torch,
  under ``jax.jit`` on jax, in ``tf.function`` without XLA on tensorflow (CPU). Keras 3 has
  no fused CPU kernel: it runs its generic per-backend RNN loop (torch: a Python loop over
  the cell; jax: ``lax.scan``; tensorflow: ``tf.while_loop``). On a GPU only tensorflow's
  ``LSTM`` calls cuDNN (it accepts right-padded masks, as ours are); the jax and torch cuDNN
  paths refuse any mask and fall back to the generic loop, and ``SimpleRNN`` has no cuDNN
  path on any backend.
* ``compiled``: the ``loop`` step as a custom cell (``StepCell``) inside
  ``keras.layers.RNN`` (Keras' documented way to write a custom recurrence) over the hoisted
  projections, with the same mask, the whole training step under the backend's compiler
  with ``jit_compile``: ``jax.jit`` (the layer runs ``lax.scan``) /
  ``tf.function(jit_compile=True)`` (a ``tf.while_loop`` with ``maximum_iterations``). Not
  ``keras.ops.scan``: on tensorflow it builds a ``tf.while_loop`` without
  ``maximum_iterations``, whose gradient XLA refuses to compile ("XLA compilation requires
  a fixed tensor list size"). Not applicable on torch (``impls.keras_impl.TORCH_COMPILE_REASON``).

Where the step is compiled per input shape (every jax strategy, tensorflow ``compiled``),
``prepare`` pads T up to a multiple of ``TIME_BUCKET`` with masked steps, so
SST meets at most ~7 lengths per batch size; ``info()['traces']`` counts the traces.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

import keras
from keras import ops

from bench.batches import round_up

from .common import BACKEND, JIT_CELLS, KerasImplementation, Prepared, cell_function, read, row_of

TIME_BUCKET = 8


class StepCell(keras.layers.Layer):
    """The recurrence's weights and one step, for ``keras.layers.RNN`` and for the Python loop.

    A step starts from the hoisted input projection ``z = x_t W_x + b`` [B, G]:
    ``call(z, states) -> (h, new states)`` with states ``[h]`` (Elman) or ``[h, c]`` (LSTM),
    each [B, H]. ``kernel`` (D, G) and ``bias`` (G) are applied outside the step, to all
    steps at once.
    """

    def __init__(self, model: str, units: int, input_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.cell_model, self.units, self.input_dim = model, units, input_dim
        self.gates = 4 * units if model == "lstm" else units
        self.state_size = [units, units] if model == "lstm" else [units]
        self.output_size = units

    def build(self, input_shape=None):
        # Values come from load_params; zeros keep construction cheap and deterministic.
        self.kernel = self.add_weight(name="kernel", shape=(self.input_dim, self.gates),
                                      initializer="zeros")
        self.recurrent_kernel = self.add_weight(name="recurrent_kernel",
                                                shape=(self.units, self.gates), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(self.gates,), initializer="zeros")

    def step(self, W_h, z, h, c=None):
        """(z [B, G], h, c [B, H]) -> new (h, c) (c is None for Elman)."""
        z = z + ops.matmul(h, W_h)
        if self.cell_model == "elman":
            return ops.tanh(z), None
        i, f, g, o = ops.split(z, 4, axis=-1)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        return ops.sigmoid(o) * ops.tanh(c), c

    def masked_step(self, W_h, z, h, c, keep):
        """``step``, keeping (h, c) where ``keep`` [B, 1] is False (a padded step)."""
        h_new, c_new = self.step(W_h, z, h, c)
        return ops.where(keep, h_new, h), None if c is None else ops.where(keep, c_new, c)

    def call(self, z, states):
        h, c = self.step(self.recurrent_kernel, z, *states)
        return h, [h] if c is None else [h, c]


class Recurrence(keras.layers.Layer):
    """Elman or LSTM recurrence: x [B, T, D] -> h [B, H] at each sequence's last live step.

    ``loop``: ``call(x, live, steps=(full, last))`` with ``live`` bool [T, B, 1], ``full`` the
    number of leading steps live for every sequence and ``last`` the longest length (Python
    ints; steps past ``last`` are padding, never run). ``compiled``: ``call(x, live)`` with
    ``live`` bool [B, T], Keras' mask for ``keras.layers.RNN``.
    """

    def __init__(self, model: str, units: int, input_dim: int, strategy: str, **kwargs):
        super().__init__(**kwargs)
        self.strategy = strategy
        self.cell = StepCell(model, units, input_dim, name="cell")
        self.cell.build()
        if strategy == "compiled":
            self.rnn = keras.layers.RNN(self.cell, return_sequences=False, name="rnn")
        # On jax each step is one jitted call that reads its own row of the projections.
        self.jit_steps = JIT_CELLS and strategy == "loop"
        cell = self.cell
        if self.jit_steps:
            self._step = cell_function(
                lambda W_h, xp, t, h, c: cell.step(W_h, row_of(xp, t), h, c), True)
            self._masked_step = cell_function(
                lambda W_h, xp, t, h, c, live: cell.masked_step(W_h, row_of(xp, t), h, c,
                                                                row_of(live, t)), True)

    def build(self, input_shape=None):
        if self.strategy == "compiled":
            self.rnn.build((None, None, self.cell.gates))

    def call(self, x, live, steps=None):
        cell = self.cell
        xp = ops.matmul(x, cell.kernel) + cell.bias                      # [B, T, G]
        if self.strategy == "compiled":
            return self.rnn(xp, mask=live)
        W_h = read(cell.recurrent_kernel)
        xp = ops.transpose(xp, (1, 0, 2))                                # [T, B, G]
        h = ops.zeros((ops.shape(x)[0], cell.units), dtype=x.dtype)
        c = h if cell.cell_model == "lstm" else None
        full, T = steps
        if self.jit_steps:
            for t in range(T):
                if t < full:
                    h, c = self._step(W_h, xp, t, h, c)
                else:
                    h, c = self._masked_step(W_h, xp, t, h, c, live)
            return h
        rows = ops.unstack(xp, axis=0)[:T]                               # T x [B, G]
        keeps = ops.unstack(live, axis=0) if full < T else None
        for t, z in enumerate(rows):
            if t < full:
                h, c = cell.step(W_h, z, h, c)
            else:
                h, c = cell.masked_step(W_h, z, h, c, keeps[t])
        return h


class SeqClassifier(keras.Model):
    """tokens int32[B, T] (+ live mask) -> logits [B, C] at each sequence's last real token."""

    def __init__(self, cfg, strategy: str):
        super().__init__(name="keras_%s_%s" % (cfg.model, strategy))
        self.fused = strategy == "fused"
        self.time_major = strategy == "loop"
        self.embed = keras.layers.Embedding(cfg.vocab_size, cfg.embed_dim, name="embedding")
        if self.fused:
            layer = keras.layers.LSTM if cfg.model == "lstm" else keras.layers.SimpleRNN
            self.rnn = layer(cfg.hidden, return_sequences=False, name=cfg.model)
        else:
            self.rnn = Recurrence(cfg.model, cfg.hidden, cfg.embed_dim, strategy, name=cfg.model)
        self.classify = keras.layers.Dense(cfg.num_classes, name="classify")
        self.embed.build((None, None))
        self.rnn.build((None, None, cfg.embed_dim))
        self.classify.build((None, cfg.hidden))
        self.built = True

    def call(self, inputs, static=None):
        """inputs = (tokens int32[B, T], live bool[T, B, 1] (loop) or [B, T]); static = steps."""
        tokens, live = inputs
        x = self.embed(tokens)                       # [B, T, D]
        if self.fused:
            h = self.rnn(x, mask=live)
        elif self.time_major:
            h = self.rnn(x, live, steps=static)
        else:
            h = self.rnn(x, live)
        return self.classify(h)                      # [B, C]

    def param_variables(self):
        cell = self.rnn.cell
        return OrderedDict([("E", self.embed.embeddings), ("W_x", cell.kernel),
                            ("W_h", cell.recurrent_kernel), ("b", cell.bias),
                            ("W_o", self.classify.kernel), ("b_o", self.classify.bias)])


class RNN(KerasImplementation):
    family = "rnn"
    modes = {"loop": "eager", "fused": "graph", "compiled": "xla"}

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        compiled_per_shape = BACKEND == "jax" or (BACKEND == "tensorflow" and self.mode == "xla")
        self.time_bucket = TIME_BUCKET if compiled_per_shape else 1
        self._shapes = set()

    def _build_model(self):
        return SeqClassifier(self.cfg, self.strategy)

    def _param_variables(self):
        return self.model.param_variables()

    def prepare(self, batch):
        tokens = np.asarray(batch.tokens, np.int32)
        lengths = np.asarray(batch.lengths, np.int32)
        B, T = tokens.shape
        T_pad = round_up(T, self.time_bucket)
        if T_pad > T:
            tokens = np.concatenate([tokens, np.zeros((B, T_pad - T), np.int32)], axis=1)
        live = np.arange(T_pad)[:, None] < lengths[None, :]          # [T, B]
        if self.strategy == "loop":
            live = live[:, :, None]                                   # [T, B, 1]
            static = (int(lengths.min()), int(T))
        else:
            live = np.ascontiguousarray(live.T)                       # [B, T], Keras' mask
            static = None
        self._shapes.add((B, T_pad))
        inputs = (self._tensor(tokens, "int32"), self._tensor(live, "bool"))
        labels = self._tensor(np.asarray(batch.labels, np.int32), "int32")
        return Prepared(inputs, static, labels, size=B)

    def _describe(self):
        layer = {"fused": "keras.layers." + type(self.model.rnn).__name__,
                 "loop": "Recurrence (Python loop over StepCell)",
                 "compiled": "Recurrence (keras.layers.RNN over StepCell)"}[self.strategy]
        return {"recurrent_layer": layer, "time_bucket": self.time_bucket,
                "jit_per_step": bool(getattr(self.model.rnn, "jit_steps", False)),
                "prepared_shapes": sorted(self._shapes)}
