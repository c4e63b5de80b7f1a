"""Test-session setup: import path, SST parse cache, and which frameworks this session covers.

BENCH_FRAMEWORKS (comma-separated registry names) restricts the framework
tests to those frameworks: each nox session covers the frameworks of its own
venv, so one framework's tests never need another installed. Unset: all.
"""

import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The SST parse cache of this test session (cells started by tests inherit it): tests never
# read or write the user's cache, and SST is parsed once per session, not once per cell.
if "BENCH_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="bench-test-cache-")
    os.environ["BENCH_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, True)

from bench import registry  # noqa: E402

SELECTED = [f for f in os.environ.get("BENCH_FRAMEWORKS", "").split(",") if f] or \
    list(registry.FRAMEWORKS)

# framework-specific test files -> the registry names they exercise (the framework table's
# `tests`; tests/test_noxfile.py checks that each exists)
SPECIFIC = {}
for _fw in registry.FRAMEWORKS.values():
    if _fw.tests:
        SPECIFIC.setdefault(_fw.tests, []).append(_fw.name)
collect_ignore = [name for name, fws in SPECIFIC.items() if not set(fws) & set(SELECTED)]
