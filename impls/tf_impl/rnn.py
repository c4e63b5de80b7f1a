"""Elman RNN and LSTM in TensorFlow: strategies ``loop``, ``fused``, ``compiled``, ``plain``.

Shapes: B batch, T time steps (batch max length), D embedding, H hidden,
G = H (Elman) or 4H (LSTM) gate width, C classes.

* ``loop``: eager Python loop over the T steps. The input projection
  ``E[tokens] W_x + b`` is one matmul for all steps up front (it does not
  depend on the recurrence); each step is ``h W_h`` plus the gates. A padded
  step keeps h and c (``tf.where`` on the step's live mask).
* ``fused``: ``keras.layers.SimpleRNN`` / ``keras.layers.LSTM`` holding the
  canonical W_x, W_h, b (Keras' LSTM gate blocks are i, f, c, o, the same order
  as the canonical i, f, g, o; the mapping lives in ``_to_storage`` /
  ``_from_storage`` only), fed ``mask=`` from the lengths so padded steps keep
  the state. It runs the way ``Model.fit`` / ``predict`` run a layer: inside
  ``tf.function`` without XLA (Keras' own choice on CPU, and on GPU the cuDNN
  kernel cannot be used under XLA). On GPU Keras uses cuDNN (CudnnRNNV3) for
  the LSTM: our masks are right-padded with every length >= 1, which is what
  it requires; ``info()['fused_kernel']`` says what the traced graph holds. On
  CPU Keras 3 has no fused kernel: it runs its generic ``tf.while_loop`` over
  the cell (matmuls through oneDNN); SimpleRNN has no cuDNN path anywhere.
* ``compiled``: the ``loop`` math as a ``tf.while_loop`` (inputs read through a
  TensorArray, whose gradient writes one slot per step rather than a full
  [T, B, G] tensor) inside ``tf.function`` with a shape-agnostic input
  signature, so one trace serves every batch (``info()['traces']``).
* ``plain`` (the yardstick, not a contender): what a TF user writes first.
  The same Keras layer, weights and ``tf.function`` as ``fused``, but run
  with ``return_sequences=True`` over the whole padded batch without a mask,
  and each row's output at its last real token (``lengths - 1``) gathered.
  Exact for a unidirectional RNN: padding after a token cannot change that
  token's output; it only costs the padded steps.

XLA for ``compiled`` (``jit_compile``): measured on the quick preset (SST,
first 12 batches of 25, D 100, H 150, 2 threads, CPU), all variants in one
process, alternating passes, on a shared 2-core machine (best / median of 7
passes, examples/s; the 12 batches have 3 distinct padded shapes)::

    LSTM                   train       infer        first train call   warm-up pass
    compiled, XLA         948 / 487   5785 / 1744      4.2 s              8.6 s
    compiled, no XLA      617 / 495   4601 / 1669      1.1 s              0.9 s
    fused (Keras LSTM)    508 / 406   2535 / 1511      1.4 s              0.9 s
    Elman
    compiled, XLA        4042 / 1471 17769 / 6570      2.7 s              6.1 s
    compiled, no XLA     3374 / 1394 11125 / 4096      0.7 s              0.3 s

XLA is used (``COMPILED_XLA``): it is as fast or faster on every steady-state
figure (it fuses each step's gates into one kernel and drops the graph
executor's per-iteration work); the price is compile time, once per distinct
input shape, which the runner measures apart (first call, warm-up). To bound
the number of shapes, ``prepare`` pads every batch into a shape class
(``bench.batches``): examples to the cell's batch size (padded examples have
no live step and label -1), T for training to a power of two >= 16
(``train_length``: SST 16, 32, 64), T for inference to one length per class
(``count_bucket``: SST 64) with the input projection step by step inside the
loop. The loop stops at the batch's real longest sequence in both, so padded
steps cost only their share of the training input projection. An SST cell
compiles at most three training shapes, the gradient program once, and two
inference shapes (its batches, batch-1 latency): ``info()['compiles']``;
``info()['xla_shapes']`` lists the shapes prepared.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from bench.batches import count_bucket, padded_rows, train_length

from .common import TFImplementation, keras, known_noise_filtered, masked_xent, tf

COMPILED_XLA = True
# The strategies that run a stock Keras recurrent layer (same weights, signature, tracing).
LAYER_STRATEGIES = ("fused", "plain")

# Keras LSTM kernel / recurrent_kernel / bias blocks are (i, f, c, o); the
# canonical blocks are (i, f, g, o) with g the cell candidate (Keras' "c").
# KERAS_FROM_CANONICAL[k] = canonical block stored in Keras block k.
KERAS_LSTM_FROM_CANONICAL = (0, 1, 2, 3)
_KERAS_NAMES = {"W_x": "kernel", "W_h": "recurrent_kernel", "b": "bias"}


def permute_blocks(value: np.ndarray, order) -> np.ndarray:
    """Reorder the len(order) equal blocks of the last axis: out block k = in block order[k]."""
    blocks = np.split(value, len(order), axis=-1)
    return np.concatenate([blocks[i] for i in order], axis=-1)


class RNN(TFImplementation):
    family = "rnn"

    def __init__(self, cfg, strategy, device="cpu", threads=1, xla=None):
        """``xla`` overrides COMPILED_XLA for ``compiled`` (used to measure the choice)."""
        super().__init__(cfg, strategy, device, threads)
        if xla is not None and strategy != "compiled":
            raise ValueError("xla applies to the compiled strategy only")
        self.graph = strategy in LAYER_STRATEGIES + ("compiled",)
        self.xla = strategy == "compiled" and (COMPILED_XLA if xla is None else bool(xla))
        self._layer = None
        self._xla_shapes = set()
        self._gates = 4 * cfg.hidden if cfg.model == "lstm" else cfg.hidden
        if strategy == "fused":
            # Keras transposes the bool mask; TF logs a once-per-process notice at
            # ERROR level on the first bool transpose. Take it here, filtered.
            with known_noise_filtered(), tf.device("/CPU:0"):
                tf.transpose(tf.zeros([1, 1], tf.bool)).numpy()

    # --- parameters: the Keras layer holds W_x, W_h, b for ``fused`` and ``plain`` ---
    def _to_storage(self, name, value):
        """The one place canonical weights are converted to Keras' layout."""
        if self.strategy in LAYER_STRATEGIES and self.cfg.model == "lstm" and name in _KERAS_NAMES:
            return permute_blocks(value, KERAS_LSTM_FROM_CANONICAL)
        return value

    def _from_storage(self, name, value):
        if self.strategy in LAYER_STRATEGIES and self.cfg.model == "lstm" and name in _KERAS_NAMES:
            return permute_blocks(value, np.argsort(KERAS_LSTM_FROM_CANONICAL))
        return value

    def _make_variables(self, params):
        if self.strategy not in LAYER_STRATEGIES:
            return super()._make_variables(params)
        H, D = self.cfg.hidden, self.cfg.embed_dim
        sequences = self.strategy == "plain"   # plain gathers each row's last real output
        if self.cfg.model == "lstm":
            # "auto" tries cuDNN and falls back to the generic loop when it cannot.
            self._layer = keras.layers.LSTM(H, use_cudnn="auto" if self.device == "gpu" else False,
                                            return_sequences=sequences)
        else:
            self._layer = keras.layers.SimpleRNN(H, return_sequences=sequences)
        self._layer.build((None, None, D))
        cell = self._layer.cell
        out = OrderedDict()
        for name, value in params.items():
            if name in _KERAS_NAMES:
                inner = getattr(cell, _KERAS_NAMES[name])
                inner.assign(self._to_storage(name, value))
                out[name] = inner.value  # the tf.Variable inside the Keras variable
            else:
                out[name] = tf.Variable(value, name=name, dtype=tf.float32)
        return out

    # --- batches ---
    def prepare(self, batch):
        """SeqBatch -> dict of device tensors.

        fused / plain: tokens int32[B, T], lengths int32[B], labels int32[B].
        loop / compiled: tokens int32[T, B] (time-major), live bool[T, B, 1]
        (step t is real for that row), steps int32[] (steps the loop runs),
        labels int32[B]; loop also gets ``live_steps``, the T [B, 1] slices.
        """
        tokens, lengths, labels = batch.tokens, batch.lengths, batch.labels
        B, T = tokens.shape
        with tf.device(self.dev):
            put = lambda a: tf.identity(tf.constant(a))  # noqa: E731 (identity moves it to the device)
            if self.strategy in LAYER_STRATEGIES:
                return {"tokens": put(tokens), "lengths": put(lengths), "labels": put(labels)}
            if not self.xla:
                return self._time_major(tokens, lengths, labels, T, put)
            # XLA compiles once per shape. Examples pad to the cell's batch size (no live step,
            # label -1). Training pads T to a power of two >= 16 (train_length); inference to
            # one length per class (count_bucket) with the input projection inside the loop,
            # which stops at the real T, so its padded steps cost nothing.
            rows = padded_rows(B, self.batch_size)
            lengths = np.concatenate([lengths, np.zeros(rows - B, lengths.dtype)])
            labels = np.concatenate([labels, np.full(rows - B, -1, labels.dtype)])
            tokens = np.concatenate([tokens, np.zeros((rows - B, T), tokens.dtype)])
            out = {"size": B}
            for phase, T_pad in (("train", train_length(T)), ("infer", count_bucket(T))):
                self._xla_shapes.add((phase, rows, T_pad))
                padded = np.zeros((rows, T_pad), np.int32)
                padded[:, :T] = tokens
                out[phase] = self._time_major(padded, lengths, labels, T, put)
            return out

    def _time_major(self, tokens, lengths, labels, T, put):
        T_pad = tokens.shape[1]
        live = (np.arange(T_pad)[:, None] < lengths[None, :])[:, :, None]
        out = {"tokens": put(np.ascontiguousarray(tokens.T)), "live": put(live),
               "steps": put(np.int32(T)), "labels": put(labels)}
        if self.strategy == "loop":
            out["live_steps"] = [put(live[t]) for t in range(T)]
        return out

    def _signature(self):
        spec = tf.TensorSpec
        if self.strategy in LAYER_STRATEGIES:
            return {"tokens": spec([None, None], tf.int32), "lengths": spec([None], tf.int32),
                    "labels": spec([None], tf.int32)}
        return {"tokens": spec([None, None], tf.int32), "live": spec([None, None, 1], tf.bool),
                "steps": spec([], tf.int32), "labels": spec([None], tf.int32)}

    # --- model ---
    def _step(self, xw_t, h, c, live):
        """One time step: xw_t [B, G] (x_t W_x + b), h, c [B, H], live bool[B, 1] -> (h, c)."""
        z = xw_t + tf.matmul(h, self._vars["W_h"])
        if self.cfg.model == "elman":
            return tf.where(live, tf.tanh(z), h), c
        i, f, g, o = tf.split(z, 4, axis=1)
        c_new = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h_new = tf.sigmoid(o) * tf.tanh(c_new)
        return tf.where(live, h_new, h), tf.where(live, c_new, c)

    def _input_projection(self, tokens):
        """tokens int32[T, B] -> x_t W_x + b for every step, float32[T, B, G]."""
        v = self._vars
        shape = tf.shape(tokens)
        x = tf.gather(v["E"], tokens)
        xw = tf.nn.bias_add(tf.matmul(tf.reshape(x, [-1, self.cfg.embed_dim]), v["W_x"]), v["b"])
        return tf.reshape(xw, [shape[0], shape[1], self._gates])

    def _final_hidden(self, p):
        """The hidden state at each row's last real token, float32[B, H]."""
        if self.strategy == "fused":
            x = tf.gather(self._vars["E"], p["tokens"])
            mask = tf.sequence_mask(p["lengths"], maxlen=tf.shape(p["tokens"])[1])
            return self._layer(x, mask=mask)
        if self.strategy == "plain":
            # no mask: outputs [B, T, H] over the padding too; row b's last real one is exact
            outputs = self._layer(tf.gather(self._vars["E"], p["tokens"]))
            return tf.gather(outputs, p["lengths"] - 1, batch_dims=1)
        B = tf.shape(p["tokens"])[1]
        h = tf.zeros([B, self.cfg.hidden])
        c = tf.zeros([B, self.cfg.hidden]) if self.cfg.model == "lstm" else None
        if self.strategy == "loop":
            xw = self._input_projection(p["tokens"])
            for xw_t, live in zip(tf.unstack(xw), p["live_steps"]):
                h, c = self._step(xw_t, h, c, live)
            return h
        T = tf.shape(p["tokens"])[0]
        if self._tracing == "logits" and self.xla:
            # inference on one padded length per class: the projection step by step
            v = self._vars
            xs = tf.TensorArray(tf.float32, size=T).unstack(tf.gather(v["E"], p["tokens"]))
            project = lambda t: tf.nn.bias_add(tf.matmul(xs.read(t), v["W_x"]), v["b"])  # noqa: E731
        else:
            xws = tf.TensorArray(tf.float32, size=T).unstack(self._input_projection(p["tokens"]))
            project = xws.read
        lives = tf.TensorArray(tf.bool, size=T).unstack(p["live"])
        if c is None:
            def body(t, h):
                return t + 1, self._step(project(t), h, None, lives.read(t))[0]
            state = (tf.constant(0), h)
        else:
            def body(t, h, c):
                return (t + 1,) + self._step(project(t), h, c, lives.read(t))
            state = (tf.constant(0), h, c)
        # maximum_iterations bounds the gradient's accumulators (XLA needs it static).
        out = tf.while_loop(lambda t, *_: t < p["steps"], body, state, maximum_iterations=T)
        return out[1]

    def _logits(self, p):
        return tf.nn.bias_add(tf.matmul(self._final_hidden(p), self._vars["W_o"]), self._vars["b_o"])

    def _loss(self, p):
        return masked_xent(self._logits(p), p["labels"])

    # --- record ---
    def info(self):
        out = super().info()
        if self.xla:
            out["xla_shapes"] = sorted(self._xla_shapes)
        if self.strategy in LAYER_STRATEGIES:
            out["fused_layer"] = type(self._layer).__name__ if self._layer is not None else None
            out["fused_kernel"] = self._fused_kernel()
        if self.strategy == "plain":
            out["plain"] = ("unmasked layer over every padded step (return_sequences), "
                            "output at lengths - 1 gathered")
        return out

    def _fused_kernel(self):
        """Which recurrent kernel the traced layer graph (fused or plain) holds."""
        traced = [name for name in ("train", "grads", "logits") if self._traces.get(name)]
        if not traced:
            return "not traced yet"
        graph = self._fns[traced[0]].get_concrete_function().graph
        if any(op.type.startswith("CudnnRNN") for op in graph.get_operations()):
            return "cuDNN (CudnnRNNV3)"
        where = "GPU: cuDNN not used" if self.device == "gpu" else "CPU: Keras 3 has no fused CPU kernel"
        return "Keras generic tf.while_loop over the cell (%s)" % where
