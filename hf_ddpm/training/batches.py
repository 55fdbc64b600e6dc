"""A run's data: the probe of a Hub dataset before anything is read, the images (hf_ddpm.data: in memory, memory-
mapped or streamed), and the batches, sharded over processes and addressed by micro-step.

Epoch e is a permutation of the images drawn from a generator seeded with (seed, e), cut into global batches of
B·W images (W processes, the last partial batch dropped so every process steps alike); process r takes rows
[r·B, (r+1)·B) of each. Micro-step m is batch m mod n of epoch m div n (n batches per epoch), so a resumed run
finds its data position by arithmetic, without iterating over the batches it skips. The per-step random draws
(flips, timesteps, noise) come from a generator seeded with (seed, rank, m): they resume exactly too.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..data import default_memory_budget, load_data, random_hflip
from ..data.streaming import StreamedImages, StreamingBatches, open_streaming
from ..images import pixels_to_model
from .config import TrainingConfig

DATA_OPTIONS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "center_crop", "eval_size",
                "seed", "max_train_samples", "cache_dir", "preprocessing_num_workers")  # fmt: skip


def data_files(value: str | None) -> list[str] | None:
    """--train_data_files: comma-separated paths or glob patterns -> the files, in order (a pattern's sorted)."""
    if value is None:
        return None
    files = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        matched = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matched:
            raise ValueError(f"--train_data_files pattern {part!r} matches no file")
        files += matched
    return files


def load_training_data(args: TrainingConfig, accelerator, resolution: int, channels: int | None):
    """The run's images (hf_ddpm.data.load_data). One process per machine preprocesses them into the cache while
    the others wait; then all open the same cache files. With --streaming: a `StreamingData` (nothing is cached)."""
    if args.streaming:
        return _streaming_data(args, resolution, channels)
    if args.max_in_memory_gb is None:
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # set by torchrun
        budget = default_memory_budget(per_machine)
    else:
        budget = int(args.max_in_memory_gb * 1e9)
    with accelerator.local_main_process_first():
        return load_data(
            resolution=resolution,
            channels=channels,
            skip_corrupt=args.on_corrupt_image == "skip",
            train_data_files=data_files(args.train_data_files),
            max_in_memory_bytes=budget,
            **{k: getattr(args, k) for k in DATA_OPTIONS},
        )


@dataclass
class StreamingData:
    """What `load_training_data` gives for --streaming: the stream's maker and the held-out images, in memory."""

    make_stream: object
    column: str
    train: StreamedImages
    eval: torch.Tensor
    source: str


def _streaming_data(args: TrainingConfig, resolution: int, channels: int | None) -> StreamingData:
    opened = open_streaming(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir, train_data_files=data_files(args.train_data_files),
        image_column=args.image_column, resolution=resolution, channels=channels, eval_size=args.eval_size,
        cache_dir=args.cache_dir,
    )  # fmt: skip
    return StreamingData(*opened)


def make_batches(data, args: TrainingConfig, accelerator):
    """The run's batches: from memory or the mapped cache (`ShardedBatches`), or from a stream (`StreamingBatches`,
    whose position the run checkpoints)."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if not isinstance(data, StreamingData):
        return ShardedBatches(data.train.to(device), args.train_batch_size, world, rank, args.seed)
    batches = StreamingBatches(
        data.make_stream, data.column, batch_size=args.train_batch_size, num_processes=world, process_index=rank,
        seed=args.seed, buffer_size=args.shuffle_buffer_size, num_workers=args.dataloader_num_workers,
        resolution=data.train.shape[2], channels=data.train.shape[1], skip_corrupt=args.on_corrupt_image == "skip",
        device=device, num_examples=data.train.num_examples, source=data.source,
        accumulation_steps=args.gradient_accumulation_steps,
    )  # fmt: skip
    return batches


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence mixes them; nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class ShardedBatches:
    """The uint8 batch (B, C, H, W) of this process at any micro-step."""

    def __init__(self, images: torch.Tensor, batch_size: int, num_processes: int, process_index: int, seed: int):
        global_batch = batch_size * num_processes
        if len(images) < global_batch:
            raise ValueError(
                f"the training split has {len(images)} images, fewer than one global batch of {global_batch} "
                f"(--train_batch_size {batch_size} x {num_processes} processes); lower --train_batch_size, use "
                "fewer processes, or hold out fewer images (--eval_size)"
            )
        self.images = images
        self.batch_size, self.num_processes, self.process_index = batch_size, num_processes, process_index
        self.seed = seed
        self.batches_per_epoch = len(images) // global_batch
        self._epoch, self._order = None, None

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a micro-step."""
        return divmod(micro_step, self.batches_per_epoch)

    def indices(self, micro_step: int) -> torch.Tensor:
        epoch, index = self.position(micro_step)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.images), generator=generator)
        start = (index * self.num_processes + self.process_index) * self.batch_size
        return self._order[start : start + self.batch_size]

    def batch(self, micro_step: int) -> torch.Tensor:
        """In memory: a gather on the device; memory-mapped (hf_ddpm.data.MappedImages): a read from the cache."""
        return self.images[self.indices(micro_step).to(self.images.device)]


def step_generator(seed: int, process_index: int, micro_step: int, device) -> torch.Generator:
    """The generator of one micro-step's random draws on one process."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, process_index, micro_step))


def to_model_input(images: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) → float32 in [-1, 1] on the images' device (`pixels_to_model`), randomly flipped if asked."""
    x = pixels_to_model(images)
    return random_hflip(x, generator) if flip else x
