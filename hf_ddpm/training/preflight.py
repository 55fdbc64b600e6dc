"""Checks that a run makes in its first seconds, before it reads any data or writes anything: the UNet builds and
takes one dummy batch at the training resolution, the Hub repo id is valid, and a resumed checkpoint was trained
with the same model and objective (its mixed precision and process count are restored or refused).

What a checkpoint records about its run is `TrainProgress.run_config` (hf_ddpm/training/checkpoints.py), written
with every checkpoint; `checkpoint_record` reads it back without loading the checkpoint.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
from diffusers import UNet2DModel

from .publish import repo_id_of

logger = logging.getLogger(__name__)  # not accelerate's: these checks run before its state exists

PROGRESS_FILE = "custom_checkpoint_0.pkl"  # TrainProgress: the first object registered for checkpointing (setup.py)
OBJECTIVE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "variance_type")
FLAG_OF = {"num_train_timesteps": "--ddpm_num_steps", "beta_schedule": "--ddpm_beta_schedule",
           "beta_start": "the schedule's beta_start", "beta_end": "the schedule's beta_end",
           "prediction_type": "--prediction_type", "variance_type": "--variance_type", "loss": "--loss"}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the UNet


def check_unet_config(config: dict, source: str) -> None:
    """Refuse values that UNet2DModel would fail on with a raw torch error, naming `source` (the flag or the JSON
    file) and the key."""
    where = f"--model_config {source}"
    known = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; UNet2DModel takes {', '.join(sorted(known))}")
    per_block = config.get("layers_per_block", 2)
    for value in per_block if isinstance(per_block, (list, tuple)) else [per_block]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: layers_per_block must be an integer >= 1, got {per_block!r}")
    channels = config.get("block_out_channels", (64, 128, 256, 512))
    if not isinstance(channels, (list, tuple)) or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"{where}: block_out_channels must be a list of positive integers, got {channels!r}")
    for key in ("in_channels", "out_channels", "norm_num_groups"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    for key in ("down_block_types", "up_block_types"):
        blocks = config.get(key)
        if blocks is not None and len(blocks) != len(channels):
            raise ValueError(
                f"{where}: {key} has {len(blocks)} entries and block_out_channels {len(channels)}; they must match"
            )


def _key_in_error(config: dict, error: Exception) -> str:
    """The config key whose value the error message names (diffusers: 'FooBlock2D does not exist.')."""
    text = str(error)
    for key, value in config.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item and item in text:
                return f" (key {key})"
    if "num_groups" in text:
        return " (key norm_num_groups)"
    return ""


def build_checked(config: dict, source: str) -> UNet2DModel:
    """UNet2DModel(**config), its errors naming `source` and the key."""
    check_unet_config(config, source)
    try:
        return UNet2DModel.from_config(config)
    except Exception as err:
        raise ValueError(f"--model_config {source}{_key_in_error(config, err)}: {err}") from err


def downsampling_factor(unet: UNet2DModel) -> int:
    """2 per down block but the last (UNet2DModel adds no downsampler to its final block)."""
    return 2 ** (len(unet.config.down_block_types) - 1)


def check_forward(unet: UNet2DModel, resolution: int, source: str, resolution_given: bool) -> None:
    """One forward pass on a dummy batch (1, C, resolution, resolution) at t = 0; a failure names the flag and the
    resolutions this UNet accepts."""
    factor = downsampling_factor(unet)
    x = torch.zeros(1, unet.config.in_channels, resolution, resolution)
    try:
        with torch.no_grad():
            out = unet(x, torch.zeros(1, dtype=torch.long)).sample
        if out.shape[-2:] != x.shape[-2:]:
            raise RuntimeError(f"it returns {tuple(out.shape[-2:])} from {tuple(x.shape[-2:])}")
    except Exception as err:
        flag = f"--resolution {resolution}" if resolution_given else f"the resolution {resolution} (sample_size)"
        accepted = ", ".join(str(factor * k) for k in range(1, 5))
        raise ValueError(
            f"{flag}: the UNet of --model_config {source} cannot take {resolution}x{resolution} images "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). It halves the resolution "
            f"{len(unet.config.down_block_types) - 1} times, so it accepts multiples of {factor}: {accepted}, ..."
        ) from err


# ------------------------------------------------------------------------------------------------ the Hub


def check_repo_id(args) -> str | None:
    """The repo --push_to_hub will push to (given, or the output directory's name): refused now when invalid, and
    said where it goes. None without --push_to_hub."""
    if not args.push_to_hub:
        return None
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    given = args.hub_model_id is not None
    repo_id = repo_id_of(args)  # the one the push uses
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        origin = f"--hub_model_id {repo_id!r}" if given else f"the repo id {repo_id!r} (from --output_dir's name)"
        raise ValueError(
            f"{origin} is not a valid Hub repo id: {str(err).split(': ')[0]}. "
            + ("" if given else "Pass --hub_model_id NAME or rename the output directory. ")
            + "Use 'name' or 'namespace/name' with letters, digits, '-', '_' and '.'"
        ) from None
    where = repo_id if "/" in repo_id else f"<your namespace>/{repo_id}"
    logger.info("--push_to_hub: will push the pipeline to %s/%s at the end", constants.ENDPOINT, where)
    return repo_id


HUB_PROBE_TIMEOUT = 5.0  # seconds: to connect to the Hub and get an answer; datasets would retry for minutes


def check_dataset_reachable(args) -> None:
    """A Hub --dataset_name (not a local path) with the Hub unreachable fails now, within HUB_PROBE_TIMEOUT,
    naming the network, instead of after datasets' silent retries. Offline mode (HF_HUB_OFFLINE=1 or
    HF_DATASETS_OFFLINE=1) reads the local cache and is not probed; an HTTP answer of any status counts as
    reachable (datasets then says what is wrong with the name)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    name = args.dataset_name
    if name is None or os.path.exists(name):
        return
    if constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    url = f"{endpoint}/api/datasets/{name}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        return  # the Hub answered
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {HUB_PROBE_TIMEOUT:g} s"
        raise ConnectionError(
            f"--dataset_name {name}: the Hugging Face Hub at {endpoint} cannot be reached ({reason}): a network "
            "problem, not the dataset. If it is in the local cache, "
            "run with HF_HUB_OFFLINE=1; or pass a local copy (--dataset_name DIR or --train_data_dir DIR)"
        ) from None


# ------------------------------------------------------------------------------------------------ resuming


def checkpoint_record(path: str) -> dict:
    """The run record a checkpoint holds (`TrainProgress.state_dict()`), read without loading the checkpoint;
    {} for a checkpoint written before records existed."""
    file = os.path.join(path, PROGRESS_FILE)
    if not os.path.isfile(file):
        return {}
    return torch.load(file, map_location="cpu", weights_only=True)


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def run_config(unet_config: dict, scheduler_config: dict, loss: str) -> dict:
    """What a checkpoint must agree on to be resumed: the UNet's config and the objective."""
    return {
        "unet": {k: _plain(v) for k, v in unet_config.items() if not k.startswith("_")},
        "objective": {**{k: _plain(scheduler_config[k]) for k in OBJECTIVE_KEYS}, "loss": loss},
    }


def config_differences(saved: dict, current: dict, skip=()) -> list[str]:
    """'key: checkpoint value -> this run's' for each difference of model or objective."""
    found = []
    for part in ("unet", "objective"):
        old, new = saved.get(part, {}), current.get(part, {})
        for key in sorted(set(old) | set(new)):
            if key in skip or old.get(key) == new.get(key):
                continue
            if key in ("beta_start", "beta_end") and old.get("beta_schedule") != new.get("beta_schedule"):
                continue  # another schedule altogether: said once
            label = f"UNet {key}" if part == "unet" else FLAG_OF.get(key, key)
            found.append(f"{label}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    return found


def check_resume(path: str, record: dict, current: dict, skip=()) -> None:
    """Refuse a resume whose model or objective differs from the checkpoint's, naming each difference."""
    saved = record.get("run_config")
    if not saved:
        return
    differences = config_differences(saved, current, skip)
    if differences:
        raise ValueError(
            f"--resume_from_checkpoint {path} was trained with another model or objective: "
            + "; ".join(differences)
            + ". Resume with the options it was trained with (see training_args.json), or start a new run"
        )


def restore_run_shape(path: str, record: dict, args, num_processes: int, precision: str) -> None:
    """Mixed precision: restored from the checkpoint when not given, refused when it differs; the process count
    must be the checkpoint's (the data order and random streams follow from it)."""
    saved = record.get("run_shape", {})
    saved_precision = record.get("mixed_precision")
    if saved_precision is not None and saved_precision != precision:
        if args.mixed_precision is not None:
            raise ValueError(
                f"--mixed_precision {args.mixed_precision}: the checkpoint {path} was trained with "
                f"--mixed_precision {saved_precision}; drop the flag to resume in {saved_precision}, or start a new run"
            )
        args.mixed_precision = saved_precision
        logger.warning("--mixed_precision %s restored from %s (this launch said %s)", saved_precision, path, precision)
    saved_world = saved.get("num_processes")
    if saved_world is not None and saved_world != num_processes:
        raise ValueError(
            f"the checkpoint {path} was written by {saved_world} processes and this run has {num_processes}; "
            f"resume with `accelerate launch --num_processes {saved_world}` (the data order and random streams "
            "depend on it), or start a new run"
        )
