"""Test hooks that stop onn-train at a chosen point, so a kill -9 lands there deterministically.

    ONN_TRAIN_FAULT=after_step:N   after step N (and after every pending checkpoint is on disk)
    ONN_TRAIN_FAULT=in_save:N      inside the checkpoint save of step N: its files are written
                                   to orbax's temporary folder, the atomic rename not yet done

At the point the process prints `onn-train: fault point <point>:<N> reached` to stderr and
sleeps; the test then kills it with SIGKILL. A process nobody kills exits by itself with code
99 after ONN_TRAIN_FAULT_TIMEOUT seconds (default 300), so a dead test never leaves a trainer
asleep. Unset (the normal case), nothing is installed.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "ONN_TRAIN_FAULT"
TIMEOUT_ENV = "ONN_TRAIN_FAULT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_EXIT_CODE = 99
POINTS = ("after_step", "in_save")


def parse(value: str | None) -> tuple[str, int] | None:
    """(point, step) of an ONN_TRAIN_FAULT value, None when unset; ValueError when malformed."""
    if not value:
        return None
    point, _, step = value.partition(":")
    if point not in POINTS or not step.isdigit():
        raise ValueError(f"{ENV}={value!r}: expected one of {[p + ':N' for p in POINTS]}")
    return point, int(step)


def halt_timeout(value: str | None = None) -> float:
    """Seconds halt() waits to be killed: ONN_TRAIN_FAULT_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    value = os.environ.get(TIMEOUT_ENV) if value is None else value
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds") from None
    if not timeout > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: must be > 0")
    return timeout


def halt(point: str, step: int, timeout: float | None = None) -> None:
    """Announce the fault point and wait to be killed; exit (code 99, no cleanup) after
    `timeout` seconds (default halt_timeout()) if nobody did."""
    timeout = halt_timeout() if timeout is None else timeout
    print(f"onn-train: fault point {point}:{step} reached", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
    print(f"onn-train: fault point {point}:{step}: not killed within {timeout:g}s; exiting",
          file=sys.stderr, flush=True)
    os._exit(TIMEOUT_EXIT_CODE)


class Faults:
    """The hooks of one run (from the environment)."""

    def __init__(self, value: str | None = None):
        self.fault = parse(os.environ.get(ENV) if value is None else value)
        if self.fault:
            halt_timeout()  # a malformed timeout fails at start, not at the fault point
        if self.fault and self.fault[0] == "in_save":
            _block_commit(self.fault[1])

    def after_step(self, step: int, checkpointer=None) -> None:
        if self.fault == ("after_step", step):
            if checkpointer is not None:
                checkpointer.wait()
            halt("after_step", step)


def _block_commit(step: int) -> None:
    """Makes orbax's atomic-rename commit of checkpoint `step` halt before the rename."""
    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    original = cls.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step):
            halt("in_save", step)
        return await original(self, *args, **kwargs)

    cls.finalize = finalize
