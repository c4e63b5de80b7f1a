"""The NumPy reference: the oracle every framework is checked against.

Written for clarity, not speed: the RNN family loops over time steps (the
batch is vectorised, padded steps keep the previous state), the RvNN family
loops over nodes one at a time in topological order. Gradients are
hand-written backpropagation and are themselves checked against finite
differences in the tests.

Loss: mean softmax cross-entropy over the labelled classification nodes
(label >= 0). In ``root`` mode those are the sequences' last real steps or the
trees' roots; in ``all`` mode every labelled tree node.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from .batches import SeqBatch, TreeBatch
from .interface import ADAGRAD, ADAM
from .params import ModelConfig
from .targets import class_points, labelled_count


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _cast(params, dtype):
    return {k: np.asarray(v, dtype=dtype) for k, v in params.items()}


# --- forward passes: each returns (states for backward, hidden at every classification point) ---

def _rnn_forward(cfg: ModelConfig, p, batch: SeqBatch, offsets=None):
    """``offsets`` [B, T, H] (optional) is added to each live step's new state: a probe
    whose derivative is d loss / d h_t (see ``loss_with_offsets``); None adds nothing."""
    B, T = batch.tokens.shape
    H = cfg.hidden
    dt = p["E"].dtype
    h = np.zeros((B, H), dt)
    c = np.zeros((B, H), dt)
    steps = []
    for t in range(T):
        x = p["E"][batch.tokens[:, t]]
        live = (t < batch.lengths)[:, None]          # padded steps keep h (and c)
        z = x @ p["W_x"] + h @ p["W_h"] + p["b"]
        if cfg.model == "elman":
            h_new = np.tanh(z)
            steps.append((x, live, h, h_new))
            if offsets is not None:
                h_new = h_new + offsets[:, t]
            h = np.where(live, h_new, h)
        else:
            i, f, g, o = (z[:, k * H:(k + 1) * H] for k in range(4))
            si, sf, tg, so = sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)
            c_new = sf * c + si * tg
            h_new = so * np.tanh(c_new)
            steps.append((x, live, h, c, si, sf, tg, so, c_new))
            if offsets is not None:
                h_new = h_new + offsets[:, t]
            h = np.where(live, h_new, h)
            c = np.where(live, c_new, c)
    return steps, h


def _tree_forward(cfg: ModelConfig, p, batch: TreeBatch, offsets=None):
    """``offsets`` [N, H] (optional) is added to each node's state once computed (see
    ``_rnn_forward``); the Tree-LSTM's cell states are left alone."""
    N, H = batch.num_nodes, cfg.hidden
    dt = p["E"].dtype
    h = np.zeros((N, H), dt)
    c = np.zeros((N, H), dt)
    cache = [None] * N
    for n in range(N):  # children come before parents in a TreeBatch
        if batch.left[n] < 0:
            x = p["E"][batch.token[n]]
            z = x @ p["W_leaf"] + p["b_leaf"]
            if cfg.model == "rvnn":
                h[n] = np.tanh(z)
            else:
                si, so, tu = sigmoid(z[:H]), sigmoid(z[H:2 * H]), np.tanh(z[2 * H:])
                c[n] = si * tu
                h[n] = so * np.tanh(c[n])
                cache[n] = (si, so, tu)
        else:
            l, r = batch.left[n], batch.right[n]
            hlr = np.concatenate([h[l], h[r]])
            if cfg.model == "rvnn":
                h[n] = np.tanh(hlr @ p["W"] + p["b"])
            else:
                z = hlr @ p["U"] + p["b_U"]
                si, sfl, sfr, so = (sigmoid(z[k * H:(k + 1) * H]) for k in range(4))
                tu = np.tanh(z[4 * H:])
                c[n] = si * tu + sfl * c[l] + sfr * c[r]
                h[n] = so * np.tanh(c[n])
                cache[n] = (si, sfl, sfr, so, tu)
        if offsets is not None:
            h[n] = h[n] + offsets[n]
    return (h, c, cache), h


def _check_batch(cfg: ModelConfig, batch) -> None:
    want = SeqBatch if cfg.family == "rnn" else TreeBatch
    if not isinstance(batch, want):
        raise TypeError("model %s needs a %s, got %s" % (cfg.model, want.__name__, type(batch).__name__))


def _forward(cfg, params, batch, dtype, offsets=None):
    _check_batch(cfg, batch)
    p = _cast(params, dtype)
    if cfg.family == "rnn":
        state, hidden = _rnn_forward(cfg, p, batch, offsets)
    else:
        state, hidden = _tree_forward(cfg, p, batch, offsets)
    return p, state, hidden


def hidden_states(cfg: ModelConfig, params, batch, dtype=np.float64) -> np.ndarray:
    """The hidden state of every row a loss can classify: [B, H] for an RNN (each
    example's state after its last real token), [N, H] for trees (every node)."""
    return _forward(cfg, params, batch, dtype)[2]


def logits(cfg: ModelConfig, params, batch, dtype=np.float64) -> np.ndarray:
    """Logits [B, C] at each example's classification point (last token / root)."""
    p, _, hidden = _forward(cfg, params, batch, dtype)
    return hidden[class_points(batch).index] @ p["W_o"] + p["b_o"]


def _softmax_xent(z: np.ndarray, labels: np.ndarray):
    """Mean cross-entropy over rows with label >= 0, and d loss / d z."""
    keep = labels >= 0
    count = labelled_count(labels)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    rows = np.nonzero(keep)[0]
    loss = -logp[rows, labels[rows]].sum() / count
    dz = np.exp(logp)
    dz[rows, labels[rows]] -= 1.0
    dz[~keep] = 0.0
    return loss, dz / count


def _classified(cfg: ModelConfig, p, batch, hidden):
    """(loss, d loss / d logits, the rows classified) over ``cfg.loss_mode``'s points."""
    points = class_points(batch, cfg.loss_mode)
    value, dz = _softmax_xent(hidden[points.index] @ p["W_o"] + p["b_o"], points.labels)
    return value, dz, points.index


def loss(cfg: ModelConfig, params, batch, dtype=np.float64) -> float:
    p, _, hidden = _forward(cfg, params, batch, dtype)
    return float(_classified(cfg, p, batch, hidden)[0])


def loss_with_offsets(cfg: ModelConfig, params, batch, offsets, dtype=np.float64) -> float:
    """The loss with ``offsets`` added to every hidden state as it is computed (RNN:
    [B, T, H], live steps only; trees: [N, H]). Its derivative in the offsets at zero
    is d loss / d h, which ``hidden_grads`` computes: the finite-difference probe of it."""
    p, _, hidden = _forward(cfg, params, batch, dtype, np.asarray(offsets, dtype))
    return float(_classified(cfg, p, batch, hidden)[0])


def hidden_grads(cfg: ModelConfig, params, batch, dtype=np.float64
                 ) -> Tuple[float, np.ndarray]:
    """Loss and d loss / d h for every step's or node's hidden state, from the backward pass.

    RNN: [B, T, H], row t of example b being the state after its token t (zero at
    padded steps); the LSTM's cell states are not included. Trees: [N, H] in the
    TreeBatch's node order. The loss is the mean over classification points, as
    in ``loss_and_grads``.
    """
    p, state, hidden = _forward(cfg, params, batch, dtype)
    value, dz, idx = _classified(cfg, p, batch, hidden)
    dh = np.zeros_like(hidden)
    np.add.at(dh, idx, dz @ p["W_o"].T)
    g = {k: np.zeros_like(v) for k, v in p.items()}
    if cfg.family == "rnn":
        trace = [None] * len(state)
        _rnn_backward(cfg, p, batch, state, dh, g, trace)
        out = np.stack(trace, axis=1) if trace else np.zeros(batch.tokens.shape + (cfg.hidden,))
        return float(value), out
    _tree_backward(cfg, p, batch, state, dh, g)   # fills dh in place, parents first
    return float(value), dh


def loss_and_grads(cfg: ModelConfig, params, batch, dtype=np.float64
                   ) -> Tuple[float, Dict[str, np.ndarray]]:
    """Loss and the gradient of every canonical parameter (same names and shapes)."""
    p, state, hidden = _forward(cfg, params, batch, dtype)
    g = {k: np.zeros_like(v) for k, v in p.items()}
    value, dz, idx = _classified(cfg, p, batch, hidden)
    g["W_o"] = hidden[idx].T @ dz
    g["b_o"] = dz.sum(axis=0)
    dh = np.zeros_like(hidden)
    np.add.at(dh, idx, dz @ p["W_o"].T)
    if cfg.family == "rnn":
        _rnn_backward(cfg, p, batch, state, dh, g)
    else:
        _tree_backward(cfg, p, batch, state, dh, g)
    return float(value), g


def _rnn_backward(cfg, p, batch, steps, dh, g, trace=None):
    """``trace`` (a list of len T, optional) receives d loss / d h_t at each live step."""
    dc = np.zeros_like(dh)
    for t in reversed(range(len(steps))):
        if trace is not None:
            # dh is now the gradient of the state carried out of step t: at a live
            # step, the step's own state; at a padded one, a pass-through (no state).
            trace[t] = np.where(steps[t][1], dh, 0.0)
        if cfg.model == "elman":
            x, live, h_prev, h_new = steps[t]
            dz = np.where(live, dh, 0.0) * (1.0 - h_new ** 2)
            dh = np.where(live, 0.0, dh)        # a padded step passes dh through
        else:
            x, live, h_prev, c_prev, si, sf, tg, so, c_new = steps[t]
            dh_new, dc_new = np.where(live, dh, 0.0), np.where(live, dc, 0.0)
            tc = np.tanh(c_new)
            dc_total = dc_new + dh_new * so * (1.0 - tc ** 2)
            dz = np.concatenate([
                dc_total * tg * si * (1.0 - si),      # i
                dc_total * c_prev * sf * (1.0 - sf),  # f
                dc_total * si * (1.0 - tg ** 2),      # g
                dh_new * tc * so * (1.0 - so),        # o
            ], axis=1)
            dc = np.where(live, dc_total * sf, dc)
            dh = np.where(live, 0.0, dh)
        g["W_x"] += x.T @ dz
        g["W_h"] += h_prev.T @ dz
        g["b"] += dz.sum(axis=0)
        np.add.at(g["E"], batch.tokens[:, t], dz @ p["W_x"].T)
        dh = dh + dz @ p["W_h"].T


def _tree_backward(cfg, p, batch, state, dh, g):
    h, c, cache = state
    H = cfg.hidden
    dc = np.zeros_like(dh)
    W, b = ("W", "b") if cfg.model == "rvnn" else ("U", "b_U")
    # Each node's d loss / d z, kept so the weight gradients are two products at
    # the end (per-node outer products cost ~10x more).
    dzs = [None] * batch.num_nodes
    for n in reversed(range(batch.num_nodes)):  # parents before children
        leaf = batch.left[n] < 0
        if cfg.model == "rvnn":
            dz = dh[n] * (1.0 - h[n] ** 2)
        else:
            tc = np.tanh(c[n])
            if leaf:
                si, so, tu = cache[n]
            else:
                si, sfl, sfr, so, tu = cache[n]
            dct = dc[n] + dh[n] * so * (1.0 - tc ** 2)
            dzi = dct * tu * si * (1.0 - si)
            dzo = dh[n] * tc * so * (1.0 - so)
            dzu = dct * si * (1.0 - tu ** 2)
            if leaf:
                dz = np.concatenate([dzi, dzo, dzu])
            else:
                l, r = batch.left[n], batch.right[n]
                dzfl = dct * c[l] * sfl * (1.0 - sfl)
                dzfr = dct * c[r] * sfr * (1.0 - sfr)
                dc[l] += dct * sfl
                dc[r] += dct * sfr
                dz = np.concatenate([dzi, dzfl, dzfr, dzo, dzu])
        dzs[n] = dz
        if not leaf:
            dhlr = p[W] @ dz
            dh[batch.left[n]] += dhlr[:H]
            dh[batch.right[n]] += dhlr[H:]
    leaves = batch.left < 0
    inner = np.nonzero(~leaves)[0]
    dz_leaf = np.stack([dzs[n] for n in np.nonzero(leaves)[0]])
    x = p["E"][batch.token[leaves]]
    g["W_leaf"] += x.T @ dz_leaf
    g["b_leaf"] += dz_leaf.sum(axis=0)
    np.add.at(g["E"], batch.token[leaves], dz_leaf @ p["W_leaf"].T)
    if inner.size:
        dz_inner = np.stack([dzs[n] for n in inner])
        hlr = np.concatenate([h[batch.left[inner]], h[batch.right[inner]]], axis=1)
        g[W] += hlr.T @ dz_inner
        g[b] += dz_inner.sum(axis=0)


def sgd_step(params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray], lr: float
             ) -> Dict[str, np.ndarray]:
    """Plain SGD: p - lr * g, in the parameters' dtype."""
    return {k: (params[k] - lr * grads[k]).astype(params[k].dtype) for k in params}


# --- the suite's optimisers (bench.interface's constants), in float64 ---
#
# Adam's epsilon: PyTorch and optax add it to the corrected root,
# ``lr * m_hat / (sqrt(v_hat) + eps)`` ("corrected", the reference); Keras adds it
# to the raw root and corrects the step size, ``lr * sqrt(1 - b2^t) / (1 - b1^t) *
# m / (sqrt(v) + eps)`` ("raw"), which is ``eps / sqrt(1 - b2^t)`` on the
# corrected root. Both are the published algorithm; they differ only where |g| is
# within a few hundred eps of zero.
ADAM_EPS = ("corrected", "raw")


def decayed(grad: np.ndarray, param: np.ndarray, weight_decay: float) -> np.ndarray:
    """The gradient an optimiser step sees under coupled L2: ``g + weight_decay * theta``
    (``g`` itself when the decay is 0, bit for bit)."""
    return grad + weight_decay * param if weight_decay else grad


def optimizer_steps(cfg: ModelConfig, params: Dict[str, np.ndarray], batch, steps: int,
                    first_grads: Optional[Dict[str, np.ndarray]] = None,
                    adam_eps: Tuple[str, ...] = ("corrected",), agree: float = 2.5e-6
                    ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Parameters after ``steps`` updates of ``cfg.optimizer`` (fresh optimiser state)
    on ``batch``, and per parameter a mask of the entries worth comparing.

    Every entry is compared for SGD and Adagrad. Adam moves each entry by about
    lr * sign(g), so an entry whose gradient is at float32 noise level may
    legitimately go either way: the mask keeps entries whose gradient is clearly
    non-zero (above 1e-3 of the parameter's largest) or exactly zero, at every
    step. With several ``adam_eps`` conventions, it also drops the entries where
    the conventions' trajectories differ by more than ``agree``; a wrong learning
    rate or bias correction still moves every kept entry by a fraction of lr.
    ``first_grads``: the reference gradients at ``params``, if already computed.

    Weight decay (``cfg.weight_decay``, wd) is coupled L2, the classic form: each
    update, SGD, Adam and Adagrad alike, sees ``g + wd * theta`` in place of the loss
    gradient ``g``, for every parameter, before any moment or accumulator (what
    ``torch.optim``'s ``weight_decay=`` does for these three). It equals adding
    ``wd / 2 * ||theta||^2`` to the loss. (Decoupled decay, AdamW's
    ``theta -= lr * wd * theta`` beside the Adam step, is another algorithm.) The Adam
    mask is taken on the decayed gradient, the one the update sees.
    """
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    adam = cfg.optimizer == "adam"
    conventions = adam_eps if adam else adam_eps[:1]
    # the other Adam conventions' trajectories share the moments and the decayed gradient
    # of p (not their own: they differ by at most ``agree`` where they are compared)
    others = [{k: v.copy() for k, v in p.items()} for _ in conventions[1:]]
    state = _optimizer_state(p)
    masks = {k: np.ones(v.shape, bool) for k, v in p.items()}
    for t in range(1, steps + 1):
        grads = first_grads if t == 1 and first_grads is not None else loss_and_grads(cfg, p, batch)[1]
        for k, g in grads.items():
            g = decayed(np.asarray(g, np.float64), p[k], cfg.weight_decay)
            for trajectory, move in zip([p] + others, _moves(cfg, state, k, g, t, conventions)):
                trajectory[k] = trajectory[k] - move
            if adam:
                masks[k] &= (np.abs(g) > 1e-3 * np.abs(g).max()) | (g == 0)
    for other in others:
        for k in masks:
            masks[k] &= np.abs(p[k] - other[k]) <= agree
    return p, masks


def _optimizer_state(p: Dict[str, np.ndarray]) -> Dict[str, Dict[str, np.ndarray]]:
    """Fresh moments (Adam) and accumulators (Adagrad) for parameters ``p``."""
    return {"m": {k: np.zeros_like(v) for k, v in p.items()},
            "v": {k: np.zeros_like(v) for k, v in p.items()},
            "acc": {k: np.full_like(v, ADAGRAD["initial_accumulator"]) for k, v in p.items()}}


def _moves(cfg: ModelConfig, state, k: str, g: np.ndarray, t: int,
           adam_eps: Tuple[str, ...]) -> List[np.ndarray]:
    """What step ``t`` subtracts from parameter ``k`` given its (decayed) gradient ``g``,
    updating ``state``: one move, or with Adam one per ``adam_eps`` convention."""
    if cfg.optimizer == "adam":
        m, v = state["m"], state["v"]
        m[k] = ADAM["beta1"] * m[k] + (1 - ADAM["beta1"]) * g
        v[k] = ADAM["beta2"] * v[k] + (1 - ADAM["beta2"]) * g * g
        m_hat = m[k] / (1 - ADAM["beta1"] ** t)
        root = np.sqrt(v[k] / (1 - ADAM["beta2"] ** t))
        eps = {"corrected": ADAM["eps"], "raw": ADAM["eps"] / np.sqrt(1 - ADAM["beta2"] ** t)}
        return [cfg.lr * m_hat / (root + eps[c]) for c in adam_eps]
    if cfg.optimizer == "adagrad":
        acc = state["acc"]
        acc[k] = acc[k] + g * g
        return [cfg.lr * g / (np.sqrt(acc[k]) + ADAGRAD["eps"])]
    return [cfg.lr * g]


def elman_as_rvnn(params: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], int]:
    """Map Elman weights to RvNN weights for a left-branching tree.

    With a start leaf (all-zero embedding) in front of the tokens, internal
    node t of the left-branching tree computes
    ``tanh([h_{t-1}; leaf_t] W + b)``. Choosing ``W = [W_h; I]``,
    ``W_leaf = I``, ``b_leaf = 0`` and leaf embeddings
    ``arctanh(E W_x)`` makes ``leaf_t = x_t W_x``, so node t equals the Elman
    state ``h_t``. Needs ``D' = H`` and every entry of ``E W_x`` inside (-1, 1),
    which holds for the canonical init. Returns (params, start token id); the
    start token is appended as the last vocabulary row.
    """
    E, W_x, W_h = params["E"], params["W_x"], params["W_h"]
    H = W_h.shape[0]
    proj = E.astype(np.float64) @ W_x
    if np.abs(proj).max() >= 1.0:
        raise ValueError("E @ W_x leaves (-1, 1): no exact RvNN mapping through tanh")
    E_tree = np.vstack([np.arctanh(proj), np.zeros((1, H))])
    eye = np.eye(H)
    mapped = {
        "E": E_tree,
        "W_leaf": eye,
        "b_leaf": np.zeros(H),
        "W": np.vstack([W_h, eye]),
        "b": params["b"],
        "W_o": params["W_o"],
        "b_o": params["b_o"],
    }
    return {k: np.asarray(v, np.float64) for k, v in mapped.items()}, E.shape[0]
