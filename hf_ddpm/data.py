"""Training data: a Hub dataset, an image folder, or scikit-learn's bundled digits, as uint8 (N, C, H, W) tensors.

Everything is decoded, converted to one mode, resized and cropped to `resolution` once, at load, and kept in memory
as uint8 (a 16x16 digit is 256 bytes; CIFAR-10 is 150 MB). Training then only indexes, flips and rescales a batch,
which keeps the data loader out of the step time. `datasets` is imported lazily: it is slow to import and the
digits do not need it.
"""

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

__all__ = ["IMAGE_COLUMN_CANDIDATES", "ImageData", "detect_image_column", "digits_dataset", "load_data", "random_hflip"]

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "pixel_values", "picture", "photo")
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val")  # test first: the paper's bits/dim are on the test set
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}  # plus every "I;16*" mode
_RESAMPLE = Image.Resampling.BILINEAR  # as diffusers' training example; Pillow's resize is antialiased


@dataclass
class ImageData:
    """Preprocessed images, uint8 in 0..255: `train` (N, C, H, W) and the held-out `eval` (M, C, H, W), M may be 0."""

    train: torch.Tensor
    eval: torch.Tensor
    source: str  # where the images came from, for logs and model cards
    image_column: str | None  # None for the digits


def _digits_array(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as uint8 (N, resolution, resolution), values 0..16 scaled to 0..255 then resized (bicubic),
    and their labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    if resolution == 8:
        return small, digits.target
    size = (resolution, resolution)
    images = [np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BICUBIC)) for im in small]
    return np.stack(images), digits.target


def digits_dataset(resolution: int = 16) -> "datasets.Dataset":  # noqa: F821
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16) as a `datasets.Dataset`: an 'image'
    column of mode-'L' PIL images scaled to 0..255 and resized (bicubic) to `resolution`, and a 'label' column."""
    import datasets

    _check_resolution(resolution)
    images, labels = _digits_array(resolution)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    data = {"image": [Image.fromarray(im, "L") for im in images], "label": labels.tolist()}
    return datasets.Dataset.from_dict(data, features=features)


def detect_image_column(dataset, image_column: str | None = None) -> str:
    """The image column of a `datasets.Dataset`: `image_column` if given (it must exist), else the first column whose
    feature is `datasets.Image`, else the first name of IMAGE_COLUMN_CANDIDATES present."""
    import datasets

    columns = list(dataset.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image_column {image_column!r} is not a column of the dataset; its columns: {columns}")
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in columns:
            return name
    raise ValueError(
        f"no image column found among the dataset's columns {columns}: none has the datasets.Image feature or one "
        f"of the names {list(IMAGE_COLUMN_CANDIDATES)}; pass image_column"
    )


def random_hflip(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch horizontally with probability 1/2 (on the batch's device)."""
    device = generator.device if generator is not None else batch.device
    flip = (torch.rand(batch.shape[0], generator=generator, device=device) < 0.5).to(batch.device)
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def _check_resolution(resolution) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")


def _check_eval_size(eval_size) -> None:
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)) or not 0 <= eval_size:
        raise ValueError(f"eval_size must be a fraction in [0, 1) or an image count >= 0, got {eval_size!r}")
    if isinstance(eval_size, float) and eval_size >= 1:
        raise ValueError(f"eval_size {eval_size!r} as a fraction must be in [0, 1); pass an int for a count")


def _eval_count(eval_size: float | int, n: int) -> int:
    """How many of `n` images to hold out: ceil(fraction * n) or the count; at least one must be left to train on."""
    count = math.ceil(eval_size * n) if isinstance(eval_size, float) else eval_size
    if count >= n:
        raise ValueError(f"eval_size {eval_size!r} holds out {count} of the {n} images, leaving none to train on")
    return count


def _to_mode(img: Image.Image, channels: int | None) -> Image.Image:
    """Convert to 'L' (1), 'RGB' (3) or 'RGBA' (4); None keeps grayscale as 'L', all else 'RGB'. Alpha is composited
    onto white unless kept; 16-bit and float grayscale are scaled to 8 bits, not clipped as PIL's convert does."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max() > 255):
            a = a / 257  # 0..65535 -> 0..255
        elif img.mode == "F" and a.max() <= 1:
            a = a * 255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    target = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels) or ("L" if img.mode in _GRAY_MODES else "RGB")
    if img.mode == target:
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha and target != "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert(target)


def _load_image(value, resolution: int, channels: int | None, crop_rng: np.random.Generator | None):
    """Decode one stored image (datasets' {"bytes", "path"}) to (C, R, R) uint8; also whether it was upscaled."""
    img = Image.open(io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"])
    w, h = img.size
    if img.format == "JPEG":  # decode at a reduced scale (still >= the target size): much faster for large photos
        img.draft(None, (math.ceil(w * resolution / min(w, h)), math.ceil(h * resolution / min(w, h))))
    img.load()  # decode it all now: a truncated file fails here, not later in training
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # camera rotation, as datasets' decoding applies it
        img = ImageOps.exif_transpose(img)
    img = _to_mode(img, channels)
    w, h = img.size
    side = min(w, h)  # the square crop, in source pixels, that becomes resolution x resolution
    if crop_rng is None:
        left, top = (w - side) / 2, (h - side) / 2
    else:
        left, top = int(crop_rng.integers(w - side + 1)), int(crop_rng.integers(h - side + 1))
    img = img.resize((resolution, resolution), _RESAMPLE, box=(left, top, left + side, top + side))
    arr = np.asarray(img)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), side < resolution


def _decode(ds, column, indices, resolution, channels, crop_rng, skip_corrupt, stats) -> np.ndarray:
    """Decode rows `indices` of `ds[column]` into uint8 (n, C, R, R); C is 3 when channels=None (gray broadcast)."""
    out = np.empty((len(indices), channels or 3, resolution, resolution), np.uint8)
    kept = 0
    for start in range(0, len(indices), 512):  # one Arrow read per chunk, not one per image
        rows = indices[start : start + 512].tolist()
        for row, value in zip(rows, ds[rows][column]):
            try:
                arr, upscaled = _load_image(value, resolution, channels, crop_rng)
            except Exception as err:  # Pillow's plugins raise OSError, ValueError, SyntaxError, struct.error, ...
                name = value["path"] or f"row {row}"
                if not skip_corrupt:
                    raise ValueError(f"cannot decode image {name}: {err} (skip_corrupt=True skips such files)") from err
                stats["skipped"].append(name)
                continue
            out[kept] = arr  # (1, R, R) broadcasts to (3, R, R), as PIL's L -> RGB does
            stats["color"] |= arr.shape[0] > 1
            stats["upscaled"] += upscaled
            kept += 1
    return out[:kept].copy() if kept < len(out) else out


def _open_source(dataset_name, dataset_config_name, train_data_dir, cache_dir):
    """load_dataset for a Hub/local dataset or an image folder; returns (splits, description)."""
    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if dataset_name is not None:
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir), dataset_name
    if not os.path.isdir(train_data_dir):
        raise ValueError(f"train_data_dir {train_data_dir!r} is not a directory")
    files = [f for _, _, names in os.walk(train_data_dir) for f in names if not f.startswith(".")]
    if not any(os.path.splitext(f)[1].lower() in ImageFolder.EXTENSIONS for f in files):
        raise ValueError(
            f"train_data_dir {train_data_dir!r} holds no image files ({len(files)} files, none with an image "
            f"extension such as .png, .jpg or .webp)"
        )
    return datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir), train_data_dir


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
    max_in_memory_bytes: int = 8 * 2**30,
) -> ImageData:
    """Load, preprocess and split training images into memory.

    Source: `dataset_name` (a Hub dataset id or a local dataset directory/script, via `datasets.load_dataset`),
    `train_data_dir` (an image folder, via datasets' "imagefolder" builder), or neither: scikit-learn's digits.
    Each image is converted to `channels` (1, 3 or 4; None keeps 1 for an all-grayscale source and 3 otherwise;
    alpha is composited onto white unless channels=4), its shorter side resized to `resolution` (small images are
    upscaled, logged once) and cropped square at the centre, or at a random place (drawn once, seeded) when
    `center_crop=False`. A file that fails to decode is skipped with one warning giving the count, or raises when
    `skip_corrupt=False`.

    Held-out split: the dataset's own test/validation split when it has one (all of it for a fraction, a seeded
    subset of that many for an int `eval_size`, none for 0), else `eval_size` (a fraction in [0, 1), rounded up,
    or a count) of the images drawn with `seed`. `max_train_samples` keeps a seeded subset of the training split.

    Memory: everything is held as uint8 in memory, the only path for now (a streaming path is future work). For a
    dataset or folder, the size N*C*H*W bytes (C = 3 when channels=None) is checked before anything is decoded:
    above `max_in_memory_bytes` it raises and advises `max_train_samples`.
    """
    _check_resolution(resolution)
    if channels not in (None, 1, 3, 4):
        raise ValueError(f"channels must be 1, 3, 4 or None (keep the source's), got {channels!r}")
    _check_eval_size(eval_size)
    if max_train_samples is not None and (not isinstance(max_train_samples, int) or max_train_samples < 1):
        raise ValueError(f"max_train_samples must be a positive int or None, got {max_train_samples!r}")
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError(f"pass dataset_name ({dataset_name!r}) or train_data_dir ({train_data_dir!r}), not both")
    rng = np.random.default_rng(seed)

    if dataset_name is None and train_data_dir is None:
        images = _digits_array(resolution)[0][:, None]  # (1797, 1, R, R)
        perm = rng.permutation(len(images))
        n_eval = _eval_count(eval_size, len(images))
        train, held_out = images[np.sort(perm[n_eval:][:max_train_samples])], images[np.sort(perm[:n_eval])]
        if channels is not None and channels > 1:
            train, held_out = _gray_to(train, channels), _gray_to(held_out, channels)
        verb = "upscaled" if resolution > 8 else "resized"
        source = f"scikit-learn digits (8x8 {verb} to {resolution}x{resolution})"
        return ImageData(torch.from_numpy(train), torch.from_numpy(held_out), source, None)

    import datasets

    splits, source = _open_source(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    if isinstance(splits, datasets.Dataset):
        splits = {"train": splits}
    train_split = "train" if "train" in splits else next(iter(splits))
    eval_split = next((s for s in EVAL_SPLIT_NAMES if s in splits and s != train_split), None)
    train_ds = splits[train_split]
    column = detect_image_column(train_ds, image_column)
    if eval_split is None:  # hold out part of the training split
        perm = rng.permutation(len(train_ds))
        n_eval = _eval_count(eval_size, len(train_ds))
        eval_ds, train_idx, eval_idx = train_ds, perm[n_eval:], perm[:n_eval]
    else:
        eval_ds = splits[eval_split]
        n_eval = len(eval_ds) if isinstance(eval_size, float) and eval_size > 0 else eval_size
        train_idx, eval_idx = rng.permutation(len(train_ds)), rng.permutation(len(eval_ds))[:n_eval]
    train_idx, eval_idx = np.sort(train_idx[:max_train_samples]), np.sort(eval_idx)  # sorted: sequential reads

    n_images = len(train_idx) + len(eval_idx)
    n_bytes = n_images * (channels or 3) * resolution**2
    if n_bytes > max_in_memory_bytes:
        raise ValueError(
            f"{n_images} images of {source} at {channels or 3}x{resolution}x{resolution} need {n_bytes / 2**30:.2f} "
            f"GiB as uint8, above max_in_memory_bytes={max_in_memory_bytes} ({max_in_memory_bytes / 2**30:.2f} GiB): "
            f"pass max_train_samples to train on a subset (a streaming path is future work)"
        )

    stats = {"skipped": [], "color": False, "upscaled": 0}
    crop_rng = None if center_crop else np.random.default_rng([seed, 1])  # its own stream: the split stays put
    parts = []
    for ds, idx in ((train_ds, train_idx), (eval_ds, eval_idx)):
        ds = ds.select_columns([column])
        feature = ds.features[column]
        if not isinstance(feature, datasets.Image) and feature != datasets.Value("string"):
            raise ValueError(f"column {column!r} holds {feature}, not images (datasets.Image or file paths)")
        ds = ds.cast_column(column, datasets.Image(decode=False))  # decode ourselves, one bad file at a time
        parts.append(_decode(ds, column, idx, resolution, channels, crop_rng, skip_corrupt, stats))
    if stats["skipped"]:
        shown = ", ".join(stats["skipped"][:3]) + (", ..." if len(stats["skipped"]) > 3 else "")
        warnings.warn(
            f"skipped {len(stats['skipped'])} corrupt or unreadable image(s) of {source}: {shown}", stacklevel=2
        )
    if len(parts[0]) == 0:
        raise ValueError(f"no decodable image in the training split of {source}")
    if stats["upscaled"]:
        logger.warning("%d image(s) of %s smaller than %d px were upscaled", stats["upscaled"], source, resolution)
    if channels is None and not stats["color"]:  # an all-grayscale source stays one channel
        parts = [p[:, :1].copy() for p in parts]
    return ImageData(torch.from_numpy(parts[0]), torch.from_numpy(parts[1]), source, column)


def _gray_to(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, 1, H, W) gray -> (N, 3, H, W) RGB, or RGBA with an opaque alpha for channels=4."""
    rgb = np.repeat(images, 3, axis=1)
    return rgb if channels == 3 else np.concatenate([rgb, np.full_like(images, 255)], axis=1)
