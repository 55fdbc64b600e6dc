"""Bits/dim of a pipeline over a split of images: the variational bound (DDPM eq. 5), exact or Monte Carlo; and the
seeded, resumable blocks that every per-image likelihood over a split runs in (evaluation/likelihood.py).

The images are cut into blocks of `block_size`; block b is evaluated in one call with the generator seeded
`seed + b`, and blocks are divided among processes. The per-image values, gathered in block order, are therefore the
same for any number of processes (given the same block size). With a `block_dir`, each finished block is written
there (atomically, whole or absent) and a run started again computes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import write_atomically
from ..schedules import check_positive_int
from .likelihood_options import METHOD_BOUNDS
from .processes import Processes
from .sample_shards import fingerprint
from .schema import Metric

MANIFEST = "blocks.json"


def _block_path(block_dir: Path, block: int) -> Path:
    return block_dir / f"block-{block:05d}.npz"


def _read_block(path: Path) -> dict | None:
    try:
        with np.load(path) as f:
            return {k: torch.from_numpy(f[k]) for k in f.files}
    except (OSError, ValueError, EOFError, KeyError):
        return None  # absent or unreadable (a run killed mid-write leaves only a staging file, but be safe)


def _check_manifest(block_dir: Path, settings: dict, processes: Processes) -> None:
    path = block_dir / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        if found != settings:
            changed = sorted(k for k in found.keys() | settings.keys() if found.get(k) != settings.get(k))
            raise ValueError(
                f"{block_dir} holds blocks computed with other settings (differing: {changed}): use another "
                "directory or the same settings"
            )
    processes.barrier()  # every rank has read it before the main process writes it
    if processes.is_main and not path.is_file():
        write_atomically(path, lambda f: json.dump(settings, f, indent=2, default=str), unique=True)


def evaluate_in_blocks(
    pipeline,
    images: torch.Tensor,
    compute: Callable[[torch.Tensor, torch.Generator, int], dict],
    *,
    block_size: int = 64,
    seed: int = 0,
    processes: Processes | None = None,
    block_dir: str | os.PathLike | None = None,
    settings: dict | None = None,
    desc: str = "bits/dim",
    progress: bool = False,
) -> dict:
    """`compute(block, generator, first_index)` -> {name: per-image tensor} on every block (this process's share),
    gathered in block order and concatenated: {name: tensor over all images}. The progress bar (main process) counts
    images, with an ETA. `block_dir` + `settings`: finished blocks kept and reused (refused if the settings differ)."""
    processes = processes or Processes()
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    check_positive_int(block_size, "block_size")
    blocks = list(range(math.ceil(len(images) / block_size)))
    missing = blocks
    if block_dir is not None:
        block_dir = Path(block_dir)
        block_dir.mkdir(parents=True, exist_ok=True)
        # the model and the images too: blocks of other weights or of other images (another split, files changed
        # since) are never taken for this run's
        key = {**(settings or {}), "num_images": len(images), "block_size": block_size, "seed": seed,
               "image_shape": list(images.shape[1:]), "model": fingerprint(pipeline),
               "images": images_digest(images)}  # fmt: skip
        _check_manifest(block_dir, json.loads(json.dumps(key, default=str)), processes)
        missing = [b for b in blocks if _read_block(_block_path(block_dir, b)) is None]
        missing = processes.gather([missing])[0]  # the main process's list, before anyone writes
    mine = processes.mine(missing)
    results = []
    total = sum(len(images[b * block_size : (b + 1) * block_size]) for b in mine)
    with tqdm(total=total, desc=desc, unit="image", disable=not (progress and processes.is_main)) as bar:
        for b in mine:
            first = b * block_size
            block = images[first : first + block_size]
            generator = torch.Generator(device=pipeline.device).manual_seed(seed + b)
            arrays = {k: v.detach().cpu() for k, v in compute(block, generator, first).items()}
            if block_dir is not None:
                numpy_arrays = {k: v.numpy() for k, v in arrays.items()}
                write_atomically(
                    _block_path(block_dir, b), lambda f, a=numpy_arrays: np.savez(f, **a), "wb", unique=True
                )
            results.append((b, arrays))
            bar.update(len(block))
    earlier = [(b, _read_block(_block_path(block_dir, b))) for b in blocks if b not in missing]  # from a past run
    gathered = sorted(processes.gather(results) + earlier, key=lambda r: r[0])
    return {k: torch.cat([r[1][k] for r in gathered]) for k in gathered[0][1]}


def images_digest(images: torch.Tensor) -> str:
    """sha256 of the images' pixels (uint8 (N, C, H, W), in memory or memory-mapped: read in chunks): which images a
    result is of, whatever split names them."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    for first in range(0, len(images), 4096):
        digest.update(images[first : first + 4096].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def mean_and_stderr(values: torch.Tensor, own_stderr: torch.Tensor) -> tuple[float, float | None]:
    """The mean of per-image values and its standard error std / sqrt(N); for one image its own estimator's
    standard error, or None where that is unknown (NaN), never 0."""
    values = values.double()
    if len(values) > 1:
        return values.mean().item(), (values.std() / math.sqrt(len(values))).item()
    stderr = own_stderr.double()[0].item()
    return values.mean().item(), stderr if math.isfinite(stderr) else None


def bits_per_dim(
    pipeline,
    images: torch.Tensor,
    *,
    num_timesteps: int | None = None,
    block_size: int = 64,
    seed: int = 0,
    split: str = "held-out split",
    processes: Processes | None = None,
    progress: bool = False,
    block_dir: str | os.PathLike | None = None,
) -> Metric:
    """Mean bits/dim over `images` (uint8 (N, C, H, W)) and its standard error over images.

    num_timesteps=None: the exact bound (all T terms); K: the unbiased Monte Carlo estimate from K timesteps per
    image (hf_ddpm.bound). The standard error is std / sqrt(N) of the per-image values, which for Monte Carlo
    holds both the spread over images and over the sampled timesteps (the per-image standard errors are not used).
    For one image it is that image's Monte Carlo standard error, or None where that is unknown: the exact bound
    and K = 1 (NaN in `BoundOutput.standard_error`: the exact bound's T terms are one draw of x_t each), never 0.
    `block_dir`: keep finished blocks there and resume from them.
    """
    if len(images) == 0:
        raise ValueError(f"no images to evaluate in the {split}")
    started = time.perf_counter()

    def compute(block, generator, first):
        out = pipeline.bits_per_dim(block, num_timesteps=num_timesteps, batch_size=block_size, generator=generator)
        return {"bits_per_dim": out.bits_per_dim.double(), "standard_error": out.standard_error.double()}

    values = evaluate_in_blocks(pipeline, images, compute, block_size=block_size, seed=seed, processes=processes,
                                block_dir=block_dir, settings={"num_timesteps": num_timesteps}, progress=progress)  # fmt: skip
    bpd = values["bits_per_dim"]
    value, stderr = mean_and_stderr(bpd, values["standard_error"])
    how = "exact bound" if num_timesteps is None else f"Monte Carlo, K = {num_timesteps}"
    return Metric(
        "bits_per_dim",
        value,
        stderr,
        len(bpd),
        f"{how}; {len(bpd)} image{'s' * (len(bpd) != 1)} of the {split}",
        {"method": "bound", "bounds": METHOD_BOUNDS["bound"], "num_images": len(bpd), "num_timesteps": num_timesteps,
         "split": split, "block_size": block_size, "seed": seed,
         "seconds": time.perf_counter() - started},  # all processes, the gathering included
    )  # fmt: skip
