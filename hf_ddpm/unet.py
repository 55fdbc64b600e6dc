"""UNet2DModel presets: the DDPM paper's networks and small ones for CPU work.

`unet_config(name)` returns the keyword arguments of `diffusers.UNet2DModel` (this module builds no model).
The paper's architecture (Ho et al. 2020, Appendix B) is a PixelCNN++-style U-Net: two residual blocks per
resolution, group normalization, a sinusoidal timestep embedding added in every residual block, single-head
self-attention at 16x16. The small presets keep that architecture and shrink its widths and depths.
"""

import inspect
from types import MappingProxyType

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
