"""The runner: every cell in a fresh subprocess, records appended as JSON Lines.

``DIR/records.jsonl`` gets one line per finished cell (one write, fsynced; see
``bench.records``), so a killed run loses at most the cell in flight;
``--resume`` skips cells whose record is already there (``--retry-failed``
also reruns those that failed). ``DIR/env.json`` describes the machine and
versions. One run per directory (a lock); a directory that holds an earlier
run is refused unless ``--resume`` or ``--overwrite`` (which keeps the earlier
run as a generation) says what to do with it.

Exit codes: 0 every cell completed (ok, unavailable, not-applicable); 1 a cell
of the run (earlier parts included) failed, timed out, crashed, ran out of
memory or was lost with its cluster node; 2 a refusal (see ``bench.cli``); 3
the environment failed the run (a full disk, an output directory that stopped
being writable, a Ray cluster lost); 130 interrupted (SIGINT, SIGTERM,
SIGHUP). Finished cells are never lost by any of these.

Cells run through an executor: ``LocalExecutor`` (the default, below) or
``bench.cluster.RayExecutor`` (``--executor ray``); either way the records
come back here and go through one writer.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from . import registry
from .cell import RESULT_DISK_FULL, RESULT_UNWRITABLE, WATCHDOG_EXIT, base_record, read_status
from .config import CellConfig, UsageError
from .environment import describe, thread_env
from .records import (CELL_TEMP_PREFIX, ENV, FAILED, RECORDS, STATUSES, EnvironmentProblem,
                      RunLock, append_record, atomic_write, keep_generation, latest, occupied,
                      read_records, remove_stale_cell_files, repair_tail)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CELL_NUMBER = itertools.count(1)   # result file names: unique within this runner (it holds the lock)


# What the progress line calls each phase a cell reports (bench.cell.PHASES).
PHASE_WORDS = {"data": "loading data", "imports": "importing the framework",
               "pool": "preparing batches", "first_call": "first call (compile)",
               "gate": "equivalence check", "warmup": "warm-up", "timed": "timed",
               "latency": "batch-1 latency", "gemm": "GEMM peak",
               "accuracy": "training for accuracy"}
POLL_S = 1.0   # how often the runner looks at a running cell's phase


def describe_status(status: Optional[Dict]) -> str:
    """``{"phase": "timed", "detail": "train sample 3/7"}`` -> ``timed: train sample 3/7``."""
    if not status or not status.get("phase"):
        return "starting"
    words = PHASE_WORDS.get(status["phase"], str(status["phase"]))
    return "%s: %s" % (words, status["detail"]) if status.get("detail") else words


class Progress:
    """Progress on stderr. On a terminal, one line redrawn every second: cells done, the run's
    elapsed time, the running cell, its elapsed time and phase (timed sample k of n). In a log
    (not a terminal): a line per finished cell, and a line every ``every_s`` seconds while
    one cell runs long, so that no cell runs for minutes without output."""

    def __init__(self, total: int, stream=None, every_s: float = 30.0):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()
        self.every_s = every_s
        self.label, self.noted = "", 0.0

    def _elapsed(self) -> str:
        s = int(time.time() - self.t0)
        return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60)

    def _write(self, text: str) -> None:
        # Progress is best effort: a terminal that went away (SIGHUP) must not end the run.
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _draw(self, what: str) -> None:
        width = 24
        filled = int(width * self.done / max(1, self.total))
        line = "[%s%s] %d/%d %s  %s  %s" % ("#" * filled, "." * (width - filled), self.done,
                                            self.total, self._elapsed(), self.label, what)
        columns = shutil.get_terminal_size((160, 24)).columns
        self._write("\r\033[K" + line[:max(20, columns - 1)])

    def start(self, label: str) -> None:
        self.label, self.noted = label, 0.0
        if self.tty:
            self._draw("starting")

    def update(self, status: Optional[Dict], elapsed: float) -> None:
        """The running cell's phase, as its status file says, ``elapsed`` seconds in."""
        what = describe_status(status)
        if self.tty:
            self._draw("%ds %s" % (elapsed, what))
        elif elapsed - self.noted >= self.every_s:
            self.noted = elapsed
            self._write("    ... %s: %ds, %s\n" % (self.label, elapsed, what))

    def finish(self, label: str, status: str, seconds: float, timed: Optional[float] = None) -> None:
        self.done += 1
        if not self.tty:
            self._write("[%d/%d %s] %-15s %6.1fs  %s%s\n" % (
                self.done, self.total, self._elapsed(), status, seconds, label,
                "  (timed %.1fs)" % timed if timed is not None else ""))

    def close(self) -> None:
        if self.tty:
            self._write("\r\033[K[%s] %d/%d cells in %s\n" % ("#" * 24, self.done,
                                                               self.total, self._elapsed()))


def _child_env(cfg: CellConfig, root: str = ROOT, extra: Optional[Dict[str, str]] = None
               ) -> Dict[str, str]:
    """A cell's environment: ours, its thread caps, its framework's settings, then ``extra``
    (``bench ab``'s per-side variables), with ``root``'s code first on the path."""
    env = dict(os.environ)
    env.update(thread_env(cfg.threads))
    env.update(dict(registry.FRAMEWORKS[cfg.framework].env))
    env.update(extra or {})
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PROBE_TIMEOUT_S = 300


def iter_probes(names: Iterable[str], python: str = sys.executable, jobs: int = 4,
                root: str = ROOT, extra: Optional[Dict[str, str]] = None):
    """(name, {ok, detail: version or why not}) for each framework, in order: each is imported
    in its own subprocess with its cells' environment, up to ``jobs`` at a time."""
    names = list(names)
    running: Dict[str, Tuple[Optional[subprocess.Popen], float, str]] = {}   # proc, start, error
    queue = iter(names)
    try:
        for name in names:
            while len(running) < max(1, jobs):
                other = next(queue, None)
                if other is None:
                    break
                try:
                    running[other] = (subprocess.Popen(
                        [python, "-m", "bench", "probe", other], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True, cwd=root, start_new_session=True,
                        env=_child_env(CellConfig(other, "lstm", "loop"), root, extra)),
                        time.time(), "")
                except OSError as exc:
                    running[other] = (None, time.time(), "probe failed: %s" % exc)
            proc, since, error = running.pop(name)
            if proc is None:
                yield name, {"ok": False, "detail": error}
                continue
            try:
                out, _ = proc.communicate(timeout=max(1.0, since + PROBE_TIMEOUT_S - time.time()))
                info = json.loads(out.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                info = {"ok": False, "detail": "probe failed: no answer in %d s" % PROBE_TIMEOUT_S}
            except Exception as exc:  # a probe that crashes means unavailable, never a broken run
                info = {"ok": False, "detail": "probe failed: %s" % exc}
            yield name, info
    finally:
        for proc, _, _ in running.values():   # an interrupted listing leaves no probe behind
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


GEMM_TIMEOUT_S = 120


def machine_gemm(threads: Iterable[int], python: str = sys.executable,
                 root: str = ROOT) -> Dict[str, Optional[float]]:
    """{str(threads): FLOP/s} of the machine's float32 GEMM at each thread count (NumPy's BLAS,
    timed by ``bench.flops.time_gemm`` like every framework's), each in a fresh process with
    that count's thread environment; None where the probe failed (the report then uses the
    fastest framework GEMM alone)."""
    out: Dict[str, Optional[float]] = {}
    for t in sorted(set(threads)):
        env = dict(os.environ, **thread_env(t))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            done = subprocess.run([python, "-m", "bench", "gemm", "--threads", str(t)], cwd=root,
                                  env=env, capture_output=True, text=True, timeout=GEMM_TIMEOUT_S)
            out[str(t)] = float(json.loads(done.stdout.strip().splitlines()[-1])["flops"])
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError):
            out[str(t)] = None
    return out


def probe_frameworks(names: Iterable[str], python: str = sys.executable) -> Dict[str, Dict]:
    """Import each framework in its own subprocess: {name: {ok, version_or_reason}}."""
    return dict(iter_probes(names, python))


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _oom_counter_file() -> Optional[str]:
    """The file that counts OOM kills in this process's memory cgroup, if the machine has one.

    cgroup v2: ``memory.events`` (line ``oom_kill N``); v1: ``memory.oom_control``
    (the same line, kernels >= 4.13). A cell runs in its runner's cgroup.
    """
    try:
        with open("/proc/self/cgroup") as fh:
            groups = [line.rstrip("\n").split(":", 2) for line in fh if line.count(":") >= 2]
        with open("/proc/self/mounts") as fh:
            mounts = [line.split() for line in fh]
    except OSError:
        return None
    candidates = []
    for _, controllers, rel in groups:
        for m in mounts:
            if len(m) < 4:
                continue
            point, fstype, options = m[1], m[2], m[3].split(",")
            if controllers == "" and fstype == "cgroup2":
                candidates.append(os.path.join(point + rel, "memory.events"))
            elif "memory" in controllers.split(",") and fstype == "cgroup" and "memory" in options:
                candidates.append(os.path.join(point + rel, "memory.oom_control"))
    for path in candidates:
        if oom_kills(path) is not None:
            return path
    return None


def oom_kills(path: Optional[str]) -> Optional[int]:
    """The ``oom_kill`` counter in a cgroup file, or None where there is none."""
    if not path:
        return None
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


OOM_FILE = _oom_counter_file()


def _oom_evidence(err: str, before: Optional[int], after: Optional[int]) -> Optional[str]:
    """Why a cell that died without a result ran out of memory, or None without evidence."""
    if before is not None and after is not None and after > before:
        return "the memory cgroup's oom_kill count rose from %d to %d during the cell" % (before, after)
    for line in reversed((err or "").splitlines()):
        if "MemoryError" in line or "out of memory" in line.lower():
            return "its stderr says %r" % line.strip()[:200]
    return None


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return "killed by signal %d (%s)" % (-returncode, name)
    if returncode > 128:   # a shell between us and the cell reports its signal this way
        return "exited with code %d (128 + signal %d) without a result" % (returncode, returncode - 128)
    return "exited with code %d without a result" % returncode


def _wait(proc: subprocess.Popen, timeout_s: float, t0: float, status_path: str,
          on_status: Optional[Callable[[Optional[Dict], float], None]]) -> Tuple[str, bool]:
    """Wait for the cell (its stderr, whether it timed out), telling ``on_status`` its phase
    every POLL_S seconds. Ctrl-C, SIGTERM and SIGHUP kill the cell's process group too."""
    deadline = t0 + timeout_s
    try:
        while True:
            try:
                _, err = proc.communicate(timeout=max(0.0, min(POLL_S, deadline - time.time())))
                return err, False
            except subprocess.TimeoutExpired:
                if time.time() >= deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    _, err = proc.communicate()
                    return err, True
                if on_status is not None:
                    on_status(read_status(status_path), time.time() - t0)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:   # it had already ended: the interrupt must still go up
            pass
        proc.communicate()
        raise


def run_in_subprocess(cfg: CellConfig, version: Optional[str], python: str = sys.executable,
                      result_dir: Optional[str] = None,
                      on_status: Optional[Callable[[Optional[Dict], float], None]] = None,
                      root: str = ROOT, extra_env: Optional[Dict[str, str]] = None) -> Dict:
    """Run one cell in a fresh interpreter; timeouts, crashes and OOM kills become records.

    Raises OSError (with the result file's name) when the cell could not write its result.

    The cell writes its result to ``result_dir/.cell-PID-N.json`` (the run
    directory: a runner killed mid-cell leaves nothing in /tmp, and the next
    run clears what it left); the file does not exist until the cell finishes.
    Its current phase is in ``.cell-PID-N.status`` beside it, which ``on_status``
    (status dict or None, seconds since the start) sees every POLL_S seconds; a cell
    that ends without a result keeps its last phase in the record (``last_phase``).
    """
    # absolute: the cell runs in ``root`` (an A/B side's worktree), not in our directory
    folder = os.path.abspath(result_dir or tempfile.gettempdir())
    stem = os.path.join(folder, "%s%d-%d" % (CELL_TEMP_PREFIX, os.getpid(), next(_CELL_NUMBER)))
    result_path, status_path = stem + ".json", stem + ".status"
    cmd = [python, "-m", "bench", "cell", "--config", json.dumps(cfg.to_dict()),
           "--result", result_path, "--parent-pid", str(os.getpid()), "--status", status_path]
    if version:
        cmd += ["--framework-version", version]
    oom_before = oom_kills(OOM_FILE)
    t0 = time.time()
    try:
        proc = subprocess.Popen(cmd + ["--spawned-at", repr(t0)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=_child_env(cfg, root, extra_env), cwd=root,
                                start_new_session=True)
    except OSError as exc:
        return dict(base_record(cfg), framework_version=version, status="crashed",
                    reason="the cell process could not start: %s" % exc, cell_wall_s=0.0)
    try:
        err, timed_out = _wait(proc, cfg.timeout_s, t0, status_path, on_status)
        rec = _read_result(result_path)
        last_status = read_status(status_path) if rec is None else None
    finally:
        for leftover in (result_path, result_path + ".tmp", status_path, status_path + ".tmp"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    if rec is None and proc.returncode in (RESULT_DISK_FULL, RESULT_UNWRITABLE):
        # Not the cell's failure: the machine's. The runner stops the run (exit 3).
        code = errno.ENOSPC if proc.returncode == RESULT_DISK_FULL else errno.EIO
        raise OSError(code, _tail(err, 1) or os.strerror(code), result_path)
    if rec is None:
        rec = _record_without_result(cfg, version, err, proc.returncode, timed_out, last_status,
                                     oom_before)
    rec["cell_wall_s"] = time.time() - t0
    phases = rec.get("phase_s")
    if isinstance(phases, dict) and isinstance(rec.get("wall_s"), (int, float)):
        # writing the result, the interpreter's exit and reading it back: the rest of the wall
        phases["exit"] = max(0.0, rec["cell_wall_s"] - phases.get("startup", 0.0) - rec["wall_s"])
    return rec


def _read_result(path: str) -> Optional[Dict]:
    """The record a cell wrote, or None where it wrote none (or not a whole one)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _record_without_result(cfg: CellConfig, version: Optional[str], err: str, returncode: int,
                           timed_out: bool, last_status: Optional[Dict],
                           oom_before: Optional[int]) -> Dict:
    """A cell that ended without a result: timed out, out of memory, past its own deadline,
    or crashed; its stderr's tail and last phase say more."""
    rec = base_record(cfg)
    rec["framework_version"] = version
    rec["stderr_tail"] = _tail(err)
    rec["returncode"] = returncode
    if last_status:
        rec["last_phase"] = describe_status(last_status)
    evidence = _oom_evidence(err, oom_before, oom_kills(OOM_FILE))
    if timed_out:
        rec["status"], rec["reason"] = "timeout", "no result after %d s" % cfg.timeout_s
    elif evidence:
        rec["status"] = "oom"
        rec["reason"] = "out of memory: %s; the cell %s" % (evidence, _how_it_ended(returncode))
    elif returncode == WATCHDOG_EXIT:
        rec["status"] = "timeout"
        rec["reason"] = "the cell's own deadline (%d s and a grace period) passed" % cfg.timeout_s
    else:
        rec["status"] = "crashed"
        last = _tail(err, 1)
        rec["reason"] = _how_it_ended(returncode) + (": %s" % last if last else "")
    return rec


def merge_env(path: str, env: Dict) -> Dict:
    """A resumed run may name other frameworks than the run it extends: keep both.

    The frameworks (and their probes) recorded before stay unless probed again,
    and each earlier start is listed, so a records file written in several
    steps still names every framework version, commit and cluster that wrote it.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return env
    for key in ("frameworks", "framework_probes"):
        merged = dict(old.get(key) or {})
        merged.update(env.get(key) or {})
        env[key] = merged
    planned = {fw: list(ids) for fw, ids in (old.get(PLANNED) or {}).items()}
    for fw, ids in (env.get(PLANNED) or {}).items():
        planned[fw] = sorted(set(planned.get(fw, [])) | set(ids))
    if planned:
        env[PLANNED] = planned
    env["earlier_starts"] = list(old.get("earlier_starts") or []) + [
        {k: old.get(k) for k in ("time", "git_commit", "threads", "executor") if k in old}]
    return env


# env.json: {framework: [cell_id, ...]} the run set out to record, so that a report can tell a
# framework whose run was interrupted (or is still going) from one that is complete.
PLANNED = "planned_cells"


def planned_cells(cells: Sequence[CellConfig]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for c in cells:
        out.setdefault(c.framework, []).append(c.key())
    return {fw: sorted(ids) for fw, ids in out.items()}


def occupied_message(out_dir: str, names: Sequence[str]) -> str:
    shown = ", ".join(names[:3]) + (", %d more" % (len(names) - 3) if len(names) > 3 else "")
    return ("--out %s is not empty (%s): pass --resume to complete the run there, or --overwrite "
            "to keep it as an earlier generation and start afresh" % (out_dir, shown))


def plan(cells: Sequence[CellConfig], earlier: Sequence[Dict], retry_failed: bool
         ) -> List[CellConfig]:
    """The cells a run still has to do, given the records already there (last record wins)."""
    last = {r["cell_id"]: r["status"] for r in latest(earlier)}
    return [c for c in cells if c.key() not in last or (retry_failed and last[c.key()] in FAILED)]


def stop_on_signals():
    """SIGTERM and SIGHUP stop like Ctrl-C (KeyboardInterrupt): a run kills the cell in flight
    and keeps its records, a report keeps its previous outputs. Returns the old handlers."""
    def _stop(signum, frame):
        raise KeyboardInterrupt

    saved = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            saved[sig] = signal.signal(sig, _stop)
        except ValueError:  # not the main thread (e.g. called from a test helper thread)
            pass
    return saved


def run(cells: Sequence[CellConfig], out_dir: str, resume: bool = False, overwrite: bool = False,
        retry_failed: bool = False, skip_corrupt: bool = False, python: str = sys.executable,
        stream=None, executor=None) -> int:
    """Run cells into ``out_dir``; returns the process exit code (see the module docstring).

    ``executor`` runs the cells (default: ``LocalExecutor``, one after another on this
    machine; ``bench.cluster.RayExecutor`` on a Ray cluster); records from any executor
    go through the same writer. Raises UsageError / RecordsError / LockHeld (refusals,
    exit 2) before any cell runs, and EnvironmentProblem (exit 3) when the machine fails
    the run.
    """
    out = stream or sys.stderr
    os.makedirs(out_dir, exist_ok=True)
    saved = stop_on_signals()
    lock = RunLock(out_dir).acquire()
    try:
        remove_stale_cell_files(out_dir)
        path = os.path.join(out_dir, RECORDS)
        if resume:
            note = repair_tail(path)
            if note:
                out.write("resume: %s\n" % note)
            earlier = read_records(path, skip_corrupt=skip_corrupt,
                                   warn=lambda text: out.write("warning: %s\n" % text))
        else:
            busy = occupied(out_dir)
            if busy and not overwrite:
                raise UsageError(occupied_message(out_dir, busy))
            kept = keep_generation(out_dir) if busy else None
            if kept:
                out.write("overwrite: the earlier run is kept in %s\n" % kept)
            earlier = []
        # after every refusal: a refused run says one line, the error
        out.write("run: %d cells into %s\n" % (len(cells), out_dir))
        return _run_locked(cells, out_dir, path, earlier, retry_failed, python, out,
                           executor or LocalExecutor(python))
    finally:
        lock.release()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class LocalExecutor:
    """The default: cells one after another on this machine, each in a fresh process.

    An executor's ``records`` yields ``(cell, record, seconds)`` for every cell it is
    given; the runner appends each record as it comes. ``start``/``stop`` bracket a
    run, ``describe`` adds to env.json.
    """

    name = "local"

    def __init__(self, python: str = sys.executable):
        self.python = python

    def start(self, root: str) -> None:
        pass

    def stop(self) -> None:
        pass

    def describe(self) -> Dict:
        return {}

    def records(self, todo: Sequence[CellConfig], probes: Dict[str, Dict], out_dir: str,
                progress: Progress) -> Iterator[Tuple[CellConfig, Dict, float]]:
        # (framework, device) -> why the device is absent, learnt from the first cell that
        # tried it: the rest are recorded without paying a process start and data loading.
        no_device: Dict[Tuple[str, str], str] = {}
        for cfg in todo:
            progress.start(cfg.label())
            t0 = time.time()
            probe = probes[cfg.framework]
            static = registry.not_applicable(cfg.framework, cfg.model, cfg.strategy, cfg.device)
            if not probe.get("ok"):
                rec = dict(base_record(cfg), status="unavailable", reason=probe.get("detail", ""))
            elif static:
                rec = dict(base_record(cfg), framework_version=probe.get("detail"),
                           status="not-applicable", reason=static)
            elif (cfg.framework, cfg.device) in no_device:
                rec = dict(base_record(cfg), framework_version=probe.get("detail"), status="unavailable",
                           reason=no_device[(cfg.framework, cfg.device)], unavailable_scope="device")
            else:
                # OSError (the cell could not write its result) goes to the runner: exit 3.
                rec = run_in_subprocess(cfg, probe.get("detail"), python=self.python,
                                        result_dir=out_dir, on_status=progress.update)
                if rec.get("unavailable_scope") == "device":
                    no_device[(cfg.framework, cfg.device)] = rec.get("reason", "")
            yield cfg, rec, time.time() - t0


def _run_locked(cells, out_dir, path, earlier, retry_failed, python, out, executor) -> int:
    todo = plan(cells, earlier, retry_failed)
    final = {r["cell_id"]: r for r in latest(earlier)}   # each cell's last record so far
    if earlier:
        again = sum(1 for c in todo if c.key() in final)
        out.write("resume: %d of %d cells already recorded%s\n" % (
            len(cells) - len(todo) + again, len(cells),
            "; rerunning %d that failed" % again if again else ""))
    fws = sorted({c.framework for c in cells}, key=list(registry.FRAMEWORKS).index)
    executor.start(ROOT)
    try:
        probes = probe_frameworks(fws, python=python)
        gemm = _write_env(cells, probes, executor, python, out_dir, bool(earlier), len(final))
        if executor.name == "local":   # on a cluster the nodes decide
            _say_unavailable(out, fws, probes, todo)
        counts = _record_cells(executor, todo, probes, out_dir, path, gemm, final, out)
    finally:
        executor.stop()
    out.write("cells: " + ", ".join("%s %d" % (k, v) for k, v in counts.items() if v) + "\n")
    return _summary(final.values(), out)


def _write_env(cells, probes: Dict[str, Dict], executor, python: str, out_dir: str,
               resumed: bool, recorded: int) -> Dict[str, Optional[float]]:
    """env.json: the machine, the frameworks' probes and the cells planned, merged with the
    earlier run's when there is one. Returns the machine's GEMM rate per thread count."""
    threads = sorted({c.threads for c in cells})
    env = describe({k: v.get("detail") if v.get("ok") else None for k, v in probes.items()},
                   threads[0] if len(threads) == 1 else threads, ROOT)
    env["framework_probes"] = probes
    env.update(executor.describe())
    env[PLANNED] = planned_cells(cells)
    # The roofline's denominator: measured once per run here, not by each framework.
    gemm = machine_gemm([c.threads for c in cells if c.device == "cpu"], python) \
        if executor.name == "local" else {}
    env["machine_gemm_flops"] = gemm
    env_path = os.path.join(out_dir, ENV)
    if resumed or os.path.exists(env_path):
        env = merge_env(env_path, env)
    try:
        atomic_write(env_path, json.dumps(env, indent=2, sort_keys=True))
    except OSError as exc:
        raise EnvironmentProblem(_write_failure(env_path, exc, recorded)) from None
    return gemm


def _say_unavailable(out, fws: Sequence[str], probes: Dict[str, Dict], todo) -> None:
    for fw in fws:
        if not probes[fw].get("ok"):
            n = sum(1 for c in todo if c.framework == fw)
            out.write("%s: unavailable: %s (its %d cell%s are recorded as unavailable)\n"
                      % (fw, probes[fw].get("detail", ""), n, "" if n == 1 else "s"))


def _record_cells(executor, todo, probes: Dict[str, Dict], out_dir: str, path: str,
                  gemm: Dict[str, Optional[float]], final: Dict[str, Dict], out) -> Dict[str, int]:
    """Append each record the executor yields, as it comes; ``final`` keeps each cell's
    last record. Returns the count of each status."""
    progress = Progress(len(todo), stream=out)
    counts = {s: 0 for s in STATUSES}
    cells_done = executor.records(todo, probes, out_dir, progress)
    try:
        while True:
            try:
                cfg, rec, seconds = next(cells_done)
            except StopIteration:
                break
            except OSError as exc:
                raise EnvironmentProblem(_write_failure(exc.filename or out_dir, exc,
                                                        len(final), "the cell's result")) from None
            if rec.get("status") == "ok" and cfg.device == "cpu":
                rec["machine_gemm_flops"] = gemm.get(str(cfg.threads))
            try:
                append_record(path, rec)
            except OSError as exc:
                raise EnvironmentProblem(_write_failure(path, exc, len(final))) from None
            final.pop(rec["cell_id"], None)
            final[rec["cell_id"]] = rec
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            progress.finish(cfg.label(), rec["status"], seconds,
                            (rec.get("phase_s") or {}).get("timed"))
    finally:
        cells_done.close()   # an executor with cells in flight cancels them here
        progress.close()
    return counts


def _summary(final: Iterable[Dict], out) -> int:
    """The unavailable and failed cells of the whole run (earlier parts included); the exit
    code: 1 if any failed."""
    final = list(final)
    unavailable: Dict[Tuple[str, str], int] = {}
    for rec in final:
        if rec.get("status") == "unavailable":
            key = (rec["framework"], rec.get("reason", ""))
            unavailable[key] = unavailable.get(key, 0) + 1
    for (fw, reason), n in unavailable.items():
        out.write("  unavailable %s (%d cell%s): %s\n" % (fw, n, "" if n == 1 else "s", reason))
    failed = [r for r in final if r.get("status") in FAILED]
    for rec in failed:
        out.write("  %s %s/%s/%s %s: %s\n" % (rec["status"], rec["framework"], rec["model"],
                                             rec["strategy"], rec["task"], rec.get("reason", "")))
    return 1 if failed else 0


def _write_failure(path: str, exc: OSError, recorded: int, what: str = "") -> str:
    """One line for a write the machine refused: what, where, what is safe, what to do."""
    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    problem = "disk full" if full else "cannot write (%s)" % (exc.strerror or exc)
    return ("%s while writing %s%s: %d cells recorded, rerun with --resume when %s"
            % (problem, path, " (%s)" % what if what else "", recorded,
               "space is free" if full else "it is writable"))
