"""Reservoir (echo-state) training: frozen random weights, a linear readout fitted in closed form.

The cheapest way to train either family (Jaeger's echo state networks for
sequences; Gallicchio and Micheli's tree echo state networks for trees): keep
the canonical initialisation, rescale the recurrent / composition weights to a
chosen spectral radius, freeze everything, and fit only the output layer
(``W_o``, ``b_o``) by ridge regression on one-hot targets.

What "spectral radius" means here, per model (every block is H x H, and each
block is scaled on its own so that its largest eigenvalue modulus is the
target; a block's direction is kept, only its scale changes):

* ``elman``: ``W_h`` (H x H), the one recurrent matrix.
* ``lstm``: ``W_h`` (H x 4H) in its four gate blocks ``[i, f, g, o]``: each
  maps the previous state into one gate's pre-activation.
* ``rvnn``: ``W`` (2H x H) in its two child blocks (rows ``[h_left; h_right]``).
  On a left-branching tree the left block is the chain's recurrent matrix, so
  the same radius means the same thing as for the Elman RNN; a balanced node
  adds two such terms.
* ``treelstm``: ``U`` (2H x 5H) in ten blocks: left and right child rows by the
  five gate columns ``[i, f_l, f_r, o, u]``.

Embeddings, leaf / input weights and biases stay at their initial values.

Features come from each framework's verified forward pass with no new hook:
a model configured with ``num_classes = hidden`` and ``W_o = I, b_o = 0``
returns the classification point's hidden state as its logits (the final
state for RNNs, the root state for trees). ``bench.cell`` checks those
features against the reference before fitting. The ridge fit below is
framework-neutral NumPy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .params import ModelConfig

# canonical name of the frozen recurrent / composition matrix, per model
RECURRENT = {"elman": "W_h", "lstm": "W_h", "rvnn": "W", "treelstm": "U"}
# ridge strength per training example (the objective is mean squared error + alpha ||W||^2)
ALPHAS = tuple(10.0 ** k for k in range(-6, 2))


def spectral_radius(m: np.ndarray) -> float:
    """Largest eigenvalue modulus of a square matrix."""
    m = np.asarray(m, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError("spectral radius needs a square matrix, got shape %s" % (m.shape,))
    return float(np.abs(np.linalg.eigvals(m)).max()) if m.size else 0.0


def scale_blocks(w: np.ndarray, block: int, radius: float) -> np.ndarray:
    """``w`` with each ``block`` x ``block`` sub-matrix rescaled to spectral radius ``radius``
    (a block whose radius is 0, e.g. nilpotent or zero, is left as it is)."""
    if radius <= 0:
        raise ValueError("spectral radius must be > 0, not %r" % radius)
    w = np.array(w, np.float64)
    rows, cols = w.shape
    if rows % block or cols % block:
        raise ValueError("a %s matrix does not split into %d x %d blocks" % (w.shape, block, block))
    for r in range(0, rows, block):
        for c in range(0, cols, block):
            sub = w[r:r + block, c:c + block]
            rho = spectral_radius(sub)
            if rho > 0:
                w[r:r + block, c:c + block] = sub * (radius / rho)
    return w


def reservoir_params(cfg: ModelConfig, params: Dict[str, np.ndarray], radius: float
                     ) -> Dict[str, np.ndarray]:
    """Canonical parameters with the recurrent / composition matrix scaled (see module doc)."""
    out = {k: np.array(v, np.float32) for k, v in params.items()}
    name = RECURRENT[cfg.model]
    out[name] = scale_blocks(params[name], cfg.hidden, radius).astype(np.float32)
    return out


def feature_config(cfg: ModelConfig) -> ModelConfig:
    """The configuration whose logits are the hidden state: ``num_classes = hidden``."""
    return replace(cfg, num_classes=cfg.hidden)


def feature_params(params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``params`` with an identity readout (``W_o = I``, ``b_o = 0``), for ``feature_config``."""
    H = params["W_o"].shape[0]
    out = {k: np.array(v, np.float32) for k, v in params.items()}
    out["W_o"] = np.eye(H, dtype=np.float32)
    out["b_o"] = np.zeros(H, np.float32)
    return out


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError("labels must lie in 0..%d" % (num_classes - 1))
    out = np.zeros((labels.size, num_classes))
    out[np.arange(labels.size), labels] = 1.0
    return out


class Ridge:
    """Ridge regression with an unpenalised bias, for many strengths at once.

    Minimises ``mean ||x W + b - y||^2 + alpha ||W||_F^2`` over the rows. The
    features are centred, so the bias is the targets' mean minus the centred
    prediction; one eigendecomposition of the centred Gram matrix serves every
    alpha.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
            raise ValueError("ridge needs x [n, d] and y [n, k] with n >= 1, got %s and %s"
                             % (x.shape, y.shape))
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError("ridge features or targets are not finite")
        self.n = x.shape[0]
        self.x_mean, self.y_mean = x.mean(axis=0), y.mean(axis=0)
        xc = x - self.x_mean
        self.evals, self.evecs = np.linalg.eigh(xc.T @ xc / self.n)
        self.xty = self.evecs.T @ (xc.T @ (y - self.y_mean) / self.n)

    def solve(self, alpha: float) -> Tuple[np.ndarray, np.ndarray]:
        """(W [d, k], b [k]) for one strength (alpha >= 0; 0 is least squares, pseudo-inverse)."""
        if alpha < 0:
            raise ValueError("ridge alpha must be >= 0")
        denom = np.clip(self.evals, 0.0, None) + alpha
        tiny = denom <= 1e-12 * max(1.0, float(np.abs(self.evals).max()))
        inv = np.where(tiny, 0.0, 1.0 / np.where(tiny, 1.0, denom))
        w = self.evecs @ (inv[:, None] * self.xty)
        return w, self.y_mean - self.x_mean @ w


def accuracy(x: np.ndarray, labels: np.ndarray, w: np.ndarray, b: np.ndarray) -> Optional[float]:
    labels = np.asarray(labels)
    if labels.size == 0:
        return None
    pred = np.argmax(np.asarray(x, np.float64) @ w + b, axis=1)
    return float((pred == labels).mean())


def fit_readout(x_train: np.ndarray, y_train: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray,
                num_classes: int, alphas: Sequence[float] = ALPHAS) -> Dict:
    """Ridge on one-hot targets for every alpha; the one with the best dev accuracy wins
    (ties: the larger alpha, the smoother readout). Returns W, b, alpha and every dev score."""
    if not len(alphas):
        raise ValueError("no ridge strengths to choose from")
    ridge = Ridge(x_train, one_hot(y_train, num_classes))
    best = None
    scores: List[Tuple[float, Optional[float]]] = []
    for alpha in sorted(alphas):
        w, b = ridge.solve(alpha)
        acc = accuracy(x_dev, y_dev, w, b)
        scores.append((alpha, acc))
        if best is None or (acc or 0.0) >= (best[0] or 0.0):
            best = (acc, alpha, w, b)
    acc, alpha, w, b = best
    return {"W": w, "b": b, "alpha": alpha, "dev": acc,
            "dev_by_alpha": [[a, s] for a, s in scores]}
