"""Atomic training checkpoints: write `checkpoint-<step>.tmp`, rename to `checkpoint-<step>`, prune old ones.

A checkpoint is `accelerator.save_state` (model, optimizer, LR schedule, grad scaler, each process's RNG states)
plus the objects registered with `accelerator.register_for_checkpointing`: the run's progress, the EMA weights and
the importance sampler's history. Only complete checkpoints carry the final name, so a run killed while writing
never leaves one that `latest` would pick. The output directory must be shared by all processes (one file system).
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from ..atomic import TMP_SUFFIX, is_staging, remove_dir, replace_dir, staging_name
from ..hub import PIPELINE_REPLACED, PIPELINE_STAGING
from .faults import any_process_failed, describe

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first; `*.tmp` directories are not listed."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


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
    raise ValueError(
        f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such checkpoint directory "
        f"(nor in {output_dir}); use 'latest' or one of {[p for _, p in list_checkpoints(output_dir)]}"
    )


# What a run killed while writing may leave besides `checkpoint-*.tmp`: a pipeline being swapped in (hf_ddpm/hub.py)
# and files written through a temporary name (loop.py).
INCOMPLETE_NAMES = (
    PIPELINE_STAGING,
    PIPELINE_REPLACED,
    staging_name("samples.png"),
    staging_name("training_summary.json"),
)


def remove_incomplete(output_dir: str) -> None:
    """Delete `checkpoint-*.tmp` and the other INCOMPLETE_NAMES left by a killed run (main process only)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if (name.startswith("checkpoint-") and name.endswith(TMP_SUFFIX)) or name in INCOMPLETE_NAMES:
            logger.info("removing %s, left incomplete by an earlier run", name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


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


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """Every process writes its part into `checkpoint-<step>.tmp`; the main process then renames it (atomic on one
    file system) and prunes to `total_limit`. Call on all processes.

    An error on any process (disk full, a read-only or unwritable directory, ...) removes the `.tmp` directory and raises
    CheckpointWriteError on every process, naming the path and the checkpoint that is kept."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = staging_name(final)
    previous = latest_checkpoint(output_dir)
    main = accelerator.is_main_process
    error = _attempt(_create, tmp) if main else None
    failed = any_process_failed(accelerator, error is not None)  # also the barrier: the directory exists
    if not failed:
        error = _attempt(accelerator.save_state, tmp)
        failed = any_process_failed(accelerator, error is not None)  # all parts are written
    if not failed and main:
        error = _attempt(replace_dir, tmp, final)  # an existing one: the same step from an earlier attempt
    if not failed:
        failed = any_process_failed(accelerator, error is not None)
    if failed:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(error, step, final, previous, output_dir) from error
    if main:
        logger.info("saved %s", final)
        prune_checkpoints(output_dir, total_limit)
    return final


class TrainProgress:
    """Where the run is: the optimizer step (the data position and random streams follow from it); the run's
    shape, to warn when a checkpoint is resumed with another batch size; and what a resume must agree on, read
    back before the run starts (hf_ddpm/training/preflight.py): the UNet config and objective (`run_config`) and
    the mixed precision. Plain types only, so that `torch.load(weights_only=True)` reads it."""

    def __init__(self, run_config: dict | None = None, mixed_precision: str | None = None, **run_shape):
        self.global_step = 0
        self.run_shape = dict(run_shape)
        self.run_config, self.mixed_precision = run_config or {}, mixed_precision
        self.loaded_shape: dict | None = None

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "run_shape": self.run_shape,
            "run_config": self.run_config,
            "mixed_precision": self.mixed_precision,
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.loaded_shape = dict(state.get("run_shape", {}))
        changed = {k: (v, self.run_shape.get(k)) for k, v in self.loaded_shape.items() if self.run_shape.get(k) != v}
        if changed:
            logger.warning(
                "resuming with a different run shape %s (checkpoint value, now): the data order and the "
                "random streams after step %d differ from the original run",
                changed,
                self.global_step,
            )


class EMAState:
    """Checkpoints an `EMAModel` and puts its weights back on the training device (accelerate loads on the CPU)."""

    def __init__(self, ema, device):
        self.ema, self.device = ema, device

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
        self.ema.to(device=self.device)
