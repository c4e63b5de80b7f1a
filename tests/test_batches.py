import numpy as np
import pytest

from bench.batches import (batch_examples, batch_stream, hash_batches, make_seq_batch,
                           make_tree_batch)
from bench.targets import class_points, labelled_count, loss_weights
from bench.tasks import Example, load_listops
from bench.trees import Tree, build_tree, parse_tree


def _ex(text, label=1):
    tree = parse_tree(text).map_tokens(int)
    return Example(tuple(tree.tokens()), tree, label)


def test_worked_example_from_the_docstring():
    b = make_tree_batch([_ex("(1 (0 1) (0 2))"), _ex("(1 (0 (0 3) (0 4)) (0 5))")])
    assert b.token.tolist() == [1, 2, 3, 4, 5, -1, -1, -1]
    assert b.height.tolist() == [0, 0, 0, 0, 0, 1, 1, 2]
    assert b.left.tolist() == [-1, -1, -1, -1, -1, 0, 2, 6]
    assert b.right.tolist() == [-1, -1, -1, -1, -1, 1, 3, 4]
    assert b.tree.tolist() == [0, 0, 1, 1, 1, 0, 1, 1]
    assert b.root.tolist() == [5, 7]
    assert b.level_offsets.tolist() == [0, 5, 7, 8]
    assert [lv.tolist() for lv in b.levels] == [[0, 1, 2, 3, 4], [5, 6], [7]]
    # the walks that strategies share: per-tree post-order, and children per height
    assert [n for n, _, _ in b.postorder()] == [0, 1, 5, 2, 3, 6, 4, 7]
    assert b.postorder()[2] == (5, 0, 1) and b.postorder()[0] == (0, -1, -1)
    assert [c.tolist() for c in b.level_children()] == [[[0, 1], [2, 3]], [[6, 4]]]


def test_class_points_of_each_loss_mode():
    # the worked example with labels: root 5 unlabelled, root 7 labelled 3, node 6 labelled 2
    tree_a = parse_tree("(-1 (0 1) (0 2))").map_tokens(int)
    tree_b = parse_tree("(3 (2 (0 3) (0 4)) (0 5))").map_tokens(int)
    b = make_tree_batch([Example((1, 2), tree_a, -1), Example((3, 4, 5), tree_b, 3)])
    assert b.label.tolist() == [0, 0, 0, 0, 0, -1, 2, 3]
    root = class_points(b, "root")
    assert root.rows.tolist() == [5, 7] and root.labels.tolist() == [-1, 3]
    assert root.count == 1 and root.on_rows(8).tolist() == [-1] * 7 + [3]
    every = class_points(b, "all")
    assert every.every_row and every.index.tolist() == list(range(8))
    assert every.labels.tolist() == b.label.tolist() and every.count == 7
    padded = b.padded(num_nodes=10)
    assert class_points(padded, "all").labels.tolist() == b.label.tolist() + [-1] * 4
    assert class_points(padded, "root").rows.tolist() == [5, 7]
    seq = make_seq_batch([Example((1, 2), tree_a, 4), Example((3,), tree_a, -1)])
    assert class_points(seq, "root").index.tolist() == [0, 1]
    with pytest.raises(ValueError):
        class_points(b, "leaves")


def test_loss_weights_make_the_mean_over_labelled_rows():
    labels, weights = loss_weights(np.array([2, -1, 0, -1]), np.int64)
    assert labels.dtype == np.int64 and labels.tolist() == [2, 0, 0, 0]
    assert weights.dtype == np.float32 and weights.tolist() == [0.5, 0.0, 0.5, 0.0]
    # no label at all: weights 0 and a count of 1, so the loss is 0 rather than 0 / 0
    assert loss_weights(np.array([-1, -1]))[1].tolist() == [0.0, 0.0]
    assert labelled_count(np.array([-1, -1])) == 1


@pytest.fixture(scope="module")
def listops():
    return load_listops(200, 10, 10, seed=2, max_length=60)


def test_tree_batch_invariants(listops):
    for batch in batch_stream(listops.train, "rvnn", 16, seed=0)[:5]:
        n = batch.num_nodes
        assert all(a.dtype == np.int32 for a in (batch.token, batch.left, batch.right, batch.tree,
                                                 batch.height, batch.label, batch.root))
        internal = batch.left >= 0
        # children before parents, and heights consistent
        idx = np.arange(n)
        assert (batch.left[internal] < idx[internal]).all()
        assert (batch.right[internal] < idx[internal]).all()
        want_h = 1 + np.maximum(batch.height[batch.left[internal]], batch.height[batch.right[internal]])
        assert (batch.height[internal] == want_h).all()
        assert (batch.height[~internal] == 0).all() and (batch.token[~internal] >= 0).all()
        assert (batch.token[internal] == -1).all()
        # every root is its tree's tallest node, and no node is anyone's child twice
        for t, r in enumerate(batch.root):
            assert batch.tree[r] == t and batch.height[r] == batch.height[batch.tree == t].max()
        kids = np.concatenate([batch.left[internal], batch.right[internal]])
        assert len(set(kids.tolist())) == kids.size == n - batch.size
        # heights sorted, levels contiguous
        assert (np.diff(batch.height) >= 0).all()
        for h, lv in enumerate(batch.levels):
            assert (batch.height[lv] == h).all()


def test_padded_form_equals_ragged_form(listops):
    batch = batch_stream(listops.train, "rvnn", 16, seed=1)[0]
    pad = batch.padded_bucketed()
    n = batch.num_nodes
    assert pad.num_nodes >= n and pad.zero == pad.num_nodes and pad.sink == pad.num_nodes + 1
    leaves = pad.leaf_node[pad.leaf_node != pad.sink]
    assert leaves.tolist() == np.nonzero(batch.left < 0)[0].tolist()
    assert (pad.leaf_token[:leaves.size] == batch.token[leaves]).all()
    assert (pad.leaf_token[leaves.size:] == 0).all()
    for h in range(1, batch.num_levels):
        row = pad.level_node[h - 1]
        real = row[row != pad.sink]
        assert real.tolist() == batch.levels[h].tolist()
        assert (pad.level_left[h - 1, :real.size] == batch.left[real]).all()
        assert (pad.level_right[h - 1, :real.size] == batch.right[real]).all()
        assert (pad.level_left[h - 1, real.size:] == pad.zero).all()
    assert (pad.level_node[batch.num_levels - 1:] == pad.sink).all()
    assert (pad.label[:n] == batch.label).all() and (pad.label[n:] == -1).all()
    assert (pad.root == batch.root).all() and (pad.root_label == batch.label[batch.root]).all()
    # buckets are powers of two
    for size in (pad.num_nodes, pad.leaf_node.size) + pad.level_node.shape:
        assert size & (size - 1) == 0
    with pytest.raises(ValueError):
        batch.padded(num_nodes=n - 1)


def test_seq_batch_pads_with_zero_and_keeps_lengths():
    exs = [Example((4, 5, 6), Tree(1, token=4), 1), Example((7,), Tree(0, token=7), 0)]
    b = make_seq_batch(exs)
    assert b.tokens.tolist() == [[4, 5, 6], [7, 0, 0]]
    assert b.lengths.tolist() == [3, 1] and b.labels.tolist() == [1, 0]
    assert b.num_tokens == 4


def test_batch_stream_is_deterministic_per_seed(listops):
    a = batch_stream(listops.train, "rnn", 10, seed=3, bucket=True)
    b = batch_stream(listops.train, "rnn", 10, seed=3, bucket=True)
    c = batch_stream(listops.train, "rnn", 10, seed=4, bucket=True)
    assert hash_batches(a) == hash_batches(b) != hash_batches(c)
    groups = batch_examples(listops.train, 10, seed=3, bucket=True)
    assert sorted(e.tokens for g in groups for e in g) == sorted(e.tokens for e in listops.train)
    # bucketing reduces padding compared with plain shuffling
    plain = batch_stream(listops.train, "rnn", 10, seed=3)
    pad = lambda bs: sum(x.tokens.size - x.num_tokens for x in bs)  # noqa: E731
    assert pad(a) < pad(plain)


def _evaluate_heights(pad, n):
    """Run the static form as a compiled strategy would, with height as the node
    function: a row that read a child before its step wrote it gets a wrong height."""
    buf = np.full(pad.num_nodes + 2, -100, np.int64)
    buf[pad.zero] = -1                       # padding reads "height -1", max() ignores it
    buf[pad.leaf_node] = 0
    for node, left, right in zip(pad.level_node, pad.level_left, pad.level_right):
        buf[node] = 1 + np.maximum(buf[left], buf[right])
        buf[pad.zero] = -1                   # keep zero as zero (writes to it are asserted against)
    return buf[:n]


def test_packed_form_is_a_valid_schedule_with_less_padding(listops):
    for seed in range(4):
        batch = batch_stream(listops.train, "rvnn", 16, seed=seed)[0]
        n = batch.num_nodes
        width = batch.group_width()
        groups = batch.packed_groups(width)
        group_of = np.full(n, -1)
        for g, nodes in enumerate(groups):
            assert 0 < nodes.size <= width
            group_of[nodes] = g
        internal = batch.left >= 0
        assert sorted(np.concatenate(groups).tolist()) == np.nonzero(internal)[0].tolist()
        assert (group_of[internal] > group_of[batch.left[internal]]).all()
        assert (group_of[internal] > group_of[batch.right[internal]]).all()

        pad = batch.padded_packed()
        assert pad.level_node.shape[1] == width and pad.level_node.shape[0] % 8 == 0
        assert (pad.level_node != pad.zero).all()     # padding never writes the zero row
        # evaluated step by step, every node gets its true height: children come first
        assert (_evaluate_heights(pad, n) == batch.height).all()
        assert (_evaluate_heights(batch.padded_bucketed(), n) == batch.height).all()
        # same leaves, labels and roots as the heights form; fewer padded slots
        heights = batch.padded_bucketed()
        for name in ("leaf_node", "leaf_token", "label", "root", "root_label"):
            assert (getattr(pad, name) == getattr(heights, name)).all(), name
        assert pad.level_node.size < heights.level_node.size
        longer = pad.steps_multiple_of(24)
        assert longer.level_node.shape[0] % 24 == 0
        assert (longer.level_node[pad.level_node.shape[0]:] == pad.sink).all()
        assert (_evaluate_heights(longer, n) == batch.height).all() and pad.steps_multiple_of(8) is pad
        exact = batch.padded_packed(bucketed=False)
        assert exact.num_nodes == n and exact.level_node.shape == (len(groups), width)
        assert (_evaluate_heights(exact, n) == batch.height).all()
    # wide groups are the plain level schedule
    widest = int(np.diff(batch.level_offsets)[1:].max())
    assert [g.tolist() for g in batch.packed_groups(widest)] == [lv.tolist() for lv in batch.levels[1:]]
    with pytest.raises(ValueError):
        batch.packed_groups(0)


def test_drop_last_and_one_leaf_trees():
    exs = [Example((i,), Tree(0, token=i), 0) for i in range(1, 8)]
    assert [len(g) for g in batch_examples(exs, 3, seed=0, drop_last=True)] == [3, 3]
    b = make_tree_batch(exs[:2])
    assert b.num_levels == 1 and b.root.tolist() == [0, 1]
    pad = b.padded_bucketed()
    assert pad.level_node.shape == (1, 1) and (pad.level_node == pad.sink).all()
    assert (pad.level_left == pad.zero).all()
    packed = b.padded_packed()     # no internal node: all-padding steps, never a zero-sized shape
    assert packed.level_node.shape == (8, 8) and (packed.level_node == packed.sink).all()
    deep = make_tree_batch([Example(tuple(range(1, 52)), build_tree("left", list(range(1, 52))), 0)])
    assert deep.num_levels == 51


def test_shape_classes_of_static_shape_strategies():
    from bench.batches import count_bucket, node_rows, node_width, padded_rows, train_length
    assert [padded_rows(n, 25) for n in (1, 2, 8, 25, 26)] == [1, 25, 25, 25, 32]
    assert [padded_rows(n) for n in (1, 3, 25)] == [1, 4, 32]
    assert [count_bucket(n) for n in (0, 1, 64, 65)] == [64, 64, 64, 128]
    assert [train_length(n) for n in (1, 16, 17, 56)] == [16, 16, 32, 64]
    assert node_rows(10, 1) == 128 and node_rows(127, 1) == 128 and node_rows(128, 1) == 256
    assert node_rows(900, 25) == 4096 and node_width(25) == 32 and node_width(1) == 8


def test_every_sst_batch_of_a_cell_falls_in_one_shape_class():
    """By design, not by which batches a cell sees: every SST batch of up to 25 sentences, in
    any order, has the same padded example count, length class and node rows; so does every
    single sentence (batch-1 latency)."""
    from bench.batches import count_bucket, node_rows, padded_rows
    from bench.tasks import load_task
    data = load_task("sst", seed=0)
    classes = set()
    for split, shuffle in (("train", True), ("dev", False), ("test", False)):
        for group in batch_examples(data.splits[split], 25, seed=0, shuffle=shuffle):
            longest = max(len(e.tokens) for e in group)
            nodes = sum(2 * len(e.tokens) - 1 for e in group)
            rows = padded_rows(len(group), 25)
            classes.add((rows, count_bucket(longest), node_rows(nodes, rows)))
    assert classes == {(25, 64, 4096), (1, 64, 128)}
