"""A streaming resume on local files that were deleted or added since its checkpoint (the resume that
--allow_data_change lets go on): what of the checkpoint's position still applies, and the warning that says it.

The position (streaming.py) is the shuffle buffer, whose examples of local files are their paths, and the datasets
stream's own state, a count of shards and examples into the file list as it was. That count no longer names the same
place in a changed list (a file deleted before it makes the stream skip one never read; one added, read one twice), and
a file of the buffer that is gone cannot be decoded. So, on each process:

- an example of the buffer whose file is gone is dropped;
- the stream goes on after the last file it read (saved with the position) in its part of the changed list: right
  after it where it is still listed; where it is gone too and the part is listed in path order (an image folder's
  always is), after the files that sort before it. Files added before that place are first read in the next epoch;
- where the last file is not known (a checkpoint written before it was saved, or examples that carry their bytes, as
  parquet files' do), datasets' own count is applied where it can be (as many images as were added or removed
  before it are read again or skipped in this epoch);
- otherwise (its shards changed, or its files are not listed in path order) the stream restarts its current epoch from
  the beginning of the changed data.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os

logger = logging.getLogger(__name__)
SHOWN = 3  # dropped files named in the warning; the others counted


def is_local_file(value: dict) -> bool:
    """Whether a stream's encoded example is a local file named by its path (its bytes are read when decoded)."""
    path = value.get("path")
    return value.get("bytes") is None and bool(path) and "://" not in path


def last_file_read(value: dict) -> str | None:
    """What a resume on changed files looks for to place the stream: the path of a local file, else nothing."""
    return value["path"] if is_local_file(value) else None


def vanished(buffer: list) -> list[str]:
    """The paths of the buffer's local files that no longer exist."""
    return [v["path"] for v in buffer if is_local_file(v) and not os.path.exists(v["path"])]


def _applies(stream, saved: dict) -> str | None:
    """Load datasets' saved state into `stream`; None where it applies (the first example after it is read, or
    none is left), else why not, with `stream` put back at its beginning. Its state is loaded lazily, when it is
    iterated: a state of another structure (the shards changed) raises then."""
    stream.load_state_dict(saved)
    probe = iter(stream)
    try:
        next(probe, None)
        return None
    except Exception as err:
        stream.load_state_dict(None)
        return f"its shards changed ({type(err).__name__}: {err})"
    finally:
        probe.close()


def _advance(iterator, count: int):
    collections.deque(itertools.islice(iterator, count), maxlen=0)
    return iterator


def place(stream, column: str, state: dict):
    """(iterator of `stream` at the place where `state`, a position saved before the files changed, goes on; what
    that place is, for the warning). `stream`: this process's part of the changed data, not iterated yet."""
    read, saved = state.get("read"), state["stream"]
    later = "; files added before that place are first read in the next epoch"
    if state["exhausted"]:  # its position is not read again: the buffer is drawn, then a new epoch begins
        return iter(stream), "had read its whole epoch: the next one reads the changed data"
    if saved is None:
        return iter(stream), "starts its epoch at the beginning of the changed data"
    if read is not None:
        iterator, before, ordered, last = iter(stream), 0, True, None
        for example in iterator:  # undecoded: paths only
            path = example[column].get("path")
            if path == read:
                return iterator, f"goes on after the last file it read, {read}{later}"
            ordered, last = ordered and path is not None and (last is None or last <= path), path
            before += path is not None and path < read
        if ordered:
            how = f"goes on after the files that sort before the last file it read, {read} (gone too){later}"
            return _advance(iter(stream), before), how
        why = f"the last file it read, {read}, is gone and the files are not listed in path order"
    elif (why := _applies(stream, saved)) is None:
        return iter(stream), (
            "goes on at datasets' saved count of examples (the last file it read is not known): as many images as "
            "were added or removed before that place are read again or skipped in this epoch"
        )
    return iter(stream), (
        f"restarts its current epoch from the beginning of the changed data ({why}; images of this epoch already "
        "trained on are read again)"
    )


def warning(notes: list, source: str | None) -> str | None:
    """The one warning (main process) from each process's note (None where nothing changed for it): (dropped paths,
    what its stream does)."""
    notes = [(i, n) for i, n in enumerate(notes) if n is not None]
    if not notes:
        return None
    dropped = [path for _, (gone, _) in notes for path in gone]
    named = ", ".join(dropped[:SHOWN]) + (f" and {len(dropped) - SHOWN} more" if len(dropped) > SHOWN else "")
    buffer = (
        f"{len(dropped)} file(s) of the checkpoint's shuffle buffer are gone and dropped ({named})"
        if dropped
        else "no file of the checkpoint's shuffle buffer is gone"
    )
    several = len(notes) > 1
    ways = "; ".join(f"{f'process {i} ' if several else ''}{how}" for i, (_, how) in notes)
    return (
        f"--allow_data_change: the stream{f' of {source}' if source else ''} goes on with its files as they are now: "
        f"{buffer}; the stream {ways}"
    )
