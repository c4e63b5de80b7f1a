"""Keras-specific checks, on whichever backend KERAS_BACKEND selects (run once per backend).

The generic equivalence tests cover logits, gradients and the SGD step; these cover what
only the Keras implementation has: ``fused`` running Keras' own ``SimpleRNN`` / ``LSTM``
with the canonical weights, Keras' Adam and Adagrad formulas (with repeated tokens,
which TensorFlow's sparse embedding gradient would get wrong for Adagrad), optimiser
state reset, one compile per time bucket, and torch's refusal of ``compiled``.
"""

import os

import numpy as np
import pytest

from bench import reference, registry
from bench.batches import make_batch, make_seq_batch
from bench.interface import NotApplicable
from bench.params import ModelConfig, init_params
from bench.tasks import load_listops


def _entry():
    """The keras-* registry entry this process runs: KERAS_BACKEND if set, else the first
    keras entry in BENCH_FRAMEWORKS, else Keras' own default (tensorflow)."""
    if os.environ.get("KERAS_BACKEND"):
        return "keras-" + os.environ["KERAS_BACKEND"]
    chosen = [f for f in os.environ.get("BENCH_FRAMEWORKS", "").split(",") if f.startswith("keras-")]
    return chosen[0] if chosen else "keras-tensorflow"


ok, why = registry.probe(_entry())  # sets KERAS_BACKEND before keras is imported
if not ok:
    pytest.skip("keras unavailable: %s" % why, allow_module_level=True)

import keras  # noqa: E402  (after the probe)

BACKEND = keras.backend.backend()
FRAMEWORK = "keras-" + BACKEND


@pytest.fixture(scope="module")
def listops():
    return load_listops(40, 4, 4, seed=3, max_length=40)


def _setup(listops, model, strategy, optimizer, lr=0.01):
    cfg = ModelConfig(model, vocab_size=len(listops.vocab), embed_dim=5, hidden=4,
                      num_classes=10, optimizer=optimizer, lr=lr)
    impl = registry.load(FRAMEWORK, model)(cfg, strategy, device="cpu", threads=2)
    params = init_params(cfg, seed=3)
    batch = make_batch(cfg.family, listops.train[:6])
    return cfg, impl, params, batch


def _keras_step(optimizer, params, grads, lr):
    """One step of Keras' own update formulas from fresh state (keras/src/optimizers)."""
    out = {}
    for k, p in params.items():
        p, g = p.astype(np.float64), grads[k]
        if optimizer == "adam":
            b1, b2, eps = 0.9, 0.999, 1e-8
            m, v = (1 - b1) * g, (1 - b2) * g * g
            alpha = lr * np.sqrt(1 - b2) / (1 - b1)
            out[k] = p - alpha * m / (np.sqrt(v) + eps)
        else:
            acc = 0.1 + g * g
            out[k] = p - lr * g / np.sqrt(acc + 1e-7)
    return out


def test_framework_names_the_backend(listops):
    _, impl, _, _ = _setup(listops, "lstm", "loop", "sgd")
    assert impl.framework == FRAMEWORK
    assert impl.info()["backend"] == BACKEND


@pytest.mark.parametrize("model,layer", [("elman", "SimpleRNN"), ("lstm", "LSTM")])
def test_fused_runs_keras_own_recurrent_layer(listops, model, layer):
    _, impl, params, _ = _setup(listops, model, "fused", "sgd")
    assert type(impl.model.rnn) is getattr(keras.layers, layer)
    assert impl.info()["recurrent_layer"] == "keras.layers." + layer
    # and its canonical W_x / W_h / b are that layer's cell weights
    cell = impl.model.rnn.cell
    canonical = impl._param_variables()
    assert canonical["W_x"] is cell.kernel and canonical["W_h"] is cell.recurrent_kernel
    assert canonical["b"] is cell.bias
    impl.load_params(params)
    np.testing.assert_array_equal(impl.to_numpy(cell.recurrent_kernel), params["W_h"])


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
@pytest.mark.parametrize("model,strategy", [("lstm", "loop"), ("treelstm", "levels")])
def test_adam_and_adagrad_follow_keras_formulas(listops, model, strategy, optimizer):
    cfg, impl, params, batch = _setup(listops, model, strategy, optimizer)
    tokens = batch.tokens[batch.tokens > 0] if cfg.family == "rnn" else batch.token[batch.token >= 0]
    assert len(np.unique(tokens)) < len(tokens)  # repeated rows of E in one batch
    impl.load_params(params)
    impl.train_step(impl.prepare(batch))
    _, grads = reference.loss_and_grads(cfg, params, batch)
    want = _keras_step(optimizer, params, grads, cfg.lr)
    got = impl.export_params()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6, err_msg=k)


def test_load_params_resets_optimizer_state(listops):
    _, impl, params, batch = _setup(listops, "rvnn", "recursive", "adam")
    ready = impl.prepare(batch)
    impl.load_params(params)
    impl.train_step(ready)
    first = impl.export_params()
    impl.train_step(ready)
    impl.load_params(params)      # fresh Adam moments and step count again
    impl.train_step(ready)
    again = impl.export_params()
    for k in first:
        np.testing.assert_allclose(again[k], first[k], rtol=0, atol=1e-7, err_msg=k)


@pytest.mark.skipif(BACKEND == "torch", reason="compiled is not applicable on torch")
def test_compiled_rnn_traces_once_per_time_bucket(listops):
    cfg, impl, params, _ = _setup(listops, "elman", "compiled", "sgd")
    impl.load_params(params)
    short = [e for e in listops.train if 10 < len(e.tokens) <= 16]
    assert len(short) >= 4
    a, b = make_seq_batch(short[:2]), make_seq_batch(short[2:4])
    impl.train_step(impl.prepare(a))
    impl.train_step(impl.prepare(b))
    assert impl.info()["traces"]["train"] == 1
    got = impl.to_numpy(impl.logits(impl.prepare(b)))
    np.testing.assert_allclose(got, reference.logits(cfg, impl.export_params(), b),
                               rtol=0, atol=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="torch backend only")
@pytest.mark.parametrize("model", ["lstm", "treelstm"])
def test_torch_backend_refuses_compiled_with_a_reason(model):
    cfg = ModelConfig(model, vocab_size=10, embed_dim=3, hidden=2, num_classes=2)
    with pytest.raises(NotApplicable, match="torch.compile"):
        registry.load(FRAMEWORK, model)(cfg, "compiled", device="cpu", threads=2)
