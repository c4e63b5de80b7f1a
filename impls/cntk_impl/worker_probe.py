"""Import probe for the registry: CNTK lives in a Python 3.6 worker, not in this interpreter.

Importing this module runs ``$BENCH_CNTK_PYTHON -c "import cntk"`` once and
raises ImportError, with the reason, when the variable is unset, names no
executable, or CNTK does not import there (a missing ``libmpi.so.12`` on
``LD_LIBRARY_PATH`` is the usual cause). On success ``__version__`` is CNTK's
version as the worker reports it.
"""

import os
import subprocess

PYTHON_ENV = "BENCH_CNTK_PYTHON"
_CHECK = "import sys, numpy, cntk; print('%s %s' % (cntk.__version__, sys.version.split()[0]))"


def _probe():
    path = os.environ.get(PYTHON_ENV, "").strip()
    if not path:
        raise ImportError("%s is not set: CNTK 2.7 runs in a Python 3.6 worker process whose "
                          "interpreter this variable names (nox -s \"test_framework(framework='cntk')\" "
                          "sets it up)" % PYTHON_ENV)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ImportError("%s=%s is not an executable file" % (PYTHON_ENV, path))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        res = subprocess.run([path, "-c", _CHECK], capture_output=True, text=True, timeout=300,
                             env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImportError("the CNTK worker interpreter %s did not run: %s" % (path, exc)) from exc
    if res.returncode != 0:
        lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
        raise ImportError("cntk does not import under %s (LD_LIBRARY_PATH=%s): %s"
                          % (path, os.environ.get("LD_LIBRARY_PATH", ""),
                             lines[-1] if lines else "exit status %d" % res.returncode))
    last = (res.stdout.strip().splitlines() or ["unknown unknown"])[-1].split()
    return last + ["unknown"] * (2 - len(last))


__version__ = _probe()[0]
