"""Resolving a run: the config as given plus the facts of the run -> the config it trains with.

`parse_args` leaves None wherever a value depends on the run. `resolve` fills each such value from `RunFacts` (the
pretrained scheduler, the resumed checkpoint's record, the launch, the number of training images), with its reason
beside it, and returns a new frozen config (`dataclasses.replace`); the checks run on that result as on any config.
Nothing changes a config afterwards: the resolved one trains, and it is what training_args.json holds.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace

import torch

from ..losses import default_variance_type
from ..scheduler import HFDDPMScheduler
from ..schedules import PAPER_NUM_TIMESTEPS, SCHEDULE_ALIASES
from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_INFERENCE_STEPS,
    DEFAULT_SAVE_IMAGES_EPOCHS,
    DEFAULT_WARMUP_STEPS,
    NEW_RUN_SCHEDULE,
    NEW_RUN_STATE,
    STATE_OPTIONS,
    STREAMING_LENGTH,
    TrainingConfig,
)


@dataclass(frozen=True)
class RunFacts:
    """What a run knows besides its options: the pretrained scheduler's config (fine-tuning), the launch, the
    checkpoint it resumes, the UNet's sample size, and (once read) the number of training images."""

    num_processes: int = 1
    launch_precision: str = "no"  # `launch_precision()`
    pretrained_scheduler: dict | None = None
    resume_path: str | None = None
    resumed_precision: str | None = None  # the mixed precision the resumed checkpoint was trained with
    resumed_schedule: dict | None = None  # the resumed run's SCHEDULE_OPTIONS and total_steps (its record's)
    resumed_options: dict | None = None  # the resumed run's recorded options (its record's: STATE_OPTIONS, ...)
    train_images: int | None = None  # None until the data is read: the batch and warmup defaults wait for it
    model_resolution: int | None = None  # the UNet's sample_size (model.data_shape): the images' default side


def optimizer_steps(config: TrainingConfig, batches_per_epoch: int) -> int:
    """The run's length in optimizer steps: --max_train_steps, else --num_epochs passes over the data."""
    return config.max_train_steps or math.ceil(
        config.num_epochs * batches_per_epoch / config.gradient_accumulation_steps
    )


def resolve(given: TrainingConfig, facts: RunFacts) -> tuple[TrainingConfig, list[str]]:
    """The config the run trains with: `given` with every run-dependent default filled in from `facts`, checked
    as any config is; and a line for each default that the run changed (for the log). Reads nothing but `facts`
    (and, for fp16, whether CUDA is available)."""
    values, notes = {}, []
    given = _keep_schedule(given, facts, notes)
    given = _keep_state(given, facts, notes)

    # The objective: a pretrained scheduler's values (a flag must agree: fine-tuning keeps its process), else the
    # paper's (DDPM section 4: T = 1000, linear β from 1e-4 to 0.02, ε-prediction; section 3.2: fixed β̃_t variance).
    objective = {"ddpm_num_steps": PAPER_NUM_TIMESTEPS, "ddpm_beta_schedule": "linear", "prediction_type": "epsilon",
                 "variance_type": default_variance_type(given.loss)}  # fmt: skip
    for name, default in objective.items():
        value = getattr(given, name)
        if facts.pretrained_scheduler is not None:
            key = TrainingConfig.__dataclass_fields__[name].metadata["key"]
            kept = facts.pretrained_scheduler[key]
            if value is not None and SCHEDULE_ALIASES.get(value, value) != kept:
                raise ValueError(
                    f"fine-tuning keeps the pretrained scheduler's {key}={kept!r}; "
                    f"--{name} {value} differs (drop it, from the flags or the --config file; or train from scratch)"
                )
            default = kept
        values[name] = default if value is None else value
    T = values["ddpm_num_steps"]
    values["ddpm_num_inference_steps"] = given.ddpm_num_inference_steps or min(DEFAULT_INFERENCE_STEPS, T)
    # The sampling chain's spacing and the images' side: the pretrained scheduler's and the UNet's, else the defaults.
    spacing = inspect.signature(HFDDPMScheduler).parameters["timestep_spacing"].default
    pretrained = facts.pretrained_scheduler or {}
    values["timestep_spacing"] = given.timestep_spacing or pretrained.get("timestep_spacing", spacing)
    values["resolution"] = given.resolution or facts.model_resolution
    if given.save_images_steps is None and given.save_images_epochs is None:
        values["save_images_epochs"] = DEFAULT_SAVE_IMAGES_EPOCHS

    # Mixed precision: a resumed run keeps its checkpoint's (the numerics it trained with, and its gradient scaler's
    # state with fp16); a flag that contradicts it is refused; else what the launcher says.
    saved = facts.resumed_precision
    if given.mixed_precision is not None and saved is not None and given.mixed_precision != saved:
        raise ValueError(
            f"--mixed_precision {given.mixed_precision}: the checkpoint {facts.resume_path} was trained with "
            f"--mixed_precision {saved}; drop the flag to resume in {saved}, or start a new run"
        )
    values["mixed_precision"] = given.mixed_precision or saved or facts.launch_precision
    if given.mixed_precision is None and saved is not None and saved != facts.launch_precision:
        if saved == "fp16" and not torch.cuda.is_available():
            raise ValueError(
                f"the checkpoint {facts.resume_path} was trained with --mixed_precision fp16, which needs a CUDA GPU, "
                "and none is available: resume it on a machine with one, or start a new run"
            )
        notes.append(f"--mixed_precision {saved} restored from {facts.resume_path} (the launch said "
                     f"{facts.launch_precision})")  # fmt: skip

    # The batch and the warmup fit the data: a small folder, or a short run, trains without flags. The run's length
    # is known before the data is read when given in steps; in epochs, once the data is read.
    total = given.max_train_steps
    if facts.train_images is not None:
        world, batch = facts.num_processes, given.train_batch_size
        if batch is None:
            batch = max(1, min(DEFAULT_BATCH_SIZE, facts.train_images // world))
            if batch < DEFAULT_BATCH_SIZE:
                notes.append(f"--train_batch_size {batch} (the default {DEFAULT_BATCH_SIZE}, capped: "
                             f"{facts.train_images} training images over {world} processes)")  # fmt: skip
        values["train_batch_size"] = batch
        per_epoch = facts.train_images // (batch * world)
        total = optimizer_steps(given, per_epoch) if per_epoch else None  # None: the batches refuse the data
        warmup = given.lr_warmup_steps
        if warmup is None and total is not None:
            warmup = DEFAULT_WARMUP_STEPS if DEFAULT_WARMUP_STEPS <= total else total // 10
            if warmup != DEFAULT_WARMUP_STEPS:
                notes.append(f"--lr_warmup_steps {warmup} (the default {DEFAULT_WARMUP_STEPS} is longer than the "
                             f"run's {total} steps: a tenth of it)")  # fmt: skip
        values["lr_warmup_steps"] = warmup
    if given.lr_warmup_steps is not None and total is not None and given.lr_warmup_steps > total:
        raise ValueError(f"--lr_warmup_steps {given.lr_warmup_steps} exceeds the run's {total} optimizer steps")
    return replace(given, **values), notes


def _keep_schedule(given: TrainingConfig, facts: RunFacts, notes: list[str]) -> TrainingConfig:
    """`given` with the run's length and LR schedule where it gives none: a new run's defaults, or the resumed run's
    (a resume finishes its run: an 80-step run would otherwise become --num_epochs' length on a new LR schedule). A
    flag given that changes them is refused, naming it, unless --allow_schedule_change."""
    saved = facts.resumed_schedule
    if not saved or saved.get("total_steps") is None:  # a fresh run (or a record without its length)
        if given.streaming and given.max_train_steps is None:
            raise ValueError(STREAMING_LENGTH)
        return replace(given, **{k: v for k, v in NEW_RUN_SCHEDULE.items() if getattr(given, k) is None})
    total, path, by_epochs = saved["total_steps"], facts.resume_path, saved["max_train_steps"] is None
    changed = []
    if given.max_train_steps is not None and given.max_train_steps != total:
        changed.append(f"--max_train_steps {given.max_train_steps} (the run's length: {total} optimizer steps)")
    elif by_epochs and given.max_train_steps is None and given.num_epochs not in (None, saved["num_epochs"]):
        changed.append(f"--num_epochs {given.num_epochs} (the run's: {saved['num_epochs']}, {total} optimizer steps)")
    elif given.max_train_steps is None and given.num_epochs is not None and not by_epochs:  # a length in epochs now
        changed.append(f"--num_epochs {given.num_epochs} (the run's length: {total} optimizer steps, by "
                       "--max_train_steps)")  # fmt: skip
    for name in ("lr_scheduler", "lr_warmup_steps"):
        if getattr(given, name) not in (None, saved[name]):
            changed.append(f"--{name} {getattr(given, name)} (the run's: {saved[name]})")
    if changed and not given.allow_schedule_change:
        raise ValueError(
            f"the run of {path} is {total} optimizer steps long on its LR schedule, and a resume keeps both: "
            f"{'; '.join(changed)}. Drop the flag to finish the run as it began, or pass --allow_schedule_change to "
            "train on with it (the LR schedule is then recomputed over the new length)"
        )
    kept = {k: saved[k] for k in ("lr_scheduler", "lr_warmup_steps", "num_epochs") if getattr(given, k) is None}
    if given.max_train_steps is None and not any(c.startswith("--num_epochs") for c in changed):
        kept["max_train_steps"] = total
    notes += [f"--{k} {v}: the resumed run's (from {path})" for k, v in kept.items() if k != "num_epochs"]
    # The restored optimizer and LambdaLR hold the run's peak learning rate: a flag is said, not applied.
    kept["learning_rate"] = saved.get("learning_rate") or given.learning_rate or NEW_RUN_SCHEDULE["learning_rate"]
    if given.learning_rate not in (None, kept["learning_rate"]):
        notes.append(f"--learning_rate {given.learning_rate} is not applied: the resumed optimizer and LR schedule "
                     f"restore the run's peak learning rate, {kept['learning_rate']}")  # fmt: skip
    if changed:
        notes.append(f"--allow_schedule_change: {'; '.join(changed)}: the LR schedule is recomputed over the new "
                     "length, so from the resumed step on its learning rate differs from the original run's")  # fmt: skip
    return replace(given, **kept)


def _keep_state(given: TrainingConfig, facts: RunFacts, notes: list[str]) -> TrainingConfig:
    """`given` with the AdamW and EMA settings (STATE_OPTIONS) a flag leaves out: a new run's (NEW_RUN_STATE), or
    the resumed run's (its record's). The restored optimizer and EMA hold the run's and would override a flag unseen,
    so a resume keeps them and says which flag given is not applied, as --learning_rate is. A record written before
    it held them leaves the flags as given."""
    saved = {k: v for k, v in (facts.resumed_options or {}).items() if k in STATE_OPTIONS}
    values = {}
    for name in STATE_OPTIONS:
        flag = getattr(given, name)
        values[name] = saved.get(name, NEW_RUN_STATE[name] if flag is None else flag)
        if flag is not None and flag != values[name]:
            holder = "optimizer" if name.startswith("adam_") else "EMA"
            notes.append(f"--{name} {flag} is not applied: the resumed {holder} restores the run's --{name} "
                         f"{values[name]}")  # fmt: skip
    return replace(given, **values)
