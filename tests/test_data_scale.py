"""Data at scale (slow): a generated folder of 100,000 32x32 images trains on the memory-mapped cache with private
memory (RssAnon, summed over the launcher and training processes) that does not grow with the dataset; the second
start decodes nothing and reaches its first optimizer step quickly; two DDP processes build the cache once, and train to the same weights on the
memory-mapped and in-memory paths."""

import multiprocessing
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_runs import REPO, environment, launch, launch_command, launch_flags

pytestmark = pytest.mark.slow
BIG, SMALL = 100_000, 10_000


def _write(args):
    folder, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        a = np.empty((32, 32, 3), np.uint8)
        a[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        x, y = rng.integers(0, 24, 2)
        a[y : y + 8, x : x + 8] = 255 - a[0, 0]  # a square on a background: shapes, not noise
        Image.fromarray(a).save(f"{folder}/{i:06d}.png", compress_level=1)


def generate(folder: Path, n: int) -> str:
    folder.mkdir(parents=True)
    chunks = [(str(folder), s, min(n, s + 5000)) for s in range(0, n, 5000)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_write, chunks)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return {n: generate(root / f"f{n}", n) for n in (SMALL, BIG)}


def rss_anon(pid: int) -> int:
    """Private resident memory of one process, in bytes (file-backed pages of the mapped cache do not count)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0  # a process that has exited (a zombie has no memory left)


def measured_launch(argv, num_processes=1):
    """(log, peak RssAnon summed over the process tree, seconds from start to the first optimizer step)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        launch_command(argv, num_processes), cwd=REPO, env=environment(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    import threading

    lines, first_step, peak = [], [None], [0]

    def read():
        for line in proc.stdout:
            lines.append(line)
            if first_step[0] is None and re.search(r"steps:\s+\d+%.*\| [1-9]\d*/\d+", line):
                first_step[0] = time.monotonic() - started

    reader = threading.Thread(target=read)
    reader.start()
    while proc.poll() is None:
        try:
            family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            peak[0] = max(peak[0], sum(rss_anon(p) for p in family))
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.2)
    reader.join()
    log = "".join(lines)
    assert proc.returncode == 0, log[-5000:]
    return log, peak[0], first_step[0]


def run_args(out, folder, cache, *extra, budget_gb="0"):
    args = launch_flags(out, "--train_data_dir", folder, "--cache_dir", str(cache), "--max_train_steps", "3",
                "--save_images_steps", "1000", "--checkpointing_steps", "1000", "--max_in_memory_gb", budget_gb, *extra)  # fmt: skip
    i = args.index("--resolution")
    return [*args[:i], "--resolution", "32", *args[i + 2 :]]  # the images' own size: 3 KB each decoded


def test_a_hundred_thousand_images_train_on_the_mapped_cache_in_flat_memory(folders, tmp_path):
    peaks, first_steps = {}, {}
    for n in (SMALL, BIG):
        cache = tmp_path / f"cache{n}"
        log = launch(run_args(tmp_path / f"first{n}", folders[n], cache))
        assert f"preprocessing {n} images" in log
        runs = [measured_launch(run_args(tmp_path / f"again{n}-{i}", folders[n], cache)) for i in range(2)]
        for log, _, _ in runs:
            assert "preprocessing" not in log  # later starts decode nothing
            assert "batches read from the memory-mapped cache" in log
        peaks[n] = max(peak for _, peak, _ in runs)
        first_steps[n] = min(seconds for _, _, seconds in runs)  # the less disturbed of two starts: 2 shared cores
    decoded_difference = (BIG - SMALL) * 3 * 32 * 32
    assert decoded_difference > 270e6  # what holding the images in memory would add
    assert abs(peaks[BIG] - peaks[SMALL]) < 150e6, (peaks, decoded_difference)
    assert first_steps[BIG] < 10, first_steps  # launch to the first optimizer step, from the cache
    assert first_steps[BIG] < 2 * first_steps[SMALL] + 2, first_steps  # O(1) in the dataset's size
    print(f"peak RssAnon {peaks}, first step after {first_steps} s")


def test_two_ddp_processes_build_the_cache_once(tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(64):
        Image.new("RGB", (12, 12), (i, 0, 0)).save(folder / f"{i}.png")
    log = launch(run_args(tmp_path / "mapped", str(folder), tmp_path / "cache"), num_processes=2)
    assert len(re.findall(r"preprocessing \d+ images", log)) == 1  # one process built it, the other waited
    assert log.count("batches read from the memory-mapped cache") == 2  # both open it
    log = launch(run_args(tmp_path / "held", str(folder), tmp_path / "cache", budget_gb="1"), num_processes=2)
    assert "preprocessing" not in log and log.count("held in memory") == 2
    a = load_file(str(tmp_path / "mapped" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "held" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same positions on both paths: the same run
