"""The training loop behind `accelerate launch training/train.py`, and what it writes while and after it runs.

One optimizer step = `gradient_accumulation_steps` micro-steps on every process. `max_train_steps`, the warmup,
the LR schedule, checkpoints, logging and evaluation all count optimizer steps. The LR scheduler is stepped here
once per optimizer step (accelerate's own stepping would advance it num_processes times per step).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ..atomic import write_atomically
from ..hub import save_hub_pipeline
from ..losses import training_losses
from . import checkpoints
from .batches import step_generator, to_model_input
from .config import DEFAULT_SAVE_IMAGES_EPOCHS
from .evaluation import ema_weights, held_out_bits_per_dim, parameter_hash, sample_grid
from .faults import any_process_failed, require_finite_weights
from .preemption import Preempted, PreemptionHandler, parse_signals, resume_command
from .publish import publish
from .setup import Run, resume, setup

logger = get_logger(__name__)


def train(args) -> dict:
    """Run (or resume) training to `total_steps` optimizer steps; write the pipeline; return the run's summary."""
    run = setup(args)  # the main process holds the output directory's lock from here ...
    preemption = PreemptionHandler(parse_signals(args.preemption_signals))
    try:
        resume(run)
        preemption.install()  # from here a signal ends the run at a step boundary, with a checkpoint
        return _train(run, preemption)
    finally:
        preemption.restore()
        if run.lock is not None:
            run.lock.release()  # ... to its end (or the process's, whichever comes first)


def _train(run: Run, preemption: PreemptionHandler) -> dict:
    args = run.args
    accelerator, batches, progress = run.accelerator, run.batches, run.progress
    accum, device, rank = args.gradient_accumulation_steps, accelerator.device, accelerator.process_index
    images_per_step = run.images_per_step
    logger.info(
        "%d training images (%s), %d processes x batch %d x accumulation %d = %d images per optimizer step; "
        "%d optimizer steps",
        len(batches.images),
        run.data_source,
        accelerator.num_processes,
        args.train_batch_size,
        accum,
        images_per_step,
        run.total_steps,
    )
    bar = tqdm(
        total=run.total_steps, initial=progress.global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    loss_sum = torch.zeros((), device=device)
    last_time, started = time.perf_counter(), time.perf_counter()
    for micro_step in range(progress.global_step * accum, run.total_steps * accum):
        generator = step_generator(args.seed, rank, micro_step, device)
        x_start = to_model_input(batches.batch(micro_step), generator, args.random_flip)  # (B, C, H, W) in [-1, 1]
        if args.channels_last:
            x_start = x_start.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(run.unet):
            timesteps, weights = run.sampler.sample(len(x_start), generator, device)
            noise = torch.randn(x_start.shape, generator=generator, device=device)
            terms = training_losses(
                lambda x, t: run.unet(x, t).sample, run.scheduler, x_start, noise, timesteps, args.loss
            )
            loss = (terms["loss"] * weights).mean()
            accelerator.backward(loss)
            loss_sum += loss.detach()
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(run.unet.parameters(), args.max_grad_norm or math.inf)
                # the same on every process; the preemption flag rides in the same all-reduce
                mean_loss = preemption.reduce_with_loss(accelerator, loss_sum / accum)
                updated = run.nan_guard.apply_update(mean_loss, grad_norm)  # --on_nan skip: False for NaN/inf
                if updated:
                    run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
        if args.importance_sampling:  # every process records every process's losses: identical samplers
            run.sampler.update(*accelerator.gather((timesteps, terms["loss"].detach())))
        if not accelerator.sync_gradients:
            continue
        if run.ema is not None and updated:
            run.ema.step(run.model.parameters())
        progress.global_step += 1
        step, now = progress.global_step, time.perf_counter()
        loss_value, stop = preemption.read(accelerator.num_processes)  # the host read the logs need anyway
        logs = {
            "loss": loss_value,
            "lr": run.lr_scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "images_per_sec": images_per_step / (now - last_time),
            "epoch": run.epoch_of(step),
        }
        if run.ema is not None:
            logs["ema_decay"] = run.ema.cur_decay_value
        accelerator.log(logs, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
        loss_sum.zero_()
        run.nan_guard.after_step(step, logs["loss"], logs["grad_norm"])  # --on_nan stop: raises before any write
        _periodic(run, step)
        if stop:
            bar.close()
            _preempt(run, step, preemption.agreed)
        last_time = time.perf_counter()
    bar.close()
    return _finish(run, time.perf_counter() - started)


def _finish(run: Run, seconds: float) -> dict:
    """Log each replica's fingerprint, then (main process) evaluate, sample and save the pipeline, and publish."""
    args, accelerator = run.args, run.accelerator
    accelerator.wait_for_everyone()
    step = run.progress.global_step
    fingerprint = parameter_hash(run.model)
    with ema_weights(run.ema, run.model):
        ema_fingerprint = parameter_hash(run.model) if run.ema is not None else None
    logger.info(
        "process %d/%d: parameter sha256 %s ema sha256 %s",
        accelerator.process_index,
        accelerator.num_processes,
        fingerprint,
        ema_fingerprint,
        main_process_only=False,
    )
    summary = {
        "world_size": accelerator.num_processes,
        "optimizer_steps": step,
        "train_seconds": round(seconds, 2),
        "images_per_optimizer_step": run.images_per_step,
        "mixed_precision": accelerator.mixed_precision,
        "ema": run.ema is not None,
        "data_source": run.data_source,
        "parameter_sha256": fingerprint,
    }
    if args.on_nan == "skip":
        summary["skipped_steps"] = run.nan_guard.skipped
    require_finite_weights(run.model, run.ema, step, "the pipeline")  # every process: all stop together
    error = None
    if accelerator.is_main_process:
        try:
            if len(run.eval_images):
                summary["eval"] = _log_bits_per_dim(run, step)
            _log_samples(run, step, os.path.join(args.output_dir, "samples.png"))
            _save_pipeline(run)
            write_atomically(
                os.path.join(args.output_dir, "training_summary.json"), lambda f: json.dump(summary, f, indent=2)
            )
        except Exception as err:  # shared below, so that the other processes stop too instead of waiting
            error = err
        else:
            weights = "EMA weights" if run.ema is not None else "final weights"
            logger.info("saved the pipeline (%s) and samples.png to %s", weights, args.output_dir)
    if any_process_failed(accelerator, error is not None):
        raise error or RuntimeError("the main process failed to save the pipeline (its error says why)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        summary["hub_commit_url"] = publish(args.output_dir, args)
        logger.info("pushed to the Hub: %s", summary["hub_commit_url"])
    return summary


def _preempt(run: Run, step: int, signum: int) -> None:
    """All processes agreed to stop after `step`: checkpoint it (unless `_periodic` just did), say how to resume,
    and raise Preempted (exit status 128 + the signal number)."""
    args, accelerator = run.args, run.accelerator
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    if step % args.checkpointing_steps != 0:
        require_finite_weights(run.model, run.ema, step, f"checkpoint-{step}")
        path = checkpoints.save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
    command = resume_command(sys.argv[1:], accelerator.num_processes, accelerator.mixed_precision)
    if accelerator.is_main_process:
        name = signal.Signals(signum).name
        print(f"preempted ({name}) at step {step}: saved {path}; resume with: {command}", flush=True)
    accelerator.end_training()
    raise Preempted(signum, path, command)


def _due(run: Run, step: int, every_steps: int | None, every_epochs: int | None) -> bool:
    if every_steps is not None:
        return step % every_steps == 0
    if every_epochs is not None:
        epoch = run.epoch_of(step)
        return epoch > run.epoch_of(step - 1) and epoch % every_epochs == 0
    return False


def _save_pipeline(run: Run) -> None:
    """The pipeline with the EMA weights, as safetensors, into --output_dir (main process), with the modules that let
    diffusers alone load it (`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`)."""
    with ema_weights(run.ema, run.model):
        save_hub_pipeline(run.pipeline(), run.args.output_dir)  # atomic: never a half-written pipeline


def _periodic(run: Run, step: int) -> None:
    """Checkpoint (all processes), then sample grids, bits/dim and pipeline snapshots (main process)."""
    args, accelerator = run.args, run.accelerator
    checkpoint = step % args.checkpointing_steps == 0
    snapshot = step != run.total_steps and _due(run, step, args.save_model_steps, args.save_model_epochs)
    if checkpoint or snapshot:  # on every process (replicated weights): all stop together, nothing written
        require_finite_weights(run.model, run.ema, step, f"checkpoint-{step}" if checkpoint else "the pipeline")
    if checkpoint:
        checkpoints.save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
    if not accelerator.is_main_process or step == run.total_steps:  # `_finish` samples and evaluates the last step
        return
    image_epochs = args.save_images_epochs or (None if args.save_images_steps else DEFAULT_SAVE_IMAGES_EPOCHS)
    if _due(run, step, args.save_images_steps, image_epochs):
        _log_samples(run, step, os.path.join(args.output_dir, "samples", f"step-{step:07d}.png"))
    if args.eval_bits_per_dim_steps and step % args.eval_bits_per_dim_steps == 0 and len(run.eval_images):
        _log_bits_per_dim(run, step)
    if snapshot:
        _save_pipeline(run)


def _log_samples(run: Run, step: int, path: str) -> None:
    with ema_weights(run.ema, run.model):
        grid, images = sample_grid(
            run.pipeline(), run.args.eval_batch_size, run.args.ddpm_num_inference_steps, run.args.seed
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda f: grid.save(f, format="PNG"), "wb")  # never half-written
    tracker = run.accelerator.get_tracker("tensorboard") if run.args.logger == "tensorboard" else None
    if tracker is not None:
        tracker.log_images({"samples": images}, step=step, dataformats="NHWC")


def _log_bits_per_dim(run: Run, step: int) -> dict:
    with ema_weights(run.ema, run.model):
        result = held_out_bits_per_dim(
            run.pipeline(), run.eval_images, run.args.eval_num_images, run.args.eval_num_timesteps, run.args.seed
        )
    run.accelerator.log({k: result[k] for k in ("bits_per_dim", "bits_per_dim_stderr")}, step=step)
    logger.info(
        "step %d: held-out bits/dim %.4f ± %.4f (%d images, K=%d)",
        step,
        result["bits_per_dim"],
        result["bits_per_dim_stderr"],
        result["num_images"],
        result["num_timesteps"],
    )
    return result
