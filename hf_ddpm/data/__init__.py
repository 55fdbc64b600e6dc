"""Training data: the bundled digits, image folders, data files, local and Hub datasets; decoded once into an on-disk
cache (cache.py), held in memory when small and memory-mapped when not (load.py), or streamed (streaming.py); a
training run's batches, sharded over its processes (batches.py).

    from hf_ddpm.data import load_data
    data = load_data(train_data_dir="my_images", resolution=64)   # data.train: uint8 (N, C, 64, 64)
"""

from .cache import CacheSpaceError, MappedImages
from .images import IMAGE_COLUMN_CANDIDATES, detect_image_column, digits_dataset, random_hflip
from .load import DataIdentity, ImageData, data_identity, default_memory_budget, load_data, load_training_data
from .streaming import StreamSourceError

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
]
