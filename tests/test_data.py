"""hf_ddpm.data: the digits, image folders, local datasets (column detection, own test split), preprocessing, flips.

Nothing comes from the Hub: the image folders and parquet datasets are written into tmp_path. Most test images are
solid colours, which any resize keeps exactly, so the tests can assert exact pixel values.
"""

import logging
import time

import datasets
import numpy as np
import pytest
import torch
from image_files import write_folder, write_parquet
from PIL import Image

from hf_ddpm.data import (
    IMAGE_COLUMN_CANDIDATES,
    ImageData,
    MappedImages,
    detect_image_column,
    digits_dataset,
    load_data,
    random_hflip,
)

N_DIGITS = 1797


def sorted_rows(*tensors: torch.Tensor) -> list[bytes]:
    return sorted(img.numpy().tobytes() for t in tensors for img in t)


def colours(images: torch.Tensor) -> set[tuple[int, ...]]:
    """The set of per-image colours of a batch of solid-colour images (B, C, H, W), checking each is solid."""
    flat = images.flatten(2)  # (B, C, H*W)
    assert (flat == flat[:, :, :1]).all(), "an image that should be one solid colour is not"
    return {tuple(c) for c in flat[:, :, 0].tolist()}


def palette_image(size, colour) -> Image.Image:
    img = Image.new("P", size, 0)
    img.putpalette([*colour, *([0] * 765)])
    return img


def load(**kwargs) -> ImageData:
    return load_data(resolution=kwargs.pop("resolution", 16), eval_size=kwargs.pop("eval_size", 0), **kwargs)


# ---------------------------------------------------------------------------------------------------- the digits


def test_digits_split_shapes_and_range():
    data = load_data()
    assert data.train.shape == (1617, 1, 16, 16) and data.eval.shape == (180, 1, 16, 16)  # 180 = ceil(0.1 * 1797)
    assert data.train.dtype == data.eval.dtype == torch.uint8
    assert data.train.min() == 0 and data.train.max() == 255  # the digits' 0..16 scaled to the full 0..255
    assert data.image_column is None and data.source == "scikit-learn digits (8x8 upscaled to 16x16)"
    everything = load_data(eval_size=0)
    assert everything.eval.shape == (0, 1, 16, 16)
    assert sorted_rows(data.train, data.eval) == sorted_rows(everything.train)  # a partition of all 1797


def test_digits_split_is_deterministic_per_seed():
    a, b, c = load_data(seed=3), load_data(seed=3), load_data(seed=4)
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    assert not torch.equal(a.eval, c.eval)


def test_digits_eval_size_as_count_channels_and_subset():
    data = load_data(eval_size=97, channels=3, max_train_samples=500, resolution=8)
    assert data.train.shape == (500, 3, 8, 8) and data.eval.shape == (97, 3, 8, 8)
    assert torch.equal(data.train[:, 0], data.train[:, 2])  # gray replicated
    assert load_data(channels=4, eval_size=0).train[:, 3].eq(255).all()  # opaque alpha


def test_digits_load_fast():
    load_data()  # imports scikit-learn once
    start = time.perf_counter()
    load_data()
    assert time.perf_counter() - start < 1.0


def test_digits_dataset_matches_scikit_learn():
    from sklearn.datasets import load_digits

    ds = digits_dataset(resolution=8)
    assert ds.num_rows == N_DIGITS and set(ds.column_names) == {"image", "label"}
    img = ds[5]["image"]
    assert img.mode == "L" and img.size == (8, 8)
    digits = load_digits()
    np.testing.assert_array_equal(np.asarray(img), np.rint(digits.images[5] * 255 / 16))
    assert ds[5]["label"] == digits.target[5]
    big = digits_dataset()[0]["image"]
    assert big.size == (16, 16) and np.asarray(big).max() > 200


# ------------------------------------------------------------------------------------------------ image folders


def test_mixed_modes_and_sizes_end_as_one_shape(tmp_path):
    i16 = Image.fromarray(np.full((30, 30), 32896, np.uint16))  # 16-bit gray; 32896 / 257 = 128
    folder = write_folder(
        tmp_path / "imgs",
        {
            "rgb.png": Image.new("RGB", (40, 30), (200, 10, 10)),
            "rgba.png": Image.new("RGBA", (20, 50), (10, 20, 30, 255)),
            "clear.png": Image.new("RGBA", (17, 17), (0, 0, 0, 0)),  # fully transparent: composited onto white
            "gray.png": Image.new("L", (33, 33), 77),
            "pal.png": palette_image((25, 40), (10, 200, 30)),
            "i16.png": i16,
            "photo.jpg": Image.new("RGB", (64, 48), (0, 0, 255)),
        },
    )
    cache = str(tmp_path / "cache")
    rgb = load(train_data_dir=folder, resolution=8, cache_dir=cache)
    assert rgb.train.shape == (7, 3, 8, 8) and rgb.eval.shape == (0, 3, 8, 8) and rgb.image_column == "image"
    got = colours(rgb.train)
    assert {(200, 10, 10), (10, 20, 30), (255, 255, 255), (77, 77, 77), (10, 200, 30), (128, 128, 128)} <= got
    (jpeg,) = got - {(200, 10, 10), (10, 20, 30), (255, 255, 255), (77, 77, 77), (10, 200, 30), (128, 128, 128)}
    assert jpeg[2] > 240 and max(jpeg[:2]) < 15  # lossy, but blue
    gray = load(train_data_dir=folder, resolution=8, cache_dir=cache, channels=1)
    assert gray.train.shape == (7, 1, 8, 8) and (77,) in colours(gray.train) and (128,) in colours(gray.train)
    rgba = load(train_data_dir=folder, resolution=8, cache_dir=cache, channels=4)
    assert rgba.train.shape == (7, 4, 8, 8) and (0, 0, 0, 0) in colours(rgba.train)  # alpha kept


def test_all_grayscale_folder_stays_one_channel(tmp_path):
    folder = write_folder(
        tmp_path / "g",
        {
            "a.png": Image.new("L", (20, 20), 9),
            "b.png": Image.new("1", (9, 30), 1),
            "c.png": Image.new("LA", (16, 16), (50, 255)),
        },
    )
    data = load(train_data_dir=folder, cache_dir=str(tmp_path / "cache"), resolution=8)
    assert data.train.shape == (3, 1, 8, 8) and colours(data.train) == {(9,), (255,), (50,)}


def test_corrupt_files_are_skipped_with_a_count_or_raise(tmp_path):
    good = {f"{i}.png": Image.new("RGB", (12, 12), (i, i, i)) for i in range(3)}
    folder = write_folder(tmp_path / "imgs", good)
    (tmp_path / "imgs" / "garbage.png").write_bytes(b"this is not a png")
    png = (tmp_path / "imgs" / "0.png").read_bytes()
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(tmp_path / "big.png")
    (tmp_path / "imgs" / "truncated.png").write_bytes((tmp_path / "big.png").read_bytes()[: len(png) * 3])
    with pytest.warns(UserWarning, match=r"skipped 2 corrupt .*(garbage|truncated)\.png"):
        data = load(train_data_dir=folder, resolution=8, cache_dir=str(tmp_path / "cache"))
    assert data.train.shape == (3, 3, 8, 8) and colours(data.train) == {(0, 0, 0), (1, 1, 1), (2, 2, 2)}
    with pytest.raises(ValueError, match=r"cannot decode image .*(garbage|truncated)\.png"):
        load(train_data_dir=folder, resolution=8, cache_dir=str(tmp_path / "cache"), skip_corrupt=False)


def test_empty_or_imageless_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' holds no image files \(0 files"):
        load_data(train_data_dir=str(tmp_path / "empty"))
    write_folder(tmp_path / "text", {})
    (tmp_path / "text" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"holds no image files \(1 files"):
        load_data(train_data_dir=str(tmp_path / "text"))
    with pytest.raises(ValueError, match="'nowhere' is not a directory"):
        load_data(train_data_dir="nowhere")


def test_center_crop_keeps_the_centre(tmp_path):
    thirds = np.zeros((30, 90, 3), np.uint8)  # (H, W, C): red | green | blue
    thirds[:, :30, 0] = thirds[:, 30:60, 1] = thirds[:, 60:, 2] = 255
    folder = write_folder(
        tmp_path / "w", {"wide.png": Image.fromarray(thirds), "tall.png": Image.fromarray(thirds.transpose(1, 0, 2))}
    )
    same = load(train_data_dir=folder, resolution=30, cache_dir=str(tmp_path / "cache"))
    assert colours(same.train) == {(0, 255, 0)}  # at scale 1 the centre square is exactly the green third
    small = load(train_data_dir=folder, resolution=8, cache_dir=str(tmp_path / "cache")).train  # (2, 3, 8, 8)
    assert (small[:, 1] >= 220).all() and (small[:, [0, 2]] <= 35).all()  # green; the edges see a little blur
    assert colours(small[:, :, 1:-1, 1:-1]) == {(0, 255, 0)}


def test_random_crop_is_a_seeded_window(tmp_path):
    ramp = np.repeat(np.arange(90, dtype=np.uint8)[None, :], 30, axis=0)  # (30, 90): column x has value x
    folder = write_folder(tmp_path / "r", {f"{i}.png": Image.fromarray(ramp) for i in range(8)})
    kw = {"train_data_dir": folder, "resolution": 30, "center_crop": False, "cache_dir": str(tmp_path / "cache")}
    a, b, c = load(seed=1, **kw).train, load(seed=1, **kw).train, load(seed=2, **kw).train
    assert torch.equal(a, b) and not torch.equal(a, c)
    lefts = a[:, 0, 0, 0]  # each crop is ramp[:, left:left + 30]
    assert torch.equal(a[:, 0], (lefts[:, None, None] + torch.arange(30)).expand(8, 30, 30).to(torch.uint8))
    assert len(set(lefts.tolist())) > 1 and lefts.max() <= 60


def test_small_images_are_upscaled_and_logged_once(tmp_path, caplog):
    folder = write_folder(
        tmp_path / "s", {"tiny.png": Image.new("RGB", (4, 6), (1, 2, 3)), "ok.png": Image.new("RGB", (20, 20))}
    )
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.data"):
        data = load(train_data_dir=folder, cache_dir=str(tmp_path / "cache"))
    assert data.train.shape == (2, 3, 16, 16) and (1, 2, 3) in colours(data.train)
    assert [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()] == [
        f"1 image(s) of {folder} smaller than 16 px were upscaled"
    ]


def test_folder_eval_size_count_and_fraction(tmp_path):
    folder = write_folder(tmp_path / "f", {f"{i}.png": Image.new("L", (8, 8), i) for i in range(10)})
    cache = str(tmp_path / "cache")
    data = load_data(train_data_dir=folder, resolution=8, eval_size=3, cache_dir=cache)
    assert len(data.train) == 7 and len(data.eval) == 3
    assert colours(torch.cat([data.train, data.eval])) == {(i,) for i in range(10)}
    assert len(load_data(train_data_dir=folder, resolution=8, eval_size=0.25, cache_dir=cache).eval) == 3  # ceil
    with pytest.raises(ValueError, match="eval_size 10 holds out 10 of the 10 images"):
        load_data(train_data_dir=folder, eval_size=10, cache_dir=cache)


def test_above_the_memory_budget_batches_come_from_the_mapped_cache(tmp_path, caplog):
    folder = write_folder(tmp_path / "m", {f"{i}.png": Image.new("RGB", (8, 8), (i, 2 * i, 3)) for i in range(9)})
    kw = {"train_data_dir": folder, "resolution": 8, "eval_size": 2, "cache_dir": str(tmp_path / "cache")}
    with caplog.at_level(logging.INFO, logger="hf_ddpm.data"):
        mapped = load_data(max_in_memory_bytes=9 * 3 * 64 - 1, **kw)  # one byte short of the 9 images
    assert not mapped.in_memory and isinstance(mapped.train, MappedImages) and isinstance(mapped.eval, MappedImages)
    assert "above the memory budget of 0.0 MB (max_in_memory_bytes): batches read from the memory-mapped" in caplog.text
    held = load_data(max_in_memory_bytes=9 * 3 * 64, **kw)  # fits exactly: in memory, from the same cache
    assert held.in_memory and isinstance(held.train, torch.Tensor) and held.cache_dir == mapped.cache_dir
    assert mapped.train.shape == held.train.shape == (7, 3, 8, 8) and len(mapped.eval) == 2
    positions = torch.tensor([6, 0, 3, 3])
    assert torch.equal(mapped.train[positions], held.train[positions])  # the same positions, the same images
    assert torch.equal(mapped.train[2:5], held.train[2:5]) and torch.equal(mapped.eval[:], held.eval)
    assert colours(torch.cat([held.train, held.eval])) == {(i, 2 * i, 3) for i in range(9)}


# ------------------------------------------------------------------------------------- local datasets and columns

IMG_FEATURES = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})


def test_local_dataset_detects_img_column_and_uses_its_test_split(tmp_path):
    train = [Image.new("RGB", (10, 12), (0, 0, i)) for i in range(6)]
    test = [Image.new("RGB", (12, 10), (i, 0, 0)) for i in range(1, 4)]
    write_parquet(
        tmp_path / "ds" / "data" / "train-00000.parquet", {"img": train, "caption": list("abcdef")}, IMG_FEATURES
    )
    write_parquet(tmp_path / "ds" / "data" / "test-00000.parquet", {"img": test, "caption": list("xyz")}, IMG_FEATURES)
    kw = {"dataset_name": str(tmp_path / "ds"), "resolution": 8, "cache_dir": str(tmp_path / "cache")}
    data = load_data(**kw)  # eval_size=0.1 is ignored: the test split is the held-out set
    assert data.image_column == "img" and data.source == str(tmp_path / "ds")
    assert colours(data.train) == {(0, 0, i) for i in range(6)} and colours(data.eval) == {
        (i, 0, 0) for i in range(1, 4)
    }
    assert len(load_data(eval_size=2, **kw).eval) == 2 and len(load_data(eval_size=0, **kw).eval) == 0
    assert len(load_data(max_train_samples=4, **kw).train) == 4
    with pytest.raises(ValueError, match=r"image_column 'picture' is not a column .*\['img', 'caption'\]"):
        load_data(image_column="picture", **kw)


def test_dataset_without_image_column_raises_naming_columns(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    write_parquet(tmp_path / "t" / "train.parquet", {"text": ["a", "b"], "label": [0, 1]}, features)
    with pytest.raises(ValueError, match=r"no image column .*\['text', 'label'\]"):
        load_data(dataset_name=str(tmp_path / "t"), cache_dir=str(tmp_path / "cache"))


def test_detect_image_column_order():
    ds = datasets.Dataset.from_dict({"photo": ["a.png"], "img": ["b.png"]})  # strings: no Image feature
    assert detect_image_column(ds) == "img"  # earlier in IMAGE_COLUMN_CANDIDATES
    assert IMAGE_COLUMN_CANDIDATES.index("img") < IMAGE_COLUMN_CANDIDATES.index("photo")
    typed = ds.cast_column("photo", datasets.Image())
    assert detect_image_column(typed) == "photo"  # the Image feature wins over a name
    assert detect_image_column(typed, "img") == "img"
    with pytest.raises(ValueError, match=r"image_column 'pixels' .* \['photo', 'img'\]"):
        detect_image_column(ds, "pixels")


# ---------------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 0}, "resolution must be a positive int, got 0"),
        ({"resolution": 16.0}, "resolution must be a positive int, got 16.0"),
        ({"channels": 2}, "channels must be 1, 3, 4 or None .* got 2"),
        ({"eval_size": -1}, "eval_size must be .* got -1"),
        ({"eval_size": 1.0}, r"eval_size 1.0 as a fraction must be in \[0, 1\)"),
        ({"eval_size": N_DIGITS}, f"eval_size {N_DIGITS} holds out {N_DIGITS} of the {N_DIGITS} images"),
        ({"max_train_samples": 0}, "max_train_samples must be a positive int or None, got 0"),
        ({"max_in_memory_bytes": -1}, r"max_in_memory_bytes must be an int >= 0 or None \(automatic\), got -1"),
        ({"dataset_name": "x", "train_data_dir": "y"}, r"dataset_name \('x'\) or train_data_dir \('y'\), not both"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_data(**kwargs)


# ------------------------------------------------------------------------------------------------------ flipping


def test_random_hflip_flips_about_half_deterministically():
    batch = torch.arange(1000 * 2 * 3 * 4, dtype=torch.float32).reshape(1000, 2, 3, 4)  # (B, C, H, W), asymmetric
    out = random_hflip(batch, torch.Generator().manual_seed(0))
    flipped = (out == batch.flip(-1)).flatten(1).all(1)
    kept = (out == batch).flatten(1).all(1)
    assert (flipped ^ kept).all()  # each image is either untouched or exactly mirrored
    assert 430 <= flipped.sum() <= 570  # Binomial(1000, 1/2): mean 500, sd 16
    assert torch.equal(out, random_hflip(batch, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, random_hflip(batch, torch.Generator().manual_seed(1)))
    uint8 = random_hflip(batch[:8].to(torch.uint8))
    assert uint8.dtype == torch.uint8 and uint8.shape == (8, 2, 3, 4)
