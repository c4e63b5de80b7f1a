"""Elman RNN and LSTM in JAX: strategies ``loop``, ``compiled``, ``fused`` and ``plain``.

Shapes: B batch (padded to Bp, the cell's batch size: ``bench.batches.padded_rows``;
padded examples have label -1 and change nothing), T time steps (Tp after
padding), D embedding, H hidden, G = H (Elman) or 4H (LSTM, gate blocks
[i, f, g, o]), C classes.

* ``loop``: a jitted cell ``(state, x[Bp, Tp, D], live[Tp, Bp, 1], t) -> state`` (state
  ``(h,)`` or ``(h, c)``, each [Bp, H]) called from a Python loop over the T real
  steps; ``jax.value_and_grad`` differentiates the loop. Tp = ``count_bucket(T)``
  (SST: 64), so the jitted pieces see one shape per batch class.
* ``compiled``: forward, backward and optimiser update under one ``jit``. Training
  is ``lax.scan`` over Tt = ``train_length(T)`` steps (a power of two >= 16; SST:
  16, 32 or 64), the input projection of all steps one [Bp*Tt, D] x [D, G]
  product before it. Inference is a ``lax.while_loop`` over chunks of ``CHUNK``
  steps of one padded length (``count_bucket``: SST 64) that stops after the
  longest example, each chunk's projection one product. A cell compiles at
  most three training programs on SST, one gradient program (the check) and
  two inference programs (its batches, batch-1 latency).
* ``fused``: cuDNN's LSTM through ``jax.experimental.rnn.lstm`` (CUDA only),
  on the same padded shapes as ``compiled`` (cuDNN takes each example's length;
  padded examples have length 1).
  The canonical LSTM maps onto it exactly: cuDNN's ``W_ih``/``W_hh`` are
  ``W_x.T``/``W_h.T`` with the same gate order, ``b_ih = b``, ``b_hh = 0``, and
  per-example ``seq_lengths`` make cuDNN return the state at the last real
  token. There is no fused Elman layer in JAX and no fused kernel on the CPU.
* ``plain``: the yardstick, what a JAX user writes first: one ``jit`` of forward,
  backward and optimiser update (inference: of the logits), ``lax.scan`` over all
  Tp = ``train_length(T)`` steps (a power of two >= 16, as a user buckets lengths to
  bound recompiles) of the whole padded batch with no masking, no
  early stop and no chunks (one [Bp*Tp, D] x [D, G] input projection before it),
  every step's h kept and each example's read at its last real token
  (``lengths - 1``). Exact: in a unidirectional RNN the padding after a token
  cannot change that token's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.batches import SeqBatch, count_bucket, train_length
from bench.interface import Unavailable, counted

from .common import JaxImplementation, classify, softmax_xent

CHUNK = 8         # compiled: time steps per scan iteration (count_bucket's lengths are multiples)


def recur(model, W_h, state, zx):
    """One unmasked step for the batch (``plain`` scans it over every padded step).

    zx [B, G] is ``x_t W_x + b`` (the input projection), state is (h,) or
    (h, c) with each [B, H].
    """
    z = zx + state[0] @ W_h
    if model == "elman":
        return (jnp.tanh(z),)
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * state[1] + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c_new), c_new


def cell(model, W_h, state, zx, live):
    """One step for the batch, masked: live [B, 1] bool, padded steps keep the state."""
    return tuple(jnp.where(live, new, old) for new, old in zip(recur(model, W_h, state, zx), state))


def cudnn_lstm_weights(W_x, W_h, b):
    """Canonical LSTM weights as the flat vector jax.experimental.rnn.lstm takes.

    cuDNN's layout for one unidirectional layer: W_ih [4H, D], W_hh [4H, H],
    b_ih [4H], b_hh [4H], row-major, gates [i, f, g, o] like the canonical
    blocks; the canonical single bias goes into b_ih and b_hh is zero.
    """
    return jnp.concatenate([W_x.T.reshape(-1), W_h.T.reshape(-1), b, jnp.zeros_like(b)])


class RNN(JaxImplementation):
    family = "rnn"
    jit_strategies = ("compiled", "fused", "plain")

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        if strategy == "fused":
            self._check_cudnn()
        if strategy == "loop":
            model = cfg.model

            def embed(E, tokens):
                return E[tokens]

            def step(W_x, W_h, b, state, x, live, t):
                return cell(model, W_h, state, x[:, t] @ W_x + b, live[t])

            def loss_head(W_o, b_o, h, labels):
                return softmax_xent(classify(W_o, b_o, h), labels)

            self._embed = jax.jit(counted(self.traces, "embed", embed))
            self._cell = jax.jit(counted(self.traces, "cell", step))
            self._readout = jax.jit(counted(self.traces, "readout", classify))
            self._loss_head = jax.jit(counted(self.traces, "loss_head", loss_head))

    def _check_cudnn(self):
        try:
            from jax._src.lib import gpu_rnn
        except ImportError as exc:
            raise Unavailable("jaxlib has no GPU RNN module: %s" % exc) from None
        # Device.platform says 'gpu' for CUDA and ROCm alike; the plugin modules tell them apart.
        if not (getattr(gpu_rnn, "_cuda_rnn", None) or getattr(gpu_rnn, "_hip_rnn", None)):
            raise Unavailable("this jax install has no cuDNN/MIOpen RNN kernels (jax-cuda plugin "
                              "without its _rnn module)")

    # --- preparation (untimed) ---
    def prepare(self, batch: SeqBatch):
        if not isinstance(batch, SeqBatch):
            raise TypeError("the RNN family takes a SeqBatch, not %s" % type(batch).__name__)
        tokens, lengths, labels = batch.tokens, batch.lengths, batch.labels
        B, T = tokens.shape
        # Padded examples have one token (cuDNN wants lengths >= 1) and label -1, so the
        # loss and the gradients ignore them.
        rows = self.rows(B)
        lens = np.ones(rows, np.int32)
        lens[:B] = lengths
        labs = np.full(rows, -1, np.int32)
        labs[:B] = labels
        if self.strategy == "loop":
            # The loop runs the T real steps; padding keeps the shapes the jitted pieces
            # see (x [rows, Tp, D]) to the batch's class, so they compile once per class.
            padded = np.zeros((rows, count_bucket(T)), np.int32)
            padded[:B, :T] = tokens
            live = (np.arange(padded.shape[1])[:, None] < lens[None, :])[:, :, None]
            return {"tokens": self._put(padded), "labels": self._put(labs),
                    "live": self._put(live, bool), "steps": T, "size": B}
        if self.strategy == "plain":
            # one shape for training and inference: every step of the padded length runs
            padded = np.zeros((rows, train_length(T)), np.int32)
            padded[:B, :T] = tokens
            return {"tokens": self._put(padded), "lengths": self._put(lens),
                    "labels": self._put(labs), "size": B}
        out = {"size": B}
        for phase, steps in (("train", train_length(T)), ("infer", count_bucket(T))):
            padded = np.zeros((rows, steps), np.int32)
            padded[:B, :T] = tokens
            out[phase] = {"tokens": self._put(padded), "lengths": self._put(lens),
                          "labels": self._put(labs)}
        return out

    # --- the four ways to get the last hidden state [B, H] ---
    def _hidden_loop(self, p, prep):
        # One lookup for the batch, then each step reads its column inside the
        # jitted cell (t is traced: one compile for every step).
        x = self._embed(p["E"], prep["tokens"])             # [rows, Tp, D]
        B, H = x.shape[0], self.cfg.hidden
        zeros = jnp.zeros((B, H), jnp.float32)
        state = (zeros,) if self.cfg.model == "elman" else (zeros, zeros)
        for t in range(prep["steps"]):
            state = self._cell(p["W_x"], p["W_h"], p["b"], state, x, prep["live"], t)
        return state[0]

    def _hidden_scan(self, p, prep):
        """Training: ``lax.scan`` over the Tt steps of the training shape (T to a power of two
        >= 16: a few shapes per task, each differentiable with a static trip count)."""
        tokens, lengths = prep["tokens"], prep["lengths"]
        B, Tt = tokens.shape
        H = self.cfg.hidden
        # The input projection of every step is one [B*Tt, D] x [D, G] matmul
        # outside the recurrence; only h W_h stays inside the scan.
        zx = jnp.swapaxes(p["E"][tokens] @ p["W_x"] + p["b"], 0, 1)      # [Tt, B, G]
        live = (jnp.arange(Tt)[:, None] < lengths[None, :])[:, :, None]  # [Tt, B, 1]
        zeros = jnp.zeros((B, H), jnp.float32)
        init = (zeros,) if self.cfg.model == "elman" else (zeros, zeros)
        model, W_h = self.cfg.model, p["W_h"]

        def step(state, inputs):
            return cell(model, W_h, state, *inputs), None

        state, _ = lax.scan(step, init, (zx, live))
        return state[0]

    def _hidden_while(self, p, prep):
        """Inference: a ``lax.while_loop`` over chunks of CHUNK steps that stops after the
        longest example, on one padded length (count_bucket) for every batch."""
        tokens, lengths = prep["tokens"], prep["lengths"]
        B = tokens.shape[0]
        H = self.cfg.hidden
        tokens_tm = tokens.T                                              # [Tp, B]
        zeros = jnp.zeros((B, H), jnp.float32)
        init = (zeros,) if self.cfg.model == "elman" else (zeros, zeros)
        model, E, W_x, b, W_h = self.cfg.model, p["E"], p["W_x"], p["b"], p["W_h"]
        chunks = (jnp.max(lengths) + CHUNK - 1) // CHUNK

        def body(carry):
            k, state = carry
            t0 = k * CHUNK
            # the chunk's input projection in one product; only h W_h recurs
            zx = E[lax.dynamic_slice_in_dim(tokens_tm, t0, CHUNK)] @ W_x + b  # [CHUNK, B, G]
            live = (t0 + jnp.arange(CHUNK))[:, None, None] < lengths[None, :, None]
            # a scan, not unrolled: an unrolled chunk compiles ~3x slower for no gain here
            state = lax.scan(lambda s, xs: (cell(model, W_h, s, *xs), None), state, (zx, live))[0]
            return k + 1, state

        _, state = lax.while_loop(lambda c: c[0] < chunks, body, (jnp.int32(0), init))
        return state[0]

    def _hidden_plain(self, p, prep):
        """The yardstick: scan every padded step, no mask, then pick each example's
        h at its last real token (what follows a token cannot change its output)."""
        tokens, lengths = prep["tokens"], prep["lengths"]
        B = tokens.shape[0]
        zeros = jnp.zeros((B, self.cfg.hidden), jnp.float32)
        init = (zeros,) if self.cfg.model == "elman" else (zeros, zeros)
        model, W_h = self.cfg.model, p["W_h"]
        zx = p["E"][tokens.T] @ p["W_x"] + p["b"]                       # [Tp, B, G]

        def step(state, z):
            state = recur(model, W_h, state, z)
            return state, state[0]

        _, hs = lax.scan(step, init, zx)                                # [Tp, B, H]
        return hs[lengths - 1, jnp.arange(B)]

    def _hidden_fused(self, p, prep):
        from jax.experimental import rnn as jrnn
        tokens, lengths = prep["tokens"], prep["lengths"]
        B = tokens.shape[0]
        D, H = self.cfg.embed_dim, self.cfg.hidden
        weights = cudnn_lstm_weights(p["W_x"], p["W_h"], p["b"])
        zeros = jnp.zeros((1, B, H), jnp.float32)
        _, h_n, _ = jrnn.lstm(p["E"][tokens], zeros, zeros, weights, lengths,
                              input_size=D, hidden_size=H, num_layers=1, dropout=0.0,
                              bidirectional=False, precision=lax.Precision.HIGHEST)
        return h_n[0]

    def _hidden(self, p, prep, train):
        if self.strategy == "loop":
            return self._hidden_loop(p, prep)
        if self.strategy == "compiled":
            return self._hidden_scan(p, prep) if train else self._hidden_while(p, prep)
        if self.strategy == "plain":
            return self._hidden_plain(p, prep)
        return self._hidden_fused(p, prep)

    # --- hooks for the base class ---
    def _logits(self, p, prep):
        h = self._hidden(p, prep, train=False)
        if self.strategy == "loop":
            return self._readout(p["W_o"], p["b_o"], h)
        return classify(p["W_o"], p["b_o"], h)

    def _loss(self, p, prep):
        h = self._hidden(p, prep, train=True)
        if self.strategy == "loop":
            return self._loss_head(p["W_o"], p["b_o"], h, prep["labels"])
        return softmax_xent(classify(p["W_o"], p["b_o"], h), prep["labels"])

    def info(self):
        out = super().info()
        out["time_bucket"] = {
            "loop": "power of two >= 64 (the loop runs the real steps); examples padded to the "
                    "cell's batch size",
            "compiled": "train: power of two >= 16; infer: power of two >= 64 in chunks of %d "
                        "steps, stopping after the longest example; examples padded to the "
                        "cell's batch size" % CHUNK,
            "fused": "as compiled (cuDNN takes each example's length)",
            "plain": "power of two >= 16, every padded step scanned (no mask, no early stop), "
                     "each example's output read at its last real token; examples padded to "
                     "the cell's batch size"}[self.strategy]
        if self.strategy == "fused":
            out["kernel"] = "jax.experimental.rnn.lstm (cuDNN), TF32 off"
        return out
