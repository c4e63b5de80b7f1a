"""The one registry: (framework, model, strategy) -> implementation class.

Explicit, greppable, lazily imported. Importing ``bench`` never imports a
framework; a framework that is missing or broken only disables its own entries.
To add a framework: add an ``impls/<name>_impl/`` package with ``rnn.py``
(class ``RNN``) and ``rvnn.py`` (class ``RvNN``), and its entry in the framework
table, ``bench/frameworks.py`` (plain data that noxfile.py reads too).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from .frameworks import ENTRIES, Framework
from .interface import STRATEGIES, Implementation, Unavailable, not_applicable_reason
from .params import MODELS, family

FRAMEWORKS: "OrderedDict[str, Framework]" = OrderedDict((f.name, f) for f in ENTRIES)

# Test-only entries, registered only when BENCH_TEST_ENTRIES=1 (tests and the `ab` benchmark):
# never in a preset, `bench list`, or nox's framework sessions.
TEST_ENTRIES_ENV = "BENCH_TEST_ENTRIES"
TEST_ONLY = (Framework("numpy-slowed", "impls.slowed_impl", "numpy"),)
if os.environ.get(TEST_ENTRIES_ENV) == "1":
    FRAMEWORKS.update((f.name, f) for f in TEST_ONLY)


def entries(frameworks=None, models=None, strategies=None) -> List[Tuple[str, str, str]]:
    """Every registered (framework, model, strategy), optionally filtered."""
    out = []
    for fw in frameworks or FRAMEWORKS:
        if fw not in FRAMEWORKS:
            raise ValueError("unknown framework %r (known: %s)" % (fw, ", ".join(FRAMEWORKS)))
        for model in models or MODELS:
            for strategy in STRATEGIES[family(model)]:
                if strategies is None or strategy in strategies:
                    out.append((fw, model, strategy))
    return out


def not_applicable(framework: str, model: str, strategy: str,
                   device: Optional[str] = None) -> Optional[str]:
    """The static reason a framework cannot express a cell, from its package's tables.

    ``NOT_APPLICABLE`` holds the package's refusals; a package shared by several
    entries (Keras on three backends) adds ``NOT_APPLICABLE_BY_ENTRY[entry]``.
    Without a device, refusals for one device only are not reported.
    """
    try:
        pkg = importlib.import_module(FRAMEWORKS[framework].package)
    except ImportError:
        return None  # the cell itself will fail and record why
    table: Dict = dict(getattr(pkg, "NOT_APPLICABLE", {}))
    table.update(getattr(pkg, "NOT_APPLICABLE_BY_ENTRY", {}).get(framework, {}))
    return not_applicable_reason(table, model, strategy, device)


def probe(framework: str) -> Tuple[bool, str]:
    """(True, version) if the framework imports here, else (False, why not)."""
    fw = FRAMEWORKS[framework]
    try:
        found = importlib.util.find_spec(fw.package) is not None
    except ImportError:
        found = False
    if not found:
        return False, "no implementation package %s in this checkout" % fw.package
    # The entry's environment applies during the import only: a probe must not
    # change what later code in this process (or its children) sees.
    saved = {name: os.environ.get(name) for name, _ in fw.env}
    for name, value in fw.env:
        os.environ.setdefault(name, value)
    version = "unknown"
    try:
        for module in fw.probe.split(","):  # the last module named gives the version
            try:
                mod = importlib.import_module(module)
            except Exception as exc:  # a broken install is as unavailable as a missing one
                return False, "%s does not import: %s" % (module, _one_line(exc))
            version = str(getattr(mod, "__version__", "unknown"))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if fw.dist:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(fw.dist)
        except Exception:  # metadata missing: keep __version__
            pass
    return True, version


def load(framework: str, model: str) -> type:
    """The implementation class for a model (its strategies are constructor arguments)."""
    fw = FRAMEWORKS[framework]
    try:
        module = importlib.import_module("%s.%s" % (fw.package, family(model)))
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name.startswith(fw.package) or fw.package.startswith(exc.name)):
            raise Unavailable("no implementation package %s in this checkout" % fw.package) from exc
        raise
    cls = getattr(module, "RNN" if family(model) == "rnn" else "RvNN")
    if not issubclass(cls, Implementation):
        raise TypeError("%s is not an Implementation" % cls)
    return cls


def _one_line(exc: BaseException) -> str:
    text = ("%s: %s" % (type(exc).__name__, exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
