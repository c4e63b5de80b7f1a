"""Elman RNN and LSTM in Caffe: strategies ``loop`` and ``fused`` (LSTM only).

Shapes: B examples, T time steps (padded), D embedding, H hidden, G gate
width (H for Elman, 4H for the LSTM). Tokens enter time-major, ``[T, B]``;
every step's hidden state is kept, the ``[T, B, H]`` stack is viewed as
``[T*B, H]`` and row ``(len_b - 1) * B + b`` is example b's classification
point (``BatchReindex``, whose backward scatters the gradient back). Steps
past an example's end are computed and never read, so padding cannot change
a result.

* ``loop``: an unrolled net per T (see ``loop_net``): ``Embed``, one input
  projection ``x W_x + b`` for all steps (``InnerProduct`` on axis 2),
  ``Slice`` into steps, then per step ``h_{t-1} W_h`` (``InnerProduct``
  sharing ``W_h``), ``Eltwise`` sum and the cell (``TanH``; or ``Slice`` into
  the [i, f, g, o] blocks, ``Sigmoid``/``TanH`` and ``Eltwise`` products).
* ``fused``: Caffe's ``LSTM`` layer (see ``fused_net``), a net per T.

Nets are built on the first call with a new T (cached; the batch size is
free: Caffe reshapes every layer on each forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from bench.batches import SeqBatch

from .common import CaffeImplementation, NetHandle, Proto

# --- canonical [i, f, g, o] <-> Caffe LSTM [i, f, o, g] (the only place that knows it) ---

CAFFE_GATES = (0, 1, 3, 2)   # Caffe block k holds canonical block CAFFE_GATES[k]
FUSED_NAMES = ("W_x", "b", "W_h")


def _blocks(a: np.ndarray, axis: int) -> np.ndarray:
    parts = np.split(a, 4, axis=axis)
    return np.concatenate([parts[k] for k in CAFFE_GATES], axis=axis)


def fused_from_canonical(p: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Canonical ``W_x [D, 4H], W_h [H, 4H], b [4H]`` -> Caffe ``W_xc [4H, D], b_c, W_hc [4H, H]``."""
    return {"W_xc": np.ascontiguousarray(_blocks(p["W_x"], 1).T),
            "b_c": np.ascontiguousarray(_blocks(p["b"], 0)),
            "W_hc": np.ascontiguousarray(_blocks(p["W_h"], 1).T)}


def fused_to_canonical(c: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    # the permutation (0, 1, 3, 2) is its own inverse
    return {"W_x": np.ascontiguousarray(_blocks(c["W_xc"].T, 1)),
            "b": np.ascontiguousarray(_blocks(c["b_c"], 0)),
            "W_h": np.ascontiguousarray(_blocks(c["W_hc"].T, 1))}


FUSED_BLOBS = ("W_xc", "b_c", "W_hc")   # the LSTM layer's blobs, in Caffe's order


# --- nets ---

def _head(p: Proto, cfg, hs: str) -> None:
    """[T, B, H] states -> each example's last real step -> logits -> loss."""
    flat = p.reshape(hs, "h_flat", (-1, cfg.hidden))
    final = p.gather(flat, p.input("sel", (1,)), "h_final")
    p.ip("out", final, "logits", cfg.num_classes, ("W_o", "b_o"))
    p.softmax_loss("logits", p.input("labels", (1,)))


def loop_net(cfg, steps: int) -> Proto:
    """The unrolled Elman / LSTM net for ``steps`` time steps (any batch size)."""
    lstm = cfg.model == "lstm"
    H = cfg.hidden
    G = 4 * H if lstm else H
    p = Proto("%s_loop_T%d" % (cfg.model, steps))
    x = p.embed("embed", p.input("tokens", (steps, 1)), "x", cfg.vocab_size, cfg.embed_dim)
    xp = p.ip("xproj", x, "xp", G, ("W_x", "b"), axis=2)                # [T, B, G]
    xps = ["xp_%d" % t for t in range(steps)] if steps > 1 else [xp]
    if steps > 1:
        p.slice(xp, xps, axis=0)
    hs = []
    h = c = None
    for t in range(steps):
        if t == 0:
            z = xps[0]                                                  # h_0 = 0
        else:
            hp = p.ip("hproj_%d" % t, h, "hp_%d" % t, G, ("W_h",), axis=2)
            z = p.eltwise("SUM", [xps[t], hp], "z_%d" % t)
        if not lstm:
            h = p.act("TanH", z, "h_%d" % t)
        else:
            zi, zf, zg, zo = ("%s_%d" % (k, t) for k in ("zi", "zf", "zg", "zo"))
            p.slice(z, [zi, zf, zg, zo], axis=2)
            i = p.act("Sigmoid", zi, "i_%d" % t)
            g = p.act("TanH", zg, "g_%d" % t)
            o = p.act("Sigmoid", zo, "o_%d" % t)
            ig = p.eltwise("PROD", [i, g], "ig_%d" % t)
            if t == 0:
                p.silence(zf)                                           # c_0 = 0
                c = ig
            else:
                f = p.act("Sigmoid", zf, "f_%d" % t)
                fc = p.eltwise("PROD", [f, c], "fc_%d" % t)
                c = p.eltwise("SUM", [ig, fc], "c_%d" % t)
            tc = p.act("TanH", c, "tc_%d" % t)
            h = p.eltwise("PROD", [o, tc], "h_%d" % t)
        hs.append(h)
    stack = p.concat(hs, "hs", axis=0) if steps > 1 else hs[0]
    _head(p, cfg, stack)
    return p


def fused_net(cfg, steps: int) -> Proto:
    """Caffe's LSTM layer over ``steps`` time steps; ``cont`` is 0 at t = 0, else 1."""
    p = Proto("lstm_fused_T%d" % steps)
    x = p.embed("embed", p.input("tokens", (steps, 1)), "x", cfg.vocab_size, cfg.embed_dim)
    cont = p.input("cont", (steps, 1))
    p.add("LSTM", "lstm", [x, cont], ["hs"],
          body="recurrent_param { num_output: %d }" % cfg.hidden)
    _head(p, cfg, "hs")
    return p


@dataclass
class PreparedSeq:
    steps: int
    tokens: np.ndarray                 # float32 [T, B], time-major
    sel: np.ndarray                    # float32 [B]: (len - 1) * B + b
    labels: np.ndarray                 # float32 [B], -1 = unlabelled
    cont: Optional[np.ndarray] = None  # float32 [T, B] (fused)


class RNN(CaffeImplementation):
    family = "rnn"

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.nets: Dict[int, NetHandle] = {}
        # fused: the LSTM layer's weights, Caffe layout, as the master copy
        self._fused = ({k: np.zeros((1,), np.float32) for k in FUSED_BLOBS}
                       if strategy == "fused" else None)

    # --- where the parameters live ---
    def _store_names(self):
        names = super()._store_names()
        if self.strategy == "fused":
            names = [n for n in names if n not in FUSED_NAMES]
        return names

    def _extra_params(self):
        return self._fused or {}

    def _load_extra(self, params):
        if self._fused is not None:
            self._fused = fused_from_canonical(params)

    def _export_extra(self):
        return fused_to_canonical(self._fused) if self._fused is not None else {}

    def _grads_extra(self, grads):
        if self._fused is None:
            return {}
        return fused_to_canonical({k: np.array(grads[k], np.float32) for k in FUSED_BLOBS})

    def _lstm_blobs(self, handle: NetHandle):
        return handle.net.params["lstm"]

    # --- data ---
    def prepare(self, batch: SeqBatch) -> PreparedSeq:
        if not isinstance(batch, SeqBatch):
            raise TypeError("the RNN family needs a SeqBatch, got %s" % type(batch).__name__)
        tokens = np.asarray(batch.tokens)
        lengths = np.asarray(batch.lengths, np.int64)
        B, T = tokens.shape
        out = PreparedSeq(steps=T,
                          tokens=np.ascontiguousarray(tokens.T, dtype=np.float32),
                          sel=((lengths - 1) * B + np.arange(B)).astype(np.float32),
                          labels=np.asarray(batch.labels, np.float32))
        if self.strategy == "fused":
            cont = np.ones((T, B), np.float32)
            cont[0] = 0.0
            out.cont = cont
        return out

    # --- running ---
    def _net(self, ready: PreparedSeq) -> NetHandle:
        handle = self.nets.get(ready.steps)
        if handle is None:
            build = fused_net if self.strategy == "fused" else loop_net
            handle = self.nets[ready.steps] = self.make_net(build(self.cfg, ready.steps))
        if self._fused is not None and handle.version != self.version:
            for blob, k in zip(self._lstm_blobs(handle), FUSED_BLOBS):
                blob.data[...] = self._fused[k]
            handle.version = self.version
        handle.set_input("tokens", ready.tokens)
        handle.set_input("sel", ready.sel)
        handle.set_input("labels", ready.labels)
        if ready.cont is not None:
            handle.set_input("cont", ready.cont)
        return handle

    def _logits(self, ready):
        handle = self._net(ready)
        handle.forward(end="out")
        return handle.data("logits").copy()

    def _forward_backward(self, ready):
        handle = self._net(ready)
        self.store.zero_diffs()
        grads = dict(self.store.diff)
        if self._fused is not None:
            for blob, k in zip(self._lstm_blobs(handle), FUSED_BLOBS):
                d = blob.diff
                d[...] = 0.0
                grads[k] = d
        loss = handle.forward()
        handle.backward()
        return loss, grads

    def info(self):
        out = super().info()
        out["strategy_detail"] = {
            "loop": "unrolled net per T: Embed, one input InnerProduct, per step InnerProduct "
                    "+ Eltwise + activations; BatchReindex of each last real step",
            "fused": "Caffe LSTM layer (cont input) per T; BatchReindex of each last real step",
        }[self.strategy]
        out["net_lengths"] = sorted(self.nets)
        return out
