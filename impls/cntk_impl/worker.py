"""The CNTK 2.7 worker process: runs under Python 3.6 with NumPy and CNTK only (no ``bench`` imports).

Started by the host (``impls.cntk_impl.common``) as ``$BENCH_CNTK_PYTHON worker.py``;
it reads requests from stdin and writes replies to stdout, framed by
``wire.py`` (the message kinds are documented in ``impls/cntk_impl/__init__.py``).
File descriptor 1 is pointed at stderr before anything else runs, so nothing
CNTK or NumPy prints can corrupt the protocol stream.

This file is the process and its protocol loop; the models are in
``worker_common.py`` (what both families share), ``worker_rnn.py`` and
``worker_rvnn.py``, the worker's counterparts of the host's ``common.py``,
``rnn.py`` and ``rvnn.py``.
"""

import os
import sys

# The protocol owns the original stdout; fd 1 (C++ printf, print()) goes to stderr.
_PROTO_OUT = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.stdout = sys.stderr
_PROTO_IN = os.fdopen(os.dup(0), "rb")

import platform  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

# this file's folder is on sys.path; worker_common imports CNTK (its prints go to stderr now)
import wire  # noqa: E402
from worker_common import C, CNTK_ERROR, gemm_flops  # noqa: E402
from worker_rnn import RNNModel  # noqa: E402
from worker_rvnn import RvNNModel  # noqa: E402

MODELS = {"rnn": RNNModel, "rvnn": RvNNModel}


class Worker(object):
    def __init__(self):
        self.models = {}
        self.next_id = 1

    def model(self, header):
        if header.get("impl") not in self.models:
            raise LookupError("no implementation with id %r in this worker" % (header.get("impl"),))
        return self.models[header["impl"]]

    def release(self, release):
        """Forget the prepared batches and implementations the host has dropped."""
        for impl, h in release.get("handles", []):
            if impl in self.models:
                self.models[impl].prepared.pop(h, None)
        for impl in release.get("impls", []):
            self.models.pop(impl, None)

    def handle(self, header, arrays):
        """One request -> (reply header, reply arrays)."""
        self.release(header.get("release") or {})
        kind = header["kind"]
        ok = {"kind": "ok"}
        if kind == "hello":
            ok.update(python=platform.python_version(), executable=sys.executable, pid=os.getpid(),
                      numpy=np.__version__, cntk=getattr(C, "__version__", None),
                      cntk_error=CNTK_ERROR)
            return ok, None
        if kind == "create":
            spec = header["spec"]
            self.models[self.next_id] = MODELS[spec["family"]](spec)
            ok["impl"] = self.next_id
            self.next_id += 1
            return ok, None
        if kind == "gemm_flops":
            ok["flops"] = gemm_flops(int(header["n"]), int(header["repeats"]))
            return ok, None
        return self.handle_model(self.model(header), kind, header, arrays, ok)

    def handle_model(self, m, kind, header, arrays, ok):
        """A request on one implementation ``m``."""
        if kind == "load_params":
            m.load_params(arrays)
            return ok, None
        if kind == "export_params":
            return ok, m.export_params()
        if kind == "set_weight_decay":
            m.set_weight_decay(header["weight_decay"])
            return ok, None
        if kind == "prepare":
            ok["handle"] = m.prepare(arrays)
            return ok, None
        if kind == "logits":
            return ok, {"logits": m.logits(m.ready(header["handle"]))}
        if kind == "train_step":
            ok["loss"] = m.train_step(m.ready(header["handle"]))
            return ok, None
        if kind == "loss_and_grads":
            ok["loss"], grads = m.loss_and_grads(m.ready(header["handle"]))
            return ok, grads
        if kind == "timed_passes":
            ok["seconds"] = m.timed_passes(header["call"], header["handles"], header["repeats"])
            return ok, None
        if kind == "timed_calls":
            ok["seconds"] = m.timed_calls(header["call"], header["handles"])
            return ok, None
        if kind == "info":
            ok["info"] = m.info()
            return ok, None
        raise ValueError("unknown request kind %r" % (kind,))

    def serve(self):
        while True:
            try:
                header, arrays = wire.read_message(_PROTO_IN)
            except EOFError:
                return 0       # the host closed the pipe: exit quietly
            if header.get("kind") == "shutdown":
                wire.write_message(_PROTO_OUT, {"kind": "ok"})
                return 0
            try:
                reply, out = self.handle(header, arrays)
            except Exception as exc:
                # CNTK appends a long native call stack to its messages: keep the message
                message = str(exc).split("[CALL STACK]")[0].strip() or type(exc).__name__
                reply = {"kind": "error", "type": type(exc).__name__, "message": message,
                         "traceback": traceback.format_exc()[-6000:]}
                out = None
            wire.write_message(_PROTO_OUT, reply, out)


# CNTK walks its graphs recursively in native code: an LSTM time loop unrolled over 1000
# steps overflows the main thread's default 8 MiB stack (SIGSEGV). The worker therefore
# serves from a thread with a large stack (address space only, touched as needed).
SERVE_STACK_BYTES = 1 << 30


def main():
    status = []
    threading.stack_size(SERVE_STACK_BYTES)
    thread = threading.Thread(target=lambda: status.append(Worker().serve()), name="serve")
    thread.start()
    thread.join()
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main())
