"""The slowed reference (see the package docstring)."""

from __future__ import annotations

import os
import time

from impls.numpy_impl.common import NumpyReference

from . import SLOWDOWN_ENV


def share() -> float:
    value = float(os.environ.get(SLOWDOWN_ENV, "0") or 0)
    if not 0 <= value < 1:
        raise ValueError("%s must be a fraction in [0, 1), not %r" % (SLOWDOWN_ENV, value))
    return value


class Slowed(NumpyReference):
    framework = "numpy-slowed"

    def __init__(self, cfg, strategy, device="cpu", threads=1):
        super().__init__(cfg, strategy, device, threads)
        self.share = share()

    def logits(self, prepared):
        # CPU time of this thread, not wall time: the extra is a fixed share of the work
        # however busy the machine is (a wall-clock spin would grow with the load).
        t0 = time.thread_time()
        out = super().logits(prepared)
        if self.share:
            # throughput (1 - share) times the reference's: the call costs t / (1 - share)
            now = time.thread_time()
            until = now + self.share / (1.0 - self.share) * (now - t0)
            while time.thread_time() < until:
                pass
        return out

    def info(self):
        return dict(super().info(), slowdown=self.share)
