"""A training run's batches, sharded over processes and addressed by micro-step: from its images in memory or the
memory-mapped cache (`ShardedBatches`, below), or from a stream (`StreamingBatches`, streaming.py).

Epoch e is a permutation of the images drawn from a generator seeded with (seed, e), cut into global batches of
B·W images (W processes, the last partial batch dropped so every process steps alike); process r takes rows
[r·B, (r+1)·B) of each. Micro-step m is batch m mod n of epoch m div n (n batches per epoch), so a resumed run
finds its data position by arithmetic, without iterating over the batches it skips. The per-step random draws
(flips, timesteps, noise) come from a generator seeded with (seed, rank, m): they resume exactly too.
"""

from __future__ import annotations

import numpy as np
import torch

from ..images import pixels_to_model
from .streaming import StreamingBatches, StreamingData


def random_hflip(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch horizontally with probability 1/2 (on the batch's device)."""
    device = generator.device if generator is not None else batch.device
    flip = (torch.rand(batch.shape[0], generator=generator, device=device) < 0.5).to(batch.device)
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def make_batches(data, args, accelerator):
    """The batches of `load_training_data`'s `data` for a training run's options `args` (its config: the flags by
    name) and its `accelerator`: `ShardedBatches`, or for a stream `StreamingBatches` (whose position the run
    checkpoints)."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if not isinstance(data, StreamingData):
        return ShardedBatches(data.train.to(device), args.train_batch_size, world, rank, args.seed)
    return StreamingBatches(
        data.make_stream, data.column, batch_size=args.train_batch_size, num_processes=world, process_index=rank,
        seed=args.seed, buffer_size=args.shuffle_buffer_size, num_workers=args.dataloader_num_workers,
        resolution=data.train.shape[2], channels=data.train.shape[1], skip_corrupt=args.on_corrupt_image == "skip",
        device=device, num_examples=data.train.num_examples, source=data.source,
        accumulation_steps=args.gradient_accumulation_steps, key=data.train.key,
    )  # fmt: skip


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
