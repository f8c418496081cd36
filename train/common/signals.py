"""onn-train's signal policy: SIGTERM, SIGINT and SIGHUP ask for a clean stop; a second one ends at once.

    with StopOnSignal() as stop:      # installs the handlers (main thread), restores them on exit
        ...
        if stop.signum is not None:   # checked by the loop at step boundaries
            save the current step, release the lock, print where to resume, exit stop.exit_code

The first signal only sets a flag (no KeyboardInterrupt lands inside orbax or jax), so the
training loop finishes the step it is in, saves it, waits for the save and exits with
128 + the signal number (SIGINT 130, SIGTERM 143, SIGHUP 129). A second signal prints one
line, runs the registered `at_exit` callbacks (removing the workdir lock file) and ends the
process with os._exit at once: no hang, even when a save is stuck; rerunning resumes from the
last committed checkpoint (a half-written save is a temporary folder, removed at the next start).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Sequence

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def exit_code(signum: int) -> int:
    """The process exit code after a stop by `signum` (the shell's 128 + N convention)."""
    return 128 + int(signum)


def name(signum: int) -> str:
    return signal.Signals(signum).name


class StopOnSignal:
    """Handlers for SIGNALS that record the first signal and end the process on the second."""

    _current: "StopOnSignal | None" = None

    def __init__(self, prog: str = "onn-train"):
        self.prog = prog
        self.signum: int | None = None
        self.event = threading.Event()
        self.at_exit: list[Callable[[], None]] = []
        # What undoes a start that has written no outputs yet (train.run.setup sets it while the
        # start lasts); a multi-process run's watchdog calls it before it ends the process.
        self.abandon: Callable[[], None] | None = None
        self._previous: dict[int, object] = {}

    @classmethod
    def current(cls) -> "StopOnSignal | None":
        """The installed instance (None outside `with StopOnSignal()`), e.g. for train.run.faults."""
        return cls._current

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum) if self.signum is not None else 0

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self.event.set()
            return
        os.write(2, (f"{self.prog}: second signal ({name(signum)}): stopping at once without saving; "
                     "rerun the same command to resume from the last committed checkpoint\n").encode())
        for fn in self.at_exit:
            try:
                fn()
            except Exception:  # noqa: BLE001 - exiting regardless
                pass
        os._exit(exit_code(signum))

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        StopOnSignal._current = self
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if StopOnSignal._current is self:
            StopOnSignal._current = None


def requested() -> bool:
    """Whether a stop was asked of the installed handler (False when none is installed)."""
    cur = StopOnSignal.current()
    return cur is not None and cur.signum is not None


def flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


def _is_closed_loop_callback(exc_type, exc, tb) -> bool:
    """True for the RuntimeError('Event loop is closed') that tensorstore's worker threads raise
    when they hand a finished read to the asyncio loop of a restore that already failed: the
    exception starts in asyncio's call_soon_threadsafe, called from C, not from our code."""
    return (exc_type is RuntimeError and str(exc) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def silence_closed_loop_callbacks() -> None:
    """Keeps a failed checkpoint read to its one error line: drops the late 'Event loop is
    closed' tracebacks that tensorstore's threads report as unraisable exceptions after the
    failure; every other unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook

    def hook(args):
        if not _is_closed_loop_callback(args.exc_type, args.exc_value, args.exc_traceback):
            previous(args)

    sys.unraisablehook = hook


def run_program(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """A console script's entry point: runs `body(argv)`; as the program (argv None) a failure
    prints only its own error line (see silence_closed_loop_callbacks and end_program)."""
    as_program = argv is None
    if as_program:
        silence_closed_loop_callbacks()
    return end_program(body(argv), as_program)


def end_program(code: int, as_program: bool) -> int:
    """Returns `code`; when running as the program (not called from Python) and failing, ends
    the process at once after flushing stdout/stderr, so no asyncio or orbax callback left
    behind by a failed read ("Event loop is closed") prints a traceback after the error line."""
    if as_program and code:
        flush_std()
        os._exit(code)
    return code
