"""hf_ddpm: DDPM (Ho, Jain, Abbeel 2020) as a Hugging Face diffusers scheduler, pipeline and UNet presets.

The public names load on first use (PEP 562), so that `python -m hf_ddpm push ...` and the other tools that need
neither torch nor diffusers start in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())
