"""Decode once, on disk: a split's images preprocessed into a `datasets` Arrow cache of fixed-shape uint8 arrays.

`preprocess` runs `Dataset.map(..., num_proc=...)` over the images (decode, mode, resize, crop: images.decode_image)
into Arrow files of an `Array3D((C, R, R), "uint8")` column under `<datasets cache>/hf_ddpm_preprocessed/<key>/`.
The key hashes the split's identity (sources.py) and every preprocessing option, so changing one makes a new cache.
`datasets` writes each file to a temporary name and renames it when complete; we then write `complete.json`, the
manifest naming those files, atomically (temporary file + rename). A run killed while preprocessing leaves no manifest,
so the next run preprocesses again (`map` reuses whichever shard files were complete, and redoes the rest): nothing
half-written is ever read as complete. Later runs, resumes and the other processes open the manifest's files
memory-mapped (`Dataset.from_file`) without decoding anything.

`MappedImages` reads a batch of rows straight out of the mapped Arrow buffers (zero-copy numpy views per record
batch): resident memory holds the batch, not the dataset; the mapped pages are page cache the kernel can drop.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import logging
import os
import time

import numpy as np
import torch

from ..atomic import write_atomically
from .images import decode_image

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the preprocessing itself changes: old caches are then never reused
MANIFEST = "complete.json"


def cache_root(cache_dir: str | None) -> str:
    """The folder of all preprocessed caches: under `cache_dir` (--cache_dir), else under the datasets cache."""
    import datasets

    return os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, "hf_ddpm_preprocessed")


def cache_key(identity: str, rows: np.ndarray | None, **options) -> str:
    """A hash of the split's identity, of the rows kept (None: all of them) and of every preprocessing option."""
    import hashlib

    digest = hashlib.sha256(repr((CACHE_VERSION, identity, sorted(options.items()))).encode())
    if rows is not None:
        digest.update(np.ascontiguousarray(rows, np.int64).tobytes())
    return digest.hexdigest()[:24]


def _preprocess_batch(batch, indices, *, column, rows, resolution, channels, crop_seed, base_dir):
    """`map` function: a batch of stored images -> pixels (B, C, R, R) uint8 and, per image, whether it is in
    colour, was upscaled, and why it failed to decode ('' when it did not)."""
    n = len(batch[column])
    pixels = np.zeros((n, channels or 3, resolution, resolution), np.uint8)
    color, upscaled, error = [False] * n, [False] * n, [""] * n
    for i, (value, index) in enumerate(zip(batch[column], indices)):
        row = int(rows[index]) if rows is not None else index  # the row of the source split: its crop's seed
        if value["bytes"] is None and value["path"] and not os.path.isabs(value["path"]):
            value = {"bytes": None, "path": os.path.join(base_dir, value["path"])}
        crop_rng = None if crop_seed is None else np.random.default_rng([crop_seed, 1, row])
        try:
            arr, upscaled[i] = decode_image(value, resolution, channels, crop_rng)
        except Exception as err:  # Pillow's plugins raise OSError, ValueError, SyntaxError, struct.error, ...
            error[i] = f"{value['path'] or f'row {row}'}: {err}"
            continue
        pixels[i] = arr  # (1, R, R) broadcasts to (3, R, R), as PIL's L -> RGB does
        color[i] = arr.shape[0] > 1
    return {"pixels": pixels, "color": color, "upscaled": upscaled, "error": error}


def open_cache(folder: str):
    """The cached split of a complete cache folder, memory-mapped; None if the folder holds no complete cache."""
    import datasets

    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return None
    parts = [datasets.Dataset.from_file(os.path.join(folder, name)) for name in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def preprocess(ds, column, identity, rows, *, resolution, channels, crop_seed, base_dir, cache_dir, num_proc):
    """The preprocessed rows `rows` (None: all) of `ds`, from the cache or built now; (dataset, folder, built)."""
    import datasets

    options = {"column": column, "resolution": resolution, "channels": channels, "crop_seed": crop_seed,
               "base_dir": base_dir}  # fmt: skip
    folder = os.path.join(cache_root(cache_dir), cache_key(identity, rows, **options))
    cached = open_cache(folder)
    if cached is not None:
        return cached, folder, False
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, "tmp*")) + glob.glob(os.path.join(folder, f"{MANIFEST}.tmp*")):
        # left by a run killed while writing (datasets' temporary files, our manifest's staging file)
        os.remove(stale)
    source = (ds.to_dataset() if hasattr(ds, "to_dataset") else ds).select_columns([column])
    if rows is not None:
        source = source.select(rows)
    feature = source.features[column]
    paths = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not isinstance(feature, datasets.Image) and not paths:
        raise ValueError(f"column {column!r} holds {feature}, not images (datasets.Image or file paths)")
    source = source.cast_column(column, datasets.Image(decode=False))  # decode ourselves, one bad file at a time
    num_proc = num_proc or min(8, os.cpu_count() or 1)  # default: the CPUs, up to 8
    num_proc = num_proc if num_proc > 1 and len(source) >= 4 * 1024 else None  # a pool costs more than small data
    features = datasets.Features({
        "pixels": datasets.Array3D((channels or 3, resolution, resolution), "uint8"),
        "color": datasets.Value("bool"),
        "upscaled": datasets.Value("bool"),
        "error": datasets.Value("string"),
    })  # fmt: skip
    logger.info(
        "preprocessing %d images (decode, %s, resize and crop to %dx%d) into %s with %d process(es); later runs "
        "reuse it without decoding",
        len(source), {None: "mode kept", 1: "L", 3: "RGB", 4: "RGBA"}[channels], resolution, resolution, folder,
        num_proc or 1,
    )  # fmt: skip
    started = time.perf_counter()
    fn = functools.partial(_preprocess_batch, column=column, rows=rows, resolution=resolution, channels=channels,
                           crop_seed=crop_seed, base_dir=base_dir)  # fmt: skip
    mapped = source.map(
        fn, batched=True, with_indices=True, batch_size=256, remove_columns=[column], features=features,
        num_proc=num_proc, cache_file_name=os.path.join(folder, "pixels.arrow"), new_fingerprint=os.path.basename(folder),
        desc="preprocessing images",
    )  # fmt: skip
    names = [os.path.relpath(f["filename"], folder) for f in mapped.cache_files]
    manifest = {"files": names, "rows": len(mapped), "options": options, "version": CACHE_VERSION}
    write_atomically(os.path.join(folder, MANIFEST), lambda f: json.dump(manifest, f), unique=True)  # complete now
    logger.info("preprocessed %d images in %.1f s", len(mapped), time.perf_counter() - started)
    return open_cache(folder), folder, True


class MappedImages:
    """uint8 images (N, C, R, R) read on demand from a memory-mapped cache: `images[idx]` for a tensor/array of
    positions or a slice gives a uint8 tensor; positions 0..N-1 are the cache's rows `rows`."""

    def __init__(self, cached, rows: np.ndarray, channels: int):
        import pyarrow as pa

        self._views, ends = [], []
        for chunk in cached.data.table.column("pixels").chunks:  # zero-copy: flatten the nested lists of uint8
            storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            flat = storage.flatten().flatten().flatten().to_numpy(zero_copy_only=True)
            self._views.append(flat.reshape(len(chunk), *cached.features["pixels"].shape))
            ends.append(len(chunk))
        self._starts = np.concatenate([[0], np.cumsum(ends)])
        self.rows = np.asarray(rows, np.int64)
        self.channels = channels  # 1 for an all-gray source cached with 3 channels: keep the first
        r = cached.features["pixels"].shape[-1]
        self.shape = torch.Size((len(self.rows), channels, r, r))
        self.dtype = torch.uint8
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            positions = np.arange(len(self.rows))[index]
        elif isinstance(index, torch.Tensor):
            positions = index.cpu().numpy()
        else:
            positions = np.asarray(index)
        rows = self.rows[positions]
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[chunk]
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for i, (c, j) in enumerate(zip(chunk.tolist(), local.tolist())):
            out[i] = self._views[c][j, : self.channels]
        return torch.from_numpy(out).to(self.device)

    def to(self, device) -> MappedImages:
        """These images, read on the CPU and handed out on `device` (the data itself stays on disk)."""
        moved = copy.copy(self)
        moved.device = torch.device(device)
        return moved
