"""Image data the tests write: an image folder and a parquet file of a datasets table."""

from __future__ import annotations

import datasets
import torch
from PIL import Image


def write_folder(folder, images: dict[str, Image.Image]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        img.save(folder / name)
    return str(folder)


def write_parquet(path, columns: dict, features: datasets.Features):
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def write_images(folder, n: int, size=(12, 10)) -> str:
    """n distinct solid-colour RGB images: image i has colour (i % 256, i // 256, 7)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i % 256, i // 256, 7)).save(folder / f"{i:05d}.png", compress_level=1)
    return str(folder)


def ids(images: torch.Tensor) -> list[int]:
    """The index i of each solid-colour image written by write_images."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()
