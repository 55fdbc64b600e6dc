"""The components of an HFDDPMPipeline loaded from a pipeline directory or Hub repo without remote code.

A repo pushed by hf_ddpm names its bundled modules in model_index.json (hf_ddpm/remote_code.py), and diffusers'
loader refuses such a repo without trust_remote_code=True even where hf_ddpm is installed. HFDDPMPipeline needs
none of that code: its components are a diffusers UNet2DModel in unet/ and a scheduler config in scheduler/ (an
HFDDPMScheduler config, or a DDPMScheduler one: the keys are shared), so `HFDDPMPipeline.from_pretrained` loads
them here, each from its subfolder. Weights are safetensors only: pickled .bin weights are never loaded.
"""

from __future__ import annotations

from diffusers import UNet2DModel

from .scheduler import HFDDPMScheduler

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
MODEL_KWARGS = ("dtype", "torch_dtype", "variant", "low_cpu_mem_usage", "device_map", "disable_mmap")
IGNORED_KWARGS = ("trust_remote_code", "custom_revision")  # the components run no remote code
COMPONENT_NAMES = ("unet", "scheduler")


def load_components(pretrained_model_name_or_path, **kwargs) -> dict:
    """{"unet": UNet2DModel, "scheduler": HFDDPMScheduler} from `<path or repo>/unet` and `/scheduler`.

    kwargs: diffusers' Hub arguments (HUB_KWARGS) for both components, model arguments (MODEL_KWARGS; a dtype dict
    is read per component as in DiffusionPipeline.from_pretrained) for the UNet, `use_safetensors` (True or None),
    and `unet=` / `scheduler=` instances that replace the loaded ones.
    """
    allowed = (*HUB_KWARGS, *MODEL_KWARGS, *IGNORED_KWARGS, *COMPONENT_NAMES, "use_safetensors")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"HFDDPMPipeline.from_pretrained got unexpected arguments {unknown}; allowed: {list(allowed)}")
    if kwargs.get("use_safetensors") not in (None, True):
        raise ValueError(
            f"use_safetensors={kwargs['use_safetensors']!r} is not supported: hf_ddpm loads safetensors weights only"
        )
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    model = {k: kwargs[k] for k in MODEL_KWARGS if k in kwargs}
    for key in ("dtype", "torch_dtype"):
        if isinstance(model.get(key), dict):  # per-component dtypes, as diffusers' pipelines accept them
            model[key] = model[key].get("unet", model[key].get("default"))
    unet = kwargs.get("unet")
    if unet is None:
        unet = UNet2DModel.from_pretrained(
            pretrained_model_name_or_path, subfolder="unet", use_safetensors=True, **hub, **model
        )
    scheduler = kwargs.get("scheduler")
    if scheduler is None:
        scheduler = HFDDPMScheduler.from_pretrained(pretrained_model_name_or_path, subfolder="scheduler", **hub)
    return {"unet": unet, "scheduler": scheduler}
