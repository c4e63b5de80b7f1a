"""A real Ray cluster on this machine: ``bench run --executor ray`` end to end.

The fixture starts a head and two worker nodes with ``ray start`` (one
``bench_slot`` each, no dashboard, small object stores) inside a private
network namespace that holds only ``lo`` (``unshare --net``): every address
the cluster uses is a loopback address (head 127.0.0.2, workers 127.0.0.3 and
127.0.0.4; Ray rewrites 127.0.0.1 itself into the machine's outward address),
and nothing Ray tries to reach elsewhere (a cloud metadata service) can leave
the namespace. Every process of the cluster, the bench head included, lives in
that namespace, which is how the fixture finds and stops them (SIGKILL by PID
in a ``finally``), never by name: ``ray stop`` would stop every Ray process on
the machine.

What is checked, with the smoke preset and the NumPy framework:

* a Ray run's records equal a local run's in everything but timings and node
  fields; static cells never leave the head;
* Ctrl-C on the head cancels the cells in flight (their processes end), keeps
  the records whole, and a local ``--resume`` completes the run;
* a local run resumed on the cluster, with one worker's raylet killed mid-cell:
  every cell ends with a record (retried on another node, or ``lost``), and no
  two cells ever run on one node at once;
* placement: GPU cells on a cluster without GPUs, and cells of a framework no
  node names in a labelled cluster, are recorded on the head; the others go
  only to the node that names their framework; a node without the framework's
  interpreter records the cell unavailable, naming the node.

Skipped, with the reason, where ray is not installed or no network namespace can
be made (not root); ``BENCH_REQUIRE_RAY=1`` (the ``tests_cluster`` nox session)
turns those skips into failures.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from bench import config
from bench.records import RECORDS, read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = os.environ.get("BENCH_REQUIRE_RAY") == "1"
HEAD_IP, WORKER_IPS, PORT = "127.0.0.2", ("127.0.0.3", "127.0.0.4"), 6379
SMOKE = ["--preset", "smoke", "--frameworks", "numpy"]
# What differs between two runs of the same cells: timings and where they ran.
TIMING_FIELDS = {"compile_s", "first_infer_s", "warmup_s", "train_samples_per_s", "infer_samples_per_s",
                 "train_tokens_per_s", "infer_tokens_per_s", "latency_ms", "latency_ms_p50",
                 "latency_ms_p95", "peak_rss_mb", "device_peak_mb", "gemm_flops", "wall_s",
                 "cell_wall_s", "load_avg_1m_at_start", "verify_s", "phase_s",
                 # how busy the machine was, and the passes that made each sample last long
                 # enough: they follow the load, not the code
                 "noise", "noisy", "train_wait_shares", "infer_wait_shares", "passes_per_sample",
                 # what the cell's time budget let run
                 "repeats_run", "repeats_cut", "warmup_passes_run"}
# machine_gemm_flops: measured by a local run's runner; on a cluster the nodes differ
NODE_FIELDS = {"machine", "executor", "machine_gemm_flops"}

# Brings lo up in the new namespace (SIOCGIFFLAGS / SIOCSIFFLAGS, no iproute2 needed), says
# so, and holds the namespace until its stdin closes.
HOLDER = r"""
import fcntl, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0))[:18])[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))
print("ready", flush=True)
sys.stdin.read()
"""


def _skip_or_fail(why):
    if REQUIRED:
        pytest.fail("BENCH_REQUIRE_RAY=1, but %s" % why)
    pytest.skip(why)


def _ray_bin():
    try:
        import ray  # noqa: F401  (only this test module imports it, to see that it is there)
    except ImportError as exc:
        _skip_or_fail("ray is not installed (%s): `nox -s tests_cluster` installs it" % exc)
    path = os.path.join(os.path.dirname(sys.executable), "ray")
    return path if os.path.exists(path) else shutil.which("ray")


def _netns_problem():
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        return "unshare/nsenter (util-linux) are not installed"
    try:
        res = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return "unshare --net failed: %s" % exc
    if res.returncode != 0:
        return "cannot make a private network namespace (unshare --net: %s)" % (
            res.stderr.strip() or res.returncode)
    return None


def _wait(predicate, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out after %d s waiting for %s" % (seconds, what))


def _argv(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def _stat(pid):
    """(state, parent pid, utime + stime) of a process, or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[11]) + int(fields[12])


class Cluster:
    """A head and two workers in a private network namespace; ``stop`` ends every process in it."""

    def __init__(self, ray_bin):
        self.ray_bin = ray_bin
        # Short: Ray puts Unix sockets under it (108 bytes at most per path).
        self.tmp = tempfile.mkdtemp(prefix="brt-")
        self.holder = None
        self.ns = None
        self.address = "%s:%d" % (HEAD_IP, PORT)

    def cmd(self, argv):
        return ["nsenter", "--net=/proc/%d/ns/net" % self.holder.pid, "--"] + list(argv)

    def env(self, **extra):
        env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0", **extra)
        for name in ("RAY_ADDRESS", "BENCH_TEST_CELL_FAULT"):
            env.pop(name, None)
        env.update(extra)
        return env

    def ray_start(self, *args):
        res = subprocess.run(self.cmd([self.ray_bin, "start", "--disable-usage-stats", "--num-gpus", "0",
                                       "--object-store-memory", str(80 * 2 ** 20)] + list(args)),
                             env=self.env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, "ray start %s failed:\n%s%s" % (args, res.stdout[-3000:],
                                                                     res.stderr[-3000:])

    def start(self):
        self.holder = subprocess.Popen(["unshare", "--net", "--", sys.executable, "-c", HOLDER],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        assert line.strip() == "ready", "the network namespace holder said %r" % line
        self.ns = os.readlink("/proc/%d/ns/net" % self.holder.pid)
        self.ray_start("--head", "--include-dashboard=false", "--node-ip-address", HEAD_IP,
                       "--port", str(PORT), "--num-cpus", "0", "--resources", json.dumps({"bench_slot": 1}),
                       "--temp-dir", os.path.join(self.tmp, "h"))
        for i, ip in enumerate(WORKER_IPS, start=1):
            self.add_worker(i, ip, {"bench_slot": 1})
        _wait(lambda: self.alive_nodes() == 3, 120, "three live nodes")

    def add_worker(self, number, ip, resources):
        self.ray_start("--address", self.address, "--node-ip-address", ip, "--num-cpus", "1",
                       "--resources", json.dumps(resources),
                       "--temp-dir", os.path.join(self.tmp, "w%d" % number))

    def alive_nodes(self):
        code = ("import ray, logging; ray.init(address=%r, logging_level=logging.ERROR, "
                "log_to_driver=False); print(sum(1 for n in ray.nodes() if n['Alive']))" % self.address)
        res = subprocess.run(self.cmd([sys.executable, "-c", code]), env=self.env(), cwd="/",
                             capture_output=True, text=True, timeout=120)
        lines = res.stdout.strip().splitlines()
        return int(lines[-1]) if res.returncode == 0 and lines else 0

    def members(self):
        """Every process in the cluster's network namespace but the holder."""
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != self.holder.pid:
                try:
                    if os.readlink("/proc/%s/ns/net" % name) == self.ns:
                        pids.append(int(name))
                except OSError:
                    pass
        return [p for p in pids if _stat(p) and _stat(p)[0] != "Z"]

    def raylet(self, worker):
        """PID of worker N's raylet (1 or 2), found by its temp dir."""
        tag = os.path.join(self.tmp, "w%d" % worker, "").encode()
        found = [p for p in self.members() if _argv(p)[:1] and _argv(p)[0].endswith(b"/raylet")
                 and any(tag in a for a in _argv(p))]
        assert len(found) == 1, "raylet of worker %d: %s" % (worker, found)
        return found[0]

    def cells(self):
        """{cell pid: its raylet's pid} for every `python -m bench cell` process in the cluster."""
        out = {}
        for pid in self.members():
            argv = _argv(pid)
            if b"bench" in argv[1:3] and b"cell" in argv[2:4]:
                worker = _stat(pid)
                raylet = _stat(worker[1]) if worker else None
                out[pid] = raylet[1] if raylet else None
        return out

    def stop(self):
        if self.holder is None:
            return
        try:
            for _ in range(50):   # a dying process may still spawn one; bounded
                pids = self.members()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.2)
            left = self.members()
        finally:
            self.holder.stdin.close()
            try:
                self.holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
            shutil.rmtree(self.tmp, ignore_errors=True)
        assert not left, "processes outlived the cluster: %s" % left

    def bench(self, *args, fault=None, timeout=600):
        """``python -m bench ARGS`` in the cluster's namespace; (returncode, stderr)."""
        extra = {"BENCH_TEST_CELL_FAULT": fault} if fault else {}
        res = subprocess.run(self.cmd([sys.executable, "-m", "bench"] + list(args)),
                             env=self.env(**extra), cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
        return res.returncode, res.stderr

    def start_bench(self, *args, fault=None):
        extra = {"BENCH_TEST_CELL_FAULT": fault} if fault else {}
        return subprocess.Popen(self.cmd([sys.executable, "-m", "bench"] + list(args)),
                                env=self.env(**extra), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cluster():
    ray_bin = _ray_bin()
    problem = _netns_problem()
    if problem:
        _skip_or_fail(problem)
    c = Cluster(ray_bin)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _ray_args(c, out):
    # The node interpreter is named, so both runs use the same numpy whatever .nox holds.
    return SMOKE + ["--executor", "ray", "--address", c.address, "--node-python",
                    "numpy=%s" % sys.executable, "--out", out]


def _planned(frameworks=("numpy",), models=None):
    """How many cells the smoke grid plans: the counts below follow the strategy tables."""
    return len([c for c in config.smoke(frameworks).cells() if models is None or c.model in models])


def _latest(out):
    recs = read_records(os.path.join(out, RECORDS))
    ids = [r["cell_id"] for r in recs]
    return {r["cell_id"]: r for r in recs}, ids


def _comparable(rec):
    out = {k: v for k, v in rec.items() if k not in TIMING_FIELDS | NODE_FIELDS}
    # where the data came from (SST parsed, or the parse cache an earlier cell wrote)
    out["info"] = {k: v for k, v in (out.get("info") or {}).items() if k != "data_source"}
    return out


def test_a_ray_run_records_what_a_local_run_records(cluster, tmp_path):
    local, remote = str(tmp_path / "local"), str(tmp_path / "ray")
    rc, err = cluster.bench("run", *SMOKE, "--out", local)
    assert rc == 0, err
    rc, err = cluster.bench("run", *_ray_args(cluster, remote))
    assert rc == 0, err
    a, a_ids = _latest(local)
    b, b_ids = _latest(remote)
    assert sorted(a_ids) == sorted(b_ids) and len(set(b_ids)) == len(b_ids) == _planned()
    for cid in a:
        assert _comparable(a[cid]) == _comparable(b[cid]), a[cid]["framework"] + a[cid]["model"]
    timed = [r for r in b.values() if r["status"] == "ok"]
    assert len(timed) == 4
    ips = {HEAD_IP} | set(WORKER_IPS)
    for r in timed:
        ex = r["executor"]
        assert ex["kind"] == "ray" and ex["node_ip"] in ips and ex["attempt"] == 1
        assert ex["python"] == sys.executable and ex["python_from"] == "--node-python"
        assert r["machine"]["hostname"] and r["machine"]["cores"] >= 1
    # Static cells are written by the head: no Ray task, no executor field.
    assert all("executor" not in r for r in b.values() if r["status"] == "not-applicable")
    with open(os.path.join(remote, "env.json")) as fh:
        env = json.load(fh)
    nodes = env["executor"]["nodes"]
    assert env["executor"]["kind"] == "ray" and sorted(n["ip"] for n in nodes) == sorted(ips)
    assert all(n["resources"]["bench_slot"] == 1 for n in nodes)


def test_ctrl_c_on_the_head_cancels_the_cells_and_a_local_resume_completes(cluster, tmp_path):
    out = str(tmp_path / "run")
    proc = cluster.start_bench("run", *_ray_args(cluster, out), fault="sleep:120")
    try:
        # Three nodes, three slots: three cells asleep at once, one on each node.
        running = _wait(lambda: len(set(cluster.cells().values())) == 3 and cluster.cells(), 180,
                        "a cell on every node")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted; finished cells are in the records file" in err
    # Cancelled with force: each task's worker is killed and its cell dies with it.
    _wait(lambda: not set(running) & set(cluster.cells()), 60, "the cancelled cells to end")
    recs, ids = _latest(out)
    assert all(r["status"] == "not-applicable" for r in recs.values()) and len(ids) == _planned() - 4
    with open(os.path.join(out, RECORDS), "rb") as fh:
        assert fh.read().endswith(b"\n")
    rc, err = cluster.bench("run", *SMOKE, "--out", out, "--resume")
    assert rc == 0, err
    recs, ids = _latest(out)
    assert len(ids) == len(set(ids)) == _planned()
    assert sorted(r["status"] for r in recs.values()).count("ok") == 4
    assert all("executor" not in r for r in recs.values())   # the resumed cells ran locally


def test_a_node_that_dies_mid_cell_leaves_no_cell_without_a_record(cluster, tmp_path):
    """Runs last: it kills worker 1 (the module's cluster has two nodes after it)."""
    out = str(tmp_path / "run")
    rc, err = cluster.bench("run", *SMOKE, "--models", "elman", "--out", out)   # a local start
    assert rc == 0, err
    proc = cluster.start_bench("run", *_ray_args(cluster, out), "--resume", fault="sleep:25")
    victim = cluster.raylet(1)
    most = [0]   # the most cells seen at once on one node

    def look():
        cells = cluster.cells()
        per_node = [list(cells.values()).count(r) for r in set(cells.values())]
        most[0] = max([most[0]] + per_node)
        return cells

    def asleep_on_victim():
        """A cell of worker 1 idle in its test-fault sleep (state S, no CPU time for a second)."""
        mine = [p for p, r in look().items() if r == victim]
        if not mine:
            return None
        before = _stat(mine[0])
        time.sleep(1.0)
        after = _stat(mine[0])
        return mine[0] if before and after and before[0] == after[0] == "S" and \
            before[2] == after[2] else None

    try:
        cell = _wait(asleep_on_victim, 180, "a cell asleep on worker 1")
        os.kill(victim, signal.SIGKILL)
        # The raylet's worker goes with it, and the cell with its worker (PDEATHSIG).
        _wait(lambda: _stat(cell) is None or _stat(cell)[0] == "Z", 60, "the dead node's cell to end")
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline:
            look()
            time.sleep(0.5)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 1), err
    assert most[0] == 1   # bench_slot: never two timed cells on one node
    recs, ids = _latest(out)
    assert len(ids) == len(set(ids)) == _planned(), "every cell once: %s" % ids
    done_on_ray = [r for r in recs.values() if r.get("executor")]
    assert len(done_on_ray) == 3   # lstm, rvnn and treelstm on the cluster; elman locally
    hit = [r for r in done_on_ray if r["executor"].get("attempt") == 2 or r["status"] == "lost"]
    assert len(hit) == 1, [(r["status"], r.get("executor")) for r in done_on_ray]
    rec = hit[0]
    print("the killed node's cell:", rec["status"], rec.get("reason"), rec["executor"])   # -s shows it
    if rec["status"] == "lost":
        assert rec["reason"].startswith("node died: ") and proc.returncode == 1
    else:
        assert rec["status"] == "ok" and proc.returncode == 0
        assert WORKER_IPS[0] in rec["executor"]["earlier_attempt"]
        assert rec["executor"]["node_ip"] != WORKER_IPS[0]


def test_cells_go_only_where_their_gpu_and_framework_label_are(cluster, tmp_path):
    """Runs after the kill test: the head, worker 2, and now worker 3 with labels."""
    gpu = str(tmp_path / "gpu")
    rc, err = cluster.bench("run", *_ray_args(cluster, gpu), "--models", "lstm", "--device", "gpu")
    assert rc == 0, err
    recs, ids = _latest(gpu)
    assert len(ids) == _planned(models=("lstm",)) and all("executor" not in r for r in recs.values())
    assert [r["reason"] for r in recs.values() if r["status"] == "unavailable"] == [
        "no node of the Ray cluster offers a GPU"]

    # A node without the framework's interpreter records the cell unavailable, naming itself.
    absent = str(tmp_path / "absent")
    rc, err = cluster.bench("run", *SMOKE, "--models", "lstm", "--executor", "ray", "--address",
                            cluster.address, "--node-python", "numpy=/nonexistent/bin/python",
                            "--out", absent)
    assert rc == 0, err
    recs, _ = _latest(absent)
    (rec,) = [r for r in recs.values() if r["strategy"] == "loop"]
    assert rec["status"] == "unavailable" and "not available on node" in rec["reason"]
    assert rec["executor"]["node_ip"] in rec["reason"] and "/nonexistent/bin/python" in rec["reason"]

    # One node names numpy (and a hyphenated name, as keras-torch's label is): the cluster is
    # now labelled, so numpy cells go there only and torch cells, which no node names, stay home.
    cluster.add_worker(3, "127.0.0.5", {"bench_slot": 1, "fw_numpy": 1, "fw_keras-torch": 1})
    _wait(lambda: cluster.alive_nodes() == 3, 120, "worker 3 to join")
    out = str(tmp_path / "labelled")
    rc, err = cluster.bench("run", *_ray_args(cluster, out), "--frameworks", "numpy", "torch",
                            "--models", "lstm", "rvnn")
    assert rc == 0, err
    recs, ids = _latest(out)
    assert len(ids) == len(set(ids)) == _planned(("numpy", "torch"), ("lstm", "rvnn"))
    timed = [r for r in recs.values() if r["status"] == "ok"]
    assert sorted(r["framework"] for r in timed) == ["numpy", "numpy"]
    assert {r["executor"]["node_ip"] for r in timed} == {"127.0.0.5"}
    torch = [r for r in recs.values() if r["framework"] == "torch"]
    assert len(torch) == _planned(("torch",), ("lstm", "rvnn"))
    assert all(r["status"] == "unavailable" and "fw_torch" in r["reason"] and "executor" not in r
               for r in torch)
    with open(os.path.join(out, "env.json")) as fh:
        assert json.load(fh)["executor"]["labelled"] is True
