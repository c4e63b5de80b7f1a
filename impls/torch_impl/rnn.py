"""Elman RNN and LSTM in PyTorch: strategies ``loop``, ``fused``, ``compiled`` and ``plain``.

Shapes: B examples, T time steps (padded), D embedding, H hidden, G gate
width (H for Elman, 4H for the LSTM, blocks [i, f, g, o]).

* ``loop``: ``xp = E[tokens] @ W_x + b`` for all steps in one product
  ([T, B, G]; the input projection has no recurrence, cuDNN hoists it the
  same way), then an eager Python loop over t computing
  ``xp[t] + h @ W_h`` and the cell. Steps past an example's length are
  masked with ``where`` so h (and c) stay at the last real token.
* ``fused``: ``nn.RNN(tanh)`` / ``nn.LSTM``, on the padded batch when real tokens
  fill at least ``PADDED_MIN_FILL`` of it (each example's output at its last real
  token gathered: exact, as ``plain``), else on a ``PackedSequence`` built in
  ``prepare`` (embeddings gathered straight into packed order), so padded steps
  are never computed and ``h_n`` is the state at each last real token. Packing
  costs more than it saves on a length-bucketed batch: on the quick cell (SST,
  batch 25, 2 threads) the packed LSTM trained at 1090 ex/s against 1697 padded.
* ``plain`` (the yardstick, ``bench.interface``): what a user writes first, the same
  ``nn.RNN`` / ``nn.LSTM`` run over the whole padded [T, B, D] batch, each
  example's output at its last real token gathered (exact: the recurrence is
  unidirectional, so padding after a token cannot change its output).
* ``compiled``: the ``loop`` recurrence (input projection included) under
  ``torch.compile``, unrolled over chunks of ``CHUNK`` steps. ``prepare``
  sorts the batch longest first and pads T to a multiple of ``CHUNK``; each
  chunk runs only the examples still going at its first step (a prefix of
  the sorted batch: packing at chunk granularity, so the work is close to
  ``fused``'s), masked like ``loop`` inside the chunk. Shapes are dynamic, so
  one graph per grad mode serves every length, batch and model size (sizes
  0/1 specialise, as dynamo does).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from bench.batches import SeqBatch
from bench.targets import labelled_count

from .common import (FUSED_FROZEN, TorchImplementation, compile_scope, fused_from_canonical,
                     fused_grads_to_canonical, fused_to_canonical, long_tensor)

# Steps per compiled call. Compile time grows faster than linearly in the
# unroll length (8: a few seconds, 16: ~5x that, 32: minutes on 2 cores),
# while the per-call overhead it saves is small next to a step's matmul.
CHUNK = 8
LAYER_STRATEGIES = ("fused", "plain")   # strategies that run torch's own nn.RNN / nn.LSTM
# fused runs the padded batch when real tokens fill at least this share of it, else packs it
PADDED_MIN_FILL = 0.6


@dataclass
class PreparedSeq:
    labels: torch.Tensor              # int64[B]
    count: float                      # labelled examples, at least 1
    tokens: Optional[torch.Tensor] = None   # int64[T', B], time-major (all but packed fused)
    live: Optional[torch.Tensor] = None     # bool[T', B, 1]: step t is a real token
    last: Optional[torch.Tensor] = None     # int64[B]: last real step (plain, padded fused)
    first_masked: int = 0             # steps before this one are real for every example
    active: Optional[list] = None     # compiled: examples still running in each chunk
    live_chunks: Optional[list] = None  # compiled: per chunk, bool[CHUNK, active, 1]
    packed_tokens: Optional[torch.Tensor] = None  # int64[sum(lengths)] (fused)
    batch_sizes: Optional[torch.Tensor] = None    # int64[T] on the CPU, as torch wants
    sorted_indices: Optional[torch.Tensor] = None
    unsorted_indices: Optional[torch.Tensor] = None


# --- one time step, shared by loop and compiled ---
# addmm folds the input term into the product; gate blocks come from chunk,
# whose backward is one cat (a slice's backward zero-fills the full width).

def elman_step(xp_t, h, c, W_h):
    return torch.tanh(torch.addmm(xp_t, h, W_h)), c


def lstm_step(xp_t, h, c, W_h):
    z = torch.addmm(xp_t, h, W_h)
    i, f, _, o = torch.sigmoid(z).chunk(4, 1)   # one kernel for the three sigmoid gates
    g = torch.tanh(z.chunk(4, 1)[2])
    c_new = torch.addcmul(i * g, f, c)
    return o * torch.tanh(c_new), c_new


STEPS = {"elman": elman_step, "lstm": lstm_step}


def _elman_chunk(x, live, h, W_x, b, W_h):
    # x [K, n, D], live [K, n, 1], h [n, H]
    xp = x @ W_x + b
    for t in range(x.shape[0]):
        h = torch.where(live[t], elman_step(xp[t], h, None, W_h)[0], h)
    return h


def _lstm_chunk(x, live, h, c, W_x, b, W_h):
    xp = x @ W_x + b
    for t in range(x.shape[0]):
        h_new, c_new = lstm_step(xp[t], h, c, W_h)
        h = torch.where(live[t], h_new, h)
        c = torch.where(live[t], c_new, c)
    return h, c


_COMPILED = {}


def compiled_chunk(model: str):
    """One compiled function per model for the whole process: instances share
    its graphs, so a second instance (tests, repeated cells) does not recompile."""
    if model not in _COMPILED:
        fn = {"elman": _elman_chunk, "lstm": _lstm_chunk}[model]
        _COMPILED[model] = torch.compile(fn, dynamic=True)
    return _COMPILED[model]


class RNN(TorchImplementation):
    family = "rnn"

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        D, H = cfg.embed_dim, cfg.hidden
        if strategy in LAYER_STRATEGIES:
            cls = torch.nn.LSTM if cfg.model == "lstm" else torch.nn.RNN
            kwargs = {} if cfg.model == "lstm" else {"nonlinearity": "tanh"}
            self.layer = cls(D, H, num_layers=1, bias=True, batch_first=False, **kwargs).to(self.dev)
            canon = self._canonical_parameters()
            self.params = OrderedDict([("E", canon["E"])]
                                      + [(n, getattr(self.layer, n)) for n in
                                         ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                          "bias_hh_l0")]
                                      + [("W_o", canon["W_o"]), ("b_o", canon["b_o"])])
            self.frozen = FUSED_FROZEN
        else:
            self.params = self._canonical_parameters()
        self._step = STEPS[cfg.model]
        self._chunk = compiled_chunk(cfg.model) if strategy == "compiled" else None

    # --- layout (fused only differs) ---
    def _split(self, p):
        rest = {k: p[k] for k in ("E", "W_o", "b_o")}
        return rest, {k: v for k, v in p.items() if k not in rest}

    def _to_layout(self, p):
        if self.strategy not in LAYER_STRATEGIES:
            return p
        rest, cell = self._split(p)
        return {**rest, **fused_from_canonical(cell)}

    def _from_layout(self, t):
        if self.strategy not in LAYER_STRATEGIES:
            return t
        rest, cell = self._split(t)
        return {**rest, **fused_to_canonical(cell)}

    def _grads_from_layout(self, g):
        if self.strategy not in LAYER_STRATEGIES:
            return g
        rest, cell = self._split(g)
        return {**rest, **fused_grads_to_canonical(cell)}

    # --- data ---
    def prepare(self, batch: SeqBatch) -> PreparedSeq:
        if not isinstance(batch, SeqBatch):
            raise TypeError("the RNN family needs a SeqBatch, got %s" % type(batch).__name__)
        dev = self.dev
        tokens = np.asarray(batch.tokens)
        lengths = np.asarray(batch.lengths, np.int64)
        B, T = tokens.shape
        out = PreparedSeq(labels=long_tensor(batch.labels, dev),
                          count=float(labelled_count(batch.labels)))
        # Longest first (stable, so ties keep batch order): fused packs in this
        # order, compiled drops finished examples from the end of the batch.
        order = np.argsort(-lengths, kind="stable")
        padded = self.strategy == "plain" or (
            self.strategy == "fused" and lengths.sum() >= PADDED_MIN_FILL * B * T)
        if padded:
            out.tokens = long_tensor(tokens.T, dev)
            out.last = long_tensor(lengths - 1, dev)
            return out
        if self.strategy == "fused":
            running = np.arange(T)[:, None] < lengths[order][None, :]       # [T, B]
            out.packed_tokens = long_tensor(tokens[order].T[running], dev)
            out.batch_sizes = torch.as_tensor(running.sum(axis=1), dtype=torch.int64)
            out.sorted_indices = long_tensor(order, dev)
            out.unsorted_indices = long_tensor(np.argsort(order), dev)
            return out
        steps = T
        if self.strategy == "compiled":
            steps = -(-T // CHUNK) * CHUNK
            tokens, lengths = tokens[order], lengths[order]
            out.unsorted_indices = long_tensor(np.argsort(order), dev)
            out.active = [int((lengths > s).sum()) for s in range(0, steps, CHUNK)]
        tm = np.zeros((steps, B), np.int64)
        tm[:T] = tokens.T
        out.tokens = long_tensor(tm, dev)
        live = np.arange(steps)[:, None] < lengths[None, :]           # [T', B]
        out.live = torch.as_tensor(live, device=dev).unsqueeze(-1)
        out.first_masked = int(lengths.min())
        if self.strategy == "compiled":
            # fresh contiguous tensors: a view would give dynamo a different
            # stride pattern to guard on, and so a graph of its own
            out.live_chunks = [
                torch.as_tensor(live[k * CHUNK:(k + 1) * CHUNK, :n].copy(),
                                device=dev).unsqueeze(-1)
                for k, n in enumerate(out.active)]
        return out

    # --- forward ---
    def _final_hidden(self, ready: PreparedSeq) -> torch.Tensor:
        p = self.params
        if ready.last is not None:   # plain, and fused on a well-filled batch
            outputs, _ = self.layer(F.embedding(ready.tokens, p["E"]))        # [T, B, H]
            return outputs[ready.last, torch.arange(outputs.shape[1], device=outputs.device)]
        if self.strategy == "fused":
            x = F.embedding(ready.packed_tokens, p["E"])
            packed = PackedSequence(x, ready.batch_sizes, ready.sorted_indices,
                                    ready.unsorted_indices)
            _, state = self.layer(packed)
            h_n = state[0] if isinstance(state, tuple) else state
            return h_n[0]
        if self.strategy == "compiled":
            return self._compiled_hidden(ready)
        steps, B = ready.tokens.shape
        xp = F.embedding(ready.tokens, p["E"]) @ p["W_x"] + p["b"]    # [T, B, G]
        h = xp.new_zeros(B, self.cfg.hidden)
        c = h if self.cfg.model == "lstm" else None
        W_h, step = p["W_h"], self._step
        for t in range(steps):
            h_new, c_new = step(xp[t], h, c, W_h)
            if t < ready.first_masked:
                h, c = h_new, c_new
            else:
                live = ready.live[t]
                h = torch.where(live, h_new, h)
                if c is not None:
                    c = torch.where(live, c_new, c)
        return h

    def _compiled_hidden(self, ready: PreparedSeq) -> torch.Tensor:
        p = self.params
        lstm = self.cfg.model == "lstm"
        x = F.embedding(ready.tokens, p["E"])                          # [T', B, D], sorted
        B = x.shape[1]
        # Every chunk must see the same requires_grad on its state, or the
        # first chunk (zero state, a constant) gets a graph of its own.
        grad = torch.is_grad_enabled()
        h = x.new_zeros(B, self.cfg.hidden).requires_grad_(grad)
        c = x.new_zeros(B, self.cfg.hidden).requires_grad_(grad)
        done = []   # final states of examples that ended, later chunks first
        weights = (p["W_x"], p["b"], p["W_h"])
        with compile_scope():
            for k, n in enumerate(ready.active):
                # Inputs are fresh tensors, never views: dynamo guards on a
                # view's base and strides, so views would add graphs.
                if n < h.shape[0]:
                    done.append(h[n:])
                    h, c = h[:n].clone(), c[:n].clone()
                s = k * CHUNK
                xk, live = x[s:s + CHUNK, :n].clone(), ready.live_chunks[k]
                if lstm:
                    h, c = self._chunk(xk, live, h, c, *weights)
                else:
                    h = self._chunk(xk, live, h, *weights)
        h = torch.cat([h] + done[::-1]) if done else h
        return h.index_select(0, ready.unsorted_indices)

    def _points(self, ready):
        return self._final_hidden(ready), ready.labels, ready.count

    def _logits_rows(self, ready):
        return self._final_hidden(ready)

    def info(self):
        out = super().info()
        out["strategy_detail"] = {
            "loop": "eager time loop, input projection hoisted, where-masked padding",
            "fused": "torch.nn.%s on the padded batch when real tokens fill >= %g of it, "
                     "else on a PackedSequence" % ("LSTM" if self.cfg.model == "lstm" else "RNN",
                                                   PADDED_MIN_FILL),
            "plain": "torch.nn.%s over the padded batch, last real outputs gathered"
                     % ("LSTM" if self.cfg.model == "lstm" else "RNN"),
            "compiled": "torch.compile(dynamic=True) of %d-step chunks over the examples "
                        "still running (sorted by length), T padded to a multiple of %d"
                        % (CHUNK, CHUNK),
        }[self.strategy]
        if self.strategy in LAYER_STRATEGIES and self.dev.type == "cuda":
            out["cudnn_rnn"] = bool(torch.backends.cudnn.enabled
                                    and torch.backends.cudnn.is_available())
        return out
