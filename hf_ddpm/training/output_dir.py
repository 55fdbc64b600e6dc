"""One run per output directory, and a directory that is ours or empty.

- `lock_output_dir`: an exclusive lock on `<output_dir>/.hf_ddpm.lock` (hf_ddpm/file_lock.py), held by the main
  process for the whole run. The kernel releases it when the process ends, however it ends (a SIGKILLed run never
  leaves a stale lock). A second run on the directory is refused at once, naming the holder's PID and host.
- `check_output_dir`: read-only, before anything is loaded or written. An empty or new directory is fine; one that
  holds an earlier run of ours (our manifest, or the files an older version wrote) needs --resume_from_checkpoint
  or --overwrite_output_dir; any other non-empty directory is refused, naming a few of its files, unless
  --allow_nonempty_output_dir is given, and even then a file whose name a run writes is refused, never replaced.
- `prepare_output_dir`: once everything is checked, write the manifest (`.hf_ddpm-manifest.json`: the files that
  were there before us) and, for --overwrite_output_dir, remove what an earlier run of ours wrote, never a file of
  someone else's; then remove what a killed run left half-written, and write training_args.json.
- `finished_run`: a resume must not end before the step of the pipeline the directory holds (or its pipeline would
  replace newer weights with older ones), and one that would only redo a finished run's end has nothing to do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import time
from dataclasses import dataclass, field

from ..atomic import describe, remove_path, staging_name, write_atomically
from ..file_lock import FileLock, LockHeld, holder_of
from ..launch import raise_if_any_failed
from ..model_card import TRAINING_SUMMARY_FILE
from ..remote_code import PIPELINE_PREFIX
from .checkpoints import INCOMPLETE_NAMES, remove_incomplete  # the staging names a killed run leaves
from .config import TrainingConfig

LOCK_NAME = ".hf_ddpm.lock"
MANIFEST_NAME = ".hf_ddpm-manifest.json"
# Top-level names a run writes (checkpoints, the pipeline, samples, logs, the run's records, their temporary names).
RUN_PATTERNS = ("checkpoint-*", "unet", "scheduler", "model_index.json", f"{PIPELINE_PREFIX}_*.py", "samples",
                "samples.png", "training_args.json", TRAINING_SUMMARY_FILE, *INCOMPLETE_NAMES, LOCK_NAME,
                MANIFEST_NAME, staging_name(MANIFEST_NAME))  # fmt: skip
# What an earlier run of ours leaves even without a manifest (written by versions before it existed).
RUN_MARKERS = ("checkpoint-*", "training_args.json", "model_index.json")
# What a run killed while it wrote leaves besides the lock: never someone else's files, nor a run to resume (a run
# killed while it wrote its first manifest left nothing else).
LEFT_BY_A_KILL = (*INCOMPLETE_NAMES, staging_name(MANIFEST_NAME))


class OutputDirError(ValueError):
    """The output directory cannot be used by this run (another run holds it, or it holds someone else's files)."""


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def run_patterns(logging_dir: str) -> tuple[str, ...]:
    """RUN_PATTERNS plus the first component of --logging_dir (when it lies inside the output directory)."""
    if os.path.isabs(logging_dir) or logging_dir.startswith(".."):
        return RUN_PATTERNS
    return (*RUN_PATTERNS, os.path.normpath(logging_dir).split(os.sep)[0])


@dataclass
class OutputDir:
    """What `check_output_dir` found: whether an earlier run of ours is there, and the entries that are not ours."""

    path: str
    earlier_run: bool
    foreign: list[str] = field(default_factory=list)


def _listing(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_output_dir(args: TrainingConfig) -> OutputDir:
    """Refuse a directory that this run must not use (see the module docstring). Reads only."""
    path = args.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"--output_dir {path} is a file, not a directory")
    holder = holder_of(os.path.join(path, LOCK_NAME))  # reads only
    if holder is not None:  # a live run holds the directory
        raise _in_use(path, holder)
    names = [n for n in _listing(path) if n != LOCK_NAME and n not in LEFT_BY_A_KILL]
    manifest = _manifest(path)
    patterns = run_patterns(args.logging_dir)
    earlier = any(_matches(n, RUN_MARKERS) for n in names)
    if manifest is not None:
        foreign = [n for n in names if n in manifest.get("foreign", [])]
    else:
        foreign = [] if earlier else names
    if earlier and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise OutputDirError(
            f"{path} holds an earlier run; pass --resume_from_checkpoint latest to continue it "
            "or --overwrite_output_dir to start over"
        )
    if manifest is None and foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} entries)" if len(foreign) > 5 else "")
        if not args.allow_nonempty_output_dir:
            raise OutputDirError(
                f"--output_dir {path} is not empty and holds no earlier training run ({shown}); choose a new or "
                "empty directory, or pass --allow_nonempty_output_dir to train beside these files (they are left "
                "untouched)"
            )
        clashes = [n for n in foreign if _matches(n, patterns)]
        if clashes:
            raise OutputDirError(
                f"--output_dir {path} holds {', '.join(clashes)}, which a training run writes; move them away or "
                "choose another directory (--allow_nonempty_output_dir never replaces files that are not ours)"
            )
    return OutputDir(path, earlier, foreign)


def _make_ours(found: OutputDir, args: TrainingConfig) -> None:
    """Remove an earlier run's files for --overwrite_output_dir (only those a run of ours writes) and write the
    manifest naming the files that are not ours."""
    os.makedirs(found.path, exist_ok=True)
    if args.overwrite_output_dir:
        patterns = run_patterns(args.logging_dir)
        for name in _listing(found.path):
            if name in (LOCK_NAME, MANIFEST_NAME) or name in found.foreign or not _matches(name, patterns):
                continue
            remove_path(os.path.join(found.path, name))
    manifest = _manifest(found.path) or {"written_by": "hf_ddpm", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    manifest["foreign"] = sorted(set(manifest.get("foreign", [])) | set(found.foreign))
    write_atomically(os.path.join(found.path, MANIFEST_NAME), lambda f: json.dump(manifest, f, indent=2))


def finished_run(output_dir: str, path: str | None, start: int, total_steps: int, refuse_behind: bool,
                 latest: bool = False) -> dict | None:  # fmt: skip
    """What the pipeline `output_dir` holds (its training_summary.json: the step it finished at) means for a resume of
    `path` from step `start` to `total_steps`: the summary when the resume would only redo that finished end (nothing
    to train or write), else None. With `latest` (a requeued command) that holds from any checkpoint of the run's
    (its last step need not be one); with `path` None (it kept no checkpoint) a run of another length is refused, as
    it would start afresh over that pipeline. One that ends before it is refused (`refuse_behind`: unless the length
    was chosen with --allow_schedule_change): a run extended past its last checkpoint, then resumed as it was, would
    replace those weights with older ones."""
    summary = None
    with contextlib.suppress(OSError, ValueError):  # no pipeline finished there yet
        with open(os.path.join(output_dir, TRAINING_SUMMARY_FILE)) as f:
            summary = json.load(f)
    done = summary.get("optimizer_steps") if isinstance(summary, dict) else None
    if not isinstance(done, int):
        return None
    if path is None:
        if total_steps == done:
            return summary
        raise ValueError(
            f"{output_dir} holds the pipeline of a run finished at step {done} and no checkpoint to resume it from: "
            f"a run of {total_steps} steps here would start afresh and replace it. Choose another --output_dir, or "
            "start over with --overwrite_output_dir"
        )
    if refuse_behind and total_steps < done:
        newer = os.path.join(output_dir, f"checkpoint-{done}")
        way_out = f"Resume {newer}" if os.path.isdir(newer) else f"Keep the pipeline (step {done} has no checkpoint)"
        raise ValueError(
            f"{output_dir} holds the pipeline of step {done} and this resume of {os.path.basename(path)} ends at step "
            f"{total_steps}: its pipeline would replace those weights with older ones. {way_out}, or "
            f"train on past step {done} (--max_train_steps with --allow_schedule_change)"
        )
    caught_up = start <= total_steps if latest else start == total_steps  # `latest`: the run's own last checkpoint
    return summary if caught_up and total_steps == done else None


def _unwritable(directory: str, error: OSError) -> OSError:
    return OSError(f"--output_dir {directory} is not writable ({describe(error)}); choose a writable directory")


def prepare_output_dir(config: TrainingConfig, accelerator, found: OutputDir) -> None:
    """All processes, once the data and the model are known to be good (so that a bad option or input leaves the
    output directory as it was): the main process makes the directory ours (`_make_ours`), cleans up after a killed
    run and records the resolved options (training_args.json)."""
    accelerator.wait_for_everyone()  # every process has looked before the main one changes anything
    error = None
    if accelerator.is_main_process:
        try:
            _make_ours(found, config)
            remove_incomplete(config.output_dir)
            values = config.to_json(absolute=True)  # whole or as it was: evaluate and --config read it
            write_atomically(
                os.path.join(config.output_dir, "training_args.json"), lambda f: json.dump(values, f, indent=2)
            )
        except OSError as err:
            error = _unwritable(config.output_dir, err)
    raise_if_any_failed(accelerator, error, f"write {config.output_dir}")  # also the barrier after the writes


def lock_output_dir(config: TrainingConfig, accelerator) -> FileLock | None:
    """The main process takes the exclusive lock on the output directory (created if missing, and removed again by
    `release(remove=True)` when this run created it), or an OutputDirError naming its holder; every process hears
    whether it could."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = FileLock.take(os.path.join(config.output_dir, LOCK_NAME))
        except LockHeld as held:
            error = _in_use(config.output_dir, held.holder)
        except OSError as err:
            error = _unwritable(config.output_dir, err)
    raise_if_any_failed(accelerator, error, f"lock {config.output_dir}")
    return lock


def _in_use(output_dir: str, holder: str) -> OutputDirError:
    return OutputDirError(
        f"--output_dir {output_dir} is in use by another training run: {holder}. Wait for it to finish "
        "(or stop it), or choose another --output_dir"
    )
