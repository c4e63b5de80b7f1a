"""MXNet-specific checks: fused layout and frozen bias, optimiser rules, compiled-graph caching."""

import numpy as np
import pytest

pytest.importorskip("mxnet")

from bench import reference  # noqa: E402
from bench.batches import make_seq_batch, make_tree_batch  # noqa: E402
from bench.interface import ADAGRAD, ADAM  # noqa: E402
from bench.params import ModelConfig, init_params  # noqa: E402
from bench.tasks import load_listops  # noqa: E402
from impls.mxnet_impl.rnn import RNN  # noqa: E402
from impls.mxnet_impl.rvnn import RvNN  # noqa: E402

DATA = load_listops(12, 4, 4, seed=3, max_length=30)


@pytest.fixture(scope="module")
def examples():
    return DATA.train[:5]


def _cfg(model, **kw):
    return ModelConfig(model, vocab_size=len(DATA.vocab), embed_dim=6, hidden=4, num_classes=10,
                       **kw)


def test_fused_lstm_layout_and_frozen_hidden_bias(examples):
    cfg = _cfg("lstm", optimizer="adam", lr=0.05)
    impl = RNN(cfg, "fused")
    params = init_params(cfg, seed=0)
    impl.load_params(params)
    # gate blocks (i, f, c, o) = canonical (i, f, g, o), weights (out, in)
    np.testing.assert_array_equal(impl._layer.l0_i2h_weight.data().asnumpy(), params["W_x"].T)
    ready = impl.prepare(make_seq_batch(examples))
    for _ in range(3):
        impl.train_step(ready)
    impl.sync()
    assert impl._layer.l0_h2h_bias.grad_req == "null"
    assert not np.any(impl._layer.l0_h2h_bias.data().asnumpy())
    np.testing.assert_array_equal(impl.export_params()["b"], impl._layer.l0_i2h_bias.data().asnumpy())


def _one_step(impl, cfg, batch):
    params = init_params(cfg, seed=1)
    impl.load_params(params)
    impl.train_step(impl.prepare(batch))
    _, grads = reference.loss_and_grads(cfg, params, batch)
    return params, grads, impl.export_params()


def test_adagrad_starts_from_the_shared_accumulator(examples):
    cfg = _cfg("treelstm", optimizer="adagrad", lr=0.1)
    params, g, got = _one_step(RvNN(cfg, "compiled"), cfg, make_tree_batch(examples))
    for k in params:
        want = params[k] - cfg.lr * g[k] / np.sqrt(ADAGRAD["initial_accumulator"] + g[k] ** 2
                                                   + ADAGRAD["eps"])
        np.testing.assert_allclose(got[k], want, atol=2e-6, err_msg=k)


def test_adam_first_step_matches_mxnets_rule(examples):
    cfg = _cfg("elman", optimizer="adam", lr=0.01)
    params, g, got = _one_step(RNN(cfg, "compiled"), cfg, make_seq_batch(examples))
    b1, b2, eps = ADAM["beta1"], ADAM["beta2"], ADAM["eps"]
    lr_t = cfg.lr * np.sqrt(1 - b2) / (1 - b1)
    for k in params:
        m, v = (1 - b1) * g[k], (1 - b2) * g[k] ** 2
        np.testing.assert_allclose(got[k], params[k] - lr_t * m / (np.sqrt(v) + eps), atol=2e-6,
                                   err_msg=k)
    assert np.max(np.abs(got["W_h"] - params["W_h"])) > 0.5 * cfg.lr


def test_compiled_tree_graph_is_cached_per_bucket_shape(examples):
    cfg = _cfg("rvnn")
    impl = RvNN(cfg, "compiled")
    impl.load_params(init_params(cfg, seed=0))
    a, b = make_tree_batch(examples[:4]), make_tree_batch(examples[1:5])
    same = a.padded_bucketed().shape_key == b.padded_bucketed().shape_key
    for batch in (a, b, a):
        impl.to_numpy(impl.logits(impl.prepare(batch)))
    assert len(impl.info()["compiled_shapes"]) == (1 if same else 2)


def test_threads_are_applied():
    impl = RNN(_cfg("elman"), "loop", threads=1)
    assert impl.info()["threads"]["omp_threads"] == 1
