"""Images as the model sees them and as people do: the one home of the pixel conversions, and sample grids.

    pixels_to_model(uint8)     k in 0..255 -> k / 127.5 - 1 in [-1, 1]: what the UNet is trained and evaluated on
    model_to_unit(x)           [-1, 1] -> [0, 1], clamped: the pipeline's "np" and "pt" outputs
    model_to_pixels(x)         [-1, 1] -> uint8 0..255, rounded: PNGs, previews of x_t and x̂_0 (the Space)
    unit_to_pixels(x)          [0, 1] (the pipeline's "pt" / "np" output) -> uint8 0..255: saved samples (evaluation)
    check_finite_samples       samples a sampler broke down on (NaN) refused before they are saved as black images
    images_to_model_range      uint8 arrays or PIL images -> the model range, checked against the UNet's shape
    make_grid                  samples tiled into one image (training, examples, model cards)

The pipeline, training batches, evaluation and the Space convert with these functions, so that bits/dim, samples and
previews agree on one pixel grid: pixel k sits at the centre of eq. 13's bin [k - 0.5, k + 0.5] / 127.5 - 1.
This module is bundled into a Hub repo's remote code (hf_ddpm/remote_code.py), so it imports no hf_ddpm module.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch


def pixels_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 k in 0..255 → k / 127.5 - 1 in [-1, 1] (DDPM section 3.3), the scale of eq. 13's bins."""
    return images.to(torch.float32) / 127.5 - 1.0


def model_to_unit(x: torch.Tensor) -> torch.Tensor:
    """x in the model range [-1, 1] → [0, 1], clamped (a sample's tail may leave the range)."""
    return (x / 2 + 0.5).clamp(0, 1)


def model_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """x in the model range [-1, 1] → uint8 0..255, each value rounded to its nearest pixel (the inverse of
    `pixels_to_model` on the pixel grid)."""
    return unit_to_pixels(model_to_unit(x.float()))


def unit_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """x in [0, 1] → uint8 0..255, rounded (half to even) and clamped."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def check_finite_samples(samples, scheduler, num_inference_steps: int) -> None:
    """ValueError unless every sample (a tensor or array) is finite: a sampler that breaks down returns NaN, which a
    saved image shows as black and a metric measures, silently. diffusers' multistep solvers (DPM-Solver, UniPC,
    DEIS) do at num_inference_steps = T; our ancestral step, DDIM and Euler do not."""
    bad = ~torch.isfinite(torch.as_tensor(samples)).flatten(1).all(1)
    if bad.any():
        num_train = scheduler.config.num_train_timesteps
        raise ValueError(
            f"the {type(scheduler).__name__} sampler returned non-finite values (NaN or inf) for {int(bad.sum())} of "
            f"{len(bad)} samples at num_inference_steps={num_inference_steps} (T = {num_train}): sample with fewer "
            "steps (diffusers' multistep solvers break down at T steps) or with another scheduler"
        )


def images_to_model_range(images, expected_shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 images (N, C, H, W) or PIL images → float32 tensor in [-1, 1] (`pixels_to_model`), shape checked.

    PIL images are converted to the expected channel count (L, RGB or RGBA); arrays must already have it. Errors
    name the dtype or shape given and the one expected, before any conversion.
    """
    channels, height, width = expected_shape
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images or not all(isinstance(im, PIL.Image.Image) for im in images):
            raise ValueError("images given as a list must be a non-empty list of PIL images")
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
        if mode is None:
            raise ValueError(f"PIL images cannot be converted to {channels} channels; pass a uint8 array instead")
        arrays = [np.asarray(im.convert(mode), dtype=np.uint8).reshape(im.height, im.width, channels) for im in images]
        sizes = {a.shape[:2] for a in arrays}
        if sizes != {(height, width)}:
            raise ValueError(f"images must be {height}x{width} (the UNet's sample_size), got sizes {sorted(sizes)}")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 pixel values 0..255, got dtype {images.dtype}; "
            "scale float images in [0, 1] by 255 and round them first"
        )
    if images.dim() == 4 and images.shape[0] == 0:
        raise ValueError(f"images holds no image: shape {tuple(images.shape)}; pass at least one (N >= 1)")
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, height, width):
        raise ValueError(
            f"images must have shape (N, {channels}, {height}, {width}) to match the UNet, got {tuple(images.shape)}"
        )
    return pixels_to_model(images)


def make_grid(images, num_rows: int | None = None, padding: int = 2, pad_value: int = 255) -> PIL.Image.Image:
    """Tile images into one PIL image, row by row.

    images: a list of PIL images (same size and mode), a float array/tensor (N, H, W, C) in [0, 1] as the pipeline's
    `output_type="np"` returns, or a uint8 tensor (N, C, H, W). num_rows defaults to a near-square layout.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("make_grid needs at least one image")
        arrays = np.stack([np.asarray(im) for im in images])
        if arrays.ndim == 3:  # (N, H, W) grayscale
            arrays = arrays[..., None]
    else:
        arrays = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arrays.dtype == np.uint8 and arrays.ndim == 4 and arrays.shape[1] in (1, 3, 4):
            arrays = arrays.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        elif arrays.dtype != np.uint8:
            arrays = unit_to_pixels(torch.from_numpy(np.ascontiguousarray(arrays))).numpy()
    if arrays.ndim != 4 or arrays.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be (N, H, W, C) with C in 1, 3, 4 (or PIL images); got shape {arrays.shape}")
    count, height, width, channels = arrays.shape
    num_rows = num_rows or max(1, int(math.floor(math.sqrt(count))))
    num_cols = math.ceil(count / num_rows)
    grid = np.full(
        (num_rows * (height + padding) + padding, num_cols * (width + padding) + padding, channels),
        pad_value,
        dtype=np.uint8,
    )
    for i, image in enumerate(arrays):
        row, col = divmod(i, num_cols)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top : top + height, left : left + width] = image
    return PIL.Image.fromarray(grid[..., 0] if channels == 1 else grid)  # mode L, RGB or RGBA from the shape
