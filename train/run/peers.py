"""onn-train in a multi-process run: joining it within a bounded time, watching the other
processes, and leaving together (onn_jax.parallel.distributed does the mechanics).

    peers = Peers(cfg, workdir)
    peers.join()                 # CoordinatorUnreachable (exit 2) / one line and exit 2 past the timeout
    ...train...
    return peers.end(code)       # 0: finish and shut down together; else leave together, os._exit(code)

A single process (no launch variables, no cluster) is left alone: join() does nothing and end()
returns its code. With several processes:

* the join is bounded by distributed.initialization_timeout_s: one line naming the coordinator
  address, exit code 2 (jax's runtime would abort with a C++ stack trace a few seconds later);
* a lost process (killed, crashed, its host gone) is noticed by process 0's watchdog after
  distributed.heartbeat_timeout_s / 2 without a heartbeat, before jax's runtime aborts every
  process at heartbeat_timeout_s: every survivor prints one line naming the lost process and
  the checkpoint the rerun resumes from, and exits with LOST_PEER_EXIT (5). A restart of all
  processes resumes from that checkpoint, as after a kill of the whole run. A process lost
  before the first step's outputs were written undoes the start as a failed start does (process
  0 removes what it created: a new workdir, or the entries it added);
* a process that stops with an error (exit 2, 3, 4) or a stop signal (128 + N) records its code:
  the others stop too, with a line naming it and the same code, and all shut down together;
* an unexpected exception in one process (a collective that failed because a peer died) waits
  for the watchdog's verdict first, so that the line names the lost process; with no peer lost,
  its traceback and one line follow, and the processes leave together with exit code 1.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import jax

from onn_jax.config import Config
from train.common.signals import StopOnSignal, flush_std
from train.common.workdir_check import CHECKPOINT_DIR, committed_steps

LOST_PEER_EXIT = 5  # a process of the run was lost: restart all processes (they resume)


class Peers:
    """The multi-process side of one onn-train invocation (see the module doc)."""

    def __init__(self, cfg: Config, workdir: str | Path):
        self.cfg, self.workdir = cfg, Path(workdir)
        self.dog = None

    @property
    def multi(self) -> bool:
        return self.dog is not None

    def join(self) -> bool:
        """Joins the run if there is one (ValueError: a launch that cannot work) and starts the
        watchdog; True when several processes run."""
        from onn_jax.parallel.distributed import PeerWatchdog, initialize_distributed
        if not initialize_distributed(timeouts=self.cfg.distributed, on_init_timeout=_join_timed_out):
            return False
        if jax.process_count() > 1:
            self.dog = PeerWatchdog(self.cfg.distributed.heartbeat_timeout_s, self._on_stop).start()
        return True

    def resume_point(self) -> str:
        steps = committed_steps(self.workdir / CHECKPOINT_DIR)
        if steps:
            return (f"they resume from the last committed checkpoint, step {steps[-1]} in "
                    f"{self.workdir / CHECKPOINT_DIR}")
        return f"no checkpoint is committed in {self.workdir / CHECKPOINT_DIR} yet: they start again"

    def _on_stop(self, message: str, lost: tuple[int, ...], code: int | None) -> None:
        """The watchdog's verdict (its thread): one line, the lock released, leave, end."""
        me, n = jax.process_index(), jax.process_count()
        code = LOST_PEER_EXIT if code is None or code == 0 else code
        restart = ("Once that is fixed, restart all" if code in (2, 3, 4) else "Restart all")  # 2, 3, 4: its input
        print(f"onn-train: {message}; process {me} stops too (exit code {code}). {restart} {n} processes "
              f"with the same command: {self.resume_point()}", file=sys.stderr, flush=True)
        _abandon_start()
        _release_lock()
        self.dog.leave(code, lost)
        _exit(code)

    def hold(self) -> None:
        """This process ends by itself (its own error line follows): the watchdog stops judging."""
        if self.multi:
            self.dog.hold()

    def end(self, code: int) -> int:
        """Returns `code` (single process). Several processes: 0 finishes (the others stop
        watching this one) and shuts down together; any other code leaves together and ends the
        process with os._exit(code), past jax's exit handler (its shutdown barrier would abort)."""
        if not self.multi:
            return code
        if code == 0:
            from onn_jax.parallel.distributed import shutdown_distributed
            self.dog.finish()
            shutdown_distributed()
            return 0
        _release_lock()
        self.dog.leave(code)
        _exit(code)

    def crashed(self, exc: BaseException) -> None:
        """An unexpected exception in a multi-process run (a collective failed: a peer died):
        waits for the watchdog's verdict (which ends the process, naming the lost process),
        else prints the error in one line and leaves with exit code 1. Returns at once for a
        single process (the caller re-raises)."""
        if not self.multi:
            return
        import time
        time.sleep(self.dog.lost_after + 3 * self.dog.interval)  # the watchdog's thread may end us first
        traceback.print_exception(exc)  # no peer was lost: an error of this process (a bug?), in full
        last = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines()[0][:300]
        print(f"onn-train: error: process {jax.process_index()}: {last}; restart all {jax.process_count()} "
              f"processes with the same command: {self.resume_point()}", file=sys.stderr, flush=True)
        _release_lock()
        self.dog.leave(1)
        _exit(1)


def _join_timed_out(message: str) -> None:
    """distributed.initialization_timeout_s passed while joining (a timer thread): one line, exit 2."""
    print(f"onn-train: distributed launch error: {message}", file=sys.stderr, flush=True)
    _exit(2)


def _abandon_start(timeout_s: float = 10.0) -> None:
    """A start that wrote no outputs yet is undone (train.run.setup's abandon_start: what it
    created is removed, process 0 only), on a helper thread bounded by `timeout_s` so that a
    stuck close never holds the exit back."""
    import threading
    stop = StopOnSignal.current()
    undo = stop.abandon if stop is not None else None
    if undo is None:
        return

    def run() -> None:
        try:
            undo()
        except Exception:  # noqa: BLE001 - leaving regardless
            pass
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)


def _release_lock() -> None:
    stop = StopOnSignal.current()
    for fn in (stop.at_exit if stop is not None else []):
        try:
            fn()
        except Exception:  # noqa: BLE001 - leaving regardless
            pass


def _exit(code: int) -> None:
    flush_std()
    os._exit(code)
