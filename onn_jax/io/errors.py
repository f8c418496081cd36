"""What goes wrong with a checkpoint, in words: the errors every io module raises.

CheckpointError (missing, damaged or mismatched), SaveError (a save that failed, with the
steps still committed) and ExportWriteError (an export that could not be written) are their
own module so that the checkpointer, the restore targets, the exports and the programs'
messages (onn-export) share them without importing orbax; os_error_in / error_cause dig the
OSError out of the chains orbax wraps it in, or read the OS error number that tensorstore and
safetensors write into their own messages (os_errno_in_text).
"""
from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint is missing or does not match what the caller expects."""


class SaveError(RuntimeError):
    """A checkpoint save failed (e.g. the disk is full); `step` is the step whose save failed,
    `committed` the steps on disk, `cause` the underlying error in words."""

    def __init__(self, step: int | None, cause: str, committed: list[int]):
        self.step, self.cause, self.committed = step, cause, committed
        what = f"the checkpoint save of step {step}" if step is not None else "a checkpoint save"
        last = f"step {committed[-1]}" if committed else "none"
        super().__init__(f"{what} failed: {cause}; last committed checkpoint: {last}")


class ExportWriteError(RuntimeError):
    """Writing an export failed (a full disk, an I/O error); nothing was left at `out`."""

    def __init__(self, out: str, cause: BaseException):
        self.out, self.cause = out, error_cause(cause)
        super().__init__(f"cannot write the export to {out}: {self.cause}; nothing was written there")


def os_error_in(e: BaseException) -> OSError | None:
    """The first OSError with an errno in the chain of `e` (orbax wraps them), else None."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def error_cause(e: BaseException) -> str:
    """The root cause of `e` in words: the first OSError in its chain (e.g. 'No space left on
    device (errno 28): PATH'), else the outermost exception's type and message."""
    cur = os_error_in(e)
    if cur is not None:
        where = f": {cur.filename}" if cur.filename else ""
        return f"{cur.strerror or os.strerror(cur.errno)} (errno {cur.errno}){where}"
    code = os_errno_in_text(e)
    if code is not None:  # tensorstore (orbax) and safetensors name the OS error in their text
        return f"{os.strerror(code)} (errno {code})"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def os_errno_in_text(e: BaseException) -> int | None:
    """The OS error number that a library's own exception names in its message, e.g. tensorstore's
    `[os_error_code='28']` (orbax wraps it in a ValueError) or safetensors' `(os error 28)`."""
    import re
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        m = re.search(r"os_error_code='?(\d+)|\(os error (\d+)\)|\[Errno (\d+)\]", str(cur)[:20000])
        if m:
            return int(next(g for g in m.groups() if g))
        cur = cur.__cause__ or cur.__context__
    return None
