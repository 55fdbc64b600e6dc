"""What a resume must agree on with its checkpoint's run record (checkpoints.RunRecord), checked before it starts.

The model, the objective and what the state holds must match (`differences`: a resume that disagrees could not load
the state, or would train another model); the process count must match (the data order and random streams depend on
it: the refusal prints the launch that resumes it, and names a checkpoint that fits this launch, if any); the data
must be the run's (`check_data`: the options that shape it first, then its identity; `--allow_data_change` goes on,
saying what that means); a new batch shape or seed goes on with a warning.
"""

from __future__ import annotations

import logging
import os
import sys

from ..data import DataIdentity
from ..launch import resume_command
from .checkpoints import RunRecord, whole_checkpoints
from .config import DATA_OPTIONS, TrainingConfig, flag_of_key

logger = logging.getLogger(__name__)


def differences(saved: RunRecord, current: RunRecord, skip=()) -> list[str]:
    """'name: checkpoint value -> this run's' for each difference of model, objective or what the state holds."""
    found = []
    for part, old, new in (("unet", saved.unet, current.unet), ("objective", saved.objective, current.objective),
                           ("state", saved.state, current.state)):  # fmt: skip
        for key in sorted(set(old) | set(new)):
            if key in skip or old.get(key) == new.get(key) or (part == "state" and key not in old):  # older records
                continue
            if key in ("beta_start", "beta_end") and old.get("beta_schedule") != new.get("beta_schedule"):
                continue  # another schedule altogether: said once
            label = (
                {"unet": f"UNet {key}", "state": f"--{key}"}.get(part) or flag_of_key(key) or f"the schedule's {key}"
            )
            found.append(f"{label}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    return found


def fitting_checkpoint(output_dir: str, current: RunRecord, skip=()) -> str | None:
    """The newest whole checkpoint in `output_dir` that this run could resume: its process count, model, objective."""
    for path, saved in whole_checkpoints(output_dir):
        if saved.launch.num_processes == current.launch.num_processes and not differences(saved, current, skip):
            return path
    return None


def check_resume(path: str, saved: RunRecord, current: RunRecord, skip=(), allow_data_change: bool = False) -> None:
    """Refuse a resume whose model, objective, process count or data differs from the checkpoint's, naming each
    difference (a refused process count names the newest checkpoint that fits, if any; a data change goes on with
    `allow_data_change`, with a warning saying what it means); warn when the batch shape or seed differs (allowed:
    the data order then differs)."""
    found = differences(saved, current, skip)
    if found:
        raise ValueError(
            f"--resume_from_checkpoint {path} was trained with another model or objective: {'; '.join(found)}. Resume "
            f"with the options it was trained with (--config {os.path.dirname(path)}/training_args.json holds them), or "
            "start a new run"
        )
    world, now = saved.launch.num_processes, current.launch.num_processes
    if world != now:
        fits = fitting_checkpoint(os.path.dirname(path) or ".", current, skip)
        way_out = (
            f"{os.path.basename(fits)} fits this {now}-process run: --resume_from_checkpoint {fits}; or resume "
            f"{os.path.basename(path)} "
            if fits
            else "resume it "
        )
        # launched as the checkpoint's run was (the preemption message's command): on a CPU, 2 processes need
        # ACCELERATE_USE_CPU=1 and --multi_gpu, which a bare `accelerate launch --num_processes 2` lacks
        launch = saved.launch
        command = resume_command(sys.argv[1:], world, launch.mixed_precision, launch.cpu, launch.accelerate, path)
        raise ValueError(
            f"{os.path.basename(path)} was written by {world} process{'es' * (world != 1)} and this run has {now} (the "
            f"data order and random streams depend on it): {way_out}with `{command}`, or start a new run"
        )
    check_data(path, saved, current.data, allow_data_change, _recorded_data_options(current))
    changed = {k: (v, current.batch.get(k)) for k, v in saved.batch.items() if current.batch.get(k) != v}
    if changed and current.batch.get("train_batch_size") is not None:
        logger.warning(
            "resuming with a different run shape %s (checkpoint value, now): the data order and the random streams "
            "after step %d differ from the original run", changed, saved.step,
        )  # fmt: skip


def check_data(path: str, saved: RunRecord, now: DataIdentity, allow_data_change: bool, options: dict,
               drawn: bool = False) -> None:  # fmt: skip
    """Refuse a resume of `path` on data that changed since (`now`: the data's identity; `drawn`: see
    `DataIdentity.change_since`), naming first the options of this resume that shape the data (`options`:
    `data_options`, the seed with them) where they are not the run's; or with `allow_data_change` go on, warning
    what it means."""
    since = os.path.basename(path)
    change, fix = now.change_since(saved.data, since, drawn), "Restore the data to resume this run"
    changed = _changed_options(saved, options) if change else []
    if changed:  # the options first: once they are the run's, the data
        change, fix = _options_change(changed, since)
    if change:
        if now.num_held_out == 0 and saved.data.num_held_out == 0:  # nothing held out: no split to speak of
            then = going = ""
        elif now.held_out is not None and now.held_out == saved.data.held_out:  # the training images alone changed
            then = going = f"held-out bits/dim before and after step {saved.step} still compare: its split is the same"
        else:
            again = (f"drawn again from it: it may hold images the model trained on, and held-out bits/dim before "
                     f"and after step {saved.step} do not compare")  # fmt: skip
            then, going = f"the held-out split is then {again}", f"the held-out split is {again}"
        if not allow_data_change:
            raise ValueError(f"{change}. {fix}, or pass --allow_data_change to go on with the data as it is now"
                             + (f" ({then})" if then else ""))  # fmt: skip
        logger.warning("--allow_data_change: %s; resuming with the data as it is now%s", change,
                       f": {going}" if going else "")  # fmt: skip


def data_options(config) -> dict:
    """A run's options that shape its data (its `config`'s): --seed and DATA_OPTIONS, the paths absolute as its record
    holds them."""
    values = config.to_json(absolute=True)
    return {k: values[k] for k in ("seed", *DATA_OPTIONS)}


def _recorded_data_options(record: RunRecord) -> dict:
    """`data_options` as `record` holds them: those it recorded (an earlier version's record holds fewer)."""
    seed = {"seed": record.batch["seed"]} if record.batch.get("seed") is not None else {}
    return {**seed, **{k: record.options[k] for k in DATA_OPTIONS if k in record.options}}


def _changed_options(saved: RunRecord, options: dict) -> list[tuple[str, object, object]]:
    """(name, the run's value, this resume's) of each data option that differs from the one `saved` records."""
    run = _recorded_data_options(saved)
    return [(k, run[k], v) for k, v in options.items() if k in run and v != run[k]]


def _spelled(name: str, value) -> str:
    """An option's value as the flag that gives it: `--eval_size 0.1`, `--random_crop`, `--no-streaming`."""
    if isinstance(value, bool):
        negation = TrainingConfig.__dataclass_fields__[name].metadata["negation"]
        return f"--{name}" if value else negation[0] if negation else f"--no-{name}"
    return f"--{name} {value}"


def _options_change(changed: list[tuple[str, object, object]], since: str) -> tuple[str, str]:
    """What a resume with data options other than the run's (`changed`) changes, and the way out: the run's values
    (its default one by dropping the flag), or a new run."""
    if [name for name, _, _ in changed] == ["seed"]:
        ((_, run, now),) = changed
        return (f"--seed {now} is not the run's --seed {run} ({since}): its held-out split and any random crops are "
                "drawn with the seed, and would change", f"Resume with --seed {run}")  # fmt: skip
    said, withs, withouts = [], [], []
    for name, run, now in changed:
        default = TrainingConfig.__dataclass_fields__[name].default
        if now is None:
            said.append(f"the run's {_spelled(name, run)} is left out")
        elif run is None:
            said.append(f"{_spelled(name, now)} is not the run's (it gave no --{name})")
        else:  # a flag left out is the default: said so, since the user may not have typed it
            said.append(f"{_spelled(name, now)}{' (the default)' * (now == default)} is not the run's "
                        f"{_spelled(name, run)}")  # fmt: skip
        if run == default:
            withouts.append(_spelled(name, now).split()[0])  # the flag given, dropped
        else:
            withs.append(_spelled(name, run))
    them = "it" if len(changed) == 1 else "them"
    ways = [f"with {' '.join(withs)}"] * bool(withs) + [f"without {' '.join(withouts)}"] * bool(withouts)
    return (f"{'; '.join(said)} ({since}): the images the run trains on and holds out follow from {them}, and would "
            f"change", f"Resume {' and '.join(ways)}, or start a new run")  # fmt: skip


def data_guard(path: str | None, saved: RunRecord | None, allow_data_change: bool, options: dict):
    """`load_data`'s `before_build` for a resume of `path` (None without one, or with `allow_data_change`): data whose
    key is not the checkpoint's is refused before its cache is built (decoding a million images takes hours), in the
    words of the comparison after loading (`options`: this run's `data_options`)."""
    if saved is not None and not allow_data_change:
        return lambda known, drawn: check_data(path, saved, known, False, options, drawn)
