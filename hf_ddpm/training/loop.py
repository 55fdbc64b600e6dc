"""The training loop behind `accelerate launch training/train.py`, and what it writes while and after it runs:
checkpoints, sample grids, held-out bits/dim, the pipeline, and with --push_to_hub the Hub repo (hf_ddpm/hub.py's
training hooks check its target and token at start-up and push it).

One optimizer step = `gradient_accumulation_steps` micro-steps on every process. `max_train_steps`, the warmup,
the LR schedule, checkpoints, logging and evaluation all count optimizer steps. The LR scheduler is stepped here
once per optimizer step (accelerate's own stepping would advance it num_processes times per step). Sample grids
and held-out bits/dim use the EMA weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..atomic import write_atomically
from ..data import StreamSourceError
from ..data.batches import ShardedBatches, step_generator, to_model_input
from ..data.streaming import StreamingBatches
from ..evaluation.bits_per_dim import bits_per_dim
from ..file_lock import FileLock
from ..hub import publish, repo_id_of, retry_command, save_hub_pipeline
from ..images import make_grid
from ..launch import any_process_failed, raise_if_any_failed, resume_command
from ..losses import LossSecondMomentResampler, UniformSampler, training_losses
from ..model_card import TRAINING_SUMMARY_FILE
from ..pipeline import HFDDPMPipeline
from ..scheduler import HFDDPMScheduler
from ..unet import weights_digest
from . import checkpoints
from .config import TrainingConfig
from .interruptions import (
    Interrupted,
    NanGuard,
    Preempted,
    PreemptionHandler,
    SourceLost,
    one_line,
    require_finite_weights,
)
from .model import ema_weights

logger = get_logger(__name__)


@dataclass
class Run:
    """Everything the loop touches, built by `hf_ddpm.training.main.setup`."""

    config: TrainingConfig  # resolved: read-only
    accelerator: Accelerator
    unet: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    scheduler: HFDDPMScheduler  # saved with the pipeline; the loss asks it for an unclipped x̂_0
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMAModel | None
    sampler: UniformSampler | LossSecondMomentResampler
    batches: ShardedBatches | StreamingBatches
    eval_images: torch.Tensor
    record: checkpoints.RunRecord  # what each checkpoint records, at its step
    total_steps: int
    data_source: str
    nan_guard: NanGuard
    resume_path: str | None = None  # the checkpoint this run continues
    lock: FileLock | None = None  # the output directory's lock (main process), held until the run ends
    started: float = 0.0  # time.perf_counter() when this process's loop began
    ended: float | None = None  # ... and when its last step ended: the final evaluation and save are not training

    @property
    def model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)  # eager for sampling and EMA

    @contextlib.contextmanager
    def ema_pipeline(self, progress: str | None = None, final: bool = False):
        """Within the block, the pipeline of the EMA weights (of the current ones without EMA; they are back after
        it). `progress`: its progress bar's description (a count and an ETA, on the main process: the only one that
        samples and evaluates); kept on screen at the end of training (`final`), erased after a periodic one, none
        for the saved pipeline."""
        with ema_weights(self.ema, self.model) as model:
            pipe = HFDDPMPipeline(unet=model, scheduler=self.scheduler)
            shown = progress is not None and self.accelerator.is_main_process
            pipe.set_progress_bar_config(disable=not shown, desc=progress, leave=final, dynamic_ncols=True)
            yield pipe

    def trained_seconds(self) -> float:
        """Seconds trained so far: the resumed checkpoint's, and this part's since its loop began (to its last step)."""
        end = self.ended if self.ended is not None else time.perf_counter()
        return round(self.record.seconds + end - self.started, 2)

    def epoch_of(self, step: int) -> int:
        return step * self.config.gradient_accumulation_steps // self.batches.batches_per_epoch

    @property
    def images_per_step(self) -> int:
        """Images in one optimizer step: the batch per process x processes x accumulated micro-steps."""
        return self.config.train_batch_size * self.accelerator.num_processes * self.config.gradient_accumulation_steps


def train_loop(run: Run, preemption: PreemptionHandler) -> dict:
    """Train from the run's record step to `total_steps` optimizer steps; write the pipeline; return the summary."""
    config, accelerator, batches = run.config, run.accelerator, run.batches
    accum, device, rank = config.gradient_accumulation_steps, accelerator.device, accelerator.process_index
    logger.info(
        "%s training images (%s), %d processes x batch %d x accumulation %d = %d images per optimizer step; "
        "%d optimizer steps",
        len(batches.images) or "an unknown number of", run.data_source, accelerator.num_processes, config.train_batch_size, accum,
        run.images_per_step, run.total_steps,
    )  # fmt: skip
    step = run.record.step
    bar = tqdm(total=run.total_steps, initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    loss_sum = torch.zeros((), device=device)
    streaming = isinstance(batches, StreamingBatches)  # a stream's source can vanish mid-run, memory cannot
    sampler_at_step = None
    last_time = run.started = time.perf_counter()
    try:  # an error raised in a step ends the bar first: the error line is the output's last
        for micro_step in range(step * accum, run.total_steps * accum):
            if streaming and config.importance_sampling and micro_step % accum == 0:  # restored if the step is dropped
                sampler_at_step = copy.deepcopy(run.sampler.state_dict())
            # Accumulate gradients: DDPM Algorithm 1 on this micro-step's batch, its draws from its own generator.
            generator = step_generator(config.seed, rank, micro_step, device)
            images = _next_batch(run, micro_step, preemption)
            x_start = to_model_input(images, generator, config.random_flip)  # (B, C, H, W) in [-1, 1]
            if config.channels_last:
                x_start = x_start.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(run.unet):
                timesteps, weights = run.sampler.sample(len(x_start), generator, device)
                noise = torch.randn(x_start.shape, generator=generator, device=device)
                model = lambda x, t: run.unet(x, t).sample  # noqa: E731
                terms = training_losses(model, run.scheduler, x_start, noise, timesteps, config.loss)
                loss = (terms["loss"] * weights).mean()
                accelerator.backward(loss)
                loss_sum += loss.detach()
                # Update weights, once per optimizer step (the last micro-step of the window).
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(run.unet.parameters(), config.max_grad_norm or math.inf)
                    # the same on every process; the preemption flag rides in the same all-reduce
                    mean_loss = preemption.reduce_with_loss(accelerator, loss_sum / accum)
                    lost = streaming and preemption.source_lost()  # then no process takes this step
                    updated = not lost and run.nan_guard.apply_update(mean_loss, grad_norm)  # --on_nan skip: NaN/inf
                    if updated:
                        run.optimizer.step()
                    if not lost:
                        run.lr_scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
            if config.importance_sampling:  # every process records every process's losses: identical samplers
                run.sampler.update(*accelerator.gather((timesteps, terms["loss"].detach())))
            if not accelerator.sync_gradients:
                continue

            # Stop on a lost stream: a process's source vanished during this step, which every process drops; every
            # process's stream position is put back to the end of the last step.
            if lost:
                if sampler_at_step is not None:
                    run.sampler.load_state_dict(sampler_at_step)
                run.batches.rewind_to_last_step()
                bar.close()
                _stop(run, step, preemption, None)
            step += 1

            # Update EMA.
            if run.ema is not None and updated:
                run.ema.step(run.model.parameters())

            # Log the step (the host read of the loss also reads the preemption flag).
            loss_value, stop = preemption.read(accelerator.num_processes)
            now = time.perf_counter()
            logs = {"loss": loss_value, "lr": run.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                    "images_per_sec": run.images_per_step / (now - last_time), "epoch": run.epoch_of(step)}  # fmt: skip
            if run.ema is not None:
                logs["ema_decay"] = run.ema.cur_decay_value
            accelerator.log(logs, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            loss_sum.zero_()
            run.nan_guard.after_step(step, logs["loss"], logs["grad_norm"])  # --on_nan stop: raises before any write

            # Save checkpoint; sample grids, bits/dim and pipeline snapshots when due.
            _periodic(run, step)

            # Check for preemption: every process agreed on it in the loss's all-reduce.
            if stop:
                bar.close()
                _stop(run, step, preemption, preemption.agreed)
            last_time = time.perf_counter()
    finally:
        bar.close()
    return _finish(run, step, preemption)


def _next_batch(run: Run, micro_step: int, preemption: PreemptionHandler) -> torch.Tensor:
    """This process's uint8 batch of `micro_step`. Once its stream failed (StreamSourceError, kept in `preemption`),
    zeros of the batch's shape: the process goes on through the step's collectives (DDP's gradient all-reduce, the
    loss's) until every process hears of it there, and the step is dropped everywhere."""
    if preemption.source_error is None:
        try:
            return run.batches.batch(micro_step)
        except StreamSourceError as err:
            preemption.source_error = err
    shape = (run.config.train_batch_size, run.batches.channels, run.batches.resolution, run.batches.resolution)
    return torch.zeros(shape, dtype=torch.uint8, device=run.accelerator.device)


def _due(run: Run, step: int, every_steps: int | None, every_epochs: int | None) -> bool:
    if every_steps is not None:
        return step % every_steps == 0
    if every_epochs is not None:
        epoch = run.epoch_of(step)
        return epoch > run.epoch_of(step - 1) and epoch % every_epochs == 0
    return False


def _periodic(run: Run, step: int) -> None:
    """Checkpoint (all processes), then sample grids, bits/dim and pipeline snapshots (main process)."""
    config, accelerator = run.config, run.accelerator
    snapshot = step != run.total_steps and _due(run, step, config.save_model_steps, config.save_model_epochs)
    if step % config.checkpointing_steps == 0:
        checkpoints.save_run_checkpoint(run, step)
    elif snapshot:  # on every process (replicated weights): all stop together, nothing written
        require_finite_weights(run.model, run.ema, step, "the pipeline")
    if not accelerator.is_main_process or step == run.total_steps:  # `_finish` samples and evaluates the last step
        return
    if _due(run, step, config.save_images_steps, config.save_images_epochs):
        _log_samples(run, step, os.path.join(config.output_dir, "samples", f"step-{step:07d}.png"))
    if config.eval_bits_per_dim_steps and step % config.eval_bits_per_dim_steps == 0 and len(run.eval_images):
        _log_bits_per_dim(run, step)
    if snapshot:
        _save_pipeline(run)


def _stop(run: Run, step: int, preemption: PreemptionHandler, signum: int | None, when: str = "") -> None:
    """All processes stop after optimizer step `step`, for the signal `signum`, or (None) because a process's stream
    failed: checkpoint `step` (unless `_periodic` or the resumed checkpoint holds it), say how to resume (the main
    process names the signal, or the first failed process's error), and raise Preempted (exit status 128 + the signal
    number) or SourceLost (SOURCE_LOST_STATUS)."""
    accelerator = run.accelerator
    path = checkpoints.checkpoint_of_last_step(run, step)
    command = resume_command(sys.argv[1:], accelerator.num_processes, accelerator.mixed_precision)
    if signum is not None and accelerator.is_main_process:
        name = signal.Signals(signum).name
        print(f"preempted ({name}){when} at step {step}: saved {path}; resume with: {command}", flush=True)
    elif signum is None:  # the main process says the first failed process's error: one line for the run
        failed = [one_line(preemption.source_error)] if preemption.source_error is not None else []
        failed = gather_object(failed) if accelerator.num_processes > 1 else failed
        saved = f"saved {path}" if path else f"nothing trained yet, no checkpoint in {run.config.output_dir}"
        if accelerator.is_main_process:
            print(f"error: {failed[0]} ({saved} at step {step}; resume with: {command})", file=sys.stderr, flush=True)
    accelerator.end_training()
    raise SourceLost(path, command) if signum is None else Preempted(signum, path, command)


def _finish(run: Run, step: int, preemption: PreemptionHandler) -> dict:
    """Log each replica's fingerprint, then (main process) evaluate, sample and save the pipeline, and publish.

    A signal during the evaluation and sample grid stops them: all processes write the checkpoint of the last step
    (its resume only evaluates and saves) and exit 128 + N. A signal during the pipeline's save lets it finish (a
    few seconds, atomic); the run is then complete, but a --push_to_hub push is not started (its command is
    printed). A signal during the push stops it; the pipeline stays saved and the command that pushes it is printed.
    """
    config, accelerator = run.config, run.accelerator
    run.ended = time.perf_counter()  # a checkpoint of the last step written during the evaluation counts no more
    accelerator.wait_for_everyone()
    fingerprint = weights_digest(run.model).hexdigest()
    with ema_weights(run.ema, run.model):
        ema_fingerprint = weights_digest(run.model).hexdigest() if run.ema is not None else None
    logger.info(
        "process %d/%d: parameter sha256 %s ema sha256 %s",
        accelerator.process_index, accelerator.num_processes, fingerprint, ema_fingerprint, main_process_only=False,
    )  # fmt: skip
    summary = {
        "world_size": accelerator.num_processes,
        "optimizer_steps": step,
        "train_seconds": run.trained_seconds(),  # every resumed part's
        "images_per_optimizer_step": run.images_per_step,
        "mixed_precision": accelerator.mixed_precision,
        "ema": run.ema is not None,
        "data_source": run.data_source,
        "parameter_sha256": fingerprint,
    }
    if config.on_nan == "skip":
        summary["skipped_steps"] = run.nan_guard.skipped
    require_finite_weights(run.model, run.ema, step, "the pipeline")  # every process: all stop together

    # Evaluate and sample (main process); a signal interrupts them.
    preemption.phase = "evaluate"
    error = None
    if accelerator.is_main_process:
        try:
            with preemption.interrupting():
                if len(run.eval_images):
                    summary["eval"] = _log_bits_per_dim(run, step, final=True)
                _log_samples(run, step, os.path.join(config.output_dir, "samples.png"), final=True)
        except Interrupted:
            pass  # preemption.received holds the signal
        except Exception as err:  # shared below, so that the other processes stop too instead of waiting
            error = err
    raise_if_any_failed(accelerator, error, "evaluate and sample")
    if any_process_failed(accelerator, preemption.received is not None):  # every process checkpoints the step
        _stop(run, step, preemption, preemption.received or signal.SIGTERM, " during the final evaluation")

    # Save the pipeline (main process); a signal waits for the save.
    preemption.phase = "save"
    if accelerator.is_main_process:
        try:
            _save_pipeline(run)
            write_atomically(
                os.path.join(config.output_dir, TRAINING_SUMMARY_FILE), lambda f: json.dump(summary, f, indent=2)
            )
        except Exception as err:
            error = err
        else:
            weights = "EMA weights" if run.ema is not None else "final weights"
            logger.info("saved the pipeline (%s) and samples.png to %s", weights, config.output_dir)
    raise_if_any_failed(accelerator, error, "save the pipeline")
    signalled = any_process_failed(accelerator, preemption.received is not None)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return summary
    if signalled:  # the save finished: the run is complete, and a push is not started
        signum = preemption.received or signal.SIGTERM
        print(f"received {signal.Signals(signum).name} during the save: the save finished and the run is complete "
              f"({config.output_dir})", flush=True)  # fmt: skip
        if config.push_to_hub:
            command = retry_command(config.output_dir, repo_id_of(config), config.hub_private_repo)
            print(f"not pushed to the Hub; push it with: {command}", flush=True)
            raise Preempted(signum, None, command)
        return summary

    # Publish (main process); a signal stops the push, the pipeline stays saved.
    if config.push_to_hub:
        preemption.phase = "push"
        try:
            with preemption.interrupting():
                summary["hub_commit_url"] = publish(config.output_dir, config)
        except Interrupted:
            command = retry_command(config.output_dir, repo_id_of(config), config.hub_private_repo)
            print(f"push stopped: the pipeline is saved in {config.output_dir}; push it with: {command}", flush=True)
            raise Preempted(preemption.received, None, command) from None
        logger.info("pushed to the Hub: %s", summary["hub_commit_url"])
    return summary


# ------------------------------------------------------------------------------------------------ what it writes


def _save_pipeline(run: Run) -> None:
    """The pipeline with the EMA weights, as safetensors, into --output_dir (main process), with the modules that let
    diffusers alone load it (`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`)."""
    with run.ema_pipeline() as pipeline:
        save_hub_pipeline(pipeline, run.config.output_dir)  # atomic: never a half-written pipeline


def _log_samples(run: Run, step: int, path: str, final: bool = False) -> None:
    """A grid of --eval_batch_size samples, always from the same seed, so that grids of successive steps compare."""
    config = run.config
    progress = f"step {step}: sample grid ({config.eval_batch_size} images, denoising steps)"
    with run.ema_pipeline(progress, final) as pipeline:
        generator = torch.Generator(device=pipeline.device).manual_seed(config.seed)
        images = pipeline(batch_size=config.eval_batch_size, generator=generator,
                          num_inference_steps=config.ddpm_num_inference_steps, output_type="np").images  # fmt: skip
    grid = make_grid(images)  # images: (N, H, W, C) in [0, 1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda f: grid.save(f, format="PNG"), "wb")  # never half-written
    tracker = run.accelerator.get_tracker("tensorboard") if config.logger == "tensorboard" else None
    if tracker is not None:
        tracker.log_images({"samples": images}, step=step, dataformats="NHWC")


def _log_bits_per_dim(run: Run, step: int, final: bool = False) -> dict:
    """Monte Carlo estimate of the bound (DDPM eq. 5) on the first --eval_num_images held-out images, in bits/dim,
    by hf_ddpm.evaluation (this process alone: it runs on the main process): its Metric fields, and the
    `bits_per_dim` / `bits_per_dim_stderr` names that training_summary.json and TensorBoard use."""
    config = run.config
    count = min(config.eval_num_images, len(run.eval_images))
    with run.ema_pipeline(f"step {step}: held-out bits/dim ({count} images, bound terms)", final) as pipeline:
        metric = bits_per_dim(pipeline, run.eval_images[: config.eval_num_images],
                              num_timesteps=config.eval_num_timesteps, block_size=256, seed=config.seed)  # fmt: skip
    stderr = metric.stderr if metric.stderr is not None else float("nan")
    result = {**metric.to_dict(), "bits_per_dim": metric.value, "bits_per_dim_stderr": stderr}
    run.accelerator.log({k: result[k] for k in ("bits_per_dim", "bits_per_dim_stderr")}, step=step)
    logger.info(
        "step %d: held-out bits/dim %.4f ± %.4f (%d images, K=%d)",
        step, result["bits_per_dim"], result["bits_per_dim_stderr"], result["num_images"], result["num_timesteps"],
    )  # fmt: skip
    return result
