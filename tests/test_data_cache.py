"""hf_ddpm.data's decode-once cache: built once and reused without decoding, keyed by source and options, never used
half-written (SIGKILL while preprocessing), and the in-memory and memory-mapped paths give the same batches and the
same trained weights. Images are written into tmp_path."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from image_files import ids, write_images
from PIL import Image

import hf_ddpm.data.cache as cache_module
from hf_ddpm.data import MappedImages, load_data
from hf_ddpm.data.batches import ShardedBatches
from hf_ddpm.data.cache import MANIFEST, cache_root

REPO = Path(__file__).resolve().parents[1]


def test_the_second_load_decodes_nothing_and_options_or_files_key_the_cache(tmp_path, decodes):
    folder = write_images(tmp_path / "imgs", 20)
    kw = {"train_data_dir": folder, "resolution": 8, "eval_size": 4, "cache_dir": str(tmp_path / "c")}
    first = load_data(**kw)
    assert decodes[0] == 20 and sorted(ids(torch.cat([first.train, first.eval]))) == list(range(20))
    assert first.cache_dir.startswith(cache_root(str(tmp_path / "c")))  # under --cache_dir
    assert json.loads((Path(first.cache_dir) / MANIFEST).read_text())["rows"] == 20
    again = load_data(**kw)
    assert decodes[0] == 20 and torch.equal(again.train, first.train) and torch.equal(again.eval, first.eval)
    load_data(**{**kw, "eval_size": 7, "seed": 3})  # another split of the same cached images: no decoding
    assert decodes[0] == 20
    assert load_data(**{**kw, "resolution": 4}).train.shape[-1] == 4 and decodes[0] == 40  # an option: new cache
    load_data(**{**kw, "center_crop": False})
    assert decodes[0] == 60
    time.sleep(0.01)
    Image.new("RGB", (12, 10), (1, 2, 3)).save(Path(folder) / "00000.png")  # a file changed: new cache
    changed = load_data(**kw)
    assert decodes[0] == 80 and changed.cache_dir != first.cache_dir
    assert (1, 2, 3) in {tuple(c) for c in torch.cat([changed.train, changed.eval])[:, :, 0, 0].tolist()}


def test_a_subset_is_preprocessed_alone(tmp_path, decodes):
    folder = write_images(tmp_path / "imgs", 30)
    data = load_data(train_data_dir=folder, resolution=8, eval_size=3, max_train_samples=5, cache_dir=str(tmp_path))
    assert decodes[0] == 8 and len(data.train) == 5 and len(data.eval) == 3  # only the 8 images used
    assert not set(ids(data.train)) & set(ids(data.eval))


def test_corrupt_images_are_found_once_when_the_cache_is_built(tmp_path, decodes):
    folder = write_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    kw = {"train_data_dir": folder, "resolution": 8, "eval_size": 0, "cache_dir": str(tmp_path / "c")}
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt .*bad\.png"):
        assert len(load_data(**kw).train) == 6
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt .*bad\.png"):  # still said, from the cache
        assert len(load_data(**kw).train) == 6
    with pytest.raises(ValueError, match=r"cannot decode image .*bad\.png"):
        load_data(skip_corrupt=False, **kw)
    assert decodes[0] == 7  # decoded once


def test_mapped_and_in_memory_paths_give_the_same_batches(tmp_path):
    folder = write_images(tmp_path / "imgs", 40)
    kw = {"train_data_dir": folder, "resolution": 8, "eval_size": 0, "cache_dir": str(tmp_path / "c")}
    held, mapped = load_data(**kw), load_data(max_in_memory_bytes=0, **kw)
    assert held.in_memory and isinstance(mapped.train, MappedImages) and not mapped.in_memory
    for world in (1, 2):
        seen = []
        for rank in range(world):
            a = ShardedBatches(held.train, 5, world, rank, seed=1)
            b = ShardedBatches(mapped.train.to("cpu"), 5, world, rank, seed=1)
            for step in range(a.batches_per_epoch * 2):  # two epochs
                assert torch.equal(a.batch(step), b.batch(step))
                if step < a.batches_per_epoch:
                    seen += ids(b.batch(step))
        assert sorted(seen) == list(range(40))  # one epoch over all processes: every image exactly once


KILL_SCRIPT = """
import sys
from hf_ddpm.data import load_data
load_data(train_data_dir=sys.argv[1], resolution=16, eval_size=0, cache_dir=sys.argv[2], preprocessing_num_workers=2)
"""


def test_a_run_killed_while_preprocessing_leaves_nothing_used_as_complete(tmp_path):
    folder = write_images(tmp_path / "imgs", 6000, size=(64, 48))
    cache = tmp_path / "c"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, folder, str(cache)], env=env, start_new_session=True)
    deadline = time.time() + 120
    root = Path(cache_root(str(cache)))
    while time.time() < deadline and not list(root.glob("*/tmp*")):  # datasets writes a shard to a temp file
        time.sleep(0.05)
    assert list(root.glob("*/tmp*")), "preprocessing never started writing"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its pool of decoding processes
    proc.wait()
    (folder_key,) = [p for p in root.iterdir() if p.is_dir()]  # beside it: its lock file, <key>.lock
    assert not (folder_key / MANIFEST).exists()  # not complete
    assert cache_module.open_cache(str(folder_key)) is None
    data = load_data(train_data_dir=folder, resolution=16, eval_size=0, cache_dir=str(cache))  # builds it again
    assert (folder_key / MANIFEST).exists() and not list(folder_key.glob("tmp*"))
    assert sorted(ids(data.train)) == list(range(6000))
    np.testing.assert_array_equal(data.train[:, :, 0, 0].numpy()[:3], [[0, 0, 7], [1, 0, 7], [2, 0, 7]])
