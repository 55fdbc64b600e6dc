"""scikit-learn's bundled handwritten digits, the training data when none is given (`make demo`): 1797 8x8 images,
values 0..16, scaled to 0..255 and resized to the training resolution."""

import numpy as np
from PIL import Image

from .decode import check_resolution


def digits_array(resolution: int) -> tuple[np.ndarray, np.ndarray]:
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

    check_resolution(resolution)
    images, labels = digits_array(resolution)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    data = {"image": [Image.fromarray(im, "L") for im in images], "label": labels.tolist()}
    return datasets.Dataset.from_dict(data, features=features)
