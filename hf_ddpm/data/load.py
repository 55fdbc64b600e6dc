"""`load_data`: training and held-out images as uint8 (N, C, H, W), in memory or memory-mapped from the cache.

The bundled digits are made in memory directly (1797 tiny images: no cache, no `datasets`). Every other source is
preprocessed once into the on-disk cache (cache.py). Then, if the selected images fit `max_in_memory_bytes`, they are
copied from the cache into RAM as tensors (a step only indexes memory); otherwise they stay memory-mapped and each
batch is read from the cache (`MappedImages`). Both are indexed by the same positions, so the data order, and a
resumed run, are the same on either path. The path chosen and why is logged.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from ..launch import raise_if_any_failed
from .cache import MappedImages, preprocess
from .decode import check_resolution, detect_image_column, gray_to
from .digits import digits_array
from .sources import one_source, open_source, train_and_eval_split, with_referenced_files
from .split import check_eval_size, eval_count

logger = logging.getLogger("hf_ddpm.data")


@dataclass
class ImageData:
    """Preprocessed images, uint8 in 0..255: `train` (N, C, H, W) and the held-out `eval` (M, C, H, W), M may be 0;
    each a tensor, or a `MappedImages` (same indexing: `x[positions]`, `x[a:b]`, `len`, `.shape`) above the memory
    budget."""

    train: torch.Tensor | MappedImages
    eval: torch.Tensor | MappedImages
    source: str  # where the images came from, for logs and model cards
    image_column: str | None  # None for the digits
    cache_dir: str | None = None  # the preprocessed cache folder of the training split (None for the digits)
    in_memory: bool = True
    num_rows: int | None = None  # the training split's rows as listed, decodable or not (None for the digits)
    eval_split: str | None = None  # the source's own test/validation split the held-out images come from; None:
    # carved out of the training split (which a --streaming run trains on whole)


def default_memory_budget(processes_per_machine: int = 1) -> int:
    """A quarter of this machine's memory, shared by the processes on it that each hold a copy."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // (4 * max(1, processes_per_machine))


def _digits(resolution, channels, eval_size, rng, max_train_samples) -> ImageData:
    images = digits_array(resolution)[0][:, None]  # (1797, 1, R, R)
    perm = rng.permutation(len(images))
    n_eval = eval_count(eval_size, len(images))
    train, held_out = images[np.sort(perm[n_eval:][:max_train_samples])], images[np.sort(perm[:n_eval])]
    if channels is not None and channels > 1:
        train, held_out = gray_to(train, channels), gray_to(held_out, channels)
    verb = "upscaled" if resolution > 8 else "resized"
    source = f"scikit-learn digits (8x8 {verb} to {resolution}x{resolution})"
    return ImageData(torch.from_numpy(train), torch.from_numpy(held_out), source, None)


def _check(resolution, channels, eval_size, max_train_samples, max_in_memory_bytes) -> None:
    check_resolution(resolution)
    if channels not in (None, 1, 3, 4):
        raise ValueError(f"channels must be 1, 3, 4 or None (keep the source's), got {channels!r}")
    check_eval_size(eval_size)
    if max_train_samples is not None and (not isinstance(max_train_samples, int) or max_train_samples < 1):
        raise ValueError(f"max_train_samples must be a positive int or None, got {max_train_samples!r}")
    if max_in_memory_bytes is not None and (not isinstance(max_in_memory_bytes, int) or max_in_memory_bytes < 0):
        raise ValueError(f"max_in_memory_bytes must be an int >= 0 or None (automatic), got {max_in_memory_bytes!r}")


def load_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str | None = None,
    resolution: int = 16,
    channels: int | None = None,
    center_crop: bool = True,
    eval_size: float | int = 0.1,
    seed: int = 0,
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
    skip_corrupt: bool = True,
    max_in_memory_bytes: int | None = None,
    train_data_files: str | list[str] | None = None,
    preprocessing_num_workers: int | None = None,
    before_build: Callable[[DataIdentity, bool], None] | None = None,
) -> ImageData:
    """Load, preprocess (once: cached on disk) and split training images.

    Source: `dataset_name` (a Hub dataset id, a local dataset directory, a `save_to_disk` folder or a single data
    file), `train_data_dir` (an image folder), `train_data_files` (data files, a list or a string of comma-separated
    paths and glob patterns: parquet, arrow, csv/json of image paths, image files), or none of them: scikit-learn's
    digits (one source at most: `sources.one_source`).
    Each image is converted to `channels` (1, 3 or 4; None keeps 1 for an all-grayscale source and 3 otherwise;
    alpha is composited onto white unless channels=4), its shorter side resized to `resolution` (small images are
    upscaled, logged once) and cropped square at the centre, or at a random place (drawn once per image, seeded)
    when `center_crop=False`. A file that fails to decode is skipped with one warning giving the count, or raises
    when `skip_corrupt=False`; it is found once, when the cache is built.

    Held-out split: the dataset's own test/validation split when it has one (all of it for a fraction, a seeded
    subset of that many for an int `eval_size`, none for 0), else `eval_size` (a fraction in [0, 1), rounded up,
    or a count) of the images drawn with `seed`. `max_train_samples` keeps a seeded subset of the training split.

    Memory: the selected images are held in RAM when their N*C*H*W bytes fit `max_in_memory_bytes` (None: a
    quarter of this machine's memory), else read batch by batch from the memory-mapped cache. The cache lives under
    `cache_dir` (else the datasets cache) in hf_ddpm_preprocessed/; `preprocessing_num_workers` processes build it.
    `before_build`, if given, is called before the training split's cache is built (never when it is found complete)
    with what is known without decoding (its key and rows: a `DataIdentity`) and whether the held-out images are
    drawn from that split; it may raise to refuse the build (a resume on changed data, refused in seconds).
    """
    _check(resolution, channels, eval_size, max_train_samples, max_in_memory_bytes)
    given = one_source({"dataset_name": dataset_name, "train_data_dir": train_data_dir,
                        "train_data_files": train_data_files})  # fmt: skip
    rng = np.random.default_rng(seed)
    if not given:
        return _digits(resolution, channels, eval_size, rng, max_train_samples)

    src = open_source(dataset_name, dataset_config_name, train_data_dir, train_data_files, cache_dir)
    train_split, eval_split = train_and_eval_split(src.splits)
    train_ds = src.splits[train_split]
    column = detect_image_column(train_ds, image_column)
    if eval_split is None:  # hold out part of the training split
        perm = rng.permutation(len(train_ds))
        n_eval = eval_count(eval_size, len(train_ds))
        train_idx, eval_idx = perm[n_eval:], perm[:n_eval]
    else:
        n_eval = len(src.splits[eval_split]) if isinstance(eval_size, float) and eval_size > 0 else eval_size
        train_idx, eval_idx = rng.permutation(len(train_ds)), rng.permutation(len(src.splits[eval_split]))[:n_eval]
    train_idx, eval_idx = np.sort(train_idx[:max_train_samples]), np.sort(eval_idx)  # sorted: sequential reads

    opts = {"resolution": resolution, "channels": channels, "crop_seed": None if center_crop else seed,
            "base_dir": src.base_dir, "cache_dir": cache_dir, "num_proc": preprocessing_num_workers}  # fmt: skip
    wanted = {train_split: [train_idx]}
    wanted.setdefault(eval_split or train_split, []).append(eval_idx)
    parts, folders = {}, {}
    for split, selections in wanted.items():
        ds = src.splits[split]
        needed = np.unique(np.concatenate(selections)) if selections else np.arange(0)
        rows = None if len(needed) == len(ds) else needed  # the whole split: one cache whatever the selection
        identity = with_referenced_files(src.identities.get(split) or ds._fingerprint, ds, column, src.base_dir)
        check = None
        if before_build is not None and split == train_split:

            def check(folder: str) -> None:  # what is known of the training split before a byte is decoded
                known = DataIdentity(os.path.basename(folder), description=src.description, num_rows=len(train_ds))
                before_build(known, eval_split is None)

        cached, folders[split], _ = preprocess(ds, column, identity, rows, before_build=check, **opts)
        positions = needed if rows is None else np.arange(len(needed))
        for idx in selections:
            parts[id(idx)] = (cached, positions[np.searchsorted(needed, idx)] if len(idx) else idx)
    (train_cached, train_rows), (eval_cached, eval_rows) = parts[id(train_idx)], parts[id(eval_idx)]

    train_rows, eval_rows = _drop_corrupt(
        train_cached, train_rows, eval_cached, eval_rows, src.description, skip_corrupt
    )
    color = any(
        len(r) and pc.any(c.data.table.column("color").take(r)).as_py() for c, r in
        ((train_cached, train_rows), (eval_cached, eval_rows))
    )  # fmt: skip
    out_channels = channels or (3 if color else 1)  # an all-grayscale source stays one channel
    upscaled = sum(
        pc.sum(c.data.table.column("upscaled").take(r).cast("int64")).as_py() or 0
        for c, r in ((train_cached, train_rows), (eval_cached, eval_rows))
        if len(r)
    )
    if upscaled:
        logger.warning("%d image(s) of %s smaller than %d px were upscaled", upscaled, src.description, resolution)

    train = MappedImages(train_cached, train_rows, out_channels)
    held_out = MappedImages(eval_cached, eval_rows, out_channels)
    n_bytes = (len(train) + len(held_out)) * out_channels * resolution**2
    budget = default_memory_budget() if max_in_memory_bytes is None else max_in_memory_bytes
    in_memory = n_bytes <= budget
    logger.info(
        "data: %d + %d held-out images of %s, %dx%dx%d uint8 = %.1f MB, %s the memory budget of %.1f MB "
        "(max_in_memory_bytes): %s; preprocessed cache %s",
        len(train), len(held_out), src.description, out_channels, resolution, resolution, n_bytes / 1e6,
        "within" if in_memory else "above", budget / 1e6,
        "held in memory" if in_memory else "batches read from the memory-mapped cache", folders[train_split],
    )  # fmt: skip
    if in_memory:
        train, held_out = train[:], held_out[:]
    return ImageData(train, held_out, src.description, column, folders[train_split], in_memory, len(train_ds),
                     eval_split)  # fmt: skip


@dataclass(frozen=True)
class DataIdentity:
    """Which data a training run trained on, as its resume must find it again (the checkpoint's run record holds it;
    None: not recorded; `description` names it in messages and is not compared). Built by `data_identity`, and
    before anything is decoded by `load_data` for its `before_build` (the key and the rows only)."""

    source: str | None = None  # the data's key (the preprocessed cache's, or the stream's or digits' description)
    num_images: int | None = None  # images in the training split
    num_held_out: int | None = None
    held_out: str | None = None  # sha256 of the held-out images' pixels: which images the held-out split holds
    description: str | None = None
    num_rows: int | None = None  # the source's training split as listed, decodable or not (known before decoding)

    def change_since(self, saved: DataIdentity, since: str, held_out_drawn: bool = False) -> str | None:
        """What changed in the data since the checkpoint `since` recorded `saved` (this is the data now) and what it
        means for the held-out split, in one sentence; None when nothing recorded on both sides differs. Before the
        data is decoded (no held-out pixels yet) the split is known to move only when it is drawn from a training
        split whose rows changed (`held_out_drawn`)."""

        def known(name):
            old, new = getattr(saved, name), getattr(self, name)
            return old is not None and new is not None and old != new

        if not any(known(n) for n in ("source", "num_images", "num_held_out", "held_out")):
            return None
        what = self.description or saved.description or "the data"

        def total(d: DataIdentity) -> int | None:  # by rows where they differ (exact past skipped corrupt images)
            if known("num_rows") or self.held_out is None:  # ... and before decoding, when only rows are known
                return d.num_rows
            return None if d.num_images is None or d.num_held_out is None else d.num_images + d.num_held_out

        old_total, new_total = total(saved), total(self)
        if old_total is not None and new_total is not None and old_total != new_total:
            moved = new_total - old_total
            images = f"{abs(moved)} image{'s' * (abs(moved) != 1)}"
            change = f"{images} {'added to' if moved > 0 else 'removed from'} {what} since {since}"
        else:
            change = f"{what} changed since {since}"
        if known("source"):
            change += (
                f" (its key {saved.source} is now {self.source}: a file's path, size or modification time, or a "
                "preprocessing option, differs)"
            )
        if saved.num_held_out == 0 and self.num_held_out == 0:  # a run that holds out nothing (a folder streamed)
            return f"{change}: its training images are not the same (the run holds out no images)"
        if known("num_held_out"):
            return f"{change}: the held-out split would change ({saved.num_held_out} -> {self.num_held_out} images)"
        if known("held_out") or (self.held_out is None and held_out_drawn and known("num_rows")):
            return f"{change}: the held-out split would change (other images)"
        if self.held_out is None:
            return f"{change}: nothing of it is decoded yet, and the held-out split may change too"
        return f"{change}: the held-out split is the same, the training images are not"


def data_identity(data) -> DataIdentity:
    """The identity of the data `load_training_data` gave (`ImageData` or a `StreamingData`). The key of a
    preprocessed source is its cache folder's
    name: a hash of the files' resolved paths, sizes and modification times (not their contents) and of the
    preprocessing options; a stream of local files by their identity alike (without options: nothing is cached),
    other streams and the bundled digits by their description."""
    cache = getattr(data, "cache_dir", None)
    train, held_out = data.train, data.eval
    count = getattr(train, "num_examples", len(train))  # a stream's stated size (None: unknown)
    pixels = held_out[:].cpu().contiguous().numpy() if len(held_out) else b""
    key = os.path.basename(cache) if cache else getattr(data.train, "key", None) or data.source
    return DataIdentity(
        source=key,
        num_images=count,
        num_held_out=len(held_out),
        held_out=hashlib.sha256(pixels).hexdigest()[:16],
        description=data.source,
        num_rows=getattr(data, "num_rows", None),
    )


# A training run's options that `load_data` takes under the same names (training/train.py's flags).
LOAD_OPTIONS = ("dataset_name", "dataset_config_name", "train_data_dir", "train_data_files", "image_column",
                "center_crop", "eval_size", "seed", "max_train_samples", "cache_dir",
                "preprocessing_num_workers")  # fmt: skip


def load_training_data(options, accelerator, resolution: int, channels: int | None, before_build=None):
    """The images a training run's `options` name (its config: the data flags, by name) for its `accelerator`: one
    process per machine preprocesses them into the cache while the others wait, then all open the same cache files
    (`before_build`: `load_data`'s). With --streaming: the stream (`open_streaming`; nothing is cached)."""
    if options.streaming:
        from .streaming import open_streaming

        named = ("dataset_name", "dataset_config_name", "train_data_dir", "train_data_files", "image_column",
                 "eval_size", "cache_dir")  # fmt: skip
        return open_streaming(resolution=resolution, channels=channels, **{k: getattr(options, k) for k in named})
    if options.max_in_memory_gb is None:
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # set by torchrun
        budget = default_memory_budget(per_machine)
    else:
        budget = int(options.max_in_memory_gb * 1e9)
    load = functools.partial(
        load_data,
        resolution=resolution,
        channels=channels,
        skip_corrupt=options.on_corrupt_image == "skip",
        max_in_memory_bytes=budget,
        before_build=before_build,
        **{k: getattr(options, k) for k in LOAD_OPTIONS},
    )
    # The machine's main process first; its error (a refused resume, a lost source) reaches the others at once,
    # instead of leaving them at a barrier until the launcher ends them.
    data, error = None, None
    if accelerator.is_local_main_process:
        try:
            data = load()
        except Exception as err:
            error = err
    raise_if_any_failed(accelerator, error, "load the training data")
    return data if data is not None else load()


def _drop_corrupt(train_cached, train_rows, eval_cached, eval_rows, description, skip_corrupt):
    """The rows that decoded; warns once with the count of those that did not (or raises if not skip_corrupt)."""
    failed, kept = [], []
    for cached, rows in ((train_cached, train_rows), (eval_cached, eval_rows)):
        if not len(rows):
            kept.append(rows)
            continue
        errors = cached.data.table.column("error").take(rows)
        bad = np.asarray(pc.not_equal(errors, "").to_numpy(zero_copy_only=False), bool)
        failed += errors.filter(pc.not_equal(errors, "")).to_pylist()
        kept.append(rows[~bad])
    if failed and not skip_corrupt:
        raise ValueError(
            f"cannot decode image {failed[0]} (--on_corrupt_image skip, or skip_corrupt=True, skips such files)"
        )
    if failed:
        names = [e.split(": ", 1)[0] for e in failed]
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        warnings.warn(f"skipped {len(failed)} corrupt or unreadable image(s) of {description}: {shown}", stacklevel=3)
    if not len(kept[0]):
        raise ValueError(f"no decodable image in the training split of {description}")
    return kept[0], kept[1]
