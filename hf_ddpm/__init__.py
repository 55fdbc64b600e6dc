"""hf_ddpm: DDPM (Ho, Jain, Abbeel 2020) as a Hugging Face diffusers scheduler, pipeline and UNet presets.

The public names load on first use (PEP 562), so that `python -m hf_ddpm push ...` and the other tools that need
neither torch nor diffusers start in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "HFDDPMPipeline": ".pipeline",
    "HFDDPMScheduler": ".scheduler",
    "UNET_PRESETS": ".unet",
    "unet_config": ".unet",
}
__all__ = ["HFDDPMPipeline", "HFDDPMScheduler", "UNET_PRESETS", "unet_config"]  # = _EXPORTS

if TYPE_CHECKING:
    from .pipeline import HFDDPMPipeline
    from .scheduler import HFDDPMScheduler
    from .unet import UNET_PRESETS, unet_config


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
