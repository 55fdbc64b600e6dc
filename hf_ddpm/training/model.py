"""The network and noise schedule a run trains: a UNet preset or JSON config with a fresh HFDDPMScheduler, or a
pretrained pipeline (`unet/` + `scheduler/`) to fine-tune; and the checks that a UNet can be built from its config
and takes the training resolution, made before any data is read; its EMA weights (swapped in to sample and
evaluate, checkpointed) and a fingerprint of its weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os

import torch
from diffusers import UNet2DModel

from ..loading import check_pipeline_index, load_unet
from ..scheduler import HFDDPMScheduler, model_output_channels
from ..schedules import paper_linear_endpoints
from ..unet import UNET_PRESETS, unet_config
from .config import TrainingConfig


def _load_json_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--model_config {path!r} is neither a preset ({', '.join(UNET_PRESETS)}) nor a JSON file")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--model_config {path} is not valid JSON: {err.msg} (line {err.lineno} column {err.colno})"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"--model_config {path} holds a JSON {type(config).__name__}, not an object of UNet keys")
    return {k: v for k, v in config.items() if not k.startswith("_")}  # drop _class_name, _diffusers_version


def data_shape(args: TrainingConfig) -> tuple[int | None, int]:
    """(channels, resolution) the data must have: channels None lets the data decide (presets adapt to it)."""
    if args.pretrained_model_name_or_path is not None:
        check_pipeline_index(args.pretrained_model_name_or_path)  # a complete pipeline, not a half-written one
        config = UNet2DModel.load_config(args.pretrained_model_name_or_path, subfolder="unet")
        return config["in_channels"], args.resolution or _side(config["sample_size"])
    source = args.model_source
    if source in UNET_PRESETS:
        return None, args.resolution or unet_config(source)["sample_size"]
    config = _load_json_config(source)
    return config.get("in_channels", 3), args.resolution or _side(config.get("sample_size", 32))


def _side(sample_size) -> int:
    return sample_size if isinstance(sample_size, int) else int(sample_size[0])


def build_unet(args: TrainingConfig, channels: int | None, resolution: int, learned_variance: bool) -> UNet2DModel:
    """A fresh UNet2DModel for `channels`-channel images of `resolution` (None: the preset's own channels), or
    the pretrained one. Bad config values are refused naming the file and key (`build_checked`)."""
    if channels is None:
        channels = unet_config(args.model_source)["in_channels"]
    out_channels = model_output_channels(channels, learned_variance)
    if args.pretrained_model_name_or_path is not None:
        unet = load_unet(args.pretrained_model_name_or_path)  # safetensors only: a pickle is refused
        if unet.config.sample_size != resolution:
            unet.register_to_config(sample_size=resolution)  # convolutional: trains at the new size
    else:
        source = args.model_source
        if source in UNET_PRESETS:
            config = unet_config(
                source, learned_variance, in_channels=channels, out_channels=channels, sample_size=resolution
            )
        else:
            config = {**_load_json_config(source), "sample_size": resolution}
        if args.dropout is not None:  # the recipes' per-dataset dropout
            config = {**config, "dropout": args.dropout}
        unet = build_checked(config, source)
    if unet.config.out_channels != out_channels:
        kind = "learned_range (mean and variance)" if learned_variance else "a fixed variance"
        raise ValueError(
            f"the UNet has {unet.config.out_channels} output channels; {channels}-channel data with "
            f"{kind} needs {out_channels}"
        )
    return unet


def pretrained_scheduler_config(args: TrainingConfig) -> dict | None:
    """The scheduler config of the pipeline to fine-tune (None for a new model): fine-tuning keeps its process."""
    if args.pretrained_model_name_or_path is None:
        return None
    check_pipeline_index(args.pretrained_model_name_or_path)  # a complete pipeline, not a half-written one
    return dict(HFDDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler").config)


def build_scheduler(config: TrainingConfig) -> HFDDPMScheduler:
    """The noise schedule of a resolved config: the pretrained pipeline's (the config agrees with it), or a new one."""
    spacing = {} if config.timestep_spacing is None else {"timestep_spacing": config.timestep_spacing}
    if config.pretrained_model_name_or_path is not None:  # a sampling choice: the flag may change it
        return HFDDPMScheduler.from_pretrained(config.pretrained_model_name_or_path, subfolder="scheduler", **spacing)
    num_steps, schedule = config.ddpm_num_steps, config.ddpm_beta_schedule
    endpoints = {}
    if schedule == "linear":  # the paper's endpoints scaled by 1000/T (Improved DDPM), written into the config
        endpoints = dict(zip(("beta_start", "beta_end"), paper_linear_endpoints(num_steps)))
        if endpoints["beta_end"] >= 1.0:
            raise ValueError(
                f"the paper's linear schedule scaled to T={num_steps} ends at beta="
                f"{endpoints['beta_end']:g} >= 1; use --ddpm_num_steps > 20 or another schedule"
            )
    return HFDDPMScheduler(
        num_train_timesteps=num_steps,
        beta_schedule=schedule,
        variance_type=config.variance_type,
        prediction_type=config.prediction_type,
        **endpoints,
        **spacing,
    )


# ------------------------------------------------------------------------------------------------ checks


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


# ------------------------------------------------------------------------------------------------ its weights


@contextlib.contextmanager
def ema_weights(ema, module: torch.nn.Module):
    """Within the block `module` holds the EMA weights; its own weights are restored afterwards (no-op without EMA)."""
    if ema is None:
        yield module
        return
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield module
    finally:
        ema.restore(module.parameters())


class EMAState:
    """Checkpoints an `EMAModel` and puts its weights back on the training device (accelerate loads on the CPU)."""

    def __init__(self, ema, device):
        self.ema, self.device = ema, device

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
        self.ema.to(device=self.device)


def parameter_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's state (names, dtypes, bytes): equal on replicas that hold identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        flat = tensor.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)  # any memory format
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
