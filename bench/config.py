"""Cell configurations and named presets.

A *cell* is one measurement: framework x model x strategy x task x device x
batch size x threads (plus sizes and budgets). A *preset* is a function that
returns the grid of cells a run measures.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .interface import STRATEGIES
from .params import MODELS, family

SCHEMA_VERSION = 1


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
    pool_batches: int = 5         # distinct batches, prepared before timing, cycled
    repeats: int = 7              # timed passes over the pool (median / IQR over these)
    warmup_passes: int = 1        # untimed passes after the first call
    latency_samples: int = 20     # batch-1 inference calls timed one by one
    epochs: float = 0.0           # training budget for accuracy (0: no accuracy measured)
    max_train_examples: int = 0   # cap on training examples for the accuracy budget (0: all)
    timeout_s: int = 900
    verify_examples: int = 4      # examples in the equivalence check before timing

    def __post_init__(self):
        fam = family(self.model)
        if self.strategy not in STRATEGIES[fam]:
            raise ValueError("strategy %r is not a %s strategy (%s)"
                             % (self.strategy, fam, ", ".join(STRATEGIES[fam])))
        if self.device not in ("cpu", "gpu"):
            raise ValueError("device is cpu or gpu, not %r" % self.device)
        for name in ("batch_size", "threads", "pool_batches", "repeats", "hidden", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be >= 1" % name)

    @property
    def family(self) -> str:
        return family(self.model)

    def key(self) -> str:
        """Stable identity of the cell (every field that changes what is measured)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        return "%s/%s/%s %s b%d %s" % (self.framework, self.model, self.strategy, self.task,
                                      self.batch_size, self.device)

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "CellConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Grid:
    """Axes of a run; ``cells()`` expands them. ``sweeps`` add extra (model, task, batch) cells."""

    frameworks: Tuple[str, ...]
    models: Tuple[str, ...] = MODELS
    strategies: Optional[Tuple[str, ...]] = None      # None: every strategy of the family
    tasks: Tuple[str, ...] = ("sst",)
    batch_sizes: Optional[Tuple[int, ...]] = None     # None: the base cell's batch size
    # extra cells: (models, tasks, batch sizes) crossed, for sweeps on a subset
    sweeps: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[int, ...]], ...] = ()
    base: CellConfig = field(default_factory=lambda: CellConfig("numpy", "lstm", "loop"))

    def cells(self) -> List[CellConfig]:
        out: List[CellConfig] = []
        seen = set()
        blocks = [(self.models, self.tasks, self.batch_sizes or (self.base.batch_size,))]
        blocks += list(self.sweeps)
        for models, tasks, batch_sizes in blocks:
            for fw in self.frameworks:
                for model in models:
                    for strategy in STRATEGIES[family(model)]:
                        if self.strategies is not None and strategy not in self.strategies:
                            continue
                        for task in tasks:
                            for b in batch_sizes:
                                cell = replace(self.base, framework=fw, model=model,
                                               strategy=strategy, task=task, batch_size=b)
                                if cell.key() not in seen:
                                    seen.add(cell.key())
                                    out.append(cell)
        return out


DEFAULT_FRAMEWORKS = ("numpy", "torch", "jax", "tensorflow")


def smoke(frameworks: Sequence[str] = DEFAULT_FRAMEWORKS) -> Grid:
    """Seconds per cell: tiny sizes, every model and strategy, SST."""
    base = CellConfig("numpy", "lstm", "loop", batch_size=8, embed_dim=16, hidden=16,
                      pool_batches=2, repeats=2, warmup_passes=0, latency_samples=3,
                      timeout_s=300, verify_examples=2)
    return Grid(tuple(frameworks), base=base)


def quick(frameworks: Sequence[str] = DEFAULT_FRAMEWORKS) -> Grid:
    """The default: SST 5-class, batch 25, hidden 150, 2 threads, CPU; every model and strategy."""
    return Grid(tuple(frameworks), base=CellConfig("numpy", "lstm", "loop"))


def full(frameworks: Sequence[str] = DEFAULT_FRAMEWORKS) -> Grid:
    """Quick, plus ListOps, batch-size and tree-size sweeps, more repeats."""
    base = CellConfig("numpy", "lstm", "loop", repeats=10)
    synth = tuple("synth-%s-%d" % (shape, n) for shape in ("balanced", "left")
                  for n in (8, 32, 128, 512))
    return Grid(tuple(frameworks), tasks=("sst", "listops"), base=base,
                sweeps=((("lstm", "treelstm"), ("sst",), (1, 25, 100, 400)),
                        (("lstm", "treelstm"), synth, (25,))))


PRESETS = {"smoke": smoke, "quick": quick, "full": full}


def preset(name: str, frameworks: Optional[Sequence[str]] = None) -> Grid:
    if name not in PRESETS:
        raise ValueError("unknown preset %r (one of %s)" % (name, ", ".join(PRESETS)))
    return PRESETS[name](tuple(frameworks) if frameworks else DEFAULT_FRAMEWORKS)
