"""One trainer per workdir: an exclusive flock on WORKDIR/.onn-train.lock, which holds the PID.

    with WorkdirLock(workdir) as lock:       # raises WorkdirBusy if another process holds it
        if lock.stale: print("took over", lock.stale)
        ...

The kernel drops a flock when its process dies (kill -9 included), so a lock file left by a
dead process is simply taken over; `stale` then holds what it said ("PID HOST"). The file is
removed on release. A process that locked a file which meanwhile was removed (released by its
holder) retries on the new one, so two processes never both hold the lock.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".onn-train.lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_FILE
        self.stale: str | None = None
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises WorkdirBusy (naming the holder's PID); OSError if the
        workdir is not writable (or the disk is full: the lock file is then removed again)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                pid = holder.split()[0]
                raise WorkdirBusy(f"{self.path.parent} is in use by another onn-train (pid {pid}, "
                                  f"lock file {self.path}); wait for it to finish, stop it, or pass "
                                  "another --workdir") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (and removed) it between our open and flock
        try:
            old = os.read(fd, 200).decode(errors="replace").strip()
            self.stale = old or None
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.fsync(fd)
        except OSError:  # a full disk: give the lock up and leave no lock file (ours to remove: we hold it)
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
