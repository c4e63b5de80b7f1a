"""Paddle-specific checks: the fused layer's weight mapping and the optimisers.

Skipped where paddle does not import (it lives in its own virtualenv).
"""

import numpy as np
import pytest

from bench import reference
from bench.batches import make_batch, make_seq_batch
from bench.params import ModelConfig, init_params
from bench.tasks import load_listops
from tests.optimizer_oracle import check_train_steps

paddle = pytest.importorskip("paddle")

from impls.paddle_impl.rnn import RNN  # noqa: E402
from impls.paddle_impl.rvnn import RvNN  # noqa: E402


@pytest.fixture(scope="module")
def listops():
    return load_listops(20, 4, 4, seed=3, max_length=30)


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
@pytest.mark.parametrize("model,strategy", [("lstm", "fused"), ("elman", "loop"),
                                            ("treelstm", "levels")])
def test_optimizer_steps_match_the_formulas(listops, optimizer, model, strategy):
    cfg = ModelConfig(model, vocab_size=len(listops.vocab), embed_dim=6, hidden=5,
                      num_classes=10, optimizer=optimizer, lr=0.01)
    params = init_params(cfg, seed=3)
    cls = RNN if cfg.family == "rnn" else RvNN
    batch = make_batch(cfg.family, listops.train[:4])
    check_train_steps(cls(cfg, strategy, "cpu", 1), cfg, params, batch, 2)


def test_fused_layout_is_the_documented_transpose_and_bias_split(listops):
    cfg = ModelConfig("lstm", vocab_size=len(listops.vocab), embed_dim=6, hidden=5,
                      num_classes=10, optimizer="adam", lr=0.05)
    params = init_params(cfg, seed=4)
    impl = RNN(cfg, "fused", "cpu", 1)
    impl.load_params(params)
    rnn = impl.layer.rnn
    np.testing.assert_array_equal(rnn.weight_ih_l0.numpy(), params["W_x"].T)
    np.testing.assert_array_equal(rnn.weight_hh_l0.numpy(), params["W_h"].T)
    np.testing.assert_array_equal(rnn.bias_ih_l0.numpy(), params["b"])
    assert not rnn.bias_hh_l0.numpy().any()
    # the second bias never moves, so the exported b is exactly the trained first one
    ready = impl.prepare(make_seq_batch(listops.train[:4]))
    for _ in range(3):
        impl.train_step(ready)
    assert not rnn.bias_hh_l0.numpy().any()
    out = impl.export_params()
    np.testing.assert_array_equal(out["b"], rnn.bias_ih_l0.numpy())
    assert np.abs(out["b"] - params["b"]).max() > 1e-3


def test_compiled_rnn_reuses_one_program_across_lengths(listops):
    """Blocks of 8 steps: sequences of different lengths share the static program."""
    cfg = ModelConfig("elman", vocab_size=len(listops.vocab), embed_dim=6, hidden=5,
                      num_classes=10)
    impl = RNN(cfg, "compiled", "cpu", 1)
    impl.load_params(init_params(cfg, seed=5))
    by_length = sorted(listops.train, key=lambda e: len(e.tokens))
    short, long_ = by_length[:3], by_length[-3:]
    assert len(long_[0].tokens) > 8 + len(short[-1].tokens)
    for group in (short, long_):
        batch = make_seq_batch(group)
        got = impl.to_numpy(impl.logits(impl.prepare(batch)))
        np.testing.assert_allclose(got, reference.logits(cfg, impl.export_params(), batch),
                                   atol=1e-5)
    assert impl.info()["static_programs"] == {"block:no_grad": 1}
