"""PyTorch-only properties the generic equivalence tests do not reach.

* the nn.RNN / nn.LSTM layout mapping is exact both ways and keeps bias_hh
  a frozen zero through training;
* Adam and Adagrad use the suite's constants (two steps against the shared formulas);
* torch.compile graphs stay bounded over batches of varying shape, while
  still computing the reference's function;
* an all-unlabelled batch gives loss 0 and zero gradients, not NaN;
* a chain far deeper than Python's recursion limit runs in ``recursive``;
* ``levels``'s written-out backward is the reference's and autograd's, edge batches included.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import reference, verify  # noqa: E402
from bench.batches import make_batch, make_seq_batch, make_tree_batch  # noqa: E402
from bench.interface import Unavailable  # noqa: E402
from bench.params import ModelConfig, init_params  # noqa: E402
from bench.tasks import Example  # noqa: E402
from bench.trees import build_tree  # noqa: E402
from impls.torch_impl import common  # noqa: E402
from impls.torch_impl.rnn import CHUNK, RNN  # noqa: E402
from impls.torch_impl.rvnn import RvNN  # noqa: E402
from optimizer_oracle import check_train_steps  # noqa: E402


def _examples(lengths, seed=0, vocab=20, shape="random", labelled=True, classes=3):
    """Examples over random tokens; every tree node gets a random label (root and
    all-node losses both see labels), or none with ``labelled=False``."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        tree = build_tree(shape, [int(t) for t in rng.integers(1, vocab, size=n)], rng=rng)
        tree = tree.map_labels(lambda _: int(rng.integers(0, classes)) if labelled else -1)
        out.append(Example(tuple(tree.tokens()), tree, tree.label))
    return out


def test_fused_mapping_roundtrip_and_layout():
    cfg = ModelConfig("lstm", vocab_size=10, embed_dim=4, hidden=3)
    p = init_params(cfg, seed=0)
    cell = {k: p[k] for k in ("W_x", "W_h", "b")}
    torch_side = common.fused_from_canonical(cell)
    assert torch_side["weight_ih_l0"].shape == (4 * 3, 4)       # torch's (4H, D)
    np.testing.assert_array_equal(torch_side["weight_ih_l0"], p["W_x"].T)
    np.testing.assert_array_equal(torch_side["bias_hh_l0"], 0)
    back = common.fused_to_canonical(torch_side)
    for k in cell:
        np.testing.assert_array_equal(back[k], cell[k])


@pytest.mark.parametrize("model", ["elman", "lstm"])
def test_fused_bias_hh_stays_frozen_zero(model):
    cfg = ModelConfig(model, vocab_size=20, embed_dim=5, hidden=4, num_classes=3, lr=0.5)
    impl = RNN(cfg, "fused", device="cpu", threads=1)
    params = init_params(cfg, seed=3)
    impl.load_params(params)
    batch = make_seq_batch(_examples([3, 7, 5]))
    ready = impl.prepare(batch)
    _, grads = impl.loss_and_grads(ready)
    impl.train_step(ready)
    assert float(impl.layer.bias_hh_l0.abs().max()) == 0.0
    # the effective bias moved by exactly one step of its gradient
    np.testing.assert_allclose(impl.export_params()["b"], params["b"] - cfg.lr * grads["b"],
                               atol=1e-6)


@pytest.mark.parametrize("model", ["elman", "lstm"])
def test_fused_pads_a_well_filled_batch_and_packs_a_ragged_one_both_exact(model):
    from impls.torch_impl.rnn import PADDED_MIN_FILL
    cfg = ModelConfig(model, vocab_size=20, embed_dim=5, hidden=4, num_classes=3)
    impl = RNN(cfg, "fused", device="cpu", threads=1)
    params = init_params(cfg, seed=4)
    impl.load_params(params)
    even = make_seq_batch(_examples([9, 8, 9, 7], seed=1))        # fill 33/36
    ragged = make_seq_batch(_examples([12, 1, 2, 3], seed=2))     # fill 18/48
    assert 33 / 36 >= PADDED_MIN_FILL > 18 / 48
    assert impl.prepare(even).last is not None and impl.prepare(even).packed_tokens is None
    assert impl.prepare(ragged).last is None and impl.prepare(ragged).packed_tokens is not None
    for batch in (even, ragged):
        result = verify.check(impl, cfg, params, batch)
        assert result["ok"], result["problems"]
        assert result["grad_max_rel"] < 1e-4


@pytest.mark.parametrize("loss_mode", ["root", "all"])
@pytest.mark.parametrize("model", ["rvnn", "treelstm"])
def test_levels_written_out_backward_matches_the_reference_and_autograd(model, loss_mode):
    """``levels`` runs in place with its backward written out (LevelsFunction): its logits,
    loss and gradients are the reference's, and its gradients are what autograd finds through
    the per-operator cells on the same schedule; on a ragged batch, on one-word trees (no
    height above the leaves) and with every node classified (gradients enter inner rows)."""
    from impls.torch_impl import rvnn
    cfg = ModelConfig(model, vocab_size=20, embed_dim=5, hidden=4, num_classes=3,
                      loss_mode=loss_mode)
    impl = RvNN(cfg, "levels", device="cpu", threads=1)
    params = init_params(cfg, seed=5)
    impl.load_params(params)
    leaf, node = rvnn.CELLS[model][:2]
    for lengths in ([7, 1, 12, 3], [1], [1, 1]):
        batch = make_tree_batch(_examples(lengths, seed=len(lengths)))
        result = verify.check(impl, cfg, params, batch)
        assert result["ok"], result["problems"]
        ready = impl.prepare(batch)
        p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
        leaf_w = [p[n] for n in rvnn.CELLS[model][2]]
        node_w = [p[n] for n in rvnn.CELLS[model][3]]
        x = p["E"][ready.leaf_token]
        seed = torch.randn(sum(ready.level_sizes), cfg.hidden, dtype=torch.float64)
        h_all, c_all = leaf(x, *leaf_w)
        for lr in ready.level_lr:
            hlr = h_all.index_select(0, lr).view(-1, 2 * cfg.hidden)
            c_l = c_r = None
            if c_all is not None:
                c_l, c_r = c_all.index_select(0, lr).view(-1, 2, cfg.hidden).unbind(1)
            h, c = node(hlr, c_l, c_r, *node_w)
            h_all = torch.cat([h_all, h])
            c_all = None if c is None else torch.cat([c_all, c])
        want = torch.autograd.grad((h_all * seed).sum(), [x] + leaf_w + node_w, allow_unused=True)
        got_h = rvnn.LevelsFunction.apply(x, *leaf_w, *node_w, model, ready.level_sizes,
                                          ready.level_lr)
        got = torch.autograd.grad((got_h * seed).sum(), [x] + leaf_w + node_w)
        for w, g in zip(want, got):   # one-word trees leave the node weights unused: zero
            w = torch.zeros_like(g) if w is None else w
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
@pytest.mark.parametrize("model,strategy", [("lstm", "fused"), ("treelstm", "levels")])
def test_optimizer_constants(optimizer, model, strategy):
    """Adam and Adagrad with the suite's constants: two steps against the shared float64
    formulas (tests/optimizer_oracle.py, on labelled trees)."""
    cfg = ModelConfig(model, vocab_size=20, embed_dim=5, hidden=4, num_classes=3,
                      optimizer=optimizer, lr=0.01)
    cls = RNN if cfg.family == "rnn" else RvNN
    impl = cls(cfg, strategy, device="cpu", threads=1)
    params = init_params(cfg, seed=1)
    examples = _examples([4, 6, 3], seed=2)
    batch = make_batch(cfg.family, examples)
    check_train_steps(impl, cfg, params, batch, 2)
    got = impl.export_params()
    # load_params resets the optimiser: the same two steps land at exactly the same place
    impl.load_params(params)
    ready = impl.prepare(batch)
    impl.train_step(ready)
    impl.train_step(ready)
    for name, value in impl.export_params().items():
        np.testing.assert_array_equal(value, got[name])


def test_compiled_rnn_graphs_are_bounded():
    """Lengths 1..40 and batch sizes 1..9 (each batch a new shape): a handful of
    graphs in all, and every batch still matches the reference."""
    cfg = ModelConfig("lstm", vocab_size=20, embed_dim=5, hidden=4, num_classes=3)
    impl = RNN(cfg, "compiled", device="cpu", threads=1)
    params = init_params(cfg, seed=0)
    impl.load_params(params)
    rng = np.random.default_rng(0)
    shapes = set()
    for i in range(10):
        lengths = [int(n) for n in rng.integers(1, 41, size=1 + i % 9)]
        batch = make_seq_batch(_examples(lengths, seed=i))
        shapes.add(batch.tokens.shape)
        ready = impl.prepare(batch)
        got = impl.to_numpy(impl.logits(ready))
        assert verify.max_abs(got, reference.logits(cfg, params, batch)) <= 1e-4
        impl.loss_and_grads(ready)
    assert len(shapes) >= 8
    info = impl.info()
    compiled, per_phase = info["compile"], info["compiles"]
    # {grad, no grad} x {2+ examples running, 1 running (dynamo specialises size 1)}
    assert compiled["graphs"] <= 4, compiled
    assert per_phase["train"] <= 2 and per_phase["infer"] <= 2, per_phase
    assert per_phase["train"] + per_phase["infer"] == compiled["graphs"]
    assert compiled["graph_breaks"] == 0, compiled
    assert CHUNK >= 2


def test_compiled_rvnn_graphs_are_bounded():
    cfg = ModelConfig("treelstm", vocab_size=20, embed_dim=5, hidden=4, num_classes=3,
                      loss_mode="all")
    impl = RvNN(cfg, "compiled", device="cpu", threads=1)
    params = init_params(cfg, seed=0)
    impl.load_params(params)
    rng = np.random.default_rng(1)
    keys = set()
    for i in range(8):
        lengths = [int(n) for n in rng.integers(2, 60, size=2 + i % 5)]
        batch = make_tree_batch(_examples(lengths, seed=i))
        keys.add(batch.padded_bucketed().shape_key)
        ready = impl.prepare(batch)
        got = impl.to_numpy(impl.logits(ready))
        assert verify.max_abs(got, reference.logits(cfg, params, batch)) <= 1e-4
        impl.loss_and_grads(ready)
    assert len(keys) >= 4
    info = impl.info()
    compiled, per_phase = info["compile"], info["compiles"]
    # leaves and level-chunk functions, each with and without grad
    assert compiled["graphs"] <= 4, compiled
    assert per_phase["train"] <= 2 and per_phase["infer"] <= 2, per_phase
    assert per_phase["cache"] in ("cold", "warm") and per_phase["cache_dir"]
    assert compiled["graph_breaks"] == 0, compiled


@pytest.mark.parametrize("model,strategy", [("lstm", "loop"), ("treelstm", "recursive"),
                                            ("rvnn", "levels"), ("treelstm", "compiled")])
def test_unlabelled_batch_gives_zero_loss(model, strategy):
    cfg = ModelConfig(model, vocab_size=20, embed_dim=5, hidden=4, num_classes=3)
    cls = RNN if cfg.family == "rnn" else RvNN
    impl = cls(cfg, strategy, device="cpu", threads=1)
    impl.load_params(init_params(cfg, seed=0))
    examples = _examples([3, 5], labelled=False)
    batch = make_batch(cfg.family, examples)
    loss, grads = impl.loss_and_grads(impl.prepare(batch))
    assert loss == 0.0
    assert all(np.all(g == 0) for g in grads.values())


def test_recursive_survives_a_chain_deeper_than_the_recursion_limit():
    import sys
    n = sys.getrecursionlimit() + 200
    cfg = ModelConfig("rvnn", vocab_size=20, embed_dim=3, hidden=2, num_classes=2)
    impl = RvNN(cfg, "recursive", device="cpu", threads=1)
    params = init_params(cfg, seed=0)
    impl.load_params(params)
    batch = make_tree_batch(_examples([n], shape="left"))
    got = impl.to_numpy(impl.logits(impl.prepare(batch)))
    assert verify.max_abs(got, reference.logits(cfg, params, batch)) <= 1e-4


def test_threads_are_recorded_and_gpu_is_reported_unavailable():
    cfg = ModelConfig("elman", vocab_size=10, embed_dim=3, hidden=2, num_classes=2)
    info = RNN(cfg, "loop", device="cpu", threads=1).info()
    assert info["intra_op_threads"] == 1 and info["threads_requested"] == 1
    if not torch.cuda.is_available():
        with pytest.raises(Unavailable):
            RNN(cfg, "fused", device="gpu", threads=1)
