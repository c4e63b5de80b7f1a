"""The noxfile's bench job: the default core set, skipped frameworks cost nothing, a report
after each framework and on interruption. Sessions run with `nox --no-venv` (the current
environment, nothing installed) in a scratch copy of the repository, so that the test's
results/latest is its own.

And the framework table (bench/frameworks.py), the one source: what must agree with it
and cannot be derived from it (pyproject.toml's extras, test files that exist) is checked."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import frameworks, registry
from bench.records import RECORDS, read_records

try:
    import nox  # noqa: F401 -- the sessions below run it
except ImportError:
    nox = None
needs_nox = pytest.mark.skipif(nox is None, reason="nox is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def noxfile():
    if nox is None:
        pytest.skip("nox is not installed")
    saved = dict(os.environ)     # importing it sets PYENV_VERSION for nox's own process
    try:
        import noxfile as module
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


def test_frameworks_are_chosen_from_posargs_and_the_rest_goes_to_the_runner(noxfile):
    assert noxfile.split_frameworks([]) == (None, [])
    assert noxfile.split_frameworks(["--frameworks", "torch", "jax,numpy", "--preset", "smoke"]) == (
        ["torch", "jax", "numpy"], ["--preset", "smoke"])
    assert noxfile.split_frameworks(["--resume", "--frameworks", "all"]) == (
        list(noxfile.FRAMEWORKS), ["--resume"])
    assert noxfile.CORE_SET == ["numpy", "torch", "jax", "tensorflow"]
    assert sorted(noxfile.FRAMEWORKS) == sorted(registry.FRAMEWORKS)    # one session per entry


class _Skipped(Exception):
    pass


class _Session:
    """What select_or_skip uses of a nox session: its posargs, and skip (which raises)."""

    def __init__(self, posargs):
        self.posargs = posargs

    def skip(self, reason):
        raise _Skipped(reason)


def test_per_framework_sessions_choose_by_the_same_rule_all_included(noxfile):
    # parity(framework=...) and test_framework pick with --frameworks like the bench job
    assert noxfile.select_or_skip(_Session(["--frameworks", "all", "--seeds", "0"]), "paddle") == [
        "--seeds", "0"]
    assert noxfile.select_or_skip(_Session(["--seeds", "0"]), "paddle") == ["--seeds", "0"]
    with pytest.raises(_Skipped, match="not among --frameworks torch jax"):
        noxfile.select_or_skip(_Session(["--frameworks", "torch", "jax"]), "paddle")


def _scratch(tmp_path):
    """noxfile.py beside links to bench/ and impls/: ROOT is the scratch directory."""
    if nox is None:
        pytest.skip("nox is not installed")
    for name in ("bench", "impls"):
        os.symlink(os.path.join(ROOT, name), str(tmp_path / name))
    with open(os.path.join(ROOT, "noxfile.py")) as src, open(str(tmp_path / "noxfile.py"), "w") as dst:
        dst.write(src.read())
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONPATH", None)
    return [sys.executable, "-m", "nox", "--no-venv", "-f", str(tmp_path / "noxfile.py")], env


def test_nox_list_has_one_bench_session_and_one_per_framework(tmp_path, noxfile):
    cmd, env = _scratch(tmp_path)
    res = subprocess.run(cmd + ["--list"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    names = [l[2:].split(" -> ")[0] for l in res.stdout.splitlines() if l.startswith(("* ", "- "))]
    assert "bench" in names
    assert sorted(noxfile.FRAMEWORKS) == sorted(registry.FRAMEWORKS)
    assert [n for n in names if n.startswith("bench_framework")] == [
        "bench_framework(framework='%s')" % fw for fw in noxfile.FRAMEWORKS]


def test_bench_runs_only_the_chosen_frameworks_and_writes_the_report_after_each(tmp_path):
    cmd, env = _scratch(tmp_path)
    res = subprocess.run(cmd + ["-s", "bench", "--", "--frameworks", "numpy", "--preset", "smoke",
                                "--models", "lstm"], cwd=str(tmp_path), capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "Ran 2 sessions" in log and "framework='torch'" not in log    # skipped: not even started
    latest = tmp_path / "results" / "latest"
    assert sorted(os.listdir(str(latest))) == ["numpy", "report.md", "summary.csv", "throughput.png"]
    assert len(read_records(str(latest / "numpy" / RECORDS))) == 4       # --models reached the runner
    assert "Incomplete" not in (latest / "report.md").read_text()


def test_an_interrupted_bench_still_writes_the_report_marking_what_is_missing(tmp_path):
    cmd, env = _scratch(tmp_path)
    env["BENCH_TEST_CELL_FAULT"] = "sleep:2"      # cells slow enough to interrupt mid-run
    # A shell's background job ignores SIGINT; the real Ctrl-C reaches nox with its default.
    proc = subprocess.Popen(cmd + ["-s", "bench", "--", "--frameworks", "numpy", "--preset", "smoke"],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    records = tmp_path / "results" / "latest" / "numpy" / RECORDS
    deadline = time.time() + 300
    while time.time() < deadline and not (records.exists() and read_records(str(records))):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "interrupted" in out.lower()
    done = len(read_records(str(records)))
    assert 1 <= done < 14, out[-2000:]
    report = (tmp_path / "results" / "latest" / "report.md").read_text()
    assert "**Incomplete:** numpy %d of 14 planned cells" % done in report
    env_json = json.loads((tmp_path / "results" / "latest" / "numpy" / "env.json").read_text())
    assert len(env_json["planned_cells"]["numpy"]) == 14


@pytest.mark.parametrize("args,what", [(["--frameworks", "caffe3"], "unknown framework caffe3"),
                                       (["--frameworks"], "--frameworks needs names"),
                                       (["--out", "/tmp/x"], "python -m bench run --out DIR")])
def test_bench_refuses_bad_choices_before_any_session(tmp_path, args, what):
    cmd, env = _scratch(tmp_path)
    res = subprocess.run(cmd + ["-s", "bench", "--"] + args, cwd=str(tmp_path), capture_output=True,
                         text=True, env=env, timeout=120)
    log = res.stdout + res.stderr
    assert res.returncode != 0 and "Session bench aborted" in log and what in log
    assert "bench_framework" not in log and not (tmp_path / "results").exists()


def test_a_framework_session_refuses_a_test_file_that_is_missing(tmp_path):
    cmd, env = _scratch(tmp_path)      # the scratch copy has tests/test_equivalence.py alone
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_equivalence.py").write_text("def test_nothing():\n    pass\n")
    res = subprocess.run(cmd + ["-s", "test_framework(framework='paddle')"], cwd=str(tmp_path),
                         capture_output=True, text=True, env=env, timeout=120)
    log = res.stdout + res.stderr
    assert res.returncode != 0 and "tests/test_paddle_specific.py" in log, log[-2000:]
    assert "passed" not in log


def test_the_test_files_the_framework_table_names_exist_and_cover_every_specific_file():
    named = {fw.tests for fw in frameworks.ENTRIES if fw.tests}
    here = os.path.join(ROOT, "tests")
    assert sorted(n for n in named if not os.path.exists(os.path.join(here, n))) == []
    specific = {n for n in os.listdir(here) if n.startswith("test_") and n.endswith("_specific.py")}
    assert specific == named


def test_pyproject_extras_pin_what_the_framework_table_pins():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    extras = project["optional-dependencies"]
    by_name = {fw.name: fw for fw in frameworks.ENTRIES}
    pinned = [name for name in extras if name in by_name]
    assert pinned == ["torch", "jax", "tensorflow"]     # the core set's frameworks with pins
    for name in pinned:
        assert extras[name] == list(frameworks.pins([name])), name
    assert extras["report"] == list(frameworks.REPORT)
    assert extras["cluster"] == list(frameworks.RAY)
    assert ["numpy"] + extras["threads"] == list(frameworks.CORE)
    assert [d.split(">=")[0] for d in project["dependencies"]] == ["numpy"]


def test_the_framework_table_is_the_registry_and_the_presets_core_set():
    from bench.cluster import RAY_PIN
    from bench.config import DEFAULT_FRAMEWORKS
    from bench.coverage import SEED_FRAMEWORKS
    assert [fw.name for fw in frameworks.ENTRIES] == [
        n for n in registry.FRAMEWORKS if n not in {f.name for f in registry.TEST_ONLY}]
    assert tuple(DEFAULT_FRAMEWORKS) == frameworks.CORE_SET
    assert (RAY_PIN,) == frameworks.RAY
    # every entry but the reference has its row in the coverage table, its recipe from the table
    rows = [fw for fws, _, _ in SEED_FRAMEWORKS.values() for fw in fws]
    assert sorted(rows) == sorted(n for n in registry.FRAMEWORKS if n not in ("numpy", "numpy-slowed"))
    assert all(recipe == "" for fws, _, recipe in SEED_FRAMEWORKS.values() if fws)


def _stub(path, body):
    with open(path, "w") as fh:
        fh.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)


def test_cntk_setup_redoes_a_part_whose_stamp_outlived_what_it_made(tmp_path):
    """impls/cntk_impl/fetch_deps.sh skips a part whose stamp matches, but only while the
    part's product exists: a deleted worker venv (stamp still there) is built again. apt-get,
    dpkg-deb and the worker's Python are stubs that log their calls and make the products."""
    bins, dest, log = tmp_path / "bin", tmp_path / "deps", tmp_path / "calls.log"
    bins.mkdir()
    _stub(bins / "apt-get", 'echo "apt-get $*" >> %s\n'
          'case " $* " in *" download "*) touch fake.deb ;; esac\n' % log)
    _stub(bins / "dpkg-deb", 'echo "dpkg-deb $*" >> {log}\n'
          'mkdir -p "$3/usr/lib/x86_64-linux-gnu" && '
          'touch "$3/usr/lib/x86_64-linux-gnu/libmpi.so.40"\n'.format(log=log))
    # the worker's Python: `-m venv DIR` makes DIR/bin/python, itself a logging stub
    _stub(bins / "py36", 'echo "py36 $*" >> {log}\nmkdir -p "$3/bin"\n'
          'printf \'#!/bin/sh\\necho "venv-python $*" >> {log}\\n\' > "$3/bin/python"\n'
          'chmod +x "$3/bin/python"\n'.format(log=log))
    script = os.path.join(ROOT, "impls", "cntk_impl", "fetch_deps.sh")
    env = dict(os.environ, PATH="%s:%s" % (bins, os.environ["PATH"]))

    def setup():
        log.write_text("")
        subprocess.run(["bash", script, str(dest), "py36", "cntk==2.7.post2", "numpy==1.19.5"],
                       env=env, check=True, capture_output=True, timeout=60)
        return log.read_text()

    first = setup()
    assert "download libopenmpi3" in first and "py36 -m venv" in first
    assert "venv-python -m pip install --disable-pip-version-check cntk==2.7.post2" in first
    assert (dest / "py36.done").read_text() == "cntk==2.7.post2 numpy==1.19.5"
    assert setup() == ""                              # stamps and products there: nothing redone
    (dest / "py36" / "bin" / "python").unlink()       # the venv deleted, its stamp kept
    again = setup()
    assert "py36 -m venv" in again and "apt-get" not in again
    os.unlink(str(dest / "root" / "usr" / "lib" / "x86_64-linux-gnu" / "libmpi.so.40"))
    again = setup()
    assert "download libopenmpi3" in again and "venv" not in again
