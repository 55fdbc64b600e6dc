"""Image data the tests write: an image folder and a parquet file of a datasets table."""

from __future__ import annotations

import datasets
from PIL import Image


def write_folder(folder, images: dict[str, Image.Image]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        img.save(folder / name)
    return str(folder)


def write_parquet(path, columns: dict, features: datasets.Features):
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
