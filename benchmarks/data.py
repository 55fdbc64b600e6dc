"""Data path: images/s that hf_ddpm's data paths deliver to a training step (no model), beside diffusers' example's
data path and beside what one training step consumes; start-up time and peak memory against dataset size.

Paths (each ends with the batch as the float32 model input in [-1, 1], flipped, as the loop receives it):
in memory (`ShardedBatches` over a uint8 tensor), memory-mapped cache (the same positions read from the Arrow cache),
streaming (`StreamingBatches` over an imagefolder stream, decoded in 0/1/2 worker processes), and diffusers'
examples/unconditional_image_generation/train_unconditional.py data path: `load_dataset("imagefolder")` +
`set_transform` (Resize, CenterCrop, ToTensor, Normalize without torchvision: benchmarks.training._to_tensor) + a
shuffled DataLoader with 0/1/2 workers. Folders of generated PNGs (shapes on a background) at 32², 64² and 256².
Start-up: a fresh process from `python` to its first batch (imports, source listing, cache open or build), first
run (builds the cache) and cached run, with the process's peak RSS and RssAnon, at 1k / 10k (/ 100k) images.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from .measure import child_env, log, rotations, summary

PROFILES = {
    "smoke": {"resolutions": (32,), "images": 256, "batches": 3, "rounds": 1, "workers": (0,), "sizes": (300,)},
    "quick": {"resolutions": (32, 64, 256), "images": 1024, "batches": 12, "rounds": 3, "workers": (0, 1, 2),
              "sizes": (1000, 10000)},
    "full": {"resolutions": (32, 64, 256), "images": 4096, "batches": 40, "rounds": 5, "workers": (0, 1, 2),
             "sizes": (1000, 10000, 100000)},
}  # fmt: skip
BATCH = 64
FOLDERS = os.path.join(tempfile.gettempdir(), "hf_ddpm_bench_data")  # generated once, reused by later runs


def _write(args):
    folder, resolution, start, stop = args
    from PIL import Image

    rng = np.random.default_rng(start)
    for i in range(start, stop):
        a = np.empty((resolution, resolution, 3), np.uint8)
        a[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        x, y = rng.integers(0, resolution * 3 // 4, 2)
        a[y : y + resolution // 4, x : x + resolution // 4] = 255 - a[0, 0]
        Image.fromarray(a).save(f"{folder}/{i:06d}.png", compress_level=1)


def image_folder(n: int, resolution: int) -> str:
    """A folder of n generated PNGs (made once, in two processes)."""
    import multiprocessing

    folder = os.path.join(FOLDERS, f"{n}x{resolution}")
    if not os.path.isfile(os.path.join(folder, "done")):
        os.makedirs(folder, exist_ok=True)
        chunks = [(folder, resolution, s, min(n, s + 2000)) for s in range(0, n, 2000)]
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            pool.map(_write, chunks)
        open(os.path.join(folder, "done"), "w").close()
    return folder


def _cached_batches(folder, resolution, cache, mapped):
    from hf_ddpm.data import load_data
    from hf_ddpm.data.batches import ShardedBatches

    data = load_data(train_data_dir=folder, resolution=resolution, eval_size=0, cache_dir=cache,
                     max_in_memory_bytes=0 if mapped else None)  # fmt: skip
    return ShardedBatches(data.train, BATCH, 1, 0, seed=0)


def _streaming_batches(folder, resolution, workers):
    from hf_ddpm.data.streaming import StreamingBatches, open_streaming

    make, column, _, _, _ = open_streaming(train_data_dir=folder, resolution=resolution, channels=3, eval_size=0)
    return StreamingBatches(make, column, batch_size=BATCH, num_processes=1, process_index=0, seed=0,
                            buffer_size=1000, num_workers=workers, resolution=resolution, channels=3,
                            skip_corrupt=True, device="cpu")  # fmt: skip


def _diffusers_loader(folder, resolution, workers, cache):
    import datasets
    import torch

    from .training import _to_tensor

    dataset = datasets.load_dataset("imagefolder", data_dir=folder, cache_dir=cache, split="train")
    dataset.set_transform(lambda ex: {"input": [_to_tensor(im.convert("RGB"), resolution) for im in ex["image"]]})
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)  # fmt: skip


def throughput(path, folder, resolution, workers, batches, cache) -> float:
    """Images/s of one path over `batches` batches, after one untimed batch (worker start-up not counted)."""
    import torch

    from hf_ddpm.data.batches import step_generator, to_model_input

    if path == "diffusers example":
        loader = _diffusers_loader(folder, resolution, workers, cache)
        iterator = iter(loader)
        next(iterator)
        started = time.perf_counter()
        for _ in range(batches):
            try:
                x = next(iterator)["input"]
            except StopIteration:
                iterator = iter(loader)
                x = next(iterator)["input"]
        return batches * len(x) / (time.perf_counter() - started)
    if path == "streaming":
        source = _streaming_batches(folder, resolution, workers)
    else:
        source = _cached_batches(folder, resolution, cache, mapped=path == "memory-mapped cache")
    to_model_input(source.batch(0), step_generator(0, 0, 0, "cpu"), True)
    started = time.perf_counter()
    for m in range(1, batches + 1):
        x = to_model_input(source.batch(m), step_generator(0, 0, m, "cpu"), True)
    assert x.shape == (BATCH, 3, resolution, resolution) and x.dtype == torch.float32
    return batches * BATCH / (time.perf_counter() - started)


STARTUP = """
import sys, time
started = float(sys.argv[4])
from hf_ddpm.data import load_data
from hf_ddpm.data.batches import ShardedBatches
data = load_data(train_data_dir=sys.argv[1], resolution=32, eval_size=0, cache_dir=sys.argv[2],
                 max_in_memory_bytes=0 if sys.argv[3] == "mapped" else None)
ShardedBatches(data.train, 64, 1, 0, 0).batch(0)
seconds = time.time() - started
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(seconds, int(status["VmHWM"].split()[0]), int(status["RssAnon"].split()[0]))  # peak RSS, private RSS (kB)
"""


def startup(folder: str, cache: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STARTUP, folder, cache, path, repr(time.time())], env=child_env(),
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return {"seconds": float(out[0]), "peak_rss_mb": int(out[1]) / 1024, "rss_anon_mb": int(out[2]) / 1024}


def run(profile: str = "full") -> dict:
    settings = PROFILES[profile]
    result = {"profile": profile, "batch": BATCH, "throughput": {}, "startup": {}, "step_consumption": {}}
    with tempfile.TemporaryDirectory() as cache:
        for resolution in settings["resolutions"]:
            folder = image_folder(settings["images"], resolution)
            cases = [("in memory", 0), ("memory-mapped cache", 0)]
            cases += [(p, w) for p in ("streaming", "diffusers example") for w in settings["workers"]]
            if resolution != 32:  # diffusers' path at 32² only (as the issue asks), ours at every size
                cases = [c for c in cases if c[0] != "diffusers example"]
            rows = {f"{p} ({w} workers)": [] for p, w in cases}
            log(f"data: {len(cases)} paths x {settings['rounds']} rounds at {resolution}²")
            for _, order in rotations(cases, settings["rounds"]):
                for p, w in order:
                    rows[f"{p} ({w} workers)"].append(throughput(p, folder, resolution, w, settings["batches"], cache))
            result["throughput"][str(resolution)] = {name: summary(v) for name, v in rows.items()}
        if profile != "smoke":
            from .training import floor  # one fp32 training step of the UNet alone: what a step consumes

            for preset, resolution, batch in (("ddpm-cifar10-32", 32, 8), ("ddpm-celebahq-256", 256, 1)):
                log(f"data: one training step of {preset} (batch {batch})")
                step = {"model": preset, "resolution": resolution, "batch": batch, "T": 1000}
                seconds_per_image = floor(step, steps=1, channels=3, warmup=1)[0]
                result["step_consumption"][f"{preset} ({resolution}², batch {batch})"] = 1 / seconds_per_image
        for n in settings["sizes"]:
            folder = image_folder(n, 32)
            log(f"data: start-up at {n} images")
            own = os.path.join(cache, f"startup{n}")
            result["startup"][str(n)] = {
                "first run (builds the cache, mapped)": startup(folder, own, "mapped"),
                "cached, memory-mapped": startup(folder, own, "mapped"),
                "cached, in memory": startup(folder, own, "memory"),
            }
    return result
