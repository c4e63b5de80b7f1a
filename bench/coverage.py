"""The seed article's framework list (plus JAX), mapped to registry entries.

The coverage table is generated from this list, the registry and the records:
a framework with no registry entry keeps its row with the reason and the
recipe that would install it elsewhere; the install recipe of one with entries
comes from the framework table (``bench.frameworks``), the pins nox installs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from . import registry
from .params import RNN_MODELS, RVNN_MODELS

# name -> (registry frameworks, why not here, recipe elsewhere): the last two only for a
# framework without entries
SEED_FRAMEWORKS = OrderedDict([
    ("Apache Singa", ((), "its only PyPI wheel (singa 3.0.0.dev1, cp36) runs forward, but "
                          "backward fails inside its bindings",
                      "conda install -c nusdbsystem singa (Python 3.6-3.9)")),
    ("Caffe", (("caffe",), "", "")),
    ("Chainer", (("chainer",), "", "")),
    ("Deeplearning4j", ((), "Maven Central is unreachable from this machine",
                        "Maven: org.deeplearning4j:deeplearning4j-core with nd4j-native-platform")),
    ("DyNet", (("dynet", "dynet-autobatch"), "", "")),
    ("Flux", ((), "no Julia here (not in Debian 12; Julia's package server is unreachable)",
              "install Julia 1.x, then `using Pkg; Pkg.add(\"Flux\")`")),
    ("JAX", (("jax",), "", "")),
    ("Keras", (("keras-torch", "keras-jax", "keras-tensorflow"), "", "")),
    ("Microsoft Cognitive Toolkit", (("cntk",), "", "")),
    ("MXNet", (("mxnet",), "", "")),
    ("PaddlePaddle", (("paddle",), "", "")),
    ("PyTorch", (("torch",), "", "")),
    ("TensorFlow", (("tensorflow",), "", "")),
    ("Theano", (("theano", "pytensor"), "", "")),
    ("Torch (Lua)", ((), "no package for it here (no Debian package, and LuaRocks' torch needs "
                         "its own CUDA/BLAS build)", "the torch/distro install script with LuaJIT")),
])


def install_recipe(names: Sequence[str]) -> str:
    """How to install these registry frameworks, from their table entries: the Python,
    the pip steps and what comes from outside pip (entries that install alike: once)."""
    recipes: List[str] = []
    for name in names:
        fw = registry.FRAMEWORKS[name]
        parts = ["Python %s venv" % fw.python]
        if fw.pip:
            parts[0] += ", " + ", then ".join("pip install " + " ".join(step) for step in fw.pip)
        if fw.outside_pip:
            parts.append(fw.outside_pip)
        text = "; ".join(parts)
        if text not in recipes:
            recipes.append(text)
    return "; or ".join(recipes)


def _strategies(recs: List[Dict], models) -> str:
    ok = sorted({r["strategy"] for r in recs if r["model"] in models and r["status"] == "ok"})
    return ", ".join(ok) if ok else "-"


def coverage_rows(records: List[Dict], incomplete: Optional[Dict[str, Tuple[int, int]]] = None
                  ) -> List[Dict]:
    """One row per seed framework: what ran, what was verified and timed, and why not.

    ``incomplete``: {registry framework: (cells recorded, cells planned)} for runs that did
    not finish; such a framework's status starts with "incomplete", never a bare "ok".
    """
    incomplete = incomplete or {}
    rows = []
    for name, (fws, why_not, recipe) in SEED_FRAMEWORKS.items():
        registered = [f for f in fws if f in registry.FRAMEWORKS]
        recs = [r for r in records if r.get("framework") in registered]
        row = _results(name, registered, recs)
        row["status / reason"] = _status(registered, recs, why_not, recipe, incomplete)
        rows.append(row)
    return rows


def _results(name: str, registered: List[str], recs: List[Dict]) -> Dict:
    ok = [r for r in recs if r["status"] == "ok"]
    diffs = [r["verify_max_abs_diff"] for r in ok if r.get("verify_max_abs_diff") is not None]
    return {
        "framework": name,
        "entries": ", ".join(registered) or "-",
        "RNN": _strategies(recs, RNN_MODELS),
        "RvNN": _strategies(recs, RVNN_MODELS),
        "equivalence verified": ("yes, %d cells (max logit diff %.1e)" % (len(diffs), max(diffs))
                                 if diffs else "-"),
        "CPU timed": sum(1 for r in ok if r["device"] == "cpu"),
        "GPU timed": sum(1 for r in ok if r["device"] == "gpu"),
    }


def _status(registered: List[str], recs: List[Dict], why_not: str, recipe: str,
            incomplete: Dict[str, Tuple[int, int]]) -> str:
    """Why a seed framework has no row of results, or how complete its results are."""
    if not registered:
        return "not runnable here: %s. Elsewhere: %s" % (why_not or "no implementation yet", recipe)
    if not recs:
        return "implemented as %s, not in this run. Install: %s" % (
            ", ".join(registered), recipe or install_recipe(registered))
    status = "ok" if any(r["status"] == "ok" for r in recs) else "no cell ran"
    short = ["%s %d of %d planned cells recorded" % (f, *incomplete[f])
             for f in registered if f in incomplete]
    if short:
        status = "incomplete: %s (interrupted or still running)%s" % (
            ", ".join(short), "" if status == "ok" else "; " + status)
    reasons = sorted({"%s: %s" % (r["status"], r["reason"]) for r in recs
                      if r["status"] in ("unavailable", "failed", "timeout", "oom")})
    if reasons:
        status += "; " + "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "")
    return status
