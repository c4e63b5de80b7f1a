"""Elman RNN and LSTM in DyNet: strategies ``loop`` and ``fused``.

Shapes (DyNet writes a batched vector as ``((n,), B)``): tokens of step t are
looked up as ``x_t: ((D,), B)``, states are ``h_t, c_t: ((H,), B)``, logits
``((C,), B)``. Every step is computed for the whole batch up to the longest
sequence; each example's classification state is picked from the step of its
last real token, so padding steps never reach the loss or the gradients.
Examples are grouped by length for that pick (one ``pick_batch_elems`` per
distinct length) and put back in batch order with one more pick.
"""

from __future__ import annotations

import numpy as np

from bench.batches import SeqBatch

from .common import DynetImplementation, gate_rows, group_plan, gather, identity, transpose


class Prepared:
    """A SeqBatch as Python lists: ``steps[t]`` = token ids of step t for all B examples."""

    def __init__(self, batch: SeqBatch):
        self.size = batch.size
        self.steps = [[int(v) for v in batch.tokens[:, t]] for t in range(batch.tokens.shape[1])]
        last = batch.lengths.astype(np.int64) - 1
        # every "step" holds all B examples, so offsets are multiples of B
        offsets = np.arange(len(self.steps) + 1) * batch.size
        self.plan = group_plan(last * batch.size + np.arange(batch.size), last, offsets)
        self.labelled = [int(i) for i in np.nonzero(batch.labels >= 0)[0]]
        self.labels = [int(batch.labels[i]) for i in self.labelled]
        self.all_labelled = len(self.labelled) == batch.size


class RNN(DynetImplementation):
    family = "rnn"

    def _build_params(self):
        D, H = self.cfg.embed_dim, self.cfg.hidden
        G = 4 if self.cfg.model == "lstm" else 1
        if self.strategy == "fused":
            if self.cfg.model == "lstm":
                # one bias, no peepholes, no layer norm; forget_bias=0 removes DyNet's
                # default +1 on the forget gate; gate rows are [i, f, o, g]
                self.builder = self.dy.VanillaLSTMBuilder(1, D, H, self.pc, ln_lstm=False,
                                                          forget_bias=0.0)
                W_x, W_h, b = self.builder.get_parameters()[0]
                self.slots["W_x"] = (W_x,) + gate_rows("ifgo", "ifog", H, matrix=True)
                self.slots["W_h"] = (W_h,) + gate_rows("ifgo", "ifog", H, matrix=True)
                self.slots["b"] = (b,) + gate_rows("ifgo", "ifog", H, matrix=False)
            else:
                self.builder = self.dy.SimpleRNNBuilder(1, D, H, self.pc)
                W_x, W_h, b = self.builder.get_parameters()[0]
                self.slots["W_x"] = (W_x,) + transpose()
                self.slots["W_h"] = (W_h,) + transpose()
                self.slots["b"] = (b,) + identity()
            # the builders' biases are their own; dropout is off unless set
            self.builder.disable_dropout()
        else:
            self.W_x = self.pc.add_parameters((G * H, D))
            self.W_h = self.pc.add_parameters((G * H, H))
            self.b = self.pc.add_parameters((G * H,))
            self.slots["W_x"] = (self.W_x,) + transpose()
            self.slots["W_h"] = (self.W_h,) + transpose()
            self.slots["b"] = (self.b,) + identity()

    def prepare(self, batch):
        return Prepared(batch)

    def _states(self, ready: Prepared):
        """Hidden states ``((H,), B)`` of every step."""
        dy = self.dy
        xs = [dy.lookup_batch(self.E, ids) for ids in ready.steps]
        if self.strategy == "fused":
            return self.builder.initial_state().transduce(xs)
        H = self.cfg.hidden
        hs = []
        h = c = None
        for x in xs:
            # h_0 = c_0 = 0, so the first step has no recurrent term
            z = dy.affine_transform([self.b, self.W_x, x] + ([] if h is None else [self.W_h, h]))
            if self.cfg.model == "elman":
                h = dy.tanh(z)
            else:
                i = dy.logistic(dy.pick_range(z, 0, H))
                f = dy.logistic(dy.pick_range(z, H, 2 * H))
                g = dy.tanh(dy.pick_range(z, 2 * H, 3 * H))
                o = dy.logistic(dy.pick_range(z, 3 * H, 4 * H))
                c = dy.cmult(i, g) if c is None else dy.cmult(f, c) + dy.cmult(i, g)
                h = dy.cmult(o, dy.tanh(c))
            hs.append(h)
        return hs

    def _graph(self, ready: Prepared, loss: bool):
        dy = self.dy
        last = gather(dy, self._states(ready), ready.plan)   # ((H,), B) in batch order
        logits = self.classify(last)
        if not loss:
            return logits
        if not ready.labelled:
            return None
        if not ready.all_labelled:
            logits = dy.pick_batch_elems(logits, ready.labelled)
        return self.batched_loss(logits, ready.labels) * (1.0 / len(ready.labelled))
