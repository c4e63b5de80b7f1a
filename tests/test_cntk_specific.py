"""CNTK-only checks: the worker protocol, and what the generic equivalence tests cannot see.

* A worker error comes back as an exception carrying the worker's message and
  traceback; a dead worker is a clear ``WorkerDied`` (never a hang), and the
  next implementation gets a fresh worker.
* The registry probe and the host refuse cleanly when ``BENCH_CNTK_PYTHON`` is
  unset or not runnable.
* ``timed_passes`` / ``timed_calls`` return one positive duration per pass / call,
  and a benchmark cell uses them (``bench.cell``).
* The suite's Adam and Adagrad (written as CNTK universal learners) follow the
  optimiser oracle over several steps (on labelled batches: the oracle refuses
  all-zero reference gradients).
* The fused LSTM (CNTK's ``[i, g, f, o]`` layout) matches the reference with a
  large bias, which pins the gate permutation.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from bench import reference, registry, verify
from bench.batches import make_seq_batch, make_tree_batch
from bench.config import CellConfig
from bench.interface import Unavailable
from bench.params import ModelConfig, init_params
from bench.tasks import load_sst
from optimizer_oracle import check_train_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = [f for f in os.environ.get("BENCH_REQUIRE_FRAMEWORKS", "").split(",") if f]
PROBE = registry.probe("cntk")


@pytest.fixture
def worker():
    """Skip (or, where cntk is required, fail) unless the CNTK worker runs here."""
    if PROBE[0]:
        return
    if "cntk" in REQUIRED:
        pytest.fail("required framework cntk is unavailable: %s" % PROBE[1])
    pytest.skip(PROBE[1])


@pytest.fixture(scope="module")
def sst():
    return load_sst(5)


def _impls():
    from impls.cntk_impl import common
    from impls.cntk_impl.rnn import RNN
    from impls.cntk_impl.rvnn import RvNN
    return common, RNN, RvNN


def _small(sst, model, **kw):
    return ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=12, hidden=10, num_classes=5, **kw)


# --- protocol ---

def test_worker_error_comes_back_as_an_exception(worker, sst):
    common, RNN, _ = _impls()
    impl = RNN(_small(sst, "elman"), "loop")
    with pytest.raises(common.WorkerError) as err:
        impl._call("logits", handle=123456789)
    text = str(err.value)
    assert "LookupError" in text and "123456789" in text and "worker traceback" in text
    with pytest.raises(common.WorkerError, match="unknown request kind 'no-such-kind'"):
        impl._call("no-such-kind")
    # the worker survives its errors and keeps answering
    impl.load_params(init_params(impl.cfg, seed=0))
    batch = make_seq_batch(sst.train[:3])
    got = impl.logits(impl.prepare(batch))
    assert verify.max_abs(got, reference.logits(impl.cfg, init_params(impl.cfg, seed=0), batch)) < 1e-4


def test_dead_worker_is_a_clear_error_not_a_hang(worker, sst):
    common, RNN, _ = _impls()
    cfg = _small(sst, "lstm")
    impl = RNN(cfg, "fused")
    impl.load_params(init_params(cfg, seed=0))
    ready = impl.prepare(make_seq_batch(sst.train[:4]))
    impl._client.proc.kill()
    t0 = time.monotonic()
    with pytest.raises(common.WorkerDied, match="killed by signal 9"):
        impl.logits(ready)
    assert time.monotonic() - t0 < 30
    with pytest.raises(common.WorkerDied):       # stays dead, says so again
        impl.train_step(ready)
    # a new implementation starts a fresh worker
    fresh = RNN(cfg, "fused")
    assert fresh._client is not impl._client and fresh._client.alive()
    fresh.load_params(init_params(cfg, seed=0))
    assert fresh.logits(fresh.prepare(make_seq_batch(sst.train[:4]))).shape == (4, 5)


def _state(pid, tid):
    """A thread's state letter from /proc (R, S, T, ...); the name field may hold spaces."""
    with open("/proc/%d/task/%s/stat" % (pid, tid)) as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_worker_that_stops_answering_is_killed_after_the_timeout(worker, sst):
    common, _, _ = _impls()
    # The first hello (CNTK's import) is answered without a limit: under load it alone can
    # take longer than the short one the silent worker is given below.
    client = common.WorkerClient(timeout=0)
    client.timeout = 2.0
    try:
        os.kill(client.proc.pid, 19)  # SIGSTOP: alive, silent
        # kill() returns before every thread has stopped, and the worker answers from its
        # "serve" thread: a request sent at once could still be answered (it was, now and
        # then). Wait, bounded, until the kernel reports every thread stopped.
        for _ in range(200):
            if all(_state(client.proc.pid, t) == "T"
                   for t in os.listdir("/proc/%d/task" % client.proc.pid)):
                break
            time.sleep(0.025)
        else:
            pytest.fail("the worker did not stop within 5 s of SIGSTOP")
        t0 = time.monotonic()
        with pytest.raises(common.WorkerDied, match="no reply"):
            client.request("hello")
        assert time.monotonic() - t0 < 20
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
            client.proc.wait()


def test_probe_and_host_refuse_without_a_worker_python(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BENCH_CNTK_PYTHON"}
    env["PYTHONPATH"] = ROOT
    code = "import impls.cntk_impl.worker_probe"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert res.returncode != 0
    assert "ImportError: BENCH_CNTK_PYTHON is not set" in res.stderr
    env["BENCH_CNTK_PYTHON"] = str(tmp_path / "no-such-python")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert "is not an executable file" in res.stderr
    from impls.cntk_impl import common
    saved = os.environ.pop("BENCH_CNTK_PYTHON", None)
    try:
        with pytest.raises(Unavailable, match="BENCH_CNTK_PYTHON is not set"):
            common.worker_python()
    finally:
        if saved is not None:
            os.environ["BENCH_CNTK_PYTHON"] = saved


def test_gpu_device_is_unavailable_with_the_cpu_wheel(worker, sst):
    _, RNN, _ = _impls()
    with pytest.raises(Unavailable, match="no GPU device"):
        RNN(_small(sst, "elman"), "loop", device="gpu")


# --- timing inside the worker ---

@pytest.mark.parametrize("family", ["rnn", "rvnn"])
def test_timed_passes_and_calls_return_positive_seconds(worker, sst, family):
    _, RNN, RvNN = _impls()
    if family == "rnn":
        impl, make = RNN(_small(sst, "lstm"), "loop"), make_seq_batch
    else:
        impl, make = RvNN(_small(sst, "treelstm"), "levels"), make_tree_batch
    impl.load_params(init_params(impl.cfg, seed=1))
    pool = [impl.prepare(make(sst.train[i:i + 4])) for i in (0, 4, 8)]
    for call in ("train_step", "logits"):
        secs = impl.timed_passes(call, pool, 3)
        assert isinstance(secs, list) and len(secs) == 3
        assert all(isinstance(s, float) and s > 0 for s in secs)
    singles = [impl.prepare(make([e])) for e in sst.splits["dev"][:5]]
    secs = impl.timed_calls("logits", singles)
    assert len(secs) == 5 and all(s > 0 for s in secs)
    from impls.cntk_impl.common import WorkerError
    with pytest.raises(WorkerError, match="not 'backward'"):
        impl.timed_passes("backward", pool, 1)
    # a sample that cycles the pool (bench.cell's min_repeat_s) repeats the same batches: the
    # graph cache's limit is on distinct ones
    assert len(impl.timed_passes("logits", pool * 30, 2)) == 2
    from impls.cntk_impl.worker_common import GRAPH_CACHE   # plain Python, imports no CNTK here
    many = [impl.prepare(make([e])) for e in sst.train[:GRAPH_CACHE + 1]]
    with pytest.raises(WorkerError, match="%d distinct batches" % (GRAPH_CACHE + 1)):
        impl.timed_passes("logits", many, 1)
    info = impl.info()
    assert info["graphs_built"] >= 1 and "worker" in info["timing"]


def test_cell_uses_the_worker_clock(worker):
    from bench.cell import run_cell
    cfg = CellConfig("cntk", "elman", "loop", batch_size=4, embed_dim=8, hidden=8,
                     pool_batches=2, repeats=3, warmup_passes=0, latency_samples=4,
                     verify_examples=2)
    rec = run_cell(cfg)
    assert rec["status"] == "ok", rec.get("reason")
    assert len(rec["train_samples_per_s"]) == 3 and len(rec["infer_samples_per_s"]) == 3
    assert all(x > 0 for x in rec["train_samples_per_s"] + rec["infer_samples_per_s"])
    assert len(rec["latency_ms"]) == 4 and all(x > 0 for x in rec["latency_ms"])
    assert "worker" in rec["info"]["timing"]


# --- optimisers and layouts ---

@pytest.mark.parametrize("optimizer,lr", [("adam", 0.01), ("adagrad", 0.1)])
@pytest.mark.parametrize("model,strategy", [("lstm", "fused"), ("rvnn", "recursive")])
def test_optimizers_follow_the_oracle(worker, sst, optimizer, lr, model, strategy):
    _, RNN, RvNN = _impls()
    cfg = _small(sst, model, optimizer=optimizer, lr=lr)
    cls, make = (RNN, make_seq_batch) if model == "lstm" else (RvNN, make_tree_batch)
    params = init_params(cfg, seed=3)
    batch = make(sst.train[:4])
    # load_params resets the optimiser state: the same three steps land in the same place
    check_train_steps(cls(cfg, strategy), cfg, params, batch, 3, again=True)


def test_fused_lstm_gate_layout_with_a_large_bias(worker, sst):
    _, RNN, _ = _impls()
    cfg = _small(sst, "lstm")
    params = init_params(cfg, seed=4)
    H = cfg.hidden
    params["b"] = np.concatenate([np.full(H, v, np.float32) for v in (0.5, -1.5, 1.0, 2.0)])
    batch = make_seq_batch(sst.train[:5])
    for strategy in ("fused", "loop"):
        impl = RNN(cfg, strategy)
        impl.load_params(params)
        res = verify.check(impl, cfg, params, batch)
        assert res["ok"], (strategy, res)
        assert all(np.array_equal(v, params[k]) for k, v in impl.export_params().items())


def test_train_step_returns_the_loss_before_the_update(worker, sst):
    _, _, RvNN = _impls()
    cfg = _small(sst, "treelstm", loss_mode="all")
    params = init_params(cfg, seed=6)
    batch = make_tree_batch(sst.train[:3])
    impl = RvNN(cfg, "recursive")
    impl.load_params(params)
    loss = impl.train_step(impl.prepare(batch))
    assert abs(float(loss) - reference.loss(cfg, params, batch)) < 1e-4


def test_compiled_trees_share_one_graph_per_bucket(worker):
    """``compiled`` pads to bucket sizes, so two batches of different structure but the same
    buckets run one graph, where ``levels`` needs one per level signature."""
    _, _, RvNN = _impls()
    from bench.tasks import Example
    from bench.trees import build_tree

    def ex(n, first):
        # every node labelled (1 or 2), so the gradients compared below are not all zero
        tree = build_tree("balanced", list(range(first, first + n)))
        labels = iter(range(tree.size))
        tree = tree.map_labels(lambda _: 1 + next(labels) % 2)
        return Example(tuple(tree.tokens()), tree, tree.label)

    batches = [make_tree_batch([ex(4, 1), ex(4, 5)]), make_tree_batch([ex(4, 1), ex(3, 9)])]
    assert batches[0].level_offsets.tolist() != batches[1].level_offsets.tolist()
    cfg = ModelConfig("treelstm", vocab_size=20, embed_dim=6, hidden=5, num_classes=3, loss_mode="all")
    params = init_params(cfg, seed=8)
    built = {}
    for strategy in ("levels", "compiled"):
        impl = RvNN(cfg, strategy)
        impl.load_params(params)
        for batch in batches:
            res = verify.check(impl, cfg, params, batch, keep_ref=True)
            assert not verify.zero_gradients(res.pop("ref_grads")), "vacuous: unlabelled trees"
            assert res["ok"], (strategy, res)
        built[strategy] = impl.info()["graphs_built"]
    assert built == {"levels": 2, "compiled": 1}
