"""Elman RNN and LSTM in MXNet Gluon: strategies ``loop``, ``fused``, ``compiled``.

Shapes: B batch, T time steps (batch max length), D embedding, H hidden,
G = H (Elman) or 4H (LSTM) gate width, C classes. Time-major ([T, B, ...])
throughout, MXNet's native RNN layout.

* ``loop``: imperative NDArray ops under ``autograd.record``, a Python loop
  over T steps. The input projection ``E[tokens] W_x + b`` is one
  ``FullyConnected`` for all steps up front; each step adds ``h W_h`` and
  applies the gates.
* ``fused``: ``gluon.rnn.RNN(activation='tanh')`` / ``gluon.rnn.LSTM``, run
  imperatively: one fused ``RNN`` operator over the padded [T, B, D] input
  (oneDNN on the CPU, cuDNN on the GPU).
* ``compiled``: the ``loop`` math as ``contrib.foreach`` inside a
  ``HybridBlock``, hybridized (``static_alloc``, not ``static_shape``): one
  cached graph (one ``CachedOp``) shared by every batch shape, whose shapes
  and memory plan are re-inferred when the input shape changes; the weights
  are passed in as inputs.

In every strategy padded steps run on token 0 but are never read:
``SequenceLast`` takes each sequence's state at its own last real step, and
later steps cannot influence it.

Native layout: ``FullyConnected`` and the fused layer hold (out, in) weights.
MXNet's fused LSTM gate blocks are (i, f, c, o) = the canonical (i, f, g, o)
(``FUSED_LSTM_FROM_CANONICAL``). The fused layers have an ``i2h`` and an
``h2h`` bias; the canonical b goes to ``i2h`` and ``h2h`` is held at zero
with ``grad_req='null'``, so the model has exactly one bias.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

import mxnet as mx
from mxnet import gluon, nd

from .common import Labels, MXNetImplementation, linear_weight, split_list

# FUSED_LSTM_FROM_CANONICAL[k] = the canonical gate block stored in the fused layer's block k.
FUSED_LSTM_FROM_CANONICAL = (0, 1, 2, 3)


def _cell(F, model, z, h, c, W_h, G):
    """One step: z [B, G] (input part incl. bias), h/c [B, H] -> (h, c)."""
    z = z + F.FullyConnected(h, W_h, no_bias=True, num_hidden=G)
    if model == "elman":
        return F.tanh(z), c
    i, f, g, o = split_list(z, 4, axis=1)
    c = F.sigmoid(f) * c + F.sigmoid(i) * F.tanh(g)
    return F.sigmoid(o) * F.tanh(c), c


class _Scan(gluon.HybridBlock):
    """tokens [T, B], lengths [B], h0 [B, H], weights -> logits [B, C] via contrib.foreach."""

    def __init__(self, model, G, C, **kw):
        super().__init__(**kw)
        self._model, self._G, self._C = model, G, C

    def hybrid_forward(self, F, tokens, lengths, h0, E, W_x, b, W_h, W_o, b_o):
        G, model = self._G, self._model
        x = F.take(E, tokens)                                            # [T, B, D]
        xw = F.FullyConnected(x, W_x, b, num_hidden=G, flatten=False)    # [T, B, G]

        def step(z, states):
            h, c = _cell(F, model, z, states[0], states[-1], W_h, G)
            return h, [h, c] if model == "lstm" else [h]

        # foreach wants distinct symbols as initial states
        init = [h0, F.zeros_like(h0)] if model == "lstm" else [h0]
        hs, _ = F.contrib.foreach(step, xw, init)                        # [T, B, H]
        last = F.SequenceLast(hs, sequence_length=lengths, use_sequence_length=True)
        return F.FullyConnected(last, W_o, b_o, num_hidden=self._C)


class RNN(MXNetImplementation):
    family = "rnn"

    def _build(self):
        cfg = self.cfg
        V, D, H, C = cfg.vocab_size, cfg.embed_dim, cfg.hidden, cfg.num_classes
        self._G = 4 * H if cfg.model == "lstm" else H
        self._new_param("E", (V, D))
        if self.strategy == "fused":
            if cfg.model == "lstm":
                self._layer = gluon.rnn.LSTM(H, num_layers=1, layout="TNC", input_size=D)
            else:
                self._layer = gluon.rnn.RNN(H, num_layers=1, activation="tanh", layout="TNC",
                                            input_size=D)
            self._layer.initialize(init=mx.init.Zero(), ctx=self.dev)
            for kind in ("i2h_weight", "h2h_weight", "i2h_bias", "h2h_bias"):
                self._params[kind] = getattr(self._layer, "l0_" + kind)
        else:
            self._new_param("W_x", (self._G, D))
            self._new_param("W_h", (self._G, H))
            self._new_param("b", (self._G,))
        self._new_param("W_o", (C, H))
        self._new_param("b_o", (C,))
        self._scan = None
        if self.strategy == "compiled":
            self._scan = _Scan(cfg.model, self._G, C)
            self._scan.hybridize(static_alloc=True)
        return ["h2h_bias"] if self.strategy == "fused" else []

    # --- the one place where canonical <-> native layouts meet ---
    def _gate_order(self):
        return FUSED_LSTM_FROM_CANONICAL if self.cfg.model == "lstm" else (0,)

    def _load_native(self, p):
        self._set("E", p["E"])
        self._set("W_o", linear_weight(p["W_o"]))
        self._set("b_o", p["b_o"])
        if self.strategy != "fused":
            self._set("W_x", linear_weight(p["W_x"]))
            self._set("W_h", linear_weight(p["W_h"]))
            self._set("b", p["b"])
            return
        order = self._gate_order()

        def fused(value):
            blocks = np.split(value, len(order), axis=-1)
            return np.concatenate([blocks[src] for src in order], axis=-1)

        self._set("i2h_weight", linear_weight(fused(p["W_x"])))
        self._set("h2h_weight", linear_weight(fused(p["W_h"])))
        self._set("i2h_bias", fused(p["b"]))
        self._set("h2h_bias", np.zeros_like(p["b"]))

    def _canonical(self, read):
        out = {"E": read("E"), "W_o": read("W_o").T, "b_o": read("b_o")}
        if self.strategy != "fused":
            out.update(W_x=read("W_x").T, W_h=read("W_h").T, b=read("b"))
        else:
            inverse = np.argsort(self._gate_order())

            def canonical(value):
                blocks = np.split(value, len(inverse), axis=-1)
                return np.concatenate([blocks[k] for k in inverse], axis=-1)

            out.update(W_x=canonical(read("i2h_weight").T), W_h=canonical(read("h2h_weight").T),
                       b=canonical(read("i2h_bias")))
        return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}

    # --- work ---
    def prepare(self, batch):
        ctx = self.dev
        B = batch.size
        return SimpleNamespace(
            B=B, T=int(batch.tokens.shape[1]),
            tokens=nd.array(batch.tokens.T, ctx=ctx, dtype="int32"),          # [T, B]
            lengths=nd.array(batch.lengths, ctx=ctx, dtype="float32"),        # [B]
            h0=nd.zeros((B, self.cfg.hidden), ctx=ctx, dtype="float32"),
            y=Labels(batch.labels, ctx))

    def _logits(self, r):
        w = self._w
        if self.strategy == "compiled":
            return self._scan(r.tokens, r.lengths, r.h0, w("E"), w("W_x"), w("b"), w("W_h"),
                              w("W_o"), w("b_o"))
        x = nd.take(w("E"), r.tokens)                                          # [T, B, D]
        if self.strategy == "fused":
            hs = self._layer(x)                                                # [T, B, H]
        else:
            G = self._G
            steps = split_list(nd.FullyConnected(x, w("W_x"), w("b"), num_hidden=G, flatten=False),
                               r.T, axis=0)
            h, c, hs = r.h0, r.h0, []
            for z in steps:
                h, c = _cell(nd, self.cfg.model, z, h, c, w("W_h"), G)
                hs.append(h)
            hs = nd.stack(*hs, axis=0)
        last = nd.SequenceLast(hs, sequence_length=r.lengths, use_sequence_length=True)
        return nd.FullyConnected(last, w("W_o"), w("b_o"), num_hidden=self.cfg.num_classes)

    def _forward(self, r):
        return self._logits(r), r.y

    def info(self):
        out = super().info()
        if self.strategy == "fused":
            out["fused_layer"] = type(self._layer).__name__
        if self.strategy == "compiled":
            out["hybridized"] = "contrib.foreach, static_alloc"
        return out
