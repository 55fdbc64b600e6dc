"""The network and noise schedule a run trains: a UNet preset or JSON config with a fresh HFDDPMScheduler, or a
pretrained pipeline (`unet/` + `scheduler/`) to fine-tune (a config's checks, and the forward pass at the training
resolution that runs before any data is read, live with the UNet configurations: hf_ddpm/unet.py); the log's line
that names it; its EMA weights (swapped in to sample and evaluate).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import UNet2DModel

from ..loading import check_pipeline_index, load_unet
from ..scheduler import HFDDPMScheduler
from ..schedules import paper_linear_endpoints
from ..unet import UNET_PRESETS, build_checked, check_output_channels, read_unet_config, unet_config
from .config import TrainingConfig


def data_shape(args: TrainingConfig) -> tuple[int | None, int]:
    """(channels, resolution) the data must have: channels None lets the data decide (presets adapt to it)."""
    source = args.model_source
    preset = args.pretrained_model_name_or_path is None and source in UNET_PRESETS
    if args.pretrained_model_name_or_path is not None:
        check_pipeline_index(source)  # a complete pipeline, not a half-written one
        config = UNet2DModel.load_config(source, subfolder="unet")
    else:
        config = unet_config(source) if preset else read_unet_config(source)
    channels = None if preset else config.get("in_channels", 3)
    side = config.get("sample_size", 32)  # an int, or (height, width) in a JSON config
    return channels, args.resolution or int(side if isinstance(side, int) else side[0])


def build_unet(args: TrainingConfig, channels: int | None, resolution: int) -> UNet2DModel:
    """A fresh UNet2DModel for `channels`-channel images of `resolution` (None: the preset's own channels), or
    the pretrained one, with the output channels of the resolved variance type. Bad config values are refused
    naming the file and key (`build_checked`)."""
    learned_variance = args.variance_type == "learned_range"  # resolved: the scheduler's
    if channels is None:
        channels = unet_config(args.model_source)["in_channels"]
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
            config = {**read_unet_config(source), "sample_size": resolution}
        if args.dropout is not None:  # the recipes' per-dataset dropout
            config = {**config, "dropout": args.dropout}
        unet = build_checked(config, source)
    check_output_channels(unet, channels, learned_variance)
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


def describe_model(config: TrainingConfig, unet, scheduler: HFDDPMScheduler) -> str:
    """The log's line naming what trains: where the UNet comes from, its size, the resolution and the process."""
    source = config.model_source
    if config.pretrained_model_name_or_path is not None:
        origin = f"{source} (fine-tuned: --pretrained_model_name_or_path)"
    elif source in UNET_PRESETS:
        origin = f"the {source} preset" + ("" if config.model_config else " (the default: no --model_config given)")
    else:
        origin = f"{source} (--model_config)"
    parameters = sum(p.numel() for p in unet.parameters())
    side, channels = unet.config.sample_size, unet.config.in_channels
    process = scheduler.config
    line = (
        f"model: {origin}, {parameters / 1e6:.2f}M parameters, {side}x{side} px, {channels} channel(s); "
        f"T = {process.num_train_timesteps}, {process.beta_schedule} schedule, {process.prediction_type} "
        f"prediction, {process.variance_type} variance, loss {config.loss}"
    )
    preset_side = unet_config(source)["sample_size"] if source in UNET_PRESETS else side
    if config.model_config is None and config.pretrained_model_name_or_path is None and side > preset_side:
        line += (f". Note: the {source} preset is made for {preset_side} px images; at {side} px pass "
                 "--model_config (ddpm-cifar10-32, a JSON config) for a model of that size")  # fmt: skip
    return line


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
