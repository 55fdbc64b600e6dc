"""Building a training run: the Accelerator, the output directory, data, model, optimizer, LR schedule, EMA,
the timestep sampler and what is checkpointed; and resuming it from a checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..pipeline import HFDDPMPipeline
from ..scheduler import HFDDPMScheduler
from . import checkpoints, output_dir, preflight, threads
from .batches import ShardedBatches, load_training_data, make_batches
from .config import effective_mixed_precision, serializable_args
from .faults import NanGuard, any_process_failed, describe
from .model import build_scheduler, build_unet, data_shape, model_source
from .publish import check_publish
from .timesteps import LossSecondMomentResampler, UniformSampler

logger = get_logger(__name__)
# The defaults of options whose default depends on the run (None in the config): see run_config.py.
DEFAULT_BATCH_SIZE, DEFAULT_WARMUP_STEPS, DEFAULT_INFERENCE_STEPS = 64, 100, 250


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
    lock: output_dir.RunLock | None = None  # the output directory's lock (main process), held until the run ends

    @property
    def model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)  # eager for sampling and EMA

    def pipeline(self) -> HFDDPMPipeline:
        pipe = HFDDPMPipeline(unet=self.model, scheduler=self.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def epoch_of(self, step: int) -> int:
        return step * self.args.gradient_accumulation_steps // self.batches.batches_per_epoch

    @property
    def images_per_step(self) -> int:
        """Images in one optimizer step: the batch per process x processes x accumulated micro-steps."""
        return self.args.train_batch_size * self.accelerator.num_processes * self.args.gradient_accumulation_steps


@dataclass
class Plan:
    """What `check_run` found before any data is read or anything written."""

    channels: int | None  # None: the preset adapts to the data's channels
    resolution: int
    scheduler: HFDDPMScheduler
    resume_path: str | None
    record: dict  # the resumed checkpoint's run record ({} for a new run)
    output: output_dir.OutputDir


def check_run(args) -> Plan:
    """Every check that needs no data and writes nothing (each process alike, so all refuse together): the Hub
    target, the model and the objective, one UNet forward pass at the training resolution, the checkpoint to
    resume and its compatibility, and the output directory."""
    preflight.check_repo_id(args)
    check_publish(args)
    preflight.check_dataset_reachable(args)
    channels, resolution = data_shape(args)
    scheduler = build_scheduler(args)
    num_timesteps = scheduler.config.num_train_timesteps
    if args.ddpm_num_inference_steps is None:  # the default fits any T
        args.ddpm_num_inference_steps = min(DEFAULT_INFERENCE_STEPS, num_timesteps)
    elif args.ddpm_num_inference_steps > num_timesteps:  # checked now, not at the first sample grid
        raise ValueError(
            f"--ddpm_num_inference_steps {args.ddpm_num_inference_steps} exceeds the {num_timesteps} training "
            f"timesteps (T); choose 1 to {num_timesteps}"
        )
    learned = scheduler.config.variance_type == "learned_range"
    unet = build_unet(args, channels, resolution, learned)
    preflight.check_forward(unet, resolution, model_source(args), args.resolution is not None)
    path = checkpoints.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    record = preflight.checkpoint_record(path) if path else {}
    if record:
        current = preflight.run_config(unet.config, scheduler.config, args.loss)
        preflight.check_resume(path, record, current, skip=("in_channels", "out_channels") if channels is None else ())
        world = int(os.environ.get("WORLD_SIZE", "1"))  # set by `accelerate launch` (torchrun) before any setup
        preflight.restore_run_shape(path, record, args, world, effective_mixed_precision(args))
    found = output_dir.check_output_dir(args)
    return Plan(channels, resolution, scheduler, path, record, found)


def lock_output_dir(args, accelerator) -> output_dir.RunLock | None:
    """The main process takes the output directory's lock; every process hears whether it could."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = output_dir.acquire_lock(args.output_dir)
        except (OSError, ValueError) as err:
            error = err
    if any_process_failed(accelerator, error is not None):
        if isinstance(error, output_dir.OutputDirError):
            raise error
        reason = describe(error) if error else "the main process could not lock it"
        raise OSError(f"--output_dir {args.output_dir} is not writable ({reason}); choose a writable directory")
    return lock


def prepare_output_dir(args, accelerator, plan: Plan) -> None:
    """Clean up after a killed run; record the options (main process). Called once the data and the model are
    known to be good, so that a bad option or input leaves the output directory as it was."""
    accelerator.wait_for_everyone()  # every process has looked before the main one changes anything
    error = None
    if accelerator.is_main_process:
        try:
            output_dir.prepare_output_dir(plan.output, args)
            checkpoints.remove_incomplete(args.output_dir)
            with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
                json.dump(serializable_args(args), f, indent=2)
        except OSError as err:
            error = err
    if any_process_failed(accelerator, error is not None):  # also the barrier after the main process's writes
        reason = describe(error) if error else "the main process could not write it"
        raise OSError(f"--output_dir {args.output_dir} is not writable ({reason}); choose a writable directory")


def setup(args) -> Run:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    threads.apply(args)
    plan = check_run(args)  # before the Accelerator: a resumed run's mixed precision is restored from its checkpoint
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, args.logging_dir)),
        step_scheduler_with_optimizer=False,  # stepped by the loop, once per optimizer step
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.compile else None,
    )
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):  # a line per file saved: our own suffices
        logging.getLogger(name).setLevel(logging.WARNING)
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    lock = lock_output_dir(args, accelerator)
    try:
        run = _build(args, accelerator, plan)
    except BaseException:
        if lock is not None:  # nothing else written yet when the output directory was new: leave no trace
            lock.release(remove=not os.path.exists(os.path.join(args.output_dir, output_dir.MANIFEST_NAME)))
        raise
    run.lock = lock
    return run


def _build(args, accelerator, plan: Plan) -> Run:
    set_seed(args.seed)  # the same initial weights on every process
    scheduler, resolution = plan.scheduler, plan.resolution
    data = load_training_data(args, accelerator, resolution, plan.channels)  # the cache is built once per machine
    if args.eval_bits_per_dim_steps and not len(data.eval):
        raise ValueError("--eval_bits_per_dim_steps needs held-out images, and --eval_size leaves none")
    learned = scheduler.config.variance_type == "learned_range"
    unet = build_unet(args, data.train.shape[1], resolution, learned)
    if plan.record:  # the data decided the channels: compare them too, before anything is written
        current = preflight.run_config(unet.config, scheduler.config, args.loss)
        preflight.check_resume(plan.resume_path, plan.record, current)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    device, world = accelerator.device, accelerator.num_processes
    if args.train_batch_size is None:  # the default, capped so that a small folder trains without flags
        args.train_batch_size = max(1, min(DEFAULT_BATCH_SIZE, len(data.train) // world))
        if args.train_batch_size < DEFAULT_BATCH_SIZE:
            logger.info(
                "--train_batch_size %d (the default %d, capped: %d training images over %d processes)",
                args.train_batch_size, DEFAULT_BATCH_SIZE, len(data.train), world,
            )  # fmt: skip
    batches = make_batches(data, args, accelerator)  # streaming: registered for checkpointing (its position)
    steps_per_epoch = batches.batches_per_epoch / args.gradient_accumulation_steps
    total_steps = args.max_train_steps or math.ceil(args.num_epochs * steps_per_epoch)
    if args.lr_warmup_steps is None:  # the default, shortened for a run shorter than it
        args.lr_warmup_steps = DEFAULT_WARMUP_STEPS if DEFAULT_WARMUP_STEPS <= total_steps else total_steps // 10
        if args.lr_warmup_steps != DEFAULT_WARMUP_STEPS:
            logger.info(
                "--lr_warmup_steps %d (the default %d is longer than the run's %d steps: a tenth of it)",
                args.lr_warmup_steps, DEFAULT_WARMUP_STEPS, total_steps,
            )  # fmt: skip
    elif args.lr_warmup_steps > total_steps:
        raise ValueError(f"--lr_warmup_steps {args.lr_warmup_steps} exceeds the run's {total_steps} optimizer steps")
    prepare_output_dir(args, accelerator, plan)

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
        run_config=preflight.run_config(model.config, scheduler.config, args.loss),
        mixed_precision=accelerator.mixed_precision,
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
    path = checkpoints.resolve_resume(run.args.resume_from_checkpoint, run.args.output_dir)  # as check_run found
    if path is None:
        if run.args.resume_from_checkpoint is not None:
            logger.info("no checkpoint in %s yet: starting a new run", run.args.output_dir)
        return
    run.accelerator.load_state(path)
    # accelerate restores its micro-step counter; set it from the step so accumulation windows line up regardless.
    run.accelerator.step = run.progress.global_step * run.args.gradient_accumulation_steps
    logger.info("resumed from %s at optimizer step %d", path, run.progress.global_step)
