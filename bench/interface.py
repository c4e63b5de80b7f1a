"""The small interface every framework implements, once per family.

Each ``impls/<fw>_impl/rnn.py`` defines ``class RNN(Implementation)`` (models
``elman``, ``lstm``; strategies ``loop``, ``fused``, ``compiled``) and each
``rvnn.py`` defines ``class RvNN(Implementation)`` (models ``rvnn``,
``treelstm``; strategies ``recursive``, ``levels``, ``compiled``).

Life of an implementation in a benchmark cell::

    impl = RNN(cfg, strategy="fused", device="cpu", threads=2)  # may raise NotApplicable / Unavailable
                                         # (calls the hooks apply_threads, then pick_device)
    impl.load_params(canonical)          # names and shapes of bench.params.schema
    ready = impl.prepare(batch)          # outside timing: host -> device, padding, bucketing
    impl.logits(ready)                   # [B, C], a framework array (use to_numpy)
    impl.train_step(ready)               # one optimiser step, returns the loss (framework scalar)
    impl.sync()                          # block until queued device work is done
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from .params import ModelConfig, check_params

# ``plain`` is a yardstick, not a contender: the ~30 lines a user would write first (the
# framework's stock recurrent layer or scan over the whole padded batch, each example's
# last real output gathered: exact for a unidirectional RNN). A framework's fastest
# strategy should at least match it; ``bench.fastest`` never picks it.
RNN_STRATEGIES = ("loop", "fused", "compiled", "plain")
RVNN_STRATEGIES = ("recursive", "levels", "compiled")
STRATEGIES = {"rnn": RNN_STRATEGIES, "rvnn": RVNN_STRATEGIES}
BASELINE_STRATEGY = {"rnn": "loop", "rvnn": "recursive"}   # the slow end of speed-up ratios
REFERENCE_STRATEGIES = ("plain",)
# The NOT_APPLICABLE entry of every framework that has no ``plain`` loop.
NO_PLAIN = {("*", "plain"): "the plain reference loop (the yardstick for the fastest strategy) "
                            "is written for PyTorch, JAX and TensorFlow only"}

# Optimiser hyper-parameters shared by every framework (only lr is configurable).
ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
ADAGRAD = {"initial_accumulator": 0.1, "eps": 1e-7}


def not_applicable_reason(table: Dict, model: str, strategy: str,
                          device: Optional[str] = None) -> Optional[str]:
    """The reason a framework's NOT_APPLICABLE table gives for (model, strategy), if any.

    Keys are (model, strategy), ("*", strategy) or (model, "*"); a key may add a
    device, (model, strategy, "cpu"), for what only one device lacks. Device keys
    are consulted only when a device is given.
    """
    keys = [(model, strategy), ("*", strategy), (model, "*")]
    if device is not None:
        keys = [k + (device,) for k in keys] + keys
    for key in keys:
        if key in table:
            return table[key]
    return None


def refuse_not_applicable(table: Dict, model: str, strategy: str,
                          device: Optional[str] = None) -> None:
    """Raise NotApplicable with the table's reason, if it names (model, strategy[, device])."""
    reason = not_applicable_reason(table, model, strategy, device)
    if reason:
        raise NotApplicable(reason)


class NotApplicable(Exception):
    """This framework cannot express this (model, strategy[, device]); the message says why."""


class Unavailable(Exception):
    """A framework or device that is not present here; the message says why."""


class DeviceUnavailable(Unavailable):
    """This framework cannot use the requested device here at all: every cell of it
    on that device would say the same, so the runner records them without starting one."""


def counted(counts, name: str, fn):
    """``fn``, adding 1 to ``counts[name]`` (a Counter) each time its Python body runs: under
    a tracing compiler (``jax.jit``, ``tf.function``) that is each (re)trace, which an
    implementation's ``info()`` reports. The wrapper is named ``name`` (so are the programs
    a compiler builds from it)."""
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)
    wrapper.__name__ = name
    return wrapper


def one_line(exc: BaseException) -> str:
    """An exception's message as a reason in a record: its first line (its type's name
    when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Implementation:
    """Base class: one model of one family, one strategy, on one device."""

    framework = "?"
    family = "?"
    # The framework's NOT_APPLICABLE table (its package's, which the registry reads without
    # importing the framework): construction refuses the (model, strategy[, device]) it names.
    not_applicable: Dict = {}
    # Declared, never inferred: False only for an inference-only implementation
    # (the NumPy reference). Such a cell times inference alone and its gate skips
    # the optimiser step; for every other implementation a NotImplementedError
    # from train_step or loss_and_grads fails the cell.
    trains = True
    # The cell's batch size, set by bench.cell before the first prepare (None
    # elsewhere). Strategies that compile once per shape pad smaller batches up
    # to it (bench.batches.padded_rows), so a partial last batch or the
    # verification batch runs the full batch's program instead of compiling one.
    batch_size: Optional[int] = None
    # Coupled L2 weight decay (``cfg.weight_decay``; bench.reference.optimizer_steps has the
    # formula): None where ``train_step`` applies it, else why it cannot, and then a cell
    # with a non-zero decay is not applicable. Declared, never inferred: an implementation
    # refuses a decay until it says it applies one (never a decay silently dropped).
    weight_decay_refusal: Optional[str] = "this implementation applies no weight decay"

    def __init__(self, cfg: ModelConfig, strategy: str, device: str = "cpu", threads: int = 1):
        if cfg.family != self.family:
            raise ValueError("%s implements the %s family, not %s" % (type(self).__name__,
                                                                       self.family, cfg.model))
        if strategy not in STRATEGIES[self.family]:
            raise ValueError("unknown %s strategy %r (one of %s)"
                             % (self.family, strategy, ", ".join(STRATEGIES[self.family])))
        if device not in ("cpu", "gpu"):
            raise ValueError("device is cpu or gpu, not %r" % device)
        self.cfg = cfg
        self.strategy = strategy
        self.device = device
        self.threads = threads
        self._refuse_weight_decay(getattr(cfg, "weight_decay", 0.0))
        refuse_not_applicable(self.not_applicable, cfg.model, strategy, device)
        # Threads first: a framework may size its pools when its runtime starts, and
        # choosing a device can start it (XLA's CPU client does).
        self.thread_info = self.apply_threads(threads)
        self.dev = self.pick_device(device)

    # --- framework hooks, each called once by __init__ ---
    def apply_threads(self, threads: int) -> Dict:
        """Size the framework's thread pools to ``threads``; returns what holds afterwards,
        kept as ``self.thread_info`` for ``info()``. Default: nothing to size."""
        return {}

    def pick_device(self, device: str):
        """The framework's handle for ``device`` ("cpu" or "gpu"), kept as ``self.dev``;
        raises DeviceUnavailable where the framework cannot use it here. Default: the
        name itself (a framework that places its work elsewhere)."""
        return device

    def _refuse_weight_decay(self, weight_decay: float) -> None:
        if weight_decay and self.trains and self.weight_decay_refusal:
            raise NotApplicable("weight decay %g: %s" % (weight_decay, self.weight_decay_refusal))

    def set_weight_decay(self, weight_decay: float) -> None:
        """Train with ``weight_decay`` from the next ``load_params`` on.

        For the verification gate, which checks one step of the decay path at
        ``bench.verify.DECAY_PROBE`` whatever the cell's decay, then sets the cell's
        back (and reloads). The probe's step may take another path than the timed one
        (e.g. gradients, then the optimiser's update alone, where a compiled whole step
        would compile again) but must use the same optimiser code. The default suits an
        implementation that builds its optimiser from ``self.cfg`` in ``load_params``.
        Raises NotApplicable where ``weight_decay_refusal`` says why not.
        """
        self._refuse_weight_decay(weight_decay)
        self.cfg = replace(self.cfg, weight_decay=float(weight_decay))

    # --- parameters ---
    def load_params(self, params: Dict[str, np.ndarray]) -> None:
        """Take canonical parameters (copied in; resets optimiser state)."""
        raise NotImplementedError

    def export_params(self) -> Dict[str, np.ndarray]:
        """Canonical float32 NumPy parameters."""
        raise NotImplementedError

    def _checked(self, params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        check_params(self.cfg, params)
        return {k: np.asarray(v, np.float32) for k, v in params.items()}

    # --- work ---
    def prepare(self, batch):
        """Everything that must not be timed: conversion, transfer, padding."""
        return batch

    def logits(self, prepared):
        """Logits [B, C] at each example's classification point."""
        raise NotImplementedError

    def loss_and_grads(self, prepared) -> Tuple[float, Dict[str, np.ndarray]]:
        """Loss and canonical-named NumPy gradients, without updating anything."""
        raise NotImplementedError

    def train_step(self, prepared):
        """Forward, loss, backward and one optimiser step; returns the loss.
        Required unless ``trains`` is False."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until all queued work is finished (device sync)."""

    # --- optional: timing done by the implementation itself ---
    # For implementations whose work runs in another process (a worker behind
    # pipes), where a clock in this process would include the IPC. None (the
    # default) means "time in-process": bench.cell then runs its own loops.
    def timed_passes(self, call: str, prepared: List, repeats: int) -> Optional[List[float]]:
        """Seconds of each of ``repeats`` passes over ``prepared`` (every item once, in order,
        synced at the end), ``call`` being "train_step" or "logits"; or None."""
        return None

    def timed_calls(self, call: str, prepared: List) -> Optional[List[float]]:
        """Seconds of each single ``call`` on each item of ``prepared``, timed alone; or None."""
        return None

    def to_numpy(self, value) -> np.ndarray:
        return np.asarray(value)

    # --- measurement helpers ---
    def device_peak_bytes(self) -> Optional[int]:
        """Peak device memory since start, where the framework reports it."""
        return None

    def info(self) -> Dict:
        """Extra facts for the record: threads as applied, trace counts, kernels used."""
        return {}

    def gemm_ops(self, n: int):
        """(product, finish) for an n x n x n float32 matmul in this framework, threads and
        device: ``product()`` queues one and returns its result, ``finish(result)`` waits
        for it. The timing is ``bench.flops.time_gemm``'s, the same for every framework."""
        raise NotImplementedError

    def gemm_flops(self, n: int = 512, repeats: int = 10) -> float:
        """Achieved FLOP/s of an n x n x n float32 matmul with this framework, threads and device."""
        from .flops import time_gemm
        return time_gemm(*self.gemm_ops(n), n=n, repeats=repeats)
