"""`training/train.py`'s entry point, and how a run is built: checked, resolved, then set up for the loop.

A run is a transaction. `check_run` refuses whatever cannot work (the Hub target, the model and the objective, one
UNet forward pass at the training resolution, the checkpoint to resume and its compatibility, the output directory)
before any data is read or anything is written, on every process alike so that all refuse together. The config is
resolved (`resolve.resolve`) from the flags and the facts of the run: before the data is read, for those checks and
the Accelerator; once the data is read, into the value the run trains with and training_args.json records.

A training error ends the output with `error: <message>` on one line, status 1. The traceback is printed above it
only with --debug (it is the same for every bad option or input, and pushes the message out of sight). A signal
that stopped the run (hf_ddpm/training/interruptions.py) exits with 128 + its number after its own line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..cpu import tune_process
from ..data import load_training_data
from ..data.batches import make_batches
from ..data.streaming import StreamingBatches
from ..flags import check_writable
from ..hub import check_publish, check_token, repo_id_of, retry_command
from ..hub_probe import check_dataset_reachable
from ..launch import MainProcessFailed, later_rank, launch_processes, resume_command, watch_launcher
from ..losses import LossSecondMomentResampler, UniformSampler
from ..scheduler import HFDDPMScheduler
from ..unet import check_forward
from . import checkpoints, output_dir, resume_checks
from .checkpoints import RunRecord
from .cli import parse_args
from .config import TrainingConfig, launch_precision
from .interruptions import NanGuard, PeerLost, PreemptionHandler, SignalHandlers, StopAtOnce, one_line, parse_signals
from .loop import Run, train_loop
from .model import build_scheduler, build_unet, data_shape, describe_model, pretrained_scheduler_config
from .resolve import RunFacts, optimizer_steps, resolve

logger = get_logger(__name__)
ERROR_STATUS = 1


# A launcher's worker other than rank 0 holds back an error that every process meets alike (a bad flag, a check
# before the run, or one that points at the main process's: MainProcessFailed) this long: when rank 0 fails with it,
# the launcher stops this worker meanwhile, and the error is printed once; a worker still running after it prints its
# own (an error rank 0 did not meet is never lost).
DOOR_GRACE_SECONDS = 10.0
EVERY_PROCESS = "hf_ddpm_every_process"  # set on an error that every process raises alike (the checks at the door)


def main(argv: list[str] | None = None) -> int:
    """Parse the options and train; returns the exit status (0, 1 for an error, 128 + N after signal N)."""
    argv = sys.argv[1:] if argv is None else argv
    given, later = None, later_rank()
    held, ignored = io.StringIO(), SignalHandlers()
    try:
        with contextlib.redirect_stderr(held) if later else contextlib.nullcontext():
            given = parse_args(argv)
        # Once train() lets go of the signals (it ended, or failed), one does nothing while the end is said: a launcher
        # that stops the other processes of a failed run sends its SIGTERM then, and would kill the error line.
        ignored = SignalHandlers(parse_signals(given.preemption_signals))
        ignored.install(signal.SIG_IGN)
        train(given)
    except SystemExit as stop:  # --help, the parser's usage errors (printed by it), a preemption, a lost source
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else ERROR_STATUS)
        if given is None and later and code:  # a usage error: rank 0 prints it
            time.sleep(DOOR_GRACE_SECONDS)
            sys.stderr.write(held.getvalue())
        return code
    except Exception as err:
        if later and (given is None or getattr(err, EVERY_PROCESS, False) or isinstance(err, MainProcessFailed)):
            ignored.restore()  # the launcher's SIGTERM ends this wait: rank 0 says the error
            time.sleep(DOOR_GRACE_SECONDS)
        if given.debug if given is not None else "--debug" in argv:  # (also from a --config file once parsed)
            traceback.print_exc()
        sys.stdout.flush()
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return ERROR_STATUS
    finally:
        ignored.restore()
    return 0


def train(given: TrainingConfig) -> dict:
    """Run (or resume) the training `given` asks for; write the pipeline; return the run's summary."""
    signals, speaks = parse_signals(given.preemption_signals), not later_rank()
    with StopAtOnce(signals, speaks) as early:  # until the loop: a signal ends the process at once
        try:
            run = setup(given, early.cleanups)  # the main process holds the output directory's lock from here ...
        except RunComplete as complete:
            return complete.summary
        preemption = PreemptionHandler(signals, speaks)
        unwatch = watch_launcher((*signals, signal.SIGTERM)[0])  # a launcher killed alone stops the run
        try:
            early.hand_over(preemption)  # from here a signal ends the run at a step boundary, with a checkpoint
            return train_loop(run, preemption)
        except RuntimeError as err:  # a collective that failed because another process ended: said so
            processes, precision = run.accelerator.num_processes, run.accelerator.mixed_precision
            latest = checkpoints.latest_checkpoint(run.config.output_dir)
            lost = PeerLost.lost(err, processes, latest, resume_command(sys.argv[1:], processes, precision))
            if lost is None:
                raise
            raise lost from err
        finally:
            preemption.restore()
            if unwatch is not None:
                unwatch()
            if run.lock is not None:
                run.lock.release()  # ... to its end (or the process's, whichever comes first)


class RunComplete(Exception):
    """The resumed run is complete: nothing to train or write (`summary`: its training_summary.json)."""

    def __init__(self, summary: dict):
        super().__init__("the run is complete")
        self.summary = summary


@dataclass
class Plan:
    """What `check_run` found before any data is read or anything written."""

    config: TrainingConfig  # resolved but for the data's defaults (the batch size and the warmup)
    facts: RunFacts
    channels: int | None  # None: the preset adapts to the data's channels
    resolution: int
    scheduler: HFDDPMScheduler
    record: RunRecord | None  # the resumed checkpoint's
    output: output_dir.OutputDir


def check_run(given: TrainingConfig) -> Plan:
    """Every check that needs no data and writes nothing (see the module docstring)."""
    check_publish(given)
    check_token(given)
    check_dataset_reachable(given.dataset_name)  # in seconds, not after datasets' retries
    if given.cache_dir is not None:  # an existing one is used as it is (a built cache on read-only storage is read)
        check_writable("cache_dir", given.cache_dir, "directory")
    path = checkpoints.resolve_resume(given.resume_from_checkpoint, given.output_dir)
    record = RunRecord.read(path) if path else None
    if record is not None:
        checkpoints.check_whole(path, record)  # each state file as written: not deleted, not truncated
    channels, resolution = data_shape(given)
    facts = RunFacts(
        launch_precision=launch_precision(),
        pretrained_scheduler=pretrained_scheduler_config(given),
        resume_path=path,
        resumed_precision=record.launch.mixed_precision if record else None,
        resumed_schedule=record.schedule if record else None,
        resumed_options=record.options if record else None,
        model_resolution=resolution,
    )
    config, _ = resolve(given, facts)
    scheduler = build_scheduler(config)
    unet = build_unet(config, channels, resolution)
    check_forward(unet, resolution, config.model_source, given.resolution is not None)
    found = output_dir.check_output_dir(config)
    # accelerate's process count (workers that are not one run are refused). Its set-up is the processes' first
    # collective: after every check that reads the output directory, or a process through it would take the lock
    # while another is still checking the directory, and find it in use.
    facts = replace(facts, num_processes=launch_processes())  # (accelerate's logger logs from here)
    if record is not None:
        current = RunRecord.of_run(0, unet.config, scheduler.config, config, facts.num_processes)
        resume_checks.check_resume(
            path, record, current, skip=("in_channels", "out_channels") if channels is None else ()
        )
        if config.max_train_steps is not None:  # the run's length, known before its data is opened
            check_finished(config, path, record.step, config.max_train_steps)
        newer = [p for step, p in checkpoints.list_checkpoints(given.output_dir) if step > record.step]
        if newer:  # deliberate, as a rule (a diverged run resumed from before it): said, since those are replaced
            logger.warning("resuming %s, older than %s: this run's checkpoints of the same steps replace those",
                           path, ", ".join(map(os.path.basename, newer)))  # fmt: skip
    elif config.resume_from_checkpoint is not None and config.max_train_steps is not None:  # no checkpoint yet
        check_finished(config, None, 0, config.max_train_steps)
    return Plan(config, facts, channels, resolution, scheduler, record, found)


def setup(given: TrainingConfig, cleanups: list | None = None) -> Run:
    """The run `given` asks for, checked, resolved and built; `cleanups` gets what an abrupt end must undo (the
    output directory's lock, and the directory when this run made it)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    tune_process(given.num_threads)
    try:
        plan = check_run(given)  # before the Accelerator: it takes the resolved mixed precision
    except Exception as err:
        setattr(err, EVERY_PROCESS, True)  # every process checks the same options and files: rank 0 says it
        raise
    config = plan.config
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.logger,
        project_config=ProjectConfiguration(config.output_dir, os.path.join(config.output_dir, config.logging_dir)),
        step_scheduler_with_optimizer=False,  # stepped by the loop, once per optimizer step
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if config.compile else None,
    )
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):  # a line per file saved: our own suffices
        logging.getLogger(name).setLevel(logging.WARNING)
    logger.info(accelerator.state, main_process_only=False)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    lock = output_dir.lock_output_dir(config, accelerator)

    def let_go() -> None:  # nothing else written yet when the output directory was new: leave no trace
        if lock is not None:
            lock.release(remove=not os.path.exists(os.path.join(config.output_dir, output_dir.MANIFEST_NAME)))

    if cleanups is not None:
        cleanups.append(let_go)
    try:
        run = _build(given, accelerator, plan)
    except BaseException:
        let_go()
        raise
    run.lock = lock
    return run


def _build(given: TrainingConfig, accelerator, plan: Plan) -> Run:
    set_seed(given.seed)  # the same initial weights on every process
    scheduler, resolution = plan.scheduler, plan.resolution
    options = resume_checks.data_options(plan.config)
    guard = resume_checks.data_guard(plan.facts.resume_path, plan.record, given.allow_data_change, options)
    data = load_training_data(plan.config, accelerator, resolution, plan.channels, guard)  # the cache: once per machine
    config, notes = resolve(given, replace(plan.facts, train_images=len(data.train)))
    for note in notes:
        logger.info(note)
    if config.eval_bits_per_dim_steps and not len(data.eval):
        raise ValueError("--eval_bits_per_dim_steps needs held-out images, and --eval_size leaves none")
    unet = build_unet(config, data.train.shape[1], resolution)
    logger.info(describe_model(config, unet, scheduler))
    record = RunRecord.of_run(0, unet.config, scheduler.config, config, accelerator.num_processes, data)
    if plan.record is not None:  # the data decided the channels: compare them too, before anything is written
        resume_checks.check_resume(
            plan.facts.resume_path, plan.record, record, allow_data_change=config.allow_data_change
        )
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    batches = make_batches(data, config, accelerator)
    total_steps = optimizer_steps(config, batches.batches_per_epoch)
    if config.resume_from_checkpoint is not None and config.max_train_steps is None:  # epochs: known from the data
        check_finished(config, plan.facts.resume_path, plan.record.step if plan.record else 0, total_steps)

    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        # one fused kernel over all parameters (CUDA, and CPUs since torch 2.4): on the CPU a step of the default
        # per-tensor loop costs ~4x the fused one, ~4% of a digits-16-tiny training step (benchmarks/training.py)
        fused=True if accelerator.device.type in ("cuda", "cpu") else None,
    )
    # Both counts in optimizer steps, whatever the accumulation or the number of processes.
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # dropout differs across processes: accelerate's device_specific seed, wrapped where it would pass numpy's 2**32
    set_seed((config.seed + accelerator.process_index) % 2**32)
    ema = None
    if config.use_ema:  # created after `prepare`: from the weights DDP broadcast, on the device
        ema = EMAModel(
            accelerator.unwrap_model(unet).parameters(),
            decay=config.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=config.ema_inv_gamma,
            power=config.ema_power,
            foreach=True,
        )
    num_steps = scheduler.config.num_train_timesteps
    sampler = LossSecondMomentResampler(num_steps) if config.importance_sampling else UniformSampler(num_steps)
    # Checkpointed besides accelerate's own state, in this order (the record is a file of its own, by name).
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if config.importance_sampling:
        accelerator.register_for_checkpointing(sampler)
    if isinstance(batches, StreamingBatches):
        accelerator.register_for_checkpointing(batches)  # the stream's position
    start = plan.record.step if plan.record is not None else 0
    last_checkpoint = lambda: checkpoints.latest_checkpoint(config.output_dir)  # noqa: E731
    run = Run(
        config=config, accelerator=accelerator, unet=unet, scheduler=scheduler, optimizer=optimizer,
        lr_scheduler=lr_scheduler, ema=ema, sampler=sampler, batches=batches, eval_images=data.eval,
        record=replace(record, step=start, schedule={**record.schedule, "total_steps": total_steps},
                       seconds=plan.record.seconds if plan.record is not None else 0.0),
        total_steps=total_steps, data_source=data.source,
        nan_guard=NanGuard(config.on_nan, last_checkpoint, grad_scaler=accelerator.scaler is not None),
        resume_path=plan.facts.resume_path,
    )  # fmt: skip
    resume(run)  # a checkpoint that does not load fails here, before anything is written
    output_dir.prepare_output_dir(config, accelerator, plan.output)
    if accelerator.is_main_process:
        accelerator.init_trackers("train")
    return run


def check_finished(config: TrainingConfig, path: str | None, start: int, total_steps: int) -> None:
    """Raise RunComplete for a resume of `path` (None: no checkpoint yet) from step `start` that would only redo its
    finished run's end (a requeued job: not its final evaluation, save and push again, nor its data opened); refuse
    one that would end before the pipeline the output directory holds, or start afresh over it
    (`output_dir.finished_run`)."""
    done = output_dir.finished_run(config.output_dir, path, start, total_steps,
                                   refuse_behind=not config.allow_schedule_change,
                                   latest=config.resume_from_checkpoint == "latest")  # fmt: skip
    if done is None:
        return
    on = ("to train on, pass a longer --max_train_steps with --allow_schedule_change" if path is not None
          else "it kept no checkpoint: to train again, start over with --overwrite_output_dir")  # fmt: skip
    logger.info("%s is complete at step %d (its pipeline and training_summary.json are written): nothing to train or "
                "save; %s", config.output_dir, total_steps, on)  # fmt: skip
    if config.push_to_hub:  # its push was not retried either (the first may have failed after the save)
        logger.info("to push it: %s", retry_command(config.output_dir, repo_id_of(config), config.hub_private_repo))
    raise RunComplete(done)


def resume(run: Run) -> None:
    """Load the checkpoint that `check_run` found for --resume_from_checkpoint, if any (all processes)."""
    if run.resume_path is None:
        if run.config.resume_from_checkpoint is not None:
            logger.info("no checkpoint in %s yet: starting a new run", run.config.output_dir)
        return
    try:
        run.accelerator.load_state(run.resume_path)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # a state file of its recorded size that does not load (overwritten in place)
        said = one_line(err).split(". ")[0]  # torch's first sentence: its further advice is for intact files
        error = checkpoints.damaged(run.resume_path, f"its state does not load ({type(err).__name__}: {said})")
        setattr(error, EVERY_PROCESS, True)  # each process loads the shared files alike: rank 0 says it
        raise error from err
    if run.ema is not None:  # accelerate loads the EMA weights on the CPU: back to the training device
        run.ema.to(device=run.accelerator.device)
    # accelerate restores its micro-step counter; set it from the step so accumulation windows line up regardless.
    run.accelerator.step = run.record.step * run.config.gradient_accumulation_steps
    logger.info("resumed from %s at optimizer step %d", run.resume_path, run.record.step)
