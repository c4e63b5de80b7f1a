"""The framework table: every framework entry the benchmark knows, as plain data.

This is the one source. ``bench.registry`` makes its entries from it;
``noxfile.py`` takes each framework's Python and pip steps from it, loading this
file by path, because nox's own venv has nothing but nox: so this module imports
the standard library alone, and nothing from ``bench``. ``bench.coverage`` derives
its install recipes from it, ``tests/conftest.py`` its framework-specific test
files, and a test checks ``pyproject.toml``'s extras against it.
"""

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Framework:
    name: str        # name on the command line and in records
    package: str     # impls sub-package
    probe: str       # module(s), comma-separated, whose import proves the framework is installed
    env: Tuple[Tuple[str, str], ...] = ()  # environment set before the cell's process starts
    dist: str = ""   # distribution whose metadata version is exact where __version__ is not
    python: str = "3.11"                  # the Python of its nox venv
    pip: Tuple[Tuple[str, ...], ...] = ()  # pip install steps in that venv, in order, one call each
    tests: str = ""  # its framework-specific test file in tests/ ("": none)
    outside_pip: str = ""  # what it needs from outside pip (noxfile.py sets it up)


# Pins that several entries share. torch: exactly 2.13.0 (a CPU wheel on this machine kind;
# an unpinned torch pulls a multi-GB CUDA build).
TORCH = ("torch==2.13.0",)
JAX = ("jax[cpu]==0.10.2", "optax==0.2.8")
TENSORFLOW = ("tensorflow-cpu==2.21.0",)
KERAS = ("keras==3.15.1",)
DYNET = ("dynet==2.1.2", "numpy<1.25")
# What every venv gets beside its framework: the harness's own needs (thread caps, machine load).
CORE = ("numpy", "threadpoolctl", "psutil")
REPORT = ("pandas", "matplotlib")
RAY = ("ray==2.60.0",)   # `bench run --executor ray`

# CNTK 2.7 publishes wheels for CPython <= 3.6 only, so it runs in a worker process with a
# venv of its own (impls/cntk_impl/fetch_deps.sh makes it); the host side needs only the core.
CNTK_WORKER_PYTHON = "3.6"
CNTK_WORKER_PINS = ("cntk==2.7.post2", "numpy==1.19.5", "scipy==1.5.4")

_QUIET_TF = ("TF_CPP_MIN_LOG_LEVEL", "2")

ENTRIES = (
    Framework("numpy", "impls.numpy_impl", "numpy"),
    # Inductor's on-disk caches would make compile_s measure a warm cache from an earlier cell.
    Framework("torch", "impls.torch_impl", "torch",
              env=(("TORCHINDUCTOR_FX_GRAPH_CACHE", "0"), ("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")),
              pip=(TORCH,), tests="test_torch_specific.py"),
    Framework("jax", "impls.jax_impl", "jax", pip=(JAX,), tests="test_jax_specific.py"),
    Framework("tensorflow", "impls.tf_impl", "tensorflow", env=(_QUIET_TF,), pip=(TENSORFLOW,),
              tests="test_tf_specific.py"),
    # One Keras 3 implementation, three backends (chosen before keras is imported).
    Framework("keras-torch", "impls.keras_impl", "torch,keras", env=(("KERAS_BACKEND", "torch"),),
              pip=(KERAS + TORCH,), tests="test_keras_specific.py"),
    Framework("keras-jax", "impls.keras_impl", "jax,keras", env=(("KERAS_BACKEND", "jax"),),
              pip=(KERAS + JAX,), tests="test_keras_specific.py"),
    Framework("keras-tensorflow", "impls.keras_impl", "tensorflow,keras",
              env=(("KERAS_BACKEND", "tensorflow"), _QUIET_TF), pip=(KERAS + TENSORFLOW,),
              tests="test_keras_specific.py"),
    Framework("paddle", "impls.paddle_impl", "paddle", env=(("GLOG_minloglevel", "2"),),
              pip=(("paddlepaddle==3.3.1",),), tests="test_paddle_specific.py"),
    # PyTensor and Theano run one graph code base: their checks share one file.
    Framework("pytensor", "impls.pytensor_impl", "pytensor", pip=(("pytensor==3.0.7",),),
              tests="test_symbolic_specific.py"),
    Framework("theano", "impls.theano_impl", "theano", python="3.10",
              pip=(("Theano==1.0.5", "numpy<1.22", "scipy<1.8"),), tests="test_symbolic_specific.py"),
    # Chainer's sdist needs an old setuptools and no build isolation.
    Framework("chainer", "impls.chainer_impl", "chainer",
              pip=(("setuptools<70", "wheel"), ("--no-build-isolation", "chainer==7.8.1"), ("numpy<2",)),
              tests="test_chainer_specific.py"),
    Framework("mxnet", "impls.mxnet_impl", "mxnet", pip=(("mxnet==1.9.1", "numpy<1.24"),),
              tests="test_mxnet_specific.py"),
    # DyNet publishes wheels for CPython 3.6-3.8 only; its autobatching is a process-wide
    # switch, so it is its own entry.
    Framework("dynet", "impls.dynet_impl", "dynet", env=(("BENCH_DYNET_AUTOBATCH", "0"),),
              dist="dyNET", python="3.8", pip=(DYNET,), tests="test_dynet_specific.py"),
    Framework("dynet-autobatch", "impls.dynet_impl", "dynet",
              env=(("BENCH_DYNET_AUTOBATCH", "1"),), dist="dyNET", python="3.8", pip=(DYNET,),
              tests="test_dynet_specific.py"),
    # CNTK (Python 3.6 only) runs in a worker process behind pipes.
    Framework("cntk", "impls.cntk_impl", "impls.cntk_impl.worker_probe",
              tests="test_cntk_specific.py",
              outside_pip="Debian 12's libopenmpi3 and a Python %s worker venv with %s "
                          "(impls/cntk_impl/fetch_deps.sh)"
                          % (CNTK_WORKER_PYTHON, " ".join(CNTK_WORKER_PINS))),
    # Caffe 1.0 is Debian 11's python3-caffe (CPU, built for Python 3.9), imported in a
    # Python 3.9 venv; pip supplies the Python modules it imports.
    Framework("caffe", "impls.caffe_impl", "caffe", env=(("GLOG_minloglevel", "2"),), python="3.9",
              pip=(("numpy<1.24", "protobuf<3.21", "scikit-image<0.20", "scipy<1.12", "six"),),
              tests="test_caffe_specific.py",
              outside_pip="Debian 11's python3-caffe (CPU) (impls/caffe_impl/fetch_debs.sh)"),
)

# The default `nox -s bench` (the reference and the three frameworks most users choose
# between), and the frameworks the tests-3.11 session installs together in one venv.
CORE_SET = ("numpy", "torch", "jax", "tensorflow")


def pins(names) -> Tuple[str, ...]:
    """Every pip requirement of these frameworks' steps, in order (for one shared venv)."""
    by_name = {fw.name: fw for fw in ENTRIES}
    return tuple(req for name in names for step in by_name[name].pip for req in step)
