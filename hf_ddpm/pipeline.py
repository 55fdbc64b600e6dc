"""HFDDPMPipeline: ancestral sampling (DDPM Algorithm 2) and the variational bound in bits/dim (DDPM eq. 5).

The algorithm lives here; what surrounds it lives by subject: loading in loading.py, saving and pushing in hub.py,
swapped-in schedulers in scheduler_configs.py, pixel conversions in images.py, the estimators beyond the bound in
evaluation/likelihood.py. This module is bundled into a Hub repo's remote code (hf_ddpm/remote_code.py), where
standalone.py answers for hub.py, loading.py and evaluation/likelihood.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from .bound import BoundOutput, variational_bound
from .evaluation.likelihood import log_likelihood as estimate_log_likelihood
from .hub import push_pipeline, save_pipeline
from .images import images_to_model_range, model_to_pixels, model_to_unit
from .loading import load_components
from .scheduler import HFDDPMScheduler, model_output_channels
from .scheduler_configs import ddpm_scheduler_from_config, step_kwargs, uses_learned_variance
from .schedules import check_choice, check_positive_int

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
    model_to_pixels = staticmethod(model_to_pixels)  # [-1, 1] → uint8, for previews of the callback's tensors

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
        pipeline = cls(**load_components(pretrained_model_name_or_path, **kwargs))
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))  # in memory; never saved
        return pipeline

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' `save_pretrained`, plus the remote-code modules a folder needs to load without hf_ddpm.

        The folder then loads all three ways: `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` on a
        machine without hf_ddpm, `HFDDPMPipeline.from_pretrained(dir)`, and `UNet2DModel` / `DDPMScheduler` from its
        subfolders. Written atomically, with no local path in any config (hf_ddpm.hub.save_hub_pipeline); where
        this class runs as remote code, the modules are copied from the files it was loaded from.
        kwargs: diffusers' `safe_serialization` (default True), `variant`, `max_shard_size`; `push_to_hub=True` then
        pushes the folder as `push_to_hub` does (kwargs: repo_id, token, private, commit_message).
        """
        return save_pipeline(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Push the pipeline as a repo that loads all three ways, with hf_ddpm's model card (hf_ddpm.hub.push_to_hub:
        safetensors only, refused offline or without a token before any request); returns the commit URL.
        kwargs: `commit_message`, `private`, `token` as in diffusers; `max_shard_size` for the save; `create_pr` and
        `variant` are not supported."""
        return push_pipeline(self, repo_id, **kwargs)

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
        check_choice("output_type", output_type, OUTPUT_TYPES)
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
        step_extras = step_kwargs(scheduler, generator)
        keep_variance = ours or uses_learned_variance(scheduler)
        channels = self._image_shape[0]
        step_timesteps = scheduler.timesteps.tolist() if ours else scheduler.timesteps
        unet_timesteps = scheduler.timesteps.to(device)  # one copy, not one per step

        for i, t in enumerate(self.progress_bar(step_timesteps)):
            if self.interrupt:
                continue
            model_input = scheduler.scale_model_input(sample, t)
            model_output = self._denoise(model_input, unet_timesteps[i], unet_dtype)  # ε_θ(x_t, t)
            if not keep_variance:
                model_output = model_output[:, :channels]  # the mean prediction; variance channels unused
            # x_{t-1} ~ p_θ(x_{t-1} | x_t); ours as a tuple (its output dataclass alone costs ~20 µs a step), the
            # others' outputs read by name
            output = scheduler.step(model_output, t, sample, **step_extras, return_dict=not ours)
            sample, pred_original_sample = output if ours else (output.prev_sample, output.get("pred_original_sample"))
            if callback_on_step_end is not None:
                values = {"sample": sample, "pred_original_sample": pred_original_sample}
                requested = {k: values[k] for k in callback_on_step_end_tensor_inputs if values[k] is not None}
                returned = callback_on_step_end(self, i, t, requested)
                sample = (returned or {}).get("sample", sample)

        image = model_to_unit(sample)
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
        learned = self.unet.config.out_channels == model_output_channels(self.unet.config.in_channels, True)
        name = type(self.scheduler).__name__
        return ddpm_scheduler_from_config(HFDDPMScheduler, self.scheduler.config, learned_variance=learned, name=name)

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
        timesteps per image (stratified importance draws, see hf_ddpm.bound) plus the prior term and the decoder
        term (at one draw of x_1), with a standard error that can only overstate the spread of the sampled terms; the
        decoder draw's spread is not in it.

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
            self._denoise, scheduler, x_start, num_timesteps=num_timesteps, batch_size=batch_size, generator=generator,
            progress_bar=self.progress_bar,  # a count and an ETA; set_progress_bar_config(disable=True) silences it
        )  # fmt: skip

    def log_likelihood(self, images, method: str = "bound", **kwargs):
        """Bits/dim of each image by `method`: "bound" (eq. 5), "trajectory" (eq. 3), "iw" (importance-weighted),
        "ode" (probability-flow ODE) or "rate_distortion"; a result naming the method, its standard error, its cost
        in model evaluations and what it bounds (hf_ddpm.evaluation.likelihood, which needs hf_ddpm installed)."""
        return estimate_log_likelihood(self, images, method, **kwargs)
