"""The runner: every cell in a fresh subprocess, records appended as JSON Lines.

``DIR/records.jsonl`` gets one line per finished cell (flushed and fsynced), so
a killed run loses at most the cell in flight; ``--resume`` skips cells whose
record is already there. ``DIR/env.json`` describes the machine and versions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import registry
from .cell import base_record
from .config import CellConfig
from .environment import describe, thread_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = ("ok", "failed", "timeout", "oom", "unavailable", "not-applicable")
RECORDS = "records.jsonl"


class Progress:
    """A one-line progress bar on stderr (a line per cell when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()

    def _elapsed(self) -> str:
        s = int(time.time() - self.t0)
        return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60)

    def start(self, label: str) -> None:
        if self.tty:
            width = 24
            filled = int(width * self.done / max(1, self.total))
            line = "[%s%s] %d/%d %s  %s" % ("#" * filled, "." * (width - filled), self.done,
                                           self.total, self._elapsed(), label)
            self.stream.write("\r\033[K" + line[:160])
            self.stream.flush()

    def finish(self, label: str, status: str, seconds: float) -> None:
        self.done += 1
        if not self.tty:
            self.stream.write("[%d/%d %s] %-15s %6.1fs  %s\n" % (
                self.done, self.total, self._elapsed(), status, seconds, label))
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K[%s] %d/%d cells in %s\n" % ("#" * 24, self.done,
                                                                  self.total, self._elapsed()))
            self.stream.flush()


def read_records(path: str) -> List[Dict]:
    """Records of a JSONL file; a torn last line (a killed run) is ignored."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def append_record(path: str, record: Dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True, allow_nan=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _child_env(cfg: CellConfig) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(thread_env(cfg.threads))
    env.update(dict(registry.FRAMEWORKS[cfg.framework].env))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def probe_frameworks(names: Iterable[str], python: str = sys.executable) -> Dict[str, Dict]:
    """Import each framework in its own subprocess: {name: {ok, version_or_reason}}."""
    out = {}
    for name in names:
        cmd = [python, "-m", "bench", "probe", name]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                 env=_child_env(CellConfig(name, "lstm", "loop")), cwd=ROOT)
            info = json.loads(res.stdout.strip().splitlines()[-1])
        except Exception as exc:  # a probe that crashes means unavailable, never a broken run
            info = {"ok": False, "detail": "probe failed: %s" % exc}
        out[name] = info
    return out


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def run_in_subprocess(cfg: CellConfig, version: Optional[str], python: str = sys.executable
                      ) -> Dict:
    """Run one cell in a fresh interpreter; timeouts, crashes and OOM kills become records."""
    fd, result_path = tempfile.mkstemp(prefix="bench-cell-", suffix=".json")
    os.close(fd)
    cmd = [python, "-m", "bench", "cell", "--config", json.dumps(cfg.to_dict()),
           "--result", result_path]
    if version:
        cmd += ["--framework-version", version]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_child_env(cfg), cwd=ROOT, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=cfg.timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        timed_out = True
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # Ctrl-C: take the cell's process group with us
        proc.communicate()
        os.unlink(result_path)
        raise
    rec = None
    try:
        with open(result_path, encoding="utf-8") as fh:
            text = fh.read()
        rec = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        rec = None
    finally:
        if os.path.exists(result_path):
            os.unlink(result_path)
    if rec is None:
        rec = base_record(cfg)
        rec["framework_version"] = version
        rec["stderr_tail"] = _tail(err)
        if timed_out:
            rec["status"], rec["reason"] = "timeout", "no result after %d s" % cfg.timeout_s
        elif proc.returncode in (-9, 137) or "MemoryError" in (err or "") or \
                "out of memory" in (err or "").lower():
            rec["status"], rec["reason"] = "oom", "killed (signal 9 / out of memory)"
        else:
            rec["status"] = "failed"
            last = _tail(err, 1) or "no output"
            rec["reason"] = "cell process exited with %s: %s" % (proc.returncode, last)
    rec["cell_wall_s"] = time.time() - t0
    return rec


def _merge_env(path: str, env: Dict) -> Dict:
    """A resumed run may name other frameworks than the run it extends: keep both.

    The frameworks (and their probes) recorded before stay unless probed again,
    and each earlier start is listed, so a records file written in several
    steps still names every framework version and commit that wrote it.
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
    env["earlier_starts"] = list(old.get("earlier_starts") or []) + [
        {k: old.get(k) for k in ("time", "git_commit", "threads") if k in old}]
    return env


def run(cells: Sequence[CellConfig], out_dir: str, resume: bool = False,
        python: str = sys.executable, stream=None) -> int:
    """Run cells into ``out_dir``; returns the process exit code (1 if any cell failed)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RECORDS)
    if not resume and os.path.exists(path) and os.path.getsize(path) > 0:
        # Nothing is lost: the previous run's records move aside.
        os.replace(path, path + ".prev")
    done = {r.get("cell_id") for r in read_records(path)} if resume else set()
    todo = [c for c in cells if c.key() not in done]

    fws = sorted({c.framework for c in cells}, key=list(registry.FRAMEWORKS).index)
    probes = probe_frameworks(fws, python=python)
    threads = sorted({c.threads for c in cells})
    env = describe({k: v.get("detail") if v.get("ok") else None for k, v in probes.items()},
                   threads[0] if len(threads) == 1 else threads, ROOT)
    env["framework_probes"] = probes
    env_path = os.path.join(out_dir, "env.json")
    if resume:
        env = _merge_env(env_path, env)
    with open(env_path, "w", encoding="utf-8") as fh:
        json.dump(env, fh, indent=2, sort_keys=True)

    out = stream or sys.stderr

    def _terminate(signum, frame):
        raise KeyboardInterrupt  # unwinds through run_in_subprocess, which kills the cell

    if hasattr(signal, "SIGTERM"):
        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread (e.g. called from a test helper thread)
            pass
    if resume and len(todo) < len(cells):
        out.write("resume: %d of %d cells already recorded\n" % (len(cells) - len(todo), len(cells)))
    progress = Progress(len(todo), stream=out)
    counts = {s: 0 for s in STATUSES}
    # (framework, device) -> why the device is absent, learnt from the first cell that
    # tried it: the rest are recorded without paying a process start and data loading.
    no_device: Dict[Tuple[str, str], str] = {}
    try:
        for cfg in todo:
            label = cfg.label()
            progress.start(label)
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
                rec = run_in_subprocess(cfg, probe.get("detail"), python=python)
                if rec.get("unavailable_scope") == "device":
                    no_device[(cfg.framework, cfg.device)] = rec.get("reason", "")
            append_record(path, rec)
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            progress.finish(label, rec["status"], time.time() - t0)
    finally:
        progress.close()
    out.write("cells: " + ", ".join("%s %d" % (k, v) for k, v in counts.items() if v) + "\n")
    for rec in read_records(path):
        if rec.get("status") in ("failed", "timeout", "oom"):
            out.write("  %s %s/%s/%s %s: %s\n" % (rec["status"], rec["framework"], rec["model"],
                                                 rec["strategy"], rec["task"], rec["reason"]))
    return 1 if counts.get("failed") else 0
