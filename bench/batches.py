"""Framework-neutral batches: ``SeqBatch`` for the RNN family, ``TreeBatch`` for the RvNN family.

All arrays are NumPy int32, built once before any timing.

TreeBatch worked example: two trees, ``(a b)`` and ``((c d) e)``. Nodes are
ordered by height, then by tree, then left to right, so every level is a
contiguous slice and children always come before parents::

    index   0  1  2  3  4  5   6   7
    node    a  b  c  d  e  ab  cd  (cd)e
    height  0  0  0  0  0  1   1   2
    left   -1 -1 -1 -1 -1  0   2   6
    right  -1 -1 -1 -1 -1  1   3   4
    tree    0  0  1  1  1  0   1   1
    root = [5, 7]; level_offsets = [0, 5, 7, 8]

``levels[h]`` holds the node indices of height ``h`` (here ``[0..4]``, ``[5, 6]``, ``[7]``).

The padded static form (``PaddedTrees``) has the same nodes plus two slots at
the end of the node buffer: ``zero`` (always the zero vector; padding entries
read it) and ``sink`` (padding entries write to it; nothing reads it). Reading
only zeros keeps padded computations finite, so they never leak NaN into
gradients. Its rows are *steps*: each step's nodes read only leaves and nodes
written by earlier steps. ``padded()`` makes one step per height, as wide as
the widest height; ``padded_packed()`` packs the nodes into narrower groups
(``packed_groups``), so the few wide low heights do not make every narrow high
one pay for their width. Over SST's training batches of 25 the bucketed heights
form has 8.4x as many slots as real internal nodes, the packed form 1.9x, in
about as many steps (README, "Models and strategies", gives the command).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .tasks import Example


@dataclass(frozen=True)
class SeqBatch:
    """tokens int32[B, T] padded with 0, lengths int32[B] (>= 1), labels int32[B]."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class PaddedTrees:
    """Static-shape form of a TreeBatch for compilers.

    Node buffer rows: ``0..num_nodes-1`` real nodes, then ``zero`` and ``sink``
    (``zero = num_nodes``, ``sink = num_nodes + 1``; ``num_nodes`` is the padded
    count, so the buffer has ``num_nodes + 2`` rows).

    * ``leaf_node int32[Lf]`` / ``leaf_token int32[Lf]``: where each leaf goes
      and its token; padding writes token 0 to ``sink``.
    * ``level_node / level_left / level_right int32[S, W]``: for each step
      (a height, or a packed group: see the module doc), the nodes written and
      their two children; padding writes to ``sink`` and reads ``zero``.
    * ``label int32[num_nodes + 2]``: -1 where unlabelled or padding.
    * ``root int32[B]``, ``root_label int32[B]``.
    """

    leaf_node: np.ndarray
    leaf_token: np.ndarray
    level_node: np.ndarray
    level_left: np.ndarray
    level_right: np.ndarray
    label: np.ndarray
    root: np.ndarray
    root_label: np.ndarray
    num_nodes: int

    @property
    def zero(self) -> int:
        return self.num_nodes

    @property
    def sink(self) -> int:
        return self.num_nodes + 1

    @property
    def shape_key(self) -> Tuple[int, ...]:
        """Everything a compiler specialises on."""
        return (self.num_nodes, self.leaf_node.shape[0]) + self.level_node.shape + self.root.shape

    def steps_multiple_of(self, k: int) -> "PaddedTrees":
        """The same form with all-padding steps appended up to a multiple of ``k``
        (for code that runs the steps in fixed-size chunks)."""
        steps, width = self.level_node.shape
        extra = -steps % k
        if not extra:
            return self
        pad = lambda a, fill: np.concatenate([a, np.full((extra, width), fill, np.int32)])  # noqa: E731
        return replace(self, level_node=pad(self.level_node, self.sink),
                       level_left=pad(self.level_left, self.zero),
                       level_right=pad(self.level_right, self.zero))


@dataclass(frozen=True)
class TreeBatch:
    """All nodes of a batch of binary trees, flattened in height order (see module doc)."""

    token: np.ndarray     # int32[N], -1 at internal nodes
    left: np.ndarray      # int32[N], -1 at leaves
    right: np.ndarray     # int32[N], -1 at leaves
    tree: np.ndarray      # int32[N], which example a node belongs to
    height: np.ndarray    # int32[N], leaves 0
    label: np.ndarray     # int32[N], -1 where unlabelled
    root: np.ndarray      # int32[B]
    level_offsets: np.ndarray  # int32[L + 1]: level h is nodes[offsets[h]:offsets[h+1]]

    @property
    def size(self) -> int:
        return int(self.root.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.token.shape[0])

    @property
    def num_levels(self) -> int:
        return int(self.level_offsets.shape[0] - 1)

    @property
    def num_tokens(self) -> int:
        return int((self.token >= 0).sum())

    @property
    def levels(self) -> List[np.ndarray]:
        """Node indices per height (contiguous ranges)."""
        o = self.level_offsets
        return [np.arange(o[h], o[h + 1], dtype=np.int32) for h in range(self.num_levels)]

    @property
    def root_label(self) -> np.ndarray:
        return self.label[self.root]

    def postorder(self) -> List[Tuple[int, int, int]]:
        """(node, left, right) for every node, tree by tree in post-order (children
        first; -1 at leaves): the walk of a ``recursive`` strategy. Iterative, so
        deep trees do not hit the recursion limit."""
        left, right = self.left.tolist(), self.right.tolist()
        order = []
        for r in self.root.tolist():
            stack = [(r, False)]
            while stack:
                n, expanded = stack.pop()
                if left[n] < 0 or expanded:
                    order.append((n, left[n], right[n]))
                else:
                    stack += [(n, True), (right[n], False), (left[n], False)]
        return order

    def level_children(self) -> List[np.ndarray]:
        """For heights 1..L-1, int32[n_h, 2]: each node's (left, right) children."""
        o = self.level_offsets
        return [np.stack([self.left[o[h]:o[h + 1]], self.right[o[h]:o[h + 1]]], axis=1)
                for h in range(1, self.num_levels)]

    def padded(self, num_nodes: Optional[int] = None, num_leaves: Optional[int] = None,
               num_levels: Optional[int] = None, width: Optional[int] = None) -> PaddedTrees:
        """The static form, padded to at least the given sizes (default: exact)."""
        o = self.level_offsets
        n_leaves = int(o[1])
        widths = np.diff(o)[1:]
        need = (self.num_nodes, n_leaves, self.num_levels - 1,
                int(widths.max()) if widths.size else 0)
        sizes = [need[i] if want is None else want
                 for i, want in enumerate((num_nodes, num_leaves, num_levels, width))]
        for name, have, want in zip(("num_nodes", "num_leaves", "num_levels", "width"), need, sizes):
            if want < have:
                raise ValueError("padded %s=%d is smaller than the batch needs (%d)" % (name, want, have))
        return self._static_form(self.levels[1:], *sizes)

    def _static_form(self, steps: Sequence[np.ndarray], n_pad: int, lf_pad: int, s_pad: int,
                     w_pad: int) -> PaddedTrees:
        """PaddedTrees with one row per entry of ``steps`` (node indices), padded as given."""
        n_leaves = int(self.level_offsets[1])
        zero, sink = n_pad, n_pad + 1
        leaf_node = np.full(lf_pad, sink, np.int32)
        leaf_token = np.zeros(lf_pad, np.int32)
        leaf_node[:n_leaves] = np.arange(n_leaves)
        leaf_token[:n_leaves] = self.token[:n_leaves]

        level_node = np.full((s_pad, w_pad), sink, np.int32)
        level_left = np.full((s_pad, w_pad), zero, np.int32)
        level_right = np.full((s_pad, w_pad), zero, np.int32)
        for s, idx in enumerate(steps):
            level_node[s, :idx.size] = idx
            level_left[s, :idx.size] = self.left[idx]
            level_right[s, :idx.size] = self.right[idx]

        label = np.full(n_pad + 2, -1, np.int32)
        label[:self.num_nodes] = self.label
        return PaddedTrees(leaf_node, leaf_token, level_node, level_left, level_right, label,
                           self.root.copy(), self.label[self.root].copy(), n_pad)

    def packed_groups(self, width: int) -> List[np.ndarray]:
        """Internal nodes in groups of at most ``width``, each after its children's groups.

        Greedy in height order: a node goes into the first group after its
        children's groups that still has room. With ``width`` >= the widest
        height this is the plain level schedule.
        """
        if width < 1:
            raise ValueError("width must be >= 1")
        n_leaves = int(self.level_offsets[1])
        group_of = np.full(self.num_nodes, -1, np.int64)
        groups: List[List[int]] = []
        first_open = 0  # groups before this one are full
        left, right = self.left.tolist(), self.right.tolist()
        for n in range(n_leaves, self.num_nodes):  # height order: children come first
            g = max(first_open, group_of[left[n]] + 1, group_of[right[n]] + 1)
            while g < len(groups) and len(groups[g]) >= width:
                g += 1
            if g == len(groups):
                groups.append([])
            groups[g].append(n)
            group_of[n] = g
            while first_open < len(groups) and len(groups[first_open]) >= width:
                first_open += 1
        return [np.asarray(grp, np.int32) for grp in groups]

    def group_width(self) -> int:
        """The packed form's width: internal nodes per height, as a power of two >= 8.

        About as many nodes per group as an average height holds keeps the
        group count near the tree height with few padding slots; powers of two
        keep the distinct shapes (and so the compiles) few.
        """
        internal = self.num_nodes - int(self.level_offsets[1])
        heights = max(1, self.num_levels - 1)
        return max(8, bucket(-(-internal // heights)))

    def padded_packed(self, bucketed: bool = True) -> PaddedTrees:
        """The static form on packed groups (see the module doc), width from
        ``group_width``. Bucketed like ``padded_bucketed`` (nodes and leaves to
        powers of two, steps to a multiple of 8) for compilers that specialise
        on shapes; else exact, with at least one step."""
        width = self.group_width()
        groups = self.packed_groups(width)
        n_leaves = int(self.level_offsets[1])
        if not bucketed:
            return self._static_form(groups, self.num_nodes, n_leaves, max(1, len(groups)), width)
        return self._static_form(groups, bucket(self.num_nodes), bucket(n_leaves),
                                 step_bucket(len(groups)), width)

    def padded_bucketed(self) -> PaddedTrees:
        """Padded to bucket sizes (next power of two), so few distinct shapes occur.

        Never zero-sized: a batch of one-leaf trees gets one all-padding level
        (some compilers treat a 0 in a shape as unknown).
        """
        o = self.level_offsets
        widths = np.diff(o)[1:]
        return self.padded(num_nodes=bucket(self.num_nodes), num_leaves=bucket(int(o[1])),
                           num_levels=bucket(self.num_levels - 1),
                           width=bucket(int(widths.max()) if widths.size else 1))


def bucket(n: int) -> int:
    """Next power of two >= max(n, 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def round_up(n: int, k: int) -> int:
    """Next multiple of ``k`` >= max(n, 1) (so at least ``k``)."""
    return max(1, -(-int(n) // k)) * k


# --- shape classes for strategies that compile once per shape (JAX, TensorFlow's XLA) ---
#
# A compiler that specialises on shapes compiles a program for every new shape
# it meets. These helpers map every batch of a task to a few fixed shapes, by
# design rather than by which batches a cell happens to see: a batch's padded
# example count depends only on its size and the cell's batch size, and every
# other dimension is a power of two with a floor high enough that a whole task
# (SST: sentences up to 56 tokens) falls in one class. The floors are loose on
# purpose: strategies skip the padded part at run time (a loop that stops, or a
# chunk behind a branch), so a padded step or leaf costs almost nothing, while
# each extra shape costs a compile of seconds (CPU) to tens of seconds (GPU).

MIN_COUNT = 64           # length, step and chunk counts start at this power of two
NODES_PER_EXAMPLE = 128  # node-buffer rows per padded example (trees up to 64 leaves)


def padded_rows(n: int, batch_size: Optional[int] = None) -> int:
    """Examples a static-shape program holds for a batch of ``n``.

    One example stays one (batch-1 latency is a shape of its own); anything up
    to the cell's ``batch_size`` (a partial last batch, the verification
    batch) pads up to it; a larger batch, or any batch when the batch size is
    unknown, pads to the next power of two. Padded examples are masked: they
    change no result and count in no throughput.
    """
    n = int(n)
    if n <= 1:
        return 1
    if batch_size and n <= batch_size:
        return int(batch_size)
    return bucket(n)


def count_bucket(n: int) -> int:
    """Padded sequence length, step count or chunk count: a power of two >= max(n, MIN_COUNT)."""
    return bucket(max(int(n), MIN_COUNT))


def train_length(t: int) -> int:
    """Padded sequence length of a training step whose loop cannot skip padded steps (a scan
    with a static trip count, differentiable): a power of two >= max(t, 16). SST needs 16,
    32 and 64; padding averages ~1.4x the batches' longest sequence."""
    return bucket(max(int(t), 16))


def node_rows(num_nodes: int, rows: int) -> int:
    """Rows of a node buffer for ``num_nodes`` real nodes and ``rows`` padded examples,
    one of them a spare (a power of two >= num_nodes + 1 and >= NODES_PER_EXAMPLE * rows)."""
    return bucket(max(int(num_nodes) + 1, NODES_PER_EXAMPLE * int(rows)))


def node_width(rows: int) -> int:
    """Nodes per batched tree step for ``rows`` padded examples: a power of two >= rows, >= 8.

    An SST batch of 25 sentences has ~450 internal nodes over ~18 heights, about
    25 per height: a width near the example count keeps padded slots few
    (about 1.5x the real nodes) with about as many steps as heights.
    """
    return max(8, bucket(rows))


def step_bucket(n: int) -> int:
    """Padded number of packed steps: the next multiple of 8, at least 8."""
    return round_up(n, 8)


def padded_array(values, size: int, fill, dtype=np.int32) -> np.ndarray:
    """``values`` then ``fill`` up to ``size`` entries (a static shape's padded tail)."""
    out = np.full(int(size), fill, dtype)
    out[:len(values)] = values
    return out


def make_seq_batch(examples: Sequence[Example]) -> SeqBatch:
    lengths = np.array([len(e.tokens) for e in examples], np.int32)
    if (lengths < 1).any():
        raise ValueError("every sequence needs at least one token")
    tokens = np.zeros((len(examples), int(lengths.max())), np.int32)
    for i, e in enumerate(examples):
        tokens[i, :len(e.tokens)] = e.tokens
    labels = np.array([e.label for e in examples], np.int32)
    return SeqBatch(tokens, lengths, labels)


def make_tree_batch(examples: Sequence[Example]) -> TreeBatch:
    """Flatten the trees of ``examples`` in (height, tree, left-to-right) order."""
    records = []  # (height, tree index, position in postorder, node)
    for t, ex in enumerate(examples):
        for pos, node in enumerate(ex.tree.postorder()):
            records.append((node.height, t, pos, node))
    records.sort(key=lambda r: r[:3])
    index = {id(r[3]): i for i, r in enumerate(records)}
    n = len(records)
    token = np.full(n, -1, np.int32)
    left = np.full(n, -1, np.int32)
    right = np.full(n, -1, np.int32)
    tree = np.empty(n, np.int32)
    height = np.empty(n, np.int32)
    label = np.empty(n, np.int32)
    for i, (h, t, _, node) in enumerate(records):
        tree[i], height[i], label[i] = t, h, node.label
        if node.is_leaf:
            token[i] = node.token
        else:
            left[i], right[i] = index[id(node.left)], index[id(node.right)]
    root = np.array([index[id(ex.tree)] for ex in examples], np.int32)
    counts = np.bincount(height, minlength=int(height.max()) + 1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return TreeBatch(token, left, right, tree, height, label, root, offsets)


def make_batch(family: str, examples: Sequence[Example]):
    """The batch of one family: 'rnn' -> SeqBatch, 'rvnn' -> TreeBatch."""
    if family not in ("rnn", "rvnn"):
        raise ValueError("family is 'rnn' or 'rvnn', not %r" % (family,))
    return make_seq_batch(examples) if family == "rnn" else make_tree_batch(examples)


def batch_examples(examples: Sequence[Example], batch_size: int, seed: int,
                   shuffle: bool = True, bucket: bool = False,
                   drop_last: bool = False) -> List[List[Example]]:
    """Deterministic grouping of examples into batches.

    ``shuffle`` permutes with ``numpy.random.default_rng(seed)``. ``bucket``
    sorts by length within windows of 20 batches so batches hold similar
    lengths (less padding), then shuffles the batch order with the same rng.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples)) if shuffle else np.arange(len(examples))
    items = [examples[i] for i in order]
    if bucket:
        window = batch_size * 20
        items = [e for w in range(0, len(items), window)
                 for e in sorted(items[w:w + window], key=lambda e: len(e.tokens))]
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if bucket:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def batch_stream(examples: Sequence[Example], family: str, batch_size: int, seed: int,
                 **kwargs) -> List:
    """Ready batches of one family (``make_batch``)."""
    return [make_batch(family, group) for group in batch_examples(examples, batch_size, seed, **kwargs)]


def hash_batches(batches: Sequence) -> str:
    """sha256 over every array of every batch, in order (first 16 hex digits)."""
    h = hashlib.sha256()
    for b in batches:
        for name in sorted(vars(b)):
            arr = np.ascontiguousarray(getattr(b, name))
            h.update(name.encode())
            h.update(str(arr.shape).encode())
            h.update(arr.astype(np.int64).tobytes())
    return h.hexdigest()[:16]
