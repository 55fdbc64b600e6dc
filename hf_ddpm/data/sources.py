"""Where training images come from, opened with `datasets` as a dict of splits: a Hub id, a local dataset directory,
a folder written by `save_to_disk`, single data files or a list of them (parquet, arrow, csv/json of image paths,
image files), or an image folder.

Each split carries an identity: a string that changes whenever its content may have, so the preprocessed cache
(cache.py) is keyed by it. For an image folder or a list of files it is the files' resolved absolute paths (the
same folder named `f200` or `./f200/`, or from another working directory, is the same source), sizes and
modification times, from one directory walk: a second start on a million files does not go through `load_dataset`'s
data-file resolution (minutes for 100k files) at all. A file whose content changes while its size and modification
time stay the same is not seen (contents are not hashed: that would read every image at every start). For everything
else it is the dataset's own fingerprint; a csv/json of image paths adds the sizes and modification times of the
files it names (`with_referenced_files`).
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field

EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val")  # test first: the paper's bits/dim are on the test set
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jp2")
_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
# Where images come from: one at most (none: the bundled digits). Training, evaluation and `load_data` ask
# `one_source`, so the rule and its message are the same everywhere.
DATA_SOURCES = ("dataset_name", "train_data_dir", "train_data_files")


def one_source(values: dict, prefix: str = "") -> dict:
    """{name: value} of the DATA_SOURCES given in `values` (not None); two or more are refused, each named with its
    value (`prefix`: "--" where they are flags)."""
    given = {name: values[name] for name in DATA_SOURCES if values.get(name) is not None}
    if len(given) > 1:
        shown = " or ".join(f"{prefix}{name} ({value!r})" for name, value in given.items())
        raise ValueError(f"pass {shown}, not both" if len(given) == 2 else f"pass one of {shown}")
    return given


def data_files(value: str | list[str] | None) -> list[str] | None:
    """--train_data_files: comma-separated paths or glob patterns -> the files, in order (a pattern's sorted); a
    list is taken as it is."""
    if value is None or not isinstance(value, str):
        return value
    files = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        matched = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matched:
            raise ValueError(f"--train_data_files pattern {part!r} matches no file")
        files += matched
    return files


@dataclass
class Source:
    """The opened splits (`datasets.Dataset`, or `IterableDataset` when streaming) and how to name them."""

    splits: dict
    description: str  # for logs and model cards
    identities: dict = field(default_factory=dict)  # split -> content identity (see the module docstring)
    base_dir: str = ""  # relative image paths (a csv of paths) are read from here


def _hash(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _files_identity(paths: list[str]) -> str:
    stats = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as err:  # a dangling link, a file removed or made unreadable since it was listed
            raise ValueError(
                f"cannot read {path} ({type(err).__name__}: {err.strerror or err}): a dangling link, or a file "
                "removed or made unreadable after the source was listed; restore it or remove it from the source"
            ) from None
        stats.append((path, stat.st_size, stat.st_mtime_ns))
    return _hash("files", stats)


def with_referenced_files(identity: str, ds, column: str, base_dir: str) -> str:
    """`identity` of a split whose `column` holds image paths (a csv/json of paths, relative to `base_dir`), extended
    by those files' sizes and modification times: an image changed behind an unchanged list changes the identity."""
    import datasets

    feature = getattr(ds, "features", {}).get(column)
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return identity
    paths = [p if os.path.isabs(p) else os.path.join(base_dir, p) for p in ds[column] if p]
    return _hash(identity, _files_identity(paths))


def _image_files(folder: str) -> list[str]:
    """Every image file under `folder`, sorted, hidden files and folders skipped."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        prefix = os.path.join(root, "")
        found += [prefix + n for n in names if n[:1] != "." and "." + n.rpartition(".")[2].lower() in _EXTENSIONS]
    return sorted(found)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _paths_dataset(paths: list[str]):
    import datasets

    features = datasets.Features({"image": datasets.Image(decode=False)})
    return datasets.Dataset.from_dict({"image": [{"path": p, "bytes": None} for p in paths]}, features=features)


class ImagePaths:
    """A split of image files, as a `datasets.Dataset` with one 'image' column only when it must be preprocessed:
    a cached start does not build it (0.8 s for 100k files)."""

    column_names = ["image"]

    def __init__(self, paths: list[str]):
        import datasets

        self.paths = paths
        self.features = datasets.Features({"image": datasets.Image(decode=False)})

    def __len__(self) -> int:
        return len(self.paths)

    def to_dataset(self):
        return _paths_dataset(self.paths)


def _image_folder(folder: str, streaming: bool) -> Source:
    """A folder of images; subfolders named train and test/validation/... become those splits (as imagefolder)."""
    if not os.path.isdir(folder):
        what = "it is a file" if os.path.exists(folder) else "it does not exist"
        raise ValueError(
            f"train_data_dir {folder!r} is not a directory ({what}): pass the image folder (a share that holds it "
            "must be mounted)"
        )
    given, folder = folder, os.path.realpath(folder)  # the files' paths, so the cache key, are the resolved ones
    with os.scandir(folder) as entries:  # is_dir() from the directory listing: no stat per file
        subdirs = {e.name for e in entries if e.is_dir()}
    named = ["train", *EVAL_SPLIT_NAMES] if "train" in subdirs else []
    lists = {s: _image_files(os.path.join(folder, s)) for s in named if s in subdirs} or {"train": _image_files(folder)}
    if not any(lists.values()):
        count = sum(len(n) for _, _, n in os.walk(folder))
        raise ValueError(
            f"train_data_dir {given!r} holds no image files ({count} files, none with an image extension such "
            f"as .png, .jpg or .webp)"
        )
    if streaming:
        import datasets

        streamed = datasets.load_dataset(
            "imagefolder", data_dir=given, streaming=True
        )  # keyed too: a resume sees changes
        return Source(streamed, given, {s: _files_identity(paths) for s, paths in lists.items() if paths})
    splits = {s: ImagePaths(paths) for s, paths in lists.items() if paths}
    return Source(splits, given, {s: _files_identity(paths) for s, paths in lists.items() if paths})


def _data_files(files: list[str], cache_dir, streaming: bool) -> Source:
    """Single data files or a list of them, all of one kind: parquet, arrow, csv/json(l) (a column of image paths,
    relative to the first file's folder) or image files."""
    import datasets

    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"train_data_files: {missing[:3]} not found (of {len(files)} files)")
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    description = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
    files = [os.path.realpath(f) for f in files]  # the key of their cache: the same files however they are named
    if all(_is_image(f) for f in files):
        if streaming:
            return Source({"train": _paths_dataset(files).to_iterable_dataset()}, description,
                          {"train": _files_identity(files)})  # fmt: skip
        return Source({"train": ImagePaths(files)}, description, {"train": _files_identity(files)})
    builders = {FILE_BUILDERS.get(k) for k in kinds}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"train_data_files must all be of one kind among {sorted(FILE_BUILDERS)} or image files; got "
            f"extensions {sorted(kinds)}"
        )
    (builder,) = builders
    splits = datasets.load_dataset(builder, data_files={"train": files}, cache_dir=cache_dir, streaming=streaming)
    identities = {
        "train": _files_identity(files) if streaming else _hash(splits["train"]._fingerprint, _files_identity(files))
    }
    return Source(dict(splits), description, identities, os.path.dirname(files[0]))


def open_source(dataset_name=None, dataset_config_name=None, train_data_dir=None, train_data_files=None,
                cache_dir=None, streaming=False) -> Source:  # fmt: skip
    """Open the one source given (see the module docstring); `train_data_files` as `data_files` reads it."""
    import datasets

    one_source({"dataset_name": dataset_name, "train_data_dir": train_data_dir, "train_data_files": train_data_files})
    if train_data_dir is not None:
        return _image_folder(train_data_dir, streaming)
    if train_data_files is not None:
        files = list(data_files(train_data_files))
        if not files:
            raise ValueError("train_data_files is empty; pass one or more data files")
        return _data_files(files, cache_dir, streaming)
    if os.path.isfile(dataset_name):  # a single data file given as the dataset
        return _data_files([dataset_name], cache_dir, streaming)
    saved = os.path.isdir(dataset_name) and (
        os.path.isfile(os.path.join(dataset_name, "dataset_dict.json"))
        or os.path.isfile(os.path.join(dataset_name, "state.json"))
    )
    if saved:  # written by save_to_disk: load_dataset refuses it, load_from_disk maps it
        loaded = datasets.load_from_disk(dataset_name)
        splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
        if streaming:
            splits = {
                name: ds.to_iterable_dataset(num_shards=max(1, ds.num_rows // 10000)) for name, ds in splits.items()
            }
            return Source(splits, dataset_name)
        return Source(splits, dataset_name, {name: ds._fingerprint for name, ds in splits.items()})
    loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, streaming=streaming)
    splits = {"train": loaded} if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)) else dict(loaded)
    identities = {} if streaming else {name: ds._fingerprint for name, ds in splits.items()}
    return Source(splits, dataset_name, identities)


def train_and_eval_split(splits: dict) -> tuple[str, str | None]:
    """The training split ('train', else the first) and the dataset's own held-out split, if any."""
    train = "train" if "train" in splits else next(iter(splits))
    return train, next((s for s in EVAL_SPLIT_NAMES if s in splits and s != train), None)
