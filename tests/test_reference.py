import numpy as np
import pytest

from bench import reference
from bench.batches import make_batch, make_seq_batch, make_tree_batch
from bench.params import ModelConfig, init_params
from bench.tasks import Example, load_listops
from bench.trees import build_tree
from finite_diff import finite_difference_grads


@pytest.fixture(scope="module")
def data():
    return load_listops(30, 3, 3, seed=4, max_length=30)


def _cfg(model, mode="root", **kw):
    base = dict(vocab_size=16, embed_dim=5, hidden=4, num_classes=10, loss_mode=mode)
    base.update(kw)
    return ModelConfig(model, **base)


def _batch(cfg, exs):
    return make_batch(cfg.family, exs)


CASES = [("elman", "root"), ("lstm", "root"), ("rvnn", "root"), ("rvnn", "all"),
         ("treelstm", "root"), ("treelstm", "all")]


@pytest.mark.parametrize("model,mode", CASES)
def test_gradients_match_finite_differences(model, mode, data):
    cfg = _cfg(model, mode)
    p = {k: v.astype(np.float64) for k, v in init_params(cfg, 0, embed_std=0.5).items()}
    batch = _batch(cfg, data.train[:3])
    _, grads = reference.loss_and_grads(cfg, p, batch)
    numeric = finite_difference_grads(cfg, p, batch)
    for name, num in numeric.items():
        scale = max(np.abs(num).max(), 1e-8)
        assert np.abs(num - grads[name]).max() / scale < 1e-5, name


@pytest.mark.parametrize("model,mode", CASES)
def test_float32_agrees_with_float64(model, mode, data):
    cfg = _cfg(model, mode, embed_dim=20, hidden=30)
    p = init_params(cfg, 1)
    batch = _batch(cfg, data.train[:8])
    l32, g32 = reference.loss_and_grads(cfg, p, batch, np.float32)
    l64, g64 = reference.loss_and_grads(cfg, p, batch, np.float64)
    assert abs(l32 - l64) < 1e-5
    z32 = reference.logits(cfg, p, batch, np.float32)
    assert z32.dtype == np.float32
    assert np.abs(z32 - reference.logits(cfg, p, batch, np.float64)).max() < 1e-5
    for k in g64:
        assert g32[k].dtype == np.float32
        assert np.abs(g32[k] - g64[k]).max() <= 1e-4 * max(np.abs(g64[k]).max(), 1e-6), k


def test_all_node_loss_differs_from_root_loss(data):
    batch = _batch(_cfg("treelstm"), data.train[:4])
    p = init_params(_cfg("treelstm"), 2)
    assert reference.loss(_cfg("treelstm", "root"), p, batch) != \
        reference.loss(_cfg("treelstm", "all"), p, batch)


def test_padding_never_changes_the_rnn_state(data):
    for model in ("elman", "lstm"):
        cfg = _cfg(model)
        p = init_params(cfg, 3)
        short, longer = data.train[0], max(data.train, key=lambda e: len(e.tokens))
        alone = reference.logits(cfg, p, make_seq_batch([short]))
        mixed = reference.logits(cfg, p, make_seq_batch([longer, short]))
        assert np.abs(alone[0] - mixed[1]).max() < 1e-12


def test_left_branching_rvnn_is_an_elman_rnn():
    """The seed's claim: a recursive net generalises a recurrent one."""
    rng = np.random.default_rng(0)
    V, H = 40, 12
    ecfg = ModelConfig("elman", vocab_size=V, embed_dim=9, hidden=H, num_classes=3)
    ep = init_params(ecfg, 5)
    tp, start = reference.elman_as_rvnn(ep)
    tcfg = ModelConfig("rvnn", vocab_size=V + 1, embed_dim=H, hidden=H, num_classes=3)
    seqs = [[int(t) for t in rng.integers(1, V, size=n)] for n in (1, 4, 17)]
    exs = [Example(tuple(s), build_tree("left", s), 0) for s in seqs]
    trees = [Example((start,) + tuple(s), build_tree("left", [start] + s), 0) for s in seqs]
    rnn = reference.logits(ecfg, ep, make_seq_batch(exs))
    rec = reference.logits(tcfg, tp, make_tree_batch(trees))
    assert np.abs(rnn - rec).max() < 1e-10
    # and it is not a coincidence of shape: a balanced tree computes something else
    bal = [Example(e.tokens, build_tree("balanced", list(e.tokens)), 0) for e in trees]
    assert np.abs(reference.logits(tcfg, tp, make_tree_batch(bal)) - rnn).max() > 1e-4


def test_sgd_step_moves_against_the_gradient(data):
    cfg = _cfg("lstm")
    p = {k: v.astype(np.float64) for k, v in init_params(cfg, 0).items()}
    batch = make_seq_batch(data.train[:5])
    before, g = reference.loss_and_grads(cfg, p, batch)
    after = reference.loss(cfg, reference.sgd_step(p, g, 0.1), batch)
    assert after < before


def test_wrong_batch_type_is_a_clear_error(data):
    with pytest.raises(TypeError, match="TreeBatch"):
        reference.logits(_cfg("rvnn"), init_params(_cfg("rvnn"), 0), make_seq_batch(data.train[:2]))
