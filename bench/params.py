"""Canonical parameters: one schema per model, seeded init, .npz save/load.

Every implementation loads and exports exactly these names and shapes
(float32, row-vector convention ``x @ W``), so weights move between any two
frameworks without renaming glue. Gate blocks are concatenated along the last
axis in the order given in each schema's comment.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict

import numpy as np

RNN_MODELS = ("elman", "lstm")
RVNN_MODELS = ("rvnn", "treelstm")
MODELS = RNN_MODELS + RVNN_MODELS


def family(model: str) -> str:
    if model in RNN_MODELS:
        return "rnn"
    if model in RVNN_MODELS:
        return "rvnn"
    raise ValueError("unknown model %r (one of %s)" % (model, ", ".join(MODELS)))


@dataclass(frozen=True)
class ModelConfig:
    model: str              # elman | lstm | rvnn | treelstm
    vocab_size: int         # V, rows of the embedding (id 0 = unknown/pad)
    embed_dim: int = 100    # D
    hidden: int = 150       # H
    num_classes: int = 5    # C
    loss_mode: str = "root"  # root: one label per example; all: every labelled tree node
    optimizer: str = "sgd"  # sgd | adam | adagrad
    lr: float = 0.05
    # coupled L2 in the optimiser step: the update sees g + weight_decay * theta
    # (the gradient of loss + weight_decay / 2 * ||theta||^2); the loss and gradients don't
    weight_decay: float = 0.0

    def __post_init__(self):
        family(self.model)
        if self.loss_mode not in ("root", "all"):
            raise ValueError("loss_mode is 'root' or 'all', not %r" % self.loss_mode)
        if self.loss_mode == "all" and family(self.model) == "rnn":
            raise ValueError("all-node loss needs a tree model")
        if self.optimizer not in ("sgd", "adam", "adagrad"):
            raise ValueError("optimizer is sgd, adam or adagrad, not %r" % self.optimizer)
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError("weight_decay must be a finite number >= 0, not %r"
                             % (self.weight_decay,))
        for name in ("vocab_size", "embed_dim", "hidden", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be >= 1" % name)

    @property
    def family(self) -> str:
        return family(self.model)


def schema(cfg: ModelConfig) -> "OrderedDict[str, tuple]":
    """name -> (shape, fan_in); fan_in None means N(0, 0.1) init (embeddings)."""
    V, D, H, C = cfg.vocab_size, cfg.embed_dim, cfg.hidden, cfg.num_classes
    s = OrderedDict()
    s["E"] = ((V, D), None)
    if cfg.model == "elman":
        s["W_x"] = ((D, H), D)
        s["W_h"] = ((H, H), H)
        s["b"] = ((H,), H)
    elif cfg.model == "lstm":
        # gate blocks [i, f, g, o], each H wide
        s["W_x"] = ((D, 4 * H), D)
        s["W_h"] = ((H, 4 * H), H)
        s["b"] = ((4 * H,), H)
    elif cfg.model == "rvnn":
        s["W_leaf"] = ((D, H), D)
        s["b_leaf"] = ((H,), D)
        # rows [h_left; h_right]
        s["W"] = ((2 * H, H), 2 * H)
        s["b"] = ((H,), 2 * H)
    elif cfg.model == "treelstm":
        # leaf blocks [i, o, u]; internal blocks [i, f_l, f_r, o, u]
        s["W_leaf"] = ((D, 3 * H), D)
        s["b_leaf"] = ((3 * H,), D)
        s["U"] = ((2 * H, 5 * H), 2 * H)
        s["b_U"] = ((5 * H,), 2 * H)
    s["W_o"] = ((H, C), H)
    s["b_o"] = ((C,), H)
    return s


def init_params(cfg: ModelConfig, seed: int, embed_std: float = 0.1) -> Dict[str, np.ndarray]:
    """Seeded float32 parameters: uniform +-1/sqrt(fan_in), embeddings N(0, embed_std)."""
    rng = np.random.default_rng(seed)
    out = OrderedDict()
    for name, (shape, fan_in) in schema(cfg).items():
        if fan_in is None:
            value = rng.normal(0.0, embed_std, size=shape)
        else:
            bound = 1.0 / np.sqrt(fan_in)
            value = rng.uniform(-bound, bound, size=shape)
        out[name] = value.astype(np.float32)
    return out


def check_params(cfg: ModelConfig, params: Dict[str, np.ndarray]) -> None:
    """Raise ValueError unless ``params`` has exactly the schema's names and shapes."""
    want = schema(cfg)
    if set(params) != set(want):
        missing = sorted(set(want) - set(params))
        extra = sorted(set(params) - set(want))
        raise ValueError("parameter names differ from the %s schema: missing %s, unexpected %s"
                         % (cfg.model, missing, extra))
    for name, (shape, _) in want.items():
        if tuple(np.shape(params[name])) != tuple(shape):
            raise ValueError("parameter %s has shape %s, the schema says %s"
                             % (name, tuple(np.shape(params[name])), shape))


def save_params(path: str, params: Dict[str, np.ndarray]) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in params.items()})


def load_params(path: str) -> Dict[str, np.ndarray]:
    with np.load(path) as data:
        return OrderedDict((k, data[k].copy()) for k in data.files)

