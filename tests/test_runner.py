"""The runner end to end with the numpy framework (no deep-learning framework needed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import registry
from bench.cell import PHASES, base_record
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
    assert len(recs) == len(cells) == 14
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
        # where the cell's time went: every phase, from the runner's Popen to reading the result
        phases = r["phase_s"]
        assert set(PHASES) - set(phases) == {"accuracy"} and min(phases.values()) >= 0
        assert 0.8 * r["cell_wall_s"] <= sum(phases.values()) <= r["cell_wall_s"] + 1e-6
        assert r["info"]["data_source"] in ("cache", "parsed (no cache file yet)")
    for key in [("lstm", "fused"), ("rvnn", "levels"), ("treelstm", "compiled")]:
        assert by[key]["status"] == "not-applicable" and by[key]["reason"]
    env = json.load(open(os.path.join(out, "env.json")))
    assert env["frameworks"]["numpy"] and env["machine"]["cores"] >= 1
    assert sorted(env["planned_cells"]["numpy"]) == sorted(c.key() for c in cells)
    # SST is parsed once per run at most: the cells after the first read the cache
    assert [r["info"]["data_source"] for r in recs if r["status"] == "ok"][1:] == ["cache"] * 3
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
    assert 1 <= len(first) < 7, "the kill came too late to test resuming"
    res = _bench(*(args + ["--resume"]), timeout=600)
    assert res.returncode == 0, res.stderr
    recs = read_records(path)
    ids = [r["cell_id"] for r in recs]
    assert len(ids) == len(set(ids)) == 7
    assert {r["cell_id"] for r in first} <= set(ids)
    assert "already recorded" in res.stderr


def test_a_resumed_run_keeps_the_frameworks_its_earlier_steps_recorded(tmp_path):
    from bench.runner import merge_env
    path = tmp_path / "env.json"
    path.write_text(json.dumps({"frameworks": {"torch": "2.11"}, "framework_probes": {"torch": {"ok": True}},
                                "time": "T1", "git_commit": "abc", "threads": 2}))
    env = merge_env(str(path), {"frameworks": {"jax": "0.11"}, "framework_probes": {"jax": {"ok": True}},
                                 "time": "T2", "git_commit": "def", "threads": 2})
    assert env["frameworks"] == {"torch": "2.11", "jax": "0.11"}
    assert set(env["framework_probes"]) == {"torch", "jax"}
    assert env["time"] == "T2"
    assert env["earlier_starts"] == [{"time": "T1", "git_commit": "abc", "threads": 2}]
    # the cells each step planned add up, so a report can tell what is still missing
    path.write_text(json.dumps({"planned_cells": {"torch": ["a", "b"]}}))
    env = merge_env(str(path), {"planned_cells": {"torch": ["b", "c"], "jax": ["d"]}})
    assert env["planned_cells"] == {"torch": ["a", "b", "c"], "jax": ["d"]}
    # no earlier env.json: the new one as it is
    assert merge_env(str(tmp_path / "none.json"), {"frameworks": {}}) == {"frameworks": {}}


def test_a_device_found_absent_once_is_not_probed_again(tmp_path, monkeypatch):
    import io
    from bench import runner
    started = []

    def fake_cell(cfg, version, python, result_dir=None, on_status=None):
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
                        lambda c, v, python, result_dir=None, on_status=None: dict(
                            base_record(c), status="failed", reason="x"))
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
    said = io.StringIO()
    code = runner.run(cells, str(tmp_path / "r"), stream=said)
    recs = read_records(str(tmp_path / "r" / RECORDS))
    assert code == 0 and {r["status"] for r in recs} == {"unavailable"}
    assert all("does not import" in r["reason"] for r in recs)
    # said with its reason, before the cells and in the closing summary
    text = said.getvalue()
    assert "numpy: unavailable: nofw does not import: ModuleNotFoundError (its 14 cells" in text
    assert "unavailable numpy (14 cells): nofw does not import" in text


def test_list_is_accurate_and_compact():
    res = _bench("list", timeout=600)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [l.split()[0] for l in lines] == list(registry.FRAMEWORKS)     # one line each
    assert "4 of 14 entries; not applicable: fused (elman lstm)" in lines[0]
    for fw, line in zip(registry.FRAMEWORKS, lines):
        ok, detail = registry.probe(fw)
        assert ("unavailable" in line) != ok, fw
        assert detail.splitlines()[0][:40] in line     # the version, or why it is unavailable
    assert "oneDNN" not in res.stdout + res.stderr     # framework logs stay in their probes


def test_list_verbose_names_every_entry_and_reason(capsys, monkeypatch):
    from bench import cli, runner
    monkeypatch.setattr(runner, "iter_probes", lambda names: (
        (n, {"ok": n == "numpy", "detail": "2.0" if n == "numpy" else "no %s here" % n}) for n in names))
    assert cli.main(["list", "--verbose"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(registry.entries())
    numpy_lines = [l for l in lines if l.startswith("numpy")]
    assert sum("available (numpy 2.0)" in l for l in numpy_lines) == 4
    assert sum("not-applicable: numpy runs the reference" in l for l in numpy_lines) == 8
    assert all("unavailable: no torch here" in l for l in lines if l.split()[0] == "torch")


def test_help_hides_internal_commands_and_explains_presets_and_defaults():
    from bench import cli
    from bench.config import PRESETS
    parser = cli.build_parser()
    top = parser.format_help()
    assert "cell" not in top.replace("cells", "") and "probe" not in top and "SUPPRESS" not in top
    for command in ("list", "run", "report", "compare"):
        assert command in top
    run = parser._subparsers._group_actions[0].choices["run"].format_help()
    for name in PRESETS:
        assert "\n  %s " % name in run
    assert "(default) SST 5-class, batch 25" in run
    assert "14 cells per framework, 7 timed repeats, 900 s timeout" in run
    flat = " ".join(run.split())
    assert "default: a new results/run-YYYYmmdd" in flat and "(default: the preset's; quick: 2)" in flat


def test_an_ad_hoc_run_gets_a_new_directory_and_resume_needs_one(tmp_path, monkeypatch, capsys):
    from bench import cli
    monkeypatch.chdir(tmp_path)
    args = ["run", "--preset", "smoke", "--frameworks", "numpy", "--models", "lstm",
            "--strategies", "fused"]          # not applicable for numpy: recorded without a process
    assert cli.main(args) == 0
    assert cli.main(args) == 0
    runs = sorted(os.listdir(str(tmp_path / "results")))
    assert len(runs) == 2 and all(r.startswith("run-") for r in runs)
    err = capsys.readouterr().err
    for r in runs:
        assert "into %s" % os.path.join("results", r) in err
        assert len(read_records(str(tmp_path / "results" / r / RECORDS))) == 1
    assert cli.main(args + ["--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_progress_shows_the_running_cells_time_and_phase():
    import io
    from bench.runner import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    p = Progress(3, stream=tty)
    p.start("torch/lstm/compiled sst b25 cpu")
    p.update({"phase": "timed", "detail": "train pass 3/7"}, 12.4)
    last = tty.getvalue().split("\r")[-1]
    assert "0/3" in last and "torch/lstm/compiled sst b25 cpu  12s timed: train pass 3/7" in last
    p.update({"phase": "gate", "detail": ""}, 13.0)
    assert tty.getvalue().split("\r")[-1].endswith("13s equivalence check")
    # a log gets a line per finished cell and, while one runs long, one every 30 s
    log = io.StringIO()
    p = Progress(2, stream=log)
    p.start("jax/treelstm/recursive sst b25 cpu")
    for t in (5, 31, 40, 62):
        p.update({"phase": "warmup"}, t)
    p.update(None, 95)
    p.finish("jax/treelstm/recursive sst b25 cpu", "ok", 96.0, 40.0)
    lines = log.getvalue().splitlines()
    assert lines[:3] == ["    ... jax/treelstm/recursive sst b25 cpu: 31s, warm-up",
                         "    ... jax/treelstm/recursive sst b25 cpu: 62s, warm-up",
                         "    ... jax/treelstm/recursive sst b25 cpu: 95s, starting"]
    assert lines[3].endswith("jax/treelstm/recursive sst b25 cpu  (timed 40.0s)")


def test_the_runner_sees_each_phase_of_a_real_cell_and_a_timeout_keeps_the_last(tmp_path, monkeypatch):
    from bench import runner
    monkeypatch.setattr(runner, "POLL_S", 0.2)
    cfg = CellConfig("numpy", "treelstm", "recursive", task="synth-left-8", batch_size=8, hidden=8,
                     embed_dim=8, pool_batches=2, repeats=10 ** 6, warmup_passes=0,
                     latency_samples=2, timeout_s=6)
    seen = []
    rec = runner.run_in_subprocess(cfg, "x", result_dir=str(tmp_path),
                                   on_status=lambda status, t: seen.append(status))
    assert rec["status"] == "timeout"
    phases = [s["phase"] for s in seen if s]
    assert phases and phases[-1] == "timed"
    assert phases == sorted(phases, key=PHASES.index)          # in the cell's order
    assert any((s or {}).get("detail", "").startswith("inference sample ") for s in seen)
    assert rec["last_phase"].startswith("timed: inference sample ")
    assert os.listdir(str(tmp_path)) == []                      # no status or result file left


def test_a_relative_result_dir_works_when_the_cell_runs_in_another_root(tmp_path, monkeypatch):
    """`bench ab --base git:REF --out rel/dir`: each side's cells run in a worktree of their
    own, so the result path they are handed must not be relative to the caller's directory
    (here the cell runs in the checkout and the caller sits in another directory)."""
    from bench import runner
    (tmp_path / "caller" / "out").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "caller")
    cfg = CellConfig("numpy", "lstm", "loop", task="synth-left-8", batch_size=4, hidden=4,
                     embed_dim=4, pool_batches=1, repeats=1, warmup_passes=0, latency_samples=1,
                     timeout_s=120, verify_examples=2, min_repeat_s=0.0)
    assert not os.path.exists(os.path.join(ROOT, "out"))
    rec = runner.run_in_subprocess(cfg, "x", result_dir="out", root=ROOT)
    assert rec["status"] == "ok", rec.get("reason")
    assert os.listdir("out") == []     # the result was read and removed where it was written


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
    return cli.select_cells(cli.build_parser().parse_args(["run"] + list(args)))


def test_task_and_budget_options_select_the_presets_own_cells():
    # a task the preset has keeps its own cells: binary SST trains tree models on every node
    cells = _cli_cells("--preset", "parity", "--frameworks", "torch", "--tasks", "sst2")
    assert {c.task for c in cells} == {"sst2"} and len(cells) == 12
    assert {c.loss_mode for c in cells if c.family == "rvnn"} == {"all"}
    assert {c.loss_mode for c in cells if c.family == "rnn"} == {"root"}
    # a task it lacks is asked for with the cells of its first task
    cells = _cli_cells("--preset", "quick", "--frameworks", "numpy", "--tasks", "listops", "synth-left-8")
    assert sorted({c.task for c in cells}) == ["listops", "synth-left-8"] and len(cells) == 28
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


def test_the_accuracy_budget_scores_labelled_roots_as_the_reference_predicts_them():
    """bench.cell.root_accuracy (the parity cells' dev and test score): the share of labelled
    examples whose argmax logit is their label, unlabelled (-1) examples left out, None when
    no example is labelled; batch size does not change it."""
    from dataclasses import replace as dc_replace

    import numpy as np

    from bench import reference
    from bench.batches import make_batch
    from bench.cell import root_accuracy
    from bench.params import ModelConfig, init_params
    from bench.tasks import load_task
    data = load_task("synth-left-8", seed=0)
    for model, fam in (("lstm", "rnn"), ("treelstm", "rvnn")):
        cfg = ModelConfig(model, vocab_size=len(data.vocab), embed_dim=6, hidden=5,
                          num_classes=data.num_classes)
        params = init_params(cfg, seed=3)
        impl = registry.load("numpy", model)(cfg, "loop" if fam == "rnn" else "recursive", "cpu", 1)
        impl.load_params(params)
        examples = list(data.splits["dev"][:12])
        pred = [int(np.argmax(reference.logits(cfg, params, make_batch(fam, [e]))[0]))
                for e in examples]
        # label half the examples with their prediction, the rest with another class; hide two
        examples = [dc_replace(e, label=p if i % 2 else (p + 1) % data.num_classes)
                    for i, (e, p) in enumerate(zip(examples, pred))]
        examples[0] = dc_replace(examples[0], label=-1)     # a wrong one, unlabelled
        examples[1] = dc_replace(examples[1], label=-1)     # a right one, unlabelled
        for batch_size in (1, 5, 12):
            assert root_accuracy(impl, fam, examples, batch_size) == pytest.approx(5 / 10)
        assert root_accuracy(impl, fam, [dc_replace(e, label=-1) for e in examples], 4) is None


def test_a_cell_trains_with_its_own_settings():
    """Every setting a cell and a model share (sizes, loss, optimiser, learning rate, weight
    decay) reaches the implementation as the cell has it: --lr, --optimizer and
    --weight-decay would otherwise be recorded but not used, and the gate, which checks the
    implementation against the reference under the same model settings, could not tell."""
    from dataclasses import fields, replace as dc_replace

    from bench.cell import model_config
    from bench.params import ModelConfig
    from bench.tasks import load_task
    data = load_task("synth-left-8", seed=0)
    shared = ({f.name for f in fields(ModelConfig)} & {f.name for f in fields(CellConfig)}) - {"model"}
    assert {"lr", "optimizer", "weight_decay", "loss_mode", "hidden", "embed_dim"} <= shared
    base = CellConfig("torch", "treelstm", "levels", epochs=1.0)
    for cfg in (base, dc_replace(base, lr=3e-4, optimizer="adagrad", weight_decay=1e-5,
                                 loss_mode="all", hidden=7, embed_dim=9)):
        m = model_config(cfg, data)
        assert {f: getattr(m, f) for f in shared} == {f: getattr(cfg, f) for f in shared}
        assert (m.model, m.vocab_size, m.num_classes) == (cfg.model, len(data.vocab),
                                                          data.num_classes)
