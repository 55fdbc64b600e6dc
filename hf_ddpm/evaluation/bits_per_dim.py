"""Bits/dim of a pipeline over a split of images: the variational bound (DDPM eq. 5), exact or Monte Carlo.

The images are cut into blocks of `block_size`; block b is evaluated in one `HFDDPMPipeline.bits_per_dim` call
with the generator seeded `seed + b`, and blocks are divided among processes. The per-image values, gathered in
block order, are therefore the same for any number of processes (given the same block size).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..schedules import check_positive_int
from .processes import Processes
from .schema import Metric


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
) -> Metric:
    """Mean bits/dim over `images` (uint8 (N, C, H, W)) and its standard error over images.

    num_timesteps=None: the exact bound (all T terms); K: the unbiased Monte Carlo estimate from K timesteps per
    image (hf_ddpm.bound). The standard error is std / sqrt(N) of the per-image values, which for Monte Carlo
    holds both the spread over images and over the sampled timesteps (the per-image standard errors are not used).
    For one image it is that image's Monte Carlo standard error, or None where that is unknown: the exact bound
    and K = 1 (NaN in `BoundOutput.standard_error`: the exact bound's T terms are one draw of x_t each), never 0.
    """
    processes = processes or Processes()
    if len(images) == 0:
        raise ValueError(f"no images to evaluate in the {split}")
    check_positive_int(block_size, "block_size")
    started = time.perf_counter()
    blocks = list(range(math.ceil(len(images) / block_size)))
    mine = processes.mine(blocks)
    results = []
    bar = tqdm(mine, desc="bits/dim", unit="block", disable=not (progress and processes.is_main))
    for b in bar:
        block = images[b * block_size : (b + 1) * block_size]
        generator = torch.Generator(device=pipeline.device).manual_seed(seed + b)
        out = pipeline.bits_per_dim(block, num_timesteps=num_timesteps, batch_size=block_size, generator=generator)
        results.append((b, out.bits_per_dim.double().cpu(), out.standard_error.double().cpu()))
    gathered = sorted(processes.gather(results), key=lambda r: r[0])
    bpd = torch.cat([r[1] for r in gathered])
    if len(bpd) > 1:
        stderr = (bpd.std() / math.sqrt(len(bpd))).item()
    else:  # one image: its Monte Carlo standard error; the exact bound's is unknown (NaN, see BoundOutput)
        stderr = gathered[0][2].item()
        stderr = stderr if math.isfinite(stderr) else None
    how = "exact bound" if num_timesteps is None else f"Monte Carlo, K = {num_timesteps}"
    return Metric(
        "bits_per_dim",
        bpd.mean().item(),
        stderr,
        len(bpd),
        f"{how}; {len(bpd)} images of the {split}",
        {"num_images": len(bpd), "num_timesteps": num_timesteps, "split": split, "block_size": block_size,
         "seed": seed, "seconds": time.perf_counter() - started},  # all processes, the gathering included
    )  # fmt: skip
