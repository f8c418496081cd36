"""Test hooks that stop onn-train at a chosen point, so a kill -9 lands there deterministically.

    ONN_TRAIN_FAULT=after_step:N   after step N (and after every pending checkpoint is on disk)
    ONN_TRAIN_FAULT=in_save:N      inside the checkpoint save of step N: its files are written
                                   to orbax's temporary folder, the atomic rename not yet done

At the point the process prints `onn-train: fault point <point>:<N> reached` to stderr and
sleeps; the test then kills it with SIGKILL. Unset (the normal case), nothing is installed.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "ONN_TRAIN_FAULT"
POINTS = ("after_step", "in_save")


def parse(value: str | None) -> tuple[str, int] | None:
    """(point, step) of an ONN_TRAIN_FAULT value, None when unset; ValueError when malformed."""
    if not value:
        return None
    point, _, step = value.partition(":")
    if point not in POINTS or not step.isdigit():
        raise ValueError(f"{ENV}={value!r}: expected one of {[p + ':N' for p in POINTS]}")
    return point, int(step)


def halt(point: str, step: int) -> None:
    """Announce the fault point and wait to be killed."""
    print(f"onn-train: fault point {point}:{step} reached", file=sys.stderr, flush=True)
    while True:
        time.sleep(1)


class Faults:
    """The hooks of one run (from the environment)."""

    def __init__(self, value: str | None = None):
        self.fault = parse(os.environ.get(ENV) if value is None else value)
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
