"""UNet2DModel presets: the DDPM paper's networks and small ones for CPU work; and the checks of any UNet config.

`unet_config(name)` returns the keyword arguments of `diffusers.UNet2DModel`. The paper's architecture (Ho et al.
2020, Appendix B) is a PixelCNN++-style U-Net: two residual blocks per resolution, group normalization, a sinusoidal
timestep embedding added in every residual block, single-head self-attention at 16x16. The small presets keep that
architecture and shrink its widths and depths.

A config from elsewhere (a JSON file: `read_unet_config`) is built by `build_checked`, which refuses a bad value
naming the file and the key instead of failing with a raw torch error; `check_output_channels` refuses one whose
output does not fit the data and the variance type, and `check_forward` tries a UNet on one batch at a resolution,
before any training does. `weights_digest` fingerprints a UNet's weights.
"""

import hashlib
import inspect
import json
import os
from types import MappingProxyType

import torch
from diffusers import UNet2DModel

from .scheduler import model_output_channels

__all__ = ["UNET_PRESETS", "unet_config"]

_DOWN, _ATTN_DOWN = "DownBlock2D", "AttnDownBlock2D"
_UP, _ATTN_UP = "UpBlock2D", "AttnUpBlock2D"

# How the original TensorFlow DDPM code does what diffusers leaves configurable; these are the values of the
# converted google/ddpm-* checkpoints on the Hub, so our paper presets load those weights unchanged.
_DDPM_STYLE = {
    "act_fn": "silu",  # swish
    "norm_eps": 1e-6,  # tf.contrib.layers.group_norm's epsilon
    "flip_sin_to_cos": False,  # timestep embedding is [sin, cos] ...
    "freq_shift": 1,  # ... with frequencies exp(-log(10000) * i / (half_dim - 1))
    "downsample_padding": 0,  # stride-2 conv padded on the bottom/right only (TF "SAME")
    "attention_head_dim": None,  # one attention head over all channels, as in the paper
    "mid_block_scale_factor": 1,
    "center_input_sample": False,  # data is already scaled to [-1, 1]
    "time_embedding_type": "positional",
}

_PRESETS = MappingProxyType(
    {
        # The DDPM paper's CIFAR-10 model (Appendix B: 35.7M parameters, dropout 0.1), exactly the configuration
        # of google/ddpm-cifar10-32 on the Hub: channel multipliers (1, 2, 2, 2) of 128, resolutions 32 -> 4,
        # attention at 16x16 (second level down, third level up) and in the middle block.
        "ddpm-cifar10-32": {
            **_DDPM_STYLE,
            "sample_size": 32,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (128, 256, 256, 256),
            "layers_per_block": 2,
            "down_block_types": (_DOWN, _ATTN_DOWN, _DOWN, _DOWN),
            "up_block_types": (_UP, _UP, _ATTN_UP, _UP),
            "norm_num_groups": 32,
            "dropout": 0.1,  # the paper's CIFAR-10 dropout (Appendix B)
        },
        # The paper's 256x256 model (Appendix B: 114M parameters), as google/ddpm-celebahq-256 on the Hub (also
        # the LSUN church/bedroom/cat models): channel multipliers (1, 1, 2, 2, 4, 4) of 128, resolutions
        # 256 -> 8, attention at 16x16 (fifth level down, second level up). The paper sets dropout 0 for all but CIFAR-10.
        "ddpm-celebahq-256": {
            **_DDPM_STYLE,
            "sample_size": 256,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (128, 128, 256, 256, 512, 512),
            "layers_per_block": 2,
            "down_block_types": (_DOWN, _DOWN, _DOWN, _DOWN, _ATTN_DOWN, _DOWN),
            "up_block_types": (_UP, _ATTN_UP, _UP, _UP, _UP, _UP),
            "norm_num_groups": 32,
            "dropout": 0.0,
        },
        # MNIST at its native 28x28: three levels 28 -> 14 -> 7 (the padded stride-2 conv halves 28 and 14
        # exactly), attention at 7x7. Half the CIFAR-10 width; about 6.5M parameters.
        "mnist-28": {
            **_DDPM_STYLE,
            "sample_size": 28,
            "in_channels": 1,
            "out_channels": 1,
            "block_out_channels": (64, 128, 128),
            "layers_per_block": 2,
            "down_block_types": (_DOWN, _DOWN, _ATTN_DOWN),
            "up_block_types": (_ATTN_UP, _UP, _UP),
            "norm_num_groups": 32,
            "dropout": 0.1,
        },
        # scikit-learn's bundled 8x8 handwritten digits, upscaled to 16x16: the default of training/train.py,
        # sized to train in minutes on two CPU cores (a training step at batch 64 takes about 0.13 s there).
        # Three levels 16 -> 8 -> 4, one residual block per level, attention at 4x4; about 0.8M parameters.
        "digits-16-tiny": {
            **_DDPM_STYLE,
            "sample_size": 16,
            "in_channels": 1,
            "out_channels": 1,
            "block_out_channels": (32, 32, 64),
            "layers_per_block": 1,
            "down_block_types": (_DOWN, _DOWN, _ATTN_DOWN),
            "up_block_types": (_ATTN_UP, _UP, _UP),
            "norm_num_groups": 8,
            "dropout": 0.0,
        },
        # For unit tests: every block type of the paper's model (plain and attention, down, middle and up) at
        # the smallest sizes that group normalization allows; a forward pass takes a few milliseconds.
        "test-tiny": {
            **_DDPM_STYLE,
            "sample_size": 8,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (8, 16),
            "layers_per_block": 1,
            "down_block_types": (_DOWN, _ATTN_DOWN),
            "up_block_types": (_ATTN_UP, _UP),
            "norm_num_groups": 4,
            "dropout": 0.0,
        },
    }
)

UNET_PRESETS: tuple[str, ...] = tuple(_PRESETS)
"""Names accepted by `unet_config`."""

_UNET_ARGS = frozenset(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}


def unet_config(name: str, learned_variance: bool = False, **overrides) -> dict:
    """Keyword arguments for `diffusers.UNet2DModel` of the preset `name` (one of `UNET_PRESETS`).

    `overrides` replace preset values (e.g. `sample_size=64`, `dropout=0.0`); each must be an argument of
    `UNet2DModel`. `learned_variance=True` doubles `out_channels` (after the overrides): the extra channels are
    the v of Improved DDPM (Nichol & Dhariwal 2021, eq. 15), which interpolates the reverse-process log-variance
    between log β̃_t and log β_t (`variance_type="learned_range"`).

    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(**unet_config("test-tiny", learned_variance=True))
    >>> unet.config.out_channels
    6
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; expected one of {list(UNET_PRESETS)}")
    unknown = sorted(set(overrides) - _UNET_ARGS)
    if unknown:
        raise ValueError(f"unknown UNet2DModel argument(s) {unknown}; expected some of {sorted(_UNET_ARGS)}")
    config = {**_PRESETS[name], **overrides}
    if learned_variance:
        config["out_channels"] = model_output_channels(config["out_channels"], learned_variance=True)
    return config


# ------------------------------------------------------------------------------------------------ other configs
# `source` in the messages below: the --model_config a config came from (a preset name or a JSON file).


def read_unet_config(path: str) -> dict:
    """The UNet2DModel keys of a JSON config file (diffusers' `_class_name`-style keys dropped)."""
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


def check_unet_config(config: dict, source: str) -> None:
    """Refuse values that UNet2DModel would fail on with a raw torch error, naming `source` and the key."""
    where = f"--model_config {source}"
    unknown = sorted(k for k in config if k not in _UNET_ARGS)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; UNet2DModel takes {', '.join(sorted(_UNET_ARGS))}"
        )
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


def check_output_channels(unet: UNet2DModel, channels: int, learned_variance: bool) -> None:
    """Refuse a UNet (pretrained, or of a JSON config) whose output channels do not fit `channels`-channel data and
    the variance type: C for a fixed variance, 2C for learned_range (the mean's and the variance's)."""
    needed = model_output_channels(channels, learned_variance)
    if unet.config.out_channels != needed:
        kind = "learned_range (mean and variance)" if learned_variance else "a fixed variance"
        raise ValueError(
            f"the UNet has {unet.config.out_channels} output channels; {channels}-channel data with {kind} needs {needed}"
        )


def check_forward(unet: UNet2DModel, resolution: int, source: str, resolution_given: bool) -> None:
    """One forward pass on a dummy batch (1, C, resolution, resolution) at t = 0; a failure names the flag and the
    resolutions this UNet accepts (halved once per down block but the last: UNet2DModel adds no downsampler to it)."""
    halvings = len(unet.config.down_block_types) - 1
    x = torch.zeros(1, unet.config.in_channels, resolution, resolution)
    try:
        with torch.no_grad():
            out = unet(x, torch.zeros(1, dtype=torch.long)).sample
        if out.shape[-2:] != x.shape[-2:]:
            raise RuntimeError(f"it returns {tuple(out.shape[-2:])} from {tuple(x.shape[-2:])}")
    except Exception as err:
        flag = f"--resolution {resolution}" if resolution_given else f"the resolution {resolution} (sample_size)"
        accepted = ", ".join(str(2**halvings * k) for k in range(1, 5))
        raise ValueError(
            f"{flag}: the UNet of --model_config {source} cannot take {resolution}x{resolution} images "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). It halves the resolution "
            f"{halvings} times, so it accepts multiples of {2**halvings}: {accepted}, ..."
        ) from err


def weights_digest(module: torch.nn.Module, digest=None):
    """sha256 (continuing `digest` when given) over a module's state: names, dtypes and bytes, in any memory format.
    Equal for identical weights: training's replicas log it, and evaluation keys its cached samples by it."""
    digest = digest or hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        flat = tensor.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest
