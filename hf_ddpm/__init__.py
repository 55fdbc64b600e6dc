"""hf_ddpm: DDPM (Ho, Jain, Abbeel 2020) as a Hugging Face diffusers scheduler, pipeline and UNet presets."""

from .pipeline import HFDDPMPipeline
from .scheduler import HFDDPMScheduler
from .unet import UNET_PRESETS, unet_config

__version__ = "0.1.0"

__all__ = ["HFDDPMPipeline", "HFDDPMScheduler", "UNET_PRESETS", "unet_config"]
