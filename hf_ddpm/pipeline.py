"""HFDDPMPipeline: ancestral sampling (DDPM Algorithm 2) and the variational bound in bits/dim (DDPM eq. 5)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from .bound import BoundOutput, variational_bound
from .gaussians import pixels_to_model
from .scheduler import HFDDPMScheduler, model_output_channels
from .schedules import check_positive_int

OUTPUT_TYPES = ("pil", "np", "pt")


class HFDDPMPipeline(DiffusionPipeline):
    """Unconditional image generation with DDPM, and its likelihood bound.

    Components: `unet` (`UNet2DModel`, ε/x_0/v prediction; 2C output channels for `learned_range`) and
    `scheduler` (`HFDDPMScheduler`).

    Example:
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
        >>> pipe = HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=100))
        >>> images = pipe(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(0), output_type="np").images
        >>> images.shape[0]
        2
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["sample", "pred_original_sample"]

    def __init__(self, unet: UNet2DModel, scheduler: HFDDPMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> HFDDPMPipeline:
        """Load `unet/` and `scheduler/` of a pipeline directory or Hub repo with hf_ddpm's classes: no remote code.

        A repo pushed by hf_ddpm names its bundled modules in model_index.json, which diffusers' own loader would
        insist on running (trust_remote_code=True); this method loads the components itself (hf_ddpm/loading.py).
        kwargs: revision, token, cache_dir, local_files_only, force_download, proxies, dtype, variant, ... as in
        diffusers; `unet=` / `scheduler=` replace a component. Weights are safetensors only; pickled .bin weights
        load only with `use_safetensors=False`, which warns (unpickling can run code). A directory or repo
        without model_index.json is refused (hf_ddpm/loading.py).
        """
        loading = _package_module(cls, "loading")
        if loading is not None:
            components = loading.load_components(pretrained_model_name_or_path, **kwargs)
        else:  # as remote code: the components from their subfolders, safetensors only
            kwargs.pop("trust_remote_code", None)
            scheduler = kwargs.pop("scheduler", None) or HFDDPMScheduler.from_pretrained(
                pretrained_model_name_or_path, subfolder="scheduler"
            )
            unet = kwargs.pop("unet", None) or UNet2DModel.from_pretrained(
                pretrained_model_name_or_path, subfolder="unet", **{"use_safetensors": True, **kwargs}
            )
            components = {"unet": unet, "scheduler": scheduler}
        pipeline = cls(**components)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline

    def save_pretrained(self, save_directory, safe_serialization: bool = True, push_to_hub: bool = False, **kwargs):
        """diffusers' `save_pretrained`, plus the remote-code modules a folder needs to load without hf_ddpm.

        The folder then loads all three ways: `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` on a
        machine without hf_ddpm, `HFDDPMPipeline.from_pretrained(dir)`, and `UNet2DModel` / `DDPMScheduler` from its
        subfolders. The modules are generated from the installed hf_ddpm's source (hf_ddpm/remote_code.py), or, where
        this class itself runs as remote code, copied from the files it was loaded from. `push_to_hub=True` then
        pushes the folder as `push_to_hub` does (kwargs: repo_id, token, private, commit_message).
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message") if k in kwargs}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        _write_remote_code(self, save_directory)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            return _push_folder(self, save_directory, repo_id, **hub_kwargs)
        return None

    def push_to_hub(
        self, repo_id: str, commit_message: str | None = None, private: bool | None = None, token=None, **kwargs
    ):
        """Push the pipeline as a repo that loads all three ways, with hf_ddpm's model card (hf_ddpm.hub.push_to_hub:
        safetensors only, refused offline or without a token before any request); returns the commit URL.
        kwargs: `variant`, `max_shard_size` for the save; diffusers' `create_pr` is not supported."""
        if kwargs.pop("create_pr", False):
            raise ValueError("create_pr=True is not supported by HFDDPMPipeline.push_to_hub; push to a branch you own")
        with tempfile.TemporaryDirectory(prefix="hf_ddpm_save_") as folder:
            self.save_pretrained(folder, safe_serialization=True, **kwargs)
            return _push_folder(self, folder, repo_id, commit_message=commit_message, private=private, token=token)

    @property
    def _image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return self.unet.config.in_channels, height, width

    def _denoise(self, x_t: torch.Tensor, t, unet_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The UNet's output at (x_t, t) in x_t's dtype; the UNet itself may run in bf16 or fp16.

        Pass `unet_dtype` where it is known: diffusers' `unet.dtype` walks every submodule (hundreds of µs, as long
        as a whole scheduler step), so the sampling loop reads it once.
        """
        return self.unet(x_t.to(unet_dtype or self.unet.dtype), t).sample.to(x_t.dtype)

    @property
    def interrupt(self) -> bool:
        """True once a callback sets `pipe._interrupt = True` (diffusers' convention): the remaining steps are skipped."""
        return getattr(self, "_interrupt", False)

    @torch.inference_mode()  # no autograd bookkeeping at all (no_grad still tracks versions and views)
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        timesteps: list[int] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("sample", "pred_original_sample"),
    ) -> ImagePipelineOutput | tuple:
        """Sample `batch_size` images with the pipeline's scheduler: ancestral sampling (DDPM Algorithm 2) with
        HFDDPMScheduler, or any scheduler of `HFDDPMScheduler.compatibles` swapped in with `from_config`.

        The loop is the one diffusers' pipelines run: x_T ~ N(0, I) scaled by `scheduler.init_noise_sigma`, then per
        timestep the model on `scheduler.scale_model_input(x_t, t)` and `scheduler.step`, whose output is read by
        name. A learned-range model's variance channels go only to a scheduler that uses them (HFDDPMScheduler,
        DDPMScheduler with `variance_type="learned_range"`); the others get the mean channels alone.
        num_inference_steps < T runs the respaced chain of Improved DDPM (exact ancestral sampling of that chain);
        `timesteps` picks the visited timesteps explicitly instead (schedulers whose `set_timesteps` accepts them).
        `callback_on_step_end(pipe, i, t, tensors)` is called after every step with the requested tensors: "sample"
        (x_{t-1}) and "pred_original_sample" (x̂_0; left out where the scheduler's step gives none), for progress
        previews; returning {"sample": ...} replaces x_{t-1}; setting `pipe._interrupt = True` skips the remaining
        steps. The chain runs in float32 even when the UNet runs in bf16/fp16: only the network sees the lower
        precision.
        """
        check_positive_int(batch_size, "batch_size")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but batch_size={batch_size}: pass one generator "
                "per image, or a single generator"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; choose one of {OUTPUT_TYPES}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback tensor inputs {sorted(unknown)} unknown; allowed: {self._callback_tensor_inputs}"
            )
        scheduler, device, unet_dtype = self.scheduler, self._execution_device, self.unet.dtype
        if timesteps is not None:
            if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"{type(scheduler).__name__}.set_timesteps takes no custom timesteps; pass num_inference_steps "
                    "or use a scheduler that accepts them (HFDDPMScheduler, DDPMScheduler, DPMSolverMultistepScheduler)"
                )
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        self._interrupt = False

        chain_dtype = torch.float64 if unet_dtype == torch.float64 else torch.float32
        sample = randn_tensor((batch_size, *self._image_shape), generator=generator, device=device, dtype=chain_dtype)
        sample = sample * scheduler.init_noise_sigma  # x_T at the scheduler's noise scale (1 for DDPM)
        ours = isinstance(scheduler, HFDDPMScheduler)
        step_kwargs = {} if ours else _step_kwargs(scheduler, generator)
        keep_variance = ours or _uses_learned_variance(scheduler)
        channels = self._image_shape[0]
        step_timesteps = scheduler.timesteps.tolist() if ours else scheduler.timesteps
        unet_timesteps = scheduler.timesteps.to(device)  # one copy, not one per step

        for i, t in enumerate(self.progress_bar(step_timesteps)):
            if self.interrupt:
                continue
            model_input = sample if ours else scheduler.scale_model_input(sample, t)
            model_output = self._denoise(model_input, unet_timesteps[i], unet_dtype)  # ε_θ(x_t, t)
            if not keep_variance:
                model_output = model_output[:, :channels]  # the mean prediction; variance channels unused
            if ours:  # as a tuple: the output dataclass alone costs ~20 µs a step
                sample, pred_original_sample = scheduler.step(
                    model_output, t, sample, generator=generator, return_dict=False
                )  # x_{t-1} ~ p_θ(x_{t-1} | x_t)
            else:
                output = scheduler.step(model_output, t, sample, **step_kwargs, return_dict=True)
                sample, pred_original_sample = output.prev_sample, getattr(output, "pred_original_sample", None)
            if callback_on_step_end is not None:
                values = {"sample": sample, "pred_original_sample": pred_original_sample}
                requested = {k: values[k] for k in callback_on_step_end_tensor_inputs if values[k] is not None}
                returned = callback_on_step_end(self, i, t, requested)
                sample = (returned or {}).get("sample", sample)

        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            with torch.inference_mode(False):  # an ordinary tensor for the caller: in-place ops and autograd allowed
                image = image.clone()
        else:
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def bound_scheduler(self) -> HFDDPMScheduler:
        """The HFDDPMScheduler whose process `bits_per_dim` evaluates: the pipeline's scheduler if it is one, else
        one built from the pipeline scheduler's config (see `ddpm_scheduler_from_config`)."""
        if isinstance(self.scheduler, HFDDPMScheduler):
            return self.scheduler
        name = type(self.scheduler).__name__
        return ddpm_scheduler_from_config(self.scheduler.config, learned_variance=self._learned_variance, name=name)

    @property
    def _learned_variance(self) -> bool:
        return self.unet.config.out_channels == model_output_channels(self.unet.config.in_channels, True)

    @torch.no_grad()
    def bits_per_dim(
        self,
        images,
        num_timesteps: int | None = None,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
    ) -> BoundOutput:
        """The variational bound L (DDPM eq. 5) of each image in bits/dim, with its terms.

        images: uint8 (N, C, H, W) tensor or array with values 0..255, or a list of PIL images (converted to the
        UNet's channel count). num_timesteps=None sums all T terms (each KL term at one draw of x_t, as the DDPM
        evaluation does); an integer K gives the unbiased Monte Carlo estimate of the same bound from K sampled
        timesteps per image (stratified importance draws, see hf_ddpm.bound) plus the exact prior and decoder
        terms, with a standard error that can only overstate its spread.

        Whatever scheduler the pipeline holds (DDIM, DPM-Solver, Euler, ... swapped in for sampling), the bound is
        that of the DDPM process its config defines: T, the β schedule, `prediction_type`, `clip_sample` and
        `variance_type`, read by an HFDDPMScheduler built from that config (`bound_scheduler`). A config without
        `variance_type` (Euler, Heun, ...) means `learned_range` for a UNet with 2C output channels and
        HFDDPMScheduler's default `fixed_small` otherwise. A config that defines no DDPM process (no β schedule,
        e.g. EDMEulerScheduler) raises ValueError.
        """
        scheduler = self.bound_scheduler()
        x_start = images_to_model_range(images, self._image_shape).to(self._execution_device)
        return variational_bound(
            self._denoise,
            scheduler,
            x_start,
            num_timesteps=num_timesteps,
            batch_size=batch_size,
            generator=generator,
        )


def _package_module(pipeline, name: str):
    """hf_ddpm.<name> when `pipeline` (or its class) is the installed package's; None where it runs as remote code (a
    bundle never imports hf_ddpm, installed or not: it must behave the same everywhere)."""
    owner = pipeline if isinstance(pipeline, type) else type(pipeline)
    if not owner.__module__.startswith("hf_ddpm."):
        return None
    return importlib.import_module(f"hf_ddpm.{name}")


def _write_remote_code(pipeline, directory) -> None:
    """The pipeline and scheduler modules into a saved folder, named in its model_index.json (remote_code.py)."""
    remote_code = _package_module(pipeline, "remote_code")
    if remote_code is not None:
        remote_code.add_remote_code(directory)
        return
    index_path = os.path.join(directory, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    for key, source, folder in (
        ("_class_name", inspect.getsourcefile(type(pipeline)), ""),
        ("scheduler", inspect.getsourcefile(HFDDPMScheduler), "scheduler"),  # the module this one imports
    ):
        module = os.path.splitext(os.path.basename(source))[0]
        os.makedirs(os.path.join(directory, folder), exist_ok=True)
        shutil.copyfile(source, os.path.join(directory, folder, f"{module}.py"))
        if key == "_class_name" or type(pipeline.scheduler).__name__ == "HFDDPMScheduler":
            index[key] = [module, "HFDDPMPipeline" if key == "_class_name" else "HFDDPMScheduler"]
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def _push_folder(pipeline, folder, repo_id: str, commit_message=None, private=None, token=None) -> str:
    hub = _package_module(pipeline, "hub")
    if hub is None:
        raise RuntimeError("pushing an HFDDPMPipeline needs hf_ddpm installed (pip install hf_ddpm)")
    return hub.push_to_hub(folder, repo_id, private=bool(private), token=token, commit_message=commit_message)


LEARNED_VARIANCES = ("learned", "learned_range")  # diffusers' variance types that read the extra output channels
VARIANCE_READERS = ("HFDDPMScheduler", "DDPMScheduler")  # the schedulers whose step uses a learned variance


def _uses_learned_variance(scheduler) -> bool:
    """Whether `scheduler.step` takes a learned-range model's 2C output channels (mean and variance)."""
    variance = scheduler.config.get("variance_type")
    return type(scheduler).__name__ in VARIANCE_READERS and variance in LEARNED_VARIANCES


def _step_kwargs(scheduler, generator) -> dict:
    """`generator=` for the schedulers whose step draws noise (DDPM, DDIM, Euler ancestral, SDE solvers)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def ddpm_scheduler_from_config(config, learned_variance: bool = False, name: str | None = None) -> HFDDPMScheduler:
    """An HFDDPMScheduler for the DDPM process a scheduler config defines (any diffusers scheduler with a β schedule).

    The keys HFDDPMScheduler shares are taken as they are; a key the config lacks or leaves None keeps
    HFDDPMScheduler's default, except `variance_type`: `learned_range` when `learned_variance` (a UNet with 2C
    output channels), since schedulers without the key (Euler, Heun, ...) still sample that model's mean.
    """
    config = dict(config)
    name = name or config.get("_class_name", "this")
    init_keys = set(inspect.signature(HFDDPMScheduler.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in config.items() if k in init_keys and v is not None}
    if learned_variance and kwargs.get("variance_type") not in LEARNED_VARIANCES:
        kwargs["variance_type"] = "learned_range"
    if "beta_schedule" not in config and "trained_betas" not in kwargs:
        raise ValueError(
            f"bits_per_dim evaluates the DDPM process that the pipeline's scheduler config defines, but the {name} "
            f"config defines none (it has no beta_schedule or trained_betas; keys: {sorted(config)}). Swap in a "
            "scheduler with a β schedule (HFDDPMScheduler, DDPMScheduler, DDIMScheduler, ...) to evaluate the bound"
        )
    try:
        return HFDDPMScheduler.from_config({"_class_name": config.get("_class_name", "HFDDPMScheduler"), **kwargs})
    except ValueError as err:
        raise ValueError(
            f"bits_per_dim: the {name} config defines no DDPM process that can be evaluated: {err}"
        ) from err


def images_to_model_range(images, expected_shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 images (N, C, H, W) or PIL images → float32 tensor in [-1, 1] (`pixels_to_model`), shape checked."""
    channels, height, width = expected_shape
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images or not all(isinstance(im, PIL.Image.Image) for im in images):
            raise ValueError("images given as a list must be a non-empty list of PIL images")
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
        if mode is None:
            raise ValueError(f"PIL images cannot be converted to {channels} channels; pass a uint8 array instead")
        arrays = [np.asarray(im.convert(mode), dtype=np.uint8).reshape(im.height, im.width, channels) for im in images]
        sizes = {a.shape[:2] for a in arrays}
        if sizes != {(height, width)}:
            raise ValueError(f"images must be {height}x{width} (the UNet's sample_size), got sizes {sorted(sizes)}")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 pixel values 0..255, got dtype {images.dtype}; "
            "scale float images in [0, 1] by 255 and round them first"
        )
    if images.dim() == 4 and images.shape[0] == 0:
        raise ValueError(f"images holds no image: shape {tuple(images.shape)}; pass at least one (N >= 1)")
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, height, width):
        raise ValueError(
            f"images must have shape (N, {channels}, {height}, {width}) to match the UNet, got {tuple(images.shape)}"
        )
    return pixels_to_model(images)
