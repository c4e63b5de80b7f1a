"""Elman RNN and LSTM in Paddle: strategies ``loop``, ``fused`` and ``compiled``.

Shapes: B batch, T time steps (Tb after padding to a multiple of 8), D
embedding, H hidden, G = H (Elman) or 4H (LSTM, gate blocks [i, f, g, o]), C classes.

* ``loop``: eager; ``x_t W_x + h W_h + b`` and the gates per step, padded steps
  keep the state (``live_t`` [B, 1]).
* ``compiled``: ``paddle.jit.to_static`` programs of BLOCK = 8 unrolled steps
  (their input projection one ``[B*8, D] x [D, G]`` matmul), chained by a
  Python loop over blocks; time is padded to a multiple of 8, so programs
  depend on the batch size only, never on the length: one for inference and,
  for training, two (Paddle keys a program on its inputs' ``stop_gradient``,
  set on the first block's zero state and not on the later blocks' states).
  Paddle 3.3.1 cannot compile the whole loop:
  a ``for`` over a tensor-valued range becomes a PIR ``while`` whose backward
  fails ("The variable middle_0 should exist"), and unrolling every length
  costs a program per length (~15 s to build 40 LSTM steps here; a 1000-step
  sequence exhausted 12 GB of host memory).
* ``fused``: ``paddle.nn.SimpleRNN`` (tanh) / ``paddle.nn.LSTM``, one ``rnn``
  operator per batch; ``sequence_length`` makes it keep the state at the last
  real token.

Fused layout (Paddle, like cuDNN): ``weight_ih_l0 [G, D] = W_x.T``,
``weight_hh_l0 [G, H] = W_h.T``, same gate order [i, f, g, o];
``bias_ih_l0 = b`` and ``bias_hh_l0 = 0``, kept out of the optimiser so that a
step moves the sum exactly as it moves the canonical ``b``.
"""

from __future__ import annotations

import numpy as np

from bench.batches import SeqBatch, round_up

from .common import PaddleImplementation, param_layer

BLOCK = 8  # steps per static program; time is padded to a multiple of it
_FUSED = {"weight_ih": "rnn.weight_ih_l0", "weight_hh": "rnn.weight_hh_l0",
          "bias_ih": "rnn.bias_ih_l0", "bias_hh": "rnn.bias_hh_l0"}


def cell(model, z, state, live):
    """One step from the pre-activation z [B, G]; state (h,) or (h, c), each [B, H]."""
    import paddle
    import paddle.nn.functional as F
    h = state[0]
    if model == "elman":
        return (paddle.where(live, paddle.tanh(z), h),)
    i, f, g, o = paddle.split(z, 4, axis=-1)
    c_new = F.sigmoid(f) * state[1] + F.sigmoid(i) * paddle.tanh(g)
    h_new = F.sigmoid(o) * paddle.tanh(c_new)
    return paddle.where(live, h_new, h), paddle.where(live, c_new, state[1])


class RNN(PaddleImplementation):
    family = "rnn"

    @property
    def frozen(self):
        # Paddle's rnn backward kernel needs a gradient slot for every weight,
        # so bias_hh stays differentiable and is left out of the optimiser.
        return (_FUSED["bias_hh"],) if self.strategy == "fused" else ()

    def _build(self):
        import paddle
        cfg = self.cfg
        V, D, H, C = cfg.vocab_size, cfg.embed_dim, cfg.hidden, cfg.num_classes
        G = H if cfg.model == "elman" else 4 * H
        head = {"E": (V, D), "W_o": (H, C), "b_o": (C,)}
        if self.strategy != "fused":
            return param_layer(dict(head, W_x=(D, G), W_h=(H, G), b=(G,)))
        if cfg.model == "elman":
            rnn = paddle.nn.SimpleRNN(D, H, activation="tanh")
        else:
            rnn = paddle.nn.LSTM(D, H)
        return param_layer(head, {"rnn": rnn})

    # --- the one place where canonical meets Paddle's fused layout ---
    def _to_native(self, p):
        if self.strategy != "fused":
            return dict(p)
        out = {k: p[k] for k in ("E", "W_o", "b_o")}
        out[_FUSED["weight_ih"]] = p["W_x"].T
        out[_FUSED["weight_hh"]] = p["W_h"].T
        out[_FUSED["bias_ih"]] = p["b"]
        out[_FUSED["bias_hh"]] = np.zeros_like(p["b"])
        return out

    def _to_canonical(self, n):
        if self.strategy != "fused":
            return dict(n)
        out = {k: n[k] for k in ("E", "W_o", "b_o")}
        out["W_x"] = n[_FUSED["weight_ih"]].T
        out["W_h"] = n[_FUSED["weight_hh"]].T
        out["b"] = n[_FUSED["bias_ih"]] + n[_FUSED["bias_hh"]]
        return out

    # --- preparation (untimed) ---
    def prepare(self, batch: SeqBatch):
        if not isinstance(batch, SeqBatch):
            raise TypeError("the RNN family takes a SeqBatch, not %s" % type(batch).__name__)
        tokens, lengths = batch.tokens, batch.lengths
        out = self._targets(batch.labels)
        T = tokens.shape[1]
        live = (np.arange(T)[:, None] < lengths[None, :])[:, :, None]   # [T, B, 1]
        if self.strategy == "loop":
            out["tokens"] = self._tensor(tokens, np.int64)
            out["live"] = [self._tensor(live[t], bool) for t in range(T)]
        elif self.strategy == "fused":
            out["tokens"] = self._tensor(tokens, np.int64)
            out["lengths"] = self._tensor(lengths, np.int32)
        else:
            Tb = round_up(T, BLOCK)   # padded time length: whole blocks
            padded = np.zeros((tokens.shape[0], Tb), np.int64)
            padded[:, :T] = tokens
            live_b = np.zeros((Tb,) + live.shape[1:], bool)
            live_b[:T] = live
            out["blocks"] = [(self._tensor(padded[:, k:k + BLOCK], np.int64),
                              self._tensor(live_b[k:k + BLOCK], bool))
                             for k in range(0, Tb, BLOCK)]
        return out

    # --- the three ways to the last hidden state [B, H] ---
    def _hidden_points(self, prep):
        self.calls[self.strategy] += 1
        if self.strategy == "loop":
            return self._hidden_loop(prep)
        if self.strategy == "fused":
            return self._hidden_fused(prep)
        return self._hidden_blocks(prep)

    def _initial(self, B):
        import paddle
        zeros = paddle.zeros([B, self.cfg.hidden], "float32")
        return (zeros,) if self.cfg.model == "elman" else (zeros, zeros)

    def _hidden_loop(self, prep):
        import paddle
        import paddle.nn.functional as F
        L = self.layer
        x = F.embedding(prep["tokens"], L.E)                  # [B, T, D], one lookup
        state = self._initial(x.shape[0])
        for x_t, live_t in zip(paddle.unbind(x, axis=1), prep["live"]):
            z = x_t @ L.W_x + state[0] @ L.W_h + L.b
            state = cell(self.cfg.model, z, state, live_t)
        return state[0]

    def _hidden_blocks(self, prep):
        model, n = self.cfg.model, 1 if self.cfg.model == "elman" else 2

        def block(L, tokens, live, *state):
            """tokens int64[B, 8], live bool[8, B, 1], state [B, H] each -> state."""
            import paddle.nn.functional as F
            zx = F.embedding(tokens, L.E) @ L.W_x + L.b      # [B, 8, G]
            state = list(state)
            for t in range(BLOCK):
                state = cell(model, zx[:, t] + state[0] @ L.W_h, state, live[t])
            return tuple(state)

        fn = self._static("block", block)
        state = self._initial(prep["blocks"][0][0].shape[0])
        for tokens, live in prep["blocks"]:
            state = fn(tokens, live, *state)
            state = (state,) if n == 1 and not isinstance(state, (tuple, list)) else state
        return state[0]

    def _hidden_fused(self, prep):
        import paddle.nn.functional as F
        x = F.embedding(prep["tokens"], self.layer.E)        # [B, T, D]
        _, final = self.layer.rnn(x, sequence_length=prep["lengths"])
        h = final if self.cfg.model == "elman" else final[0]  # [1, B, H]
        return h[0]
