"""Matrix-multiply FLOPs of one forward pass, counted from the batch's real tokens and nodes.

Only the matmuls are counted (elementwise work is small next to them at
hidden 150); padding is not counted, so a strategy that computes on padding
gets no credit for it. A training step is counted as 3x the forward pass
(forward, and two matmuls per matmul in backward).
"""

from __future__ import annotations

from .batches import SeqBatch, TreeBatch
from .params import ModelConfig


def forward_flops(cfg: ModelConfig, batch) -> int:
    D, H, C = cfg.embed_dim, cfg.hidden, cfg.num_classes
    out = 2 * H * C * batch.size
    if isinstance(batch, SeqBatch):
        gates = 1 if cfg.model == "elman" else 4
        return out + batch.num_tokens * 2 * (D + H) * gates * H
    if isinstance(batch, TreeBatch):
        leaves = batch.num_tokens
        internal = batch.num_nodes - leaves
        leaf_w, node_w = (1, 1) if cfg.model == "rvnn" else (3, 5)
        if cfg.loss_mode == "all":
            out = 2 * H * C * batch.num_nodes
        return out + leaves * 2 * D * leaf_w * H + internal * 2 * (2 * H) * node_w * H
    raise TypeError("unknown batch type %s" % type(batch).__name__)


def train_flops(cfg: ModelConfig, batch) -> int:
    return 3 * forward_flops(cfg, batch)
