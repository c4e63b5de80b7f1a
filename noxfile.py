"""Every job is a nox session. The two the README names:

    nox -s bench    every framework's benchmark (quick preset), then the report
    nox -s tests    unit, equivalence and end-to-end tests

Each framework benchmarks in its own virtualenv with its own Python and pins,
so one framework's session never needs another framework installed.
"""

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

# One place for pins. torch: exactly 2.13.0 (a CPU wheel on this machine kind;
# an unpinned torch pulls a multi-GB CUDA build).
TORCH = ["torch==2.13.0"]
JAX = ["jax[cpu]==0.10.2", "optax==0.2.8"]
TENSORFLOW = ["tensorflow-cpu==2.21.0"]
KERAS = ["keras==3.15.1"]
CORE = ["numpy", "threadpoolctl", "psutil"]
REPORT = ["pandas", "matplotlib"]

# framework -> (python, pip install steps run in order; each step is one pip call)
FRAMEWORKS = {
    "numpy": ("3.11", []),
    "torch": ("3.11", [TORCH]),
    "jax": ("3.11", [JAX]),
    "tensorflow": ("3.11", [TENSORFLOW]),
    "keras-torch": ("3.11", [KERAS + TORCH]),
    "keras-jax": ("3.11", [KERAS + JAX]),
    "keras-tensorflow": ("3.11", [KERAS + TENSORFLOW]),
    "paddle": ("3.11", [["paddlepaddle==3.3.1"]]),
    "pytensor": ("3.11", [["pytensor==3.0.7"]]),
    "theano": ("3.10", [["Theano==1.0.5", "numpy<1.22", "scipy<1.8"]]),
    # Chainer's sdist needs an old setuptools and no build isolation.
    "chainer": ("3.11", [["setuptools<70", "wheel"], ["--no-build-isolation", "chainer==7.8.1"],
                         ["numpy<2"]]),
    "mxnet": ("3.11", [["mxnet==1.9.1", "numpy<1.24"]]),
    # DyNet publishes wheels for CPython 3.6-3.8 only.
    "dynet": ("3.8", [["dynet==2.1.2", "numpy<1.25"]]),
    "dynet-autobatch": ("3.8", [["dynet==2.1.2", "numpy<1.25"]]),
}
# The frameworks the tests-3.11 session installs together (one cross-framework venv).
CROSS = ["numpy", "torch", "jax", "tensorflow"]


def _install(session, framework, extra=()):
    session.install(*CORE, *extra)
    for step in FRAMEWORKS[framework][1]:
        session.install(*step)


def _params(exclude=()):
    names = [fw for fw in FRAMEWORKS if fw not in exclude]
    return nox.parametrize("python,framework", [(FRAMEWORKS[fw][0], fw) for fw in names],
                           ids=["framework='%s'" % fw for fw in names])


def _selected(session, framework):
    """Split posargs: `--frameworks A B` chooses sessions; the rest goes to `bench run`."""
    args, chosen, picking = [], None, False
    for a in session.posargs:
        if a == "--frameworks":
            chosen, picking = [], True
        elif picking and not a.startswith("-"):
            chosen.extend(x for x in a.split(",") if x)
        else:
            picking = False
            args.append(a)
    if chosen is not None and framework not in chosen:
        session.skip("not among --frameworks %s" % " ".join(chosen))
    return args


def _bench(session, framework):
    args = _selected(session, framework)
    _install(session, framework)
    # The report runs once, after every framework, even if a framework's run fails.
    # Without posargs=[] the report would receive this session's runner options.
    session.notify("report", posargs=[])
    if not any(a.startswith("--preset") for a in args):
        args = ["--preset", "quick"] + args
    session.run("python", "-m", "bench", "run", "--frameworks", framework,
                "--out", os.path.join(LATEST, framework), *args,
                env={"PYTHONPATH": ROOT})


@nox.session
@_params()
def bench(session, framework):
    """Benchmark one framework into results/latest/<framework> (posargs go to `bench run`)."""
    _bench(session, framework)


@nox.session
@_params(exclude=("numpy",))
def parity(session, framework):
    """Learning parity (3 seeds, same budget), with the fastest strategy of the last bench run."""
    args = _selected(session, framework)
    _install(session, framework)
    fastest = os.path.join(LATEST, framework)
    if os.path.isdir(fastest):
        args = ["--fastest-from", fastest] + args
    session.run("python", "-m", "bench", "run", "--preset", "parity", "--frameworks", framework,
                "--out", os.path.join("results", "latest-parity", framework), *args,
                env={"PYTHONPATH": ROOT})


@nox.session
@_params(exclude=CROSS)
def test_framework(session, framework):
    """Equivalence and framework-specific tests for one framework, in its own venv."""
    _install(session, framework, extra=["pytest"])
    specific = "tests/test_%s_specific.py" % {"dynet-autobatch": "dynet"}.get(
        framework, framework.split("-")[0])
    files = ["tests/test_equivalence.py"] + ([specific] if os.path.exists(specific) else [])
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *session.posargs,
                env={"PYTHONPATH": ROOT, "BENCH_FRAMEWORKS": framework,
                     "BENCH_REQUIRE_FRAMEWORKS": framework, "TF_CPP_MIN_LOG_LEVEL": "2"})


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
        session.install(*(CORE + REPORT + TORCH + JAX + TENSORFLOW + ["pytest", "pytest-benchmark"]))
        session.run("python", "-m", "pip", "check")
        frameworks = ",".join(CROSS)
    bench_flags = [] if session.python == "3.8" else ["--benchmark-disable"]
    session.run("python", "-m", "pytest", "-q", "tests", "-p", "no:cacheprovider", *bench_flags,
                *session.posargs,
                env={"PYTHONPATH": ROOT, "BENCH_FRAMEWORKS": frameworks,
                     "BENCH_REQUIRE_FRAMEWORKS": frameworks, "TF_CPP_MIN_LOG_LEVEL": "2"})


@nox.session(python="3.11")
def perf(session):
    """pytest-benchmark per implementation; compare with a saved run (see README)."""
    session.install(*(CORE + TORCH + JAX + TENSORFLOW + ["pytest", "pytest-benchmark"]))
    session.run("python", "-m", "pytest", "-q", "tests/perf", "--benchmark-autosave",
                "--benchmark-columns=min,median,iqr,rounds", *session.posargs,
                env={"PYTHONPATH": ROOT, "BENCH_FRAMEWORKS": ",".join(CROSS),
                     "TF_CPP_MIN_LOG_LEVEL": "2"})


@nox.session(python="3.11")
def lint(session):
    """ruff over the harness, implementations, tests and this file."""
    session.install("ruff")
    session.run("ruff", "check", "bench", "impls", "tests", "noxfile.py")
