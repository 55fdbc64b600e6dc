"""The network and noise schedule a run trains: a UNet preset or JSON config with a fresh HFDDPMScheduler, or a
pretrained pipeline (`unet/` + `scheduler/`) to fine-tune."""

from __future__ import annotations

import json
import os

from diffusers import UNet2DModel

from ..loading import check_pipeline_index, load_unet
from ..losses import check_objective
from ..scheduler import SCHEDULE_ALIASES, HFDDPMScheduler, model_output_channels
from ..schedules import PAPER_NUM_TIMESTEPS, paper_linear_endpoints
from ..unet import UNET_PRESETS, unet_config
from .config import DEFAULT_MODEL
from .preflight import build_checked
from .run_config import default_variance_type


def model_source(args) -> str:
    """The preset name, the JSON file or the pretrained pipeline the UNet comes from (for messages)."""
    return args.pretrained_model_name_or_path or args.model_config or DEFAULT_MODEL


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


def data_shape(args) -> tuple[int | None, int]:
    """(channels, resolution) the data must have: channels None lets the data decide (presets adapt to it)."""
    if args.pretrained_model_name_or_path is not None:
        check_pipeline_index(args.pretrained_model_name_or_path)  # a complete pipeline, not a half-written one
        config = UNet2DModel.load_config(args.pretrained_model_name_or_path, subfolder="unet")
        return config["in_channels"], args.resolution or _side(config["sample_size"])
    source = model_source(args)
    if source in UNET_PRESETS:
        return None, args.resolution or unet_config(source)["sample_size"]
    config = _load_json_config(source)
    return config.get("in_channels", 3), args.resolution or _side(config.get("sample_size", 32))


def _side(sample_size) -> int:
    return sample_size if isinstance(sample_size, int) else int(sample_size[0])


def build_unet(args, channels: int | None, resolution: int, learned_variance: bool) -> UNet2DModel:
    """A fresh UNet2DModel for `channels`-channel images of `resolution` (None: the preset's own channels), or
    the pretrained one. Bad config values are refused naming the file and key (preflight.build_checked)."""
    if channels is None:
        channels = unet_config(model_source(args))["in_channels"]
    out_channels = model_output_channels(channels, learned_variance)
    if args.pretrained_model_name_or_path is not None:
        unet = load_unet(args.pretrained_model_name_or_path)  # safetensors only: a pickle is refused
        if unet.config.sample_size != resolution:
            unet.register_to_config(sample_size=resolution)  # convolutional: trains at the new size
    else:
        source = model_source(args)
        if source in UNET_PRESETS:
            config = unet_config(
                source, learned_variance, in_channels=channels, out_channels=channels, sample_size=resolution
            )
        else:
            config = {**_load_json_config(source), "sample_size": resolution}
        if args.dropout is not None:  # (CONFIG) --dropout: the recipes' per-dataset dropout
            config = {**config, "dropout": args.dropout}
        unet = build_checked(config, source)
    if unet.config.out_channels != out_channels:
        kind = "learned_range (mean and variance)" if learned_variance else "a fixed variance"
        raise ValueError(
            f"the UNet has {unet.config.out_channels} output channels; {channels}-channel data with "
            f"{kind} needs {out_channels}"
        )
    return unet


def build_scheduler(args) -> HFDDPMScheduler:
    """The noise schedule: the pretrained pipeline's (flags must agree with it), or a new one from the flags."""
    if args.pretrained_model_name_or_path is not None:
        scheduler = HFDDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
        given = {
            "prediction_type": ("--prediction_type", args.prediction_type),
            "variance_type": ("--variance_type", args.variance_type),
            "num_train_timesteps": ("--ddpm_num_steps", args.ddpm_num_steps),
            "beta_schedule": (
                "--ddpm_beta_schedule",
                SCHEDULE_ALIASES.get(args.ddpm_beta_schedule, args.ddpm_beta_schedule),
            ),
        }
        for key, (flag, value) in given.items():
            if value is not None and value != scheduler.config[key]:
                raise ValueError(
                    f"fine-tuning keeps the pretrained scheduler's {key}={scheduler.config[key]!r}; "
                    f"{flag} {value} differs (drop the flag, or train from scratch)"
                )
    else:
        num_steps = args.ddpm_num_steps or PAPER_NUM_TIMESTEPS  # T = 1000 (DDPM section 4)
        schedule = args.ddpm_beta_schedule or "linear"
        endpoints = {}
        if schedule == "linear":  # the paper's endpoints scaled by 1000/T (Improved DDPM), written into the config
            endpoints = dict(zip(("beta_start", "beta_end"), paper_linear_endpoints(num_steps)))
            if endpoints["beta_end"] >= 1.0:
                raise ValueError(
                    f"the paper's linear schedule scaled to T={num_steps} ends at beta="
                    f"{endpoints['beta_end']:g} >= 1; use --ddpm_num_steps > 20 or another schedule"
                )
        scheduler = HFDDPMScheduler(
            num_train_timesteps=num_steps,
            beta_schedule=schedule,
            variance_type=args.variance_type or default_variance_type(args.loss),
            prediction_type=args.prediction_type or "epsilon",
            **endpoints,
        )
    check_objective(args.loss, scheduler.config.variance_type)  # (CONFIG) the rule's one home: losses.py
    return scheduler
