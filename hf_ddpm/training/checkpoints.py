"""Atomic training checkpoints with a named run record (what a resume must agree on with it: resume_checks.py).

A checkpoint is `accelerator.save_state` (model, optimizer, LR schedule, grad scaler, each process's RNG states),
the objects registered with `accelerator.register_for_checkpointing` (the EMA weights, the importance sampler's
history, a stream's position), and `run_record.json`: the step and what the run was (`RunRecord`), read by name
before a resume starts. It is written into `checkpoint-<step>.tmp`, which is then renamed to `checkpoint-<step>`:
only complete checkpoints carry the final name, so a run killed while writing never leaves one that `latest` would
pick. The output directory must be shared by all processes (one file system).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, replace

from ..atomic import describe, is_staging, remove_dir, remove_path, replace_dir, staging_name, write_atomically
from ..data import DataIdentity, data_identity
from ..hub import PIPELINE_REPLACED, PIPELINE_STAGING
from ..launch import any_process_failed, cpu_requested, launched_by_accelerate
from ..model_card import TRAINING_SUMMARY_FILE
from .config import DATA_OPTIONS, SCHEDULE_OPTIONS, STATE_OPTIONS
from .interruptions import require_finite_weights

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first; `*.tmp` directories are not listed."""
    if not os.path.isdir(output_dir):
        return []
    named = ((CHECKPOINT_RE.match(name), os.path.join(output_dir, name)) for name in os.listdir(output_dir))
    return sorted((int(match.group(1)), path) for match, path in named if match and os.path.isdir(path))


def latest_checkpoint(output_dir: str) -> str | None:
    return next((path for _, path in reversed(list_checkpoints(output_dir))), None)


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """The checkpoint directory to resume from: `latest` (None when there is none yet: a fresh start) or a path,
    absolute or relative to the working directory or to `output_dir`."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    for path in (resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)):
        if os.path.isdir(path):
            if is_staging(path):
                raise ValueError(f"{path} is an incomplete checkpoint (its run stopped while writing it)")
            return path
    found = [p for _, p in list_checkpoints(output_dir)]
    choices = f"use 'latest' or one of {found}" if found else (
        f"{output_dir} holds no checkpoints: name a checkpoint directory that exists, or pass 'latest' (which "
        "starts a new run when there is none)"
    )  # fmt: skip
    raise ValueError(
        f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such checkpoint directory (nor in {output_dir}); "
        f"{choices}"
    )


# What a run killed while writing may leave besides `checkpoint-*.tmp`: a pipeline being swapped in (hf_ddpm/hub.py)
# and files written through a temporary name (loop.py).
INCOMPLETE_NAMES = (
    PIPELINE_STAGING,
    PIPELINE_REPLACED,
    staging_name("samples.png"),
    staging_name(TRAINING_SUMMARY_FILE),
)


def remove_incomplete(output_dir: str) -> None:
    """Delete `checkpoint-*.tmp` and the other INCOMPLETE_NAMES left by a killed run (main process only)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if (name.startswith("checkpoint-") and is_staging(name)) or name in INCOMPLETE_NAMES:
            logger.info("removing %s, left incomplete by an earlier run", name)
            remove_path(path)


def prune_checkpoints(output_dir: str, total_limit: int | None) -> list[str]:
    """Keep the newest `total_limit` complete checkpoints; returns the removed paths. Each is renamed to `*.tmp`
    before it is deleted, so a run killed while deleting never leaves a half-deleted checkpoint under its name."""
    if total_limit is None:
        return []
    removed = [path for _, path in list_checkpoints(output_dir)[:-total_limit]]
    for path in removed:
        remove_dir(path)
    if removed:
        logger.info("checkpoints_total_limit=%d: removed %s", total_limit, ", ".join(map(os.path.basename, removed)))
    return removed


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only or unwritable directory, ...); the earlier
    checkpoints are untouched and nothing of the failed one is left behind."""


def _attempt(action, *args) -> Exception | None:
    """Run `action`; return what it raised. Not only OSError: on a full disk torch.save raises RuntimeError and
    safetensors its own SafetensorError."""
    try:
        action(*args)
    except Exception as err:
        return err
    return None


def _create(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)


def _write_error(error: Exception | None, step: int, final: str, previous: str | None, output_dir: str):
    errno = getattr(error, "errno", None)
    reason = describe(error) if error is not None else "another process failed to write its part"
    kept = f"the previous checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
    message = (
        f"could not write the step-{step} checkpoint {final} ({reason}); nothing of it was kept and {kept}. "
        f"Free space in (or make writable) {output_dir}, then run again with --resume_from_checkpoint latest"
    )
    return CheckpointWriteError(errno, message) if errno else CheckpointWriteError(message)


def save_checkpoint(accelerator, output_dir: str, record: RunRecord, total_limit: int | None = None) -> str:
    """Every process writes its part into `checkpoint-<step>.tmp`, the main process the run record; it then renames
    the directory (atomic on one file system) and prunes to `total_limit`. Call on all processes.

    An error on any process (disk full, a read-only or unwritable directory, ...) removes the `.tmp` directory and raises
    CheckpointWriteError on every process, naming the path and the checkpoint that is kept."""
    final = os.path.join(output_dir, f"checkpoint-{record.step}")
    tmp, previous, main = staging_name(final), latest_checkpoint(output_dir), accelerator.is_main_process
    # Each part on the processes that write it (`replace_dir`: an existing one is the same step from an earlier
    # attempt), then a barrier at which every process hears whether any part failed anywhere.
    parts = (
        (main, _create, tmp),
        (True, accelerator.save_state, tmp),
        (main, record.write, tmp),
        (main, replace_dir, tmp, final),
    )
    for writes, action, *args in parts:
        error = _attempt(action, *args) if writes else None
        if any_process_failed(accelerator, error is not None):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(error, record.step, final, previous, output_dir) from error
    if main:
        logger.info("saved %s", final)
        prune_checkpoints(output_dir, total_limit)
    return final


# ------------------------------------------------------------------------------------------------ the run record

RUN_RECORD = "run_record.json"
RECORDED_OPTIONS = (*STATE_OPTIONS, *DATA_OPTIONS)  # the record's `options`; the seed is in its `batch`
OBJECTIVE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "variance_type")
# What the checkpoint's state files hold (an EMA model or none, the importance sampler's history or none): a resume
# must agree, or the state does not load.
STATE_CONTENTS = ("use_ema", "importance_sampling")


@dataclass(frozen=True)
class Launch:
    """How the run was launched: its data order and random streams follow from the process count, its numerics from the
    precision; the launcher and the CPU choice make the printed resume command reproduce the launch. A launch-shape
    fact the record should also hold goes here (a field with a default, so that records written before it still read)."""

    num_processes: int
    mixed_precision: str
    accelerate: bool = False  # started by `accelerate launch` (else by `python`)
    cpu: bool = False  # the CPU asked for (`accelerate launch --cpu`, ACCELERATE_USE_CPU=1)


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint records about its run (`run_record.json`), read back before a resume starts: the step,
    the UNet's config and the objective (they must match), the launch (the process count must match, the precision
    is restored), the batch shape and seed (a change is allowed, with a warning: the data order differs), the data
    (a change is refused unless --allow_data_change), the run's length and LR schedule, and its options (its AdamW
    and EMA settings, kept by a resume: `resolve.resolve`; those that shape its data, named when the data differs:
    `check_data`)."""

    step: int
    unet: dict
    objective: dict  # the scheduler's OBJECTIVE_KEYS and the loss
    launch: Launch
    batch: dict  # train_batch_size, gradient_accumulation_steps, seed
    data: DataIdentity = DataIdentity()
    schedule: dict = dataclasses.field(default_factory=dict)  # SCHEDULE_OPTIONS and total_steps (the run's length)
    state: dict = dataclasses.field(default_factory=dict)  # options that decide what the state holds (STATE_CONTENTS)
    options: dict = dataclasses.field(default_factory=dict)  # RECORDED_OPTIONS (absolute paths, as training_args.json)
    # {name: size} of the checkpoint's state files, listed by `write` (`damage`); not part of what the run was
    files: dict = dataclasses.field(default_factory=dict, compare=False)
    seconds: float = dataclasses.field(default=0.0, compare=False)  # trained up to `step`, over every resumed part

    @classmethod
    def of_run(cls, step: int, unet_config: dict, scheduler_config: dict, config, num_processes: int,
               data=None) -> RunRecord:  # fmt: skip
        """The record of a run: its UNet and scheduler configs, its (resolved) config, its launch (this process's),
        and once it is known its data (`load_training_data`'s); its length in optimizer steps is filled in once the
        batches are made."""
        return cls(
            step=step,
            unet={k: _plain(v) for k, v in unet_config.items() if not k.startswith("_")},
            objective={**{k: _plain(scheduler_config[k]) for k in OBJECTIVE_KEYS}, "loss": config.loss},
            launch=Launch(num_processes, config.mixed_precision, launched_by_accelerate(), cpu_requested()),
            batch={"train_batch_size": config.train_batch_size,
                   "gradient_accumulation_steps": config.gradient_accumulation_steps, "seed": config.seed},
            data=data_identity(data) if data is not None else DataIdentity(),
            schedule={**{k: getattr(config, k) for k in SCHEDULE_OPTIONS}, "total_steps": None},
            state={k: getattr(config, k) for k in STATE_CONTENTS},
            options={k: v for k, v in config.to_json(absolute=True).items() if k in RECORDED_OPTIONS},
        )  # fmt: skip

    def write(self, checkpoint: str) -> None:
        """Into `checkpoint` once every process wrote its state there, listing the state's files and sizes."""
        files = {e.name: e.stat().st_size for e in sorted(os.scandir(checkpoint), key=lambda e: e.name) if e.is_file()}
        values = dataclasses.asdict(replace(self, files=files))
        write_atomically(os.path.join(checkpoint, RUN_RECORD), lambda f: json.dump(values, f))

    @classmethod
    def read(cls, checkpoint: str) -> RunRecord:
        """The record of a checkpoint, by name; a checkpoint without one is refused, saying why."""
        path = os.path.join(checkpoint, RUN_RECORD)
        state = ("model", "pytorch_model", "optimizer", "random_states_")  # what accelerate's save_state writes
        if not os.path.isfile(path) and not any(name.startswith(state) for name in os.listdir(checkpoint)):
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint} is not a checkpoint (it holds no {RUN_RECORD} and no saved "
                "training state): name a checkpoint-<step> folder that a run wrote, or 'latest'"
            )
        if not os.path.isfile(path):
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint} holds no {RUN_RECORD}: it was written by an earlier version "
                "of hf_ddpm, whose checkpoints this one cannot check or resume; resume it with that version, or start "
                "a new run (--overwrite_output_dir)"
            )
        with open(path) as f:
            values = json.load(f)
        return cls(**{**values, "launch": Launch(**values["launch"]), "data": DataIdentity(**values.get("data", {}))})


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def damage(checkpoint: str, record: RunRecord) -> str | None:
    """What is wrong with the state files of `checkpoint` that its record lists (a file deleted, truncated or
    replaced by one of another size since it was written), or None (a record of an earlier version lists none)."""
    for name, size in record.files.items():
        path = os.path.join(checkpoint, name)
        found = os.path.getsize(path) if os.path.isfile(path) else None
        if found != size:
            return f"{name} is missing" if found is None else f"{name} holds {found} bytes, not the {size} written"
    return None


def whole_checkpoints(output_dir: str):
    """(path, record) of each checkpoint in `output_dir` whose record reads and whose files are whole, newest first."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            saved = RunRecord.read(path)
        except (ValueError, OSError, TypeError, KeyError):
            continue
        if damage(path, saved) is None:
            yield path, saved


def check_whole(checkpoint: str, record: RunRecord) -> None:
    """Refuse to resume a damaged checkpoint (before anything is loaded or written), naming the file and the newest
    whole checkpoint beside it, if any."""
    wrong = damage(checkpoint, record)
    if wrong is not None:
        raise damaged(checkpoint, wrong)


def damaged(checkpoint: str, wrong: str) -> ValueError:
    """The error for a damaged checkpoint: what is `wrong`, and the newest whole checkpoint beside it, if any."""
    here = os.path.realpath(checkpoint)
    other = next((p for p, _ in whole_checkpoints(os.path.dirname(here)) if os.path.realpath(p) != here), None)
    way_out = f"resume the newest whole one, --resume_from_checkpoint {other}, or" if other else "none is whole:"
    return ValueError(f"the checkpoint {checkpoint} is damaged: {wrong}; {way_out} start a new run")


# ------------------------------------------------------------------------------------------------ a run's checkpoints
# `run`: the loop's Run (its config, accelerator, weights, EMA and record).


def checkpoint_of_last_step(run, step: int) -> str | None:
    """The checkpoint of `step` for a stop: written now (all processes) unless the periodic save or the resumed
    checkpoint holds it already; None when no step was ever trained."""
    if step == run.record.step:  # nothing trained by this process: the checkpoint it resumed, if any
        return run.resume_path
    if step % run.config.checkpointing_steps == 0:
        return os.path.join(run.config.output_dir, f"checkpoint-{step}")
    return save_run_checkpoint(run, step)


def save_run_checkpoint(run, step: int) -> str:
    """A checkpoint of `step` (all processes), never of weights that are not finite."""
    require_finite_weights(run.model, run.ema, step, f"checkpoint-{step}")
    record = replace(run.record, step=step, seconds=run.trained_seconds())
    return save_checkpoint(run.accelerator, run.config.output_dir, record, run.config.checkpoints_total_limit)
