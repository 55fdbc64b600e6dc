"""Every form `datasets` users keep images in, through hf_ddpm.data.load_data: a `save_to_disk` folder (a Dataset
and a DatasetDict with its own test split), a single parquet / arrow / csv-of-paths file, a list of data files and
glob patterns (--train_data_files), image files, an image folder with train/ and test/ subfolders, and a Hub
dataset id (served by tests/hub_server.py), cached and streamed. Each holds solid-colour images whose colours name
them, so the tests check exactly which images arrived where."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from hf_ddpm.data import load_data
from hf_ddpm.data.sources import data_files

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


def test_a_csv_of_paths_is_keyed_by_the_images_it_names_not_only_by_itself(tmp_path):
    """An image rewritten behind an unchanged csv makes a new cache (the old pixels are never trained on); one removed
    is refused by name at the start, before anything is decoded."""
    (tmp_path / "pics").mkdir()
    for i in (30, 31, 32):
        solid(i).save(tmp_path / "pics" / f"{i}.png")
    (tmp_path / "list.csv").write_text("image\n" + "".join(f"pics/{i}.png\n" for i in (30, 31, 32)))
    first = load(tmp_path, train_data_files=str(tmp_path / "list.csv"))
    assert reds(first.train) == [30, 31, 32]
    Image.new("RGB", (12, 12), (40, 100, 200)).save(tmp_path / "pics" / "31.png")  # a new size and mtime
    second = load(tmp_path, train_data_files=str(tmp_path / "list.csv"))
    assert reds(second.train) == [30, 32, 40] and second.cache_dir != first.cache_dir
    (tmp_path / "pics" / "32.png").unlink()
    with pytest.raises(ValueError, match=r"cannot read .*pics/32\.png \(FileNotFoundError.*remove it from the source"):
        load(tmp_path, train_data_files=str(tmp_path / "list.csv"))


def test_a_dangling_link_in_an_image_folder_is_refused_naming_it_and_the_fix(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    solid(1).save(folder / "1.png")
    (folder / "2.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ValueError, match=r"cannot read .*imgs/2\.png \(FileNotFoundError.*a dangling link.*restore it"):
        load(tmp_path, train_data_dir=str(folder))


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


HUB_CLIENT = r"""
import json, logging, sys, datasets, huggingface_hub
from PIL import Image
from hf_ddpm.data import load_data
from hf_ddpm.data.streaming import StreamingBatches, open_streaming
logging.basicConfig(level=logging.INFO, format="LOG %(name)s: %(message)s")
features = datasets.Features({"image": datasets.Image()})
images = [Image.new("RGB", (8, 8), (i, 100, 200)) for i in range(6)]
datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(sys.argv[1] + "/train.parquet")
api = huggingface_hub.HfApi()
api.create_repo("test-user/pixels", repo_type="dataset")
api.upload_file(path_or_fileobj=sys.argv[1] + "/train.parquet", path_in_repo="data/train-00000-of-00001.parquet",
                repo_id="test-user/pixels", repo_type="dataset")
out = {"cached": []}
for _ in range(2):
    data = load_data(dataset_name="test-user/pixels", resolution=4, eval_size=2, cache_dir=sys.argv[1] + "/cache")
    out["cached"].append([data.train[:, 0, 0, 0].tolist(), data.eval[:, 0, 0, 0].tolist(), data.cache_dir])
make, column, info, _, _ = open_streaming(dataset_name="test-user/pixels", resolution=4, eval_size=0)
stream = StreamingBatches(make, column, batch_size=6, num_processes=1, process_index=0, seed=0, buffer_size=4,
                          num_workers=0, resolution=4, channels=3, skip_corrupt=True, device="cpu")
out["streamed"] = stream.batch(0)[:, 0, 0, 0].tolist()
print("RESULT", json.dumps(out))
"""


def test_a_hub_dataset_id_through_the_local_hub_server_cached_and_streamed(hub, tmp_path):
    env = hub.env(tmp_path, "token") | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", HUB_CLIENT, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line.removeprefix("RESULT "))
    (train, held_out, folder), again = out["cached"]
    assert sorted(train + held_out) == [0, 1, 2, 3, 4, 5] and len(held_out) == 2 and again == [train, held_out, folder]
    assert run.stderr.count("LOG hf_ddpm.data.cache: preprocessing 6 images") == 1  # the second load: from the cache
    assert sorted(out["streamed"]) == [0, 1, 2, 3, 4, 5] and out["streamed"] != [0, 1, 2, 3, 4, 5]  # shuffled
    assert any("datasets/test-user/pixels" in r["path"] for r in hub.requests())  # over HTTP from the Hub server
