"""``python -m bench``: list, run, report, compare (and the internal cell/probe commands).

Every option is checked before any work: a bad value is one line on stderr
and exit 2 (the argument types below raise ``ArgumentTypeError``; refusals
raise ``UsageError``). Tracebacks only with ``--debug``; an unexpected error
is one line and exit 1. Exit codes of each command: see ``main`` and the
README's "Failure semantics".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from typing import Callable, List, Optional

from . import registry
from .config import MIN_REPEATS, PRESETS, CellConfig, UsageError, preset
from .fastest import keep_fastest
from .interface import STRATEGIES
from .params import MODELS
from .records import RECORDS, EnvironmentProblem, LockHeld, RecordsError, occupied, read_records
from .tasks import check_task_name, train_size
from .trees import ParseError

INTERRUPTED = 130
_WHOLE = re.compile(r"[+-]?[0-9]+")   # ASCII digits only: int() also takes "1_0" and "\u0663"

# Upper bounds catch typos and values that overflow a timer, not real needs.
MAX_THREADS, MAX_REPEATS, MAX_BATCH = 4096, 100000, 10 ** 7
MAX_TIMEOUT_S = 30 * 24 * 3600
MAX_EPOCHS = 10 ** 6


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit 2), without the usage block."""

    def error(self, message):
        self.exit(2, "error: %s: %s (see %s --help)\n" % (self.prog, message, self.prog))


def _positive_int(what: str, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        raw = text.strip()
        if not _WHOLE.fullmatch(raw):
            raise argparse.ArgumentTypeError("%s must be a whole number, not %r" % (what, text))
        value = int(raw)
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError("%s must be between 1 and %d, not %s"
                                             % (what, maximum, raw))
        return value
    return parse


def _int_list(what: str, maximum: int) -> Callable[[str], List[int]]:
    one = _positive_int(what, maximum)

    def parse(text: str) -> List[int]:
        return [one(t) for t in _items(text, what)]
    return parse


def _whole_list(what: str, minimum: int, maximum: int) -> Callable[[str], List[int]]:
    """Whole numbers in [minimum, maximum] (``_int_list`` starts at 1; seeds start at 0)."""
    def parse(text: str) -> List[int]:
        out = []
        for raw in _items(text, what):
            if not _WHOLE.fullmatch(raw) or not minimum <= int(raw) <= maximum:
                raise argparse.ArgumentTypeError("%s must be a whole number from %d to %d, not %r"
                                                 % (what, minimum, maximum, raw))
            out.append(int(raw))
        return out
    return parse


def _positive_float(what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%s must be a number, not %r" % (what, text)) from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError("%s must be a finite number > 0, not %r" % (what, text))
        return value
    return parse


def _number(what: str, ok: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """A float option: finite, and ``ok``; else one line saying it must be ``wanted``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%s must be a number, not %r" % (what, text)) from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError("%s must be %s, not %r" % (what, wanted, text))
        return value
    return parse


def _seconds(what: str) -> Callable[[str], float]:
    return _number(what, lambda v: 0 <= v < 3600, "from 0 to 3600 seconds")


_weight_decay = _number("weight decay", lambda v: v >= 0, "a finite number >= 0")


def _whole(what: str, minimum: int, maximum: int) -> Callable[[str], int]:
    one = _whole_list(what, minimum, maximum)

    def parse(text: str) -> int:
        values = one(text)
        if len(values) != 1:
            raise argparse.ArgumentTypeError("%s takes one number, not %r" % (what, text))
        return values[0]
    return parse


def _epochs(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("epochs must be a number, not %r" % text) from None
    if not math.isfinite(value) or not 0 <= value <= MAX_EPOCHS:
        raise argparse.ArgumentTypeError("epochs must be between 0 (no accuracy budget) and %d, "
                                         "not %r" % (MAX_EPOCHS, text))
    return value


def _items(text: str, what: str) -> List[str]:
    """``a,b`` -> [a, b]; an empty list or an empty item is refused, never read as 'the default'."""
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("empty %s list %r" % (what, text))
    if not all(items):
        raise argparse.ArgumentTypeError("empty %s name in %r" % (what, text))
    return items


def _names(what: str, known) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = _items(text, what)
        for item in items:
            if callable(known):
                try:
                    known(item)
                except ValueError as exc:
                    raise argparse.ArgumentTypeError(str(exc)) from None
            elif item not in known:
                raise argparse.ArgumentTypeError("unknown %s %r; known: %s"
                                                 % (what, item, ", ".join(known)))
        return items
    return parse


def _threshold(text: str):
    from .compare import Threshold
    try:
        return Threshold.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _address(text: str) -> str:
    """HOST:PORT of a Ray head (its GCS port), or ``auto``."""
    raw = text.strip()
    if raw == "auto":
        return raw
    host, sep, port = raw.rpartition(":")
    if not sep or not host or any(c.isspace() for c in host) or not _WHOLE.fullmatch(port) \
            or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError("--address takes HOST:PORT (the Ray head's port, e.g. "
                                         "127.0.0.1:6379) or auto, not %r" % text)
    return raw


def _node_python(text: str):
    from .cluster import parse_node_pythons
    try:
        parse_node_pythons([text])
        return text
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flat(values) -> Optional[list]:
    """``--x a b`` and ``--x a,b`` (each token parsed to a list) -> one list; None if not given."""
    if values is None:
        return None
    return [v for group in values for v in group]


def _check_out_dir(path: str, create: bool) -> None:
    """--out must be a directory we can write: refuse a file, a path under a file, read-only."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError("--out %s is a file, not a directory" % path)
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError("--out %s lies under a file (%s)" % (path, parent))
    if not create:
        return
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError("--out %s is not writable: %s" % (path, exc.strerror or exc)) from None


def cmd_list(args) -> int:
    """What can run here: one line per framework (``--verbose``: one per entry, with reasons).

    Availability is this machine's: each framework is imported in its own process, with
    the environment its cells get (as the runner probes it), so one framework's import
    cannot change another's answer and their logs stay out of the listing. Refusals are
    those the frameworks declare statically for ``--device``.
    """
    from .runner import iter_probes
    probes = ((fw, (bool(info.get("ok")), str(info.get("detail", ""))))
              for fw, info in iter_probes(registry.FRAMEWORKS))
    if args.verbose:
        probes = dict(probes)
        for fw, model, strategy in registry.entries():
            ok, detail = probes[fw]
            if not ok:
                status = "unavailable: %s" % detail
            else:
                static = registry.not_applicable(fw, model, strategy, args.device)
                status = ("not-applicable: %s" % static) if static else "available (%s %s)" % (fw, detail)
            print("%-16s %-9s %-10s %s" % (fw, model, strategy, status))
        return 0
    for fw, (ok, detail) in probes:
        if not ok:
            print("%-16s %-11s unavailable: %s" % (fw, "-", detail), flush=True)
            continue
        entries = registry.entries([fw])
        refused: "dict[str, list]" = {}
        for _, model, strategy in entries:
            if registry.not_applicable(fw, model, strategy, args.device):
                refused.setdefault(strategy, []).append(model)
        runs = len(entries) - sum(len(m) for m in refused.values())
        text = "all %d entries" % len(entries) if not refused else "%d of %d entries; not applicable: %s" % (
            runs, len(entries), ", ".join("%s (%s)" % (st, " ".join(ms)) for st, ms in refused.items()))
        print("%-16s %-11s %s" % (fw, detail, text), flush=True)
    sys.stderr.write("(not applicable: on --device %s; `list --verbose` gives every entry with its "
                     "reason)\n" % args.device)
    return 0


def select_cells(args) -> List[CellConfig]:
    """The cells ``run`` and ``ab`` ask for: the preset's, filtered, retargeted, overridden,
    one strategy per model where the preset or --fastest-from says so, then validated."""
    cells = preset(args.preset, _flat(args.frameworks)).cells()
    cells = _filtered(cells, _flat(args.models), _flat(args.strategies))
    cells = _retargeted(cells, _flat(args.tasks), _flat(args.batch_sizes), _flat(args.seeds))
    cells = _overridden(cells, args)
    if args.fastest_from or args.preset in ("parity", "readout"):
        cells = keep_fastest(cells, args.fastest_from, args.skip_corrupt)
    _validate(cells)
    return cells


def _filtered(cells: List[CellConfig], models, strategies) -> List[CellConfig]:
    if models:
        cells = [c for c in cells if c.model in models]
    if strategies:
        cells = [c for c in cells if c.strategy in strategies]
    return cells


def _retargeted(cells: List[CellConfig], tasks, batch_sizes, seeds) -> List[CellConfig]:
    """Tasks, batch sizes and seeds asked for on the command line, each cell once."""
    if tasks:
        cells = _with_tasks(cells, tasks)
    if batch_sizes:
        # Replace the axis rather than filter it, so any batch size can be asked for.
        cells = [replace(c, batch_size=b) for c in cells for b in batch_sizes]
    if seeds:
        cells = [replace(c, seed=s) for c in cells for s in seeds]   # replaced, like batch sizes
    seen, unique = set(), []
    for c in cells:
        if c.key() not in seen:
            seen.add(c.key())
            unique.append(c)
    return unique


def _with_tasks(cells: List[CellConfig], tasks) -> List[CellConfig]:
    """A task the preset has keeps its own cells (the parity preset trains tree models on
    every SST node but on ListOps roots); any other task is asked for with the cells of
    the preset's first task."""
    present = [c.task for c in cells]
    first = present[0] if present else None
    return [c for c in cells if c.task in tasks] + [
        replace(c, task=t) for t in tasks if t not in present for c in cells if c.task == first]


# option on the command line -> CellConfig field it overrides in every cell
_OVERRIDES = (("device", "device"), ("threads", "threads"), ("repeats", "repeats"),
              ("min_repeat_s", "min_repeat_s"), ("timeout", "timeout_s"), ("epochs", "epochs"),
              ("spectral_radius", "spectral_radius"), ("weight_decay", "weight_decay"),
              ("optimizer", "optimizer"), ("lr", "lr"), ("timed_budget_s", "timed_budget_s"))


def _overridden(cells: List[CellConfig], args) -> List[CellConfig]:
    overrides = {field: getattr(args, option) for option, field in _OVERRIDES
                 if getattr(args, option) is not None}
    if not overrides:
        return cells
    try:
        return [replace(c, **overrides) for c in cells]
    except ValueError as exc:   # e.g. --epochs on the readout preset
        raise UsageError(str(exc)) from None


def _validate(cells: List[CellConfig]) -> None:
    if not cells:
        raise UsageError("no cells match the filters")
    sizes = {}
    for c in cells:
        if c.task not in sizes:
            check_task_name(c.task)
            sizes[c.task] = train_size(c.task)
        if c.batch_size > sizes[c.task]:
            # The timed pool is drawn from the training split: a bigger batch would run smaller.
            raise UsageError("batch size %d is larger than %s's training split (%d examples)"
                             % (c.batch_size, c.task, sizes[c.task]))


def default_out(root: str = "results", prefix: str = "run") -> str:
    """A new directory for an ad-hoc run: results/run-YYYYmmdd-HHMMSS (-2, -3... if taken), so
    that runs never mix cells. ``nox -s bench`` names its own (results/latest/<framework>)."""
    import time
    base = os.path.join(root, prefix + time.strftime("-%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = "%s-%d" % (base, n)
    return path


def cmd_run(args) -> int:
    if args.out is None:
        if args.resume:
            raise UsageError("--resume needs --out: the directory of the run to complete")
        args.out = default_out()
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: complete the run in --out, "
                         "or keep it as a generation and start afresh")
    if args.retry_failed and not args.resume:
        raise UsageError("--retry-failed needs --resume (it reruns the failed cells of the run "
                         "in --out)")
    _check_executor(args)
    cells = select_cells(args)
    _check_out_dir(args.out, create=not args.dry_run)
    if args.dry_run:
        return _dry_run(args, cells)
    from .runner import run
    executor = None
    if args.executor == "ray":
        from .cluster import RayExecutor, parse_node_pythons   # ray is imported when it connects
        executor = RayExecutor(address=args.address,
                               node_pythons=parse_node_pythons(args.node_python or []))
    return run(cells, args.out, resume=args.resume, overwrite=args.overwrite,
               retry_failed=args.retry_failed, skip_corrupt=args.skip_corrupt, executor=executor)


def _check_executor(args) -> None:
    """--address and --node-python belong to --executor ray, which needs the ray package."""
    if args.executor != "ray":
        for given, option in ((args.address, "--address"), (args.node_python, "--node-python")):
            if given:
                raise UsageError("%s is for --executor ray" % option)
        return
    import importlib.util
    from .cluster import RAY_PIN, parse_node_pythons
    try:
        parse_node_pythons(args.node_python or [])   # each item was checked; now all together
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if importlib.util.find_spec("ray") is None:   # looks for the package without importing it
        raise UsageError("--executor ray needs the ray package: pip install '.[cluster]' (%s)"
                         % RAY_PIN)


def _dry_run(args, cells: List[CellConfig]) -> int:
    """Print the cells a run would start: with --resume, only those not recorded yet."""
    from .runner import occupied_message, plan
    todo = cells
    if args.resume:
        earlier = read_records(os.path.join(args.out, RECORDS), skip_corrupt=args.skip_corrupt)
        todo = plan(cells, earlier, args.retry_failed)
        sys.stderr.write("resume: %d of %d cells already recorded; %d would run\n"
                         % (len(cells) - len(todo), len(cells), len(todo)))
    elif os.path.isdir(args.out) and occupied(args.out) and not args.overwrite:
        sys.stderr.write("note: the run itself would refuse: %s\n"
                         % occupied_message(args.out, occupied(args.out)))
    for c in todo:
        print(c.label())
    return 0


def cmd_cell(args) -> int:
    """Internal: run one cell (the runner starts this in a fresh process).

    Exit codes the runner reads when no result came back: cell.WATCHDOG_EXIT,
    RESULT_DISK_FULL, RESULT_UNWRITABLE.
    """
    import errno
    import time
    from .cell import RESULT_DISK_FULL, RESULT_UNWRITABLE, guard, run_cell
    started = time.time()
    cfg = CellConfig.from_dict(json.loads(args.config))
    guard(args.parent_pid if args.parent_pid is not None else os.getppid(), cfg.timeout_s)
    rec = run_cell(cfg, framework_version=args.framework_version, status_path=args.status)
    if args.spawned_at is not None:
        # from the runner's Popen to here: interpreter start and bench's own imports
        startup = {"startup": max(0.0, started - args.spawned_at)}
        rec["phase_s"] = dict(startup, **rec.get("phase_s", {}))
    tmp = args.result + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(rec, fh, allow_nan=True)
        os.replace(tmp, args.result)
    except OSError as exc:
        sys.stderr.write("error: cannot write the cell's result %s: %s\n" % (args.result, exc))
        full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        return RESULT_DISK_FULL if full else RESULT_UNWRITABLE
    return 0


def cmd_probe(args) -> int:
    """Internal: does this framework import here? Prints one JSON line."""
    ok, detail = registry.probe(args.framework)
    print(json.dumps({"ok": ok, "detail": detail}))
    return 0


def cmd_ab(args) -> int:
    from . import ab
    from .compare import Threshold
    threshold = args.threshold if isinstance(args.threshold, Threshold) else \
        Threshold.parse(args.threshold)
    cells = select_cells(args)
    envs = (ab.parse_env_items(args.base_env, "--base-env"),
            ab.parse_env_items(args.new_env, "--new-env"))
    out = args.out or default_out(prefix="ab")
    _check_out_dir(out, create=True)
    sides = []
    try:
        sides.append(ab.resolve(args.base, "base", envs[0]))
        sides.append(ab.resolve(args.new, "new", envs[1]))
        return ab.run_ab(cells, sides[0], sides[1], args.rounds, threshold, out,
                         max_rounds=args.max_rounds)
    finally:
        for side in sides:
            ab.release(side)


def cmd_gemm(args) -> int:
    """Internal: the machine's float32 GEMM rate at --threads (the runner sets the thread
    environment before this process starts), as one JSON line."""
    from .flops import machine_gemm_flops
    print(json.dumps({"flops": machine_gemm_flops(args.threads), "threads": args.threads}))
    return 0


def cmd_report(args) -> int:
    from .report import update_readme, write_report
    for d in [args.run_dir] + (args.also or []):
        if not os.path.isdir(d):
            raise UsageError("%s is not a directory" % d)
    if args.out:
        _check_out_dir(args.out, create=True)
    write_report(args.run_dir, args.out or args.run_dir, skip_corrupt=args.skip_corrupt)
    if args.readme:
        update_readme(args.readme, [args.run_dir] + (args.also or []), skip_corrupt=args.skip_corrupt)
    return 0


def cmd_study(args) -> int:
    """A study over the NumPy reference (no framework): ``study gradients``."""
    from . import study_gradients as sg
    models = _flat(args.models) or list(MODELS)
    leaves = _flat(args.leaves) or list(sg.DEFAULT_LEAVES)
    _check_out_dir(args.out, create=True)
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
        raise EnvironmentProblem("could not write the study to %s: %s" % (args.out, exc)) from None
    print(sg.format_summary(rows))
    print("wrote %s" % ", ".join(paths))
    return 0


def cmd_compare(args) -> int:
    from .compare import main as compare_main
    for path in (args.base, args.new):
        if not os.path.exists(path):
            raise UsageError("%s does not exist" % path)
    return compare_main(args)


def _presets_text() -> str:
    """Each preset in one line: what it runs, cells per framework, and its settings."""
    lines = ["presets (--preset; every cell's settings are also in its record):"]
    for name in PRESETS:
        grid = preset(name)
        one = preset(name, grid.frameworks[:1]).cells()
        if name == "parity":   # the run keeps one strategy per model (see --fastest-from)
            one = keep_fastest(one, None)
        base = one[0] if one else grid.base
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()[0].rstrip(".")
        lines.append("  %-7s %s%s" % (name, "(default) " if name == DEFAULT_PRESET else "", doc))
        lines.append("          %d cells per framework, %d timed repeats, %d s timeout per cell; "
                     "frameworks: %s" % (len(one), base.repeats, base.timeout_s,
                                         " ".join(grid.frameworks)))
    return "\n".join(lines)


DEFAULT_PRESET = "quick"
DEFAULT_AB_ROUNDS = 12


def _add_cell_options(s) -> None:
    """The options that choose and shape cells, shared by run and ab."""
    s.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help="what to run (default: %(default)s; see below)")
    s.add_argument("--frameworks", nargs="+", type=_names("framework", list(registry.FRAMEWORKS)),
                   help="e.g. torch jax (default: the preset's; `python -m bench list` shows "
                        "which import here)")
    s.add_argument("--models", nargs="+", type=_names("model", MODELS),
                   help="keep these models: elman lstm rvnn treelstm (default: all)")
    s.add_argument("--strategies", nargs="+", type=_names("strategy", sum(STRATEGIES.values(), ())),
                   help="keep these strategies: loop fused compiled recursive levels (default: all)")
    s.add_argument("--tasks", nargs="+", type=_names("task", check_task_name),
                   help="sst sst2 listops synth-SHAPE-N (default: the preset's; quick: sst)")
    s.add_argument("--batch-sizes", nargs="+", type=_int_list("batch size", MAX_BATCH),
                   help="replace the preset's batch sizes (quick: 25)")
    s.add_argument("--seeds", nargs="+", type=_whole_list("seed", 0, 2 ** 31 - 1),
                   help="replace the preset's seeds, e.g. --seeds 0")
    s.add_argument("--device", choices=["cpu", "gpu"], help="(default: the preset's; cpu but for gpu)")
    s.add_argument("--threads", type=_positive_int("threads", MAX_THREADS),
                   help="threads per cell, set for every pool (default: the preset's; quick: 2)")
    s.add_argument("--repeats", type=_positive_int("repeats", MAX_REPEATS),
                   help="timed samples per call, at most (default: the preset's; quick: 7)")
    s.add_argument("--timeout", type=_positive_int("timeout", MAX_TIMEOUT_S),
                   help="seconds per cell before it is killed (default: the preset's; quick: 900)")
    s.add_argument("--optimizer", choices=("sgd", "adam", "adagrad"),
                   help="optimiser of the train steps and the accuracy budget (default: the "
                        "preset's; adam)")
    s.add_argument("--lr", type=_positive_float("lr"),
                   help="learning rate (default: the preset's; quick 1e-3, parity 2e-3)")
    s.add_argument("--weight-decay", type=_weight_decay,
                   help="coupled L2 in every optimiser step: the update sees g + WD * theta "
                        "(default: the preset's, 0)")
    s.add_argument("--min-repeat-s", type=_seconds("min repeat s"), metavar="S",
                   help="a timed sample cycles the pool until it lasts at least S seconds "
                        "(default: the preset's; quick: 0.2; 0: one pass per sample)")
    s.add_argument("--timed-budget-s", type=_seconds("timed budget s"), metavar="S",
                   help="seconds of timed passes per cell, half for training and half for "
                        "inference: a slow cell takes fewer samples (at least %d) and records "
                        "how many (default: the preset's; quick: 20; 0: always --repeats)"
                   % MIN_REPEATS)


def _add_list(sub, common) -> None:
    s = sub.add_parser("list", parents=[common],
                       help="what can run here: each framework, its version, or why it is unavailable")
    s.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="for refusals that only one device has (default: cpu)")
    s.add_argument("-v", "--verbose", action="store_true",
                   help="one line per (framework, model, strategy), with every reason")
    s.set_defaults(fn=cmd_list)


def _add_run(sub, common) -> None:
    s = sub.add_parser("run", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="run a preset's cells, each in its own process",
                       description="Run a preset's cells, each in a fresh process: the equivalence "
                                   "check first, then the timed passes. Options below narrow or "
                                   "override the preset.",
                       epilog=_presets_text())
    _add_cell_options(s)
    s.add_argument("--epochs", type=_epochs,
                   help="training budget for accuracy (the parity preset's is 3; 0 measures none)")
    s.add_argument("--spectral-radius", type=_positive_float("spectral radius"),
                   help="readout cells: radius of the frozen recurrent/composition blocks")
    s.add_argument("--out", metavar="DIR",
                   help="run directory (default: a new results/run-YYYYmmdd-HHMMSS, printed at the "
                        "start; --resume needs the directory named)")
    s.add_argument("--resume", action="store_true",
                   help="complete the run in --out: skip cells already recorded there")
    s.add_argument("--retry-failed", action="store_true",
                   help="with --resume: also rerun cells whose last record failed, timed out, "
                        "crashed or ran out of memory")
    s.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty --out; its earlier run is kept in "
                        "OUT/.generations/N")
    s.add_argument("--skip-corrupt", action="store_true",
                   help="read past corrupt record lines (each is named) instead of refusing")
    s.add_argument("--fastest-from", metavar="RUN_DIR",
                   help="keep one strategy per framework and model: the fastest in that run")
    s.add_argument("--dry-run", action="store_true",
                   help="print the cells that would run (with --resume: only those not recorded)")
    s.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one cell after another on this machine (default); ray: one timed "
                        "cell per node of a Ray cluster (see the README, 'Running on a cluster')")
    s.add_argument("--address", type=_address, metavar="HOST:PORT",
                   help="with --executor ray: the cluster's head (default: RAY_ADDRESS, or the "
                        "cluster started on this machine)")
    s.add_argument("--node-python", nargs="+", type=_node_python, metavar="FW=PATH",
                   help="with --executor ray: the interpreter of a framework on every node "
                        "(default: the node's nox venv for it, else the node's own interpreter)")
    s.set_defaults(fn=cmd_run)


def _add_report(sub, common) -> None:
    s = sub.add_parser("report", parents=[common],
                       help="report.md, summary.csv and plots from a run directory (needs pandas; "
                            "plots need matplotlib)")
    s.add_argument("run_dir", help="a run directory; runs in its sub-directories are read too")
    s.add_argument("--out", metavar="DIR", help="where the outputs go (default: RUN_DIR)")
    s.add_argument("--readme", help="also rewrite this README's generated tables from the run")
    s.add_argument("--also", nargs="+", help="more run directories for the README tables")
    s.add_argument("--skip-corrupt", action="store_true",
                   help="read past corrupt record lines (each is named) instead of refusing")
    s.set_defaults(fn=cmd_report)


def _add_compare(sub, common) -> None:
    s = sub.add_parser("compare", parents=[common], help="regression check of NEW against BASE")
    s.add_argument("base")
    s.add_argument("new")
    s.add_argument("--threshold", default="10%", type=_threshold,
                   help="slowdown that counts as a regression: 10%%, 0.1 or median:10%%")
    s.add_argument("--force", action="store_true")
    s.add_argument("--allow-missing", action="store_true",
                   help="do not fail on cells that are ok in BASE but missing, failed or "
                        "non-finite in NEW (they are still listed)")
    s.add_argument("--skip-corrupt", action="store_true",
                   help="read past corrupt record lines (each is named) instead of refusing")
    s.set_defaults(fn=cmd_compare)


def _add_ab(sub, common) -> None:
    s = sub.add_parser("ab", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="interleaved A/B regression check of two environments (ABBA rounds)",
                       description="Run each cell alternately in two environments, ABBA over "
                                   "--rounds rounds, each time in a fresh process; the verdict "
                                   "comes from the paired per-round ratios. ENV: an interpreter, "
                                   "a venv directory, nox:FW (this checkout's nox venv of FW) or "
                                   "a git ref (git:REF; checked out into a temporary worktree).",
                       epilog="e.g. python -m bench ab --base git:HEAD~1 --new git:HEAD "
                              "--frameworks torch --models lstm --strategies fused --threads 1")
    s.add_argument("--base", required=True, metavar="ENV")
    s.add_argument("--new", required=True, metavar="ENV")
    _add_cell_options(s)
    s.add_argument("--rounds", type=_positive_int("rounds", 1000), default=DEFAULT_AB_ROUNDS,
                   help="ABBA rounds (default: %(default)s; fewer than 7 cannot reach alpha 0.01)")
    s.add_argument("--max-rounds", type=_positive_int("max rounds", 10000),
                   help="while fewer than --rounds rounds were quiet on both sides (no sample "
                        "disturbed by other work), run more, up to this many (default: twice "
                        "--rounds)")
    s.add_argument("--threshold", default="5%", type=_threshold,
                   help="slowdown that counts as a regression (default: %(default)s)")
    s.add_argument("--base-env", nargs="+", metavar="KEY=VALUE",
                   help="environment variables for the base side only")
    s.add_argument("--new-env", nargs="+", metavar="KEY=VALUE",
                   help="environment variables for the new side only")
    s.add_argument("--out", metavar="DIR", help="where records and verdicts go (default: a new "
                                                "results/ab-YYYYmmdd-HHMMSS)")
    s.set_defaults(fn=cmd_ab, epochs=None, spectral_radius=None, fastest_from=None,
                   skip_corrupt=False)


def _add_study(sub, common) -> None:
    s = sub.add_parser("study", parents=[common],
                       help="studies over the NumPy reference: gradients (gradient flow)")
    s.add_argument("name", choices=("gradients",))
    s.add_argument("--out", default=os.path.join("results", "latest-study"),
                   help="folder for gradients.jsonl / .csv / .json (default: results/latest-study)")
    s.add_argument("--models", nargs="+", type=_names("model", MODELS),
                   help="elman lstm rvnn treelstm (default: all)")
    s.add_argument("--leaves", nargs="+", type=_whole_list("leaves", 2, 1 << 16),
                   help="synthetic input lengths, each >= 2 (default: 8 32 128 512)")
    s.add_argument("--train-steps", type=_whole("train steps", 0, 10 ** 7), default=342,
                   help="Adam steps on SST before the 'trained' probe (default 342: one epoch)")
    s.add_argument("--lr", type=_positive_float("lr"), default=2e-3)
    s.add_argument("--batch-size", type=_positive_int("batch size", MAX_BATCH), default=25)
    s.add_argument("--hidden", type=_positive_int("hidden", 1 << 16), default=150)
    s.add_argument("--embed-dim", type=_positive_int("embed dim", 1 << 16), default=100)
    s.add_argument("--seed", type=_whole("seed", 0, 2 ** 31 - 1), default=0)
    s.add_argument("--sst-examples", type=_whole("sst examples", 0, 10 ** 7), default=0,
                   help="SST dev sentences probed (default 0: all)")
    s.add_argument("--probe-examples", type=_positive_int("probe examples", 10 ** 6), default=8,
                   help="synthetic sequences per length (default 8)")
    s.set_defaults(fn=cmd_study)


def _add_internal(sub) -> None:
    """The internal commands (cell, gemm, probe): added without help, they stay out of --help."""
    s = sub.add_parser("cell")
    s.add_argument("--config", required=True)
    s.add_argument("--result", required=True)
    s.add_argument("--framework-version")
    s.add_argument("--parent-pid", type=int)
    s.add_argument("--status", help="file the cell keeps its current phase in, for the runner")
    s.add_argument("--spawned-at", type=float, help="time.time() when the runner started it")
    s.set_defaults(fn=cmd_cell)

    s = sub.add_parser("gemm")
    s.add_argument("--threads", type=_positive_int("threads", MAX_THREADS), default=1)
    s.set_defaults(fn=cmd_gemm)

    s = sub.add_parser("probe")
    s.add_argument("framework", choices=list(registry.FRAMEWORKS))
    s.set_defaults(fn=cmd_probe)


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command; SUPPRESS keeps a subcommand
    # from resetting what the main parser read.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")
    p = _Parser(prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="RNN vs RvNN benchmarks across frameworks: every implementation is "
                            "checked against the NumPy reference before it is timed.",
                epilog="start here:\n"
                       "  python -m bench list                                  what can run here\n"
                       "  python -m bench run --preset smoke --frameworks numpy  a run in seconds\n"
                       "  python -m bench report results/run-...                report.md, CSV, "
                       "plots\n"
                       "every framework in its own venv, then the report: nox -s bench "
                       "(see README.md)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="{list,run,report,compare,ab,study}", title="commands")
    _add_list(sub, common)
    _add_run(sub, common)
    _add_report(sub, common)
    _add_compare(sub, common)
    _add_ab(sub, common)
    _add_study(sub, common)
    _add_internal(sub)
    return p


def _say(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):   # the terminal may be gone (SIGHUP)
        pass


def main(argv=None) -> int:
    """Exit codes: 0 success; 1 a cell failed (run), a regression or lost cell (compare), or
    an internal error; 2 bad input or a refusal; 3 the environment failed a run; 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    if args.command in ("run", "report", "compare", "study", "ab"):
        from .runner import stop_on_signals
        stop_on_signals()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        _say("interrupted; finished cells are in the records file" if args.command == "run"
             else "interrupted")
        return INTERRUPTED
    except (UsageError, ParseError, RecordsError, LockHeld) as exc:
        if args.debug:
            traceback.print_exc()
        _say("error: %s" % exc)
        return 2
    except EnvironmentProblem as exc:
        if args.debug:
            traceback.print_exc()
        _say("error: %s" % exc)
        return 3
    except Exception as exc:  # a bug: one line unless --debug
        if args.debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        _say("error: internal error: %s: %s (rerun with --debug for the traceback)"
             % (type(exc).__name__, first))
        return 1
