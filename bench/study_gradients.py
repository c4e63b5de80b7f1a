"""Gradient flow with distance from the loss: ``python -m bench study gradients``.

The classic argument for tree structure: a recurrent network's gradient must
cross every time step between a word and the loss, a balanced tree's only
log2(n) compositions, a left-branching tree's as many as the RNN's (the
left-branching RvNN is an Elman RNN with another parametrisation:
``reference.elman_as_rvnn``). This study measures it.

For every model it takes the norm of d loss / d h for each step's or node's
hidden state (``reference.hidden_grads``: the NumPy reference's hand-written
backward pass, in float64) against its distance from the loss:

* RNN: steps from the last token (the classification point), 0 .. length-1;
* trees: edges from the root (root loss), 0 .. tree height.

The loss is each example's own cross-entropy at its root / last token (the
batch mean times the number of examples), so norms do not depend on the batch
size. Inputs:

* ``sst``: SST dev sentences with their parse trees (RNNs read the tokens in
  order);
* ``synth``: token sequences of 8..512 words drawn from SST's training text
  (unigram frequencies), read by the RNNs in order and by the tree models as
  balanced and left-branching trees over the same tokens; labels are random
  classes (a probe: any label gives a loss to differentiate).

Two phases, from the same seeded canonical initialisation: ``init``, and
``trained`` after a short budget: ``train_steps`` Adam steps (the suite's
constants, ``bench.interface.ADAM``) on SST 5-class root labels, batch 25, in
float64 here (a small Adam of its own: the study runs without any framework).
The same trained parameters are probed on SST and on the synthetic inputs.
One more probe shows the seed's claim: the left-branching RvNN given the Elman
RNN's weights (shape ``left-elman``) reproduces the Elman rows exactly.

Rows: (model, task, shape, leaves, phase, distance) with the count of states
and quantiles of log10 ||d loss / d h||; states whose gradient is exactly zero
(float64 underflow) are counted apart; examples without a label are left out.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import reference
from .batches import SeqBatch, TreeBatch, batch_examples, make_seq_batch, make_tree_batch
from .interface import ADAM
from .params import MODELS, ModelConfig, family, init_params
from .records import atomic_write
from .tasks import Dataset, Example, load_sst
from .trees import Tree, build_tree

QUANTILES = (10, 25, 50, 75, 90)
SHAPES = ("balanced", "left")
DEFAULT_LEAVES = (8, 32, 128, 512)


# --- distances and norms --------------------------------------------------------

def tree_depths(batch: TreeBatch) -> np.ndarray:
    """int[N]: edges from each node up to its tree's root (roots 0)."""
    depth = np.zeros(batch.num_nodes, np.int64)
    for n in reversed(range(batch.num_nodes)):   # parents come after their children
        if batch.left[n] >= 0:
            depth[batch.left[n]] = depth[n] + 1
            depth[batch.right[n]] = depth[n] + 1
    return depth


def step_distances(batch: SeqBatch) -> np.ndarray:
    """int[B, T]: steps from each token to the example's last token; -1 at padding."""
    t = np.arange(batch.tokens.shape[1])[None, :]
    dist = batch.lengths[:, None] - 1 - t
    return np.where(dist >= 0, dist, -1)


def row_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norm over the last axis without squaring tiny entries to zero (a gradient
    of 1e-180 is representable; its square is not): scaled by each row's largest entry."""
    scale = np.abs(x).max(axis=-1, keepdims=True)
    safe = np.where(scale > 0, scale, 1.0)
    return np.linalg.norm(x / safe, axis=-1) * scale[..., 0]


def gradient_norms(cfg: ModelConfig, params, batch, internal_only: bool = False
                   ) -> Tuple[np.ndarray, np.ndarray, float]:
    """(distance, ||d loss_i / d h||, loss) for every real step or node of ``batch``.

    ``loss_i`` is the example's own loss: the reference's batch mean times the
    number of classification points. Examples without a label get no loss and
    are left out. Root loss only (one point per example). ``internal_only``
    keeps a tree's internal nodes (leaves dropped).
    """
    if cfg.loss_mode != "root":
        raise ValueError("the gradient study measures distance from one loss: root loss only")
    loss, dh = reference.hidden_grads(cfg, params, batch, np.float64)
    if isinstance(batch, SeqBatch):
        labelled = batch.labels >= 0
        dist = step_distances(batch)
        keep = (dist >= 0) & labelled[:, None]
        return dist[keep], row_norms(dh)[keep] * max(1, int(labelled.sum())), loss
    labelled = batch.label[batch.root] >= 0
    keep = labelled[batch.tree] & ((batch.left >= 0) if internal_only else True)
    norms = row_norms(dh)
    return tree_depths(batch)[keep], norms[keep] * max(1, int(labelled.sum())), loss


def summarise_norms(dist: np.ndarray, norms: np.ndarray) -> List[Dict]:
    """Per distance: count, exact zeros, and quantiles / mean of log10 of the non-zero norms."""
    out = []
    for d in np.unique(dist):
        at = norms[dist == d]
        nz = at[at > 0]
        row = {"distance": int(d), "count": int(at.size), "zeros": int(at.size - nz.size)}
        if nz.size:
            logs = np.log10(nz)
            for q, v in zip(QUANTILES, np.percentile(logs, QUANTILES)):
                row["log10_q%d" % q] = float(v)
            row["log10_median"] = row.pop("log10_q50")
            row["log10_mean"] = float(logs.mean())
        out.append(row)
    return out


def fit_decay(rows: Sequence[Dict]) -> Dict:
    """Straight line through the median log10 norms against distance, weighted by count.

    ``slope`` is log10 change per unit distance (10**slope: the factor per step);
    ``drop`` the median at the largest distance minus the median at distance 0
    (log10 of their ratio).
    """
    pts = [(r["distance"], r["log10_median"], r["count"] - r["zeros"]) for r in rows
           if r.get("log10_median") is not None]
    if not pts:
        return {"max_distance": None, "slope": None, "drop": None}
    d, y, w = (np.array(v, np.float64) for v in zip(*pts))
    by_d = dict(zip(d.tolist(), y.tolist()))
    far = max(r["distance"] for r in rows)
    out = {"max_distance": int(far), "slope": None,
           "drop": by_d[far] - by_d[0] if far in by_d and 0 in by_d else None}
    if len(pts) >= 2:
        W = np.sqrt(w)
        A = np.stack([d, np.ones_like(d)], axis=1) * W[:, None]
        out["slope"] = float(np.linalg.lstsq(A, y * W, rcond=None)[0][0])
    return out


# --- inputs ---------------------------------------------------------------------

def synthetic_examples(vocab_tokens: np.ndarray, n_leaves: int, count: int, num_classes: int,
                       rng: np.random.Generator) -> List[Tuple[Tuple[int, ...], int]]:
    """``count`` token sequences of ``n_leaves`` ids drawn from ``vocab_tokens`` (a token
    stream: drawing positions keeps its unigram frequencies) with random labels."""
    out = []
    for _ in range(count):
        ids = tuple(int(t) for t in vocab_tokens[rng.integers(0, vocab_tokens.size, size=n_leaves)])
        out.append((ids, int(rng.integers(0, num_classes))))
    return out


def shaped(seqs: Iterable[Tuple[Tuple[int, ...], int]], shape: str) -> List[Example]:
    """Examples over the same token sequences with a tree of ``shape`` (labelled root)."""
    out = []
    for ids, label in seqs:
        tree = build_tree(shape, list(ids))
        tree = Tree(label, token=tree.token) if tree.is_leaf else Tree(label, left=tree.left,
                                                                       right=tree.right)
        out.append(Example(ids, tree, label))
    return out


def _batches(cfg: ModelConfig, examples: Sequence[Example], batch_size: int) -> List:
    make = make_seq_batch if cfg.family == "rnn" else make_tree_batch
    return [make(g) for g in batch_examples(examples, batch_size, seed=0, shuffle=False)]


# --- a short float64 training budget ---------------------------------------------

def adam_train(cfg: ModelConfig, params: Dict[str, np.ndarray], examples: Sequence[Example],
               steps: int, lr: float, batch_size: int, seed: int, progress=None
               ) -> Tuple[Dict[str, np.ndarray], List[float]]:
    """``steps`` Adam steps on the reference's float64 gradients (``bench.interface.ADAM``;
    the update of ``tests/optimizer_oracle.py``). Batches as the accuracy budget draws
    them (``batch_examples`` shuffled with ``seed * 1000 + epoch``, unbucketed).
    Returns the parameters and the loss of every step."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    make = make_seq_batch if cfg.family == "rnn" else make_tree_batch
    losses: List[float] = []
    epoch = 0
    while len(losses) < steps:
        groups = batch_examples(examples, batch_size, seed=seed * 1000 + epoch)
        if not groups:
            raise ValueError("no training examples")
        for group in groups:
            if len(losses) >= steps:
                break
            loss, grads = reference.loss_and_grads(cfg, p, make(group), np.float64)
            t = len(losses) + 1
            _adam_step(p, m, v2, grads, t, lr)
            losses.append(loss)
            if progress and (t % 50 == 0 or t == steps):
                progress("  %s: step %d/%d, loss %.3f" % (cfg.model, t, steps, loss))
        epoch += 1
    return p, losses


def _adam_step(p: Dict[str, np.ndarray], m: Dict[str, np.ndarray], v2: Dict[str, np.ndarray],
               grads: Dict[str, np.ndarray], t: int, lr: float) -> None:
    """Adam step ``t`` (from 1) in place: moments ``m`` and ``v2``, then the parameters."""
    b1, b2, eps = ADAM["beta1"], ADAM["beta2"], ADAM["eps"]
    for k, g in grads.items():
        m[k] = b1 * m[k] + (1 - b1) * g
        v2[k] = b2 * v2[k] + (1 - b2) * g * g
        p[k] = p[k] - lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)


# --- the study ------------------------------------------------------------------

def dev_accuracy(cfg: ModelConfig, params, batches) -> Optional[float]:
    """Root / last-token accuracy of the float64 reference on labelled examples."""
    correct = total = 0
    for b in batches:
        gold = b.labels if isinstance(b, SeqBatch) else b.label[b.root]
        pred = np.argmax(reference.logits(cfg, params, b, np.float64), axis=-1)
        keep = gold >= 0
        correct += int((pred[keep] == gold[keep]).sum())
        total += int(keep.sum())
    return correct / total if total else None


def recurrent_radii(cfg: ModelConfig, params) -> List[float]:
    """Spectral radius of each H x H block of the recurrent / composition matrix (the blocks
    of ``bench.readout``: Elman 1, LSTM 4 gates, RvNN 2 children, Tree-LSTM 2 x 5)."""
    from .readout import RECURRENT, spectral_radius
    w = np.asarray(params[RECURRENT[cfg.model]], np.float64)
    H = cfg.hidden
    return [round(spectral_radius(w[r:r + H, c:c + H]), 4)
            for r in range(0, w.shape[0], H) for c in range(0, w.shape[1], H)]


def _probe(cfg, params, batches, key, rows, internal_only=False):
    dists, norms = [], []
    for b in batches:
        d, n, _ = gradient_norms(cfg, params, b, internal_only)
        dists.append(d)
        norms.append(n)
    for r in summarise_norms(np.concatenate(dists), np.concatenate(norms)):
        rows.append(dict(key, **r))


def run(models: Sequence[str] = MODELS, leaves: Sequence[int] = DEFAULT_LEAVES,
        hidden: int = 150, embed_dim: int = 100, train_steps: int = 342, lr: float = 2e-3,
        batch_size: int = 25, seed: int = 0, sst_examples: int = 0, probe_examples: int = 8,
        dataset: Optional[Dataset] = None, progress=None) -> Tuple[List[Dict], Dict]:
    """The study's rows and a description of how they were made.

    ``sst_examples`` caps the SST dev sentences probed (0: all 1101);
    ``probe_examples`` is the number of synthetic sequences per length.
    ``dataset`` replaces SST 5-class (tests); it needs train and dev splits.
    """
    for m in models:
        family(m)
    if any(n < 2 for n in leaves):
        raise ValueError("synthetic inputs need at least 2 leaves")
    ds = dataset or load_sst(5)
    dev = ds.splits["dev"][:sst_examples] if sst_examples else ds.splits["dev"]
    stream = np.array([t for e in ds.train for t in e.tokens], np.int64)
    rng = np.random.default_rng(seed + 1)
    synth = {n: synthetic_examples(stream, n, probe_examples, ds.num_classes, rng) for n in leaves}
    base = {"hidden": hidden, "embed_dim": embed_dim, "seed": seed, "train_steps": train_steps,
            "lr": lr}
    meta = {"study": "gradients", "models": list(models), "leaves": list(leaves),
            "hidden": hidden, "embed_dim": embed_dim, "seed": seed, "train_steps": train_steps,
            "lr": lr, "batch_size": batch_size, "optimizer": "adam", "adam": dict(ADAM),
            "train_task": ds.name, "probe_sst": "%s dev, %d sentences" % (ds.name, len(dev)),
            "probe_synth_examples": probe_examples, "training": {}}
    study = _Study(ds, dev, list(leaves), synth, batch_size, base, meta,
                   progress or (lambda text: None))
    for model in models:
        study.model(model)
    return study.rows, meta


@dataclass
class _Study:
    """What every model's probes share: the data, the hyperparameters, the rows so far."""
    ds: Dataset
    dev: List[Example]                # the SST dev sentences probed
    leaves: List[int]                 # synthetic lengths probed, in order
    synth: Dict[int, List]            # leaves -> synthetic (token ids, label)
    batch_size: int
    base: Dict                        # the hyperparameters every row carries
    meta: Dict
    say: Callable[[str], None]
    rows: List[Dict] = field(default_factory=list)

    def model(self, model: str) -> None:
        """One model probed at initialisation, then after its training budget."""
        b = self.base
        cfg = ModelConfig(model, vocab_size=len(self.ds.vocab), embed_dim=b["embed_dim"],
                          hidden=b["hidden"], num_classes=self.ds.num_classes, loss_mode="root",
                          optimizer="adam", lr=b["lr"])
        params = {k: v.astype(np.float64) for k, v in init_params(cfg, b["seed"]).items()}
        facts = self.meta["training"].setdefault(model, {})
        for phase in ("init", "trained"):
            if phase == "trained":
                params = self.train(cfg, params, facts)
            self.probe(cfg, params, phase, facts)

    def train(self, cfg: ModelConfig, params: Dict[str, np.ndarray], facts: Dict
              ) -> Dict[str, np.ndarray]:
        b = self.base
        self.say("%s: training %d Adam steps on %s (float64 reference)" % (
            cfg.model, b["train_steps"], self.ds.name))
        t0 = time.perf_counter()
        params, losses = adam_train(cfg, params, self.ds.train, b["train_steps"], b["lr"],
                                    self.batch_size, b["seed"], progress=self.say)
        facts.update({
            "steps": len(losses), "seconds": round(time.perf_counter() - t0, 1),
            "first_loss": losses[0] if losses else None,
            "last50_loss": float(np.mean(losses[-50:])) if losses else None})
        return params

    def probe(self, cfg: ModelConfig, params: Dict[str, np.ndarray], phase: str, facts: Dict
              ) -> None:
        """The gradient rows of one phase: SST dev parses, then every synthetic length and
        shape (and, for Elman, the left-branching RvNN with its weights)."""
        model, fam, base = cfg.model, cfg.family, self.base
        t0 = time.perf_counter()
        dev_batches = _batches(cfg, self.dev, self.batch_size)
        # what the budget changed: dev accuracy, and the recurrent blocks' spectral radii
        facts["dev_accuracy_" + phase] = dev_accuracy(cfg, params, dev_batches)
        facts["recurrent_radius_" + phase] = recurrent_radii(cfg, params)
        shape = "sequence" if fam == "rnn" else "parse"
        _probe(cfg, params, dev_batches,
               dict(base, model=model, task=self.ds.name, shape=shape, leaves=None, phase=phase),
               self.rows)
        for n in self.leaves:
            for sh in (("sequence",) if fam == "rnn" else SHAPES):
                exs = shaped(self.synth[n], "left" if sh == "sequence" else sh)
                per = max(1, min(self.batch_size, 4096 // n))   # bounded batch for long inputs
                _probe(cfg, params, _batches(cfg, exs, per),
                       dict(base, model=model, task="synth", shape=sh, leaves=n, phase=phase),
                       self.rows)
        if model == "elman":
            _probe_mapped(cfg, params, self.synth, self.batch_size, phase, base, self.rows,
                          self.meta, self.say)
        self.say("%s %s: probed in %.1f s" % (model, phase, time.perf_counter() - t0))


MAPPED = "left-elman"   # the shape name of the left-branching RvNN that carries Elman's weights


def _probe_mapped(cfg, params, synth, batch_size, phase, base, rows, meta, say):
    """The left-branching RvNN given the Elman RNN's weights (``reference.elman_as_rvnn``:
    a start leaf, then internal node t is the Elman state h_t), on the synthetic inputs.
    Its internal nodes' gradients are the Elman steps' (the plot shows the lines on top
    of each other); leaves are left out (they are the mapping's input projections)."""
    try:
        mapped, start = reference.elman_as_rvnn(params)
    except ValueError as exc:   # trained weights may leave arctanh's domain: say so, go on
        meta.setdefault("mapped_skipped", {})[phase] = str(exc)
        say("elman %s: no left-branching RvNN with its weights (%s)" % (phase, exc))
        return
    tcfg = ModelConfig("rvnn", vocab_size=cfg.vocab_size + 1, embed_dim=cfg.hidden,
                       hidden=cfg.hidden, num_classes=cfg.num_classes)
    for n, seqs in synth.items():
        exs = shaped([((start,) + ids, label) for ids, label in seqs], "left")
        per = max(1, min(batch_size, 4096 // n))
        _probe(tcfg, mapped, _batches(tcfg, exs, per),
               dict(base, model="rvnn", task="synth", shape=MAPPED, leaves=n, phase=phase), rows,
               internal_only=True)


def summary_rows(rows: Sequence[Dict]) -> List[Dict]:
    """One line per (model, task, shape, leaves, phase): fitted decay and far-to-near drop."""
    groups: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"], r["shape"], r.get("leaves"), r["phase"]),
                          []).append(r)
    out = []
    for (model, task, shape, leaves, phase), g in groups.items():
        fit = fit_decay(sorted(g, key=lambda r: r["distance"]))
        out.append({"model": model, "task": task, "shape": shape, "leaves": leaves,
                    "phase": phase, "states": sum(r["count"] for r in g),
                    "zeros": sum(r["zeros"] for r in g), **fit})
    order = {m: i for i, m in enumerate(MODELS)}
    out.sort(key=lambda r: (r["phase"] != "init", r["task"] != "synth", r["leaves"] or 0,
                            order.get(r["model"], 9), r["shape"]))
    return out


def format_summary(rows: Sequence[Dict]) -> str:
    """A plain-text table of ``summary_rows`` for the terminal."""
    lines = ["%-8s %-6s %-10s %6s %-8s %8s %10s %12s" % (
        "model", "task", "shape", "leaves", "phase", "max dist", "log10/step", "log10 far/0")]
    for r in summary_rows(rows):
        lines.append("%-8s %-6s %-10s %6s %-8s %8s %10s %12s" % (
            r["model"], r["task"], r["shape"], r["leaves"] or "-", r["phase"], r["max_distance"],
            "-" if r["slope"] is None else "%.3f" % r["slope"],
            "-" if r["drop"] is None else "%.1f" % r["drop"]))
    return "\n".join(lines)


def stderr_progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


ROW_FIELDS = ("model", "task", "shape", "leaves", "phase", "distance", "count", "zeros",
              "log10_median", "log10_q10", "log10_q25", "log10_q75", "log10_q90", "log10_mean",
              "hidden", "embed_dim", "seed", "train_steps", "lr")
ROWS_FILE, META_FILE, CSV_FILE = "gradients.jsonl", "gradients.json", "gradients.csv"


def write_outputs(out_dir: str, rows: Sequence[Dict], meta: Dict) -> List[str]:
    """gradients.jsonl (one row per distance), gradients.csv (the same) and gradients.json
    (how they were made), each written whole or not at all."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl = "".join(json.dumps({k: r.get(k) for k in ROW_FIELDS}, sort_keys=True) + "\n"
                    for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ROW_FIELDS)
    for r in rows:
        writer.writerow(["" if r.get(k) is None else r.get(k) for k in ROW_FIELDS])
    paths = [os.path.join(out_dir, name) for name in (ROWS_FILE, CSV_FILE, META_FILE)]
    for path, text in zip(paths, (jsonl, buf.getvalue(), json.dumps(meta, indent=2, sort_keys=True)
                                  + "\n")):
        atomic_write(path, text)
    return paths


def read_rows(path: str) -> List[Dict]:
    """Rows of a gradients.jsonl file (a torn last line is reported, not skipped silently)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                raise ValueError("%s:%d: not a JSON row" % (path, lineno)) from None
    return out
