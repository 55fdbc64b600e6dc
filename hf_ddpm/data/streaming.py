"""--streaming: batches from a `datasets` IterableDataset (a Hub dataset, data files or an image folder read with
streaming=True), for data too large to copy, with a checkpointable position that resumes at exactly the next batch.

Each process reads its part of the stream (`datasets.distributed.split_dataset_by_node`: whole shards when the
number of shards divides by the number of processes, else every W-th example), undecoded. A shuffle buffer of
`buffer_size` encoded examples, drawn from with a seeded generator, shuffles it; its content, the generator and the
stream's own `state_dict()` are the position. `state_dict()` returns the position after the last batch handed out
(gathered from every process), so a checkpoint resumes exactly there, without re-reading what was consumed and
without losing the buffer (datasets' own shuffle buffer is refilled on resume, which loses examples: so we keep
ours, whose encoded examples are saved in the checkpoint). Images are decoded in `num_workers` worker processes
(0: in the training process), one batch ahead. An epoch is one pass over the process's part of the stream; the
next one starts when it ends (its examples in the buffer are still drawn first), so processes need not see equal
counts. A corrupt image is skipped (the next example takes its place) with a warning, or stops the run.

The held-out images are the first `eval_count` examples of the dataset's own test/validation split (the train
stream has no held-out part: its examples could not be kept out of training without reading it all first).
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import multiprocessing
import signal

import numpy as np
import torch

from .images import decode_image

logger = logging.getLogger(__name__)
UNKNOWN_LENGTH = 2**62
DEFAULT_EVAL_IMAGES = 1000  # held out from the test split when --eval_size is a fraction (its length is unknown)


def _ignore_signals() -> None:
    """A decoding worker ignores the signals the training process checkpoints on (a Ctrl-C reaches the whole
    process group): a worker killed by one would break the pool before the trainer's checkpoint."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def decode_example(value, resolution: int, channels: int) -> np.ndarray | None:
    """(C, R, R) uint8 for one encoded image, or None when it does not decode."""
    try:
        arr, _ = decode_image(value, resolution, channels, None)
    except Exception:  # Pillow's plugins raise OSError, ValueError, SyntaxError, struct.error, ...
        return None
    return np.broadcast_to(arr, (channels, resolution, resolution))


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
        if arr is not None:
            out.append(arr)
    return (
        torch.from_numpy(np.stack(out))
        if out
        else torch.zeros((0, channels, resolution, resolution), dtype=torch.uint8)
    )


class StreamingBatches:
    """The uint8 batch (B, C, R, R) of this process at each micro-step, in order, from a stream; checkpointable."""

    def __init__(self, make_stream, column, *, batch_size, num_processes, process_index, seed, buffer_size,
                 num_workers, resolution, channels, skip_corrupt, device, num_examples=None):  # fmt: skip
        self._make_stream, self.column = make_stream, column  # make_stream(): a fresh stream of the whole split
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
                num_workers, mp_context=ctx, initializer=_ignore_signals
            )
        self._restore({"epoch": 0, "stream": None, "buffer": [], "rng": None, "exhausted": False, "micro_step": 0})

    def _restore(self, state: dict) -> None:
        self._epoch, self._buffer, self._exhausted = state["epoch"], list(state["buffer"]), state["exhausted"]
        self._rng = np.random.default_rng([self.seed, self.process_index, 2])
        if state["rng"] is not None:
            self._rng.bit_generator.state = state["rng"]
        self._open(state["stream"])
        self._next_step = state["micro_step"]
        self._handed_out = state  # the position after the last batch handed out
        self._pending = None  # (micro_step, future or arrays, state after it)

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
                except StopIteration:
                    self._exhausted = True
            if self._buffer:
                i = int(self._rng.integers(len(self._buffer)))
                self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
                return self._buffer.pop()
            if fresh:
                raise ValueError(f"process {self.process_index}'s part of the stream holds no example")
            self._epoch, self._exhausted, fresh = self._epoch + 1, False, True
            self._open(None)

    def _state(self, micro_step: int) -> dict:
        return {"epoch": self._epoch, "stream": copy.deepcopy(self._stream.state_dict()),
                "buffer": list(self._buffer), "rng": self._rng.bit_generator.state, "exhausted": self._exhausted,
                "micro_step": micro_step}  # fmt: skip

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
        if self._pending is None or self._pending[0] != micro_step:
            self._submit(micro_step)
        _, decoded, values, state = self._pending
        arrays = list(decoded)
        for i, arr in enumerate(arrays):
            while arr is None:  # a corrupt image: the next example takes its place
                name = values[i].get("path") or "an image"
                if not self.skip_corrupt:
                    raise ValueError(f"cannot decode image {name} of the stream (--on_corrupt_image skip skips it)")
                logger.warning("skipped corrupt image %s of the stream", name)
                values[i] = self._take()
                arr = decode_example(values[i], self.resolution, self.channels)
                state = self._state(micro_step + 1)
            arrays[i] = arr
        self._handed_out, self._next_step = state, micro_step + 1
        self._submit(micro_step + 1)  # decoded in the workers while this batch trains
        return torch.from_numpy(np.stack(arrays)).to(self.device)

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
        states = state["processes"]
        if len(states) != self.num_processes:
            raise ValueError(
                f"this streaming checkpoint was written by {len(states)} processes; resume it with as many "
                f"(now {self.num_processes}): each holds its own part of the stream"
            )
        self._restore(states[self.process_index])


class StreamedImages:
    """Stands for a stream's training images where in-memory ones would be: `.shape` (N, C, R, R) and `len`; N is
    the dataset's stated size, or UNKNOWN_LENGTH (no limit on the default batch size) when it states none."""

    def __init__(self, num_examples: int | None, channels: int, resolution: int):
        self.num_examples = num_examples
        self.shape = torch.Size((num_examples or UNKNOWN_LENGTH, channels, resolution, resolution))

    def __len__(self) -> int:
        return self.shape[0]


def open_streaming(dataset_name=None, dataset_config_name=None, train_data_dir=None, train_data_files=None,
                   image_column=None, resolution=16, channels=None, eval_size=0.1, cache_dir=None):  # fmt: skip
    """(make_stream, column, StreamedImages, held-out uint8 tensor, source description) of a streamed dataset."""
    from .images import check_eval_size, check_resolution, detect_image_column
    from .sources import open_source, train_and_eval_split

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
    first = next(iter(prepare_stream(train, column)))[column]
    if channels is None:  # 1 for a grayscale first image, else 3
        channels = decode_image(first, resolution, None, None)[0].shape[0]
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

    return make_stream, column, StreamedImages(num_examples, channels, resolution), held_out, src.description
