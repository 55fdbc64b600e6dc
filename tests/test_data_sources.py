"""Every local form `datasets` users keep images in, through hf_ddpm.data.load_data: a `save_to_disk` folder (a Dataset
and a DatasetDict with its own test split), a single parquet / arrow / csv-of-paths file, a list of data files and
glob patterns (--train_data_files), image files, and an image folder with train/ and test/ subfolders. Each holds
solid-colour images whose colours name them, so the tests check exactly which images arrived where."""

import datasets
import pytest
import torch
from PIL import Image

from hf_ddpm.data import load_data
from hf_ddpm.training.batches import data_files

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


def solid(i: int) -> Image.Image:
    return Image.new("RGB", (10, 10), (i, 100, 200))


def dataset(numbers) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": [solid(i) for i in numbers], "label": list(numbers)}, features=FEATURES)


def reds(images: torch.Tensor) -> list[int]:
    assert (images[:, 1] == 100).all() and (images[:, 2] == 200).all()
    return sorted(images[:, 0, 0, 0].tolist())


def load(tmp_path, **kwargs):
    return load_data(resolution=4, cache_dir=str(tmp_path / "cache"), **{"eval_size": 0, **kwargs})


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    dataset(range(5)).save_to_disk(str(tmp_path / "one"))
    data = load(tmp_path, dataset_name=str(tmp_path / "one"))
    assert reds(data.train) == [0, 1, 2, 3, 4] and data.source == str(tmp_path / "one")
    datasets.DatasetDict({"train": dataset(range(6)), "test": dataset(range(50, 53))}).save_to_disk(str(tmp_path / "d"))
    split = load(tmp_path, dataset_name=str(tmp_path / "d"), eval_size=0.1)  # its own test split is held out
    assert reds(split.train) == list(range(6)) and reds(split.eval) == [50, 51, 52]
    none = load(tmp_path, dataset_name=str(tmp_path / "d"), eval_size=0)
    assert none.eval.shape == (0, 3, 4, 4) and len(none.train) == 6


def test_single_parquet_arrow_and_csv_of_relative_paths(tmp_path):
    dataset(range(4)).to_parquet(str(tmp_path / "one.parquet"))
    assert reds(load(tmp_path, dataset_name=str(tmp_path / "one.parquet")).train) == [0, 1, 2, 3]
    assert reds(load(tmp_path, train_data_files=str(tmp_path / "one.parquet")).train) == [0, 1, 2, 3]
    arrow = dataset(range(10, 13))
    arrow.save_to_disk(str(tmp_path / "saved"))
    (arrow_file,) = (tmp_path / "saved").glob("*.arrow")
    assert reds(load(tmp_path, train_data_files=[str(arrow_file)]).train) == [10, 11, 12]
    (tmp_path / "pics").mkdir()
    for i in (20, 21, 22):
        solid(i).save(tmp_path / "pics" / f"{i}.png")
    (tmp_path / "list.csv").write_text("file_name,caption\n" + "".join(f"pics/{i}.png,x\n" for i in (20, 21, 22)))
    data = load(tmp_path, train_data_files=str(tmp_path / "list.csv"), image_column="file_name")
    assert reds(data.train) == [20, 21, 22] and data.image_column == "file_name"  # paths relative to the csv


def test_a_list_of_data_files_globs_and_image_files(tmp_path):
    for shard, numbers in enumerate((range(0, 3), range(3, 7))):
        dataset(numbers).to_parquet(str(tmp_path / f"train-{shard:05d}.parquet"))
    files = data_files(f"{tmp_path}/train-*.parquet")
    assert [f.rsplit("/", 1)[1] for f in files] == ["train-00000.parquet", "train-00001.parquet"]
    assert reds(load(tmp_path, train_data_files=files).train) == list(range(7))
    for i in (30, 31):
        solid(i).save(tmp_path / f"{i}.png")
    pngs = data_files(f"{tmp_path}/30.png, {tmp_path}/31.png")
    assert reds(load(tmp_path, train_data_files=pngs).train) == [30, 31]
    with pytest.raises(ValueError, match=r"pattern '.*nothing-\*\.parquet' matches no file"):
        data_files(f"{tmp_path}/nothing-*.parquet")
    with pytest.raises(ValueError, match=r"all be of one kind .* got extensions \['.parquet', '.png'\]"):
        load(tmp_path, train_data_files=[files[0], pngs[0]])
    with pytest.raises(ValueError, match=r"\['.*missing.parquet'\] not found \(of 1 files\)"):
        load(tmp_path, train_data_files=[str(tmp_path / "missing.parquet")])
    with pytest.raises(ValueError, match=r"pass dataset_name \('x'\) or train_data_files"):
        load(tmp_path, dataset_name="x", train_data_files=files)


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    for split, numbers in (("train", range(4)), ("test", (40, 41))):
        (tmp_path / "f" / split).mkdir(parents=True)
        for i in numbers:
            solid(i).save(tmp_path / "f" / split / f"{i}.png")
    data = load(tmp_path, train_data_dir=str(tmp_path / "f"), eval_size=0.5)
    assert reds(data.train) == [0, 1, 2, 3] and reds(data.eval) == [40, 41]
