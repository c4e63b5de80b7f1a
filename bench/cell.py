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
5. every pool shape once (later bucket shapes compile here), then ``warmup_passes``
   untimed passes over the pool, fewer for a slow cell (a quarter of
   ``timed_budget_s`` bounds the warm-up's extra passes);
6. ``repeats`` timed samples for training, then for inference, each ended by a
   device sync; a sample is k or more passes over the pool, k calibrated once (one
   more untimed pass) so that a sample lasts about ``min_repeat_s``, and passes are
   added while it has lasted less (``passes_per_sample``: each sample's passes);
   a slow cell takes fewer samples, at least ``MIN_REPEATS``, so that each call's
   samples fit in half of ``timed_budget_s`` (planned from the calibration pass, and
   stopped once spent; ``repeats_run`` says how many ran, ``repeats_cut`` whether
   the budget cut them);
   around them, what else the machine did (``noise``, ``noisy``:
   ``bench.environment.NoiseProbe``);
7. batch-1 latency: single examples, each call timed alone with a sync
   (6 and 7: an implementation whose work runs in another process times these
   loops itself, ``Implementation.timed_passes`` / ``timed_calls``, so IPC
   stays outside the clock);
8. optionally, the accuracy budget: fresh parameters, ``epochs`` of training,
   root accuracy on dev and test; or, for a ``readout`` cell, reservoir training
   (frozen weights, a ridge readout fitted on their features: ``_readout``).

Every record has ``phase_s``, the seconds each phase took (``PHASES``): all but
``timed`` is the runner's overhead for the cell. While a cell runs, its current
phase (and timed sample k of n) is in a small status file the runner polls for its
progress line; it is written between passes, never inside one.

A cell that reports a throughput, token rate or latency that is not finite and
positive is recorded ``failed`` with the reason: no such number is published.
The cell process dies with its runner and at its own deadline (``guard``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import threading
import time
import traceback
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import readout, reference, registry, verify
from .batches import batch_examples, hash_batches, make_batch
from .config import MIN_REPEATS, CellConfig
from .environment import (NoiseProbe, limit_blas_threads, machine, peak_rss_mb, thread_times,
                          wait_share)
from .flops import forward_flops, train_flops
from .interface import DeviceUnavailable, NotApplicable, Unavailable
from .params import ModelConfig, init_params
from .records import SCHEMA_VERSION
from .stats import percentile
from .tasks import load_task

DATA_SEED = 0  # ListOps/synthetic content never depends on the model seed

# Exit codes of `python -m bench cell` that the runner reads when no result came back.
WATCHDOG_EXIT = 124       # the cell's own deadline passed, or its runner went away
RESULT_UNWRITABLE = 74    # the result file could not be written (EX_IOERR)
RESULT_DISK_FULL = 75     # ... because the disk is full: the runner stops the run (exit 3)
WATCHDOG_GRACE_S = 10.0   # the runner kills at timeout_s; the cell's own deadline comes later

# Test-only knob: tests/test_faults.py makes real cell processes misbehave through it.
# Never set it for a measurement (a record made with it says so in info.test_fault).
#   sleep:S    sleep S seconds before any work (a slow cell to kill or time out)
#   timing:X   every timed pass reports X seconds (nan, 0, -1: impossible throughputs)
#   alloc:MB   hold MB of touched memory before any work (out-of-memory tests)
TEST_FAULT_ENV = "BENCH_TEST_CELL_FAULT"
_HELD = []   # what alloc:MB holds for the life of the process


def _test_fault(kind: str) -> Optional[str]:
    name, _, value = os.environ.get(TEST_FAULT_ENV, "").partition(":")
    return value if name == kind else None


# Where a cell's time goes (rec["phase_s"], seconds). startup: from the runner starting the
# process to the cell's first line (interpreter, bench's own imports); data: the task (SST
# from its parse cache, or parsed); imports: the framework and the model object; pool:
# batches built and prepared, parameters loaded; first_call: the first train step and
# inference call (compile); gate: the equivalence check; warmup; timed: the timed passes;
# latency: batch-1 calls; gemm: the framework's GEMM peak (for roofline %); accuracy: the
# training budget; exit: result written, interpreter shut down, result read by the runner
# (the runner adds it).
PHASES = ("startup", "data", "imports", "pool", "first_call", "gate", "warmup", "timed",
          "latency", "gemm", "accuracy", "exit")


class Phases:
    """Adds up seconds per phase into a dict and tells the runner the current phase.

    The status file holds one JSON object ({"phase", "detail"}), replaced whole; updates
    within a phase (sample k of n) are written at most every ``min_interval_s``.
    """

    def __init__(self, seconds: Dict[str, float], status_path: Optional[str] = None,
                 min_interval_s: float = 0.25):
        self.seconds = seconds
        self.path = status_path
        self.min_interval_s = min_interval_s
        self.name: Optional[str] = None
        self.t0 = time.perf_counter()
        self.written = -math.inf

    def enter(self, name: Optional[str], detail: str = "") -> None:
        """Close the current phase (its seconds are added) and open ``name`` (None: none)."""
        now = time.perf_counter()
        if self.name is not None:
            self.seconds[self.name] = self.seconds.get(self.name, 0.0) + (now - self.t0)
        self.name, self.t0 = name, now
        if name is not None:
            self.say(detail, force=True)

    def say(self, detail: str, force: bool = False) -> None:
        if not self.path or self.name is None:
            return
        now = time.monotonic()
        if not force and now - self.written < self.min_interval_s:
            return
        self.written = now
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"phase": self.name, "detail": detail}, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass   # progress is best effort; the record is what counts


_PHASES = Phases({})   # the running cell's (run_cell replaces it)


def _phase(name: Optional[str], detail: str = "") -> None:
    _PHASES.enter(name, detail)


def read_status(path: str) -> Optional[Dict]:
    """The phase a running cell last reported ({"phase", "detail"}), or None."""
    try:
        with open(path, encoding="utf-8") as fh:
            status = json.load(fh)
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def guard(parent_pid: int, timeout_s: float, grace_s: float = WATCHDOG_GRACE_S) -> None:
    """Make this cell process die with its runner and at its own deadline.

    On Linux the kernel sends SIGKILL when the runner dies, however it dies
    (PR_SET_PDEATHSIG; it fires when the runner thread that started the cell
    ends, and the runner starts cells from its main thread). The runner may
    have died before prctl took effect: then getppid() already names another
    process. A watchdog thread covers the rest (other platforms, a runner that
    lives on but stopped waiting): it ends the process when its parent changes
    or ``timeout_s`` plus a grace period has passed. It needs the GIL, so a
    framework call that holds the GIL for long delays it; the runner's own
    timeout kills the whole process group regardless.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(WATCHDOG_EXIT)
    deadline = time.monotonic() + timeout_s + grace_s

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(WATCHDOG_EXIT)
            if time.monotonic() > deadline:
                sys.stderr.write("cell: own deadline passed (%g s + %g s grace)\n"
                                 % (timeout_s, grace_s))
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT)
            time.sleep(0.5)

    threading.Thread(target=watch, name="cell-watchdog", daemon=True).start()


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
        "weight_decay": cfg.weight_decay,
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
        "warmup_passes_run": None,
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
        "passes_per_sample": None,
        "repeats_run": None,
        "repeats_cut": None,
        "train_wait_shares": [],
        "infer_wait_shares": [],
        "noise": None,
        "noisy": None,
        "accuracy": None,
        "python_version": platform.python_version(),
        "load_avg_1m_at_start": _loadavg(),
        "machine": machine(),
        "info": {},
        "config": cfg.to_dict(),
    }


def model_config(cfg: CellConfig, dataset) -> ModelConfig:
    """The model and training settings a cell gives its implementation (and the gate's
    reference): the cell's own, with the dataset's vocabulary and class count."""
    return ModelConfig(cfg.model, vocab_size=len(dataset.vocab), embed_dim=cfg.embed_dim,
                       hidden=cfg.hidden, num_classes=dataset.num_classes,
                       loss_mode=cfg.loss_mode, optimizer=cfg.optimizer, lr=cfg.lr,
                       weight_decay=cfg.weight_decay)


def calibrate(impl, call, prepared: List, min_repeat_s: float, cap: int = 1000
              ) -> Tuple[int, Optional[float]]:
    """How many passes over the pool one timed sample takes so that it lasts at least
    ``min_repeat_s``, and the seconds of the pass that told: one more untimed pass is
    timed, k = ceil(min_repeat_s / its seconds) (at most ``cap``). 0 seconds: one pass,
    no calibration pass (and no seconds)."""
    if min_repeat_s <= 0:
        return 1, None
    t0 = time.perf_counter()
    for ready in prepared:
        call(ready)
    impl.sync()
    once = time.perf_counter() - t0
    return (int(min(cap, max(1, math.ceil(min_repeat_s / once)))) if once > 0 else cap), once


def planned_repeats(repeats: int, budget_s: float, sample_s: Optional[float]) -> int:
    """Samples that fit in ``budget_s`` when one lasts about ``sample_s``: ``repeats`` at
    most, ``MIN_REPEATS`` at least (``repeats`` when there is no budget or no estimate)."""
    if budget_s <= 0 or not sample_s or sample_s <= 0:
        return repeats
    return max(min(repeats, MIN_REPEATS), min(repeats, int(budget_s // sample_s)))


def _timed_passes(impl, call, prepared: List, sizes: List[int], tokens: List[int],
                  repeats: int, passes: int = 1, min_s: float = 0.0, budget_s: float = 0.0):
    """Samples/s, tokens/s and run-queue wait share (``environment.wait_share``: how much of
    the sample other work held the CPU; None where unknown) of each timed sample (sync inside
    the clock); a sample is at least ``passes`` passes over the pool, back to back
    (``calibrate``), and more while it has lasted less than ``min_s`` (the host clock is read
    between passes without a sync: it can only run behind the device, so the guarantee holds).
    Once the samples have lasted ``budget_s`` in all (0: no budget), no more are taken
    beyond ``MIN_REPEATS``. Returns also the passes of each sample.

    An implementation that times its own passes (``Implementation.timed_passes``
    returns a list, e.g. a worker process, so that IPC stays outside the clock)
    supplies the sample durations instead of this loop (its "pool" is then the
    pool repeated ``passes`` times)."""
    per_s, tok_s = [], []
    what = "train" if call.__name__ == "train_step" else "inference"
    _PHASES.say("%s sample 1/%d (%d pool passes or more each)" % (what, repeats, passes), force=True)
    durations = impl.timed_passes(call.__name__, list(prepared) * passes, repeats)
    waits: List[Optional[float]] = [None] * len(durations or [])
    counts = [passes] * len(durations or [])
    if durations is None:
        durations, waits, counts = _sample_loop(impl, call, prepared, repeats, passes, min_s, what,
                                                budget_s)
    fault = _test_fault("timing")
    if fault is not None:
        durations = [float(fault)] * len(durations)
    for dt, k in zip(durations, counts):
        # A zero duration is an impossible measurement, not a crash: run_cell fails the cell.
        per_s.append(sum(sizes) * k / dt if dt else math.inf)
        tok_s.append(sum(tokens) * k / dt if dt else math.inf)
    return per_s, tok_s, [None if w is None else round(w, 4) for w in waits], counts


def _sample_loop(impl, call, prepared: List, repeats: int, passes: int, min_s: float, what: str,
                 budget_s: float = 0.0):
    """``_timed_passes``' own clock: (seconds, wait share, passes) of each sample."""
    durations: List[float] = []
    waits: List[Optional[float]] = []
    counts: List[int] = []
    for _ in range(repeats):
        before = thread_times()
        done = 0
        t0 = time.perf_counter()
        while done < passes or time.perf_counter() - t0 < min_s:
            for ready in prepared:
                call(ready)
            done += 1
        impl.sync()
        durations.append(time.perf_counter() - t0)
        waits.append(wait_share(before, thread_times()))
        counts.append(done)
        if budget_s > 0 and len(durations) >= MIN_REPEATS and sum(durations) >= budget_s:
            break
        if len(durations) < repeats:
            _PHASES.say("%s sample %d/%d (%d pool passes or more each)"
                        % (what, len(durations) + 1, repeats, passes))
    return durations, waits, counts


# Every number here must be finite and positive for the cell to be `ok`.
MEASURED_SAMPLES = ("train_samples_per_s", "infer_samples_per_s", "train_tokens_per_s",
                    "infer_tokens_per_s", "latency_ms")


def impossible_samples(rec: Dict) -> List[str]:
    """Fields whose samples are not all finite and positive, with the offending values."""
    bad = []
    for name in MEASURED_SAMPLES:
        wrong = [x for x in rec.get(name) or []
                 if not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0]
        if wrong:
            bad.append("%s has %s" % (name, ", ".join(repr(x) for x in wrong[:3])))
    return bad


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
            loss = impl.train_step(impl.prepare(make_batch(family, group)))
            steps += 1
            if steps % 50 == 0 or steps == steps_total:
                losses.append(float(np.asarray(impl.to_numpy(loss)).reshape(-1)[0]))
        epoch += 1
    impl.sync()
    out = {"epochs": cfg.epochs, "steps": steps, "train_s": time.perf_counter() - t0,
           "final_loss": losses[-1] if losses else None}
    for split in ("dev", "test"):
        out[split] = root_accuracy(impl, family, dataset.splits[split], cfg.batch_size)
    return out


def root_accuracy(impl, family: str, examples, batch_size: int) -> Optional[float]:
    """The fraction of labelled roots the implementation classifies right, in batches of
    ``batch_size`` in the examples' order (examples labelled -1 are not scored; None when
    none is labelled)."""
    correct = total = 0
    for group in batch_examples(examples, batch_size, seed=0, shuffle=False):
        pred = np.argmax(impl.to_numpy(impl.logits(impl.prepare(make_batch(family, group)))),
                         axis=-1)
        gold = np.array([e.label for e in group])
        keep = gold >= 0
        correct += int((pred[keep] == gold[keep]).sum())
        total += int(keep.sum())
    return correct / total if total else None


def _readout(cfg: CellConfig, model_cfg: ModelConfig, family: str, dataset) -> Dict:
    """Reservoir training (``train_mode="readout"``): features from a second instance of the
    implementation whose logits are the hidden state (``readout.feature_config``: W_o = I,
    b_o = 0) with frozen weights at ``cfg.spectral_radius``, then a ridge readout fitted in
    NumPy (alpha chosen on dev), accuracy on dev and test.

    ``train_s`` is what training costs: extracting train and dev features (dev picks
    alpha) and the fit, compiles included, as the full budget's ``train_s`` includes
    its own. The features are checked against the reference afterwards, on the first
    batch of each split and the batch holding its longest example, from the very
    arrays that were fitted (so the check adds no call to the implementation and no
    shape to compile before the clock). ``verified`` False fails the cell.
    """
    feat_cfg = readout.feature_config(model_cfg)
    feat = readout.feature_params(readout.reservoir_params(
        model_cfg, init_params(model_cfg, cfg.seed), cfg.spectral_radius))
    impl = registry.load(cfg.framework, cfg.model)(feat_cfg, cfg.strategy, cfg.device, cfg.threads)
    impl.load_params(feat)
    train = dataset.train[:cfg.max_train_examples] if cfg.max_train_examples else dataset.train
    out: Dict = {"mode": "readout", "spectral_radius": cfg.spectral_radius, "features": cfg.hidden}
    feats, labels, checks = {}, {}, []
    for split, examples in (("train", train), ("dev", dataset.splits["dev"]),
                            ("test", dataset.splits["test"])):
        groups = batch_examples(examples, cfg.batch_size, seed=0, shuffle=False)
        longest = max(range(len(groups)), key=lambda i: max(len(e.tokens) for e in groups[i]))
        rows = []
        t0 = time.perf_counter()
        for i, group in enumerate(groups):
            batch = make_batch(family, group)
            rows.append(np.asarray(impl.to_numpy(impl.logits(impl.prepare(batch))), np.float64))
            if i in (0, longest):
                checks.append((batch, rows[-1]))
        impl.sync()
        out["extract_%s_s" % split] = time.perf_counter() - t0
        gold = np.array([e.label for e in examples])
        keep = gold >= 0   # unlabelled roots (none in SST, SST-2 or ListOps) take no part
        feats[split], labels[split] = np.concatenate(rows)[keep], gold[keep]
    worst = 0.0
    for batch, got in checks:
        worst = max(worst, verify.max_abs(got, reference.logits(feat_cfg, feat, batch, np.float64)))
    out["verify_max_abs"] = worst
    out["verified_batches"] = len(checks)
    out["verified"] = bool(worst <= verify.TOLERANCE["logits_abs"]) and all(
        np.isfinite(f).all() for f in feats.values())
    if not out["verified"]:
        return out
    t0 = time.perf_counter()
    fit = readout.fit_readout(feats["train"], labels["train"], feats["dev"], labels["dev"],
                              dataset.num_classes)
    out["fit_s"] = time.perf_counter() - t0
    out["train_s"] = out["extract_train_s"] + out["extract_dev_s"] + out["fit_s"]
    out.update(alpha=fit["alpha"], dev_by_alpha=fit["dev_by_alpha"], dev=fit["dev"],
               test=readout.accuracy(feats["test"], labels["test"], fit["W"], fit["b"]),
               train_accuracy=readout.accuracy(feats["train"], labels["train"], fit["W"], fit["b"]),
               examples=int(labels["train"].size))
    # the floor a readout must beat: always answering the most frequent training label
    majority = int(np.bincount(labels["train"]).argmax())
    out["majority_dev"] = float((labels["dev"] == majority).mean())
    out["majority_test"] = float((labels["test"] == majority).mean())
    return out


def _gate(impl, cfg: CellConfig, model_cfg: ModelConfig, family: str, dataset, groups,
          params) -> Dict:
    """The verification gate's batches and its second loss mode, then ``verify.gate``.

    ``extremes``: ``verify.gate_examples`` of the whole timed pool; ``unbucketed``:
    the first examples of the accuracy budget's first epoch, in its order (shuffled,
    not bucketed); ``pool``, logits only: the timed pool's first batch itself (an
    implementation may take another path on a length-bucketed batch: torch ``fused``
    pads a well-filled one and packs a ragged one). Tree models: the other loss mode on a second instance
    (built here, so its construction and compiles count in ``verify_s``).
    """
    pool_examples = [e for g in groups for e in g]
    n = min(len(pool_examples), verify.gate_size(cfg.batch_size, cfg.verify_examples))
    train = dataset.train[:cfg.max_train_examples] if cfg.max_train_examples else dataset.train
    order = [e for g in batch_examples(train, cfg.batch_size, seed=cfg.seed * 1000) for e in g]
    batches = [("extremes", make_batch(family, verify.gate_examples(pool_examples, n))),
               ("unbucketed", make_batch(family, order[:n]))]
    other, note = None, None
    if family == "rvnn":
        other_cfg = replace(model_cfg, loss_mode="all" if model_cfg.loss_mode == "root" else "root")
        try:
            other = (registry.load(cfg.framework, cfg.model)(other_cfg, cfg.strategy, cfg.device,
                                                              cfg.threads), other_cfg)
        except (NotApplicable, Unavailable) as exc:
            note = "%s loss not checked: %s" % (other_cfg.loss_mode, exc)
    return verify.gate(impl, model_cfg, params, batches, trains=impl.trains, other=other,
                       other_note=note, logits_only=[("pool", make_batch(family, groups[0]))])


def run_cell(cfg: CellConfig, framework_version: Optional[str] = None,
             status_path: Optional[str] = None) -> Dict:
    """Measure one cell; always returns a record (status ok / failed / unavailable / not-applicable).

    ``status_path``: where the current phase goes for the runner's progress line.
    """
    global _PHASES
    rec = base_record(cfg)
    rec["framework_version"] = framework_version
    rec["phase_s"] = {}
    _PHASES = Phases(rec["phase_s"], status_path)
    t_start = time.perf_counter()
    if os.environ.get(TEST_FAULT_ENV):
        rec["info"]["test_fault"] = os.environ[TEST_FAULT_ENV]
    try:
        _apply_test_faults()
        _run(cfg, rec)
        bad = impossible_samples(rec) if rec["status"] == "ok" else []
        if bad:
            rec["status"] = "failed"
            rec["reason"] = "timed passes gave non-finite or non-positive numbers: " + "; ".join(bad)
    except MemoryError:
        del _HELD[:]   # the record still has to be written
        rec["status"], rec["reason"] = "oom", "MemoryError in the cell"
    except Exception as exc:  # recorded, never raised: the run goes on
        rec["status"] = "failed"
        rec["reason"] = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        rec["traceback"] = traceback.format_exc()[-4000:]
    _phase(None)
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["wall_s"] = time.perf_counter() - t_start
    return rec


def _apply_test_faults() -> None:
    sleep = _test_fault("sleep")
    if sleep is not None:
        time.sleep(float(sleep))
    alloc = _test_fault("alloc")
    if alloc is not None:
        for _ in range(int(float(alloc)) // 16):
            block = bytearray(16 << 20)
            block[::4096] = b"\x01" * len(range(0, len(block), 4096))   # touch every page
            _HELD.append(block)


def _run(cfg: CellConfig, rec: Dict) -> None:
    """The steps of the module docstring, in order; a step that decides the cell's status
    (not applicable, unavailable, not equivalent) ends it there."""
    dataset, model_cfg, groups, pool = _data_and_pool(cfg, rec)                   # 1
    impl = _implementation(cfg, model_cfg, rec)
    if impl is None:
        return
    params, prepared = _prepared(impl, cfg, model_cfg, pool, rec)                 # 2
    _first_calls(impl, prepared, params, rec)                                     # 3
    if not _verified(impl, cfg, model_cfg, dataset, groups, params, rec):         # 4
        return
    rec.update(_flops_per_sample(model_cfg, pool))
    _warmup(impl, cfg, prepared, rec)                                             # 5
    _timed(impl, cfg, pool, prepared, rec)                                        # 6
    _latency(impl, cfg, dataset, rec)                                             # 7
    _phase("gemm")
    try:
        rec["gemm_flops"] = impl.gemm_flops()
    except NotImplementedError:
        pass
    if not _accuracy_budget(impl, cfg, model_cfg, dataset, rec):                  # 8
        return
    peak = impl.device_peak_bytes()
    rec["device_peak_mb"] = peak / 2 ** 20 if peak is not None else None
    rec["info"].update(impl.info())
    rec["status"] = "ok"


def _data_and_pool(cfg: CellConfig, rec: Dict):
    """The task, the model's configuration and the timed pool (its batches and their groups
    of examples)."""
    _phase("data")
    dataset = load_task(cfg.task, seed=DATA_SEED)
    rec["info"]["data_source"] = dataset.origin
    if cfg.batch_size > len(dataset.train):   # the pool is drawn from train: never claim a size
        raise ValueError("batch size %d is larger than %s's training split (%d examples)"
                         % (cfg.batch_size, cfg.task, len(dataset.train)))
    model_cfg = model_config(cfg, dataset)
    _phase("pool")
    groups = batch_examples(dataset.train, cfg.batch_size, seed=cfg.seed, bucket=True,
                            drop_last=len(dataset.train) >= cfg.batch_size)[:cfg.pool_batches]
    pool = [make_batch(cfg.family, g) for g in groups]
    rec["batch_hash"] = hash_batches(pool)
    return dataset, model_cfg, groups, pool


def _implementation(cfg: CellConfig, model_cfg: ModelConfig, rec: Dict):
    """The framework's model object, or None with the record saying why there is none."""
    _phase("imports")
    try:
        impl = registry.load(cfg.framework, cfg.model)(model_cfg, cfg.strategy, cfg.device,
                                                      cfg.threads)
    except NotApplicable as exc:
        rec["status"], rec["reason"] = "not-applicable", str(exc)
        return None
    except Unavailable as exc:
        rec["status"], rec["reason"] = "unavailable", str(exc)
        if isinstance(exc, DeviceUnavailable):
            rec["unavailable_scope"] = "device"
        return None
    impl.batch_size = cfg.batch_size  # static-shape strategies pad smaller batches to it
    return impl


def _prepared(impl, cfg: CellConfig, model_cfg: ModelConfig, pool, rec: Dict):
    """The canonical parameters, loaded, and every pool batch prepared (step 2)."""
    # After the framework import (which may load its own BLAS), before any work.
    _phase("pool")
    rec["info"]["blas_threads"] = limit_blas_threads(cfg.threads)
    params = init_params(model_cfg, cfg.seed)
    impl.load_params(params)
    return params, [impl.prepare(b) for b in pool]


def _first_calls(impl, prepared: List, params, rec: Dict) -> None:
    """The first train step and inference call, each timed alone (step 3).

    They come before the gate: a framework that traces or compiles lazily would
    otherwise compile inside the gate, and its first timed call would look free.
    The step they take is undone before the gate. Training is declared
    (Implementation.trains), never inferred: a NotImplementedError from a
    declared hook fails the cell like any other error.
    """
    _phase("first_call")
    if impl.trains:
        rec["compile_s"] = _first_call(impl, impl.train_step, prepared[0])
    rec["first_infer_s"] = _first_call(impl, impl.logits, prepared[0])
    if rec["compile_s"] is None:
        rec["compile_s"] = rec["first_infer_s"]
    impl.load_params(params)


def _verified(impl, cfg: CellConfig, model_cfg: ModelConfig, dataset, groups, params,
              rec: Dict) -> bool:
    """Equivalence before any timed pass (step 4); a cell that fails keeps no timing."""
    _phase("gate")
    t0 = time.perf_counter()
    result = _gate(impl, cfg, model_cfg, cfg.family, dataset, groups, params)
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
    if result.get("weight_decay"):
        rec["info"]["verify_weight_decay"] = result["weight_decay"]
    if not result["ok"]:
        rec["status"] = "failed"
        rec["reason"] = "not equivalent: " + "; ".join(result["problems"])
        rec["compile_s"] = rec["first_infer_s"] = None
    return result["ok"]


def _flops_per_sample(model_cfg: ModelConfig, pool) -> Dict[str, float]:
    n = float(sum(b.size for b in pool))
    return {"infer_flops_per_sample": sum(forward_flops(model_cfg, b) for b in pool) / n,
            "train_flops_per_sample": sum(train_flops(model_cfg, b) for b in pool) / n}


def _warmup(impl, cfg: CellConfig, prepared: List, rec: Dict) -> None:
    """Every pool shape once (step 5: the first call saw only the first batch), then up to
    ``warmup_passes`` untimed passes while the warm-up has used less than a quarter of the
    time budget: a pass that takes seconds runs at its steady pace already, and the
    calibration pass before the timed samples is one more untimed pass
    (``warmup_passes_run``: how many ran)."""
    _phase("warmup")
    t0 = time.perf_counter()

    def one_pass(batches):
        for ready in batches:
            if impl.trains:
                impl.train_step(ready)
            impl.logits(ready)
        impl.sync()

    one_pass(prepared[1:])   # even with warmup_passes=0
    done = 0
    while done < cfg.warmup_passes and not (
            cfg.timed_budget_s > 0 and time.perf_counter() - t0 >= cfg.timed_budget_s / 4):
        one_pass(prepared)
        done += 1
    rec["warmup_s"] = time.perf_counter() - t0
    rec["warmup_passes_run"] = done


def _timed(impl, cfg: CellConfig, pool, prepared: List, rec: Dict) -> None:
    """The timed samples, training then inference, with the machine's noise around them
    (step 6)."""
    _phase("timed")
    sizes = [b.size for b in pool]
    tokens = [b.num_tokens for b in pool]
    noise = NoiseProbe(cfg.threads).start()
    rec["passes_per_sample"], rec["repeats_run"] = {}, {}
    calls = ((("train", impl.train_step),) if impl.trains else ()) + (("infer", impl.logits),)
    share = cfg.timed_budget_s / len(calls)
    for name, call in calls:
        k, once = calibrate(impl, call, prepared, cfg.min_repeat_s)
        n = planned_repeats(cfg.repeats, share, k * once if once else None)
        (rec[name + "_samples_per_s"], rec[name + "_tokens_per_s"], rec[name + "_wait_shares"],
         rec["passes_per_sample"][name]) = _timed_passes(impl, call, prepared, sizes, tokens,
                                                         n, k, cfg.min_repeat_s, share)
        rec["repeats_run"][name] = len(rec[name + "_samples_per_s"])
    rec["repeats_cut"] = any(n < cfg.repeats for n in rec["repeats_run"].values())
    if not impl.trains:
        rec["reason"] = "inference only: this implementation declares no training step"
    rec["noise"] = noise.stop()
    rec["noisy"] = rec["noise"]["noisy"]


def _latency(impl, cfg: CellConfig, dataset, rec: Dict) -> None:
    """Batch-1 latency on dev examples (step 7); each shape is called once untimed first."""
    _phase("latency")
    singles = [impl.prepare(make_batch(cfg.family, [e]))
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


def _accuracy_budget(impl, cfg: CellConfig, model_cfg: ModelConfig, dataset, rec: Dict) -> bool:
    """The accuracy budget or the readout (step 8); False when the readout's features were
    not equivalent (the cell has failed)."""
    if cfg.epochs > 0 and impl.trains:
        _phase("accuracy")
        rec["accuracy"] = _accuracy(impl, model_cfg, cfg.family, dataset, cfg)
    if cfg.train_mode == "readout":
        _phase("accuracy")
        rec["accuracy"] = _readout(cfg, model_cfg, cfg.family, dataset)
        if not rec["accuracy"]["verified"]:
            rec["status"] = "failed"
            rec["reason"] = "not equivalent: readout features differ from the reference by %.3g" \
                % rec["accuracy"]["verify_max_abs"]
            return False
    return True
