"""Test hooks that stop onn-train at a chosen point, so a kill -9 lands there deterministically.

    ONN_TRAIN_FAULT=in_start:N     after the run's set-up (state built or restored at step N),
                                   before its first step
    ONN_TRAIN_FAULT=after_step:N   after step N (and after every pending checkpoint is on disk)
    ONN_TRAIN_FAULT=in_save:N      inside the checkpoint save of step N: its files are written
                                   to orbax's temporary folder, the atomic rename not yet done
                                   (in orbax's background thread, while training goes on)
    ONN_TRAIN_FAULT=at_save:N      at the start of the checkpoint save of step N (main thread)
    ONN_TRAIN_FAULT=in_eval:N      inside the evaluation of step N, after its first batch
    ONN_TRAIN_FAULT=after_train:N  after the last step N, its final save committed, before the
                                   final sample and plots
    ONN_TRAIN_FAULT=stall_save:N   like in_save, but a signal does not release it (a stuck save)
    ONN_TRAIN_FAULT=enospc_save:N  the commit of step N's save fails with OSError(ENOSPC), as
                                   on a full disk (no halt)

At the point the process prints `onn-train: fault point <point>:<N> reached` to stderr and
sleeps; the test then kills it with SIGKILL, or sends it a signal of train.common.signals' policy,
which ends the sleep (except stall_save) so the run goes on to its clean stop. A process nobody
kills exits by itself with code 99 after ONN_TRAIN_FAULT_TIMEOUT seconds (default 300), so a
dead test never leaves a trainer asleep. Unset (the normal case), nothing is installed.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "ONN_TRAIN_FAULT"
TIMEOUT_ENV = "ONN_TRAIN_FAULT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_EXIT_CODE = 99
POINTS = ("in_start", "after_step", "in_save", "at_save", "in_eval", "stall_save", "enospc_save", "after_train")


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


def halt(point: str, step: int, timeout: float | None = None, until_signal: bool = True) -> None:
    """Announce the fault point and wait to be killed, or (until_signal) for a stop signal of
    train.common.signals, then return; exit (code 99, no cleanup) after `timeout` seconds (default
    halt_timeout()) if neither came."""
    from train.common.signals import requested
    timeout = halt_timeout() if timeout is None else timeout
    print(f"onn-train: fault point {point}:{step} reached", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until_signal and requested():
            return
        time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))
    print(f"onn-train: fault point {point}:{step}: not killed within {timeout:g}s; exiting",
          file=sys.stderr, flush=True)
    os._exit(TIMEOUT_EXIT_CODE)


class Faults:
    """The hooks of one run (from the environment)."""

    def __init__(self, value: str | None = None):
        self.fault = parse(os.environ.get(ENV) if value is None else value)
        if self.fault:
            halt_timeout()  # a malformed timeout fails at start, not at the fault point
        if self.fault and self.fault[0] in ("in_save", "stall_save", "enospc_save"):
            _block_commit(*self.fault)

    def after_step(self, step: int, checkpointer=None) -> None:
        if self.fault == ("after_step", step):
            if checkpointer is not None:
                checkpointer.wait()
            halt("after_step", step)

    def at(self, point: str, step: int) -> None:
        """The hook of `point` (in_start, at_save, in_eval, after_train) at `step`."""
        if self.fault == (point, step):
            halt(point, step)


def _block_commit(point: str, step: int) -> None:
    """Makes orbax's atomic-rename commit of checkpoint `step` halt before the rename (in_save,
    stall_save) or fail as on a full disk (enospc_save)."""
    import errno

    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    original = cls.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step):
            if point == "enospc_save":
                print(f"onn-train: fault point {point}:{step} reached", file=sys.stderr, flush=True)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
            halt(point, step, until_signal=point == "in_save")
        return await original(self, *args, **kwargs)

    cls.finalize = finalize
