"""Elman RNN and LSTM on PyTensor (and, through ``Lib``, Theano): ``compiled`` and ``loop``.

Shapes: B batch, T time steps, D embedding, H hidden, G = H (Elman) or 4H
(LSTM, gate blocks [i, f, g, o]), C classes; ``live int8[T, B]`` is 1 on
real tokens (padded steps keep the state).

* ``compiled``: the input projection of every step is one [T*B, D] x [D, G]
  matmul; ``scan`` runs ``z_t = zx_t + h W_h`` and the gates over time.
* ``loop``: ``embed`` once, then a compiled cell per step from Python; the
  backward pass walks the steps in reverse calling the cell's compiled VJP
  and accumulates parameter gradients in NumPy.
* ``fused``: not applicable (no fused RNN operator in PyTensor or Theano).
"""

from __future__ import annotations

import numpy as np

from bench.batches import SeqBatch
from bench.targets import loss_weights

from .common import FLOAT, SymbolicImplementation, mean_xent, vjp


def cell(lib, model, z, state, live):
    """One step from the pre-activation z [B, G]; state (h,) / (h, c); live int8[B].

    H is read from the graph, not baked in as a constant, so one compiled
    graph (and the backends' on-disk caches) serves every hidden size.
    """
    T = lib.T
    keep = live[:, None]
    h = state[0]
    H = h.shape[1]
    if model == "elman":
        return [T.switch(keep, T.tanh(z), h)]
    i, f, g, o = (z[:, k * H:(k + 1) * H] for k in range(4))
    sig = lib.sigmoid
    c_new = sig(f) * state[1] + sig(i) * T.tanh(g)
    h_new = sig(o) * T.tanh(c_new)
    return [T.switch(keep, h_new, h), T.switch(keep, c_new, state[1])]


class RNN(SymbolicImplementation):
    family = "rnn"

    @property
    def _n_state(self):
        return 1 if self.cfg.model == "elman" else 2

    # --- preparation (untimed) ---
    def prepare(self, batch: SeqBatch):
        if not isinstance(batch, SeqBatch):
            raise TypeError("the RNN family takes a SeqBatch, not %s" % type(batch).__name__)
        labels, weights = loss_weights(batch.labels)
        tokens = np.ascontiguousarray(batch.tokens, np.int32)
        live = (np.arange(tokens.shape[1])[:, None] < batch.lengths[None, :]).astype(np.int8)
        return {"inputs": [tokens, live, labels, weights]}

    # --- compiled: one scan over time ---
    def _symbolic(self):
        lib, T, p = self.lib, self.lib.T, self.p
        model = self.cfg.model
        tokens = T.imatrix("tokens")                          # [B, T]
        live = T.matrix("live", dtype="int8")                 # [T, B]
        labels, weights = T.ivector("labels"), T.vector("weights", dtype=FLOAT)
        B, Tn = tokens.shape[0], tokens.shape[1]
        x = p["E"][tokens.T.flatten()]                         # [T*B, D], time-major
        zx = (T.dot(x, p["W_x"]) + p["b"]).reshape((Tn, B, -1))  # [T, B, G]
        zero = T.zeros((B, p["W_h"].shape[0]), dtype=FLOAT)

        def step(zx_t, live_t, *rest):
            state, W_h = list(rest[:-1]), rest[-1]
            return cell(lib, model, zx_t + T.dot(state[0], W_h), state, live_t)

        states = lib.scan(step, sequences=[zx, live], outputs_info=[zero] * self._n_state,
                          non_sequences=[p["W_h"]])
        logits = T.dot(states[0][-1], p["W_o"]) + p["b_o"]
        return {"inputs": [tokens, live, labels, weights], "logits": logits,
                "loss": mean_xent(lib, logits, labels, weights)}

    # --- loop: compiled pieces driven from Python ---
    def _pieces(self):
        def build():
            lib, T, p = self.lib, self.lib.T, self.p
            model = self.cfg.model
            tokens = T.imatrix("tokens")
            x_all = p["E"][tokens.T.flatten()].reshape((tokens.shape[1], tokens.shape[0], -1))
            embed, embed_bwd = vjp(lib, [tokens], [x_all], [], [p["E"]])
            x, live = T.matrix("x", dtype=FLOAT), T.vector("live", dtype="int8")
            state = [T.matrix(n, dtype=FLOAT) for n in ("h", "c")[:self._n_state]]
            z = T.dot(x, p["W_x"]) + T.dot(state[0], p["W_h"]) + p["b"]
            step, step_bwd = vjp(lib, [x] + state + [live], cell(lib, model, z, state, live),
                                 [z], [x] + state + [p["W_x"], p["W_h"], p["b"]])
            h = T.matrix("h_last", dtype=FLOAT)
            labels, weights = T.ivector("labels"), T.vector("weights", dtype=FLOAT)
            logits = T.dot(h, p["W_o"]) + p["b_o"]
            loss = mean_xent(lib, logits, labels, weights)
            head = lib.function([h], logits)
            head_bwd = lib.function([h, labels, weights],
                                    [loss] + lib.grad(loss, [h, p["W_o"], p["b_o"]]))
            return {"embed": embed, "embed_bwd": embed_bwd, "step": step, "step_bwd": step_bwd,
                    "head": head, "head_bwd": head_bwd}
        return self._compiled("pieces", build)

    def _forward_loop(self, prep, keep):
        """Final h [B, H]; with ``keep`` also every step's (inputs, saved z) for backward."""
        f = self._pieces()
        tokens, live = prep["inputs"][0], prep["inputs"][1]
        xs = f["embed"](tokens)[0]                             # [T, B, D]
        B, H = tokens.shape[0], self.cfg.hidden
        state = [np.zeros((B, H), np.float32) for _ in range(self._n_state)]
        tape = []
        for t in range(tokens.shape[1]):
            args = [xs[t]] + state + [live[t]]
            out = f["step"](*args)
            state, z = out[:-1], out[-1]
            if keep:
                tape.append((args, z))
        return state[0], tape

    def _stepwise_logits(self, prep):
        h, _ = self._forward_loop(prep, keep=False)
        return self._pieces()["head"](h)

    def _stepwise_loss_and_grads(self, prep):
        f = self._pieces()
        tokens, _, labels, weights = prep["inputs"]
        h, tape = self._forward_loop(prep, keep=True)
        loss, dh, g_Wo, g_bo = f["head_bwd"](h, labels, weights)
        seeds = [dh] + [np.zeros_like(dh)] * (self._n_state - 1)
        grads = {k: np.zeros(self.value(k).shape, np.float32) for k in ("W_x", "W_h", "b")}
        dxs = np.empty((tokens.shape[1],) + (tokens.shape[0], self.cfg.embed_dim), np.float32)
        n = self._n_state
        for t in range(len(tape) - 1, -1, -1):
            args, z = tape[t]
            out = f["step_bwd"](*(args + [z] + seeds))
            dxs[t], seeds = out[0], list(out[1:1 + n])
            for name, g in zip(("W_x", "W_h", "b"), out[1 + n:]):
                grads[name] += g
        grads["E"] = f["embed_bwd"](tokens, dxs)[0]
        grads["W_o"], grads["b_o"] = g_Wo, g_bo
        return float(loss), grads
