"""TensorFlow-specific properties the generic equivalence tests do not pin down.

Retracing, the Keras weight layout, optimiser state and formulas, thread setup
and quiet logs, and the walk over trees deeper than Python's recursion limit.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from bench import reference, verify  # noqa: E402
from bench.batches import (batch_stream, count_bucket, make_batch, make_seq_batch, make_tree_batch,  # noqa: E402
                           train_length)
from bench.interface import ADAGRAD, ADAM, Unavailable  # noqa: E402
from bench.params import ModelConfig, init_params  # noqa: E402
from bench.tasks import Example, load_sst  # noqa: E402
from bench.trees import build_tree  # noqa: E402
from impls.tf_impl import rnn as tf_rnn  # noqa: E402
from impls.tf_impl.rnn import RNN  # noqa: E402
from impls.tf_impl.rvnn import RvNN  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sst():
    return load_sst(5)


def _varied_batches(sst, family):
    """SST batches of different sizes and lengths (batch sizes 25, 7 and 1)."""
    out = []
    for size, seed in ((25, 0), (25, 1), (7, 2), (1, 3)):
        out.append(batch_stream(sst.train[:200], family, size, seed=seed)[0])
    return out


@pytest.mark.parametrize("cls,model,strategy,kw", [
    (RNN, "lstm", "compiled", {"xla": True}),
    (RNN, "lstm", "compiled", {"xla": False}),
    (RNN, "elman", "fused", {}),
    (RNN, "lstm", "plain", {}),
    (RvNN, "treelstm", "compiled", {}),
    (RvNN, "rvnn", "compiled", {"xla": True}),
])
def test_graph_strategies_trace_once_over_varied_batches(sst, cls, model, strategy, kw):
    cfg = ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=16, hidden=8)
    impl = cls(cfg, strategy, threads=2, **kw)
    impl.load_params(init_params(cfg, seed=0))
    batches = _varied_batches(sst, cfg.family)
    assert len({b.size for b in batches}) == 3
    for batch in batches:
        ready = impl.prepare(batch)
        impl.to_numpy(impl.logits(ready))
        impl.train_step(ready)
        impl.loss_and_grads(ready)
    assert impl.info()["traces"] == {"logits": 1, "train": 1, "grads": 1}


def test_xla_rnn_compiles_once_per_shape_class_and_stays_exact(sst):
    cfg = ModelConfig("lstm", vocab_size=len(sst.vocab), embed_dim=16, hidden=8)
    impl = RNN(cfg, "compiled", threads=2, xla=True)
    impl.batch_size = 25
    params = init_params(cfg, seed=0)
    impl.load_params(params)
    batch = make_seq_batch(sst.train[:5])      # a partial batch: padded to the batch size
    ready = impl.prepare(batch)
    T = batch.tokens.shape[1]
    assert tuple(ready["train"]["tokens"].shape) == (train_length(T), 25)
    assert tuple(ready["infer"]["tokens"].shape) == (count_bucket(T), 25)
    got = impl.to_numpy(impl.logits(ready))
    assert verify.max_abs(got, reference.logits(cfg, params, batch)) <= 1e-5
    loss, grads = impl.loss_and_grads(ready)
    ref_loss, ref_grads = reference.loss_and_grads(cfg, params, batch)
    assert abs(loss - ref_loss) < 1e-5
    assert max(verify.grad_errors(grads, ref_grads).values()) <= verify.TOLERANCE["grad_rel"]
    # SST batches of every length, and single sentences: a few programs, whatever the batches
    batches = batch_stream(sst.train, "rnn", 25, seed=0, bucket=True)[:10]
    for b in batches + [make_seq_batch([e]) for e in sst.splits["dev"][:6]]:
        ready = impl.prepare(b)
        if b.size > 1:
            impl.train_step(ready)
        assert impl.to_numpy(impl.logits(ready)).shape == (b.size, 5)
    counts = impl.compile_counts()
    assert counts["train"] <= 4 and counts["infer"] <= 2, counts
    assert len({b.tokens.shape[1] for b in batches}) > 4   # the batches' lengths vary


def test_keras_lstm_gate_layout_matches_the_canonical_one():
    """A Keras LSTMCell holding the mapped canonical weights takes the canonical step."""
    keras = pytest.importorskip("keras")
    D, H, B = 3, 4, 2
    rng = np.random.default_rng(0)
    W_x, W_h = rng.normal(size=(D, 4 * H)), rng.normal(size=(H, 4 * H))
    b = rng.normal(size=4 * H)
    x, h, c = rng.normal(size=(B, D)), rng.normal(size=(B, H)), rng.normal(size=(B, H))

    def canonical_step():
        z = x @ W_x + h @ W_h + b
        i, f, g, o = (z[:, k * H:(k + 1) * H] for k in range(4))
        sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
        c_new = sig(f) * c + sig(i) * np.tanh(g)
        return sig(o) * np.tanh(c_new), c_new

    def keras_step(order):
        cell = keras.layers.LSTMCell(H)
        cell.build((None, D))
        for attr, value in (("kernel", W_x), ("recurrent_kernel", W_h), ("bias", b)):
            getattr(cell, attr).assign(tf_rnn.permute_blocks(value, order).astype(np.float32))
        _, (h_new, c_new) = cell(tf.constant(x, tf.float32),
                                   [tf.constant(h, tf.float32), tf.constant(c, tf.float32)])
        return h_new.numpy(), c_new.numpy()

    want_h, want_c = canonical_step()
    got_h, got_c = keras_step(tf_rnn.KERAS_LSTM_FROM_CANONICAL)
    np.testing.assert_allclose(got_h, want_h, atol=1e-5)
    np.testing.assert_allclose(got_c, want_c, atol=1e-5)
    # The check can tell layouts apart: swapping g and o breaks it.
    wrong_h, _ = keras_step((0, 1, 3, 2))
    assert np.abs(wrong_h - want_h).max() > 1e-2


def test_fused_export_inverts_the_keras_mapping(monkeypatch):
    """With a non-identity mapping, load -> export is still exact (conversion in one place)."""
    monkeypatch.setattr(tf_rnn, "KERAS_LSTM_FROM_CANONICAL", (3, 2, 1, 0))
    cfg = ModelConfig("lstm", vocab_size=30, embed_dim=6, hidden=5, num_classes=3)
    impl = RNN(cfg, "fused", threads=2)
    params = init_params(cfg, seed=3)
    impl.load_params(params)
    impl.load_params(params)  # the reload path converts too
    stored = impl._layer.cell.kernel.numpy()
    np.testing.assert_array_equal(stored[:, :5], params["W_x"][:, 15:])
    out = impl.export_params()
    for name in params:
        np.testing.assert_array_equal(out[name], params[name])


def _keras_update(name, p, g, lr):
    """One step of Keras' SGD / Adam / Adagrad from fresh state, in float64."""
    if name == "sgd":
        return p - lr * g
    if name == "adam":
        b1, b2, eps = ADAM["beta1"], ADAM["beta2"], ADAM["eps"]
        m, v = (1 - b1) * g, (1 - b2) * g * g
        alpha = lr * np.sqrt(1 - b2) / (1 - b1)
        return p - alpha * m / (np.sqrt(v) + eps)
    acc = ADAGRAD["initial_accumulator"] + g * g
    return p - lr * g / np.sqrt(acc + ADAGRAD["eps"])


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adagrad"])
@pytest.mark.parametrize("cls,model,strategy", [
    (RvNN, "treelstm", "levels"), (RvNN, "rvnn", "compiled"), (RNN, "lstm", "loop"),
])
def test_one_optimizer_step_matches_the_keras_formula(sst, optimizer, cls, model, strategy):
    """Sparse embedding updates (SGD, Adagrad with repeated tokens) equal the dense formula."""
    cfg = ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=8, hidden=6,
                      optimizer=optimizer, lr=0.1)
    impl = cls(cfg, strategy, threads=2)
    params = init_params(cfg, seed=1)
    impl.load_params(params)
    examples = sst.train[:6]
    tokens = [t for e in examples for t in e.tokens]
    assert len(tokens) > len(set(tokens))  # repeated rows in the embedding gradient
    batch = make_batch(cfg.family, examples)
    ready = impl.prepare(batch)
    # The implementation's own float32 gradients (checked against the reference
    # elsewhere): Adam divides by |g|, which would amplify float32 rounding.
    _, grads = impl.loss_and_grads(ready)
    impl.train_step(ready)
    got = impl.export_params()
    for name in params:
        want = _keras_update(optimizer, params[name].astype(np.float64),
                             grads[name].astype(np.float64), cfg.lr)
        assert verify.max_abs(got[name], want) <= 1e-5, name


def test_load_params_resets_optimizer_state(sst):
    cfg = ModelConfig("treelstm", vocab_size=len(sst.vocab), embed_dim=8, hidden=6,
                      optimizer="adam", lr=0.01)
    impl = RvNN(cfg, "compiled", threads=2)
    params = init_params(cfg, seed=2)
    ready = impl.prepare(make_tree_batch(sst.train[:4]))
    impl.load_params(params)
    impl.train_step(ready)
    once = impl.export_params()
    impl.train_step(ready)
    twice = impl.export_params()
    impl.load_params(params)
    impl.train_step(ready)
    again = impl.export_params()
    for name in params:
        np.testing.assert_array_equal(again[name], once[name])
    assert max(verify.max_abs(twice[k], once[k]) for k in params) > 1e-4


def test_loss_and_grads_leaves_parameters_alone(sst):
    cfg = ModelConfig("lstm", vocab_size=len(sst.vocab), embed_dim=8, hidden=6, optimizer="adam")
    impl = RNN(cfg, "fused", threads=2)
    params = init_params(cfg, seed=4)
    impl.load_params(params)
    impl.loss_and_grads(impl.prepare(make_seq_batch(sst.train[:3])))
    out = impl.export_params()
    for name in params:
        np.testing.assert_array_equal(out[name], params[name])
    assert int(impl._opt.iterations.numpy()) == 0


def test_recursive_walks_chains_deeper_than_the_recursion_limit():
    cfg = ModelConfig("rvnn", vocab_size=20, embed_dim=4, hidden=3, num_classes=2)
    impl = RvNN(cfg, "recursive", threads=2)
    params = init_params(cfg, seed=0)
    impl.load_params(params)
    depth = sys.getrecursionlimit() + 100
    tokens = [int(t) for t in np.random.default_rng(0).integers(1, 20, size=depth + 1)]
    tree = build_tree("left", tokens)
    batch = make_tree_batch([Example(tuple(tree.tokens()), tree, 1)])
    got = impl.to_numpy(impl.logits(impl.prepare(batch)))
    assert verify.max_abs(got, reference.logits(cfg, params, batch)) <= 1e-4


def test_gpu_request_without_gpu_is_unavailable():
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible here")
    cfg = ModelConfig("elman", vocab_size=10, embed_dim=4, hidden=3)
    with pytest.raises(Unavailable):
        RNN(cfg, "loop", device="gpu", threads=1)


def test_fresh_process_applies_threads_and_keeps_stderr_quiet():
    """In its own process (as in a cell) the requested pools apply and TF prints nothing."""
    code = (
        "import json\n"
        "from impls.tf_impl.rnn import RNN\n"
        "from impls.tf_impl.rvnn import RvNN\n"
        "from bench.batches import make_seq_batch, make_tree_batch\n"
        "from bench.params import ModelConfig, init_params\n"
        "from bench.tasks import load_listops\n"
        "data = load_listops(4, 1, 1, seed=0, max_length=20)\n"
        "size = dict(vocab_size=len(data.vocab), embed_dim=4, hidden=3, num_classes=10)\n"
        "tree = ModelConfig('treelstm', **size)\n"
        "impl = RvNN(tree, 'compiled', threads=3)\n"
        "impl.load_params(init_params(tree, 0))\n"
        "impl.train_step(impl.prepare(make_tree_batch(data.train)))\n"
        "seq = ModelConfig('lstm', **size)\n"
        "fused = RNN(seq, 'fused', threads=3)\n"  # Keras' masked LSTM: bool transposes
        "fused.load_params(init_params(seq, 0))\n"
        "fused.train_step(fused.prepare(make_seq_batch(data.train)))\n"
        "print(json.dumps(impl.info()))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["intra_op_threads"] == 3 and info["inter_op_threads"] == 1
    assert info["setup_notes"] == []
    assert done.stderr.strip() == "", done.stderr
