"""The runner end to end with the numpy framework (no deep-learning framework needed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import registry
from bench.cell import base_record
from bench.config import CellConfig, preset
from bench.records import RECORDS, SCHEMA_VERSION, read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_FIELDS = (
    "schema_version framework framework_version model strategy task device batch_size hidden "
    "threads seed batch_hash status reason verify_max_abs_diff compile_s train_samples_per_s "
    "infer_samples_per_s latency_ms_p50 latency_ms_p95 peak_rss_mb").split()


def _bench(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "bench"] + list(args), cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def test_smoke_run_with_numpy_writes_valid_records(tmp_path):
    out = str(tmp_path / "run")
    res = _bench("run", "--preset", "smoke", "--frameworks", "numpy", "--out", out, timeout=600)
    assert res.returncode == 0, res.stderr
    recs = read_records(os.path.join(out, RECORDS))
    cells = preset("smoke", ["numpy"]).cells()
    assert len(recs) == len(cells) == 12
    by = {(r["model"], r["strategy"]): r for r in recs}
    for r in recs:
        for f in REQUIRED_FIELDS:
            assert f in r, f
        assert r["schema_version"] == SCHEMA_VERSION == 2 and r["threads"] == 2
    for key in [("elman", "loop"), ("lstm", "loop"), ("rvnn", "recursive"), ("treelstm", "recursive")]:
        r = by[key]
        assert r["status"] == "ok", r
        assert r["verify_max_abs_diff"] < 1e-4
        assert len(r["infer_samples_per_s"]) == 2 and min(r["infer_samples_per_s"]) > 0
        assert r["train_samples_per_s"] == [] and "inference only" in r["reason"]
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"]
        assert r["peak_rss_mb"] > 10 and len(r["batch_hash"]) == 16
    for key in [("lstm", "fused"), ("rvnn", "levels"), ("treelstm", "compiled")]:
        assert by[key]["status"] == "not-applicable" and by[key]["reason"]
    env = json.load(open(os.path.join(out, "env.json")))
    assert env["frameworks"]["numpy"] and env["machine"]["cores"] >= 1
    assert "OMP_NUM_THREADS" in env["thread_env"]


def test_killed_run_resumes_without_duplicates(tmp_path):
    out = str(tmp_path / "run")
    args = ["run", "--preset", "smoke", "--frameworks", "numpy", "--models", "lstm", "treelstm",
            "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "bench"] + args, cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    path = os.path.join(out, RECORDS)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_records(path)) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = read_records(path)
    assert 1 <= len(first) < 6, "the kill came too late to test resuming"
    res = _bench(*(args + ["--resume"]), timeout=600)
    assert res.returncode == 0, res.stderr
    recs = read_records(path)
    ids = [r["cell_id"] for r in recs]
    assert len(ids) == len(set(ids)) == 6
    assert {r["cell_id"] for r in first} <= set(ids)
    assert "already recorded" in res.stderr


def test_a_resumed_run_keeps_the_frameworks_its_earlier_steps_recorded(tmp_path):
    from bench.runner import _merge_env
    path = tmp_path / "env.json"
    path.write_text(json.dumps({"frameworks": {"torch": "2.11"}, "framework_probes": {"torch": {"ok": True}},
                                "time": "T1", "git_commit": "abc", "threads": 2}))
    env = _merge_env(str(path), {"frameworks": {"jax": "0.11"}, "framework_probes": {"jax": {"ok": True}},
                                 "time": "T2", "git_commit": "def", "threads": 2})
    assert env["frameworks"] == {"torch": "2.11", "jax": "0.11"}
    assert set(env["framework_probes"]) == {"torch", "jax"}
    assert env["time"] == "T2"
    assert env["earlier_starts"] == [{"time": "T1", "git_commit": "abc", "threads": 2}]
    # no earlier env.json: the new one as it is
    assert _merge_env(str(tmp_path / "none.json"), {"frameworks": {}}) == {"frameworks": {}}


def test_a_device_found_absent_once_is_not_probed_again(tmp_path, monkeypatch):
    import io
    from bench import runner
    started = []

    def fake_cell(cfg, version, python, result_dir=None):
        started.append(cfg)
        rec = base_record(cfg)
        if cfg.device == "gpu":
            rec.update(status="unavailable", reason="no CUDA device", unavailable_scope="device")
        else:
            rec.update(status="ok")
        return rec

    monkeypatch.setattr(runner, "run_in_subprocess", fake_cell)
    monkeypatch.setattr(runner, "probe_frameworks", lambda names, python: {
        n: {"ok": True, "detail": "1.0"} for n in names})
    cells = [CellConfig("torch", m, s, device="gpu") for m, s in
             (("lstm", "loop"), ("lstm", "fused"), ("treelstm", "levels"))]
    cells.append(CellConfig("torch", "lstm", "loop"))             # the CPU is another matter
    runner.run(cells, str(tmp_path / "r"), stream=io.StringIO())
    recs = read_records(str(tmp_path / "r" / RECORDS))
    assert [c.device for c in started] == ["gpu", "cpu"]
    assert [r["status"] for r in recs] == ["unavailable"] * 3 + ["ok"]
    assert all(r["reason"] == "no CUDA device" for r in recs[:3])


def test_failures_are_recorded_and_make_the_exit_code_nonzero(tmp_path, monkeypatch):
    from bench import runner
    # a cell process that crashes, hangs or is killed: simulated with stand-in interpreters
    cfg = CellConfig("numpy", "lstm", "loop", batch_size=4, hidden=4, embed_dim=4,
                     pool_batches=1, repeats=1, latency_samples=1, timeout_s=60)
    bad = str(tmp_path / "bad_python")
    with open(bad, "w") as fh:
        fh.write("#!/bin/sh\necho 'boom: cell crashed' >&2\nexit 3\n")
    os.chmod(bad, 0o755)
    rec = runner.run_in_subprocess(cfg, "x", python=bad)
    assert rec["status"] == "crashed" and "exited with code 3 without a result" in rec["reason"]
    assert "boom" in rec["stderr_tail"] and rec["returncode"] == 3
    slow = str(tmp_path / "slow_python")
    with open(slow, "w") as fh:
        fh.write("#!/bin/sh\nsleep 30\n")
    os.chmod(slow, 0o755)
    rec = runner.run_in_subprocess(CellConfig.from_dict(dict(cfg.to_dict(), timeout_s=1)), "x",
                                   python=slow)
    assert rec["status"] == "timeout"
    # a bare SIGKILL is no evidence of memory exhaustion
    killed = str(tmp_path / "killed_python")
    with open(killed, "w") as fh:
        fh.write("#!/bin/sh\nkill -9 $$\n")
    os.chmod(killed, 0o755)
    rec = runner.run_in_subprocess(cfg, "x", python=killed)
    assert rec["status"] == "crashed" and rec["reason"] == "killed by signal 9 (SIGKILL)"
    # what a framework prints when it runs out of memory is evidence
    oom = str(tmp_path / "oom_python")
    with open(oom, "w") as fh:
        fh.write("#!/bin/sh\necho 'RuntimeError: CUDA out of memory. Tried to allocate' >&2\nexit 1\n")
    os.chmod(oom, 0o755)
    rec = runner.run_in_subprocess(cfg, "x", python=oom)
    assert rec["status"] == "oom" and "CUDA out of memory" in rec["reason"]
    assert "exited with code 1" in rec["reason"]
    # and a failed cell makes the run's exit code 1 while the run goes on
    monkeypatch.setattr(runner, "run_in_subprocess",
                        lambda c, v, python, result_dir=None: dict(base_record(c), status="failed",
                                                                   reason="x"))
    monkeypatch.setattr(runner, "probe_frameworks",
                        lambda names, python: {n: {"ok": True, "detail": "1"} for n in names})
    cells = preset("smoke", ["numpy"]).cells()
    import io
    code = runner.run(cells, str(tmp_path / "r"), stream=io.StringIO())
    assert code == 1
    assert len(read_records(str(tmp_path / "r" / RECORDS))) == len(cells)


def test_missing_framework_is_unavailable_not_broken(tmp_path, monkeypatch):
    from bench import runner
    monkeypatch.setattr(runner, "probe_frameworks", lambda names, python: {
        n: {"ok": False, "detail": "nofw does not import: ModuleNotFoundError"} for n in names})
    import io
    cells = preset("smoke", ["numpy"]).cells()
    code = runner.run(cells, str(tmp_path / "r"), stream=io.StringIO())
    recs = read_records(str(tmp_path / "r" / RECORDS))
    assert code == 0 and {r["status"] for r in recs} == {"unavailable"}
    assert all("does not import" in r["reason"] for r in recs)


def test_list_is_accurate():
    res = _bench("list", timeout=600)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(registry.entries())
    numpy_lines = [l for l in lines if l.startswith("numpy")]
    assert sum("available (numpy" in l for l in numpy_lines) == 4
    assert sum("not-applicable" in l for l in numpy_lines) == 8
    for fw in registry.FRAMEWORKS:
        ok, _ = registry.probe(fw)
        fw_lines = [l for l in lines if l.split()[0] == fw]
        assert all(("unavailable" in l) != ok for l in fw_lines), fw


def test_refusals_that_depend_on_device_or_backend_are_static():
    # JAX's fused LSTM exists only on a GPU (cuDNN); Keras refuses `compiled` on torch only.
    cpu = registry.not_applicable("jax", "lstm", "fused", "cpu")
    assert cpu and "cuDNN" in cpu
    assert registry.not_applicable("jax", "lstm", "fused", "gpu") is None
    assert registry.not_applicable("jax", "elman", "fused", "gpu")     # no fused Elman anywhere
    assert "torch.compile" in registry.not_applicable("keras-torch", "treelstm", "compiled", "cpu")
    for fw in ("keras-jax", "keras-tensorflow"):
        assert registry.not_applicable(fw, "treelstm", "compiled", "cpu") is None
    # without a device, only refusals that hold everywhere
    assert registry.not_applicable("jax", "lstm", "fused") is None


def _cli_cells(*args):
    from bench import cli
    return cli._cells(cli.build_parser().parse_args(["run"] + list(args)))


def test_task_and_budget_options_select_the_presets_own_cells():
    # a task the preset has keeps its own cells: binary SST trains tree models on every node
    cells = _cli_cells("--preset", "parity", "--frameworks", "torch", "--tasks", "sst2")
    assert {c.task for c in cells} == {"sst2"} and len(cells) == 12
    assert {c.loss_mode for c in cells if c.family == "rvnn"} == {"all"}
    assert {c.loss_mode for c in cells if c.family == "rnn"} == {"root"}
    # a task it lacks is asked for with the cells of its first task
    cells = _cli_cells("--preset", "quick", "--frameworks", "numpy", "--tasks", "listops", "synth-left-8")
    assert sorted({c.task for c in cells}) == ["listops", "synth-left-8"] and len(cells) == 24
    cells = _cli_cells("--preset", "parity", "--frameworks", "torch", "--models", "treelstm",
                       "--tasks", "sst", "--epochs", "8")
    assert [(c.epochs, c.seed) for c in cells] == [(8.0, 0), (8.0, 1), (8.0, 2)]


def test_cli_rejects_unknown_names():
    for args in (["--frameworks", "caffe3"], ["--models", "gru"], ["--tasks", "imdb"]):
        res = _bench("run", "--dry-run", *args, timeout=120)
        assert res.returncode != 0 and "unknown" in res.stderr


def test_parse_error_is_one_clean_line(tmp_path):
    from bench.trees import read_trees
    bad = tmp_path / "t.txt"
    bad.write_text("(1 (2 a) (2 b)\n")
    with pytest.raises(Exception) as info:
        read_trees(str(bad))
    assert str(info.value).count("\n") == 0 and ":1:" in str(info.value)


def _lazy_numpy_rnn(delay_s, wrong=False):
    """The numpy RNN, as a framework that compiles on its first call (and optionally is wrong)."""
    from impls.numpy_impl.rnn import RNN

    class Lazy(RNN):
        compiled = False

        def logits(self, prepared):
            if not self.compiled:
                time.sleep(delay_s)
                self.compiled = True
            out = super().logits(prepared)
            return out + 1.0 if wrong else out
    return Lazy


def test_lazy_compilation_is_charged_to_the_first_call_not_hidden_in_the_check(monkeypatch):
    from bench import cell
    monkeypatch.setattr(cell.registry, "load", lambda fw, model: _lazy_numpy_rnn(0.3))
    cfg = CellConfig("numpy", "lstm", "loop", batch_size=4, hidden=4, embed_dim=4,
                     pool_batches=1, repeats=1, warmup_passes=0, latency_samples=1)
    rec = cell.run_cell(cfg)
    assert rec["status"] == "ok", rec["reason"]
    assert rec["first_infer_s"] >= 0.3
    assert rec["verify_max_abs_diff"] < 1e-4


def test_a_cell_that_is_not_equivalent_keeps_no_timing(monkeypatch):
    from bench import cell
    monkeypatch.setattr(cell.registry, "load", lambda fw, model: _lazy_numpy_rnn(0.0, wrong=True))
    cfg = CellConfig("numpy", "lstm", "loop", batch_size=4, hidden=4, embed_dim=4,
                     pool_batches=1, repeats=1, warmup_passes=0, latency_samples=1)
    rec = cell.run_cell(cfg)
    assert rec["status"] == "failed" and rec["reason"].startswith("not equivalent")
    assert rec["compile_s"] is None and rec["first_infer_s"] is None
    assert rec["infer_samples_per_s"] == [] and rec["latency_ms"] == []
