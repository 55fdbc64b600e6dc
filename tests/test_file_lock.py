"""hf_ddpm/file_lock.py: the one exclusive file lock (a training run's output directory, a data cache being built)
names its holder, refuses or waits, and frees with its holder; a removed lock file is never held twice."""

import os
import subprocess
import sys
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


PROBES = """
import sys, time
from hf_ddpm.file_lock import holder_of
seen, end = [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    seen.append(holder_of(sys.argv[1]))
print(len(seen), sum(h is not None for h in seen), {h for h in seen if h})
"""


def probe_at_once(path: str, seconds: float) -> list[tuple[int, int, str]]:
    """Two processes that probe `path` with holder_of as fast as they can for `seconds`: (probes, found held, by)."""
    command = [sys.executable, "-c", PROBES, path, str(seconds)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        n, held, by = out.split(" ", 2)
        results.append((int(n), int(held), by.strip()))
    return results


def test_processes_probing_a_free_lock_at_once_never_find_it_held(tmp_path):
    """Every process of a launch checks the output directory at about the same moment: an exclusive probe found the
    other probe's lock for a moment and refused the run as "in use by" the last run's PID (named in the file)."""
    path = str(tmp_path / "out.lock")
    FileLock.take(path).release()  # the file a finished run leaves, naming it
    for n, held, by in probe_at_once(path, 1.5):
        assert n > 1000 and held == 0, (n, held, by)
    lock = FileLock.take(path)  # a live run: every probe finds it
    for n, held, by in probe_at_once(path, 0.3):
        assert n > 100 and held == n and by == f"{{'{holder_of(path)}'}}"
    lock.release()


def test_a_take_while_another_process_probes_the_lock_is_not_refused(tmp_path):
    """A probe holds its shared lock for microseconds: a run taking the lock at that moment must not be refused as
    if another run held it (every process of a launch probes the directory, and the main one then takes it)."""
    path = str(tmp_path / "out.lock")
    FileLock.take(path).release()
    prober = subprocess.Popen([sys.executable, "-c", PROBES, path, "30"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # probing by now
        for _ in range(1000):
            FileLock.take(path).release()
    finally:
        prober.kill()
        prober.communicate()
