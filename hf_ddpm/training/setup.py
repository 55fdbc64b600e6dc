"""Building a training run: the Accelerator, the output directory, data, model, optimizer, LR schedule, EMA,
the timestep sampler and what is checkpointed; and resuming it from a checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..data import load_data
from ..pipeline import HFDDPMPipeline
from ..scheduler import HFDDPMScheduler
from . import checkpoints
from .batches import ShardedBatches
from .config import serializable_args
from .faults import NanGuard, any_process_failed, describe
from .model import build_scheduler, build_unet, data_shape
from .publish import check_publish
from .timesteps import LossSecondMomentResampler, UniformSampler

logger = get_logger(__name__)
DATA_OPTIONS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "center_crop", "eval_size",
                "seed", "max_train_samples", "cache_dir")  # fmt: skip


@dataclass
class Run:
    """Everything the loop touches, built by `setup`."""

    args: object
    accelerator: Accelerator
    unet: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    scheduler: HFDDPMScheduler  # saved with the pipeline; the loss asks it for an unclipped x̂_0
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMAModel | None
    sampler: UniformSampler | LossSecondMomentResampler
    batches: ShardedBatches
    eval_images: torch.Tensor
    progress: checkpoints.TrainProgress
    total_steps: int
    data_source: str
    nan_guard: NanGuard

    @property
    def model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)  # eager for sampling and EMA

    def pipeline(self) -> HFDDPMPipeline:
        pipe = HFDDPMPipeline(unet=self.model, scheduler=self.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def epoch_of(self, step: int) -> int:
        return step * self.args.gradient_accumulation_steps // self.batches.batches_per_epoch


def check_output_dir(args) -> None:
    """Refuse to mix runs in one directory (before anything is loaded or written)."""
    has_run = checkpoints.list_checkpoints(args.output_dir) or os.path.exists(
        os.path.join(args.output_dir, "model_index.json")
    )
    if has_run and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise ValueError(
            f"{args.output_dir} holds an earlier run; pass --resume_from_checkpoint latest to continue it "
            "or --overwrite_output_dir to start over"
        )


def prepare_output_dir(args, accelerator) -> None:
    """Clean up after a killed run; record the options (main process). Called once the data and the model are
    known to be good, so that a bad option or input leaves the output directory as it was."""
    accelerator.wait_for_everyone()  # every process has looked before the main one changes anything
    error = None
    if accelerator.is_main_process:
        try:
            if args.overwrite_output_dir:
                for _, path in checkpoints.list_checkpoints(args.output_dir):
                    shutil.rmtree(path)
                shutil.rmtree(os.path.join(args.output_dir, args.logging_dir), ignore_errors=True)
            checkpoints.remove_incomplete(args.output_dir)
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
                json.dump(serializable_args(args), f, indent=2)
        except OSError as err:
            error = err
    if any_process_failed(accelerator, error is not None):  # also the barrier after the main process's writes
        reason = describe(error) if error else "the main process could not write it"
        raise OSError(f"--output_dir {args.output_dir} is not writable ({reason}); choose a writable directory")


def setup(args) -> Run:
    check_publish(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, args.logging_dir)),
        step_scheduler_with_optimizer=False,  # stepped by the loop, once per optimizer step
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.compile else None,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):  # a line per file saved: our own suffices
        logging.getLogger(name).setLevel(logging.WARNING)
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_output_dir(args)
    set_seed(args.seed)  # the same initial weights on every process

    # Options and inputs are all checked before the output directory is touched.
    channels, resolution = data_shape(args)
    scheduler = build_scheduler(args)
    num_timesteps = scheduler.config.num_train_timesteps
    if args.ddpm_num_inference_steps > num_timesteps:  # checked now, not at the first sample grid
        raise ValueError(
            f"--ddpm_num_inference_steps {args.ddpm_num_inference_steps} exceeds the {num_timesteps} training "
            f"timesteps (T); choose 1 to {num_timesteps}"
        )
    with accelerator.main_process_first():  # the datasets cache is built once
        data = load_data(
            resolution=resolution,
            channels=channels,
            skip_corrupt=args.on_corrupt_image == "skip",
            **{k: getattr(args, k) for k in DATA_OPTIONS},
        )
    if args.eval_bits_per_dim_steps and not len(data.eval):
        raise ValueError("--eval_bits_per_dim_steps needs held-out images, and --eval_size leaves none")
    learned = scheduler.config.variance_type == "learned_range"
    unet = build_unet(args, data.train.shape[1], resolution, learned)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    device, world = accelerator.device, accelerator.num_processes
    batches = ShardedBatches(data.train.to(device), args.train_batch_size, world, accelerator.process_index, args.seed)
    steps_per_epoch = batches.batches_per_epoch / args.gradient_accumulation_steps
    total_steps = args.max_train_steps or math.ceil(args.num_epochs * steps_per_epoch)
    if args.lr_warmup_steps > total_steps:
        raise ValueError(f"--lr_warmup_steps {args.lr_warmup_steps} exceeds the run's {total_steps} optimizer steps")
    prepare_output_dir(args, accelerator)

    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        # one fused kernel over all parameters (CUDA, and CPUs since torch 2.4): on the CPU a step of the default
        # per-tensor loop costs ~4x the fused one, ~4% of a digits-16-tiny training step (benchmarks/training.py)
        fused=True if device.type in ("cuda", "cpu") else None,
    )
    # Both counts in optimizer steps, whatever the accumulation or the number of processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=total_steps
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    set_seed(args.seed, device_specific=True)  # dropout differs across processes
    model = accelerator.unwrap_model(unet)
    ema = None
    if args.use_ema:  # created after `prepare`: from the weights DDP broadcast, on the device
        ema = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            foreach=True,
        )
    num_steps = scheduler.config.num_train_timesteps
    sampler = LossSecondMomentResampler(num_steps) if args.importance_sampling else UniformSampler(num_steps)
    progress = checkpoints.TrainProgress(
        num_processes=world,
        train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
    )
    accelerator.register_for_checkpointing(progress)
    if ema is not None:
        accelerator.register_for_checkpointing(checkpoints.EMAState(ema, device))
    if args.importance_sampling:
        accelerator.register_for_checkpointing(sampler)
    if accelerator.is_main_process:
        accelerator.init_trackers("train")
    return Run(
        args=args, accelerator=accelerator, unet=unet, scheduler=scheduler,
        optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, sampler=sampler, batches=batches,
        eval_images=data.eval, progress=progress, total_steps=total_steps, data_source=data.source,
        nan_guard=NanGuard(args.on_nan, args.output_dir, grad_scaler=accelerator.scaler is not None),
    )  # fmt: skip


def resume(run: Run) -> None:
    """Load the checkpoint named by --resume_from_checkpoint, if any (all processes)."""
    path = checkpoints.resolve_resume(run.args.resume_from_checkpoint, run.args.output_dir)
    if path is None:
        if run.args.resume_from_checkpoint is not None:
            logger.info("no checkpoint in %s yet: starting a new run", run.args.output_dir)
        return
    run.accelerator.load_state(path)
    # accelerate restores its micro-step counter; set it from the step so accumulation windows line up regardless.
    run.accelerator.step = run.progress.global_step * run.args.gradient_accumulation_steps
    logger.info("resumed from %s at optimizer step %d", path, run.progress.global_step)
