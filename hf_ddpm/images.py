"""Image helpers shared by training, examples and model cards: tiling samples into one grid image."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch


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
            arrays = np.clip(np.rint(arrays * 255.0), 0, 255).astype(np.uint8)
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
