"""The decode-once cache under faults: a truncated, deleted or changed Arrow file is found and the cache rebuilt with a
warning naming its folder; two real processes building one key at once coordinate through its lock (the second
waits, then reads the first's cache; a builder alive keeps its temporary files); the key is the folder's resolved
path, not its spelling or the working directory; a full disk names --cache_dir and the bytes, before building."""

import errno
import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from fault_hooks import SLOW_CACHE_BUILD, alive, children
from image_files import ids, write_images

import hf_ddpm.data.cache as cache_module
from hf_ddpm.data import load_data
from hf_ddpm.data.cache import MANIFEST, CacheSpaceError, SourceUnreadable, cache_root
from hf_ddpm.file_lock import holder_of

REPO = Path(__file__).resolve().parents[1]


def test_a_truncated_deleted_or_changed_arrow_file_is_rebuilt_with_a_warning_naming_the_folder(tmp_path, decodes, caplog):  # fmt: skip
    kw = {"train_data_dir": write_images(tmp_path / "imgs", 50), "resolution": 8, "eval_size": 0,
          "cache_dir": str(tmp_path / "c")}  # fmt: skip
    first = load_data(**kw)
    folder = Path(first.cache_dir)
    (arrow,) = folder.glob("*.arrow")
    size = arrow.stat().st_size
    damages = {
        "truncated": (
            lambda: os.truncate(arrow, size // 2),
            f"{arrow.name} holds {size // 2} bytes, {size} were written",
        ),  # fmt: skip
        "deleted": (arrow.unlink, f"{arrow.name} cannot be read \\(FileNotFoundError"),
        "changed": (lambda: arrow.write_bytes(b"\0" * size), f"{arrow.name} has changed since it was written"),
    }
    for n, (damage, said) in enumerate(damages.values(), start=2):
        damage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_ddpm.data.cache"):
            again = load_data(**kw)
        (warning,) = [r.getMessage() for r in caplog.records]
        assert warning.startswith(f"the preprocessed cache {folder} is damaged (")
        assert __import__("re").search(said, warning) and warning.endswith(": rebuilding it")
        assert decodes[0] == 50 * n and Path(again.cache_dir) == folder
        assert torch.equal(again.train, first.train)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.data.cache"):
        assert torch.equal(load_data(**kw).train, first.train)  # healed: read, no warning, nothing decoded
    assert decodes[0] == 200 and not caplog.records


def test_the_key_is_the_resolved_path_not_its_spelling_or_the_working_directory(tmp_path, monkeypatch, decodes):
    write_images(tmp_path / "f200", 20)
    (tmp_path / "elsewhere").mkdir()
    kw = {"resolution": 8, "eval_size": 0, "cache_dir": str(tmp_path / "c")}
    monkeypatch.chdir(tmp_path)
    folders = {load_data(train_data_dir="f200", **kw).cache_dir, load_data(train_data_dir="./f200/", **kw).cache_dir}
    monkeypatch.chdir(tmp_path / "elsewhere")
    folders.add(load_data(train_data_dir="../f200", **kw).cache_dir)
    folders.add(load_data(train_data_dir=str(tmp_path / "f200"), **kw).cache_dir)
    assert len(folders) == 1 and decodes[0] == 20  # decoded once


def test_a_disk_too_small_is_refused_before_building_naming_cache_dir_and_the_bytes(tmp_path, monkeypatch):
    kw = {"train_data_dir": write_images(tmp_path / "imgs", 30), "resolution": 8, "eval_size": 0,
          "cache_dir": str(tmp_path / "c")}  # fmt: skip
    real = cache_module.shutil.disk_usage
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: real(path)._replace(free=5000))
    needed = cache_module._bytes_needed(30, 3, 8)
    with pytest.raises(CacheSpaceError, match=rf"--cache_dir {tmp_path / 'c'}: the preprocessed cache of 30 images "
                       rf"\(3x8x8 uint8\) needs about {needed} bytes .* has 5000 bytes .* free; free space there, or "
                       "pass --cache_dir on a disk with room"):  # fmt: skip
        load_data(**kw)
    assert not list(Path(cache_root(kw["cache_dir"])).glob(f"*/{MANIFEST}"))
    monkeypatch.setattr(cache_module.shutil, "disk_usage", real)
    data = load_data(**kw)  # room again: built
    assert sorted(ids(data.train)) == list(range(30))
    assert needed >= os.path.getsize(next(Path(data.cache_dir).glob("*.arrow")))  # the estimate covers the file


def test_a_disk_that_fills_while_building_says_so_and_leaves_no_partial_cache(tmp_path, monkeypatch):
    kw = {"train_data_dir": write_images(tmp_path / "imgs", 30), "resolution": 8, "eval_size": 0}

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache_module, "write_atomically", full)
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # the default cache_dir
    with pytest.raises(CacheSpaceError, match=r"--cache_dir \(not given: the datasets cache, .*hf_ddpm_preprocessed\)"
                       r": .* \(the disk filled while it was built\) needs about \d+ bytes"):  # fmt: skip
        load_data(**kw, cache_dir=None)
    assert not list((tmp_path / "datasets" / "hf_ddpm_preprocessed").glob("*/*"))  # nothing of it kept


BUILD_SCRIPT = """
import logging, pathlib, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from hf_ddpm.data import load_data
barrier = pathlib.Path(sys.argv[3])  # both start building together, whatever their start-up times
(barrier / sys.argv[4]).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.01)
data = load_data(train_data_dir=sys.argv[1], resolution=16, eval_size=0, cache_dir=sys.argv[2])
print("ids", int(data.train[:, 0].long().sum()), len(data.train), flush=True)
"""


def _builder(folder, cache, barrier, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, folder, cache, barrier, name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.slow  # two processes preprocess 3000 images at once: about 20 s
def test_two_real_processes_building_one_key_at_once_coordinate(tmp_path):
    folder, cache = write_images(tmp_path / "imgs", 3000, size=(48, 40)), str(tmp_path / "c")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    first, second = _builder(folder, cache, barrier, "a"), _builder(folder, cache, barrier, "b")
    logs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, logs
    results = [line for log in logs for line in log.splitlines() if line.startswith("ids ")]
    assert len(results) == 2 and results[0] == results[1] and results[0].endswith(" 3000")
    built = [log for log in logs if "preprocessing 3000 images" in log]
    assert len(built) == 1, logs  # one decoded, the other waited and read its cache
    (waited,) = [log for log in logs if log not in built]
    assert "which is building the preprocessed cache" in waited and "built by another process meanwhile" in waited
    assert not list(Path(cache_root(cache)).glob("*/tmp*"))


def test_a_builder_waits_for_the_lock_and_leaves_a_live_builders_temporary_files(tmp_path):
    kw = {"train_data_dir": write_images(tmp_path / "imgs", 20), "resolution": 8, "eval_size": 0,
          "cache_dir": str(tmp_path / "c")}  # fmt: skip
    key_folder = Path(load_data(**kw).cache_dir)  # learn the key's folder, then start again from nothing
    for f in key_folder.iterdir():
        f.unlink()
    key_folder.rmdir()
    key_folder.mkdir()
    in_progress = key_folder / "tmpabc123"  # another builder's file being written
    in_progress.write_bytes(b"partial")
    result = {}
    with open(f"{key_folder}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # that builder holds the key's lock
        waiter = threading.Thread(target=lambda: result.setdefault("data", load_data(**kw)))
        waiter.start()
        time.sleep(2)
        assert waiter.is_alive() and in_progress.exists() and not (key_folder / MANIFEST).exists()
        fcntl.flock(lock, fcntl.LOCK_UN)  # it died: its file is stale now
    waiter.join(timeout=120)
    assert sorted(ids(result["data"].train)) == list(range(20))
    assert not in_progress.exists()  # removed by the next holder of the lock


KILLED_BUILD_SCRIPT = (
    SLOW_CACHE_BUILD
    + """
from hf_ddpm.data import load_data
load_data(train_data_dir=sys.argv[1], resolution=8, eval_size=0, cache_dir=sys.argv[2], preprocessing_num_workers=2)
"""
)


def test_a_builder_killed_while_its_pool_decodes_leaves_no_worker_holding_the_lock(tmp_path):
    """The OOM killer's case: SIGKILL of the builder alone. Its `Dataset.map` workers die with it, so nothing holds the
    key's lock (the next run would wait for the dead builder forever) and the next build completes."""
    folder, cache = write_images(tmp_path / "imgs", 4100, size=(8, 8)), str(tmp_path / "c")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    builder = subprocess.Popen([sys.executable, "-c", KILLED_BUILD_SCRIPT, folder, cache], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(workers := [p for p in children(builder.pid) if alive(p)]) < 2:  # the pool (and its manager)
        assert builder.poll() is None and time.monotonic() < deadline, "the build never started its pool"
        time.sleep(0.05)
    time.sleep(0.5)
    builder.kill()
    builder.wait()
    (lock,) = Path(cache_root(cache)).glob("*.lock")
    deadline = time.monotonic() + 10  # a worker the pool started after the snapshot above dies as soon, unlisted
    while (any(alive(p) for p in workers) or holder_of(str(lock)) is not None) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "workers outlived the killed builder"
    assert holder_of(str(lock)) is None
    data = load_data(train_data_dir=folder, resolution=8, eval_size=0, cache_dir=cache)
    assert sorted(ids(data.train)) == list(range(4100))


def test_a_source_that_vanishes_while_the_cache_is_built_stops_it_naming_the_file_and_marks_nothing_complete(
    tmp_path, monkeypatch
):
    """A missing file is not a corrupt image: skipping it would keep a cache of part of the data for every later run."""
    folder, moved = tmp_path / "imgs", tmp_path / "moved"
    kw = {"train_data_dir": write_images(folder, 30), "resolution": 8, "eval_size": 0, "cache_dir": str(tmp_path / "c")}
    real = cache_module.read_bytes

    def vanishing(path):  # the folder is moved away once the build has started reading it
        if folder.exists():
            folder.rename(moved)
        return real(path)

    monkeypatch.setattr(cache_module, "read_bytes", vanishing)
    with pytest.raises(SourceUnreadable, match=r"cannot read image .*imgs/00000\.png \(FileNotFoundError.*Restore"):
        load_data(**kw)
    assert not list(Path(cache_root(kw["cache_dir"])).glob(f"*/{MANIFEST}"))
    monkeypatch.setattr(cache_module, "read_bytes", real)
    moved.rename(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped
        assert sorted(ids(load_data(**kw).train)) == list(range(30))


def test_a_shard_damaged_in_a_folder_without_its_manifest_is_removed_and_rebuilt(tmp_path, caplog):
    kw = {"train_data_dir": write_images(tmp_path / "imgs", 40), "resolution": 8, "eval_size": 0,
          "cache_dir": str(tmp_path / "c")}  # fmt: skip
    folder = Path(load_data(**kw).cache_dir)
    (folder / MANIFEST).unlink()  # no longer complete: a build that did not finish
    (arrow,) = folder.glob("pixels*.arrow")
    os.truncate(arrow, arrow.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.data.cache"):
        data = load_data(**kw)
    assert sorted(ids(data.train)) == list(range(40))
    assert f"removing {arrow}, left unreadable by an unfinished build" in caplog.text
    assert (folder / MANIFEST).exists()


def test_an_unfinished_build_of_an_abandoned_key_is_removed_by_the_next_build_but_a_live_one_is_kept(tmp_path, caplog):
    """A build killed (no manifest, its lock free), then its data changed: the next build, under a new key, removes
    it; one whose builder still holds its lock is another run's work in progress, and stays; complete caches stay."""
    images = write_images(tmp_path / "imgs", 30)
    kw = {"train_data_dir": images, "resolution": 8, "eval_size": 0, "cache_dir": str(tmp_path / "c")}
    complete = Path(load_data(**kw, max_train_samples=10).cache_dir)  # another key, finished
    killed = Path(load_data(**kw).cache_dir)
    (killed / MANIFEST).unlink()  # as a build killed before it finished
    (killed / "tmpk1ll3d").write_bytes(b"partial")
    live = killed.parent / "0123456789abcdef"  # a build of another run, under way
    live.mkdir()
    (live / "tmpl1ve").write_bytes(b"partial")
    with open(f"{live}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.remove(os.path.join(images, sorted(os.listdir(images))[0]))  # the data changed: a new key
        with caplog.at_level(logging.WARNING, logger="hf_ddpm.data.cache"):
            data = load_data(**kw)
        assert len(data.train) == 29 and Path(data.cache_dir) not in (killed, complete, live)
        assert not killed.exists() and not Path(f"{killed}.lock").exists()
        assert f"removing {killed} (0.0 MB), an unfinished build of another key whose builder died" in caplog.text
        assert (live / "tmpl1ve").exists() and (complete / MANIFEST).exists()
    assert len(os.listdir(live.parent)) == 6  # the new key, the finished one, the live one, and their locks
