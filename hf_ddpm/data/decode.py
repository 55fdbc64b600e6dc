"""One image, decoded: mode, resolution and crop as training wants them; and which column of a dataset holds the
images. The data cache (cache.py) and the stream's workers (stream_decode.py) decode with it.

`datasets` is imported lazily: it is slow to import and the digits (digits.py) do not need it.
"""

import io
import math

import numpy as np
from PIL import ExifTags, Image, ImageOps

IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "pixel_values", "picture", "photo")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}  # plus every "I;16*" mode
_RESAMPLE = Image.Resampling.BILINEAR  # as diffusers' training example; Pillow's resize is antialiased


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


def check_resolution(resolution) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")


def to_mode(img: Image.Image, channels: int | None) -> Image.Image:
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


def read_bytes(path: str) -> bytes:
    """The bytes of an image file: a local path, or a remote file of a Hub dataset (hf://, https://)."""
    if "://" in path:  # a remote file of a Hub stream (hf://, https://): datasets' reader
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def decode_image(value, resolution: int, channels: int | None, crop_rng: np.random.Generator | None):
    """Decode one stored image (datasets' {"bytes", "path"}) to (C, R, R) uint8; also whether it was upscaled."""
    img = Image.open(io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"])
    w, h = img.size
    if img.format == "JPEG":  # decode at a reduced scale (still >= the target size): much faster for large photos
        img.draft(None, (math.ceil(w * resolution / min(w, h)), math.ceil(h * resolution / min(w, h))))
    img.load()  # decode it all now: a truncated file fails here, not later in training
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # camera rotation, as datasets' decoding applies it
        img = ImageOps.exif_transpose(img)
    img = to_mode(img, channels)
    w, h = img.size
    side = min(w, h)  # the square crop, in source pixels, that becomes resolution x resolution
    if crop_rng is None:
        left, top = (w - side) / 2, (h - side) / 2
    else:
        left, top = int(crop_rng.integers(w - side + 1)), int(crop_rng.integers(h - side + 1))
    img = img.resize((resolution, resolution), _RESAMPLE, box=(left, top, left + side, top + side))
    arr = np.asarray(img)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), side < resolution


def gray_to(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, 1, H, W) gray -> (N, 3, H, W) RGB, or RGBA with an opaque alpha for channels=4."""
    rgb = np.repeat(images, 3, axis=1)
    return rgb if channels == 3 else np.concatenate([rgb, np.full_like(images, 255)], axis=1)
