"""Facts about the machine and process: CPU, GPU, memory, threads, git commit."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, Optional

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
                   "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def thread_env(threads: int) -> Dict[str, str]:
    """Environment that caps every thread pool we know of, set before a cell's process starts.

    XLA's CPU client (JAX) sizes its pool from PJRT_NPROC when its backend starts.
    """
    env = {name: str(threads) for name in THREAD_ENV_VARS}
    env["TF_NUM_INTEROP_THREADS"] = "1"
    env["PJRT_NPROC"] = str(threads)
    env["NUMBA_NUM_THREADS"] = str(threads)
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=%s" % ("true" if threads > 1 else "false")
    return env


def limit_blas_threads(threads: int):
    """Cap BLAS/OpenMP pools already loaded in this process (threadpoolctl, when installed).

    The environment variables set before the process started do the same for
    pools loaded later; this call also covers libraries that ignore them.
    Returns what threadpoolctl reports afterwards, or a note that it is absent.
    """
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return "threadpoolctl not installed; thread environment variables only"
    threadpool_limits(limits=threads)
    return sorted({"%s=%s" % (i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()})


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> Optional[Dict[str, str]]:
    """Name, driver and memory of the first NVIDIA GPU, or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, driver, memory = [s.strip() for s in out.stdout.strip().splitlines()[0].split(",")]
    return {"name": name, "driver": driver, "memory": memory}


def git_commit(path: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine() -> Dict:
    """The fingerprint of the machine a record was measured on.

    ``cpu``, ``cores`` and ``gpu`` identify the hardware (compare refuses to mix
    them); ``hostname`` names the node, so records from a cluster say where each
    cell ran (two identical nodes are comparable hardware, so it is not identity).
    """
    gpu = gpu_info()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu["name"] if gpu else None,
            "hostname": platform.node() or None}


def describe(frameworks: Dict[str, str], threads: int, root: str) -> Dict:
    """The env.json of a run."""
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": machine(),
        "memory_gib": round(mem, 1) if mem else None,
        "gpu": gpu_info(),
        "threads": threads,
        "thread_env": thread_env(threads),
        "git_commit": git_commit(root),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "frameworks": frameworks,
    }


# --- noise disclosure: how busy the machine was while a cell was timed ---

# A cell is `noisy` when, during its timed passes, its threads spent more than this share of
# their time runnable but waiting for a CPU (other work held the cores), or the hypervisor
# took more than NOISY_STEAL of the machine's CPU time.
NOISY_WAIT = 0.10
NOISY_STEAL = 0.05


def _thread_schedstat() -> Optional[Dict[str, tuple]]:
    """{tid: (ns on a CPU, ns runnable but waiting)} for this process's threads, or None."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open("/proc/self/task/%s/schedstat" % tid) as fh:
                run, wait = fh.read().split()[:2]
            out[tid] = (int(run), int(wait))
        except (OSError, ValueError):
            continue   # the thread ended between the listing and the read
    return out or None


def thread_times() -> Optional[Dict[str, tuple]]:
    """A snapshot for ``wait_share`` (this process's threads' run and run-queue times)."""
    return _thread_schedstat()


def wait_share(before: Optional[Dict[str, tuple]], after: Optional[Dict[str, tuple]]
               ) -> Optional[float]:
    """Of the time this process's threads wanted a CPU between two snapshots, the share they
    spent waiting for one (threads started in between count from zero); None if unknown."""
    if before is None or after is None:
        return None
    ran = waited = 0
    for tid, (run, wt) in after.items():
        r0, w0 = before.get(tid, (0, 0))
        ran, waited = ran + run - r0, waited + wt - w0
    return waited / float(ran + waited) if ran + waited > 0 else None


def _cpu_times() -> Optional[tuple]:
    """(steal, total) jiffies of the whole machine from /proc/stat, or None."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _load() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


class NoiseProbe:
    """What else the machine was doing between ``start()`` and ``stop()``.

    ``stop()`` returns the record's ``noise`` dict: 1-minute load average before and after
    (the after figure includes this cell's own threads), the machine's CPU steal share, and
    ``wait_share``: of the time this process's threads wanted a CPU, the share they spent
    waiting for one (from /proc/self/task/*/schedstat; threads started in between count from
    zero). ``noisy`` (and ``noisy_why``) from ``verdict``. Figures that this system cannot
    give are None, and then the verdict is None (unknown), never "quiet".
    """

    def __init__(self, threads: int):
        self.threads = threads

    def start(self) -> "NoiseProbe":
        self.load0, self.cpu0, self.sched0 = _load(), _cpu_times(), _thread_schedstat()
        return self

    def stop(self) -> Dict:
        load1, cpu1, sched1 = _load(), _cpu_times(), _thread_schedstat()
        steal = wait = None
        if self.cpu0 and cpu1 and cpu1[1] > self.cpu0[1]:
            steal = (cpu1[0] - self.cpu0[0]) / float(cpu1[1] - self.cpu0[1])
        wait = wait_share(self.sched0, sched1)
        noise = {"load_before": self.load0, "load_after": load1,
                 "steal_share": None if steal is None else round(steal, 4),
                 "wait_share": None if wait is None else round(wait, 4),
                 "cpus": os.cpu_count(), "threads": self.threads}
        noise["noisy"], noise["noisy_why"] = verdict(noise)
        return noise


def verdict(noise: Dict):
    """(noisy, why) for a noise dict: True with the reason, False, or None when unknown."""
    why = []
    if noise.get("wait_share") is not None and noise["wait_share"] > NOISY_WAIT:
        why.append("its threads waited for a CPU %.0f%% of the time (other work on the cores)"
                   % (100 * noise["wait_share"]))
    if noise.get("steal_share") is not None and noise["steal_share"] > NOISY_STEAL:
        why.append("the hypervisor took %.0f%% of the CPU time (steal)" % (100 * noise["steal_share"]))
    if why:
        return True, "; ".join(why)
    if noise.get("wait_share") is None:
        return None, "this system does not report per-thread run-queue waits"
    return False, None
