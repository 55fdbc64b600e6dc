"""hf_ddpm/file_lock.py: the one exclusive file lock (a training run's output directory, a data cache being built)
names its holder, refuses or waits, and frees with its holder; a removed lock file is never held twice."""

import os
import threading
import time

import pytest

from hf_ddpm.file_lock import FileLock, LockHeld, holder_of


def test_a_held_lock_names_its_holder_and_is_refused_until_released(tmp_path):
    path = str(tmp_path / "x.lock")
    assert holder_of(path) is None  # no file yet
    lock = FileLock.take(path)
    assert holder_of(path).startswith(f"PID {os.getpid()} on host ")
    with pytest.raises(LockHeld, match=rf"x\.lock is locked by PID {os.getpid()} on host .* \(since "):
        FileLock.take(path)  # another open file description: refused like another process
    lock.release()
    lock.release()  # a second release does nothing
    assert holder_of(path) is None and os.path.exists(path)
    FileLock.take(path).release(remove=True)
    assert not os.path.exists(path)


def test_a_waiting_taker_hears_the_holder_once_and_gets_the_lock_when_it_is_freed(tmp_path):
    path = str(tmp_path / "key.lock")
    first, heard, got = FileLock.take(path), [], []
    waiter = threading.Thread(target=lambda: got.append(FileLock.take(path, wait=True, waiting=heard.append)))
    waiter.start()
    time.sleep(1)
    assert waiter.is_alive() and not got and len(heard) == 1 and heard[0].startswith(f"PID {os.getpid()} ")
    first.release(remove=True)  # the holder removes the file: the waiter must not hold the removed one
    waiter.join(timeout=30)
    (second,) = got
    assert os.path.exists(path) and os.fstat(second.fd).st_ino == os.stat(path).st_ino
    with pytest.raises(LockHeld):
        FileLock.take(path)
    second.release()


def test_removing_the_lock_removes_every_folder_take_made_for_it_and_nothing_else(tmp_path):
    FileLock.take(str(tmp_path / "a" / "b" / "c" / "x.lock")).release(remove=True)
    assert not (tmp_path / "a").exists()  # a/b/c/ made for the lock: all three gone
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "theirs.txt").write_text("someone else's")
    FileLock.take(str(tmp_path / "a" / "b" / "c" / "x.lock")).release(remove=True)
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["theirs.txt"]  # only c/ was made
