"""One benchmark cell, run inside its own process by the runner.

Order of work, and what is timed:

1. data, batches and canonical parameters are built (not timed);
2. every batch of the pool is prepared (host -> device, padding; not timed);
3. the first train step and the first inference call are timed alone: that is
   the first-call / compile time (before the gate, so that lazy compilation
   is not hidden inside it; the step is undone by reloading the parameters);
4. the verification gate (``bench.verify.gate``, its seconds in ``verify_s``):
   logits, loss, gradients and one optimiser step against the NumPy reference
   on the pool's extremes, both loss modes for tree models, and an unbucketed
   batch in the accuracy budget's order (a cell that fails is recorded
   ``failed`` and keeps no timing; the step is undone by reloading the parameters);
5. ``warmup_passes`` untimed passes over the pool (later bucket shapes compile here);
6. ``repeats`` timed passes over the pool for training, then for inference,
   each ended by a device sync; one sample per pass;
7. batch-1 latency: single examples, each call timed alone with a sync
   (6 and 7: an implementation whose work runs in another process times these
   loops itself, ``Implementation.timed_passes`` / ``timed_calls``, so IPC
   stays outside the clock);
8. optionally, the accuracy budget: fresh parameters, ``epochs`` of training,
   root accuracy on dev and test.
"""

from __future__ import annotations

import math
import os
import platform
import time
import traceback
from dataclasses import replace
from typing import Dict, List, Optional

import numpy as np

from . import registry, verify
from .batches import batch_examples, hash_batches, make_seq_batch, make_tree_batch
from .config import SCHEMA_VERSION, CellConfig
from .environment import limit_blas_threads, machine, peak_rss_mb
from .flops import forward_flops, train_flops
from .interface import DeviceUnavailable, NotApplicable, Unavailable
from .params import ModelConfig, init_params
from .stats import percentile
from .tasks import load_task

DATA_SEED = 0  # ListOps/synthetic content never depends on the model seed


def _loadavg() -> Optional[float]:
    """Other work on the machine shows up here; figures from a busy machine are noisier."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def base_record(cfg: CellConfig) -> Dict:
    """The record's identity fields, filled in even for cells that never run."""
    return {
        "schema_version": SCHEMA_VERSION,
        "cell_id": cfg.key(),
        "framework": cfg.framework,
        "framework_version": None,
        "model": cfg.model,
        "strategy": cfg.strategy,
        "task": cfg.task,
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "hidden": cfg.hidden,
        "embed_dim": cfg.embed_dim,
        "threads": cfg.threads,
        "seed": cfg.seed,
        "batch_hash": None,
        "status": None,
        "reason": "",
        "verify_max_abs_diff": None,
        "verify_grad_max_rel": None,
        "verify_loss_abs": None,
        "verify_param_max_abs": None,
        "verify_step_compared": None,
        "verify_batches": [],
        "verify_s": None,
        "compile_s": None,
        "first_infer_s": None,
        "warmup_s": None,
        "train_samples_per_s": [],
        "infer_samples_per_s": [],
        "train_tokens_per_s": [],
        "infer_tokens_per_s": [],
        "latency_ms": [],
        "latency_ms_p50": None,
        "latency_ms_p95": None,
        "peak_rss_mb": None,
        "device_peak_mb": None,
        "train_flops_per_sample": None,
        "infer_flops_per_sample": None,
        "gemm_flops": None,
        "accuracy": None,
        "python_version": platform.python_version(),
        "load_avg_1m_at_start": _loadavg(),
        "machine": machine(),
        "info": {},
        "config": cfg.to_dict(),
    }


def _model_config(cfg: CellConfig, dataset) -> ModelConfig:
    return ModelConfig(cfg.model, vocab_size=len(dataset.vocab), embed_dim=cfg.embed_dim,
                       hidden=cfg.hidden, num_classes=dataset.num_classes,
                       loss_mode=cfg.loss_mode, optimizer=cfg.optimizer, lr=cfg.lr)


def _make_batch(family: str, examples):
    return make_seq_batch(examples) if family == "rnn" else make_tree_batch(examples)


def _timed_passes(impl, call, prepared: List, sizes: List[int], tokens: List[int],
                  repeats: int):
    """Samples/s and tokens/s of each timed pass over the pool (sync inside the clock).

    An implementation that times its own passes (``Implementation.timed_passes``
    returns a list, e.g. a worker process, so that IPC stays outside the clock)
    supplies the pass durations instead of this loop."""
    per_s, tok_s = [], []
    n_samples, n_tokens = sum(sizes), sum(tokens)
    durations = impl.timed_passes(call.__name__, prepared, repeats)
    if durations is None:
        durations = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for ready in prepared:
                call(ready)
            impl.sync()
            durations.append(time.perf_counter() - t0)
    for dt in durations:
        per_s.append(n_samples / dt)
        tok_s.append(n_tokens / dt)
    return per_s, tok_s


def _first_call(impl, call, ready) -> float:
    t0 = time.perf_counter()
    out = call(ready)
    impl.sync()
    impl.to_numpy(out)  # materialise: lazy frameworks finish here
    return time.perf_counter() - t0


def _accuracy(impl, model_cfg, family, dataset, cfg: CellConfig) -> Dict:
    """Train fresh parameters for ``cfg.epochs`` epochs, then root accuracy on dev and test."""
    impl.load_params(init_params(model_cfg, cfg.seed))
    train = dataset.train
    if cfg.max_train_examples:
        train = train[:cfg.max_train_examples]
    steps_total = int(math.ceil(cfg.epochs * math.ceil(len(train) / cfg.batch_size)))
    steps, epoch, losses = 0, 0, []
    t0 = time.perf_counter()
    while steps < steps_total:
        for group in batch_examples(train, cfg.batch_size, seed=cfg.seed * 1000 + epoch):
            if steps >= steps_total:
                break
            loss = impl.train_step(impl.prepare(_make_batch(family, group)))
            steps += 1
            if steps % 50 == 0 or steps == steps_total:
                losses.append(float(np.asarray(impl.to_numpy(loss)).reshape(-1)[0]))
        epoch += 1
    impl.sync()
    out = {"epochs": cfg.epochs, "steps": steps, "train_s": time.perf_counter() - t0,
           "final_loss": losses[-1] if losses else None}
    for split in ("dev", "test"):
        correct = total = 0
        for group in batch_examples(dataset.splits[split], cfg.batch_size, seed=0, shuffle=False):
            batch = _make_batch(family, group)
            pred = np.argmax(impl.to_numpy(impl.logits(impl.prepare(batch))), axis=-1)
            gold = np.array([e.label for e in group])
            keep = gold >= 0
            correct += int((pred[keep] == gold[keep]).sum())
            total += int(keep.sum())
        out[split] = correct / total if total else None
    return out


def _gate(impl, cfg: CellConfig, model_cfg: ModelConfig, family: str, dataset, groups,
          params) -> Dict:
    """The verification gate's batches and its second loss mode, then ``verify.gate``.

    ``extremes``: ``verify.gate_examples`` of the whole timed pool; ``unbucketed``:
    the first examples of the accuracy budget's first epoch, in its order (shuffled,
    not bucketed). Tree models: the other loss mode on a second instance (built
    here, so its construction and compiles count in ``verify_s``).
    """
    pool_examples = [e for g in groups for e in g]
    n = min(len(pool_examples), verify.gate_size(cfg.batch_size, cfg.verify_examples))
    train = dataset.train[:cfg.max_train_examples] if cfg.max_train_examples else dataset.train
    order = [e for g in batch_examples(train, cfg.batch_size, seed=cfg.seed * 1000) for e in g]
    batches = [("extremes", _make_batch(family, verify.gate_examples(pool_examples, n))),
               ("unbucketed", _make_batch(family, order[:n]))]
    other, note = None, None
    if family == "rvnn":
        other_cfg = replace(model_cfg, loss_mode="all" if model_cfg.loss_mode == "root" else "root")
        try:
            other = (registry.load(cfg.framework, cfg.model)(other_cfg, cfg.strategy, cfg.device,
                                                              cfg.threads), other_cfg)
        except (NotApplicable, Unavailable) as exc:
            note = "%s loss not checked: %s" % (other_cfg.loss_mode, exc)
    return verify.gate(impl, model_cfg, params, batches, trains=impl.trains, other=other,
                       other_note=note)


def run_cell(cfg: CellConfig, framework_version: Optional[str] = None) -> Dict:
    """Measure one cell; always returns a record (status ok / failed / unavailable / not-applicable)."""
    rec = base_record(cfg)
    rec["framework_version"] = framework_version
    t_start = time.perf_counter()
    try:
        _run(cfg, rec)
    except MemoryError:
        rec["status"], rec["reason"] = "oom", "MemoryError in the cell"
    except Exception as exc:  # recorded, never raised: the run goes on
        rec["status"] = "failed"
        rec["reason"] = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        rec["traceback"] = traceback.format_exc()[-4000:]
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["wall_s"] = time.perf_counter() - t_start
    return rec


def _run(cfg: CellConfig, rec: Dict) -> None:
    family = cfg.family
    dataset = load_task(cfg.task, seed=DATA_SEED)
    model_cfg = _model_config(cfg, dataset)
    groups = batch_examples(dataset.train, cfg.batch_size, seed=cfg.seed, bucket=True,
                            drop_last=len(dataset.train) >= cfg.batch_size)[:cfg.pool_batches]
    pool = [_make_batch(family, g) for g in groups]
    rec["batch_hash"] = hash_batches(pool)

    try:
        impl = registry.load(cfg.framework, cfg.model)(model_cfg, cfg.strategy, cfg.device,
                                                      cfg.threads)
    except NotApplicable as exc:
        rec["status"], rec["reason"] = "not-applicable", str(exc)
        return
    except Unavailable as exc:
        rec["status"], rec["reason"] = "unavailable", str(exc)
        if isinstance(exc, DeviceUnavailable):
            rec["unavailable_scope"] = "device"
        return

    # After the framework import (which may load its own BLAS), before any work.
    rec["info"]["blas_threads"] = limit_blas_threads(cfg.threads)
    params = init_params(model_cfg, cfg.seed)
    impl.load_params(params)
    prepared = [impl.prepare(b) for b in pool]

    # The first calls come before the gate: a framework that traces or compiles
    # lazily would otherwise compile inside the gate, and its first timed call
    # would look free. The step they take is undone before the gate. Training is
    # declared (Implementation.trains), never inferred: a NotImplementedError
    # from a declared hook fails the cell like any other error.
    can_train = impl.trains
    if can_train:
        rec["compile_s"] = _first_call(impl, impl.train_step, prepared[0])
    rec["first_infer_s"] = _first_call(impl, impl.logits, prepared[0])
    if rec["compile_s"] is None:
        rec["compile_s"] = rec["first_infer_s"]
    impl.load_params(params)

    # Equivalence before any timed pass; a cell that fails keeps no timing.
    t0 = time.perf_counter()
    result = _gate(impl, cfg, model_cfg, family, dataset, groups, params)
    impl.load_params(params)   # undoes the gate's optimiser step (and resets the optimiser)
    rec["verify_s"] = time.perf_counter() - t0
    rec["verify_max_abs_diff"] = result["logits_max_abs"]
    rec["verify_grad_max_rel"] = result["grad_max_rel"]
    rec["verify_loss_abs"] = result["loss_abs"]
    rec["verify_param_max_abs"] = result["param_max_abs"]
    rec["verify_step_compared"] = result["step_compared"]
    rec["verify_batches"] = result["batches"]
    if result.get("other_loss_mode"):
        rec["info"]["verify_other_loss_mode"] = result["other_loss_mode"]
    if not result["ok"]:
        rec["status"] = "failed"
        rec["reason"] = "not equivalent: " + "; ".join(result["problems"])
        rec["compile_s"] = rec["first_infer_s"] = None
        return

    sizes = [b.size for b in pool]
    tokens = [b.num_tokens for b in pool]
    n = float(sum(sizes))
    rec["infer_flops_per_sample"] = sum(forward_flops(model_cfg, b) for b in pool) / n
    rec["train_flops_per_sample"] = sum(train_flops(model_cfg, b) for b in pool) / n

    t0 = time.perf_counter()
    for _ in range(cfg.warmup_passes):
        for ready in prepared:
            if can_train:
                impl.train_step(ready)
            impl.logits(ready)
    # Every pool shape must be warm before timing, even with warmup_passes=0.
    for ready in prepared[1:]:
        if can_train:
            impl.train_step(ready)
        impl.logits(ready)
    impl.sync()
    rec["warmup_s"] = time.perf_counter() - t0

    if can_train:
        rec["train_samples_per_s"], rec["train_tokens_per_s"] = _timed_passes(
            impl, impl.train_step, prepared, sizes, tokens, cfg.repeats)
    else:
        rec["reason"] = "inference only: this implementation declares no training step"
    rec["infer_samples_per_s"], rec["infer_tokens_per_s"] = _timed_passes(
        impl, impl.logits, prepared, sizes, tokens, cfg.repeats)

    # Batch-1 latency on dev examples; each shape is called once untimed first.
    singles = [impl.prepare(_make_batch(family, [e]))
               for e in dataset.splits["dev"][:cfg.latency_samples]]
    for ready in singles:
        impl.logits(ready)
    impl.sync()
    own = impl.timed_calls("logits", singles)   # seconds timed by the implementation, or None
    if own is not None:
        lat = [s * 1000.0 for s in own]
    else:
        lat = []
        for ready in singles:
            t0 = time.perf_counter()
            impl.logits(ready)
            impl.sync()
            lat.append((time.perf_counter() - t0) * 1000.0)
    rec["latency_ms"] = lat
    rec["latency_ms_p50"] = percentile(lat, 50)
    rec["latency_ms_p95"] = percentile(lat, 95)

    try:
        rec["gemm_flops"] = impl.gemm_flops()
    except NotImplementedError:
        pass

    if cfg.epochs > 0 and can_train:
        rec["accuracy"] = _accuracy(impl, model_cfg, family, dataset, cfg)

    peak = impl.device_peak_bytes()
    rec["device_peak_mb"] = peak / 2 ** 20 if peak is not None else None
    rec["info"].update(impl.info())
    rec["status"] = "ok"
