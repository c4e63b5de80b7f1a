"""Tasks: SST (5- and 2-class), ListOps and synthetic trees.

Every task yields ``Example``s that carry both forms of one input: the token
sequence (for the RNN family) and a binary tree over exactly those tokens (for
the RvNN family), so both families see the same data.

Task names used on the command line and in records:

* ``sst`` -- SST fine-grained, 5 classes; ``sst2`` -- binary, neutral roots dropped.
* ``listops`` -- the seeded ListOps generator (defaults below).
* ``synth-SHAPE-N`` -- synthetic trees with N leaves of shape balanced, left,
  right or random, e.g. ``synth-balanced-64``.

Parsing SST's 442k nodes costs seconds, and every cell runs in a fresh process,
so the parsed treebank is cached on disk (see ``sst_cache_dir``): one file per
(data files' checksum, number of classes, loader code), written atomically,
checked in full when read; a cache that fails any check is parsed again and
rewritten, never trusted.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .trees import ParseError, Tree, build_tree, read_trees

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SST_DIR = os.path.join(DATA_DIR, "sst")
SST_CLASSES = 5   # the files' labels, 0..4; binary SST is derived from them
UNK = "<unk>"
LISTOPS_SPLITS = (2000, 200, 200)   # train, dev, test expressions
SYNTH_EXAMPLES = 200


class Vocab:
    """Token <-> id. Id 0 is the unknown token, which also pads sequences."""

    def __init__(self, tokens: Sequence[str]):
        self.itos = [UNK] + [t for t in tokens if t != UNK]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def from_examples(cls, token_lists, min_count: int = 1) -> "Vocab":
        counts = Counter(tok for toks in token_lists for tok in toks)
        # Sorted by count, then text: the same vocabulary on every machine.
        ordered = sorted((t for t, c in counts.items() if c >= min_count),
                         key=lambda t: (-counts[t], t))
        return cls(ordered)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, token: str) -> int:
        return self.stoi.get(token, 0)


@dataclass(frozen=True)
class Example:
    """One input: token ids in order, a binary tree over the same ids, a label."""

    tokens: Tuple[int, ...]
    tree: Tree
    label: int


@dataclass
class Dataset:
    name: str
    num_classes: int
    vocab: Vocab
    splits: Dict[str, List[Example]] = field(default_factory=dict)
    origin: str = "built"   # SST: "parsed", "cache" or why the cache was not used

    @property
    def train(self) -> List[Example]:
        return self.splits["train"]


def _examples_from_trees(trees: List[Tree], vocab: Vocab) -> List[Example]:
    out = []
    for tree in trees:
        encoded = tree.map_tokens(vocab.encode)
        out.append(Example(tuple(encoded.tokens()), encoded, encoded.label))
    return out


def _binary_label(label: int) -> int:
    # SST-2: 0,1 negative; 3,4 positive; neutral phrases carry no label.
    return -1 if label == 2 else int(label > 2)


@contextlib.contextmanager
def _gc_paused():
    """Building ~10^6 small tuples triggers the cyclic GC thousands of times; none are cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def load_sst(num_classes: int = 5, data_dir: str = SST_DIR, cache: bool = True) -> Dataset:
    """SST, from the parse cache where it holds a valid copy of these files (see below)."""
    with _gc_paused():
        if not cache:
            return _load_sst(num_classes, data_dir)
        return _load_sst_cached(num_classes, data_dir)


def _load_sst(num_classes: int, data_dir: str) -> Dataset:
    """SST from the PTB files shipped in the package.

    5 classes keep every sentence (8544/1101/2210). 2 classes drop neutral
    roots (6920/872/1821) and mark neutral phrases as unlabelled (-1).
    """
    if num_classes not in (2, 5):
        raise ValueError("SST has 5 or 2 classes, not %r" % num_classes)
    raw = {}
    for split in ("train", "dev", "test"):
        # Errors name the file as opened (a custom data directory's, not the package's).
        path = os.path.join(data_dir, split + ".txt")
        trees = read_trees(path, labels=range(SST_CLASSES))
        if not trees:
            raise ParseError(path, 1, 1, "at least one tree", "an empty split")
        if num_classes == 2:
            trees = [t.map_labels(_binary_label) for t in trees if t.label != 2]
            if not trees:
                raise ParseError(path, 1, 1, "a non-neutral root for binary SST",
                                 "only neutral roots")
        raw[split] = trees
    vocab = Vocab.from_examples(t.tokens() for t in raw["train"])
    name = "sst" if num_classes == 5 else "sst2"
    return Dataset(name, num_classes, vocab,
                   {s: _examples_from_trees(ts, vocab) for s, ts in raw.items()}, origin="parsed")


# --- the SST parse cache ---------------------------------------------------------

CACHE_ENV = "BENCH_CACHE_DIR"
_SST_SPLITS = ("train", "dev", "test")
_CACHE_FORMAT = 1
_CACHE_KEEP = 8   # newest cache files kept per class count (several checkouts share the cache)
_LOADER_SOURCES = (os.path.abspath(__file__),
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "trees.py"))


def sst_cache_dir() -> Optional[str]:
    """$BENCH_CACHE_DIR (set but empty: no cache), else $XDG_CACHE_HOME/rnn-rvnn-bench,
    else ~/.cache/rnn-rvnn-bench."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV] or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rnn-rvnn-bench")


def _digest(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            data = fh.read()
        h.update(b"%d:" % len(data))
        h.update(data)
    return h.hexdigest()


def _sst_cache_path(folder: str, num_classes: int, data_dir: str) -> Tuple[str, Dict]:
    """The cache file for these data files, class count and loader code, and its expected meta."""
    data = _digest([os.path.join(data_dir, s + ".txt") for s in _SST_SPLITS])
    code = _digest(_LOADER_SOURCES)
    key = {"format": _CACHE_FORMAT, "num_classes": num_classes, "data_sha256": data,
           "code_sha256": code}
    return os.path.join(folder, "sst%d-%s-%s.npz" % (num_classes, data[:16], code[:12])), key


def _load_sst_cached(num_classes: int, data_dir: str) -> Dataset:
    folder = sst_cache_dir()
    if folder is None:
        ds = _load_sst(num_classes, data_dir)
        ds.origin = "parsed (cache off: %s is empty)" % CACHE_ENV
        return ds
    path, key = _sst_cache_path(folder, num_classes, data_dir)
    why = "no cache file yet"
    if os.path.exists(path):
        try:
            ds = _read_sst_cache(path, key)
            ds.origin = "cache"
            return ds
        except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError,
                zipfile.BadZipFile) as exc:   # a damaged cache is never trusted: parse again
            why = "cache file unusable (%s), rewritten" % _short(exc)
    ds = _load_sst(num_classes, data_dir)   # a parse error raises before anything is written
    try:
        _write_sst_cache(path, key, ds)
        ds.origin = "parsed (%s)" % why
    except OSError as exc:   # a read-only or full cache directory only costs the parse
        ds.origin = "parsed (cache not written: %s)" % _short(exc)
    return ds


def _short(exc: BaseException) -> str:
    text = ("%s: %s" % (type(exc).__name__, exc)).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _write_sst_cache(path: str, key: Dict, ds: Dataset) -> None:
    """Trees in postorder as two arrays (label, token id or -1 inside) plus nodes per tree:
    numbers only, so reading needs no pickle and every value can be checked."""
    labels: List[int] = []
    tokens: List[int] = []
    sizes: List[int] = []
    for split in _SST_SPLITS:
        for ex in ds.splits[split]:
            sizes.append(ex.tree.size)
            for node in ex.tree.postorder():
                labels.append(node.label)
                tokens.append(-1 if node.token is None else node.token)
    meta = dict(key, name=ds.name, vocab=ds.vocab.itos,
                splits=[len(ds.splits[s]) for s in _SST_SPLITS])
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
                     labels=np.asarray(labels, dtype=np.int8),
                     tokens=np.asarray(tokens, dtype=np.int32),
                     sizes=np.asarray(sizes, dtype=np.int32))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)   # readers see the old file or the whole new one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _prune_cache(folder, "sst%d-" % ds.num_classes)


def _prune_cache(folder: str, prefix: str) -> None:
    """Keep the newest few cache files of a kind: each edit of the loader code makes a new one."""
    with contextlib.suppress(OSError):
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".npz")]
        names.sort(key=lambda n: os.path.getmtime(os.path.join(folder, n)), reverse=True)
        for name in names[_CACHE_KEEP:]:
            os.unlink(os.path.join(folder, name))


def _read_sst_cache(path: str, key: Dict) -> Dataset:
    """The dataset a cache file holds; ValueError (or another read error) unless every check
    passes: the zip's CRCs, the key, array types and lengths, labels and token ids in range,
    and a well-formed binary tree for every example."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        labels, tokens, sizes = z["labels"], z["tokens"], z["sizes"]
    if any(meta.get(k) != v for k, v in key.items()):
        raise ValueError("key mismatch")
    num_classes = key["num_classes"]
    vocab = meta["vocab"]
    counts = meta["splits"]
    _check_cache_meta(vocab, counts)
    _check_cache_arrays(labels, tokens, sizes, counts)
    _check_cache_values(labels, tokens, num_classes, len(vocab))
    trees = _rebuild_trees(labels.tolist(), tokens.tolist(), sizes.tolist())
    if any(t.label < 0 for t in trees):
        raise ValueError("an unlabelled root")
    examples = _cached_examples(trees, tokens[tokens >= 0].tolist())
    splits, start = {}, 0
    for split, count in zip(_SST_SPLITS, counts):
        splits[split] = examples[start:start + count]
        start += count
    return Dataset(meta["name"], num_classes, Vocab(vocab), splits)


def _check_cache_meta(vocab, counts) -> None:
    """The vocabulary (UNK first, distinct strings) and one positive count per split."""
    if not (isinstance(vocab, list) and vocab and vocab[0] == UNK
            and all(isinstance(t, str) for t in vocab) and len(set(vocab)) == len(vocab)):
        raise ValueError("bad vocabulary")
    if not (isinstance(counts, list) and len(counts) == len(_SST_SPLITS)
            and all(isinstance(c, int) and c > 0 for c in counts)):
        raise ValueError("bad split counts")


def _check_cache_arrays(labels: np.ndarray, tokens: np.ndarray, sizes: np.ndarray,
                        counts: List[int]) -> None:
    """Array types and shapes, and one size per example adding up to the nodes."""
    if (labels.dtype != np.int8 or tokens.dtype != np.int32 or sizes.dtype != np.int32
            or labels.ndim != 1 or tokens.shape != labels.shape or sizes.ndim != 1):
        raise ValueError("bad array types")
    if len(sizes) != sum(counts) or int(sizes.min()) < 1 or int(sizes.sum()) != len(labels):
        raise ValueError("bad tree sizes")


def _check_cache_values(labels: np.ndarray, tokens: np.ndarray, num_classes: int,
                        vocab_size: int) -> None:
    """Labels and token ids in range."""
    low = -1 if num_classes == 2 else 0   # binary SST leaves neutral phrases unlabelled
    if len(labels) and (int(labels.min()) < low or int(labels.max()) >= num_classes
                        or int(tokens.min()) < -1 or int(tokens.max()) >= vocab_size):
        raise ValueError("label or token out of range")


def _cached_examples(trees: List[Tree], leaf_ids: List[int]) -> List[Example]:
    """One example per tree, its tokens the next of the leaves' ids (in postorder)."""
    examples, at = [], 0
    for tree in trees:
        n = (tree.size + 1) // 2   # a binary tree of n leaves has 2n - 1 nodes
        examples.append(Example(tuple(leaf_ids[at:at + n]), tree, tree.label))
        at += n
    return examples


def _rebuild_trees(labels: List[int], tokens: List[int], sizes: List[int]) -> List[Tree]:
    """Postorder arrays back to trees. Nodes are built as Tree's tuples directly (Tree.__new__'s
    checks, done here once per node, cost half the time); malformed input raises ValueError."""
    new = tuple.__new__
    out = []
    i = 0
    for size in sizes:
        stack: List[Tree] = []
        push, pop = stack.append, stack.pop
        for j in range(i, i + size):
            tok = tokens[j]
            if tok >= 0:
                push(new(Tree, (labels[j], tok, None, None, 1, 0)))
            else:
                if len(stack) < 2:
                    raise ValueError("an internal node without two children")
                r = pop()
                l = pop()
                hl, hr = l[5], r[5]
                push(new(Tree, (labels[j], None, l, r, 1 + l[4] + r[4], 1 + (hl if hl > hr else hr))))
        if len(stack) != 1:
            raise ValueError("a tree's nodes do not form one tree")
        out.append(stack[0])
        i += size
    return out


# --- ListOps -------------------------------------------------------------------

LISTOPS_OPS = ("MIN", "MAX", "MED", "SM")


def listops_eval(expr) -> int:
    """Value of an expression: an int digit, or (op, [args])."""
    if isinstance(expr, int):
        return expr
    op, args = expr
    values = [listops_eval(a) for a in args]
    if op == "MIN":
        return min(values)
    if op == "MAX":
        return max(values)
    if op == "MED":
        ordered = sorted(values)
        mid = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[mid]
        return (ordered[mid - 1] + ordered[mid]) // 2
    if op == "SM":
        return sum(values) % 10
    raise ValueError("unknown ListOps operator %r" % (op,))


def listops_tokens(expr) -> List[str]:
    """Sequence form: ``[MAX 2 9 ]`` with brackets as tokens."""
    out: List[str] = []
    stack = [expr]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, int):
            out.append(str(item))
        else:
            op, args = item
            out.append("[" + op)
            stack.append("]")
            stack.extend(reversed(args))
    return out


def listops_tree(expr) -> Tree:
    """Binarized tree form over exactly the sequence tokens.

    ``[OP a b c ]`` becomes ((((`[OP` a) b) c) `]`): the list is consumed left
    to right, and the node that closes it carries the list's value as its
    label; the other internal nodes carry none (-1).
    """
    if isinstance(expr, int):
        return Tree(expr, token=str(expr))
    op, args = expr
    node = Tree(-1, token="[" + op)
    for arg in args:
        node = Tree(-1, left=node, right=listops_tree(arg))
    return Tree(listops_eval(expr), left=node, right=Tree(-1, token="]"))


def generate_listops(rng: np.random.Generator, max_depth: int = 20, p_op: float = 0.25,
                     min_args: int = 2, max_args: int = 5):
    """One expression, Nangia & Bowman (2018) style.

    Below ``max_depth`` a node is an operator with probability ``p_op``, else a
    digit 0-9; operators take ``min_args``..``max_args`` arguments uniformly.
    The root (depth 1) is always an operator: a bare digit is not a list
    operation, and a unique-trees dataset could hold only ten of them.
    """

    def node(depth):
        is_op = depth == 1 or (depth < max_depth and rng.random() < p_op)
        if not is_op:
            return int(rng.integers(0, 10))
        op = LISTOPS_OPS[int(rng.integers(0, len(LISTOPS_OPS)))]
        n_args = int(rng.integers(min_args, max_args + 1))
        return (op, [node(depth + 1) for _ in range(n_args)])

    return node(1)


def expr_depth(expr) -> int:
    if isinstance(expr, int):
        return 1
    return 1 + max(expr_depth(a) for a in expr[1])


def load_listops(n_train: int = LISTOPS_SPLITS[0], n_dev: int = LISTOPS_SPLITS[1],
                 n_test: int = LISTOPS_SPLITS[2], seed: int = 0,
                 max_length: Optional[int] = 100, max_depth: int = 20) -> Dataset:
    """Unique ListOps expressions, split train/dev/test, labels 0-9.

    ``max_length`` drops expressions with more tokens (None keeps all).
    """
    rng = np.random.default_rng(seed)
    seen = set()
    exprs = []
    total = n_train + n_dev + n_test
    attempts = 0
    while len(exprs) < total:
        attempts += 1
        if attempts > 100 * total + 1000:
            raise RuntimeError("ListOps: could not draw %d unique expressions" % total)
        expr = generate_listops(rng, max_depth=max_depth)
        toks = listops_tokens(expr)
        if max_length is not None and len(toks) > max_length:
            continue
        key = " ".join(toks)
        if key in seen:
            continue
        seen.add(key)
        exprs.append(expr)
    vocab = Vocab(["[" + op for op in LISTOPS_OPS] + ["]"] + [str(d) for d in range(10)])
    examples = _examples_from_trees([listops_tree(e) for e in exprs], vocab)
    splits = {"train": examples[:n_train], "dev": examples[n_train:n_train + n_dev],
              "test": examples[n_train + n_dev:]}
    return Dataset("listops", 10, vocab, splits)


# --- synthetic -----------------------------------------------------------------

SHAPES = ("balanced", "left", "right", "random")


def load_synthetic(shape: str, n_leaves: int, n_examples: int = SYNTH_EXAMPLES,
                   vocab_size: int = 1000,
                   num_classes: int = 5, seed: int = 0) -> Dataset:
    """Trees of one shape and size with random tokens and root labels.

    For scaling curves only: labels are noise, so accuracy means nothing here.
    """
    if shape not in SHAPES:
        raise ValueError("unknown shape %r (one of %s)" % (shape, ", ".join(SHAPES)))
    if n_leaves < 1:
        raise ValueError("a tree needs at least one leaf")
    rng = np.random.default_rng(seed)
    vocab = Vocab(["w%d" % i for i in range(1, vocab_size)])
    examples = []
    for _ in range(n_examples):
        ids = [int(t) for t in rng.integers(1, vocab_size, size=n_leaves)]
        tree = build_tree(shape, ids, rng=rng)
        label = int(rng.integers(0, num_classes))
        tree = Tree(label, token=tree.token) if tree.is_leaf else Tree(
            label, left=tree.left, right=tree.right)
        examples.append(Example(tuple(ids), tree, label))
    return Dataset("synth-%s-%d" % (shape, n_leaves), num_classes, vocab,
                   {"train": examples, "dev": examples[: max(1, n_examples // 10)],
                    "test": examples[: max(1, n_examples // 10)]})


def check_task_name(name: str) -> None:
    """Raise ValueError for a task name load_task would not accept (without loading anything)."""
    if name in ("sst", "sst2", "listops"):
        return
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "synth" and parts[1] in SHAPES and parts[2].isdigit() \
            and int(parts[2]) >= 1:
        return
    raise ValueError("unknown task %r: use sst, sst2, listops or synth-SHAPE-N "
                     "(SHAPE in %s)" % (name, ", ".join(SHAPES)))


_ROOT_LABEL = re.compile(rb"\s*\(\s*([^\s()]+)")


def train_size(name: str) -> int:
    """Examples in a task's training split, without building the task (the runner checks
    batch sizes against it before any work). SST counts the roots in its train file."""
    check_task_name(name)
    if name == "listops":
        return LISTOPS_SPLITS[0]
    if name.startswith("synth-"):
        return SYNTH_EXAMPLES
    roots = 0
    with open(os.path.join(SST_DIR, "train.txt"), "rb") as fh:
        for raw in fh:
            label = _ROOT_LABEL.match(raw)
            if label and (name == "sst" or label.group(1) != b"2"):   # sst2 drops neutral roots
                roots += 1
    return roots


def load_task(name: str, seed: int = 0) -> Dataset:
    """A dataset by its task name (see the module docstring)."""
    check_task_name(name)
    if name == "sst":
        return load_sst(5)
    if name == "sst2":
        return load_sst(2)
    if name == "listops":
        return load_listops(seed=seed)
    _, shape, n = name.split("-")
    return load_synthetic(shape, int(n), seed=seed)
