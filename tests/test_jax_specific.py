"""JAX-specific properties: bounded compiles and retracing, float32 timing path, thread
set-up, optimisers, the cuDNN weight mapping and the compiled tree schedule."""

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
from bench.batches import batch_stream, make_batch, make_seq_batch, make_tree_batch  # noqa: E402
from bench.interface import NotApplicable, Unavailable  # noqa: E402
from bench.params import ModelConfig, init_params  # noqa: E402
from bench.tasks import load_listops, load_sst  # noqa: E402
from impls.jax_impl.rnn import RNN, cudnn_lstm_weights  # noqa: E402
from impls.jax_impl.rvnn import RvNN  # noqa: E402


@pytest.fixture(scope="module")
def sst():
    return load_sst(5)


def _tiny(model, vocab, **kw):
    return ModelConfig(model, vocab_size=vocab, embed_dim=8, hidden=6, num_classes=5, **kw)


# -- compiles stay bounded: every batch of a task maps into a few shapes --

# programs per phase, for batches of up to the cell's batch size plus batch-1 inference
BOUNDS = {("lstm", "compiled"): (4, 2),      # train lengths 16/32/64 + the gradient program
          # the yardstick pads as a user would, inference too: lengths 16/32/64 for the
          # batch's rows and for one example's
          ("lstm", "plain"): (4, 6),
          ("treelstm", "compiled"): (2, 2),  # one train step + the gradient program
          ("treelstm", "levels"): (4, 4)}    # leaves, level, level backward, leaves backward
#                                              + update; infer: readout, and batch 1's three


@pytest.mark.parametrize("model,strategy", sorted(BOUNDS))
def test_programs_per_shape_class_not_per_batch(model, strategy, sst):
    cfg = _tiny(model, len(sst.vocab), optimizer="adam", lr=0.01)
    impl = (RNN if cfg.family == "rnn" else RvNN)(cfg, strategy, threads=2)
    impl.batch_size = 25
    impl.load_params(init_params(cfg, seed=0))
    # length-bucketed batches run from the shortest sentences to the longest
    first = batch_stream(sst.train, cfg.family, 25, seed=0, bucket=True)[:12]
    first += [make_batch(cfg.family, sst.train[:7])]
    first += [make_batch(cfg.family, [e]) for e in sst.splits["dev"][:4]]
    for b in first:
        ready = impl.prepare(b)
        if b.size > 1:
            impl.train_step(ready)
        impl.logits(ready)
    impl.loss_and_grads(impl.prepare(make_batch(cfg.family, sst.train[7:15])))
    impl.sync()
    counts = impl.compile_counts()
    train_bound, infer_bound = BOUNDS[model, strategy]
    assert 1 <= counts["train"] <= train_bound and 1 <= counts["infer"] <= infer_bound, counts
    # other batches (unbucketed, as accuracy training draws them; other lengths) add none
    others = batch_stream(sst.train, cfg.family, 25, seed=1)[:4]
    others += [make_batch(cfg.family, sst.splits["test"][-10:])]
    others += [make_batch(cfg.family, [e]) for e in sst.splits["dev"][4:10]]
    for b in others:
        ready = impl.prepare(b)
        if b.size > 1:
            impl.train_step(ready)
        out = impl.logits(ready)
        assert impl.to_numpy(out).shape == (b.size, 5)
    impl.sync()
    again = impl.compile_counts()
    assert (again["train"], again["infer"]) == (counts["train"], counts["infer"]), again


def test_levels_runs_one_call_per_width_of_each_height(sst):
    """A height wider than the call width takes several calls, a narrow one a single call."""
    cfg = _tiny("rvnn", len(sst.vocab))
    impl = RvNN(cfg, "levels", threads=2)
    impl.batch_size = 25
    b = batch_stream(sst.train, "rvnn", 25, seed=0)[0]
    ready = impl.prepare(b)
    width = ready["calls"][0][0].shape[0]
    widths = np.diff(b.level_offsets)[1:]
    assert width == 32 and len(ready["calls"]) == sum(-(-int(w) // width) for w in widths)
    nodes = np.concatenate([np.asarray(c[0]) for c in ready["calls"]])
    assert sorted(nodes[nodes < ready["rows"]].tolist()) == list(range(int(b.level_offsets[1]),
                                                                       b.num_nodes))


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

def test_compiled_trees_on_two_shape_classes_agree_with_the_reference(sst):
    """The same batch on its own class (no batch size: examples to a power of two) and on a
    cell's (batch size 25: more rows, steps and leaf chunks, all padding) gives the same logits
    and gradients."""
    b = batch_stream(sst.train, "rvnn", 5, seed=2)[0]
    cfg = _tiny("treelstm", len(sst.vocab), loss_mode="all")
    params = init_params(cfg, seed=0)
    ref_loss, ref_grads = reference.loss_and_grads(cfg, params, b)
    shapes = set()
    for batch_size in (None, 25):
        impl = RvNN(cfg, "compiled", threads=2)
        impl.batch_size = batch_size
        impl.load_params(params)
        ready = impl.prepare(b)
        shapes.add(ready["node"].shape + ready["leaf_node"].shape)
        logits = impl.to_numpy(impl.logits(ready))
        assert np.abs(logits - reference.logits(cfg, params, b)).max() < 1e-4
        loss, grads = impl.loss_and_grads(ready)
        assert abs(loss - ref_loss) < 1e-4
        for k in grads:
            assert np.abs(grads[k] - ref_grads[k]).max() <= 1e-3 * np.abs(ref_grads[k]).max(), k
    assert len(shapes) == 2


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
    batch = make_batch(cfg.family, sst.train[:8])
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
