"""Training data: the bundled digits (digits.py), image folders, data files, local and Hub datasets; each image
decoded (decode.py) once into an on-disk cache (cache.py), held in memory when small and memory-mapped when not
(load.py), or streamed (streaming.py); a training run's batches, sharded over its processes (batches.py); the
one-source rule (sources.py) and the held-out split's size (split.py).

    from hf_ddpm.data import load_data
    data = load_data(train_data_dir="my_images", resolution=64)   # data.train: uint8 (N, C, 64, 64)

The names below load on first use (PEP 562, as the package's own), so that a command line reading only the data
flags (sources.py, split.py) imports neither torch nor datasets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

_EXPORTS = {
    "IMAGE_COLUMN_CANDIDATES": ".decode",
    "CacheSpaceError": ".cache",
    "DataIdentity": ".load",
    "ImageData": ".load",
    "MappedImages": ".cache",
    "StreamSourceError": ".streaming",
    "data_identity": ".load",
    "default_memory_budget": ".load",
    "detect_image_column": ".decode",
    "digits_dataset": ".digits",
    "load_data": ".load",
    "load_training_data": ".load",
    "random_hflip": ".batches",
}
__all__ = [
    "IMAGE_COLUMN_CANDIDATES",
    "CacheSpaceError",
    "DataIdentity",
    "ImageData",
    "MappedImages",
    "StreamSourceError",
    "data_identity",
    "default_memory_budget",
    "detect_image_column",
    "digits_dataset",
    "load_data",
    "load_training_data",
    "random_hflip",
]  # = _EXPORTS

if TYPE_CHECKING:
    from .batches import random_hflip
    from .cache import CacheSpaceError, MappedImages
    from .decode import IMAGE_COLUMN_CANDIDATES, detect_image_column
    from .digits import digits_dataset
    from .load import DataIdentity, ImageData, data_identity, default_memory_budget, load_data, load_training_data
    from .streaming import StreamSourceError


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())
