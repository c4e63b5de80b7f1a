"""Run cells on a Ray cluster: ``bench run --executor ray [--address HOST:PORT]``.

Each timed cell is one Ray task that runs on a worker node exactly what the
local runner runs: ``python -m bench cell`` in a fresh process of the
framework's interpreter, with the same timeout, watchdog and statuses
(``runner.run_in_subprocess``). The head streams the records back and appends
them through the same writer as a local run (``bench.records``), so a run
started here can be resumed locally and the reverse: identity is ``cell_id``.

Timing hygiene: every node offers one ``bench_slot`` and a task takes it whole
(``num_cpus=0``: the slot, not Ray's CPU count, keeps two timed cells off one
node). GPU cells also take ``num_gpus=1``. Where a node offers ``fw_<name>``
resources the cluster is *labelled*: a cell then needs its framework's label,
so it only goes to nodes that have the framework. Cells that time nothing
(``not-applicable``; ``unavailable`` because no node has the GPU or the
label) are recorded on the head and never leave it.

On the node the framework's interpreter is, in order: ``--node-python FW=PATH``
from the head; the node's nox venv ``ROOT/.nox/bench_framework-framework-FW``; the node's
own interpreter. A node where the framework does not import records the cell
``unavailable``, naming the node.

Faults: a task whose node (or Ray worker) dies is retried once by Ray
(``max_retries=1``); the retried record says so (``executor.attempt`` 2 and
the node of the attempt that did not finish). If the retry dies too, the cell
is recorded ``lost`` with ``node died: ...``. Ctrl-C, SIGTERM or SIGHUP on the
head cancels every outstanding task (``ray.cancel(force=True)`` kills its
worker, and the cell dies with it); cells in flight have no record and run
again on ``--resume``. If no live node can run the cells still waiting for
``NO_NODE_GRACE_S``, the head stops the run the same way (exit 3).

This is the only module that imports ray, and only inside functions: the core,
the local executor and ``nox -s tests`` never import it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import time
import uuid
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import frameworks
from . import registry
from .cell import TEST_FAULT_ENV, base_record
from .config import CellConfig, UsageError
from .environment import git_commit
from .records import EnvironmentProblem

SLOT = "bench_slot"
LABEL_PREFIX = "fw_"
LABEL_AMOUNT = 0.01       # a label is a placement constraint, never what limits concurrency
RAY_PIN = frameworks.RAY[0]   # the version the cluster tests ran with (pyproject's `cluster` extra)
POLL_S = 1.0              # the head wakes up at least this often (signals, dead nodes)
CHECK_NODES_S = 5.0
NO_NODE_GRACE_S = 120.0   # nodes may be restarting or joining; past this the run stops
KV_NAMESPACE = "bench"
CONNECT_TIMEOUT_S = 10.0


def slot_resources(cfg: CellConfig, labelled: bool) -> Dict[str, float]:
    """Custom resources a timed cell asks for: the node's whole slot, and its framework's label."""
    need = {SLOT: 1.0}
    if labelled:
        need[LABEL_PREFIX + cfg.framework] = LABEL_AMOUNT
    return need


def requirement(cfg: CellConfig, labelled: bool) -> Dict[str, float]:
    """Everything a node must offer for the cell (GPUs included)."""
    need = slot_resources(cfg, labelled)
    if cfg.device == "gpu":
        need["GPU"] = 1.0
    return need


def is_labelled(nodes: Sequence[Dict]) -> bool:
    """A cluster is labelled when any live node offers a ``fw_*`` resource."""
    return any(k.startswith(LABEL_PREFIX) for n in nodes for k in (n.get("Resources") or {}))


def can_place(need: Dict[str, float], nodes: Sequence[Dict]) -> bool:
    """Does any live node offer (in total, busy or not) everything ``need`` asks for?"""
    for n in nodes:
        have = n.get("Resources") or {}
        if n.get("Alive", True) and all(have.get(k, 0.0) >= v for k, v in need.items()):
            return True
    return False


def why_not_placeable(cfg: CellConfig, nodes: Sequence[Dict], labelled: bool) -> str:
    """One line: what no live node offers for this cell."""
    if cfg.device == "gpu" and not can_place({"GPU": 1.0}, nodes):
        return "no node of the Ray cluster offers a GPU"
    if labelled and not can_place({LABEL_PREFIX + cfg.framework: LABEL_AMOUNT}, nodes):
        return ("no node of the Ray cluster offers %s%s (the cluster is labelled: nodes name the "
                "frameworks they have)" % (LABEL_PREFIX, cfg.framework))
    return "no node of the Ray cluster offers %s" % ", ".join(
        "%s: %g" % kv for kv in sorted(requirement(cfg, labelled).items()))


# --- on the node ---------------------------------------------------------------------

_PROBES: Dict[Tuple[str, str], Dict] = {}   # (python, framework) -> probe, per worker process


def nox_python(root: str, framework: str) -> Optional[str]:
    """The interpreter of the node's nox venv for the framework's benchmark session, if any.

    ``nox -s "bench_framework(framework='FW')"`` makes ``.nox/bench_framework-framework-FW``
    (nox keeps letters, digits, underscores and dashes of the session name); checkouts from
    before that session's rename have ``.nox/bench-framework-FW``.
    """
    slug = re.sub(r"[^\w-]+", "-", framework).strip("-").lower()
    for name in ("bench_framework-framework-" + slug, "bench-framework-" + slug):
        path = os.path.join(root, ".nox", name, "bin", "python")
        if os.path.exists(path):
            return path
    return None


def node_interpreter(framework: str, node_pythons: Dict[str, str], root: str
                     ) -> Tuple[str, str]:
    """(interpreter, where it came from) for a framework on this node."""
    if framework in node_pythons:
        return node_pythons[framework], "--node-python"
    venv = nox_python(root, framework)
    if venv:
        return venv, "nox venv"
    return sys.executable, "the node's own interpreter"


def _probe(python: str, framework: str) -> Dict:
    key = (python, framework)
    if key not in _PROBES:
        from .runner import probe_frameworks
        if not os.path.exists(python):
            _PROBES[key] = {"ok": False, "detail": "no interpreter %s there" % python}
        else:
            _PROBES[key] = probe_frameworks([framework], python=python)[framework]
    return _PROBES[key]


def _where() -> Dict:
    import ray
    ctx = ray.get_runtime_context()
    return {"hostname": socket.gethostname(), "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address()}


def _count_attempt(key: str, where: Dict) -> Tuple[int, Optional[str]]:
    """(attempt number, the node of the earlier attempt) from a marker in Ray's key-value store.

    Ray retries a task whose node or worker died; the retry finds the marker the
    first attempt left. (None, None) where the store cannot be reached.
    """
    try:
        from ray.experimental import internal_kv
        here = "%s (%s, node %s)" % (where["node_ip"], where["hostname"], where["node_id"][:12])
        before = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        internal_kv._internal_kv_put(key, here, overwrite=True, namespace=KV_NAMESPACE)
    except Exception:   # the marker is a courtesy; the cell runs without it
        return 0, None
    return (2, before.decode("utf-8", "replace")) if before else (1, None)


def run_cell_on_node(config: Dict, node_pythons: Dict[str, str], fault: Optional[str],
                     head_commit: Optional[str], attempt_key: str) -> Dict:
    """The Ray task: one cell on this node, in a fresh process of the framework's interpreter.

    Always returns a record; the node's own problems (no interpreter, no framework,
    another commit, a result it could not write) are records too.
    """
    from . import runner
    cfg = CellConfig.from_dict(config)
    where = _where()
    attempt, earlier = _count_attempt(attempt_key, where)
    python, source = node_interpreter(cfg.framework, node_pythons, runner.ROOT)
    node = "%s (%s)" % (where["hostname"], where["node_ip"])
    executor = dict(where, kind="ray", attempt=attempt, python=python, python_from=source)
    if earlier:
        executor["earlier_attempt"] = "did not finish on %s: its node or Ray worker died" % earlier
    commit = git_commit(runner.ROOT)
    executor["git_commit"] = commit
    if head_commit and commit and commit != head_commit:
        rec = dict(base_record(cfg), status="failed", reason=(
            "node %s runs bench at commit %s, the head at %s: give every node the same "
            "checkout" % (node, commit, head_commit)))
    else:
        rec = _cell_on_node(cfg, python, source, node, fault)
    rec["executor"] = executor
    return rec


def _cell_on_node(cfg: CellConfig, python: str, source: str, node: str, fault: Optional[str]
                  ) -> Dict:
    """The cell's record from the framework's interpreter here, or why there is none."""
    from . import runner
    probe = _probe(python, cfg.framework)
    if not probe.get("ok"):
        return dict(base_record(cfg), status="unavailable",
                    reason="not available on node %s (%s, %s): %s" % (
                        node, python, source, probe.get("detail", "")))
    try:
        with _head_fault(fault), tempfile.TemporaryDirectory(prefix="bench-cell-") as folder:
            return runner.run_in_subprocess(cfg, probe.get("detail"), python=python,
                                            result_dir=folder)
    except OSError as exc:   # this node's disk, not the cell: fail the cell, not the run
        return dict(base_record(cfg), framework_version=probe.get("detail"), status="crashed",
                    reason="node %s could not keep the cell's result (%s): %s"
                    % (node, exc.filename or "", exc.strerror or exc))


@contextlib.contextmanager
def _head_fault(fault: Optional[str]) -> Iterator[None]:
    """The head's test-fault knob, not the node's, decides (as the runner's own env does
    locally); the node's own setting is back afterwards."""
    saved = os.environ.get(TEST_FAULT_ENV)
    try:
        if fault:
            os.environ[TEST_FAULT_ENV] = fault
        else:
            os.environ.pop(TEST_FAULT_ENV, None)
        yield
    finally:
        if saved is None:
            os.environ.pop(TEST_FAULT_ENV, None)
        else:
            os.environ[TEST_FAULT_ENV] = saved


# --- on the head ---------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _lost_cluster(exc: BaseException) -> str:
    return ("lost the Ray cluster (%s: %s): finished cells are recorded, rerun with --resume"
            % (type(exc).__name__, _first_line(exc)))


def failure_record(cfg: CellConfig, exc: BaseException) -> Dict:
    """The record of a task that returned no record: its node died, or the task itself failed."""
    import ray.exceptions as rex
    rec = base_record(cfg)
    rec["machine"] = None   # the node that ran it is gone or unknown: no fingerprint to claim
    rec["executor"] = {"kind": "ray", "error": type(exc).__name__}
    if isinstance(exc, rex.OutOfMemoryError):
        rec["status"] = "oom"
        rec["reason"] = "out of memory: Ray's memory monitor killed the task: %s" % _first_line(exc)
    elif isinstance(exc, (rex.RayTaskError, rex.RuntimeEnvSetupError)):
        cause = getattr(exc, "cause", None) or exc
        rec["status"] = "crashed"
        rec["reason"] = "the Ray task failed on its node: %s: %s" % (type(cause).__name__,
                                                                    _first_line(cause))
    else:   # NodeDiedError, WorkerCrashedError, LocalRayletDiedError, ...: after Ray's retry
        rec["status"] = "lost"
        rec["reason"] = "node died: %s" % _first_line(exc)
    return rec


class RayExecutor:
    """Cells as Ray tasks, one per node at a time; records back in completion order."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, node_pythons: Optional[Dict[str, str]] = None):
        self.address = address
        self.node_pythons = dict(node_pythons or {})
        self.nodes: List[Dict] = []
        self.labelled = False
        self.connected = False

    # -- connection ----------------------------------------------------------------

    def start(self, root: str) -> None:
        """Connect to the cluster, or refuse (UsageError, exit 2) in one line."""
        if self.address and self.address != "auto":
            host, _, port = self.address.rpartition(":")
            try:   # fail fast and clearly: ray.init would retry for a minute
                socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
            except OSError as exc:
                raise UsageError("no Ray cluster answers at %s (%s): start its head with `ray start "
                                 "--head`" % (self.address, exc.strerror or exc)) from None
        import logging
        import ray
        from ray.job_config import JobConfig
        try:
            # code_search_path: workers import bench from the checkout at ROOT (the same path
            # on every node, or a node whose `ray start` has PYTHONPATH naming its checkout).
            ray.init(address=self.address or "auto", logging_level=logging.WARNING,
                     log_to_driver=False, namespace=KV_NAMESPACE,
                     job_config=JobConfig(code_search_path=[root]))
        except Exception as exc:   # ConnectionError, version mismatch, ...: one line, no traceback
            raise UsageError("cannot connect to the Ray cluster at %s: %s" % (
                self.address or "auto (RAY_ADDRESS or a cluster started on this machine)",
                _first_line(exc))) from None
        self.connected = True
        self.nodes = self._alive()
        self.labelled = is_labelled(self.nodes)
        if not can_place({SLOT: 1.0}, self.nodes):
            self.stop()
            raise UsageError("no node of the Ray cluster at %s offers a %s: start each node with "
                             "`ray start ... --resources '{\"%s\": 1}'`"
                             % (self.address or "auto", SLOT, SLOT))

    def stop(self) -> None:
        if self.connected:
            import ray
            ray.shutdown()
            self.connected = False

    def _alive(self) -> List[Dict]:
        import ray
        return [n for n in ray.nodes() if n.get("Alive")]

    def describe(self) -> Dict:
        """What env.json says about the cluster the run started on."""
        import ray
        return {"executor": {
            "kind": "ray", "ray_version": ray.__version__, "address": self.address or "auto",
            "labelled": self.labelled, "node_pythons": self.node_pythons,
            "nodes": [{"hostname": n.get("NodeManagerHostname"), "ip": n.get("NodeManagerAddress"),
                       "node_id": n.get("NodeID"),
                       "resources": {k: v for k, v in sorted((n.get("Resources") or {}).items())
                                     if not k.startswith("node:")}} for n in self.nodes]}}

    # -- cells ---------------------------------------------------------------------

    def records(self, todo: Sequence[CellConfig], probes: Dict[str, Dict], out_dir: str, progress
                ) -> Iterator[Tuple[CellConfig, Dict, float]]:
        """(cell, record, seconds) for every cell of ``todo``, in the order they finish."""
        from .runner import ROOT
        head_commit = git_commit(ROOT)
        fault = os.environ.get(TEST_FAULT_ENV) or None
        t0 = time.time()

        remote: List[CellConfig] = []
        for cfg in todo:
            rec = self._kept_on_head(cfg, probes)
            if rec is None:
                remote.append(cfg)
            else:
                yield cfg, rec, 0.0

        pending: Dict = {}
        try:
            self._submit(remote, pending, fault, head_commit)
            yield from self._returns(pending, progress)
        finally:
            # Ctrl-C, SIGTERM, a write the head could not make: nothing keeps running for us.
            # force=True kills each task's worker, and its cell dies with it (PDEATHSIG).
            _cancel(pending)
        progress.start("all cells of the run returned in %.0f s" % (time.time() - t0))

    def _kept_on_head(self, cfg: CellConfig, probes: Dict[str, Dict]) -> Optional[Dict]:
        """The record of a cell that times nothing (not applicable, or no live node can run
        it); None for a cell that goes to the cluster."""
        probe = probes.get(cfg.framework) or {}
        version = probe.get("detail") if probe.get("ok") else None
        static = registry.not_applicable(cfg.framework, cfg.model, cfg.strategy, cfg.device)
        if static:
            return dict(base_record(cfg), framework_version=version,
                        status="not-applicable", reason=static)
        if can_place(requirement(cfg, self.labelled), self.nodes):
            return None
        rec = dict(base_record(cfg), framework_version=version, status="unavailable",
                   reason=why_not_placeable(cfg, self.nodes, self.labelled))
        if cfg.device == "gpu" and not can_place({"GPU": 1.0}, self.nodes):
            rec["unavailable_scope"] = "device"
        return rec

    def _submit(self, cells: Sequence[CellConfig], pending: Dict, fault: Optional[str],
                head_commit: Optional[str]) -> None:
        """One Ray task per cell, each into ``pending`` as it is submitted (so that a failure
        half-way still cancels those already out): ref -> (cell, attempt key, submitted)."""
        import ray
        task = ray.remote(run_cell_on_node)
        token = uuid.uuid4().hex[:12]
        for cfg in cells:
            key = "cell-attempt:%s:%s" % (token, cfg.key())
            ref = task.options(
                num_cpus=0, num_gpus=1 if cfg.device == "gpu" else 0,
                resources=slot_resources(cfg, self.labelled), max_retries=1,
                retry_exceptions=False, name="bench-cell " + cfg.label(),
            ).remote(cfg.to_dict(), self.node_pythons, fault, head_commit, key)
            pending[ref] = (cfg, key, time.time())

    def _returns(self, pending: Dict, progress) -> Iterator[Tuple[CellConfig, Dict, float]]:
        """The pending tasks' records as they finish, watching that live nodes can still run
        the rest."""
        import ray
        nodes_checked, stuck_since = time.time(), None
        while pending:
            progress.start("%d cells waiting or running on the Ray cluster" % len(pending))
            try:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            except Exception as exc:   # the head lost its cluster (GCS gone, ...)
                raise EnvironmentProblem(_lost_cluster(exc)) from None
            for ref in done:
                cfg, key, started = pending.pop(ref)
                rec = _task_record(ref, cfg, key)
                # the cell's own time on its node where it has one, not its time in the queue
                yield cfg, rec, rec.get("cell_wall_s") or time.time() - started
            if time.time() - nodes_checked >= CHECK_NODES_S and pending:
                nodes_checked = time.time()
                stuck_since = self._check_nodes(pending, stuck_since)

    def _check_nodes(self, pending: Dict, stuck_since: Optional[float]) -> Optional[float]:
        """Since when no live node could run some pending cell (None: every one can); stops
        the run (EnvironmentProblem) past ``NO_NODE_GRACE_S``."""
        try:
            nodes = self._alive()
        except Exception as exc:
            raise EnvironmentProblem(_lost_cluster(exc)) from None
        blocked = [c for c, _, _ in pending.values()
                   if not can_place(requirement(c, self.labelled), nodes)]
        if not blocked:
            return None
        if stuck_since is None:
            return time.time()
        if time.time() - stuck_since > NO_NODE_GRACE_S:
            raise EnvironmentProblem(
                "%s for %d of the %d cells still to run, for %d s: the run stops; "
                "finished cells are recorded, rerun with --resume when the cluster "
                "has such nodes" % (why_not_placeable(blocked[0], nodes, self.labelled),
                                    len(blocked), len(pending), NO_NODE_GRACE_S))
        return stuck_since


def _task_record(ref, cfg: CellConfig, key: str) -> Dict:
    """The record a finished task returned, or the record of its failure; its attempt marker
    is removed."""
    import ray
    from ray.experimental import internal_kv
    try:
        rec = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        raise EnvironmentProblem("a cell's Ray task was cancelled from outside this "
                                 "run (%s); rerun with --resume" % cfg.label()) from None
    except ray.exceptions.RayError as exc:
        rec = failure_record(cfg, exc)
    except Exception as exc:
        raise EnvironmentProblem(_lost_cluster(exc)) from None
    if rec.get("cell_id") != cfg.key():   # never a record under another identity
        rec = dict(base_record(cfg), status="failed", executor=rec.get("executor"),
                   reason="the node returned a record for cell %s, not %s: its bench "
                          "differs from the head's" % (rec.get("cell_id"), cfg.key()))
    try:
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    except Exception:
        pass
    return rec


def _cancel(pending: Dict) -> None:
    import ray
    for ref in list(pending):
        try:
            ray.cancel(ref, force=True)
        except Exception:
            pass


def parse_node_pythons(items: Sequence[str]) -> Dict[str, str]:
    """``FW=PATH`` items -> {framework: path}; ValueError names a bad item."""
    out: Dict[str, str] = {}
    for item in items:
        fw, sep, path = item.partition("=")
        fw, path = fw.strip(), path.strip()
        if not sep or not fw or not path:
            raise ValueError("--node-python takes FRAMEWORK=PATH, not %r" % item)
        if fw not in registry.FRAMEWORKS:
            raise ValueError("--node-python: unknown framework %r; known: %s"
                             % (fw, ", ".join(registry.FRAMEWORKS)))
        if not os.path.isabs(path):
            raise ValueError("--node-python %s: the path must be absolute (it is a path on "
                             "every node)" % item)
        if fw in out and out[fw] != path:
            raise ValueError("--node-python names %s twice" % fw)
        out[fw] = path
    return out
