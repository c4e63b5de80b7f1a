"""Faults, with real processes: records are never lost or mislabelled, and bad input is refused.

Each class of fault from issue 14 has a test here: kill -9 of the runner and of
a cell, SIGHUP/SIGTERM, a torn last line, a corrupt middle line, two runs at
once, a full disk (a tiny tmpfs; skipped where mount is refused), memory
exhaustion (a memory cgroup; skipped where one cannot be made), impossible
timings (NaN, zero, negative) and every bad command-line value. Cells use the
numpy framework, the smoke preset and a synthetic task (under a second each);
the test-only knob ``BENCH_TEST_CELL_FAULT`` (bench/cell.py) makes a cell
slow or misbehave.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.records import (GENERATIONS, RECORDS, TORN, RecordsError, append_record, latest,
                           read_records, repair_tail, scan)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--preset", "smoke", "--frameworks", "numpy", "--tasks", "synth-left-8"]
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl")


def _env(fault=None, **extra):
    env = dict(os.environ, PYTHONPATH=ROOT, **extra)
    env.pop("BENCH_TEST_CELL_FAULT", None)
    if fault:
        env["BENCH_TEST_CELL_FAULT"] = fault
    return env


def _bench(*args, fault=None, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "bench"] + list(args), cwd=ROOT, env=_env(fault),
                          capture_output=True, text=True, timeout=timeout, **kw)


def _start(*args, fault=None, **extra):
    return subprocess.Popen([sys.executable, "-m", "bench"] + list(args), cwd=ROOT,
                            env=_env(fault, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(predicate, seconds=60.0, what="condition"):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s" % what)


def _cell_pids(out):
    """Live cell processes whose result file lies in out (found through /proc)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"cell" in argv[1:4] and any(out.encode() in a for a in argv) and _alive(int(name)):
            pids.append(int(name))
    return pids


def _alive(pid):
    """Running (a zombie waiting for init to reap it is dead)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _idle_cell(out):
    """A cell of out that has started and is idle in its test-fault sleep (not still starting:
    a runner killed that early is caught by the cell's own getppid check, not by prctl)."""
    cells = _wait(lambda: _cell_pids(out), what="a cell")
    pid, seen, deadline = cells[0], [], time.time() + 60

    def sample():
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])   # state, utime + stime
    while time.time() < deadline:
        seen.append(sample())
        if len(seen) >= 6 and all(s == ("S", seen[-1][1]) for s in seen[-6:]):
            return pid
        time.sleep(0.1)
    raise AssertionError("the cell never went idle: %s" % seen[-6:])


def _no_cell_files(out):
    return [n for n in os.listdir(out) if n.startswith(".cell-")] == []


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _ids(out):
    return [r["cell_id"] for r in read_records(os.path.join(out, RECORDS))]


# --- killed runners and cells ------------------------------------------------------


@LINUX
def test_kill_9_of_the_runner_leaves_no_cell_no_temp_file_and_no_lock(tmp_path):
    out = str(tmp_path / "run")
    private_tmp = tmp_path / "tmp"      # whatever the runner or its cell puts in a temp dir lands here
    private_tmp.mkdir()
    runner = _start("run", *FAST, "--models", "lstm", "treelstm", "--out", out, fault="sleep:60",
                    TMPDIR=str(private_tmp))
    try:
        cell = _idle_cell(out)
        runner.kill()                       # SIGKILL: no handler runs in the runner
        runner.communicate()
        _wait(lambda: not _alive(cell), seconds=10, what="the orphaned cell to die")
    finally:
        _stop(runner)
    assert _no_cell_files(out) and os.listdir(str(private_tmp)) == []
    # the lock died with the runner; --dry-run --resume lists only what is left
    dry = _bench("run", *FAST, "--models", "lstm", "treelstm", "--out", out, "--resume", "--dry-run")
    assert dry.returncode == 0 and len(dry.stdout.splitlines()) == 7   # nothing was recorded yet
    res = _bench("run", *FAST, "--models", "lstm", "treelstm", "--out", out, "--resume")
    assert res.returncode == 0, res.stderr
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == 7


@LINUX
def test_kill_9_of_a_cell_is_recorded_as_crashed_and_retried_on_request(tmp_path):
    out = str(tmp_path / "run")
    args = ["run", *FAST, "--models", "lstm", "--out", out]
    runner = _start(*args, fault="sleep:60")
    try:
        cell = _idle_cell(out)
        os.kill(cell, signal.SIGKILL)
        _, err = runner.communicate(timeout=60)
    finally:
        _stop(runner)
    assert runner.returncode == 1, err
    recs = {(r["model"], r["strategy"]): r for r in read_records(os.path.join(out, RECORDS))}
    crashed = recs[("lstm", "loop")]
    assert crashed["status"] == "crashed" and crashed["reason"] == "killed by signal 9 (SIGKILL)"
    assert recs[("lstm", "fused")]["status"] == "not-applicable"   # the run went on
    assert "crashed numpy/lstm/loop" in err and _no_cell_files(out)
    # a resume that runs nothing still fails: an earlier part of the run crashed
    again = _bench(*args, "--resume")
    assert again.returncode == 1 and "4 of 4 cells already recorded" in again.stderr
    dry = _bench(*args, "--resume", "--retry-failed", "--dry-run")
    assert dry.stdout.split() == ["numpy/lstm/loop", "synth-left-8", "b8", "cpu"]
    retry = _bench(*args, "--resume", "--retry-failed")
    assert retry.returncode == 0, retry.stderr
    assert "rerunning 1 that failed" in retry.stderr
    raw = read_records(os.path.join(out, RECORDS))
    assert len(raw) == 5                      # the crashed record stays; the new one follows
    final = {(r["model"], r["strategy"]): r["status"] for r in latest(raw)}
    assert final[("lstm", "loop")] == "ok"    # last record wins
    from bench.runs import load_run
    assert [r["status"] for r in load_run(out)[0] if r["strategy"] == "loop"] == ["ok"]


@LINUX
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_sighup_and_sigterm_stop_the_run_cleanly(tmp_path, sig):
    out = str(tmp_path / "run")
    runner = _start("run", *FAST, "--models", "lstm", "--out", out, fault="sleep:60")
    try:
        cell = _idle_cell(out)
        runner.send_signal(sig)
        _, err = runner.communicate(timeout=30)
        _wait(lambda: not _alive(cell), seconds=10, what="the cell to die")
    finally:
        _stop(runner)
    assert runner.returncode == 130 and "interrupted" in err
    assert "Traceback" not in err and _no_cell_files(out)


def test_a_cell_past_its_timeout_is_recorded_as_timeout(tmp_path):
    out = str(tmp_path / "run")
    res = _bench("run", *FAST, "--models", "lstm", "--strategies", "loop", "--timeout", "1",
                 "--out", out, fault="sleep:60")
    assert res.returncode == 1
    (rec,) = read_records(os.path.join(out, RECORDS))
    assert rec["status"] == "timeout" and rec["reason"] == "no result after 1 s"


@LINUX
def test_the_cell_watchdog_ends_a_cell_at_its_own_deadline_or_without_its_parent():
    code = ("import os, sys, time; from bench.cell import guard; "
            "guard(int(sys.argv[1]), 0.0, grace_s=0.3); time.sleep(30)")
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", code, str(os.getpid())], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 124 and "own deadline passed" in res.stderr
    assert time.time() - t0 < 10
    # a parent that is already gone (here: not the expected one) ends the cell at once
    res = subprocess.run([sys.executable, "-c", code, "1"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 124 and res.stderr == ""


# --- torn and corrupt record files -----------------------------------------------------


def test_a_torn_last_line_is_moved_aside_on_resume_and_nothing_is_glued(tmp_path):
    out = str(tmp_path / "run")
    assert _bench("run", *FAST, "--models", "lstm", "--out", out).returncode == 0
    path = os.path.join(out, RECORDS)
    good = open(path, "rb").read()
    fragment = b'{"schema_version": 2, "cell_id": "0123", "framew'
    with open(path, "ab") as fh:
        fh.write(fragment)
    # readers name the torn line and read the rest (--force: cells timed on a busy machine
    # are `noisy`, which compare leaves unjudged; this test is about the torn line)
    cmp_ = _bench("compare", out, out, "--force")
    assert cmp_.returncode == 0 and "records.jsonl:5: torn last line" in cmp_.stderr
    res = _bench("run", *FAST, "--models", "lstm", "treelstm", "--out", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert "records.jsonl:5: torn last line (%d bytes" % len(fragment) in res.stderr and TORN in res.stderr
    data = open(path, "rb").read()
    assert data.startswith(good) and fragment not in data
    records, problems = scan(path)
    assert problems == [] and len(records) == 7 and len({r["cell_id"] for r in records}) == 7
    torn = open(os.path.join(out, TORN), "rb").read()
    assert torn.endswith(fragment + b"\n") and b"from byte offset %d" % len(good) in torn


def test_repair_tail_keeps_a_complete_last_record_and_adds_its_newline(tmp_path):
    path = str(tmp_path / RECORDS)
    rec = {"schema_version": 2, "cell_id": "a", "framework": "numpy", "model": "lstm",
           "strategy": "loop", "task": "sst", "device": "cpu", "batch_size": 1, "threads": 1,
           "status": "ok"}
    with open(path, "w") as fh:
        fh.write(json.dumps(rec))             # no newline
    assert "added one" in repair_tail(path)
    append_record(path, dict(rec, cell_id="b"))
    assert [r["cell_id"] for r in read_records(path)] == ["a", "b"]
    assert repair_tail(path) is None


GOOD = {"schema_version": 2, "cell_id": "c1", "framework": "numpy", "model": "lstm",
        "strategy": "loop", "task": "sst", "device": "cpu", "batch_size": 8, "threads": 2,
        "status": "ok"}


@pytest.mark.parametrize("line,what", [
    (b'{"schema_version": 2, "cell_id": ', "not JSON"),
    (b"[1, 2]", "not a JSON object (a list)"),
    (b"NaN", "not a JSON object (a float)"),
    (json.dumps(dict(GOOD, status="exploded")).encode(), "unknown status 'exploded'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "status"}).encode(),
     "missing required field status"),
    (json.dumps(GOOD).encode().replace(b"numpy", b"num\xffpy"), "not UTF-8 (0xff at byte"),
])
def test_every_kind_of_corrupt_middle_line_is_named_with_file_and_line(tmp_path, line, what):
    path = str(tmp_path / RECORDS)
    with open(path, "wb") as fh:
        for body in (json.dumps(GOOD).encode(), line, json.dumps(dict(GOOD, cell_id="c2")).encode()):
            fh.write(body + b"\n")
    with pytest.raises(RecordsError) as info:
        read_records(path)
    assert "%s:2: " % path in str(info.value) and what in str(info.value)
    warned = []
    assert [r["cell_id"] for r in read_records(path, skip_corrupt=True, warn=warned.append)] == \
        ["c1", "c2"]
    assert len(warned) == 1 and warned[0].startswith("skipped %s:2: " % path)


def test_an_unknown_schema_is_refused_even_when_skipping_corrupt_lines(tmp_path):
    path = str(tmp_path / RECORDS)
    with open(path, "w") as fh:
        fh.write(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, schema_version=3)) + "\n")
    for skip in (False, True):
        with pytest.raises(RecordsError, match=r"records.jsonl:2: schema_version 3 is not one"):
            read_records(path, skip_corrupt=skip)
    res = _bench("compare", path, path, "--skip-corrupt")
    assert res.returncode == 2 and "schema_version 3" in res.stderr


def test_a_corrupt_middle_line_is_never_deleted_and_every_reader_refuses(tmp_path):
    out = str(tmp_path / "run")
    args = ["run", *FAST, "--models", "lstm", "--out", out]
    assert _bench(*args).returncode == 0
    path = os.path.join(out, RECORDS)
    lines = open(path, "rb").read().splitlines(keepends=True)
    lines[1] = lines[1][:40] + b"\xff garbage\n"
    corrupt = b"".join(lines)
    with open(path, "wb") as fh:
        fh.write(corrupt)
    where = "%s:2: " % path
    for cmd in (args + ["--resume"], args + ["--resume", "--dry-run"], ["report", out],
                ["compare", out, out]):
        res = _bench(*cmd)
        assert res.returncode == 2, (cmd, res.stderr)
        assert where in res.stderr and "--skip-corrupt" in res.stderr and "Traceback" not in res.stderr
    assert open(path, "rb").read() == corrupt
    res = _bench(*args, "--resume", "--skip-corrupt")
    assert res.returncode == 0 and "skipped " + where in res.stderr
    data = open(path, "rb").read()
    assert data.startswith(corrupt)           # kept as it was; the skipped cell ran again
    assert len(read_records(path, skip_corrupt=True, warn=lambda s: None)) == 4


# --- one run per directory, generations ---------------------------------------------------


@LINUX
def test_two_runs_on_one_directory_the_second_is_refused_naming_the_first(tmp_path):
    out = str(tmp_path / "run")
    first = _start("run", *FAST, "--models", "lstm", "--out", out, fault="sleep:60")
    try:
        _idle_cell(out)
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = _bench("run", *FAST, "--models", "lstm", "--out", out, *extra)
            assert second.returncode == 2, second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
            assert "in use by another run (PID %d" % first.pid in second.stderr
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    finally:
        _stop(first)
    res = _bench("run", *FAST, "--models", "lstm", "--out", out, "--resume")
    assert res.returncode == 0, res.stderr


def test_a_non_empty_out_needs_resume_or_overwrite_and_overwrite_keeps_generations(tmp_path):
    out = str(tmp_path / "run")
    args = ["run", *FAST, "--models", "lstm", "--out", out]
    assert _bench(*args).returncode == 0
    first = open(os.path.join(out, RECORDS), "rb").read()
    refused = _bench(*args)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    for n in (1, 2):
        res = _bench(*args, "--overwrite")
        assert res.returncode == 0 and "%s/%d" % (GENERATIONS, n) in res.stderr
    kept = os.path.join(out, GENERATIONS, "1")
    assert sorted(os.listdir(kept)) == ["env.json", RECORDS]
    assert open(os.path.join(kept, RECORDS), "rb").read() == first
    # report and compare read the current run only; a generation is read when named
    from bench.runs import load_run
    assert len(load_run(out)[0]) == 4 and len(load_run(kept)[0]) == 4
    assert {r["run"] for r in load_run(str(tmp_path))[0]} == {"run"}


# --- a full disk --------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs, filled so that `pages` 4 KiB pages stay free (set by the test)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): %s" % res.stderr.strip())

    def fill(pages):
        fd = os.open(str(mnt / "filler"), os.O_WRONLY | os.O_CREAT)
        size = 0
        try:
            while True:
                size += os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        os.ftruncate(fd, size - pages * 4096)
        os.close(fd)
        return str(mnt / "filler")
    try:
        yield mnt, fill
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@LINUX
@pytest.mark.parametrize("models,strategies,pages,where", [
    # four not-applicable cells: the fourth page (after .lock, env.json and two records) runs out
    (["lstm", "treelstm"], ["fused", "compiled", "levels"], 3, RECORDS),
    # one real cell: the disk is full when the cell writes its result
    (["lstm"], ["loop"], 2, "(the cell's result)"),
])
def test_a_full_disk_stops_the_run_without_a_half_record_and_resume_completes(
        tiny_disk, models, strategies, pages, where):
    mnt, fill = tiny_disk
    out = str(mnt / "run")
    args = ["run", *FAST, "--models", *models, "--strategies", *strategies, "--out", out]
    os.mkdir(out)
    filler = fill(pages)
    res = _bench(*args)
    assert res.returncode == 3, res.stderr
    msg = res.stderr.strip().splitlines()[-1]
    assert msg.startswith("error: disk full while ") and where in msg
    assert msg.endswith("rerun with --resume when space is free") and "Traceback" not in res.stderr
    path = os.path.join(out, RECORDS)
    if os.path.exists(path):
        data = open(path, "rb").read()
        records, problems = scan(path)
        assert problems == [] and (data == b"" or data.endswith(b"\n"))
        assert "%d cells recorded" % len(records) in msg
    assert _no_cell_files(out)
    os.unlink(filler)
    again = _bench(*args, "--resume")
    assert again.returncode == 0, again.stderr
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == (4 if len(models) == 2 else 1)


# --- memory exhaustion ------------------------------------------------------------------------


def _memory_cgroup(tmp_name):
    """A v1 or v2 memory cgroup below ours with a 300 MiB limit, or None where none can be made."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, limits = "/sys/fs/cgroup/memory" + rel, ("memory.limit_in_bytes",
                                                          "memory.memsw.limit_in_bytes")
        elif controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            base, limits = "/sys/fs/cgroup" + rel, ("memory.max", "memory.swap.max")
        else:
            continue
        path = os.path.join(base, tmp_name)
        try:
            os.mkdir(path)
        except OSError:
            continue
        try:
            for name in limits:
                if os.path.exists(os.path.join(path, name)):
                    with open(os.path.join(path, name), "w") as fh:
                        fh.write(str(300 << 20) if "swap" not in name else "0")
            return path
        except OSError:
            os.rmdir(path)
    return None


@LINUX
def test_a_cell_killed_by_the_memory_cgroup_is_oom_with_its_evidence(tmp_path):
    group = _memory_cgroup("bench-test-oom-%d" % os.getpid())
    if group is None:
        pytest.skip("no memory cgroup can be made here (needs root and a memory controller)")
    out = str(tmp_path / "run")
    try:
        # the runner (and so its cell) joins the limited cgroup before it starts
        res = subprocess.run(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', group, sys.executable, "-m",
             "bench", "run", *FAST, "--models", "lstm", "--strategies", "loop", "--out", out],
            cwd=ROOT, env=_env("alloc:2048"), capture_output=True, text=True, timeout=120)
    finally:
        _wait(lambda: not open(os.path.join(group, "cgroup.procs")).read().strip(), seconds=10,
              what="the cgroup to empty")
        os.rmdir(group)
    assert res.returncode == 1, res.stderr
    (rec,) = read_records(os.path.join(out, RECORDS))
    assert rec["status"] == "oom", rec["reason"]
    assert "oom_kill count rose" in rec["reason"] and "killed by signal 9" in rec["reason"]


@LINUX
def test_a_memory_error_in_the_cell_is_oom(tmp_path):
    # (a bare SIGKILL is `crashed`: test_kill_9_of_a_cell_is_recorded_as_crashed_...)
    out = str(tmp_path / "run")
    # a 1 GB address-space limit on the runner (and its cell): the allocation raises MemoryError
    res = subprocess.run(
        ["sh", "-c", "ulimit -v 1000000 && exec \"$@\"", "sh", sys.executable, "-m", "bench", "run",
         *FAST, "--models", "lstm", "--strategies", "loop", "--out", out],
        cwd=ROOT, env=_env("alloc:2048"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    (rec,) = read_records(os.path.join(out, RECORDS))
    assert rec["status"] == "oom" and rec["reason"] == "MemoryError in the cell"
    assert rec["info"]["test_fault"] == "alloc:2048"


# --- impossible timings ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "0", "-1"])
def test_a_non_finite_or_non_positive_throughput_fails_the_cell(tmp_path, value):
    out = str(tmp_path / "run")
    res = _bench("run", *FAST, "--models", "lstm", "--strategies", "loop", "--out", out,
                 fault="timing:" + value)
    assert res.returncode == 1
    (rec,) = read_records(os.path.join(out, RECORDS))
    assert rec["status"] == "failed"
    assert rec["reason"].startswith("timed passes gave non-finite or non-positive numbers: "
                                    "infer_samples_per_s has ")
    assert rec["info"]["test_fault"] == "timing:" + value


def test_compare_never_calls_nan_samples_no_change(tmp_path):
    base = [dict(GOOD, cell_id="a", infer_samples_per_s=[100.0, 101.0, 99.0, 100.2, 99.8]),
            dict(GOOD, cell_id="b", infer_samples_per_s=[100.0, 101.0, 99.0, 100.2, 99.8])]
    new = [dict(GOOD, cell_id="a", infer_samples_per_s=[float("nan")] * 5),
           dict(GOOD, cell_id="b", infer_samples_per_s=[100.0, 100.5, 99.5, 100.1, 99.9])]
    for name, recs in (("base.jsonl", base), ("new.jsonl", new)):
        with open(str(tmp_path / name), "w") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    res = _bench("compare", str(tmp_path / "base.jsonl"), str(tmp_path / "new.jsonl"))
    assert res.returncode == 1 and "lost cells" in res.stdout
    assert "infer_samples_per_s in NEW has 0 finite samples of 5" in res.stdout
    assert res.stdout.count("no change") == 1          # only cell b, whose samples are finite
    swapped = _bench("compare", str(tmp_path / "new.jsonl"), str(tmp_path / "base.jsonl"))
    assert "not compared" in swapped.stderr and "BASE has 0 finite samples of 5" in swapped.stderr
    assert swapped.stdout.count("no change") == 1


# --- bad command lines -------------------------------------------------------------------------


BAD_RUN = [
    ["--batch-sizes", "0"], ["--batch-sizes", "-4"], ["--batch-sizes", "2.5"], ["--batch-sizes", "nan"],
    ["--batch-sizes", "inf"], ["--batch-sizes", "1_0"], ["--batch-sizes", "\u0663"], ["--batch-sizes", ""],
    ["--batch-sizes", "8,,16"],
    ["--threads", "0"], ["--threads", "-1"], ["--threads", "1.5"], ["--threads", "nan"], ["--threads", "inf"],
    ["--repeats", "0"], ["--repeats", "-2"], ["--repeats", "3.0"], ["--repeats", "nan"], ["--repeats", "inf"],
    ["--timeout", "0"], ["--timeout", "-5"], ["--timeout", "0.5"], ["--timeout", "nan"], ["--timeout", "inf"],
    ["--epochs", "-1"], ["--epochs", "nan"], ["--epochs", "inf"], ["--epochs", "x"],
    ["--frameworks", ""], ["--frameworks", "caffe3"], ["--models", ","], ["--models", "gru"],
    ["--strategies", ""], ["--tasks", " , "], ["--tasks", "imdb"], ["--preset", "huge"],
    ["--batch-sizes", "201"],                        # synth-left-8 trains on 200 examples
    ["--resume", "--overwrite"], ["--retry-failed"],
    ["--out", "FILE"], ["--out", "FILE/sub"],
    ["--fastest-from", "NOWHERE"],
]


@pytest.mark.parametrize("bad", BAD_RUN, ids=lambda a: " ".join(a) or "empty")
def test_every_bad_run_value_is_one_line_and_exit_2(tmp_path, bad):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    bad = [a.replace("FILE", str(afile)).replace("NOWHERE", str(tmp_path / "none")) for a in bad]
    out = [] if "--out" in bad else ["--out", str(tmp_path / "run")]
    res = _bench("run", *FAST, *out, *bad)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert not os.path.exists(str(tmp_path / "run"))     # refused before any work
    if "201" in bad:
        assert "training split (200 examples)" in lines[0]


@pytest.mark.parametrize("threshold", ["nan", "inf%", "0", "-5%", "150%", "mean:5%", "x"])
def test_a_bad_compare_threshold_is_one_line_and_exit_2(threshold):
    golden = os.path.join(ROOT, "tests", "data", "golden", RECORDS)
    res = _bench("compare", golden, golden, "--threshold", threshold)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "threshold" in res.stderr and "Traceback" not in res.stderr


@LINUX
def test_a_read_only_out_is_refused_up_front(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(ro)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root): %s" % res.stderr.strip())
    try:
        for out in (str(ro), str(ro / "sub")):
            bad = _bench("run", *FAST, "--out", out)
            assert bad.returncode == 2 and "not writable" in bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_tracebacks_only_with_debug(tmp_path):
    corrupt = tmp_path / RECORDS
    corrupt.write_text("{oops\n" + json.dumps(GOOD) + "\n")
    plain = _bench("compare", str(corrupt), str(corrupt))
    debug = _bench("--debug", "compare", str(corrupt), str(corrupt))
    after = _bench("compare", str(corrupt), str(corrupt), "--debug")
    assert plain.returncode == debug.returncode == after.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr and "Traceback" in after.stderr
