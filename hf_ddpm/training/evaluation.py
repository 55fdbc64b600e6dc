"""What a run measures and shows while training: sample grids and Monte Carlo bits/dim on the held-out split,
both with the EMA weights, plus a parameter fingerprint to compare replicas."""

from __future__ import annotations

import contextlib
import hashlib

import torch

from ..evaluation.bits_per_dim import bits_per_dim
from ..images import make_grid
from ..pipeline import HFDDPMPipeline


@contextlib.contextmanager
def ema_weights(ema, module: torch.nn.Module):
    """Within the block `module` holds the EMA weights; its own weights are restored afterwards (no-op without EMA)."""
    if ema is None:
        yield module
        return
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield module
    finally:
        ema.restore(module.parameters())


def sample_grid(pipeline: HFDDPMPipeline, num_images: int, num_inference_steps: int, seed: int):
    """`num_images` samples (always from the same seed, so grids of successive steps compare) as (grid, array)."""
    num_steps = min(num_inference_steps, pipeline.scheduler.config.num_train_timesteps)
    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    images = pipeline(batch_size=num_images, generator=generator, num_inference_steps=num_steps, output_type="np")
    return make_grid(images.images), images.images  # (N, H, W, C) in [0, 1]


def held_out_bits_per_dim(
    pipeline: HFDDPMPipeline,
    images: torch.Tensor,
    num_images: int,
    num_timesteps: int,
    seed: int,
    batch_size: int = 256,
) -> dict:
    """Monte Carlo estimate of the bound (DDPM eq. 5) on the first `num_images` held-out images, in bits/dim,
    by hf_ddpm.evaluation (this process alone: it runs on the main process): its Metric fields, and the
    `bits_per_dim` / `bits_per_dim_stderr` names that training_summary.json and TensorBoard use."""
    metric = bits_per_dim(pipeline, images[:num_images], num_timesteps=num_timesteps, block_size=batch_size, seed=seed)
    stderr = metric.stderr if metric.stderr is not None else float("nan")
    return {
        **metric.to_dict(),
        "bits_per_dim": metric.value,
        "bits_per_dim_stderr": stderr,
    }


def parameter_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's state (names, dtypes, bytes): equal on replicas that hold identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        flat = tensor.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)  # any memory format
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
