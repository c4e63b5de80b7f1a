"""JAX-specific properties: bounded retracing, float32 timing path, thread set-up,
optimisers, the cuDNN weight mapping and the compiled tree schedule."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_import_does_not_load_jax():
    code = ("import sys; import impls.jax_impl as p; "
            "print(int('jax' in sys.modules), len(p.NOT_APPLICABLE))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    loaded, _ = out.stdout.split()
    assert loaded == "0"


jax = pytest.importorskip("jax")
pytest.importorskip("optax")

from bench import reference  # noqa: E402
from bench.batches import batch_stream, make_seq_batch, make_tree_batch  # noqa: E402
from bench.interface import NotApplicable, Unavailable  # noqa: E402
from bench.params import ModelConfig, init_params  # noqa: E402
from bench.tasks import load_listops, load_sst  # noqa: E402
from impls.jax_impl.rnn import RNN, cudnn_lstm_weights, time_bucket  # noqa: E402
from impls.jax_impl.rvnn import RvNN  # noqa: E402


@pytest.fixture(scope="module")
def sst():
    return load_sst(5)


def _tiny(model, vocab, **kw):
    return ModelConfig(model, vocab_size=vocab, embed_dim=8, hidden=6, num_classes=5, **kw)


# -- retracing stays bounded over batches of varying shape --

@pytest.mark.parametrize("model", ["lstm", "treelstm"])
def test_compiled_traces_once_per_bucket(model, sst):
    cfg = _tiny(model, len(sst.vocab))
    family = cfg.family
    impl = (RNN if family == "rnn" else RvNN)(cfg, "compiled", threads=2)
    impl.load_params(init_params(cfg, seed=0))
    batches = batch_stream(sst.train, family, 25, seed=0)[:12]
    shapes = set()
    for b in batches:
        ready = impl.prepare(b)
        shapes.add(tuple(sorted((k, v.shape) for k, v in ready.items())))
        impl.train_step(ready)
        impl.logits(ready)
    impl.sync()
    traces = impl.info()["traces"]
    assert 1 < len(shapes) < len(batches)  # the batches differ, the buckets absorb most of it
    assert traces["train_step"] == len(shapes)
    assert traces["logits"] == len(shapes)


def test_rnn_time_bucket():
    assert [time_bucket(t) for t in (1, 8, 9, 31, 32, 33)] == [8, 8, 16, 32, 32, 40]


def test_levels_traces_bounded_by_widths(sst):
    cfg = _tiny("treelstm", len(sst.vocab))
    impl = RvNN(cfg, "levels", threads=2)
    impl.load_params(init_params(cfg, seed=0))
    keys = set()
    levels = 0
    for b in batch_stream(sst.train, "rvnn", 25, seed=0)[:6]:
        ready = impl.prepare(b)
        keys |= {(ready["rows"], node.shape[0]) for node, _, _ in ready["levels"]}
        levels += len(ready["levels"])
        impl.train_step(ready)
    impl.sync()
    traces = impl.info()["traces"]
    assert traces["level"] == len(keys) < levels
    assert len(keys) <= 2 * 5  # two buffer sizes at most, widths 16..256


def test_loop_and_recursive_trace_once_per_bucket():
    """The per-step and per-node functions are traced once per padded shape, not per call."""
    data = load_listops(8, 2, 2, seed=1, max_length=30)
    groups = [data.train[2 * i:2 * i + 2] for i in range(4)]
    cfg = _tiny("elman", len(data.vocab))
    impl = RNN(cfg, "loop", threads=2)
    impl.load_params(init_params(cfg, seed=0))
    shapes = set()
    for g in groups:
        ready = impl.prepare(make_seq_batch(g))
        shapes.add(ready["tokens"].shape)
        impl.train_step(ready)
    traces = impl.info()["traces"]
    assert traces["cell"] == traces["embed"] == len(shapes)
    assert traces["optimizer_update"] == 1

    cfg = _tiny("rvnn", len(data.vocab))
    impl = RvNN(cfg, "recursive", threads=2)
    impl.load_params(init_params(cfg, seed=0))
    shapes = set()
    nodes = 0
    for g in groups:
        batch = make_tree_batch(g)
        ready = impl.prepare(batch)
        shapes.add(ready["leaf_tokens"].shape)
        nodes += batch.num_nodes
        impl.train_step(ready)
    traces = impl.info()["traces"]
    assert traces["node"] == 1 and traces["leaf"] == len(shapes) < nodes


# -- float32 in the timing path --

@pytest.mark.parametrize("model,strategy", [("lstm", "compiled"), ("elman", "loop"),
                                            ("treelstm", "compiled"), ("rvnn", "levels")])
def test_float32_and_x64_off(model, strategy, sst):
    cfg = _tiny(model, len(sst.vocab))
    impl = (RNN if cfg.family == "rnn" else RvNN)(cfg, strategy, threads=2)
    impl.load_params(init_params(cfg, seed=0))
    ready = impl.prepare(batch_stream(sst.train, cfg.family, 5, seed=0)[0])
    assert impl.logits(ready).dtype == np.float32
    assert impl.train_step(ready).dtype == np.float32
    assert all(v.dtype == np.float32 for v in impl.params.values())
    info = impl.info()
    assert info["x64"] is False and not jax.config.jax_enable_x64
    assert info["matmul_precision"] == "highest"


# -- applicability and devices --

def test_fused_is_refused_on_cpu_and_for_elman():
    from impls.jax_impl import NOT_APPLICABLE
    assert ("elman", "fused") in NOT_APPLICABLE
    with pytest.raises(NotApplicable, match="CPU"):
        RNN(_tiny("lstm", 10), "fused", device="cpu")
    with pytest.raises(NotApplicable):
        RNN(_tiny("elman", 10), "fused", device="cpu")


def test_gpu_without_gpu_backend_is_unavailable():
    if any(d.platform != "cpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    with pytest.raises(Unavailable, match="no GPU device"):
        RNN(_tiny("lstm", 10), "compiled", device="gpu")


def test_thread_count_is_applied_in_a_fresh_process():
    code = ("import json; from bench.params import ModelConfig; from impls.jax_impl.rnn import RNN; "
            "impl = RNN(ModelConfig('elman', vocab_size=5, embed_dim=2, hidden=2, num_classes=2), "
            "'compiled', threads=1); import os; "
            "print(json.dumps([impl.info()['threads'], os.environ.get('PJRT_NPROC')]))")
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    threads, nproc = json.loads(out.stdout.strip().splitlines()[-1])
    assert threads["requested"] == threads["applied"] == 1 and threads["matched"]
    assert nproc == "1"


# -- the fused strategy's weight mapping, checked on the CPU against JAX's cuDNN reference --

def test_cudnn_weight_layout_matches_the_canonical_lstm():
    from jax.experimental import rnn as jrnn
    data = load_listops(8, 2, 2, seed=2, max_length=30)
    cfg = _tiny("lstm", len(data.vocab))
    p = init_params(cfg, seed=3)
    batch = make_seq_batch(data.train[:6])
    D, H = cfg.embed_dim, cfg.hidden
    w = cudnn_lstm_weights(*(jax.numpy.asarray(p[k]) for k in ("W_x", "W_h", "b")))
    assert w.shape == (jrnn.get_num_params_in_lstm(D, H, 1, False),)
    W_ih, W_hh, b_ih, b_hh = jrnn.unpack_lstm_weights(w, D, H, 1, False)
    x = p["E"][batch.tokens]
    zeros = np.zeros((1, batch.size, H), np.float32)
    _, h_n, _ = jrnn.lstm_ref(x, zeros, zeros, W_ih, W_hh, b_ih, b_hh,
                              jax.numpy.asarray(batch.lengths), D, H, 1, 0.0, False)
    got = np.asarray(h_n[0]) @ p["W_o"] + p["b_o"]
    assert np.abs(got - reference.logits(cfg, p, batch)).max() < 1e-5


# -- optimisers --

def test_adam_and_adagrad_first_steps_match_their_formulas():
    data = load_listops(6, 2, 2, seed=4, max_length=30)
    batch = make_tree_batch(data.train[:3])
    for opt in ("adam", "adagrad"):
        cfg = ModelConfig("treelstm", vocab_size=len(data.vocab), embed_dim=8, hidden=6,
                          num_classes=10, optimizer=opt, lr=0.01)
        p = init_params(cfg, seed=5)
        _, g = reference.loss_and_grads(cfg, p, batch)
        if opt == "adam":  # step 1: m_hat = g, v_hat = g^2
            want = {k: p[k] - cfg.lr * g[k] / (np.abs(g[k]) + 1e-8) for k in p}
        else:  # optax: g / sqrt(0.1 + g^2 + eps)
            want = {k: p[k] - cfg.lr * g[k] / np.sqrt(0.1 + g[k] ** 2 + 1e-7) for k in p}
        for strategy in ("recursive", "compiled"):
            impl = RvNN(cfg, strategy, threads=2)
            for _ in range(2):  # load_params resets the optimiser: the second run repeats the first
                impl.load_params(p)
                impl.train_step(impl.prepare(batch))
                got = impl.export_params()
                for k in p:
                    assert np.abs(got[k] - want[k]).max() < 1e-5, (opt, strategy, k)


# -- the compiled tree schedule (TreeBatch.packed_groups; its own checks are in test_batches) --

def test_wide_groups_give_the_level_schedule_and_the_same_logits(sst):
    b = batch_stream(sst.train, "rvnn", 25, seed=2)[0]
    groups = b.packed_groups(int(np.diff(b.level_offsets)[1:].max()))
    assert [g.tolist() for g in groups] == [lv.tolist() for lv in b.levels[1:]]
    cfg = _tiny("treelstm", len(sst.vocab))
    params = init_params(cfg, seed=0)
    out = {}
    for schedule in ("packed", "heights"):
        impl = RvNN(cfg, "compiled", threads=2)
        impl.schedule = schedule
        impl.load_params(params)
        out[schedule] = impl.to_numpy(impl.logits(impl.prepare(b)))
    assert np.abs(out["packed"] - out["heights"]).max() < 1e-6
    assert np.abs(out["packed"] - reference.logits(cfg, params, b)).max() < 1e-4


# -- on a GPU machine: every strategy, fused included, on the device --

def _has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="no GPU backend in this jax")
@pytest.mark.parametrize("model,strategy", [
    ("elman", "loop"), ("elman", "compiled"), ("lstm", "loop"), ("lstm", "compiled"),
    ("lstm", "fused"), ("rvnn", "recursive"), ("rvnn", "levels"), ("rvnn", "compiled"),
    ("treelstm", "recursive"), ("treelstm", "levels"), ("treelstm", "compiled")])
def test_gpu_matches_the_reference(model, strategy, sst):
    from bench import verify
    cfg = ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=32, hidden=24, num_classes=5,
                      lr=0.5)
    impl = (RNN if cfg.family == "rnn" else RvNN)(cfg, strategy, device="gpu", threads=2)
    params = init_params(cfg, seed=7)
    impl.load_params(params)
    batch = (make_seq_batch if cfg.family == "rnn" else make_tree_batch)(sst.train[:8])
    result = verify.check(impl, cfg, params, batch)
    assert result["ok"], result
    ready = impl.prepare(batch)
    assert all(a.devices() == {impl.dev} for a in jax.tree.leaves(ready) if hasattr(a, "devices"))
    impl.train_step(ready)
    impl.sync()
    _, g = reference.loss_and_grads(cfg, params, batch)
    want = reference.sgd_step({k: v.astype(np.float64) for k, v in params.items()}, g, cfg.lr)
    got = impl.export_params()
    assert max(verify.max_abs(got[k], want[k]) for k in want) <= verify.TOLERANCE["param_abs"]
    assert isinstance(impl.device_peak_bytes(), int)
    assert impl.info()["platform"] == "gpu"
