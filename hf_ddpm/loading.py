"""The components of an HFDDPMPipeline loaded from a pipeline directory or Hub repo without remote code.

A repo pushed by hf_ddpm names its bundled modules in model_index.json (hf_ddpm/remote_code.py), and diffusers'
loader refuses such a repo without trust_remote_code=True even where hf_ddpm is installed. HFDDPMPipeline needs
none of that code: its components are a diffusers UNet2DModel in unet/ and a scheduler config in scheduler/ (an
HFDDPMScheduler config, or a DDPMScheduler one: the keys are shared), so `HFDDPMPipeline.from_pretrained` loads
them here, each from its subfolder. A pipeline saved with another diffusers scheduler swapped in (DDIM, ...) loads
with that scheduler, as DiffusionPipeline loads it.

Before anything is read, the source is checked at the door: a local path that does not exist is said to be missing
at once; a Hub repo id is looked up with one short request (hf_ddpm/hub_probe.py), so an unreachable Hub or a repo
that does not exist is named in seconds, not after a minute of retries; a repo already in the local cache loads
from it when the Hub cannot be reached.

What is refused, with a message that says so: a directory or repo without model_index.json (not a saved pipeline,
or one whose save was interrupted: the pipeline writer puts model_index.json back last), an index without a
UNet2DModel `unet` and a `scheduler`, a truncated or corrupt safetensors file (named, with the advice to download
or save it again), and pickled .bin weights. Weights are safetensors only unless the caller opts
in with `use_safetensors=False` (diffusers' meaning: the .bin file), which warns: unpickling a file can run code
chosen by whoever wrote it (diffusers reads it with torch.load(weights_only=True), which narrows but does not
remove that risk).
"""

from __future__ import annotations

import os
import warnings

import torch
from diffusers import DiffusionPipeline, UNet2DModel
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError, safe_open

from .hub_probe import check_source
from .scheduler import HFDDPMScheduler

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
MODEL_KWARGS = ("dtype", "torch_dtype", "variant", "low_cpu_mem_usage", "device_map", "disable_mmap")
IGNORED_KWARGS = ("trust_remote_code", "custom_revision")  # the components run no remote code
COMPONENT_NAMES = ("unet", "scheduler")


def load_components(pretrained_model_name_or_path, **kwargs) -> dict:
    """{"unet": UNet2DModel, "scheduler": HFDDPMScheduler (or the diffusers scheduler the pipeline was saved with:
    `saved_scheduler_class`)} from `<path or repo>/unet` and `/scheduler`.

    kwargs: diffusers' Hub arguments (HUB_KWARGS) for both components, model arguments (MODEL_KWARGS; a dtype dict
    is read per component as in DiffusionPipeline.from_pretrained) for the UNet, `use_safetensors` (True or None),
    and `unet=` / `scheduler=` instances that replace the loaded ones.
    """
    allowed = (*HUB_KWARGS, *MODEL_KWARGS, *IGNORED_KWARGS, *COMPONENT_NAMES, "use_safetensors")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"HFDDPMPipeline.from_pretrained got unexpected arguments {unknown}; allowed: {list(allowed)}")
    use_safetensors = kwargs.get("use_safetensors")
    if use_safetensors not in (None, True, False):
        raise ValueError(f"use_safetensors must be None, True or False, got {use_safetensors!r}")
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    model = {k: kwargs[k] for k in MODEL_KWARGS if k in kwargs}
    for key in ("dtype", "torch_dtype"):
        if isinstance(model.get(key), dict):  # per-component dtypes, as diffusers' pipelines accept them
            model[key] = model[key].get("unet", model[key].get("default"))
        if model.get(key) is not None and not isinstance(model[key], torch.dtype):  # diffusers loads float32 then
            name = str(model[key]).removeprefix("torch.")
            if not isinstance(getattr(torch, name, None), torch.dtype):
                raise ValueError(f"{key}={model[key]!r} is not a torch dtype: pass one, e.g. {key}=torch.float16")
            model[key] = getattr(torch, name)  # "float16", as configs write it
    hub = check_source(pretrained_model_name_or_path, hub)
    unet_folder, scheduler_folder = component_folders(pretrained_model_name_or_path, **hub)
    index = None
    if unet_folder is not None and (kwargs.get("unet") is None or kwargs.get("scheduler") is None):
        index = pipeline_index(pretrained_model_name_or_path, **hub)
    unet = kwargs.get("unet")
    if unet is None:
        safe = use_safetensors is not False
        unet = load_unet(pretrained_model_name_or_path, use_safetensors=safe, subfolder=unet_folder, **hub, **model)
    scheduler = kwargs.get("scheduler")
    if scheduler is None:
        kind = saved_scheduler_class(index) if index is not None else HFDDPMScheduler
        scheduler = kind.from_pretrained(pretrained_model_name_or_path, subfolder=scheduler_folder, **hub)
    return {"unet": unet, "scheduler": scheduler}


def saved_scheduler_class(index: dict) -> type:
    """The class to load the scheduler of a pipeline whose model_index.json is `index` with: a diffusers scheduler
    other than DDPMScheduler (DDIM, DPM-Solver, ... swapped in before the save) as itself, as DiffusionPipeline
    loads it, so that both loaders sample alike; ours, DDPMScheduler (diffusers' DDPMPipeline, google/ddpm-*: the
    same process, whose keys ours shares) and a name this diffusers lacks as HFDDPMScheduler (which refuses a
    config that is not a DDPM process's, saying so)."""
    import diffusers
    from diffusers import SchedulerMixin

    entry = index["scheduler"]
    library, name = entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, None)
    found = getattr(diffusers, name, None) if library == "diffusers" and name != "DDPMScheduler" else None
    return found if isinstance(found, type) and issubclass(found, SchedulerMixin) else HFDDPMScheduler


def component_folders(pretrained_model_name_or_path, **hub) -> tuple[str | None, str | None]:
    """Where the UNet and the scheduler config live: ("unet", "scheduler"), diffusers' pipeline layout, or
    (None, None), the flat layout of a model saved alone: config.json (a UNet2DModel), its weights and
    scheduler_config.json (possibly with the early keys of diffusers' first release) at the top level."""
    source = str(pretrained_model_name_or_path)
    if os.path.isdir(source):
        flat = not os.path.isdir(os.path.join(source, "unet")) and all(
            os.path.isfile(os.path.join(source, name)) for name in ("config.json", "scheduler_config.json")
        )
    else:  # a Hub repo: the pipeline layout unless unet/config.json is missing and a top-level one exists
        try:
            UNet2DModel.load_config(source, subfolder="unet", **hub)
            flat = False
        except OSError:
            try:
                UNet2DModel.load_config(source, **hub)
                HFDDPMScheduler.load_config(source, **hub)
            except OSError:
                return "unet", "scheduler"  # neither: the index check below says what is missing
            flat = True
    if not flat:
        return "unet", "scheduler"
    name = UNet2DModel.load_config(source, **hub).get("_class_name")
    if name != "UNet2DModel":
        raise ValueError(
            f"{source}/config.json describes a {name}, not a UNet2DModel: a model of diffusers' first releases "
            "(UNetModel) has no loader in diffusers today. Load its unet/ folder if it has one"
        )
    return None, None


def check_pipeline_index(pretrained_model_name_or_path, **hub) -> dict:
    """The pipeline's model_index.json (`pipeline_index`), once `check_source` has found the directory or repo:
    the check a caller makes at its door, before it reads anything else."""
    return pipeline_index(pretrained_model_name_or_path, **check_source(pretrained_model_name_or_path, hub))


def pipeline_index(pretrained_model_name_or_path, **hub) -> dict:
    """The pipeline's model_index.json, which must name a UNet2DModel `unet` and a `scheduler`; ValueError when
    the directory or repo has none (OSError from diffusers for a repo without it)."""
    source = str(pretrained_model_name_or_path)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
        raise ValueError(
            f"{source} holds no model_index.json: it is not a saved pipeline, or its save did not finish. A "
            "pipeline directory holds model_index.json, unet/ and scheduler/ (as save_pretrained writes them)"
        )
    index = DiffusionPipeline.load_config(source, **hub)
    unet, scheduler = index.get("unet"), index.get("scheduler")
    if not (isinstance(unet, (list, tuple)) and unet[-1] == "UNet2DModel" and scheduler):
        raise ValueError(
            f"{source} holds a {index.get('_class_name')} with unet={unet} and scheduler={scheduler}; HFDDPMPipeline "
            "loads pipelines with a UNet2DModel `unet` and a `scheduler` (HFDDPMPipeline, diffusers' DDPMPipeline)"
        )
    return index


def load_unet(
    pretrained_model_name_or_path, use_safetensors: bool = True, subfolder: str | None = "unet", **kwargs
) -> UNet2DModel:
    """`<path or repo>/<subfolder>` as a UNet2DModel from safetensors weights; pickled .bin weights only with
    use_safetensors=False, with a warning. kwargs: diffusers' Hub and model arguments."""
    source = str(pretrained_model_name_or_path)
    folder = os.path.join(source, subfolder) if subfolder else source
    if use_safetensors and os.path.isdir(folder):
        names = os.listdir(folder)
        if not any(n.endswith(".safetensors") for n in names):
            pickled = sorted(n for n in names if n.endswith(".bin"))
            found = f"only pickled weights {pickled}" if pickled else "no weights"
            raise OSError(
                f"{folder} holds {found} and no diffusion_pytorch_model.safetensors. hf_ddpm loads safetensors "
                "only; to load pickled weights from a source you trust, pass use_safetensors=False, then save with "
                "save_pretrained(safe_serialization=True)"
            )
    if not use_safetensors:
        warnings.warn(
            f"use_safetensors=False: loading pickled .bin UNet weights from {source}. Unpickling can run code chosen "
            "by whoever wrote the file: do this only for files you trust, and re-save them as safetensors",
            UserWarning,
            stacklevel=3,
        )
    if use_safetensors:
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        check_weights_fit_config(source, subfolder, **hub)
    unet = UNet2DModel.from_pretrained(source, subfolder=subfolder, use_safetensors=use_safetensors, **kwargs)
    return own_memory(unet)


def own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with each CPU parameter and buffer copied into memory of its own (allocated as torch allocates any
    tensor), in place. Loaded from safetensors they are views into the file's memory map, at the file's byte offsets
    (4-byte aligned, where torch's own allocations are 64-byte aligned), and on an AVX2 CPU a convolution over
    weights at another alignment rounds differently in its last float32 bits: the same weights then gave numbers
    that depended on how they were loaded (a 1-process evaluation against a 2-process one, whose loads differ), and
    an adaptive ODE solver carries such bits to ~1e-8 of bits/dim. Owned copies compute as the trained model did."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.device.type == "cpu":
                parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)
        for owner in module.modules():
            for name, buffer in owner.named_buffers(recurse=False):
                if buffer.device.type == "cpu":
                    setattr(owner, name, buffer.clone(memory_format=torch.contiguous_format))
    return module


def check_weights_fit_config(source: str, subfolder: str | None, **hub) -> None:
    """ValueError naming the first tensor (in name order) whose shape in the safetensors weights differs from the
    UNet its config.json describes, before diffusers loads anything. Reads only the file's header; OSError naming
    the file for one that is incomplete or corrupt (a download or save cut short); a sharded or missing file is left
    to diffusers."""
    folder = os.path.join(source, subfolder) if subfolder else source
    name = "diffusion_pytorch_model.safetensors"
    if os.path.isdir(source):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return
    else:
        try:
            path = hf_hub_download(source, name, subfolder=subfolder, **hub)
        except (OSError, ValueError):  # sharded, missing, or offline: diffusers reports it
            return
    with torch.device("meta"):
        expected = UNet2DModel.from_config(UNet2DModel.load_config(source, subfolder=subfolder, **hub)).state_dict()
    try:
        weights = safe_open(path, framework="pt")
    except SafetensorError as err:  # a download or save cut short: the header promises more than the file holds
        raise OSError(
            f"the UNet weights {path} ({os.path.getsize(path)} bytes) are incomplete or corrupt ({err}): the file "
            "was not completely downloaded or saved. Download it again (force_download=True, or delete it from the "
            "Hugging Face cache) or save the pipeline again with save_pretrained"
        ) from None
    with weights:
        for key in sorted(set(weights.keys()) & set(expected)):
            shape = torch.Size(weights.get_slice(key).get_shape())
            if shape != expected[key].shape:
                raise ValueError(
                    f"the UNet weights in {folder} do not fit its config.json ({key} expected shape "
                    f"{expected[key].shape}, but got {shape}); weights and config.json must come from the same "
                    "save_pretrained"
                )
