"""Equivalence against the NumPy reference: one tolerance table, used by tests and cells."""

from __future__ import annotations

from typing import Dict

import numpy as np

from . import reference
from .params import ModelConfig

# float32 implementation vs the float64 reference: the limits every equivalence check uses.
TOLERANCE = {
    "logits_abs": 1e-4,   # max |logit difference|
    "loss_abs": 1e-4,     # |loss difference|
    "grad_rel": 1e-3,     # per parameter: max |g - g_ref| / max |g_ref|
    "param_abs": 1e-5,    # after one SGD step, max |p - p_ref|
}


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError("shapes differ: %s vs %s" % (a.shape, b.shape))
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (b is the reference); 0 when both are all zero."""
    scale = float(np.max(np.abs(np.asarray(b, np.float64)))) if np.size(b) else 0.0
    diff = max_abs(a, b)
    if scale == 0.0:
        return diff
    return diff / scale


def grad_errors(grads: Dict[str, np.ndarray], ref: Dict[str, np.ndarray]) -> Dict[str, float]:
    if set(grads) != set(ref):
        raise ValueError("gradient names differ: %s vs %s" % (sorted(grads), sorted(ref)))
    return {k: rel_err(grads[k], ref[k]) for k in ref}


def check(impl, cfg: ModelConfig, params: Dict[str, np.ndarray], batch,
          grads: bool = True) -> Dict:
    """Compare an implementation (already holding ``params``) with the reference on ``batch``.

    Returns a dict with the measured differences and ``ok``; never raises on a
    mismatch (the caller records it).
    """
    ready = impl.prepare(batch)
    ref_logits = reference.logits(cfg, params, batch, np.float64)
    got = impl.to_numpy(impl.logits(ready))
    out = {"logits_max_abs": max_abs(got, ref_logits)}
    problems = []
    if out["logits_max_abs"] > TOLERANCE["logits_abs"] or not np.isfinite(got).all():
        problems.append("logits differ by %.3g" % out["logits_max_abs"])
    if grads:
        ref_loss, ref_grads = reference.loss_and_grads(cfg, params, batch, np.float64)
        loss, got_grads = impl.loss_and_grads(ready)
        out["loss_abs"] = abs(float(loss) - ref_loss)
        errs = grad_errors(got_grads, ref_grads)
        worst = max(errs, key=errs.get)
        out["grad_max_rel"] = errs[worst]
        if out["loss_abs"] > TOLERANCE["loss_abs"]:
            problems.append("loss differs by %.3g" % out["loss_abs"])
        if not errs[worst] <= TOLERANCE["grad_rel"]:
            problems.append("gradient of %s differs by %.3g (relative)" % (worst, errs[worst]))
    out["ok"] = not problems
    out["problems"] = problems
    return out
