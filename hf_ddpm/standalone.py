"""Loading, saving and pushing where the pipeline runs as a Hub repo's remote code, without hf_ddpm installed.

In the package, `HFDDPMPipeline.from_pretrained` loads through hf_ddpm/loading.py, `save_pretrained` / `push_to_hub`
go through hf_ddpm/hub.py and `log_likelihood` through hf_ddpm/evaluation/likelihood.py. A repo's remote code
(hf_ddpm/remote_code.py) carries none of them (they need the model card, the atomic writer, the push checks, scipy):
the bundler puts this module in their place, so the
bundled class is the package's own, line for line, and these functions answer to the same names and arguments:

    load_components(path, **kwargs)        unet/ (safetensors only) and scheduler/, each from its subfolder
    save_pipeline(pipeline, directory)     diffusers' save_pretrained, plus the remote-code modules the pipeline was
                                           loaded from, named in model_index.json: the folder loads as the repo did
    push_pipeline(pipeline, repo_id)       refused: publishing needs hf_ddpm (its model card and push checks)
    log_likelihood(pipeline, images, ...)  refused: the estimators beyond the bound live in hf_ddpm.evaluation
                                           (the ODE solver's scipy among them); bits_per_dim works

Both save routes end with pipeline_folder.drop_local_paths: a saved folder names no path of the machine that saved it.
"""

from __future__ import annotations

import inspect
import os
import shutil

from diffusers import DiffusionPipeline, UNet2DModel

from .pipeline_folder import drop_local_paths
from .scheduler import HFDDPMScheduler

STANDALONE_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def load_components(pretrained_model_name_or_path, **kwargs) -> dict:
    """{"unet": UNet2DModel, "scheduler": HFDDPMScheduler} from `<path or repo>/unet` and `/scheduler`; weights
    safetensors only. kwargs: diffusers' Hub arguments (revision, token, ...) for both, model arguments (dtype, ...)
    for the UNet, `unet=` / `scheduler=` instances that replace the loaded ones."""
    kwargs.pop("trust_remote_code", None)
    hub = {k: kwargs[k] for k in STANDALONE_HUB_KWARGS if k in kwargs}
    scheduler = kwargs.pop("scheduler", None) or HFDDPMScheduler.from_pretrained(
        pretrained_model_name_or_path, subfolder="scheduler", **hub
    )
    unet = kwargs.pop("unet", None) or UNet2DModel.from_pretrained(
        pretrained_model_name_or_path, subfolder="unet", **{"use_safetensors": True, **kwargs}
    )
    return {"unet": unet, "scheduler": scheduler}


def save_pipeline(pipeline, save_directory, **kwargs):
    """diffusers' `save_pretrained` (kwargs as there: safetensors by default), then the files of the pipeline's module
    and of the scheduler module it imports copied beside it and named in model_index.json, and no local path
    (`drop_local_paths`). push_to_hub=True is refused."""
    if kwargs.pop("push_to_hub", False):
        return push_pipeline(pipeline, kwargs.get("repo_id", ""))
    DiffusionPipeline.save_pretrained(pipeline, save_directory, **kwargs)
    modules = {}
    for key, cls, folder in (("_class_name", type(pipeline), ""), ("scheduler", HFDDPMScheduler, "scheduler")):
        source = inspect.getsourcefile(cls)
        shutil.copyfile(source, os.path.join(save_directory, folder, os.path.basename(source)))
        modules[key] = [os.path.splitext(os.path.basename(source))[0], cls.__name__]
    if type(pipeline.scheduler).__name__ != "HFDDPMScheduler":  # a diffusers scheduler loads without code
        del modules["scheduler"]
    drop_local_paths(save_directory, **modules)
    return None


def push_pipeline(pipeline, repo_id: str, **kwargs):
    """Refused where hf_ddpm is not installed: a push renders hf_ddpm's model card and runs its checks."""
    raise RuntimeError(
        f"pushing an HFDDPMPipeline (to {repo_id!r}) needs hf_ddpm installed (pip install hf_ddpm); "
        "save_pretrained works without it"
    )


def log_likelihood(pipeline, images, method: str = "bound", **kwargs):
    """Refused where hf_ddpm is not installed: the likelihood estimators live in hf_ddpm.evaluation."""
    raise RuntimeError(
        f"log_likelihood(method={method!r}) needs hf_ddpm installed (pip install hf_ddpm); bits_per_dim works here"
    )
