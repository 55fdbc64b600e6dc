"""Worker processes that die with the process that started them: the stream's decoding workers (a pool of ours,
streaming.py) and the `Dataset.map(num_proc=...)` workers that build the data cache (a pool `datasets` starts,
cache.py).

A trainer killed alone (SIGKILL: the kernel's OOM killer, a cluster's hard stop) runs no cleanup, so its workers would
live on, blocked on the pipe to a parent that is gone. They would keep what they inherited: the launcher's
stdout/stderr pipes (so `accelerate launch` never exits) and the descriptors of the trainer's locks (so the next run
finds the output directory "in use" and waits for the cache "being built" forever). Each worker therefore asks the
kernel to kill it when its parent dies (Linux's parent-death signal; elsewhere a thread polls the parent's pid).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_arming_pid: int | None = None  # while set, a process this one forks dies with it (`forks_die_with_this_process`)
_hooked = False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)  # the parent died: nothing of ours is left to work for


def die_with_parent(parent_pid: int) -> None:
    """Make this process (a worker started by `parent_pid`) end when its parent does, however the parent ends."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _after_fork_in_child() -> None:
    if _arming_pid is not None and os.getppid() == _arming_pid:  # forked by the arming process itself, not deeper
        die_with_parent(_arming_pid)


@contextlib.contextmanager
def forks_die_with_this_process():
    """Within this block, the processes this one forks (a library's worker pool) die with it."""
    global _arming_pid, _hooked
    if not _hooked:  # at-fork hooks cannot be removed: one, active only inside this block
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooked = True
    _arming_pid = os.getpid()
    try:
        yield
    finally:
        _arming_pid = None
