"""Run the mutation table (tests/mutants/table.py) against the verification gate.

For each mutation and preset: copy ``bench/`` and ``impls/`` to a temporary
directory, apply the mutation there (its anchor must be found exactly once),
and run each affected cell through the real cell path (``python -m bench cell``
with the copy on PYTHONPATH) at the preset's sizes. Caught means the record
says ``failed`` with ``not equivalent``. Each cell also runs once unmutated, in
its own copy, and must pass the gate, so that a gate failing everything cannot
look like a gate catching everything.

    python tests/mutants/driver.py                   # every mutation, smoke and quick
    python tests/mutants/driver.py --presets smoke --only torch-loop-padding-leak
    python tests/mutants/driver.py --list            # the table only

Exit status 0 when every baseline passed and every mutation was caught, 1 otherwise.
The unmutated cells run with repeats=1, no warm-up pass and one latency call:
the gate does not depend on those fields, and it is all that runs of a mutant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from bench import registry  # noqa: E402
from bench.config import CellConfig, preset  # noqa: E402
from bench.environment import thread_env  # noqa: E402
from mutants.table import MUTATIONS, Mutation  # noqa: E402

PRESETS = ("smoke", "quick")
CELL_TIMEOUT_S = 600


class MutationError(Exception):
    """The mutation cannot be applied as written (its anchor is missing or not unique)."""


def copy_tree(dest: str, root: str = ROOT) -> str:
    """``bench/`` and ``impls/`` of ``root`` under ``dest`` (no caches)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for top in ("bench", "impls"):
        shutil.copytree(os.path.join(root, top), os.path.join(dest, top), ignore=ignore)
    return dest


def apply(mutation: Mutation, tree: str) -> None:
    """Replace the anchor in ``tree``'s copy of the file; refuse a missing or repeated anchor."""
    path = os.path.join(tree, mutation.file)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    found = text.count(mutation.old)
    if found != 1:
        raise MutationError("%s: anchor found %d times in %s (expected once): %r"
                            % (mutation.name, found, mutation.file, mutation.old[:80]))
    if mutation.new == mutation.old:
        raise MutationError("%s: the new text equals the old one" % mutation.name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text.replace(mutation.old, mutation.new))


def cell_config(spec: str, preset_name: str, overrides: Iterable = ()) -> CellConfig:
    """The preset's cell for ``framework/model/strategy``, cut to what the gate needs."""
    fw, model, strategy = spec.split("/")
    base = preset(preset_name).base
    cfg = replace(base, framework=fw, model=model, strategy=strategy, repeats=1, warmup_passes=0,
                  latency_samples=1, timeout_s=CELL_TIMEOUT_S)
    return replace(cfg, **dict(overrides))


def run_cell(tree: str, cfg: CellConfig) -> Dict:
    """Run one cell in a fresh interpreter on ``tree``'s code; the record (or a failure stub)."""
    fd, result = tempfile.mkstemp(prefix="mutant-cell-", suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    env.update(thread_env(cfg.threads))
    env.update(dict(registry.FRAMEWORKS[cfg.framework].env))
    env["PYTHONPATH"] = tree
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, "-m", "bench", "cell", "--config", json.dumps(cfg.to_dict()),
           "--result", result]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=cfg.timeout_s)
        with open(result, encoding="utf-8") as fh:
            text = fh.read()
        rec = json.loads(text) if text.strip() else {
            "status": "crashed", "reason": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    except subprocess.TimeoutExpired:
        rec = {"status": "timeout", "reason": "no result after %d s" % cfg.timeout_s}
    finally:
        os.unlink(result)
    rec["driver_s"] = time.perf_counter() - t0
    return rec


def caught(rec: Dict) -> bool:
    return rec.get("status") == "failed" and rec.get("reason", "").startswith("not equivalent")


def run(mutations: Sequence[Mutation], presets: Sequence[str], out=sys.stdout,
        baseline: bool = True, code: str = ROOT) -> List[Dict]:
    """Baselines, then every mutation x preset x cell; one result row each, printed as it lands.
    ``code``: the directory whose ``bench/`` and ``impls/`` are copied (default: this checkout)."""
    rows: List[Dict] = []
    base_dir = tempfile.mkdtemp(prefix="mutants-")
    try:
        clean = copy_tree(os.path.join(base_dir, "clean"), code)
        if baseline:
            cells = sorted({(c, m.overrides, p) for m in mutations for c in m.cells for p in presets},
                           key=str)
            for spec, overrides, p in cells:
                rec = run_cell(clean, cell_config(spec, p, overrides))
                row = {"mutation": "(none)", "cell": spec, "preset": p, "overrides": overrides,
                       "status": rec.get("status"), "ok": rec.get("status") == "ok",
                       "reason": rec.get("reason", ""), "seconds": rec["driver_s"]}
                rows.append(row)
                _print_row(row, out)
        for k, m in enumerate(mutations):
            tree = copy_tree(os.path.join(base_dir, "m%d" % k), code)
            apply(m, tree)
            for p in presets:
                for spec in m.cells:
                    rec = run_cell(tree, cell_config(spec, p, m.overrides))
                    row = {"mutation": m.name, "kind": m.kind, "cell": spec, "preset": p,
                           "status": rec.get("status"), "ok": caught(rec),
                           "reason": rec.get("reason", ""), "seconds": rec["driver_s"]}
                    rows.append(row)
                    _print_row(row, out)
            shutil.rmtree(tree, ignore_errors=True)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    return rows


def _print_row(row: Dict, out) -> None:
    if row["mutation"] == "(none)":
        verdict = "baseline ok" if row["ok"] else "BASELINE NOT OK"
    else:
        verdict = "caught" if row["ok"] else "NOT CAUGHT"
    out.write("%-38s %-26s %-6s %-15s %5.1fs  %s\n" % (row["mutation"], row["cell"], row["preset"],
                                                       verdict, row["seconds"],
                                                       row["reason"][:110]))
    out.flush()


def table_markdown(rows: Optional[List[Dict]] = None) -> str:
    """The mutation table as Markdown (with a 'caught' column per preset when rows are given)."""
    presets = sorted({r["preset"] for r in rows or () if r["mutation"] != "(none)"},
                     key=list(PRESETS).index)
    head = "| mutation | cell | bug | " + "".join("caught at %s | " % p for p in presets)
    lines = [head.rstrip(), "|" + "---|" * (3 + len(presets))]
    for m in MUTATIONS:
        cols = ["`%s`" % m.name, ", ".join(m.cells), m.description]
        for p in presets:
            hits = [r for r in rows if r["mutation"] == m.name and r["preset"] == p]
            cols.append("yes" if hits and all(r["ok"] for r in hits) else "NO" if hits else "-")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    ap.add_argument("--frameworks", nargs="+", help="run the mutations of these frameworks only")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated cells")
    ap.add_argument("--list", action="store_true", help="print the table and exit")
    ap.add_argument("--markdown", metavar="FILE", help="also write the result table here")
    ap.add_argument("--code", metavar="DIR", default=ROOT,
                    help="copy bench/ and impls/ from DIR instead of this checkout (e.g. an older "
                         "commit's, to see which mutations its gate let through)")
    args = ap.parse_args(argv)
    chosen = list(MUTATIONS)
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            ap.error("unknown mutation(s): %s" % ", ".join(sorted(unknown)))
        chosen = [m for m in chosen if m.name in args.only]
    if args.frameworks:
        chosen = [m for m in chosen if m.framework in args.frameworks]
    if args.list:
        print(table_markdown())
        return 0
    if not chosen:
        ap.error("no mutation matches")
    t0 = time.perf_counter()
    rows = run(chosen, args.presets, baseline=not args.no_baseline, code=args.code)
    text = table_markdown(rows)
    print("\n" + text)
    bad = [r for r in rows if not r["ok"]]
    print("\n%d runs in %.0f s: %d mutation runs caught of %d, %d baselines ok of %d"
          % (len(rows), time.perf_counter() - t0,
             sum(r["ok"] for r in rows if r["mutation"] != "(none)"),
             sum(r["mutation"] != "(none)" for r in rows),
             sum(r["ok"] for r in rows if r["mutation"] == "(none)"),
             sum(r["mutation"] == "(none)" for r in rows)))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
