"""Samples for the sample metrics, written in shards that a stopped run does not redo.

Sample i is drawn from its own generator seeded `seed + i` (the initial noise and every step's noise), so a
sample does not depend on the shard, batch or process that draws it. Shard j holds samples
[j·S, min((j+1)·S, N)) as `shard-{j:05d}.npz` (`images`: uint8 (n, C, H, W), `indices`), written to a temporary
name and renamed, so a shard file is either whole or absent; with `png=True` each sample is also
`png/{i:06d}.png`, for external evaluators. `samples.json` records the settings: a run with other settings in the
same directory is refused before it draws anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import write_atomically
from ..images import check_finite_samples, unit_to_pixels
from ..schedules import check_positive_int
from ..unet import weights_digest
from .processes import Processes

MANIFEST = "samples.json"


def shard_path(sample_dir: str | os.PathLike, shard: int) -> Path:
    return Path(sample_dir) / f"shard-{shard:05d}.npz"


def fingerprint(pipeline) -> str:
    """sha256 of the UNet's weights and the scheduler's config: shards of other weights are never reused."""
    config = {k: v for k, v in pipeline.scheduler.config.items() if not k.startswith("_")}  # no bookkeeping keys
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    return weights_digest(pipeline.unet, digest).hexdigest()[:16]


def _complete(path: Path) -> bool:
    try:
        with np.load(path) as f:
            return "images" in f.files and "indices" in f.files
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def _check_manifest(sample_dir: Path, settings: dict, processes: Processes) -> None:
    path = sample_dir / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        if found != settings:
            changed = {
                k: (found.get(k), settings.get(k))
                for k in settings.keys() | found.keys()
                if found.get(k) != settings.get(k)
            }
            raise ValueError(
                f"{sample_dir} holds samples drawn with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in sorted(changed.items()))}): "
                "use another --sample_dir or the same settings"
            )
    processes.barrier()  # every rank has read it before the main process writes it
    if processes.is_main and not path.is_file():
        write_atomically(path, lambda f: json.dump(settings, f, indent=2), unique=True)


def generate_shards(
    pipeline,
    sample_dir: str | os.PathLike,
    num_samples: int,
    *,
    num_inference_steps: int,
    seed: int = 0,
    shard_size: int = 64,
    png: bool = False,
    model: str = "",
    processes: Processes | None = None,
    progress: bool = False,
) -> dict:
    """Draw the missing shards (divided among processes); returns {"shards", "generated" (by all processes)}."""
    processes = processes or Processes()
    for flag, value in (
        ("num_samples", num_samples),
        ("shard_size", shard_size),
        ("num_inference_steps", num_inference_steps),
    ):
        check_positive_int(value, flag)
    sample_dir = Path(sample_dir)
    sample_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": model, "fingerprint": fingerprint(pipeline), "num_samples": num_samples,
                "num_inference_steps": num_inference_steps, "seed": seed, "shard_size": shard_size,
                "image_shape": list(pipeline._image_shape)}  # fmt: skip
    _check_manifest(sample_dir, settings, processes)
    shards = math.ceil(num_samples / shard_size)
    missing = [j for j in range(shards) if not _complete(shard_path(sample_dir, j))]
    missing = processes.gather([missing])[0]  # the main process's list, before anyone writes
    mine = processes.mine(missing)
    bar = tqdm(mine, desc="sampling", unit="shard", disable=not (progress and processes.is_main))
    for j in bar:
        indices = list(range(j * shard_size, min((j + 1) * shard_size, num_samples)))
        generators = [torch.Generator(device=pipeline.device).manual_seed(seed + i) for i in indices]
        x = pipeline(
            batch_size=len(indices), generator=generators, num_inference_steps=num_inference_steps, output_type="pt"
        ).images
        check_finite_samples(x, pipeline.scheduler, num_inference_steps)  # NaN would be saved as black images
        images = unit_to_pixels(x).cpu().numpy()  # as a saved PNG: (n, C, H, W)
        if png:
            (sample_dir / "png").mkdir(exist_ok=True)
            for i, image in zip(indices, images):
                Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(
                    sample_dir / "png" / f"{i:06d}.png"
                )
        path = shard_path(sample_dir, j)
        shard = {"images": images, "indices": np.asarray(indices)}
        write_atomically(path, lambda f, arrays=shard: np.savez(f, **arrays), "wb", unique=True)  # whole or absent
    processes.barrier()
    return {"shards": shards, "generated": len(missing)}


def load_shards(sample_dir: str | os.PathLike, shards: list[int]) -> torch.Tensor:
    """The images of the given shards, concatenated in shard order (uint8 (n, C, H, W))."""
    arrays = []
    for j in shards:
        with np.load(shard_path(sample_dir, j)) as f:
            arrays.append(f["images"])
    return torch.from_numpy(np.concatenate(arrays))
