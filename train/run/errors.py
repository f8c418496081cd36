"""The ways a run ends other than done; train.main maps each to its exit code (2, 3, 128 + N, 4)."""
from __future__ import annotations


class TrainError(RuntimeError):
    """A run cannot start or continue; the message says why (field, file or checkpoint)."""


class TrainStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps in a row) after a checkpoint."""


class StoppedBySignal(RuntimeError):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) ended the run at a step boundary, after saving
    that step; `code` is the exit code (128 + signal), `hard` that a save was abandoned and
    still runs in a background thread, so the process must end with os._exit."""

    def __init__(self, message: str, code: int, hard: bool = False):
        super().__init__(message)
        self.code, self.hard = code, hard


class SaveFailed(RuntimeError):
    """A checkpoint save failed (disk full, I/O error); the run stopped at once. The message
    names the cause and the last committed checkpoint."""
