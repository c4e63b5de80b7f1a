"""The one home of run records: layout, reading, writing, the lock and generations.

A run directory holds::

    records.jsonl        one JSON object per line, one line per finished cell (append-only)
    env.json             the machine and versions the run ran on
    records.jsonl.torn   fragments of torn last lines that ``--resume`` moved aside
    .lock                held (flock) by the run writing here; names its PID
    .generations/N/      earlier runs that ``--overwrite`` kept (never read by report/compare)

Guarantees, and how they are kept:

* A record is written as one ``os.write`` of the complete line on an
  ``O_APPEND`` descriptor, then fsynced; if the write or the fsync fails (a
  full disk) the file is truncated back to its size before the write, so no
  half record stays behind.
* A record once written is never changed or dropped: readers report every
  line they cannot use with file and line number and refuse (``RecordsError``)
  unless told to skip corrupt lines, and even then name each one. Only a torn
  *last* line (a write cut short by a kill) is isolated, by ``repair_tail``.
* Readers take the *last* record of a cell_id ("last record wins"): that is
  how ``--retry-failed`` replaces a failed cell without rewriting the file.
* One writer per directory (``RunLock``); ``--overwrite`` moves the earlier
  run into a numbered generation instead of deleting it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented in README)
    fcntl = None

# 2: statuses `crashed` and `lost` exist, `oom` needs evidence. Timing fields are unchanged
# from 1, so records of both versions are read and compared together.
SCHEMA_VERSION = 2
KNOWN_SCHEMAS = (1, 2)

STATUSES = ("ok", "failed", "timeout", "oom", "crashed", "unavailable", "not-applicable", "lost")
# A cell with one of these as its last record did not complete: it makes `run` exit 1 and
# `--resume --retry-failed` runs it again. `lost`: a cluster node died mid-cell.
FAILED = ("failed", "timeout", "oom", "crashed", "lost")
REQUIRED_FIELDS = ("schema_version", "cell_id", "framework", "model", "strategy", "task",
                   "device", "batch_size", "threads", "status")

RECORDS = "records.jsonl"
ENV = "env.json"
TORN = RECORDS + ".torn"
LOCK = ".lock"
GENERATIONS = ".generations"
CELL_TEMP_PREFIX = ".cell-"   # a cell's result file while the runner waits for it
# What a run or a report writes at the top of a run directory: what --overwrite keeps aside.
RUN_OUTPUTS = (RECORDS, ENV, TORN, "report.md", "summary.csv")


class Problem(NamedTuple):
    """A record line that cannot be used. kind: corrupt | torn | schema."""

    path: str
    line: int
    kind: str
    what: str

    def __str__(self) -> str:
        return "%s:%d: %s" % (self.path, self.line, self.what)


class RecordsError(ValueError):
    """Records that cannot be read as they are: a refusal (exit 2), listing every location."""

    def __init__(self, problems: Sequence[Problem], hint: str = ""):
        self.problems = list(problems)
        shown = [str(p) for p in self.problems[:20]]
        if len(self.problems) > 20:
            shown.append("... and %d more" % (len(self.problems) - 20))
        head = "%d unusable record line%s%s" % (len(self.problems),
                                               "" if len(self.problems) == 1 else "s",
                                               " (%s)" % hint if hint else "")
        super().__init__(head + ":\n  " + "\n  ".join(shown))


class EnvironmentProblem(RuntimeError):
    """The machine failed a run (full disk, unwritable directory): exit 3, records intact."""


def _warn(text: str) -> None:
    sys.stderr.write("warning: %s\n" % text)


def parse_line(raw: bytes) -> Tuple[Optional[Dict], Optional[str], str]:
    """(record, None, "") for a good line; (None, what is wrong, kind) otherwise."""
    rec, what = _json_object(raw)
    if rec is None:
        return None, what, "corrupt"
    what, kind = _field_problem(rec)
    if what:
        return None, what, kind
    return rec, None, ""


def _json_object(raw: bytes) -> Tuple[Optional[Dict], Optional[str]]:
    """(the line as a JSON object, None), or (None, why it is not one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "bytes that are not UTF-8 (0x%02x at byte %d)" % (
            raw[exc.start], exc.start + 1)
    try:
        rec = json.loads(text)
    except ValueError as exc:
        where = " at column %d" % exc.colno if hasattr(exc, "colno") else ""
        return None, "not JSON: %s%s" % (getattr(exc, "msg", str(exc)), where)
    if not isinstance(rec, dict):
        return None, "not a JSON object (a %s)" % type(rec).__name__
    return rec, None


def _field_problem(rec: Dict) -> Tuple[Optional[str], str]:
    """(what keeps a JSON object from being a record, its kind); (None, "") when nothing."""
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        return "missing required field%s %s" % ("s" if len(missing) > 1 else "",
                                                ", ".join(missing)), "corrupt"
    version = rec["schema_version"]
    if isinstance(version, bool) or version not in KNOWN_SCHEMAS:
        return ("schema_version %r is not one this bench reads (%s): written by another "
                "version of bench" % (version, ", ".join(map(str, KNOWN_SCHEMAS)))), "schema"
    if rec["status"] not in STATUSES:
        return "unknown status %r" % (rec["status"],), "corrupt"
    if not isinstance(rec["cell_id"], str) or not rec["cell_id"]:
        return "cell_id is not a non-empty string", "corrupt"
    return None, ""


def scan(path: str) -> Tuple[List[Dict], List[Problem]]:
    """Every usable record of a file and every problem, in file order; never raises on content.

    A last line without its newline that does not parse is ``torn`` (a write cut
    short); one that parses is a complete record. Blank lines carry nothing.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    tail = lines.pop()   # b"" when the file ends with a newline
    records, problems = [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        rec, what, kind = parse_line(raw)
        if rec is None:
            problems.append(Problem(path, number, kind, what))
        else:
            records.append(rec)
    if tail.strip():
        rec, what, kind = parse_line(tail)
        if rec is not None:
            records.append(rec)
        elif kind == "schema":
            problems.append(Problem(path, len(lines) + 1, kind, what))
        else:
            problems.append(Problem(path, len(lines) + 1, "torn", (
                "torn last line (%d bytes without a newline, %s): a write cut short; "
                "`bench run --resume` moves it to %s" % (len(tail), what, TORN))))
    return records, problems


def read_records(path: str, skip_corrupt: bool = False,
                 warn: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Records of one file, in file order (duplicates of a cell_id included; see ``latest``).

    A record of an unknown schema always refuses; a corrupt line refuses unless
    ``skip_corrupt``, and is then named through ``warn``; a torn last line is
    named and left out (it holds no complete record). A missing file has none.
    """
    warn = warn or _warn
    if not os.path.exists(path):
        return []
    records, problems = scan(path)
    schema = [p for p in problems if p.kind == "schema"]
    if schema:
        raise RecordsError(schema, "records of an unknown schema are never skipped")
    corrupt = [p for p in problems if p.kind == "corrupt"]
    if corrupt and not skip_corrupt:
        raise RecordsError(corrupt, "pass --skip-corrupt to read past them; each is then named")
    for p in problems:
        if p.kind == "corrupt":
            warn("skipped %s" % (p,))
        else:
            warn(str(p))
    return records


def latest(records: Iterable[Dict]) -> List[Dict]:
    """One record per cell_id: the last one (a retried cell's new record replaces the old)."""
    by_id: Dict[str, Dict] = {}
    for rec in records:
        by_id.pop(rec["cell_id"], None)   # re-insert: order follows the last appearance
        by_id[rec["cell_id"]] = rec
    return list(by_id.values())


def run_files(run_dir: str) -> List[str]:
    """Every records file under run_dir, sorted; hidden directories (.generations) excluded.

    Earlier generations are kept for people, never merged into a report or a
    comparison; name one explicitly (``report OUT/.generations/1``) to read it.
    """
    found = []
    for here, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if RECORDS in files:
            found.append(os.path.join(here, RECORDS))
    return sorted(found)


def finite_samples(xs) -> List[float]:
    """The samples a statistic may use: numbers that are finite (None, NaN, inf dropped)."""
    out = []
    for x in xs or ():
        if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
            out.append(float(x))
    return out


# --- writing ------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode(record: Dict) -> bytes:
    """One record line (ASCII JSON, sorted keys, NaN kept as NaN so nothing is hidden)."""
    return (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode("ascii")


def append_record(path: str, record: Dict) -> None:
    """Append one record durably, or leave the file as it was and raise OSError."""
    data = encode(record)
    created = not os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):   # a full disk can take part of a write
                raise OSError(errno.ENOSPC, "%s (wrote %d of %d bytes)"
                              % (os.strerror(errno.ENOSPC), written, len(data)))
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)
    if created:
        _fsync_dir(os.path.dirname(path))


def atomic_write(path: str, data, mode: int = 0o644) -> None:
    """Replace path with data (str or bytes) all at once: a temp file in its directory, then rename."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def repair_tail(path: str) -> Optional[str]:
    """Before appending: make sure the file ends with a newline, so no record is glued on.

    A torn last line is appended to ``records.jsonl.torn`` (with its byte offset)
    and cut from the records file; a complete last record that lacks only its
    newline gets one. Returns what was done, in one line, or None.
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path, "rb") as fh:
        data = fh.read()
    if data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    rec, _, _ = parse_line(tail)
    if rec is not None:
        with open(path, "ab") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return "%s: the last record lacked its newline; added one" % path
    torn = os.path.join(os.path.dirname(path), TORN)
    # The fragment is kept first, then cut: a crash in between leaves it in both, never neither.
    with open(torn, "ab") as fh:
        fh.write(b"# %d bytes from byte offset %d of %s, moved aside %s\n" % (
            len(tail), cut, RECORDS.encode(), time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime()).encode()))
        fh.write(tail + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    with open(path, "r+b") as fh:
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    line = data.count(b"\n") + 1
    return ("%s:%d: torn last line (%d bytes, a write cut short) moved to %s; the %d complete "
            "lines before it are kept" % (path, line, len(tail), torn, line - 1))


# --- one run per directory ------------------------------------------------------


class LockHeld(RuntimeError):
    """Another run holds the directory."""


class RunLock:
    """An exclusive flock on DIR/.lock that names its holder (PID, start time, command).

    The kernel releases a flock when its process dies, however it dies, so a
    killed run never leaves a stale lock. The file itself stays (deleting it
    would let two runs lock two different inodes of one name).
    """

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK)
        self.fd: Optional[int] = None

    def holder(self) -> str:
        for _ in range(5):   # the holder writes its line just after it locks
            try:
                with open(self.path, encoding="utf-8", errors="replace") as fh:
                    info = json.loads(fh.read() or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                return "PID %s, started %s: %s" % (info.get("pid"), info.get("started"),
                                                   info.get("command"))
            time.sleep(0.05)
        return "PID unknown"

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockHeld("%s is in use by another run (%s); wait for it to end or stop "
                                   "it" % (os.path.dirname(self.path) or ".", self.holder())) from None
                raise
        info = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode("utf-8"))
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)   # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- generations ----------------------------------------------------------------


def run_outputs(out_dir: str) -> List[str]:
    """Names at the top of out_dir that a run or a report wrote (what --overwrite keeps aside)."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    return sorted(n for n in names if n in RUN_OUTPUTS or n.endswith(".png"))


def occupied(out_dir: str) -> List[str]:
    """What makes out_dir non-empty for a fresh run: every entry whose name does not start
    with a dot (hidden ones are the lock, kept generations and scratch files, or not ours)."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    return sorted(n for n in names if not n.startswith("."))


def keep_generation(out_dir: str) -> Optional[str]:
    """Move the run outputs of out_dir into .generations/N (N one above the highest); returns
    that directory, or None when there was nothing to keep. Call with the lock held."""
    names = run_outputs(out_dir)
    if not names:
        return None
    root = os.path.join(out_dir, GENERATIONS)
    os.makedirs(root, exist_ok=True)
    taken = [int(n) for n in os.listdir(root) if n.isascii() and n.isdigit()]
    target = os.path.join(root, str(max(taken, default=0) + 1))
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(target, name))
    _fsync_dir(target)
    _fsync_dir(out_dir)
    return target


def remove_stale_cell_files(out_dir: str) -> List[str]:
    """Result files of cells whose runner died (call with the lock held: no live cell owns one)."""
    removed = []
    for name in os.listdir(out_dir):
        if name.startswith(CELL_TEMP_PREFIX):
            try:
                os.unlink(os.path.join(out_dir, name))
                removed.append(name)
            except OSError:
                pass
    return removed
