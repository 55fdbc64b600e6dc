"""Decode once, on disk: a split's images preprocessed into a `datasets` Arrow cache of fixed-shape uint8 arrays.

`preprocess` runs `Dataset.map(..., num_proc=...)` over the images (decode, mode, resize, crop: images.decode_image)
into Arrow files of an `Array3D((C, R, R), "uint8")` column under `<datasets cache>/hf_ddpm_preprocessed/<key>/`.
The key hashes the split's identity (sources.py: for files, their resolved absolute paths, sizes and modification
times, so neither the working directory nor the spelling `f200` / `./f200/` matters, and a file whose content changes
with its size and mtime kept is not seen) and every preprocessing option, so changing one makes a new cache.
`datasets` writes each file to a temporary name and renames it when complete; we then write `complete.json`, the
manifest naming those files with their sizes and a checksum of their ends, atomically (temporary file + rename). A run
killed while preprocessing leaves no manifest, so the next run preprocesses again (`map` reuses whichever shard files
were complete, and redoes the rest; one damaged since is removed first): nothing half-written is ever read as
complete. A file of the source that cannot be read at all (missing, no permission, an I/O error: a folder moved away
mid-build) stops the build with `SourceUnreadable` naming it, instead of being skipped as a corrupt image would be
(which would leave a complete cache of part of the data for every later run). The pool's workers die with the
builder (workers.py), so a builder killed alone leaves no worker holding the key's lock. Later runs, resumes and the other
processes open the manifest's files memory-mapped (`Dataset.from_file`) without decoding anything.

Self-healing and shared: a cache file that is missing, truncated, changed or does not read as Arrow is found when the
cache is opened (the manifest's sizes and checksums, then Arrow itself) and the cache is rebuilt, with a warning that
names the folder. Builders of one key take a lock file beside its folder (`<key>.lock`, flock): a second builder
waits for the first and then uses its cache; temporary files in the folder are removed only by the lock's holder, so
only those of builders that died; and the folders of other keys whose builds died unfinished and that no builder
holds (a build killed, then its data or options changed) are removed before a build. Before building, the free
space under the cache root is compared with the bytes the cache needs (`CacheSpaceError` names --cache_dir, both numbers and the fix), and a disk that fills while building
gives the same error.

`MappedImages` reads a batch of rows straight out of the mapped Arrow buffers (zero-copy numpy views per record
batch): resident memory holds the batch, not the dataset; the mapped pages are page cache the kernel can drop.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np
import torch

from ..atomic import write_atomically
from ..file_lock import FileLock, LockHeld
from .decode import decode_image, read_bytes
from .workers import forks_die_with_this_process

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the preprocessing or the key changes: old caches are then never reused
MANIFEST = "complete.json"
ENDS = 1 << 20  # the checksum of a cache file covers its size and its first and last MiB: cheap at any size


class CacheDamaged(Exception):
    """A complete cache (it has a manifest) whose files do not match it: rebuilt, never read."""


class SourceUnreadable(RuntimeError):
    """An image file of the source could not be read while the cache was built (missing, no permission, an I/O
    error): the source changed or vanished, which is not a corrupt image. The build stops; nothing is marked complete."""


class CacheSpaceError(OSError):
    """The disk of the cache has too little room for it (found before building, or when it filled while building)."""


def _ends_digest(path: str, size: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(ENDS))
        if size > ENDS:
            f.seek(max(ENDS, size - ENDS))
            digest.update(f.read(ENDS))
    return digest.hexdigest()


def _record(path: str) -> dict:
    size = os.path.getsize(path)
    return {"size": size, "ends_sha256": _ends_digest(path, size)}


def _bytes_needed(rows: int, channels: int, resolution: int) -> int:
    """The size of the Arrow cache of `rows` images: the pixels, the nested lists' int32 offsets, the flags, and
    the schema and record-batch headers (a few KB per file and per batch of 256 rows)."""
    per_row = channels * resolution * resolution + 4 * (channels * resolution + channels + 2) + 8
    return rows * per_row + 1024 * (rows // 256 + 64)


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
        if value["bytes"] is None and value["path"]:
            path = (
                value["path"] if not base_dir or os.path.isabs(value["path"]) else os.path.join(base_dir, value["path"])
            )
            try:
                value = {"bytes": read_bytes(path), "path": path}
            except OSError as err:
                raise SourceUnreadable(
                    f"cannot read image {path} ({type(err).__name__}: {err.strerror or err}) while building the "
                    "preprocessed cache: the source changed or vanished (a moved folder, an unmounted share, changed "
                    "permissions), which is not a corrupt image. Restore the file, or remove it from the source, and "
                    "run again"
                ) from None
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
    """The cached split of a complete cache folder, memory-mapped; None if the folder holds no complete cache
    (no manifest); CacheDamaged saying which file and how when its files do not match the manifest."""
    import datasets

    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        files, records, rows = manifest["files"], manifest["records"], manifest["rows"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheDamaged(f"its manifest {MANIFEST} does not read ({type(err).__name__}: {err})") from err
    for name in files:
        path, record = os.path.join(folder, name), records.get(name, {})
        try:
            size = os.path.getsize(path)
            if size != record.get("size"):
                raise CacheDamaged(f"{name} holds {size} bytes, {record.get('size')} were written (truncated?)")
            if _ends_digest(path, size) != record.get("ends_sha256"):
                raise CacheDamaged(f"{name} has changed since it was written (its checksum differs)")
        except OSError as err:
            raise CacheDamaged(f"{name} cannot be read ({type(err).__name__}: {err.strerror or err})") from err
    try:
        parts = [datasets.Dataset.from_file(os.path.join(folder, name)) for name in files]
    except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ...
        raise CacheDamaged(f"its files do not read as Arrow ({type(err).__name__}: {err})") from err
    cached = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(cached) != rows:
        raise CacheDamaged(f"its files hold {len(cached)} rows, {rows} were written")
    return cached


def _space_error(cache_dir, root: str, needed: int, free: int, what: str) -> CacheSpaceError:
    where = f"--cache_dir {cache_dir}" if cache_dir else f"--cache_dir (not given: the datasets cache, {root})"
    return CacheSpaceError(
        errno.ENOSPC,
        f"{where}: {what} needs about {needed} bytes ({needed / 1e9:.2f} GB) and the disk holding {root} has "
        f"{free} bytes ({free / 1e9:.2f} GB) free; free space there, or pass --cache_dir on a disk with room",
    )


def preprocess(ds, column, identity, rows, *, resolution, channels, crop_seed, base_dir, cache_dir, num_proc,
               before_build=None):  # fmt: skip
    """The preprocessed rows `rows` (None: all) of `ds`, from the cache or built now; (dataset, folder, built).
    `before_build(folder)`, if given, may refuse a build by raising, before anything is written."""
    import datasets

    options = {"column": column, "resolution": resolution, "channels": channels, "crop_seed": crop_seed,
               "base_dir": base_dir}  # fmt: skip
    root = cache_root(cache_dir)
    folder = os.path.join(root, cache_key(identity, rows, **options))
    with contextlib.suppress(CacheDamaged):  # a damaged one is rebuilt below, under the lock
        cached = open_cache(folder)
        if cached is not None:
            return cached, folder, False
    if before_build is not None:
        before_build(folder)
    os.makedirs(root, exist_ok=True)

    # `<key>.lock` beside the folder: a second builder of the key waits for the first, then finds the cache complete
    def waiting(holder: str) -> None:
        logger.info("waiting for %s, which is building the preprocessed cache %s", holder, folder)

    with FileLock.take(folder + ".lock", wait=True, waiting=waiting):
        try:
            cached = open_cache(folder)
        except CacheDamaged as err:
            logger.warning("the preprocessed cache %s is damaged (%s): rebuilding it", folder, err)
            os.remove(os.path.join(folder, MANIFEST))  # no longer complete, before anything else goes
            shutil.rmtree(folder)
            cached = None
        if cached is not None:  # built by the process this one waited for
            logger.info("using the preprocessed cache %s, built by another process meanwhile", folder)
            return cached, folder, False
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, "tmp*")) + glob.glob(os.path.join(folder, f"{MANIFEST}.tmp*")):
            # left by a builder that died while writing (datasets' temporary files, our manifest's staging file):
            # the lock's holder is the only builder alive, so no file here is another's work in progress
            os.remove(stale)
        for shard in glob.glob(os.path.join(folder, "pixels*.arrow")):  # no manifest: a build that did not finish
            try:  # a shard it finished reads whole and `map` reuses it; one damaged since would fail the build
                datasets.Dataset.from_file(shard)
            except Exception:  # pyarrow raises OSError, ArrowInvalid, ...
                logger.warning("removing %s, left unreadable by an unfinished build", shard)
                os.remove(shard)
        _remove_abandoned_builds(root)
        return _build(ds, column, rows, options, folder, root, cache_dir, num_proc)


def _remove_abandoned_builds(root: str) -> None:
    """Remove the other keys' builds under `root` that died unfinished (no manifest) and that no builder holds (their
    lock is free): a build killed, then its data or options changed (a new key), would otherwise be left on the disk
    for good (at scale, gigabytes that the next build's free-space check counts against it)."""
    for path in glob.glob(os.path.join(root, "*.lock")):
        folder = path.removesuffix(".lock")
        if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, MANIFEST)):
            continue
        try:
            lock = FileLock.take(path)
        except LockHeld:  # being built (or waited for) by another run: its work in progress
            continue
        try:
            if not os.path.exists(os.path.join(folder, MANIFEST)):  # checked again under its lock
                size = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
                logger.warning("removing %s (%.1f MB), an unfinished build of another key whose builder died",
                               folder, size / 1e6)  # fmt: skip
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            lock.release(remove=True)


def _build(ds, column, rows, options, folder, root, cache_dir, num_proc):
    import datasets

    resolution, channels = options["resolution"], options["channels"]
    source = (ds.to_dataset() if hasattr(ds, "to_dataset") else ds).select_columns([column])
    if rows is not None:
        source = source.select(rows)
    feature = source.features[column]
    paths = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not isinstance(feature, datasets.Image) and not paths:
        raise ValueError(f"column {column!r} holds {feature}, not images (datasets.Image or file paths)")
    source = source.cast_column(column, datasets.Image(decode=False))  # decode ourselves, one bad file at a time
    needed, free = _bytes_needed(len(source), channels or 3, resolution), shutil.disk_usage(root).free
    what = f"the preprocessed cache of {len(source)} images ({channels or 3}x{resolution}x{resolution} uint8)"
    if needed > free:
        raise _space_error(cache_dir, root, needed, free, what)
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
                           crop_seed=options["crop_seed"], base_dir=options["base_dir"])  # fmt: skip
    try:
        with forks_die_with_this_process():  # the pool's workers: a SIGKILLed builder leaves none holding the lock
            mapped = source.map(
                fn, batched=True, with_indices=True, batch_size=256, remove_columns=[column], features=features,
                num_proc=num_proc, cache_file_name=os.path.join(folder, "pixels.arrow"),
                new_fingerprint=os.path.basename(folder), desc="preprocessing images",
            )  # fmt: skip
        names = [os.path.relpath(f["filename"], folder) for f in mapped.cache_files]
        manifest = {"files": names, "rows": len(mapped), "options": options, "version": CACHE_VERSION,
                    "records": {name: _record(os.path.join(folder, name)) for name in names}}  # fmt: skip
        write_atomically(os.path.join(folder, MANIFEST), lambda f: json.dump(manifest, f), unique=True)  # complete
    except OSError as err:
        if err.errno != errno.ENOSPC and "No space left on device" not in str(err):
            raise
        shutil.rmtree(folder, ignore_errors=True)  # what was written of it: ours (we hold the lock)
        raise _space_error(cache_dir, root, needed, shutil.disk_usage(root).free, what + " (the disk filled while it was built)") from err  # fmt: skip
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
