"""The verification gate: equivalence against the NumPy reference, one tolerance table.

Tests and cells use the same checks. A cell runs ``gate`` before it times
anything (``bench.cell``), on batches that reach what its timed pool and its
accuracy budget reach:

* ``extremes``: ``gate_examples`` of the timed pool: its longest sequence, its
  deepest tree, its shortest example (so padding is exercised) and examples
  spread over the lengths in between, in an order that is not sorted by length;
  the pool's batch size, at least ``GATE_MIN`` and at most ``GATE_MAX``
  examples. Checked: logits, loss, gradients, and one optimiser step (the
  parameters after ``train_step`` against the reference's update). Tree models
  are checked in both loss modes (the other mode on a second instance built
  with that mode: implementations read it at construction).
* ``unbucketed``: as many examples in the order accuracy training draws them
  (shuffled, not bucketed by length). Checked: logits, loss, gradients.
* ``pool``: the timed pool's first batch, as it is timed (length-bucketed). Checked:
  logits (its shape is the one the first calls compiled, so the check compiles nothing
  more; an implementation that takes another path on such a batch is seen here).

``check`` and ``check_step`` never raise on a mismatch: they return the
measured differences, ``ok`` and ``problems`` (the caller records them).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import reference
from .batches import SeqBatch
from .interface import NotApplicable
from .params import ModelConfig

# float32 implementation vs the float64 reference: the limits every equivalence check uses.
TOLERANCE = {
    "logits_abs": 1e-4,   # max |logit difference|
    "loss_abs": 1e-4,     # |loss difference|
    "grad_rel": 1e-3,     # per parameter: max |g - g_ref| / max |g_ref|
    # after one optimiser step from the same parameters, max |p - p_ref| over the
    # compared entries (all of them for SGD and Adagrad; for Adam those
    # reference.optimizer_steps keeps: gradient clearly above float32 noise, and
    # PyTorch's and Keras' epsilon placements agree to param_abs / 4)
    "param_abs": 1e-5,
}

# The gate's second optimiser step, at this weight decay, whatever the cell's (0 included):
# a framework that drops the decay, halves it or applies it after the optimiser's scaling
# lands elsewhere. Large on purpose: with lr 1e-3, a decay of 0.01 moves an SGD or Adagrad
# step by ~1e-6 |theta|, under param_abs; at 0.5 it moves most entries by 1e-5 .. 1e-4, and
# Adam's (sign-like) first step turns for every entry where |g| < 0.5 |theta| with the
# other sign, and for every embedding row the batch does not read (g = 0).
DECAY_PROBE = 0.5

GATE_MIN = 8    # examples in a gate batch, unless the pool has fewer
GATE_MAX = 32   # the float64 reference (a Python loop over tree nodes) costs linearly in it


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


def zero_gradients(grads: Dict[str, np.ndarray]) -> List[str]:
    """Names of the parameters whose (reference) gradient is all zero: comparing
    those proves nothing (an unlabelled batch, a parameter the batch never reaches)."""
    return sorted(k for k, g in grads.items() if not np.any(np.asarray(g)))


def grad_errors(grads: Dict[str, np.ndarray], ref: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Per parameter, ``rel_err`` of ``grads`` against ``ref``; refuses an all-zero
    reference gradient, where any implementation returning zeros would pass."""
    if set(grads) != set(ref):
        raise ValueError("gradient names differ: %s vs %s" % (sorted(grads), sorted(ref)))
    vacuous = zero_gradients(ref)
    if vacuous:
        raise ValueError("vacuous comparison: the reference gradient of %s is all zero "
                         "(unlabelled batch?)" % ", ".join(vacuous))
    return {k: rel_err(grads[k], ref[k]) for k in ref}


# --- which examples the gate checks ---

def gate_size(batch_size: int, at_least: int = 0) -> int:
    """Examples in a gate batch: the pool's batch size, clipped to [GATE_MIN, GATE_MAX],
    and never fewer than ``at_least`` (a cell's ``verify_examples``)."""
    return max(at_least, GATE_MIN, min(batch_size, GATE_MAX))


def gate_examples(examples: Sequence, n: int) -> List:
    """``n`` examples (all, if there are fewer) that reach the extremes of ``examples``.

    Always the longest sequence, the deepest tree and the shortest example; the
    rest spread evenly over the length order. Returned in zigzag length order
    (shortest, longest, 2nd shortest, 2nd longest, ...) so that no strategy sees
    a batch already sorted by length.
    """
    if not examples:
        raise ValueError("no examples to check")
    idx = range(len(examples))
    length = [len(e.tokens) for e in examples]
    by_length = sorted(idx, key=lambda i: (length[i], i))
    must = [by_length[-1], max(idx, key=lambda i: (examples[i].tree.height, length[i], -i)),
            by_length[0]]
    picks: List[int] = []
    for i in must + [by_length[int(round(q))] for q in np.linspace(0, len(examples) - 1, n)] \
            + by_length:
        if len(picks) >= n:
            break
        if i not in picks:
            picks.append(i)
    picks.sort(key=lambda i: (length[i], i))
    zigzag = [picks[k // 2] if k % 2 == 0 else picks[-1 - k // 2] for k in range(len(picks))]
    return [examples[i] for i in zigzag]


def describe(batch, loss_mode: str) -> Dict:
    """What a gate batch covers: size, length range, tree height, loss mode."""
    if isinstance(batch, SeqBatch):
        lengths = batch.lengths
        height = None
    else:
        lengths = np.bincount(batch.tree[batch.token >= 0], minlength=batch.size)
        height = int(batch.height.max())
    return {"examples": batch.size, "max_length": int(lengths.max()),
            "min_length": int(lengths.min()), "max_height": height, "loss_mode": loss_mode}


# --- the checks ---

def _one_blas_thread():
    """A context in which BLAS runs one thread (threadpoolctl, when installed).

    The reference is a chain of small products: a second BLAS thread gains
    nothing there, and on a busy machine its spin-waits made the float64 LSTM
    reference of a quick gate 16x slower (19 s instead of 1.2 s, load 16). Only
    the reference's calls run inside it; the implementation keeps its threads.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def check(impl, cfg: ModelConfig, params: Dict[str, np.ndarray], batch, grads: bool = True,
          logits: bool = True, keep_ref: bool = False) -> Dict:
    """Compare an implementation (already holding ``params``) with the reference on ``batch``:
    logits, and with ``grads`` the loss and every parameter's gradient (``keep_ref``:
    the reference gradients come back as ``ref_grads``, for ``check_step``)."""
    ready = impl.prepare(batch)
    out: Dict = {}
    problems = []
    if logits:
        with _one_blas_thread():
            ref_logits = reference.logits(cfg, params, batch, np.float64)
        got = impl.to_numpy(impl.logits(ready))
        out["logits_max_abs"] = max_abs(got, ref_logits)
        if not out["logits_max_abs"] <= TOLERANCE["logits_abs"] or not np.isfinite(got).all():
            problems.append("logits differ by %.3g" % out["logits_max_abs"])
    if grads:
        with _one_blas_thread():
            ref_loss, ref_grads = reference.loss_and_grads(cfg, params, batch, np.float64)
        if keep_ref:
            out["ref_grads"] = ref_grads
        loss, got_grads = impl.loss_and_grads(ready)
        out["loss_abs"] = abs(float(loss) - ref_loss)
        if not out["loss_abs"] <= TOLERANCE["loss_abs"]:
            problems.append("loss differs by %.3g" % out["loss_abs"])
        if len(zero_gradients(ref_grads)) == len(ref_grads):
            problems.append("vacuous: every reference gradient is zero (no labelled point)")
        else:
            if set(got_grads) != set(ref_grads):
                raise ValueError("gradient names differ: %s vs %s"
                                 % (sorted(got_grads), sorted(ref_grads)))
            errs = {k: rel_err(got_grads[k], ref_grads[k]) for k in ref_grads}
            worst = max(errs, key=errs.get)
            out["grad_max_rel"] = errs[worst]
            if not errs[worst] <= TOLERANCE["grad_rel"]:
                problems.append("gradient of %s differs by %.3g (relative)" % (worst, errs[worst]))
    out["ok"] = not problems
    out["problems"] = problems
    return out


def check_step(impl, cfg: ModelConfig, params: Dict[str, np.ndarray], batch,
               ref_grads: Optional[Dict[str, np.ndarray]] = None) -> Dict:
    """One ``train_step`` from ``params`` (loaded just before, so the optimiser state
    is fresh) lands where the reference's update of ``cfg.optimizer`` does.

    Leaves the implementation one step on: the caller reloads ``params``.
    """
    with _one_blas_thread():
        want, masks = reference.optimizer_steps(cfg, params, batch, 1, first_grads=ref_grads,
                                                adam_eps=reference.ADAM_EPS,
                                                agree=TOLERANCE["param_abs"] / 4)
    impl.train_step(impl.prepare(batch))
    impl.sync()
    got = impl.export_params()
    if set(got) != set(want):
        raise ValueError("parameter names differ: %s vs %s" % (sorted(got), sorted(want)))
    errs, compared, total = {}, 0, 0
    for k, mask in masks.items():
        g = np.asarray(got[k], np.float64)
        if g.shape != want[k].shape:
            raise ValueError("parameter %s has shape %s after the step, not %s"
                             % (k, g.shape, want[k].shape))
        diff = np.abs(g - want[k])
        bad = ~np.isfinite(g)
        errs[k] = float("inf") if bad.any() else float(diff[mask].max()) if mask.any() else 0.0
        compared += int(mask.sum())
        total += mask.size
    worst = max(errs, key=errs.get)
    out = {"param_max_abs": errs[worst], "step_compared": compared / float(total)}
    problems = []
    if not errs[worst] <= TOLERANCE["param_abs"]:
        problems.append("%s step: parameter %s off by %.3g" % (cfg.optimizer, worst, errs[worst]))
    if not compared:
        problems.append("vacuous: no parameter entry could be compared after the step")
    out["ok"] = not problems
    out["problems"] = problems
    return out


def check_decay_step(impl, cfg: ModelConfig, params: Dict[str, np.ndarray], batch,
                     ref_grads: Optional[Dict[str, np.ndarray]] = None,
                     weight_decay: float = DECAY_PROBE) -> Dict:
    """``check_step`` with the implementation switched to ``weight_decay``
    (``Implementation.set_weight_decay``), then back to ``cfg.weight_decay``.

    An implementation that refuses a decay (``weight_decay_refusal``) passes, with its
    reason in ``not_applicable``: its cells with a non-zero decay are not applicable.
    Leaves the implementation one step on: the caller reloads ``params``.
    """
    try:
        impl.set_weight_decay(weight_decay)
    except NotApplicable as exc:
        return {"ok": True, "problems": [], "param_max_abs": None, "not_applicable": str(exc)}
    try:
        impl.load_params(params)   # a fresh optimiser state, with the decay
        return check_step(impl, replace(cfg, weight_decay=weight_decay), params, batch,
                          ref_grads=ref_grads)
    finally:
        impl.set_weight_decay(cfg.weight_decay)


def gate(impl, cfg: ModelConfig, params: Dict[str, np.ndarray],
         batches: Sequence[Tuple[str, object]], trains: bool = True,
         other: Optional[Tuple[object, ModelConfig]] = None,
         other_note: Optional[str] = None,
         logits_only: Sequence[Tuple[str, object]] = ()) -> Dict:
    """The whole gate for a cell: ``check`` on every named batch, ``check_step`` on the
    first (if the implementation trains) at the cell's weight decay and, unless that is
    ``DECAY_PROBE``, again at ``DECAY_PROBE`` (``check_decay_step``), loss and gradients
    of the first in the other loss mode (``other``: an implementation built with that
    mode, and its config), and the logits alone on each of ``logits_only``.

    ``impl`` must hold ``params`` with a fresh optimiser state; afterwards it is one
    step on (the caller reloads ``params``). ``other`` is loaded here.
    Returns ``ok``, ``problems`` (each prefixed with its batch), the worst
    differences and ``batches`` (``describe`` of each, with the checks run).
    """
    out: Dict = {"logits_max_abs": 0.0, "loss_abs": 0.0, "grad_max_rel": 0.0,
                 "param_max_abs": None, "step_compared": None, "batches": [], "problems": []}

    def merge(name, res, checks, batch, mode):
        for key in ("logits_max_abs", "loss_abs", "grad_max_rel"):
            if res.get(key) is not None:
                out[key] = max(out[key], res[key])
        out["problems"] += ["%s (%s loss): %s" % (name, mode, p) for p in res["problems"]]
        out["batches"].append(dict(describe(batch, mode), name=name, checks=checks))

    first_grads = None
    for name, batch in batches:
        res = check(impl, cfg, params, batch, keep_ref=True)
        first_grads = res.pop("ref_grads") if first_grads is None else first_grads
        merge(name, res, ["logits", "loss", "gradients"], batch, cfg.loss_mode)
    for name, batch in logits_only:
        merge(name, check(impl, cfg, params, batch, grads=False), ["logits"], batch,
              cfg.loss_mode)
    if other is not None:
        other_impl, other_cfg = other
        other_impl.load_params(params)
        name, batch = batches[0]
        res = check(other_impl, other_cfg, params, batch, logits=False)
        merge(name, res, ["loss", "gradients"], batch, other_cfg.loss_mode)
    elif other_note:
        out["other_loss_mode"] = other_note
    if trains:  # last: the step moves the parameters every check above starts from
        _gate_steps(out, impl, cfg, params, batches[0], first_grads)
    out["ok"] = not out["problems"]
    return out


def _gate_steps(out: Dict, impl, cfg: ModelConfig, params: Dict[str, np.ndarray],
                first: Tuple[str, object], first_grads: Optional[Dict[str, np.ndarray]]) -> None:
    """The gate's step checks on its first batch, into ``out``: ``check_step`` at the cell's
    weight decay and, unless that is ``DECAY_PROBE``, ``check_decay_step``."""
    name, batch = first
    step = check_step(impl, cfg, params, batch, ref_grads=first_grads)
    out["param_max_abs"], out["step_compared"] = step["param_max_abs"], step["step_compared"]
    out["problems"] += ["%s: %s" % (name, p) for p in step["problems"]]
    out["batches"][0]["checks"].append("%s step" % cfg.optimizer
                                       + (" (weight decay %g)" % cfg.weight_decay
                                          if cfg.weight_decay else ""))
    if cfg.weight_decay != DECAY_PROBE:
        decay = check_decay_step(impl, cfg, params, batch, ref_grads=first_grads)
        if decay.get("not_applicable"):
            out["weight_decay"] = "not checked: %s" % decay["not_applicable"]
        else:
            out["param_max_abs"] = max(out["param_max_abs"], decay["param_max_abs"])
            out["problems"] += ["%s (weight decay %g): %s" % (name, DECAY_PROBE, p)
                                for p in decay["problems"]]
            out["batches"][0]["checks"].append("%s step (weight decay %g)"
                                               % (cfg.optimizer, DECAY_PROBE))
