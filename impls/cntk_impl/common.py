"""Host side of the CNTK worker: the process, the client, and the Implementation base.

One worker process per host process (``client()``), shared by every CNTK
implementation instance in it; each instance is a model object inside the
worker, named by the id ``create`` returned. The protocol is documented in
the package docstring.
"""

from __future__ import annotations

import atexit
import collections
import os
import select
import subprocess
import threading
import time
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np

from bench.interface import ADAGRAD, ADAM, Implementation, NotApplicable, Unavailable
from bench.params import schema
from bench.targets import loss_weights

from . import NOT_APPLICABLE, wire

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
PYTHON_ENV = "BENCH_CNTK_PYTHON"
# Seconds a request may wait for its reply before the worker is killed (0 or unset: no limit;
# a worker that dies is noticed at once either way, by the end of its output pipe).
TIMEOUT_ENV = "BENCH_CNTK_REPLY_TIMEOUT"
STDERR_LINES = 60


class WorkerError(RuntimeError):
    """The worker answered a request with an error (its type, message and traceback)."""

    def __init__(self, kind: str, error_type: str, message: str, remote_traceback: str = ""):
        self.kind, self.error_type, self.remote_traceback = kind, error_type, remote_traceback
        super().__init__("CNTK worker failed on %r: %s: %s%s"
                         % (kind, error_type, message,
                            ("\n--- worker traceback ---\n" + remote_traceback.rstrip())
                            if remote_traceback else ""))


class WorkerDied(RuntimeError):
    """The worker process ended, or stopped answering within the reply timeout."""


def worker_python() -> str:
    """The worker interpreter from BENCH_CNTK_PYTHON; Unavailable with the reason otherwise."""
    path = os.environ.get(PYTHON_ENV, "").strip()
    if not path:
        raise Unavailable("%s is not set: CNTK 2.7 runs in a Python 3.6 worker process whose "
                          "interpreter this variable names (the nox sessions set it up)" % PYTHON_ENV)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise Unavailable("%s=%s is not an executable file" % (PYTHON_ENV, path))
    return path


def worker_env() -> Dict[str, str]:
    """The host's environment (threads, LD_LIBRARY_PATH) without the host's Python paths."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


class WorkerClient:
    """One worker process and the request/reply loop over its pipes."""

    def __init__(self, python: Optional[str] = None, timeout: Optional[float] = None):
        self.python = python or worker_python()
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_ENV, "0") or 0)
        self.timeout = timeout if timeout > 0 else None
        self.proc = subprocess.Popen([self.python, WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=worker_env(), cwd=os.path.dirname(WORKER))
        self._fd = self.proc.stdout.fileno()
        self._stderr = collections.deque(maxlen=STDERR_LINES)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self._lock = threading.Lock()
        self._release_handles: List[List[int]] = []
        self._release_impls: List[int] = []
        self.dead: Optional[str] = None
        self.hello, _ = self.request("hello")

    # --- process ---
    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def alive(self) -> bool:
        return self.dead is None and self.proc.poll() is None

    def _died(self, what: str, kill: bool = False):
        if kill and self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr_thread.join(timeout=2)
        code = self.proc.returncode
        status = ("killed by signal %d" % -code) if code < 0 else ("exit status %d" % code)
        tail = self.stderr_tail()
        self.dead = ("CNTK worker (pid %d, %s) %s: %s%s"
                     % (self.proc.pid, self.python, what, status,
                        ("; last stderr lines:\n" + tail) if tail else "; no stderr output"))
        raise WorkerDied(self.dead)

    def close(self):
        """Ask the worker to exit; kill it if it does not within a few seconds."""
        if self.dead is None and self.proc.poll() is None:
            try:
                with self._lock:
                    self.proc.stdin.write(wire.encode({"kind": "shutdown"}))
                    self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.dead = self.dead or "closed"

    # --- messages ---
    def release(self, impl: int, handle: Optional[int] = None):
        """Queue a prepared batch (or a whole implementation) for release; sent with the
        next request. Safe from finalizers: only appends."""
        if handle is None:
            self._release_impls.append(impl)
        else:
            self._release_handles.append([impl, handle])

    def _read(self, n: int, deadline: Optional[float], kind: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            wait = 1.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    self._died("gave no reply to %r within %g s and was killed" % (kind, self.timeout),
                               kill=True)
            ready, _, _ = select.select([self._fd], [], [], wait)
            if ready:
                chunk = os.read(self._fd, min(n - len(buf), 1 << 20))
                if not chunk:
                    self._died("ended while the host waited for the reply to %r" % kind)
                buf += chunk
        return bytes(buf)

    def request(self, kind: str, arrays: Optional[Dict[str, np.ndarray]] = None,
                **fields) -> Tuple[Dict, Dict[str, np.ndarray]]:
        """Send one request, wait for its reply; WorkerError / WorkerDied / Unavailable /
        NotImplementedError on failure."""
        with self._lock:
            if self.dead is not None:
                raise WorkerDied(self.dead)
            header = dict(fields, kind=kind)
            if self._release_handles or self._release_impls:
                header["release"] = {"handles": self._release_handles, "impls": self._release_impls}
                self._release_handles, self._release_impls = [], []
            data = wire.encode(header, arrays)
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._died("was gone when the host sent %r" % kind)
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            head_len, blob_len = wire.parse_prefix(self._read(wire.PREFIX, deadline, kind))
            reply, out = wire.decode_body(self._read(head_len, deadline, kind),
                                          self._read(blob_len, deadline, kind))
        if reply["kind"] == "error":
            etype, message = reply.get("type", "Exception"), reply.get("message", "")
            if etype == "Unavailable":
                raise Unavailable(message)
            if etype == "NotApplicable":
                raise NotApplicable(message)
            if etype == "NotImplementedError":
                raise NotImplementedError(message)
            raise WorkerError(kind, etype, message, reply.get("traceback", ""))
        return reply, out


_CLIENT: Optional[WorkerClient] = None
_CLIENT_LOCK = threading.Lock()


def client() -> WorkerClient:
    """The process's worker, started on first use (and again if the last one died)."""
    global _CLIENT
    with _CLIENT_LOCK:
        if _CLIENT is None or not _CLIENT.alive():
            _CLIENT = WorkerClient()
        return _CLIENT


@atexit.register
def _close_client():
    if _CLIENT is not None:
        _CLIENT.close()


def label_feeds(labels: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """The loss inputs for labels int[P] (-1: unlabelled): one-hot targets y float32[P, C] and
    weights w float32[P, 1] (``bench.targets.loss_weights``: 1/count at the labelled points,
    0 elsewhere), so that the worker's weighted sum (CNTK sums over samples) is the mean over
    the labelled points."""
    index, w = loss_weights(labels)
    y = np.zeros((index.shape[0], num_classes), np.float32)
    labelled = np.nonzero(w)[0]
    y[labelled, index[labelled]] = 1.0
    return y, w[:, None]


class Prepared:
    """A batch prepared inside the worker: its handle there."""

    def __init__(self, impl: "CNTKImplementation", handle: int):
        self.handle = handle
        self._impl_id = impl._id
        weakref.finalize(self, impl._client.release, impl._id, handle)


class CNTKImplementation(Implementation):
    framework = "cntk"
    not_applicable = NOT_APPLICABLE
    # coupled L2 in the worker's universal learner (``Model._update``: g + wd * theta)
    weight_decay_refusal = None

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self._client = client()
        spec = {
            "family": self.family, "model": cfg.model, "strategy": strategy, "device": device,
            "threads": threads, "vocab_size": cfg.vocab_size, "embed_dim": cfg.embed_dim,
            "hidden": cfg.hidden, "num_classes": cfg.num_classes, "loss_mode": cfg.loss_mode,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "adam": ADAM, "adagrad": ADAGRAD,
            "weight_decay": float(cfg.weight_decay),
            "schema": [[name, list(shape)] for name, (shape, _) in schema(cfg).items()],
        }
        reply, _ = self._client.request("create", spec=spec)
        self._id = reply["impl"]
        weakref.finalize(self, self._client.release, self._id)

    def _call(self, kind, arrays=None, **fields):
        return self._client.request(kind, arrays, impl=self._id, **fields)

    def _handle(self, prepared) -> int:
        if not isinstance(prepared, Prepared) or prepared._impl_id != self._id:
            raise TypeError("expected a batch prepared by this implementation's prepare(), got %s"
                            % type(prepared).__name__)
        return prepared.handle

    def set_weight_decay(self, weight_decay):
        """The worker builds (and caches apart) graphs whose learner has the new decay."""
        super().set_weight_decay(weight_decay)
        self._call("set_weight_decay", weight_decay=float(self.cfg.weight_decay))

    # --- parameters ---
    def load_params(self, params):
        self._call("load_params", self._checked(params))

    def export_params(self):
        _, arrays = self._call("export_params")
        return OrderedDict((name, np.asarray(arrays[name], np.float32)) for name in schema(self.cfg))

    # --- work ---
    def _batch_arrays(self, batch) -> Dict[str, np.ndarray]:
        """The arrays of a ``prepare`` request: the graph's feeds, ready to use (see the
        family's module)."""
        raise NotImplementedError

    def prepare(self, batch):
        reply, _ = self._call("prepare", self._batch_arrays(batch))
        return Prepared(self, reply["handle"])

    def logits(self, prepared):
        _, arrays = self._call("logits", handle=self._handle(prepared))
        return arrays["logits"]

    def loss_and_grads(self, prepared):
        reply, grads = self._call("loss_and_grads", handle=self._handle(prepared))
        return float(reply["loss"]), OrderedDict((name, np.asarray(grads[name], np.float32))
                                                 for name in schema(self.cfg))

    def train_step(self, prepared):
        reply, _ = self._call("train_step", handle=self._handle(prepared))
        return np.float32(reply["loss"])

    # --- timing inside the worker (bench.cell uses these instead of its own clock) ---
    def timed_passes(self, call, prepared, repeats):
        reply, _ = self._call("timed_passes", call=call, repeats=int(repeats),
                              handles=[self._handle(p) for p in prepared])
        return [float(s) for s in reply["seconds"]]

    def timed_calls(self, call, prepared):
        reply, _ = self._call("timed_calls", call=call, handles=[self._handle(p) for p in prepared])
        return [float(s) for s in reply["seconds"]]

    # --- measurement helpers ---
    def info(self):
        reply, _ = self._call("info")
        out = dict(reply["info"])
        out["worker_pid"] = self._client.hello.get("pid")
        out["worker_executable"] = self._client.hello.get("executable")
        out["timing"] = "train/infer passes and batch-1 latency timed inside the worker " \
                        "(timed_passes / timed_calls): no IPC inside the clock"
        return out

    def gemm_flops(self, n=512, repeats=10):
        reply, _ = self._client.request("gemm_flops", n=int(n), repeats=int(repeats))
        return float(reply["flops"])
