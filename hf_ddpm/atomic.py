"""Atomic writes: a file or folder carries its final name only once it is complete, so a process killed at any
moment leaves the previous version or the new one, plus at most a staging sibling: never a half-written file.

    staging_name(path)             its staging sibling, `path.tmp` (hidden: `.name.tmp`; unique: `path.tmp-<pid>`)
    is_staging(path)               whether a name is one of those (a clean-up can tell them from complete ones)
    write_atomically(path, write)  write(f) into the staging sibling, fsync, os.replace onto `path`
    replace_dir(staged, final)     rename a complete folder onto `final`, replacing an older one of that name
    remove_dir(path)               rename to the staging name, then delete: never half-deleted under its name
    swap_in(stage, directory, last)  move a complete set of files into a folder, the one readers open first last
    remove_path(path)              delete a file or a folder, whichever it is (what a killed run left half-written)
    describe(error)                a failed write in a few words, for the message that names what was kept

Users: training's checkpoints (hf_ddpm/training/checkpoints.py), its samples and summary (training/loop.py) and
output-directory manifest (training/output_dir.py), the pipeline save (hf_ddpm/hub.py save_hub_pipeline), the
evaluation's metrics, shards and statistics (hf_ddpm/evaluation/), the data cache's manifest (hf_ddpm/data/cache.py).
Renames are atomic within one file system only: the staging sibling always sits beside its target.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = [
    "TMP_SUFFIX",
    "describe",
    "is_staging",
    "remove_dir",
    "remove_path",
    "replace_dir",
    "staging_name",
    "swap_in",
    "write_atomically",
]

TMP_SUFFIX = ".tmp"


def staging_name(path: str | os.PathLike, *, hidden: bool = False, unique: bool = False) -> str:
    """The sibling `path` is written under before it is renamed to `path`: `path.tmp`; hidden: `.name.tmp` (a
    folder inside the directory it is swapped into); unique: `path.tmp-<pid>` (processes that may write the same
    file at once, each through its own)."""
    head, name = os.path.split(os.fspath(path))
    name = f"{'.' if hidden else ''}{name}{TMP_SUFFIX}{f'-{os.getpid()}' if unique else ''}"
    return os.path.join(head, name)


def is_staging(path: str | os.PathLike) -> bool:
    """Whether `path` is a staging name of this scheme (`*.tmp`, `*.tmp-<pid>`)."""
    name = os.path.basename(os.fspath(path).rstrip("/" + os.sep))
    suffix = name.rpartition(TMP_SUFFIX)
    return bool(suffix[1]) and (suffix[2] == "" or (suffix[2][:1] == "-" and suffix[2][1:].isdigit()))


def write_atomically(path: str | os.PathLike, write, mode: str = "w", *, unique: bool = False) -> None:
    """Call `write(f)` on the staging sibling of `path` opened with `mode`, flush it to disk, then rename it onto
    `path`: readers see the old file or the new one, whole. On an error the staging file is removed."""
    tmp = staging_name(path, unique=unique)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the complete folder `staged` to `final`. An existing `final` (an earlier attempt at the same thing)
    is first renamed to its staging name `final.stale.tmp` and deleted after, so `final` is always whole."""
    staged, final = os.fspath(staged), os.fspath(final)
    if os.path.exists(final):
        stale = staging_name(final + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(staged, final)
        shutil.rmtree(stale)
    else:
        os.rename(staged, final)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete the folder `path` through its staging name: a kill while deleting leaves `path.tmp`, which no
    reader takes for complete, never a half-deleted folder under its name."""
    tmp = staging_name(path)
    os.rename(path, tmp)
    shutil.rmtree(tmp)


def remove_path(path: str | os.PathLike) -> None:
    """Delete the file or folder `path` (a link is removed, never followed)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def swap_in(stage: Path, directory: Path, last: str, *, parked: Path, also_replaces=()) -> None:
    """Move every entry of the complete folder `stage` into `directory`, with renames: `last` (the file every reader
    opens first, e.g. model_index.json) is removed first and renamed in last, so a kill at any moment leaves the
    old set, the new one, or a directory without `last` that no reader accepts: never a mix. The entries replaced
    (those of the new names, and `also_replaces`) wait in the new staging folder `parked` until the end."""
    (directory / last).unlink(missing_ok=True)  # from here the directory holds no complete set ...
    parked.mkdir()
    new = [p.name for p in stage.iterdir() if p.name != last]
    for name in sorted(set(new) | set(also_replaces)):
        if (directory / name).exists():
            (directory / name).rename(parked / name)
    for name in new:
        (stage / name).rename(directory / name)
    (stage / last).replace(directory / last)  # ... and from here the new one
    shutil.rmtree(stage)
    shutil.rmtree(parked)


def describe(error: BaseException) -> str:
    """An error in a few words for a message: an OSError's reason and path, else its type and text (a full disk
    makes torch.save raise RuntimeError and safetensors SafetensorError, not OSError)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f": {error.filename}" if error.filename else "")
    return f"{type(error).__name__}: {error}"
