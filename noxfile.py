"""Every job is a nox session. The two the README names:

    nox -s bench    the core frameworks' benchmark (quick preset), a report after each
                    (`nox -s bench -- --frameworks all`: every framework)
    nox -s tests    unit, equivalence and end-to-end tests

Each framework benchmarks in its own virtualenv with its own Python and pins
(session `bench_framework(framework=...)`), so one framework's session never needs
another framework installed; `bench` itself only chooses which of them run, so a
framework left out costs nothing, not even a virtualenv.
"""

import importlib.util
import os
import shutil
import subprocess

import nox

nox.options.reuse_venv = "yes"
# the stdlib venv of each target Python: virtualenv no longer seeds Python 3.8
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint"]

ROOT = os.path.dirname(os.path.abspath(__file__))


def _expose_pyenv_pythons():
    """Let pyenv's shims answer for every installed Python (python3.8, python3.10, ...).

    Without this, a shim only serves the global version and nox reports other
    interpreters as missing.
    """
    if "PYENV_VERSION" in os.environ or not shutil.which("pyenv"):
        return
    out = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True)
    versions = [v.strip() for v in out.stdout.splitlines() if v.strip() and "/" not in v]
    if versions:
        os.environ["PYENV_VERSION"] = ":".join(versions)


_expose_pyenv_pythons()
LATEST = os.path.join("results", "latest")


def _framework_table():
    """bench/frameworks.py, loaded by path: this file's venv has nox alone, and importing the
    bench package would import numpy. The table is plain data on the standard library."""
    spec = importlib.util.spec_from_file_location("bench_framework_table",
                                                  os.path.join(ROOT, "bench", "frameworks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLE = _framework_table()
# framework -> its entry: the Python of its venv and its pip steps (each step is one pip call)
FRAMEWORKS = {fw.name: fw for fw in TABLE.ENTRIES}
CORE = list(TABLE.CORE)
RAY = list(TABLE.RAY)   # `bench run --executor ray`; pyproject's `cluster` extra
REPORT = list(TABLE.REPORT)
# The default `nox -s bench`: the reference and the three frameworks most users choose between.
CORE_SET = list(TABLE.CORE_SET)
# The frameworks the tests-3.11 session installs together (one cross-framework venv), and their pins.
CROSS = CORE_SET
CROSS_PINS = list(TABLE.pins(CROSS))


def _no_venv(session):
    """`nox --no-venv`: sessions run in the current environment as it is, installing nothing."""
    return session.venv_backend == "none"


def _install(session, framework, extra=()):
    if _no_venv(session):
        return
    session.install(*CORE, *extra)
    for step in FRAMEWORKS[framework].pip:
        session.install(*step)


def _caffe_env(session, env):
    """Debian 11's Caffe, fetched and unpacked into .deps/caffe once (never installed system-wide:
    impls/caffe_impl/fetch_debs.sh uses a private apt configuration), put on the paths."""
    deps = os.path.join(ROOT, ".deps", "caffe")
    site = os.path.join(deps, "root", "usr", "lib", "python3", "dist-packages")
    if not os.path.isdir(os.path.join(site, "caffe")):
        try:
            session.run("bash", os.path.join(ROOT, "impls", "caffe_impl", "fetch_debs.sh"), deps,
                        external=True)
        except Exception as exc:  # the cells then record caffe as unavailable
            session.warn("could not fetch Caffe's Debian packages: %s" % exc)
            return env
    lib = os.path.join(deps, "root", "usr", "lib")
    paths = [os.path.join(lib, "x86_64-linux-gnu"), os.path.join(lib, "x86_64-linux-gnu",
             "openblas-pthread"), os.path.join(deps, "root", "lib", "x86_64-linux-gnu"), lib]
    if os.environ.get("LD_LIBRARY_PATH"):
        paths.append(os.environ["LD_LIBRARY_PATH"])
    return dict(env, LD_LIBRARY_PATH=os.pathsep.join(paths),
                PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], site]))


def _cntk_env(session, env):
    """The CNTK worker's venv and Open MPI from Debian .debs, set up in .deps/cntk by
    impls/cntk_impl/fetch_deps.sh (each part once: it skips what its stamps say is done).
    Adds BENCH_CNTK_PYTHON and LD_LIBRARY_PATH."""
    deps = os.path.join(ROOT, ".deps", "cntk")
    session.run("bash", os.path.join(ROOT, "impls", "cntk_impl", "fetch_deps.sh"), deps,
                "python" + TABLE.CNTK_WORKER_PYTHON, *TABLE.CNTK_WORKER_PINS, external=True)
    paths = [os.path.join(deps, "lib"), os.path.join(deps, "root", "usr", "lib", "x86_64-linux-gnu")]
    if os.environ.get("LD_LIBRARY_PATH"):
        paths.append(os.environ["LD_LIBRARY_PATH"])
    return dict(env, BENCH_CNTK_PYTHON=os.path.join(deps, "py36", "bin", "python"),
                LD_LIBRARY_PATH=os.pathsep.join(paths))


# framework -> function(session, env) -> env: libraries that come from outside pip
SYSTEM_ENV = {"caffe": _caffe_env, "cntk": _cntk_env}


def _env(session, framework, env):
    hook = SYSTEM_ENV.get(framework)
    return hook(session, env) if hook else env


def _params(exclude=()):
    names = [fw for fw in FRAMEWORKS if fw not in exclude]
    return nox.parametrize("python,framework", [(FRAMEWORKS[fw].python, fw) for fw in names],
                           ids=["framework='%s'" % fw for fw in names])


def split_frameworks(posargs):
    """``--frameworks A B`` / ``A,B`` / ``all`` -> (names or None, the remaining runner options)."""
    args, chosen, picking = [], None, False
    for a in posargs:
        if a == "--frameworks":
            chosen, picking = [], True
        elif picking and not a.startswith("-"):
            chosen.extend(x for x in a.split(",") if x)
        else:
            picking = False
            args.append(a)
    if chosen is not None and "all" in chosen:
        chosen = list(FRAMEWORKS)
    return chosen, args


# The Python of the `bench` session's venv (numpy, pandas, matplotlib): framework sessions
# it started write the report with it after their run, also when the run fails or is
# interrupted. None when a framework session runs on its own.
_REPORT_PYTHON = []


def select_or_skip(session, framework):
    """Split posargs: `--frameworks A B` (or all) chooses sessions; the rest goes to `bench run`."""
    chosen, args = split_frameworks(session.posargs)
    if chosen is not None and framework not in chosen:
        session.skip("not among --frameworks %s" % " ".join(chosen))
    return args


def _fresh_or_resumed(args):
    """results/latest* are scratch, rerun every time: a new invocation measures afresh and keeps
    the previous run as a generation (OUT/.generations/N), unless --resume completes it."""
    return args if {"--resume", "--overwrite"} & set(args) else ["--overwrite"] + args


def _report_now(session):
    """results/latest/report.md from every record there so far (best effort: a report that
    cannot be written, e.g. no records yet, never hides the run's own outcome)."""
    try:
        session.run(_REPORT_PYTHON[0], "-m", "bench", "report", LATEST, external=True,
                    env={"PYTHONPATH": ROOT})
    except BaseException as exc:  # noqa: B036 -- a second Ctrl-C stops the report, not the rest
        session.warn("report not written: %s" % (exc or type(exc).__name__))


@nox.session(python="3.11")
def bench(session):
    """The core set (numpy, torch, JAX, TensorFlow), a report after each; -- --frameworks all/NAMES.

    Each chosen framework runs in its own session (bench_framework), which this one queues;
    the others cost nothing. Other posargs go to `bench run` (e.g. `-- --preset smoke`).
    """
    chosen, args = split_frameworks(session.posargs)
    if chosen == []:
        session.error("--frameworks needs names (or all); known: %s" % ", ".join(FRAMEWORKS))
    chosen = chosen or CORE_SET
    unknown = [fw for fw in chosen if fw not in FRAMEWORKS]
    if unknown:
        session.error("unknown framework %s; known: all, %s" % (", ".join(unknown), ", ".join(FRAMEWORKS)))
    if any(a == "--out" or a.startswith("--out=") for a in args):
        # every framework would write into that one directory, each moving the last one's aside
        session.error("nox -s bench writes results/latest/<framework>; for another directory run "
                      "python -m bench run --out DIR")
    if _no_venv(session):
        _REPORT_PYTHON[:] = ["python"]
    else:
        session.install(*(CORE + REPORT))
        _REPORT_PYTHON[:] = [os.path.join(session.bin, "python")]
    session.log("frameworks: %s; each gets its own venv and results/latest/<framework>, then the "
                "report is rewritten" % " ".join(chosen))
    for fw in chosen:
        session.notify("bench_framework(framework='%s')" % fw, posargs=args)


def _bench(session, framework):
    args = _fresh_or_resumed(list(session.posargs))
    _install(session, framework)
    if not any(a.startswith("--preset") for a in args):
        args = ["--preset", "quick"] + args
    try:
        session.run("python", "-m", "bench", "run", "--frameworks", framework,
                    "--out", os.path.join(LATEST, framework), *args,
                    env=_env(session, framework, {"PYTHONPATH": ROOT}))
    finally:
        if _REPORT_PYTHON:
            _report_now(session)   # after each framework, and when its run fails or is interrupted
        else:
            # On its own: the report session runs once, after this one, even if the run failed.
            # Without posargs=[] it would receive this session's runner options.
            session.notify("report", posargs=[])


@nox.session
@_params()
def bench_framework(session, framework):
    """Benchmark one framework into results/latest/<framework> (posargs go to `bench run`)."""
    _bench(session, framework)


@nox.session
@_params(exclude=("numpy",))
def parity(session, framework):
    """Learning parity (3 seeds, same budget), with the fastest strategy of the last bench run."""
    args = _fresh_or_resumed(select_or_skip(session, framework))
    _install(session, framework)
    fastest = os.path.join(LATEST, framework)
    if os.path.isdir(fastest):
        args = ["--fastest-from", fastest] + args
    session.run("python", "-m", "bench", "run", "--preset", "parity", "--frameworks", framework,
                "--out", os.path.join("results", "latest-parity", framework), *args,
                env=_env(session, framework, {"PYTHONPATH": ROOT}))


@nox.session
@_params(exclude=CROSS)
def test_framework(session, framework):
    """Equivalence and framework-specific tests for one framework, in its own venv."""
    specific = FRAMEWORKS[framework].tests
    files = ["tests/test_equivalence.py"] + (["tests/" + specific] if specific else [])
    missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
    if missing:   # dropping one would pass the session without its framework-specific checks
        session.error("bench/frameworks.py names test files that do not exist: %s"
                      % ", ".join(missing))
    _install(session, framework, extra=["pytest"])
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *session.posargs,
                env=_env(session, framework, {
                    "PYTHONPATH": ROOT, "BENCH_FRAMEWORKS": framework,
                    "BENCH_REQUIRE_FRAMEWORKS": framework, "TF_CPP_MIN_LOG_LEVEL": "2"}))


@nox.session(python="3.11")
def report(session):
    """report.md, summary.csv and plots for everything under results/latest."""
    session.install(*(CORE + REPORT))
    session.run("python", "-m", "bench", "report", LATEST, *session.posargs,
                env={"PYTHONPATH": ROOT})


@nox.session(python="3.11")
def compare(session):
    """Regression check: nox -s compare -- BASE_DIR NEW_DIR [--threshold 10%]."""
    session.install(*CORE)
    session.run("python", "-m", "bench", "compare", *session.posargs, env={"PYTHONPATH": ROOT})


@nox.session(python=["3.11", "3.8"])
def tests(session):
    """3.11: everything, with torch + TensorFlow + JAX in one venv. 3.8: the core on numpy 1.21."""
    if session.python == "3.8":
        # The bench core must run where the old frameworks live (DyNet, Theano, ...).
        session.install("numpy==1.21.6", "pytest", "threadpoolctl")
        frameworks = "numpy"
    else:
        # nox: tests/test_noxfile.py runs the bench job's sessions (with --no-venv)
        session.install(*(CORE + REPORT + CROSS_PINS + ["pytest", "pytest-benchmark", "nox"]))
        session.run("python", "-m", "pip", "check")
        frameworks = ",".join(CROSS)
    bench_flags = [] if session.python == "3.8" else ["--benchmark-disable"]
    session.run("python", "-m", "pytest", "-q", "tests", "-p", "no:cacheprovider", *bench_flags,
                *session.posargs,
                env={"PYTHONPATH": ROOT, "BENCH_FRAMEWORKS": frameworks,
                     "BENCH_REQUIRE_FRAMEWORKS": frameworks, "TF_CPP_MIN_LOG_LEVEL": "2"})


@nox.session(python="3.11")
def tests_cluster(session):
    """A real 3-node Ray cluster on loopback, in a private network namespace (needs root):
    `bench run --executor ray` against a local run, Ctrl-C, a node killed mid-cell."""
    session.install(*(CORE + RAY + ["pytest"]))
    session.run("python", "-m", "pytest", "-q", "tests/test_cluster_core.py", "tests/test_cluster.py",
                "-p", "no:cacheprovider",
                *session.posargs,
                env={"PYTHONPATH": ROOT, "BENCH_REQUIRE_RAY": "1", "RAY_USAGE_STATS_ENABLED": "0"})


@nox.session(python="3.11")
def mutants(session):
    """The gate's mutation suite: every mutation of tests/mutants/table.py applied to a copy of
    the code, each affected cell run at the smoke and quick presets' sizes; prints the table
    (posargs go to tests/mutants/driver.py, e.g. --presets smoke --frameworks jax)."""
    session.install(*(CORE + CROSS_PINS))
    session.run("python", os.path.join("tests", "mutants", "driver.py"), *session.posargs,
                env={"PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"})


@nox.session(python="3.11")
def perf(session):
    """pytest-benchmark per implementation; compare with a saved run (see README)."""
    session.install(*(CORE + CROSS_PINS + ["pytest", "pytest-benchmark"]))
    session.run("python", "-m", "pytest", "-q", "tests/perf", "--benchmark-autosave",
                "--benchmark-columns=min,median,iqr,rounds", *session.posargs,
                env={"PYTHONPATH": ROOT, "BENCH_FRAMEWORKS": ",".join(CROSS),
                     "TF_CPP_MIN_LOG_LEVEL": "2"})


@nox.session(python="3.11")
def lint(session):
    """ruff over the harness, implementations, tests and this file."""
    session.install("ruff")
    session.run("ruff", "check", "bench", "impls", "tests", "noxfile.py")
