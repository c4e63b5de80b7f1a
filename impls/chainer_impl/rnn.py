"""Elman RNN and LSTM in Chainer: strategies ``loop`` and ``fused``.

Shapes: B batch, T time steps (batch max length), D embedding, H hidden,
G = H (Elman) or 4H (LSTM) gate width, C classes.

* ``loop``: eager Python loop over T steps. The input projection
  ``E[tokens] W_x + b`` is one ``F.linear`` for all steps up front (it does not
  depend on the recurrence); each step adds ``F.linear(h, W_h)`` and applies
  the gates. Padded steps run too (on token 0) but are never read: the
  classified state is gathered at each sequence's last real step, and steps
  after it cannot influence it.
* ``fused``: ``L.NStepRNNTanh`` / ``L.NStepLSTM`` (one layer) on the list of
  unpadded sequences; the link sorts them by length and returns each one's
  final state. On the GPU that is one cuDNN call; on the CPU Chainer runs a
  per-step loop of ``F.linear`` and ``F.lstm`` over the shrinking batch.
* ``compiled``: not applicable (see the package docstring).

Native layout: ``F.linear`` weights are (out, in), the canonical ones (in, out).
The NStep links hold one (H, in) matrix and two biases per gate; Chainer's
n_step_lstm feeds ``F.lstm`` with ``[w2, w0, w1, w3]`` as its (a, i, f, o)
inputs, so w0..w3 are (i, f, a, o) = the canonical (i, f, g, o). (Its
docstring lists w2 as the output gate and w3 as the cell input, which the code
contradicts; tests/test_chainer_specific.py pins the order that runs.) The
hidden-side biases b4..b7 (LSTM) / b1 (Elman) are held at zero and frozen, so
the model has exactly one bias, as the canonical one does.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

import chainer
import chainer.functions as F
import chainer.links as L

from bench.targets import labelled_count

from .common import ChainerImplementation, linear_weight

# NSTEP_LSTM_FROM_CANONICAL[k] = the canonical gate block held in the link's w_k / w_{k+4} / b_k.
NSTEP_LSTM_FROM_CANONICAL = (0, 1, 2, 3)


def _zeros(*shape):
    return chainer.Parameter(np.zeros(shape, np.float32))


class RNN(ChainerImplementation):
    family = "rnn"

    def _build(self):
        cfg = self.cfg
        V, D, H, C = cfg.vocab_size, cfg.embed_dim, cfg.hidden, cfg.num_classes
        G = 4 * H if cfg.model == "lstm" else H
        self.model = chainer.Chain()
        with self.model.init_scope():
            self.model.E = _zeros(V, D)
            self.model.W_o = _zeros(C, H)
            self.model.b_o = _zeros(C)
            if self.strategy == "loop":
                self.model.W_x = _zeros(G, D)
                self.model.W_h = _zeros(G, H)
                self.model.b = _zeros(G)
            elif cfg.model == "lstm":
                self.model.rnn = L.NStepLSTM(1, D, H, 0.0)
            else:
                self.model.rnn = L.NStepRNNTanh(1, D, H, 0.0)
        if self.strategy == "loop":
            return []
        hidden_biases = range(4, 8) if cfg.model == "lstm" else (1,)
        return ["/rnn/0/b%d" % k for k in hidden_biases]

    # --- the one place where canonical <-> native layouts meet ---
    def _load_native(self, p):
        m = self.model
        self._set(m.E, p["E"])
        self._set(m.W_o, linear_weight(p["W_o"]))
        self._set(m.b_o, p["b_o"])
        if self.strategy == "loop":
            self._set(m.W_x, linear_weight(p["W_x"]))
            self._set(m.W_h, linear_weight(p["W_h"]))
            self._set(m.b, p["b"])
            return
        layer = m.rnn[0]
        if self.cfg.model == "elman":
            self._set(layer.w0, linear_weight(p["W_x"]))
            self._set(layer.w1, linear_weight(p["W_h"]))
            self._set(layer.b0, p["b"])
            self._set(layer.b1, np.zeros_like(p["b"]))
            return
        H = self.cfg.hidden
        for k, src in enumerate(NSTEP_LSTM_FROM_CANONICAL):
            cols = slice(src * H, (src + 1) * H)
            self._set(getattr(layer, "w%d" % k), linear_weight(p["W_x"][:, cols]))
            self._set(getattr(layer, "w%d" % (k + 4)), linear_weight(p["W_h"][:, cols]))
            self._set(getattr(layer, "b%d" % k), p["b"][cols])
            self._set(getattr(layer, "b%d" % (k + 4)), np.zeros(H, np.float32))

    def _canonical(self, read):
        m = self.model
        out = {"E": read(m.E)}
        if self.strategy == "loop":
            out.update(W_x=read(m.W_x).T, W_h=read(m.W_h).T, b=read(m.b))
        elif self.cfg.model == "elman":
            layer = m.rnn[0]
            out.update(W_x=read(layer.w0).T, W_h=read(layer.w1).T, b=read(layer.b0))
        else:
            layer = m.rnn[0]
            order = np.argsort(NSTEP_LSTM_FROM_CANONICAL)  # canonical block -> link index
            out["W_x"] = np.concatenate([read(getattr(layer, "w%d" % k)).T for k in order], axis=1)
            out["W_h"] = np.concatenate([read(getattr(layer, "w%d" % (k + 4))).T for k in order],
                                        axis=1)
            out["b"] = np.concatenate([read(getattr(layer, "b%d" % k)) for k in order])
        out["W_o"] = read(m.W_o).T
        out["b_o"] = read(m.b_o)
        return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}

    # --- work ---
    def prepare(self, batch):
        """Host-built arrays for one SeqBatch (device arrays where the model reads them).

        tokens_tm int32[T, B] (loop), flat int32[sum(lengths)] and offsets (fused),
        last int32[B]: row of each sequence's last real step in the [T*B, H] stack
        of loop states, labels int32[B], count int.
        """
        send = self.dev.send
        B = batch.tokens.shape[0]
        lengths = batch.lengths.astype(np.int64)
        ready = dict(B=B, labels=send(batch.labels.astype(np.int32)),
                     count=labelled_count(batch.labels))
        if self.strategy == "loop":
            ready["tokens_tm"] = send(np.ascontiguousarray(batch.tokens.T, np.int32))
            ready["last"] = send(((lengths - 1) * B + np.arange(B)).astype(np.int32))
        else:
            flat = np.concatenate([batch.tokens[i, :lengths[i]] for i in range(B)]).astype(np.int32)
            ready["flat"] = send(flat)
            ready["offsets"] = [int(x) for x in np.cumsum(lengths)[:-1]]
        return SimpleNamespace(**ready)

    def _hidden_loop(self, r):
        """h at each sequence's last real token: Variable[B, H]."""
        m = self.model
        x = F.embed_id(r.tokens_tm, m.E)                       # [T, B, D]
        steps = F.separate(F.linear(x, m.W_x, m.b, n_batch_axes=2), axis=0)  # T x [B, G]
        states = []
        h = c = None
        for z in steps:
            if h is not None:  # h_0 = 0 contributes nothing
                z = z + F.linear(h, m.W_h)
            if self.cfg.model == "elman":
                h = F.tanh(z)
            else:
                i, f, g, o = F.split_axis(z, 4, axis=1)
                c_new = F.sigmoid(i) * F.tanh(g)
                c = c_new if c is None else F.sigmoid(f) * c + c_new
                h = F.sigmoid(o) * F.tanh(c)
            states.append(h)
        return F.get_item(F.concat(states, axis=0), r.last)

    def _hidden_fused(self, r):
        x = F.embed_id(r.flat, self.model.E)                    # [sum(lengths), D]
        xs = F.split_axis(x, r.offsets, axis=0) if r.offsets else [x]
        if self.cfg.model == "lstm":
            hy, _, _ = self.model.rnn(None, None, xs)
        else:
            hy, _ = self.model.rnn(None, xs)
        return hy[0]

    def _logits(self, r):
        h = self._hidden_loop(r) if self.strategy == "loop" else self._hidden_fused(r)
        return F.linear(h, self.model.W_o, self.model.b_o)

    def _forward(self, r):
        return self._logits(r), r.labels, r.count

    def info(self):
        out = super().info()
        if self.strategy == "fused":
            out["fused_link"] = type(self.model.rnn).__name__
        return out
