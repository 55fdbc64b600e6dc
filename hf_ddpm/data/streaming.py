"""--streaming: batches from a `datasets` IterableDataset (a Hub dataset, data files or an image folder read with
streaming=True), for data too large to copy, with a checkpointable position that resumes at exactly the next batch.

Each process reads its part of the stream (`datasets.distributed.split_dataset_by_node`: whole shards when the
number of shards divides by the number of processes, else every W-th example), undecoded. A shuffle buffer of
`buffer_size` encoded examples, drawn from with a seeded generator, shuffles it; its content, the generator and the
stream's own `state_dict()` are the position. `state_dict()` returns the position after the last batch handed out
(gathered from every process), so a checkpoint resumes exactly there, without re-reading what was consumed and
without losing the buffer (datasets' own shuffle buffer is refilled on resume, which loses examples: so we keep
ours, whose encoded examples are saved in the checkpoint). A resume on local files deleted or added since
(--allow_data_change) keeps what of the position still applies: stream_change.py. Images are decoded in
`num_workers` worker processes (0: in the training process), one batch ahead. An epoch is one pass over the
process's part of the stream; the next one starts when it ends (its examples in the buffer are still drawn first),
so processes need not see equal counts. A corrupt image is skipped (the next example takes its place) with a
warning, or stops the run; the warnings are rate-limited (the first few by name, then a count at most every
WARNING_INTERVAL seconds).

A source that cannot be read is not a corrupt image: a file of the stream that is missing or unreadable (a folder
moved away, an unmounted share, revoked access), a stream that raises while it is read, a pass that yields no example,
MAX_CONSECUTIVE_FAILURES undecodable examples in a row, or as many in a row as a whole pass holds, raise
`StreamSourceError` naming the source: the training loop stops on it as on a preemption, with a checkpoint of its last
optimizer step (`state_dict()` then holds the position of that step's end, so the resume reads the same batches).
Decoding workers (stream_decode.py) die with the process that started them (a parent-death signal, else a watchdog
thread), so a trainer killed alone (the kernel's OOM killer) leaves no orphans holding the launcher's output pipes.

The held-out images are the first `eval_count` examples of the dataset's own test/validation split (the train
stream has no held-out part: its examples could not be kept out of training without reading it all first).
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import multiprocessing
import os
import time
from typing import NamedTuple

import numpy as np
import torch

from . import stream_change
from .decode import decode_image, read_bytes
from .stream_decode import Failure, decode_example, init_worker

logger = logging.getLogger(__name__)
RESUME_HINT = "Restore the source, then continue from the last checkpoint with --resume_from_checkpoint latest"
UNKNOWN_LENGTH = 2**62
DEFAULT_EVAL_IMAGES = 1000  # held out from the test split when --eval_size is a fraction (its length is unknown)
# Undecodable examples in a row that stop the run: a source that returns garbage (a share serving empty files, the
# wrong column) ends in seconds instead of skipping forever; corrupt files scattered in good data never come close.
MAX_CONSECUTIVE_FAILURES = 100
FIRST_WARNINGS = 3  # corrupt images named one by one; after them, one line with the count ...
WARNING_INTERVAL = 60.0  # ... at most every this many seconds


class StreamSourceError(RuntimeError):
    """The stream's source cannot be read (vanished, unreadable, or nothing in it decodes). The training loop
    catches it at a batch fetch and stops as on a preemption: a checkpoint of its last optimizer step, then this
    message and the resume command. `source`: the stream's description; `path`: the file that failed, if one did."""

    def __init__(self, message: str, source: str | None = None, path: str | None = None):
        super().__init__(message)
        self.source, self.path = source, path


class _SkipLog:
    """Warnings for skipped corrupt images: the first FIRST_WARNINGS by name, then one line with the count at most
    every WARNING_INTERVAL seconds (a stream of bad files must not flood the log)."""

    def __init__(self):
        self.total, self.unsaid, self.last_said = 0, 0, 0.0

    def skipped(self, name: str, why: str) -> None:
        self.total += 1
        now = time.monotonic()
        if self.total <= FIRST_WARNINGS:
            more = "; further ones are counted, not named" if self.total == FIRST_WARNINGS else ""
            logger.warning("skipped corrupt image %s of the stream (%s)%s", name, why, more)
            self.last_said = now
        elif now - self.last_said >= WARNING_INTERVAL:
            logger.warning(
                "skipped %d more corrupt images of the stream (%d in all; the latest %s: %s)",
                self.unsaid + 1, self.total, name, why,
            )  # fmt: skip
            self.unsaid, self.last_said = 0, now
        else:
            self.unsaid += 1


def prepare_stream(stream, column: str):
    """The stream's image column only, left encoded (decoded later, in the workers)."""
    import datasets

    return stream.select_columns([column]).cast_column(column, datasets.Image(decode=False))


def first_images(stream, column: str, count: int, resolution: int, channels: int) -> torch.Tensor:
    """The first `count` decodable images of a stream as uint8 (count', C, R, R)."""
    out = []
    for example in prepare_stream(stream, column):
        if len(out) == count:
            break
        arr = decode_example(example[column], resolution, channels)
        if isinstance(arr, np.ndarray):
            out.append(arr)
    return (
        torch.from_numpy(np.stack(out))
        if out
        else torch.zeros((0, channels, resolution, resolution), dtype=torch.uint8)
    )


class StreamingBatches:
    """The uint8 batch (B, C, R, R) of this process at each micro-step, in order, from a stream; checkpointable."""

    def __init__(self, make_stream, column, *, batch_size, num_processes, process_index, seed, buffer_size,
                 num_workers, resolution, channels, skip_corrupt, device, num_examples=None, source=None,
                 accumulation_steps=1, key=None):  # fmt: skip
        self._make_stream, self.column = make_stream, column  # make_stream(): a fresh stream of the whole split
        self.source = source  # for messages: the folder, files or dataset id
        self.key = key  # the local files' identity (StreamedImages.key), saved with the position: a resume compares it
        self._named = f" {source}" if source else ""
        # the position kept for a checkpoint when the source fails is the end of the last optimizer step
        self.accumulation_steps = accumulation_steps
        self.batch_size, self.num_processes, self.process_index = batch_size, num_processes, process_index
        self.seed, self.buffer_size = seed, buffer_size
        self.resolution, self.channels, self.skip_corrupt, self.device = resolution, channels, skip_corrupt, device
        known = num_examples // (batch_size * num_processes) if num_examples else 0
        self.batches_per_epoch = max(1, known) if known else 2**62  # unknown length: epochs are not counted
        self.images = range(num_examples or 0)  # the length, when the dataset states it
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads and a process group
        self._pool, self._workers = None, num_workers
        if num_workers:  # the workers leave the signals of preemption (SIGINT, SIGTERM, SIGUSR1) to the trainer
            self._pool = concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=ctx, initializer=init_worker, initargs=(os.getpid(),)
            )
        self._restore({"epoch": 0, "stream": None, "buffer": [], "rng": None, "exhausted": False, "micro_step": 0,
                       "key": key, "read": None})  # fmt: skip

    def _restore(self, state: dict) -> None:
        self._epoch, self._buffer, self._exhausted = state["epoch"], list(state["buffer"]), state["exhausted"]
        self._read = state.get("read")  # the path of the last local file read from the stream in this epoch
        self._rng = np.random.default_rng([self.seed, self.process_index, 2])
        if state["rng"] is not None:
            self._rng.bit_generator.state = state["rng"]
        self._open(state["stream"])
        self._next_step = state["micro_step"]
        self._handed_out = state  # the position after the last batch handed out
        self._at_boundary = state  # ... and after the last one of an optimizer step
        self._pending = None  # (micro_step, future or arrays, state after it)
        self._failed = None  # a StreamSourceError met while reading ahead, raised when its batch is asked for
        self._in_a_row = 0  # undecodable examples since the last decoded one
        self._taken, self._pass_size = 0, None  # examples of this pass so far; of the last whole pass
        self._whole_pass = state["stream"] is None  # this pass started at its beginning: its count is its size
        self._skips = getattr(self, "_skips", None) or _SkipLog()

    def _open(self, stream_state) -> None:
        from datasets.distributed import split_dataset_by_node

        stream = prepare_stream(self._make_stream(), self.column)
        self._stream = split_dataset_by_node(stream, rank=self.process_index, world_size=self.num_processes)
        if stream_state is not None:
            self._stream.load_state_dict(stream_state)
        self._iterator = iter(self._stream)

    def _take(self):
        """The next encoded example: a random one of the buffer, refilled from the stream (a new epoch at its end)."""
        fresh = False
        while True:
            while not self._exhausted and len(self._buffer) < self.buffer_size:
                try:
                    self._buffer.append(next(self._iterator)[self.column])
                    self._read = stream_change.last_file_read(self._buffer[-1])
                    self._taken += 1
                except StopIteration:
                    self._exhausted = True
                    if self._whole_pass:
                        self._pass_size = self._taken
                    self._taken, self._whole_pass = 0, True
                except Exception as err:  # the reader of a file or connection: the source, not an image
                    raise StreamSourceError(
                        f"the stream{self._named} failed while it was read ({type(err).__name__}: {err}): the "
                        f"source vanished or cannot be read (a moved folder, an unmounted share, a lost connection)."
                        f" {RESUME_HINT}", self.source,
                    ) from err  # fmt: skip
            if self._buffer:
                i = int(self._rng.integers(len(self._buffer)))
                self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
                return self._buffer.pop()
            if fresh:
                raise StreamSourceError(
                    f"process {self.process_index}'s part of the stream{self._named} holds no example: the source "
                    f"is empty or vanished. {RESUME_HINT}", self.source,
                )  # fmt: skip
            self._epoch, self._exhausted, self._read, fresh = self._epoch + 1, False, None, True
            self._open(None)

    def _failed_example(self, value, failure: Failure) -> None:
        """Skip an example that gave no image (with a rate-limited warning), or raise: StreamSourceError for an
        unreadable file or a run of failures no corrupt file explains, ValueError with --on_corrupt_image stop."""
        name = value.get("path") or "an image"
        if failure.unreadable:
            raise StreamSourceError(
                f"cannot read {name} of the stream{self._named} ({failure.message}): the source vanished or is "
                f"unreadable (a moved folder, an unmounted share, changed permissions), which is not a corrupt "
                f"image. {RESUME_HINT}", self.source, name,
            )  # fmt: skip
        if not self.skip_corrupt:
            raise ValueError(f"cannot decode image {name} of the stream ({failure.message}; --on_corrupt_image "
                             "skip skips it)")  # fmt: skip
        self._in_a_row += 1
        limit = min(MAX_CONSECUTIVE_FAILURES, self._pass_size or MAX_CONSECUTIVE_FAILURES)
        if self._in_a_row >= limit:
            what = "a whole pass over it" if limit == self._pass_size else f"{limit} in a row"
            raise StreamSourceError(
                f"no image of the stream{self._named} decodes: {self._in_a_row} examples failed in a row ({what}; "
                f"the latest {name}: {failure.message}). The source is not images, or it is damaged: check it. "
                f"{RESUME_HINT}", self.source, name,
            )  # fmt: skip
        self._skips.skipped(name, failure.message)

    def _state(self, micro_step: int) -> dict:
        return {"epoch": self._epoch, "stream": copy.deepcopy(self._stream.state_dict()),
                "buffer": list(self._buffer), "rng": self._rng.bit_generator.state, "exhausted": self._exhausted,
                "micro_step": micro_step, "key": self.key, "read": self._read}  # fmt: skip

    def _submit(self, micro_step: int):
        values = [self._take() for _ in range(self.batch_size)]
        args = (self.resolution, self.channels)
        if self._pool is None:
            decoded = [decode_example(v, *args) for v in values]
        else:
            chunk = -(-len(values) // self._workers)  # one message per worker and batch, not per image
            decoded = self._pool.map(decode_example, values, *([a] * len(values) for a in args), chunksize=chunk)
        self._pending = (micro_step, decoded, values, self._state(micro_step + 1))

    def batch(self, micro_step: int) -> torch.Tensor:
        if micro_step != self._next_step:
            raise ValueError(
                f"streaming batches come in order: micro-step {micro_step} asked, {self._next_step} is next "
                "(resume from a checkpoint of this run, with the same --train_batch_size and processes)"
            )
        try:
            if self._failed is not None:
                raise self._failed
            if self._pending is None or self._pending[0] != micro_step:
                self._submit(micro_step)
            _, decoded, values, state = self._pending
            arrays = list(decoded)
            for i, arr in enumerate(arrays):
                while not isinstance(arr, np.ndarray):  # a corrupt image: the next example takes its place
                    self._failed_example(values[i], arr)
                    values[i] = self._take()
                    arr = decode_example(values[i], self.resolution, self.channels)
                    state = self._state(micro_step + 1)
                self._in_a_row = 0
                arrays[i] = arr
        except StreamSourceError:
            self._handed_out = self._at_boundary  # a checkpoint now holds the end of the last optimizer step
            raise
        self._handed_out, self._next_step = state, micro_step + 1
        if (micro_step + 1) % self.accumulation_steps == 0:
            self._at_boundary = state
        try:
            self._submit(micro_step + 1)  # decoded in the workers while this batch trains
        except StreamSourceError as err:  # this batch is whole: train on it, and stop at the next
            self._failed, self._pending = err, None
        return torch.from_numpy(np.stack(arrays)).to(self.device)

    def rewind_to_last_step(self) -> None:
        """Make the position a checkpoint holds the end of the last whole optimizer step: a run that stops inside
        one (another process's source failed) drops that step, and its resume reads the step's batches again."""
        self._handed_out = self._at_boundary

    def state_dict(self) -> dict:
        """Every process's position after its last batch handed out (a collective call under DDP)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, self._handed_out)
        else:
            states = [self._handed_out]
        return {"processes": states}

    def load_state_dict(self, state: dict) -> None:
        """Every process's position as `state_dict` gave it; on local files deleted or added since (a resume that
        --allow_data_change lets go on), what of it still applies (stream_change.py), said in one warning."""
        import torch.distributed as dist

        states = state["processes"]
        if len(states) != self.num_processes:
            raise ValueError(
                f"this streaming checkpoint was written by {len(states)} processes; resume it with as many "
                f"(now {self.num_processes}): each holds its own part of the stream"
            )
        mine, note = states[self.process_index], None
        gone = set(stream_change.vanished(mine["buffer"]) if self.key is not None else ())
        if self.key is not None and (mine.get("key", self.key) != self.key or gone):  # the files changed since
            self._restore({**mine, "buffer": [v for v in mine["buffer"] if v.get("path") not in gone], "stream": None})
            self._iterator, how = stream_change.place(self._stream, self.column, mine)
            self._whole_pass, note = False, (sorted(gone), how)
            self._handed_out = self._at_boundary = self._state(self._next_step)
        else:
            self._restore(mine)
        notes = [note]
        if dist.is_available() and dist.is_initialized():
            notes = [None] * dist.get_world_size()
            dist.all_gather_object(notes, note)
        said = stream_change.warning(notes, self.source)
        if said and self.process_index == 0:
            logger.warning(said)


class StreamedImages:
    """Stands for a stream's training images where in-memory ones would be: `.shape` (N, C, R, R) and `len`; N is
    the dataset's stated size, or UNKNOWN_LENGTH (no limit on the default batch size) when it states none. `key`:
    the identity of the local files they come from (sources.py: paths, sizes, modification times), which a resume
    compares; None for a Hub stream."""

    def __init__(self, num_examples: int | None, channels: int, resolution: int, key: str | None = None):
        self.num_examples, self.key = num_examples, key
        self.shape = torch.Size((num_examples or UNKNOWN_LENGTH, channels, resolution, resolution))

    def __len__(self) -> int:
        return self.shape[0]


class StreamingData(NamedTuple):
    """A streamed dataset, as `open_streaming` opens it: the stream's maker, its image column, the stand-in for its
    training images, the held-out images (uint8, in memory) and the source's description."""

    make_stream: object
    column: str
    train: StreamedImages
    eval: torch.Tensor
    source: str


def open_streaming(dataset_name=None, dataset_config_name=None, train_data_dir=None, train_data_files=None,
                   image_column=None, resolution=16, channels=None, eval_size=0.1,
                   cache_dir=None) -> StreamingData:  # fmt: skip
    """Open a dataset to stream it (nothing is cached); its held-out images are read now."""
    from .decode import check_resolution, detect_image_column
    from .sources import open_source, train_and_eval_split
    from .split import check_eval_size

    check_resolution(resolution)
    check_eval_size(eval_size)
    if dataset_name is None and train_data_dir is None and train_data_files is None:
        raise ValueError("--streaming needs --dataset_name, --train_data_dir or --train_data_files (the digits are "
                         "in memory already)")  # fmt: skip
    kw = {"dataset_name": dataset_name, "dataset_config_name": dataset_config_name, "train_data_dir": train_data_dir,
          "train_data_files": train_data_files, "cache_dir": cache_dir, "streaming": True}  # fmt: skip
    src = open_source(**kw)
    train_split, eval_split = train_and_eval_split(src.splits)
    train = src.splits[train_split]
    if train.column_names is None:  # a stream that states no features: look at its first example
        train = train._resolve_features()
    column = detect_image_column(train, image_column)
    try:
        first = next(iter(prepare_stream(train, column)))[column]
    except StopIteration:
        raise ValueError(f"the stream {src.description} holds no example") from None
    if channels is None:  # 1 for a grayscale first image, else 3
        try:
            value = first if first.get("bytes") is not None else {**first, "bytes": read_bytes(first["path"])}
            channels = decode_image(value, resolution, None, None)[0].shape[0]
        except Exception as err:  # the reader's or Pillow's error, named with the file
            raise ValueError(
                f"the first image of the stream {src.description} ({first.get('path') or 'its first example'}) does "
                f"not decode ({type(err).__name__}: {err}): its channel count cannot be learned from it; check the "
                "source and --image_column"
            ) from None
        if channels == 1:  # the stream is not read ahead (a map-style source is: 3 channels if any image has colour)
            logger.warning("streaming %s: its first image is grayscale, so the model takes 1 channel and colour images "
                           "later in the stream are converted to grayscale; to train in colour, pass a --model_config "
                           "whose in_channels is 3", src.description)  # fmt: skip
    count = eval_size if isinstance(eval_size, int) else (DEFAULT_EVAL_IMAGES if eval_size > 0 else 0)
    if eval_split is not None and count:
        held_out = first_images(src.splits[eval_split], column, count, resolution, channels)
        logger.info("held-out images: the first %d of the %r split of %s", len(held_out), eval_split, src.description)
    else:
        held_out = torch.zeros((0, channels, resolution, resolution), dtype=torch.uint8)
        if count:
            logger.warning("streaming %s: no test/validation split, so no held-out images", src.description)
    info = getattr(train, "info", None)
    splits = getattr(info, "splits", None) or {}
    num_examples = splits[train_split].num_examples if train_split in splits else None

    def make_stream():  # each iteration of it starts at its beginning; the position lives in the node's split
        return train

    images = StreamedImages(num_examples, channels, resolution, src.identities.get(train_split))
    return StreamingData(make_stream, column, images, held_out, src.description)
