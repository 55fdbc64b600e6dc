"""Exclusive file locks (`fcntl.flock`) that name their holder: one process at a time owns what a lock file guards
(a training run's output directory, a data cache folder being built).

The kernel releases a flock when its process ends, however it ends: a SIGKILLed holder never leaves a stale lock.
The holder writes who it is (PID, host, since when) into the file, so that a process that finds the lock taken can
say who has it. A lock file may be removed by its holder (a run that leaves no trace), with the folders `take`
created for it: a process that opened the removed file takes the lock on the new one instead (the inode check in
`take`), so two never hold "the" lock.

    FileLock.take(path)            the lock, or LockHeld naming its holder; wait=True waits for the holder instead
    holder_of(path)                who holds the lock on `path`, None if nobody (reads only)
    lock.release(remove=False)     free it (remove: delete the file as well, and the folders `take` created)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time


class LockHeld(Exception):
    """Another process holds the lock; `holder` names it."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"PID {info['pid']} on host {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def holder_of(path: str) -> str | None:
    """The holder of the lock on `path`, None when nobody holds it. Reads only: a shared lock is tried on a read-only
    descriptor and let go at once. Shared, so that probes at the same moment (every process of a launch checks the
    output directory) never take each other for a holder: an exclusive probe would, and name the last run's PID."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)  # also lets go of a lock taken here
    return None


def _exclusive_soon(fd: int, patience: float = 0.5) -> bool:
    """Whether an exclusive flock on `fd` was taken without blocking, tried again for `patience` seconds: a probe
    (`holder_of`) holds its shared lock for microseconds (longer only while a loaded machine has it descheduled), a
    run for as long as it runs."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


class FileLock:
    """An exclusive lock on the file `path`, held until `release` (or the process's end). `created_dir`: the
    outermost folder `take` created for the file (None if its folder existed)."""

    def __init__(self, path: str, fd: int, created_dir: str | None = None):
        self.path, self.fd, self.created_dir = path, fd, created_dir

    @classmethod
    def take(cls, path: str, wait: bool = False, waiting=None) -> FileLock:
        """Lock `path` (created if missing, and its folder). Taken by another process: raise LockHeld, or with `wait`
        tell `waiting(holder)` and wait until the holder lets go."""
        folder = os.path.dirname(os.path.abspath(path))
        created, missing = None, folder
        while not os.path.isdir(missing):  # the outermost folder made for it: a/ of a new a/b/c/
            created, missing = missing, os.path.dirname(missing)
        os.makedirs(folder, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _exclusive_soon(fd):
                if not wait:
                    os.close(fd)
                    raise LockHeld(path, _holder(path))
                if waiting is not None:
                    waiting(_holder(path))
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a file that its holder just removed
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(path, fd, created)

    def release(self, remove: bool = False) -> None:
        """Free the lock (once; later calls do nothing); with `remove` delete the lock file first, then the folders
        `take` created for it, each while nothing else is in it."""
        if self.fd is None:
            return
        if remove:
            os.unlink(self.path)
        os.close(self.fd)  # closing the last descriptor frees the flock
        self.fd = None
        folder = os.path.dirname(os.path.abspath(self.path))
        while remove and self.created_dir is not None:  # the folders `take` made, innermost first
            with contextlib.suppress(OSError):  # not empty: someone else's files are never removed
                os.rmdir(folder)
            if folder == self.created_dir or os.path.isdir(folder):
                break
            folder = os.path.dirname(folder)

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
