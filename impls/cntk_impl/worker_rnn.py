"""Elman RNN and LSTM in the CNTK worker: the graphs of ``loop`` and ``fused`` (see ``rnn.py``).

The worker's counterpart of ``rnn.py``, which prepares the feeds: ``y``, ``w``,
``tok`` and, for ``loop``, ``live``; ``fused`` gets ``lengths`` and cuts each
sequence to its length here, for CNTK's sequence axis.
"""

import numpy as np

from worker_common import C, Model, Ready, cut, xent


def lstm_cell(z, c_prev, H):
    """z [.., 4H] blocks [i, f, g, o] -> (h, c)."""
    s = C.sigmoid(z)
    i, f, o = cut(s, 0, H), cut(s, H, 2 * H), cut(s, 3 * H, 4 * H)
    g = C.tanh(cut(z, 2 * H, 3 * H))
    c = i * g if c_prev is None else f * c_prev + i * g
    return o * C.tanh(c), c


# LSTM gate blocks: canonical [i, f, g, o]; CNTK's layers.LSTM computes
# [i, g, f, o] (cntk/layers/blocks.py: it, bit, ft, ot). The permutation is its own inverse.
_CNTK_LSTM_BLOCKS = (0, 2, 1, 3)


def _permute_blocks(a, H):
    return np.concatenate([a[..., k * H:(k + 1) * H] for k in _CNTK_LSTM_BLOCKS], axis=-1)


class RNNModel(Model):
    FUSED_CELL = ("W_x", "W_h", "b")   # held by CNTK's own recurrent block under ``fused``

    def __init__(self, spec):
        super(RNNModel, self).__init__(spec)
        if self.strategy == "fused":   # one graph serves every batch: built with the model
            self._cached(self.graphs, "fused", None)

    # --- parameters ---
    def _parameters(self, skip=()):
        if self.strategy != "fused":
            return super(RNNModel, self)._parameters(skip)
        params = super(RNNModel, self)._parameters(self.FUSED_CELL)
        params.update(self._fused_cell())
        return params

    def _fused_cell(self):
        """CNTK's own recurrent block (``self.recurrence``); its W, H, b replace W_x, W_h, b."""
        if self.model == "lstm":
            block = C.layers.LSTM(self.H, init=0.0, init_bias=0.0)
        else:
            block = C.layers.RNNStep(self.H, activation=C.tanh, init=0.0, init_bias=0.0)
        self.recurrence = C.layers.Recurrence(block)
        probe = C.sequence.input_variable(self.D)
        out = self.recurrence(probe)   # infers W's input dimension
        by_name = {p.name: p for p in out.parameters}
        return [(canon, by_name[layer]) for canon, layer in (("W_x", "W"), ("W_h", "H"), ("b", "b"))]

    def _to_layout(self, name, value):
        if self.strategy == "fused" and self.model == "lstm" and name in self.FUSED_CELL:
            return _permute_blocks(value, self.H)
        return value

    _from_layout = _to_layout   # a block permutation that is its own inverse

    # --- graphs ---
    def _ready(self, feeds):
        if self.strategy == "fused":   # CNTK's sequence axis: one array per sequence
            lengths = feeds.pop("lengths")
            feeds["tok"] = [row[:n, None] for row, n in zip(feeds["tok"], lengths)]
            return Ready("fused", feeds)
        return Ready(("loop", feeds["tok"].shape[1]), feeds)

    def _build(self, key, ready):
        return self._build_fused() if self.strategy == "fused" else self._build_loop(key[1])

    def _rnn_io(self):
        return {"y": C.input_variable(self.C, name="y"), "w": C.input_variable(1, name="w")}

    def _build_loop(self, T):
        """The time loop unrolled in Python: one cell per step, padded steps keep h (and c)."""
        p, H = self.params, self.H
        G = 4 * H if self.model == "lstm" else H
        inputs = self._rnn_io()
        inputs["tok"] = C.input_variable(T, name="tok")
        inputs["live"] = C.input_variable((T, 1), name="live")
        xp = C.times(C.gather(p["E"], inputs["tok"]), p["W_x"]) + p["b"]     # [T, G]
        h = c = None
        for t in range(T):
            z = C.reshape(C.slice(xp, 0, t, t + 1), (G,))
            if h is not None:
                z = z + C.times(h, p["W_h"])
            if self.model == "lstm":
                h_new, c_new = lstm_cell(z, c, H)
            else:
                h_new, c_new = C.tanh(z), None
            if t == 0:       # every sequence has a first token
                h, c = h_new, c_new
            else:
                live = C.slice(inputs["live"], 0, t, t + 1)
                h = C.element_select(live, h_new, h)
                if c is not None:
                    c = C.element_select(live, c_new, c)
        logits = self._head(h)
        return self._finish(inputs, logits, xent(logits, inputs["y"], inputs["w"]))

    def _build_fused(self):
        """layers.Recurrence over CNTK's sequence axis; sequence.last is the last real token."""
        inputs = self._rnn_io()
        inputs["tok"] = C.sequence.input_variable(1, name="tok")
        x = C.reshape(C.gather(self.params["E"], inputs["tok"]), (self.D,))
        h = C.sequence.last(self.recurrence(x))
        logits = self._head(h)
        return self._finish(inputs, logits, xent(logits, inputs["y"], inputs["w"]))

    def _detail(self):
        if self.strategy == "fused":
            return ("layers.Recurrence(layers.%s) over CNTK's dynamic sequence axis, "
                    "sequence.last" % ("LSTM" if self.model == "lstm" else "RNNStep(tanh)"))
        return ("time loop unrolled in Python into one static graph per padded length T "
                "(element_select keeps h/c on padded steps), batch on CNTK's batch axis")
