"""Chainer-specific checks: the NStep links' layout, the frozen second bias, the optimiser rules."""

import numpy as np
import pytest

pytest.importorskip("chainer")

from bench import reference  # noqa: E402
from bench.batches import make_seq_batch, make_tree_batch  # noqa: E402
from bench.interface import ADAGRAD, ADAM  # noqa: E402
from bench.params import ModelConfig, init_params  # noqa: E402
from bench.tasks import load_listops  # noqa: E402
from impls.chainer_impl.rnn import RNN  # noqa: E402
from impls.chainer_impl.rvnn import RvNN  # noqa: E402


DATA = load_listops(12, 4, 4, seed=3, max_length=30)


@pytest.fixture(scope="module")
def examples():
    return DATA.train[:5]


def _cfg(model, examples, **kw):
    return ModelConfig(model, vocab_size=len(DATA.vocab), embed_dim=6, hidden=4, num_classes=10,
                       **kw)


def test_nstep_lstm_gate_blocks_follow_the_code_not_the_docstring(examples):
    cfg = _cfg("lstm", examples)
    impl = RNN(cfg, "fused")
    params = init_params(cfg, seed=0)
    impl.load_params(params)
    layer, H = impl.model.rnn[0], cfg.hidden
    # w2 is the cell input g (the docstring says o), w3 the output gate
    np.testing.assert_array_equal(layer.w2.array, params["W_x"][:, 2 * H:3 * H].T)
    np.testing.assert_array_equal(layer.w7.array, params["W_h"][:, 3 * H:].T)
    np.testing.assert_array_equal(layer.b1.array, params["b"][H:2 * H])


@pytest.mark.parametrize("model", ["elman", "lstm"])
def test_fused_hidden_bias_stays_zero_while_training(model, examples):
    cfg = _cfg(model, examples, optimizer="adam", lr=0.05)
    impl = RNN(cfg, "fused")
    impl.load_params(init_params(cfg, seed=0))
    ready = impl.prepare(make_seq_batch(examples))
    for _ in range(3):
        impl.train_step(ready)
    layer = impl.model.rnn[0]
    hidden = range(4, 8) if model == "lstm" else (1,)
    for k in hidden:
        assert not np.any(getattr(layer, "b%d" % k).array)
    first = np.concatenate([getattr(layer, "b%d" % k).array for k in range(len(hidden))])
    np.testing.assert_array_equal(impl.export_params()["b"], first)


def _one_step(impl, cfg, batch):
    params = init_params(cfg, seed=1)
    impl.load_params(params)
    impl.train_step(impl.prepare(batch))
    _, grads = reference.loss_and_grads(cfg, params, batch)
    return params, grads, impl.export_params()


def test_adagrad_starts_from_the_shared_accumulator(examples):
    cfg = _cfg("treelstm", examples, optimizer="adagrad", lr=0.1)
    params, g, got = _one_step(RvNN(cfg, "levels"), cfg, make_tree_batch(examples))
    for k in params:
        h = ADAGRAD["initial_accumulator"] + g[k] ** 2
        want = params[k] - cfg.lr * g[k] / (np.sqrt(h) + ADAGRAD["eps"])
        np.testing.assert_allclose(got[k], want, atol=2e-6, err_msg=k)


def test_adam_first_step_matches_chainers_rule(examples):
    cfg = _cfg("lstm", examples, optimizer="adam", lr=0.01)
    params, g, got = _one_step(RNN(cfg, "loop"), cfg, make_seq_batch(examples))
    b1, b2, eps = ADAM["beta1"], ADAM["beta2"], ADAM["eps"]
    alpha = cfg.lr * np.sqrt(1 - b2) / (1 - b1)
    for k in params:
        m, v = (1 - b1) * g[k], (1 - b2) * g[k] ** 2
        want = params[k] - alpha * m / (np.sqrt(v) + eps)
        np.testing.assert_allclose(got[k], want, atol=2e-6, err_msg=k)
    # and it moved: an Adam first step is ~lr wherever the gradient is not tiny
    assert np.max(np.abs(got["W_h"] - params["W_h"])) > 0.5 * cfg.lr


def test_reload_resets_optimizer_state(examples):
    cfg = _cfg("rvnn", examples, optimizer="adam", lr=0.01)
    impl = RvNN(cfg, "recursive")
    batch = make_tree_batch(examples)
    first = _one_step(impl, cfg, batch)[2]
    impl.train_step(impl.prepare(batch))          # a second step advances Adam's t and moments
    again = _one_step(impl, cfg, batch)[2]        # reload: the first step again
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
