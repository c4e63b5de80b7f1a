"""DyNet-only checks: what the generic equivalence tests cannot see.

* DyNet clips gradients at norm 5 by default; an SGD step with a larger
  gradient shows clipping is off.
* Adagrad's accumulator is seeded to the suite's 0.1 (DyNet starts at 0).
* Adam follows DyNet's documented rule (eps not bias-corrected).
* The fused builders agree with the per-step loop when the bias is non-zero
  (the generic tests' biases are small; this pins the gate order and the
  removed +1 forget bias).
* ``info()`` reports the autobatching mode requested by the environment.
"""

import os

import numpy as np
import pytest

from bench import reference, registry
from bench.batches import make_seq_batch, make_tree_batch
from bench.params import ModelConfig, init_params
from bench.tasks import load_sst

pytest.importorskip("dynet")

from impls.dynet_impl.rnn import RNN  # noqa: E402
from impls.dynet_impl.rvnn import RvNN  # noqa: E402


@pytest.fixture(scope="module")
def sst():
    return load_sst(5)


def _sst_cfg(sst, model, optimizer, lr, hidden=20):
    return ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=16, hidden=hidden,
                       num_classes=5, optimizer=optimizer, lr=lr)


def test_sgd_step_is_not_clipped(sst):
    cfg = _sst_cfg(sst, "rvnn", "sgd", 1.0, hidden=150)
    params = init_params(cfg, seed=3, embed_std=3.0)   # saturated states: large gradients
    params["W_o"] *= 20.0
    batch = make_tree_batch(sst.train[:4])
    _, grads = reference.loss_and_grads(cfg, params, batch)
    norm = np.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert norm > 10.0, "the check needs a gradient norm well above DyNet's default clip (5)"
    impl = RvNN(cfg, "levels")
    impl.load_params(params)
    impl.train_step(impl.prepare(batch))
    want = reference.sgd_step(params, grads, cfg.lr)
    got = impl.export_params()
    for k in want:
        assert np.max(np.abs(got[k] - want[k])) <= 1e-4, k


def test_adagrad_starts_from_the_suite_accumulator(sst):
    cfg = _sst_cfg(sst, "treelstm", "adagrad", 0.1)
    params = init_params(cfg, seed=5)
    batches = [make_tree_batch(sst.train[i:i + 3]) for i in (0, 3)]
    impl = RvNN(cfg, "recursive")
    impl.load_params(params)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    acc = {k: np.full_like(v, 0.1) for k, v in p.items()}
    for batch in batches:
        impl.train_step(impl.prepare(batch))
        _, g = reference.loss_and_grads(cfg, p, batch)
        for k in p:
            acc[k] += g[k] ** 2
            p[k] = p[k] - cfg.lr * g[k] / np.sqrt(acc[k] + 1e-7)
    got = impl.export_params()
    for k in p:
        assert np.max(np.abs(got[k] - p[k])) <= 2e-5, k


def test_adam_follows_dynets_rule(sst):
    cfg = _sst_cfg(sst, "lstm", "adam", 0.01)
    params = init_params(cfg, seed=6)
    batches = [make_seq_batch(sst.train[i:i + 4]) for i in (0, 4)]
    impl = RNN(cfg, "fused")
    impl.load_params(params)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, batch in enumerate(batches, 1):
        impl.train_step(impl.prepare(batch))
        _, g = reference.loss_and_grads(cfg, p, batch)
        scale = cfg.lr * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
            p[k] = p[k] - scale * m[k] / (np.sqrt(v[k]) + 1e-8)
    got = impl.export_params()
    for k in p:
        assert np.max(np.abs(got[k] - p[k])) <= 1e-4, k


@pytest.mark.parametrize("model", ["elman", "lstm"])
def test_fused_matches_loop_with_large_biases(sst, model):
    cfg = _sst_cfg(sst, model, "sgd", 0.1)
    params = init_params(cfg, seed=8)
    params["b"] = np.linspace(-2, 2, params["b"].size).astype(np.float32)
    batch = make_seq_batch(sst.train[:5])
    ref = reference.logits(cfg, params, batch)
    for strategy in ("loop", "fused"):
        impl = RNN(cfg, strategy)
        impl.load_params(params)
        assert np.max(np.abs(impl.logits(impl.prepare(batch)) - ref)) <= 1e-4, strategy


def test_info_reports_the_requested_autobatching(sst):
    cfg = _sst_cfg(sst, "rvnn", "sgd", 0.1)
    info = RvNN(cfg, "recursive").info()
    assert info["autobatch"] == (os.environ.get("BENCH_DYNET_AUTOBATCH") == "1")
    assert info["threads"]["applied"] == 1
    assert registry.not_applicable("dynet", "rvnn", "compiled")
