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
CORE = ["numpy", "threadpoolctl", "psutil"]
REPORT = ["pandas", "matplotlib"]

# framework -> (python, packages)
FRAMEWORKS = {
    "numpy": ("3.11", []),
    "torch": ("3.11", TORCH),
    "jax": ("3.11", JAX),
    "tensorflow": ("3.11", TENSORFLOW),
}


def _bench(session, framework):
    session.install(*(CORE + FRAMEWORKS[framework][1]))
    # The report runs once, after every framework, even if a framework's run fails.
    session.notify("report")
    args = session.posargs or ["--preset", "quick"]
    session.run("python", "-m", "bench", "run", "--frameworks", framework,
                "--out", os.path.join(LATEST, framework), *args,
                env={"PYTHONPATH": ROOT})


@nox.session
@nox.parametrize("python,framework", [(py, fw) for fw, (py, _) in FRAMEWORKS.items()],
                 ids=["framework='%s'" % fw for fw in FRAMEWORKS])
def bench(session, framework):
    """Benchmark one framework into results/latest/<framework> (posargs go to `bench run`)."""
    _bench(session, framework)


@nox.session
@nox.parametrize("python,framework", [(py, fw) for fw, (py, _) in FRAMEWORKS.items() if fw != "numpy"],
                 ids=["framework='%s'" % fw for fw in FRAMEWORKS if fw != "numpy"])
def parity(session, framework):
    """Learning parity (3 seeds, same budget), with the fastest strategy of the last bench run."""
    session.install(*(CORE + FRAMEWORKS[framework][1]))
    fastest = os.path.join(LATEST, framework)
    args = ["--fastest-from", fastest] if os.path.isdir(fastest) else []
    session.run("python", "-m", "bench", "run", "--preset", "parity", "--frameworks", framework,
                "--out", os.path.join("results", "latest-parity", framework), *args,
                *session.posargs, env={"PYTHONPATH": ROOT})


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
        required = "numpy"
    else:
        session.install(*(CORE + REPORT + TORCH + JAX + TENSORFLOW + ["pytest", "pytest-benchmark"]))
        session.run("python", "-m", "pip", "check")
        required = "numpy,torch,jax,tensorflow"
    bench_flags = [] if session.python == "3.8" else ["--benchmark-disable"]
    session.run("python", "-m", "pytest", "-q", "tests", "-p", "no:cacheprovider", *bench_flags,
                *session.posargs,
                env={"PYTHONPATH": ROOT, "BENCH_REQUIRE_FRAMEWORKS": required,
                     "TF_CPP_MIN_LOG_LEVEL": "2"})


@nox.session(python="3.11")
def perf(session):
    """pytest-benchmark per implementation; compare with a saved run (see README)."""
    session.install(*(CORE + TORCH + JAX + TENSORFLOW + ["pytest", "pytest-benchmark"]))
    session.run("python", "-m", "pytest", "-q", "tests/perf", "--benchmark-autosave",
                "--benchmark-columns=min,median,iqr,rounds", *session.posargs,
                env={"PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"})


@nox.session(python="3.11")
def lint(session):
    """ruff over the harness, implementations, tests and this file."""
    session.install("ruff")
    session.run("ruff", "check", "bench", "impls", "tests", "noxfile.py")
