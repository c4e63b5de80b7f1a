"""``python -m bench``: list, run, report, compare (and the internal cell/probe commands)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import List, Optional

from . import registry
from .config import PREFERENCE, PRESETS, CellConfig, preset
from .interface import STRATEGIES
from .params import MODELS
from .tasks import check_task_name
from .trees import ParseError


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _multi(values) -> Optional[List[str]]:
    """Accept ``--x a b`` and ``--x a,b``."""
    if not values:
        return None
    out: List[str] = []
    for v in values:
        out.extend(_csv(v))
    return out


def cmd_list(args) -> int:
    """Every registry entry with available / unavailable / not-applicable and why.

    Availability is this machine's (the framework imports); refusals are those
    the frameworks declare statically for ``--device``.
    """
    probes = {}
    for fw in registry.FRAMEWORKS:
        probes[fw] = registry.probe(fw)
    for fw, model, strategy in registry.entries():
        ok, detail = probes[fw]
        if not ok:
            status = "unavailable: %s" % detail
        else:
            static = registry.not_applicable(fw, model, strategy, args.device)
            status = ("not-applicable: %s" % static) if static else "available (%s %s)" % (fw, detail)
        print("%-12s %-9s %-10s %s" % (fw, model, strategy, status))
    return 0


def _cells(args) -> List[CellConfig]:
    frameworks = _multi(args.frameworks)
    if frameworks:
        unknown = [f for f in frameworks if f not in registry.FRAMEWORKS]
        if unknown:
            raise SystemExit("unknown framework(s) %s; known: %s"
                             % (", ".join(unknown), ", ".join(registry.FRAMEWORKS)))
    grid = preset(args.preset, frameworks)
    cells = grid.cells()
    models, strategies = _multi(args.models), _multi(args.strategies)
    tasks, batch_sizes = _multi(args.tasks), _multi(args.batch_sizes)
    for name, values, allowed in (("model", models, MODELS),
                                  ("strategy", strategies, sum(STRATEGIES.values(), ()))):
        for v in values or ():
            if v not in allowed:
                raise SystemExit("unknown %s %r; known: %s" % (name, v, ", ".join(allowed)))
    if models:
        cells = [c for c in cells if c.model in models]
    if strategies:
        cells = [c for c in cells if c.strategy in strategies]
    if tasks:
        # A task the preset has keeps its own cells (the parity preset trains tree
        # models on every SST node but on ListOps roots); any other task is asked
        # for with the cells of the preset's first task.
        present = [c.task for c in cells]
        first = present[0] if present else None
        cells = [c for c in cells if c.task in tasks] + [
            replace(c, task=t) for t in tasks if t not in present for c in cells if c.task == first]
    if batch_sizes:
        # Replace the axis rather than filter it, so any batch size can be asked for.
        cells = [replace(c, batch_size=int(b)) for c in cells for b in batch_sizes]
    seeds = _multi(args.seeds)
    if seeds:
        if not all(s.isdigit() for s in seeds):
            raise SystemExit("--seeds takes whole numbers >= 0, e.g. --seeds 0 1 2")
        cells = [replace(c, seed=int(s)) for c in cells for s in seeds]   # replaced, like batch sizes
    seen, unique = set(), []
    for c in cells:
        if c.key() not in seen:
            seen.add(c.key())
            unique.append(c)
    cells = unique
    overrides = {}
    if args.device:
        overrides["device"] = args.device
    if args.threads:
        overrides["threads"] = args.threads
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.timeout:
        overrides["timeout_s"] = args.timeout
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.spectral_radius is not None:
        overrides["spectral_radius"] = args.spectral_radius
    if overrides:
        try:
            cells = [replace(c, **overrides) for c in cells]
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    if args.fastest_from or args.preset in ("parity", "readout"):
        cells = _keep_fastest(cells, args.fastest_from)
    if not cells:
        raise SystemExit("no cells match the filters")
    for t in sorted({c.task for c in cells}):
        try:
            check_task_name(t)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    return cells


def _keep_fastest(cells: List[CellConfig], run_dir: Optional[str]) -> List[CellConfig]:
    """One strategy per (framework, model): the fastest ok one in RUN_DIR's records.

    Training throughput decides (inference where a cell has none). Without a
    run directory, or for a pair it did not time, the first strategy of
    PREFERENCE that is not statically not-applicable is kept.
    """
    best = {}
    if run_dir:
        from .report import load_run, _median
        records, _ = load_run(run_dir)
        if not records:
            raise SystemExit("--fastest-from %s: no records there" % run_dir)
        for r in records:
            if r.get("status") != "ok":
                continue
            speed = _median(r.get("train_samples_per_s")) or _median(r.get("infer_samples_per_s"))
            key = (r["framework"], r["model"], r["device"])
            if speed and speed > best.get(key, ("", 0.0))[1]:
                best[key] = (r["strategy"], speed)
    out = []
    for c in cells:
        chosen = best.get((c.framework, c.model, c.device), (None,))[0]
        if chosen is None:
            for s in PREFERENCE:
                if s in STRATEGIES[c.family] and not registry.not_applicable(
                        c.framework, c.model, s, c.device):
                    chosen = s
                    break
        if c.strategy == chosen:
            out.append(c)
    return out


def cmd_run(args) -> int:
    from .runner import run
    cells = _cells(args)
    if args.dry_run:
        for c in cells:
            print(c.label())
        return 0
    return run(cells, args.out, resume=args.resume)


def cmd_cell(args) -> int:
    """Internal: run one cell (the runner starts this in a fresh process)."""
    from .cell import run_cell
    cfg = CellConfig.from_dict(json.loads(args.config))
    rec = run_cell(cfg, framework_version=args.framework_version)
    tmp = args.result + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(rec, fh, allow_nan=True)
    os.replace(tmp, args.result)
    return 0


def cmd_probe(args) -> int:
    """Internal: does this framework import here? Prints one JSON line."""
    ok, detail = registry.probe(args.framework)
    print(json.dumps({"ok": ok, "detail": detail}))
    return 0


def cmd_report(args) -> int:
    from .report import update_readme, write_report
    write_report(args.run_dir, args.out or args.run_dir)
    if args.readme:
        update_readme(args.readme, [args.run_dir] + (args.also or []))
    return 0


def cmd_study(args) -> int:
    """A study over the NumPy reference (no framework): ``study gradients``."""
    from . import study_gradients as sg
    models = _multi(args.models) or list(MODELS)
    for m in models:
        if m not in MODELS:
            return _usage("unknown model %r; known: %s" % (m, ", ".join(MODELS)))
    try:
        leaves = [int(n) for n in _multi(args.leaves)] if args.leaves else list(sg.DEFAULT_LEAVES)
    except ValueError:
        return _usage("--leaves takes whole numbers, e.g. --leaves 8 32 128 512")
    checks = [(bool(leaves) and min(leaves) >= 2, "--leaves: every length must be >= 2"),
              (args.train_steps >= 0, "--train-steps must be >= 0"),
              (args.hidden >= 1 and args.embed_dim >= 1, "--hidden and --embed-dim must be >= 1"),
              (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.lr > 0, "--lr must be > 0"),
              (args.sst_examples >= 0, "--sst-examples must be >= 0 (0: every dev sentence)"),
              (args.probe_examples >= 1, "--probe-examples must be >= 1")]
    for ok, message in checks:
        if not ok:
            return _usage(message)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _usage("--out %s exists and is not a directory" % args.out)
    from .environment import describe
    # taken first: the commit and load the study started under, not those it ended under
    env = describe({}, 1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0 = time.time()
    rows, meta = sg.run(models=models, leaves=leaves, hidden=args.hidden, embed_dim=args.embed_dim,
                        train_steps=args.train_steps, lr=args.lr, batch_size=args.batch_size,
                        seed=args.seed, sst_examples=args.sst_examples,
                        probe_examples=args.probe_examples, progress=sg.stderr_progress)
    meta["env"] = env
    meta["wall_s"] = round(time.time() - t0, 1)
    meta["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        paths = sg.write_outputs(args.out, rows, meta)
    except OSError as exc:   # a full disk or a read-only folder: earlier outputs stay whole
        sys.stderr.write("error: could not write the study to %s: %s\n" % (args.out, exc))
        return 1
    print(sg.format_summary(rows))
    print("wrote %s" % ", ".join(paths))
    return 0


def _usage(message: str) -> int:
    sys.stderr.write("error: %s\n" % message)
    return 2


def cmd_compare(args) -> int:
    from .compare import main as compare_main
    return compare_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="RNN vs RvNN benchmarks across frameworks")
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("list", help="every (framework, model, strategy) and whether it can run here")
    s.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="for refusals that only one device has (default: cpu)")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("run", help="run a preset's cells, each in its own process")
    s.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    s.add_argument("--frameworks", nargs="+", help="e.g. torch jax (default: the preset's)")
    s.add_argument("--models", nargs="+", help="elman lstm rvnn treelstm")
    s.add_argument("--strategies", nargs="+", help="loop fused compiled recursive levels")
    s.add_argument("--tasks", nargs="+", help="sst sst2 listops synth-SHAPE-N")
    s.add_argument("--batch-sizes", nargs="+")
    s.add_argument("--seeds", nargs="+", help="replace the preset's seeds, e.g. --seeds 0")
    s.add_argument("--device", choices=["cpu", "gpu"])
    s.add_argument("--threads", type=int)
    s.add_argument("--repeats", type=int)
    s.add_argument("--timeout", type=int, help="seconds per cell")
    s.add_argument("--epochs", type=float,
                   help="training budget for accuracy (the parity preset's is 3; 0 measures none)")
    s.add_argument("--spectral-radius", type=float,
                   help="readout cells: radius of the frozen recurrent/composition blocks")
    s.add_argument("--out", default=os.path.join("results", "latest"))
    s.add_argument("--resume", action="store_true", help="skip cells already in DIR/records.jsonl")
    s.add_argument("--fastest-from", metavar="RUN_DIR",
                   help="keep one strategy per framework and model: the fastest in that run")
    s.add_argument("--dry-run", action="store_true", help="print the cells and stop")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("report", help="report.md, summary.csv and plots from a run directory")
    s.add_argument("run_dir")
    s.add_argument("--out")
    s.add_argument("--readme", help="also rewrite this README's generated tables from the run")
    s.add_argument("--also", nargs="+", help="more run directories for the README tables")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("compare", help="regression check of NEW against BASE")
    s.add_argument("base")
    s.add_argument("new")
    s.add_argument("--threshold", default="10%")
    s.add_argument("--force", action="store_true")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("study", help="studies over the NumPy reference: gradients (gradient flow)")
    s.add_argument("name", choices=("gradients",))
    s.add_argument("--out", default=os.path.join("results", "latest-study"),
                   help="folder for gradients.jsonl / .csv / .json (default: results/latest-study)")
    s.add_argument("--models", nargs="+", help="elman lstm rvnn treelstm (default: all)")
    s.add_argument("--leaves", nargs="+", help="synthetic input lengths (default: 8 32 128 512)")
    s.add_argument("--train-steps", type=int, default=342,
                   help="Adam steps on SST before the 'trained' probe (default 342: one epoch)")
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--batch-size", type=int, default=25)
    s.add_argument("--hidden", type=int, default=150)
    s.add_argument("--embed-dim", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sst-examples", type=int, default=0,
                   help="SST dev sentences probed (default 0: all)")
    s.add_argument("--probe-examples", type=int, default=8,
                   help="synthetic sequences per length (default 8)")
    s.set_defaults(fn=cmd_study)

    s = sub.add_parser("cell", help=argparse.SUPPRESS)
    s.add_argument("--config", required=True)
    s.add_argument("--result", required=True)
    s.add_argument("--framework-version")
    s.set_defaults(fn=cmd_cell)

    s = sub.add_parser("probe", help=argparse.SUPPRESS)
    s.add_argument("framework", choices=list(registry.FRAMEWORKS))
    s.set_defaults(fn=cmd_probe)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except ParseError as exc:
        sys.stderr.write("error: %s\n" % exc)
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; finished cells are in the records file\n")
        return 130
