"""The cluster executor's parts that need no Ray: they run in every test session.

The core never imports ray (proven against a ``ray`` package that refuses to be
imported); placement, labels and interpreters are pure functions; the run
options refuse bad values in one line; compare and report keep machines apart
when records come from several. ``tests/test_cluster.py`` runs a real cluster.
"""

import copy
import os
import subprocess
import sys

import pytest

from bench import cluster
from bench.compare import Threshold, compare_records
from bench.config import CellConfig
from bench.records import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden", "records.jsonl")


def _bench(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bench"] + list(args), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env or dict(os.environ, PYTHONPATH=ROOT))


def test_the_core_and_a_local_run_never_import_ray(tmp_path):
    # A `ray` that raises on import shadows any installed one: bench must not even try.
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('bench imported ray')\n")
    code = ("import pkgutil, importlib, sys, bench\n"
            "for m in pkgutil.iter_modules(bench.__path__):\n"
            "    if m.name != '__main__':\n"
            "        importlib.import_module('bench.' + m.name)\n"
            "from bench.cli import main\n"
            "rc = main(['run', '--preset', 'smoke', '--frameworks', 'numpy', '--tasks', "
            "'synth-left-8', '--models', 'elman', '--out', %r])\n"
            "assert rc == 0, rc\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n"
            "print('clean')\n" % str(tmp_path / "out"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), ROOT]))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and "clean" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("argv, says", [
    (["--address", "127.0.0.1:6379"], "--address is for --executor ray"),
    (["--node-python", "numpy=/usr/bin/python3"], "--node-python is for --executor ray"),
    (["--executor", "ray", "--address", "nohost"], "--address takes HOST:PORT"),
    (["--executor", "ray", "--address", "127.0.0.1:0"], "--address takes HOST:PORT"),
    (["--executor", "ray", "--address", "127.0.0.1:99999"], "--address takes HOST:PORT"),
    (["--executor", "ray", "--node-python", "numpy"], "FRAMEWORK=PATH"),
    (["--executor", "ray", "--node-python", "nope=/usr/bin/python3"], "unknown framework 'nope'"),
    (["--executor", "ray", "--node-python", "numpy=python3"], "must be absolute"),
    (["--executor", "ray", "--node-python", "numpy=/a", "numpy=/b"], "names numpy twice"),
    (["--executor", "slurm"], "invalid choice"),
])
def test_bad_cluster_options_are_one_line_and_exit_2(tmp_path, argv, says):
    res = _bench("run", "--preset", "smoke", "--frameworks", "numpy", "--out", str(tmp_path / "o"),
                 *argv)
    assert res.returncode == 2 and says in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_without_ray_the_ray_executor_says_how_to_install_it(tmp_path):
    import importlib.util
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed in this venv (the refusal is for venvs without it)")
    res = _bench("run", "--preset", "smoke", "--frameworks", "numpy", "--executor", "ray",
                 "--out", str(tmp_path / "o"))
    assert res.returncode == 2, res.stderr
    assert "needs the ray package: pip install '.[cluster]' (ray==2.60.0)" in res.stderr
    assert not (tmp_path / "o").exists()


def test_a_cluster_that_does_not_answer_is_refused_in_one_line(tmp_path):
    pytest.importorskip("ray", reason="the refusal before connecting needs ray importable")
    res = _bench("run", "--preset", "smoke", "--frameworks", "numpy", "--executor", "ray",
                 "--address", "127.0.0.1:1", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "no Ray cluster answers at 127.0.0.1:1" in res.stderr, res.stderr


# --- placement ------------------------------------------------------------------------

def _node(alive=True, **resources):
    return {"Alive": alive, "Resources": resources}


def test_a_cell_needs_a_whole_slot_its_gpu_and_in_a_labelled_cluster_its_label():
    cpu, gpu = CellConfig("torch", "lstm", "loop"), CellConfig("torch", "lstm", "loop", device="gpu")
    assert cluster.slot_resources(cpu, labelled=False) == {"bench_slot": 1.0}
    assert cluster.requirement(gpu, labelled=True) == {"bench_slot": 1.0, "fw_torch": 0.01, "GPU": 1.0}
    plain = [_node(bench_slot=1.0, CPU=8.0), _node(alive=False, bench_slot=1.0, GPU=1.0)]
    assert not cluster.is_labelled(plain)
    assert cluster.can_place(cluster.requirement(cpu, False), plain)
    assert not cluster.can_place(cluster.requirement(gpu, False), plain)   # the GPU node is dead
    assert cluster.why_not_placeable(gpu, plain, False) == "no node of the Ray cluster offers a GPU"
    labelled = plain + [_node(bench_slot=1.0, fw_jax=1.0)]
    assert cluster.is_labelled(labelled)
    assert cluster.can_place(cluster.requirement(CellConfig("jax", "lstm", "loop"), True), labelled)
    assert not cluster.can_place(cluster.requirement(cpu, True), labelled)
    assert "fw_torch" in cluster.why_not_placeable(cpu, labelled, True)
    assert not cluster.can_place({"bench_slot": 1.0}, [_node(CPU=64.0)])


def test_a_node_picks_the_named_interpreter_then_its_nox_venv_then_its_own(tmp_path):
    root = str(tmp_path)
    assert cluster.node_interpreter("torch", {}, root) == (sys.executable, "the node's own interpreter")
    for fw, name in (("torch", "bench_framework-framework-torch"),
                     ("keras-torch", "bench-framework-keras-torch")):   # the name before the rename
        venv = tmp_path / ".nox" / name / "bin"
        venv.mkdir(parents=True)
        os.symlink(sys.executable, str(venv / "python"))
        assert cluster.node_interpreter(fw, {}, root) == (str(venv / "python"), "nox venv")
    assert cluster.nox_python(root, "jax") is None
    assert cluster.node_interpreter("torch", {"torch": "/opt/t/bin/python"}, root) == (
        "/opt/t/bin/python", "--node-python")


def test_node_python_items_parse_into_one_mapping():
    assert cluster.parse_node_pythons(["torch=/a/python", "jax = /b/python"]) == {
        "torch": "/a/python", "jax": "/b/python"}
    assert cluster.parse_node_pythons(["torch=/a", "torch=/a"]) == {"torch": "/a"}


# --- machines in compare and report ---------------------------------------------------

def _cluster_like(recs):
    """The golden run as a cluster run would record it: timed cells on another host (same
    hardware), static cells with the head's fingerprint, one cell lost (no fingerprint)."""
    out = copy.deepcopy(recs)
    for r in out:
        if r["status"] == "ok":
            r["machine"] = dict(r["machine"], hostname="node-1")
        else:
            r["machine"] = {"cpu": "Head CPU", "cores": 4, "gpu": None, "hostname": "head"}
    return out


def test_compare_judges_a_cluster_run_by_its_timed_cells_and_refuses_cells_that_moved():
    recs = read_records(GOLDEN)
    other = _cluster_like(recs)
    assert any(r["status"] != "ok" for r in other)
    other.append(dict(copy.deepcopy(other[-1]), cell_id="gone", status="lost", machine=None,
                      reason="node died: test"))
    changes, problems = compare_records(recs, other, Threshold(0.1))
    assert not problems and changes
    # Two kinds of machine on both sides, but one cell ran on the other kind in NEW.
    base, new = copy.deepcopy(recs), copy.deepcopy(recs)
    timed = [i for i, r in enumerate(base) if r["status"] == "ok"]
    big = {"cpu": "Big CPU", "cores": 64, "gpu": None}
    base[timed[0]]["machine"], new[timed[1]]["machine"] = dict(big), dict(big)
    changes, problems = compare_records(base, new, Threshold(0.1))
    assert not changes and len(problems) == 1 and "2 cells ran on different machines" in problems[0]


def test_report_ranks_cells_of_one_kind_of_machine_together(tmp_path):
    pytest.importorskip("pandas")
    from bench.report import write_report
    recs = read_records(GOLDEN)
    timed = [r for r in recs if r["status"] == "ok"]
    for r in timed[: len(timed) // 2]:
        r["machine"] = {"cpu": "Big CPU", "cores": 64, "gpu": None, "hostname": "node-2"}
    run = tmp_path / "run"
    run.mkdir()
    from bench.records import append_record
    for r in recs:
        append_record(str(run / "records.jsonl"), r)
    write_report(str(run), str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Machines" in md and "Big CPU (64 cores)" in md and "node-2 (%d)" % (len(timed) // 2) in md
    assert ", on Big CPU (64 cores)" in md


def test_a_task_without_a_record_becomes_lost_oom_or_crashed_with_the_reason():
    rex = pytest.importorskip("ray.exceptions", reason="Ray's exception types come with ray")
    cfg = CellConfig("numpy", "lstm", "loop")
    died = cluster.failure_record(cfg, rex.NodeDiedError("The node with node id: ab12 and address: "
                                                         "127.0.0.3 has been marked dead.\nmore"))
    assert died["status"] == "lost" and died["machine"] is None and died["cell_id"] == cfg.key()
    assert died["reason"] == "node died: The node with node id: ab12 and address: 127.0.0.3 has been " \
                             "marked dead."
    assert cluster.failure_record(cfg, rex.WorkerCrashedError())["status"] == "lost"
    oom = cluster.failure_record(cfg, rex.OutOfMemoryError("Task was killed due to the node running "
                                                           "low on memory."))
    assert oom["status"] == "oom" and "memory monitor" in oom["reason"]
    failed = cluster.failure_record(cfg, rex.RayTaskError("run_cell_on_node", "Traceback ...",
                                                          ModuleNotFoundError("No module named 'bench'")))
    assert failed["status"] == "crashed"
    assert failed["reason"] == ("the Ray task failed on its node: ModuleNotFoundError: No module named "
                                "'bench'")
