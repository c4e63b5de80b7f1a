"""Cell configurations and named presets.

A *cell* is one measurement: framework x model x strategy x task x device x
batch size x threads (plus sizes and budgets). A *preset* is a function that
returns the grid of cells a run measures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import frameworks
from .interface import STRATEGIES
from .params import MODELS, family


# A time-budgeted cell still takes this many timed samples per call (a median and an IQR).
MIN_REPEATS = 3


class UsageError(ValueError):
    """Bad input, or a refusal before any work: the command prints one line and exits 2."""


@dataclass(frozen=True)
class CellConfig:
    framework: str
    model: str
    strategy: str
    task: str = "sst"
    device: str = "cpu"
    batch_size: int = 25
    embed_dim: int = 100
    hidden: int = 150
    threads: int = 2
    seed: int = 0                 # parameter init and batch order
    loss_mode: str = "root"       # root | all (tree models only)
    optimizer: str = "adam"       # optimiser for the timed train steps and the accuracy budget
    lr: float = 0.001
    # coupled L2: every optimiser sees g + weight_decay * theta (bench.reference.optimizer_steps)
    weight_decay: float = 0.0
    pool_batches: int = 5         # distinct batches, prepared before timing, cycled
    repeats: int = 7              # timed samples (median / IQR over these)
    # A timed sample lasts at least this long: it cycles the pool k times (k calibrated once
    # per cell and recorded), so that tiny cells are not timer and scheduler noise. It changes
    # the precision, not what is measured, so it is not part of the cell's key.
    min_repeat_s: float = 0.2
    # Seconds of timed work a cell may spend (training and inference each half of it): a
    # slow cell (per-node strategies in eager frameworks) takes fewer samples, never fewer
    # than MIN_REPEATS, and records how many ran (``repeats_run``). 0: always ``repeats``.
    # Like min_repeat_s it changes the precision, not what is measured: not in the key.
    timed_budget_s: float = 20.0
    warmup_passes: int = 1        # untimed passes after the first call (fewer if slow)
    latency_samples: int = 20     # batch-1 inference calls timed one by one
    epochs: float = 0.0           # training budget for accuracy (0: no accuracy measured)
    max_train_examples: int = 0   # cap on training examples for the accuracy budget (0: all)
    timeout_s: int = 900
    verify_examples: int = 4      # least examples per gate batch (bench.verify.gate_size: >= 8)
    # full: the accuracy budget trains every weight (``epochs``); readout: reservoir training,
    # frozen weights with the recurrent / composition matrix at ``spectral_radius`` and a
    # ridge readout fitted in closed form (bench.readout; needs epochs 0)
    train_mode: str = "full"
    spectral_radius: float = 0.9  # readout only

    def __post_init__(self):
        self._check_axes()
        self._check_training()

    def _check_axes(self) -> None:
        """The strategy belongs to the model's family, the device is known, sizes are >= 1."""
        fam = family(self.model)
        if self.strategy not in STRATEGIES[fam]:
            raise ValueError("strategy %r is not a %s strategy (%s)"
                             % (self.strategy, fam, ", ".join(STRATEGIES[fam])))
        if self.device not in ("cpu", "gpu"):
            raise ValueError("device is cpu or gpu, not %r" % self.device)
        for name in ("batch_size", "threads", "pool_batches", "repeats", "hidden", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be >= 1" % name)

    def _check_training(self) -> None:
        """The train mode and its budget, the sample length, the radius, the weight decay."""
        if self.train_mode not in ("full", "readout"):
            raise ValueError("train_mode is 'full' or 'readout', not %r" % (self.train_mode,))
        if self.train_mode == "readout" and self.epochs:
            raise ValueError("a readout cell trains no epochs (its readout is fitted in closed "
                             "form): epochs must be 0")
        if not (self.min_repeat_s >= 0 and self.min_repeat_s < 3600):
            raise ValueError("min_repeat_s must be between 0 and 3600 seconds")
        if not (isinstance(self.timed_budget_s, (int, float)) and 0 <= self.timed_budget_s < 86400):
            raise ValueError("timed_budget_s must be between 0 and 86400 seconds")
        if not self.spectral_radius > 0:
            raise ValueError("spectral_radius must be > 0")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError("weight_decay must be a finite number >= 0, not %r"
                             % (self.weight_decay,))

    @property
    def family(self) -> str:
        return family(self.model)

    def key(self) -> str:
        """Stable identity of the cell (every field that changes what is measured)."""
        d = asdict(self)
        del d["min_repeat_s"], d["timed_budget_s"]
        if d["train_mode"] == "full":       # readout-only fields: absent from full cells' keys
            del d["train_mode"], d["spectral_radius"]
        if not d["weight_decay"]:           # absent at 0: cells from before it keep their keys
            del d["weight_decay"]
        text = json.dumps(d, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        text = "%s/%s/%s %s b%d %s" % (self.framework, self.model, self.strategy, self.task,
                                      self.batch_size, self.device)
        if self.epochs:
            text += " %gep %s lr%g seed%d" % (self.epochs, self.optimizer, self.lr, self.seed)
        if self.weight_decay:
            text += " wd%g" % self.weight_decay
        if self.train_mode == "readout":
            text += " readout rho%g seed%d" % (self.spectral_radius, self.seed)
        return text

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "CellConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Block:
    """A cross product of axes; ``overrides`` replace fields of the base cell."""

    models: Tuple[str, ...] = MODELS
    tasks: Tuple[str, ...] = ("sst",)
    batch_sizes: Optional[Tuple[int, ...]] = None     # None: the base cell's batch size
    strategies: Optional[Tuple[str, ...]] = None      # None: every strategy of the family
    seeds: Optional[Tuple[int, ...]] = None           # None: the base cell's seed
    overrides: Tuple[Tuple[str, object], ...] = ()

    def cells(self, base: CellConfig, frameworks: Sequence[str]) -> Iterator[CellConfig]:
        """The block's cells for each framework, the base cell's fields overridden first."""
        base = replace(base, **dict(self.overrides))
        for fw in frameworks:
            for model in self.models:
                strategies = [s for s in STRATEGIES[family(model)]
                              if self.strategies is None or s in self.strategies]
                for strategy, task, b, seed in itertools.product(
                        strategies, self.tasks, self.batch_sizes or (base.batch_size,),
                        self.seeds or (base.seed,)):
                    yield replace(base, framework=fw, model=model, strategy=strategy,
                                  task=task, batch_size=b, seed=seed)


@dataclass(frozen=True)
class Grid:
    """The cells of a run: every block crossed with every framework, duplicates dropped."""

    frameworks: Tuple[str, ...]
    blocks: Tuple[Block, ...] = (Block(),)
    base: CellConfig = field(default_factory=lambda: CellConfig("numpy", "lstm", "loop"))

    def cells(self) -> List[CellConfig]:
        out: List[CellConfig] = []
        seen = set()
        for blk in self.blocks:
            for cell in blk.cells(self.base, self.frameworks):
                if cell.key() not in seen:
                    seen.add(cell.key())
                    out.append(cell)
        return out


DEFAULT_FRAMEWORKS = frameworks.CORE_SET
RNN_MODELS = ("elman", "lstm")
TREE_MODELS = ("rvnn", "treelstm")
SYNTH_SWEEP = tuple("synth-%s-%d" % (shape, n) for shape in ("balanced", "left")
                    for n in (8, 32, 128, 512))
FAST = ("fused", "compiled", "levels")   # strategies that batch work; `loop`/`recursive` are slow
# Strategy preference when no earlier run says which is fastest (the parity preset).
PREFERENCE = ("compiled", "levels", "fused", "loop", "recursive")


def smoke(frameworks: Sequence[str] = DEFAULT_FRAMEWORKS) -> Grid:
    """Seconds per cell: tiny sizes, every model and strategy, SST."""
    base = CellConfig("numpy", "lstm", "loop", batch_size=8, embed_dim=16, hidden=16,
                      pool_batches=2, repeats=2, warmup_passes=0, latency_samples=3,
                      timeout_s=300, verify_examples=2, min_repeat_s=0.0)
    return Grid(tuple(frameworks), base=base)


def quick(frameworks: Sequence[str] = DEFAULT_FRAMEWORKS) -> Grid:
    """SST 5-class, batch 25, hidden 150, 2 threads, CPU; every model and strategy."""
    return Grid(tuple(frameworks), base=CellConfig("numpy", "lstm", "loop"))


def full(frameworks: Sequence[str] = DEFAULT_FRAMEWORKS) -> Grid:
    """Quick on SST and ListOps, plus batch-size and synthetic tree-size sweeps."""
    base = CellConfig("numpy", "lstm", "loop", repeats=10)
    return Grid(tuple(frameworks), base=base, blocks=(
        Block(tasks=("sst", "listops")),
        Block(models=("lstm", "treelstm"), batch_sizes=(1, 25, 100, 400), strategies=FAST),
        Block(models=("lstm", "treelstm"), tasks=SYNTH_SWEEP),
    ))


def parity(frameworks: Sequence[str] = ("torch", "jax", "tensorflow")) -> Grid:
    """Learning parity: the same training budget in every framework, three seeds.

    SST 5-class and binary (tree models train on every labelled node, as in the
    Tree-LSTM and RNTN papers; RNNs on the root label) and ListOps (root
    labels). Adam, lr 2e-3, batch 25, for every framework alike; 3 epochs of
    each SST and of ListOps (2000 training expressions). One thread per cell: accuracy does
    not depend on it, and a 1-thread process keeps its speed on a shared
    2-core machine where a 2-thread one can slow tenfold. Timing is kept
    minimal; the runner's ``--fastest-from`` keeps one strategy per framework
    and model.
    """
    base = CellConfig("numpy", "lstm", "loop", optimizer="adam", lr=2e-3, pool_batches=1,
                      repeats=2, warmup_passes=0, latency_samples=2, timeout_s=3600, threads=1)
    seeds = (0, 1, 2)
    return Grid(tuple(frameworks), base=base, blocks=(
        Block(models=RNN_MODELS, tasks=("sst",), seeds=seeds, overrides=(("epochs", 3.0),)),
        Block(models=TREE_MODELS, tasks=("sst",), seeds=seeds,
              overrides=(("epochs", 3.0), ("loss_mode", "all"))),
        Block(tasks=("listops",), seeds=seeds, overrides=(("epochs", 3.0),)),
        Block(models=RNN_MODELS, tasks=("sst2",), seeds=seeds, overrides=(("epochs", 3.0),)),
        Block(models=TREE_MODELS, tasks=("sst2",), seeds=seeds,
              overrides=(("epochs", 3.0), ("loss_mode", "all"))),
    ))


def readout(frameworks: Sequence[str] = ("torch", "jax", "tensorflow")) -> Grid:
    """Reservoir (echo-state) training beside the parity preset: same tasks, seeds, batch
    size, thread count and minimal timing, every model; instead of training, each cell
    fits a ridge readout on frozen features (``train_mode="readout"``, spectral radius
    0.9, root labels only; bench.readout). The runner keeps one strategy per framework
    and model, as for parity (``--fastest-from``)."""
    base = CellConfig("numpy", "lstm", "loop", optimizer="adam", lr=2e-3, pool_batches=1,
                      repeats=2, warmup_passes=0, latency_samples=2, timeout_s=3600, threads=1,
                      train_mode="readout", spectral_radius=0.9)
    return Grid(tuple(frameworks), base=base, blocks=(
        Block(tasks=("sst", "sst2", "listops"), seeds=(0, 1, 2)),))


def gpu(frameworks: Sequence[str] = ("torch", "jax")) -> Grid:
    """A GPU run: SST quick sizes, batch sweep, tree-size sweep.

    Every model and strategy at batch 25; the sweeps keep to the cuDNN
    ``fused`` and dynamic-batching ``levels`` strategies: per-node
    ``loop``/``recursive`` cells would take minutes at batch 400, and
    ``torch.compile`` costs tens of seconds a cell. Measured on an H200
    (results/2026-11-26-gpu): torch cells take 8-30 s; JAX cells took
    20-140 s when XLA compiled 25-90 programs a cell, and now compile 2-8
    (shape classes, ``bench.batches``), so by a CPU-side estimate the whole
    preset takes ~15-25 min (results/2026-12-01-gpu/NOTES.md), about 7 min
    of it per-cell setup. That folder's ``run.sh`` runs it most telling
    cells first against a deadline, for short leases. The 240 s timeout
    leaves room for the slowest cell, JAX Tree-LSTM ``recursive`` (~1 min).
    """
    base = CellConfig("numpy", "lstm", "loop", device="gpu", repeats=5, latency_samples=10,
                      timeout_s=240)
    synth = tuple("synth-%s-%d" % (shape, n) for shape in ("balanced", "left") for n in (8, 64, 512))
    return Grid(tuple(frameworks), base=base, blocks=(
        Block(),
        Block(models=("lstm", "treelstm"), batch_sizes=(1, 25, 100, 400),
              strategies=("fused", "levels")),
        Block(models=("lstm", "treelstm"), tasks=synth, strategies=("fused", "levels")),
    ))


PRESETS = {"smoke": smoke, "quick": quick, "full": full, "parity": parity, "gpu": gpu,
           "readout": readout}


def preset(name: str, frameworks: Optional[Sequence[str]] = None) -> Grid:
    if name not in PRESETS:
        raise ValueError("unknown preset %r (one of %s)" % (name, ", ".join(PRESETS)))
    return PRESETS[name](tuple(frameworks)) if frameworks else PRESETS[name]()
