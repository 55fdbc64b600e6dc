"""HFDDPMScheduler: DDPM's forward process, exact posterior, reverse step and per-timestep bound terms.

The way through this file follows the paper: schedule → forward process q(x_t | x_0) → posterior
q(x_{t-1} | x_t, x_0) → reverse step p_θ(x_{t-1} | x_t) → the terms of the variational bound.

Config keys shared with diffusers' `DDPMScheduler` keep its names and meanings, so either class loads the other's
config. Coefficients are computed once in float64. Where diffusers' `DDPMScheduler` is wrong this class is not:
- `fixed_large_log` gives a finite standard deviation (diffusers takes the square root of a log-variance: NaN);
- `trailing` spacing never produces timestep -1;
- the last reverse step of a chain adds no noise even when its timestep is above 0 (diffusers adds noise when t > 0).
"""

from __future__ import annotations

import inspect
from typing import Literal, get_args

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .chain import TIMESTEP_SPACINGS, Chain, ChainRows, TimestepSpacing, spaced_timesteps
from .gaussians import discretized_gaussian_log_likelihood, normal_kl
from .scheduler_configs import PIPELINE_SCHEDULERS, PROCESS_KEYS, check_foreign_config, from_early_keys
from .schedules import SCHEDULE_ALIASES, BetaSchedule, check_betas, check_choice, named_betas

VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range"]
VARIANCE_TYPES = get_args(VarianceType)
PredictionType = Literal["epsilon", "sample", "v_prediction"]
PREDICTION_TYPES = get_args(PredictionType)


def model_output_channels(data_channels: int, learned_variance: bool) -> int:
    """The mean's channels, then for learned_range one v per channel (Improved DDPM eq. 15)."""
    return 2 * data_channels if learned_variance else data_channels


class HFDDPMScheduler(SchedulerMixin, ConfigMixin):
    """Ancestral sampling and the variational bound of DDPM (Ho et al. 2020), with Improved DDPM's respacing and
    learned variances (Nichol & Dhariwal 2021).

    Args: as diffusers' `DDPMScheduler`. `beta_schedule` also accepts `"cosine"` (stored as `squaredcos_cap_v2`).
    `variance_type`: `fixed_small` (σ² = β̃_t), `fixed_large` (σ² = β_t, with β̃_1 at t = 0 as the DDPM code does),
    their `_log` forms (the same variances handled in log space), or `learned_range` (Improved DDPM eq. 15).

    Saved alone (`save_pretrained(dir)`, `push_to_hub(repo)`), it writes only `scheduler_config.json`:
    `"_class_name": "HFDDPMScheduler"` and DDPMScheduler's keys, no remote code. diffusers 0.42 loads a scheduler
    with `load_config` + `from_config` and never runs code from its folder (`trust_remote_code` is read only by
    `DiffusionPipeline`, through model_index.json, and `AutoModel`, through config.json), so module files there would
    go unused. Without hf_ddpm, `DDPMScheduler.from_pretrained(dir)` loads the same process (T, β, variance and
    prediction type) with diffusers' step (see this module's docstring for where it differs). A pipeline's save
    writes this class's remote code into its scheduler/ folder (hf_ddpm/remote_code.py).
    """

    # The schedulers HFDDPMPipeline is tested to sample with (tests/test_pipeline_schedulers.py); `from_config` reads
    # the β schedule of any CONFIG_SOURCES config.
    _compatibles = list(PIPELINE_SCHEDULERS)
    order = 1
    # diffusers' DDPMScheduler's own, on the state both classes name alike (`config`, `timesteps`,
    # `num_inference_steps`, `custom_timesteps`): the same results by construction, one implementation to maintain.
    previous_timestep = DDPMScheduler.previous_timestep  # the next timestep of the chain, -1 after the last one
    scale_model_input = DDPMScheduler.scale_model_input  # DDPM feeds x_t to the model unscaled
    _threshold_sample = DDPMScheduler._threshold_sample  # dynamic thresholding of x̂_0 (Imagen, Saharia et al. 2022)
    __len__ = DDPMScheduler.__len__  # T

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule | Literal["cosine"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: TimestepSpacing = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if beta_schedule in SCHEDULE_ALIASES:
            beta_schedule = SCHEDULE_ALIASES[beta_schedule]
            self.register_to_config(beta_schedule=beta_schedule)  # saved configs stay readable by diffusers
        if variance_type == "learned":
            raise ValueError(
                "variance_type='learned' (the model outputs σ² directly) is not supported; use 'learned_range' "
                "(Improved DDPM eq. 15: the model interpolates between log β̃_t and log β_t)"
            )
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if rescale_betas_zero_snr:
            raise ValueError(
                "rescale_betas_zero_snr=True is not supported: it sets ᾱ_{T-1} = 0, where ε-prediction divides by "
                "zero and the prior term of the bound is undefined; use False"
            )

        if trained_betas is not None:
            betas = check_betas(trained_betas)
            if len(betas) != num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(betas)} values but num_train_timesteps={num_train_timesteps}; "
                    "they must be equal"
                )
        else:
            betas = named_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)

        # The training chain t = 0 .. T-1, float64 (DDPM eq. 4, 6, 7); diffusers' attribute names beside it.
        self.train_chain = Chain.of(betas)
        self.betas = torch.from_numpy(self.train_chain.beta)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(self.train_chain.alpha_bar)
        self.init_noise_sigma = 1.0
        self.register_to_config(_use_default_values=self._keys_at_default())

        # Runtime state (not config): the chain that `step` walks, set by `set_timesteps`.
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_chain(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64))

    def _keys_at_default(self) -> list[str]:
        """The config's `_use_default_values`: the keys that a scheduler swapped in with `from_config` takes at its
        own default (diffusers' ConfigMixin drops them from the config it reads).

        diffusers records the keys left out of the call, in the iteration order of a set of strings, which changes
        with PYTHONHASHSEED, and forgets them on save. Here they are the keys whose value is this class's default, in
        signature order: a function of the values alone, equal after save/load and in every interpreter. The DDPM
        process keys (PROCESS_KEYS) are never listed, so every swapped-in scheduler keeps them (see there).
        """
        params = inspect.signature(type(self).__init__).parameters.values()
        return [
            p.name
            for p in params
            if p.default is not p.empty and p.name not in PROCESS_KEYS and self.config[p.name] == p.default
        ]

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """As diffusers' `ConfigMixin.from_config` (and so `from_pretrained`), but a config that does not describe a
        β schedule is refused instead of silently giving the defaults: a config of a class other than this one,
        `DDPMScheduler` or a scheduler diffusers lists as compatible (`DDIMScheduler`, `EulerDiscreteScheduler`,
        ...), one of such a class without `beta_schedule`, or a dict without `_class_name` that has none of this
        class's keys (a config from another library). The early keys of diffusers' first release
        (`"_class_name": "GaussianDDPMScheduler"`, `"timesteps"` for T), still in the google/ddpm-* repos, are read as
        DDPMScheduler's. From a compatible scheduler's config this takes the keys it
        shares (T, the β schedule, `prediction_type`, `timestep_spacing`, ...); the others keep their defaults.

        An in-memory config (`EDMEulerScheduler().config` names no class) is judged by its keys: one with keys this
        class does not take and no β schedule (EDM's σ range, flow matching's shift) is another scheduler's, and is
        refused as its saved folder would be; a partial dict of this class's own keys is read as this class's."""
        config = from_early_keys(getattr(config, "config", config))
        check_foreign_config(cls, config)
        return super().from_config(config, **kwargs)  # return_unused_kwargs and overrides as diffusers reads them

    # ------------------------------------------------------------------ timesteps and respacing

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the S timesteps that sampling visits (descending), by count or explicitly.

        The reverse process then runs on the respaced chain of Improved DDPM (section 4): for kept timesteps
        S_k, β'_k = 1 - ᾱ_{S_k} / ᾱ_{S_{k-1}}, and the posterior and variances follow from β'.
        """
        num_train = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            chosen = np.asarray([int(t) for t in timesteps], dtype=np.int64)
            if chosen.size == 0 or np.any(np.diff(chosen) >= 0):
                raise ValueError(f"timesteps must be non-empty and strictly decreasing, got {chosen.tolist()}")
            if chosen[0] >= num_train or chosen[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {num_train - 1}], got {chosen.tolist()}")
            self.custom_timesteps, self.num_inference_steps = True, len(chosen)
        else:
            chosen = spaced_timesteps(
                num_train, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset
            )
            self.custom_timesteps, self.num_inference_steps = False, num_inference_steps
        self._set_chain(chosen, device)

    def _set_chain(self, timesteps: np.ndarray, device: str | torch.device | None = None) -> None:
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)  # int64 on `device`, as diffusers'
        self._timestep_list = timesteps.tolist()  # steps look timesteps up here: no device sync
        self._step_index = {t: i for i, t in enumerate(self._timestep_list)}
        self.step_chain = Chain.of(self.train_chain.beta, timesteps)  # row i ↔ timesteps[i]

    def _index_of(self, timestep) -> int:
        t = int(timestep)
        if t not in self._step_index:
            raise ValueError(
                f"timestep {t} is not in this scheduler's chain; call set_timesteps first or pick one of "
                f"{self._timestep_list[:5]}...{self._timestep_list[-3:]}"
            )
        return self._step_index[t]

    # ------------------------------------------------------------------ forward process

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample from q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) (DDPM eq. 4) given the noise ε."""
        c = self.train_chain.at(timesteps, original_samples)
        return c.sqrt_alpha_bar * original_samples + c.sqrt_one_minus_alpha_bar * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022), the v_prediction target."""
        c = self.train_chain.at(timesteps, sample)
        return c.sqrt_alpha_bar * noise - c.sqrt_one_minus_alpha_bar * sample

    # ------------------------------------------------------------------ posterior q(x_{t-1} | x_t, x_0)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0) on the training chain (DDPM eq. 6, 7).

        μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t) x_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) x_t;
        log β̃_t is clipped at t = 0 (where β̃_0 = 0) to log β̃_1, as in the DDPM code.
        """
        c = self.train_chain.at(timesteps, x_t)
        return c.mu_tilde_coef_x0 * x_start + c.mu_tilde_coef_xt * x_t, c.log_beta_tilde_clipped

    # ------------------------------------------------------------------ reverse process p_θ(x_{t-1} | x_t)

    def _predict_x0(self, c: ChainRows, model_output, x_t, clip_denoised: bool | None):
        """x̂_0 from the model's output: eq. 15 inverted for ε, the output itself for `sample`, or from v; then
        clipped or thresholded as configured (clip_denoised=None), or as `clip_denoised` says."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x_t - c.sqrt_one_minus_alpha_bar * model_output) / c.sqrt_alpha_bar  # DDPM eq. 15
        elif kind == "sample":
            x0 = model_output
        else:  # v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)
            x0 = c.sqrt_alpha_bar * x_t - c.sqrt_one_minus_alpha_bar * model_output
        if clip_denoised is None:
            clip_denoised = self.config.clip_sample or self.config.thresholding
        if not clip_denoised:
            return x0
        if self.config.thresholding:
            return self._threshold_sample(x0)
        return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

    def _model_log_variance(self, c: ChainRows, predicted_variance):
        """log σ_t² of p_θ(x_{t-1} | x_t) for the configured variance type (broadcasts against x_t)."""
        kind = self.config.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            return c.log_beta_tilde_clipped  # σ² = β̃_t (DDPM section 3.2)
        if kind in ("fixed_large", "fixed_large_log"):
            return c.log_beta_clipped  # σ² = β_t
        # Improved DDPM eq. 15: log σ² = v' log β_t + (1 - v') log β̃_t, v' = (v + 1) / 2 in [0, 1]. The upper end
        # is log β_t itself, also at t = 0 (only β̃_0 = 0 needs clipping), as in the Improved DDPM code.
        frac = (predicted_variance + 1.0) / 2.0
        return frac * c.log_beta + (1.0 - frac) * c.log_beta_tilde_clipped

    def _split_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        channels = sample.shape[1]
        if self.config.variance_type == "learned_range":
            if model_output.shape[1] != model_output_channels(channels, learned_variance=True):
                raise ValueError(
                    f"variance_type='learned_range' needs a model with 2 × {channels} output channels (mean and "
                    f"variance), got {model_output.shape[1]}; use a learned-variance UNet or a fixed variance type"
                )
            return torch.split(model_output, channels, dim=1)
        if model_output.shape[1] != channels:
            raise ValueError(
                f"model_output has {model_output.shape[1]} channels but the sample has {channels}; with "
                f"variance_type={self.config.variance_type!r} they must be equal"
            )
        return model_output, None

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        clip_denoised: bool | None = None,
    ):
        """Mean, log-variance and predicted x_0 of p_θ(x_{t-1} | x_t) on the training chain (DDPM eq. 11, 12).

        clip_denoised: None clips (or thresholds) x̂_0 as configured; False leaves it as predicted (training: a
        clipped x̂_0 stops the bound's gradient wherever it leaves [-1, 1]); True clips it.
        """
        return self._reverse(self.train_chain.at(timesteps, x_t), model_output, x_t, clip_denoised)

    def _reverse(self, c: ChainRows, model_output, x_t, clip_denoised: bool | None = None):
        # 1. the model's output: its mean part and, for learned_range, the variance interpolation v
        mean_output, predicted_variance = self._split_output(model_output.to(x_t.dtype), x_t)
        # 2. x̂_0 (DDPM eq. 15 for ε), clipped or thresholded
        x0 = self._predict_x0(c, mean_output, x_t, clip_denoised)
        # 3. the mean μ_θ(x_t, t) = μ̃_t(x_t, x̂_0) (DDPM eq. 7 with x_0 predicted; eq. 11 for ε)
        mean = c.mu_tilde_coef_x0 * x0 + c.mu_tilde_coef_xt * x_t
        # 4. the variance σ_t² (DDPM section 3.2; Improved DDPM eq. 15)
        log_var = self._model_log_variance(c, predicted_variance)
        return mean, log_var, x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One ancestral step x_t → x_{t-1} ~ p_θ(x_{t-1} | x_t) on the current (possibly respaced) chain
        (DDPM Algorithm 2, lines 3-4)."""
        # 1. this step's row of the chain (stored in `timesteps` order)
        i = self._index_of(timestep)
        # 2. x̂_0, the mean μ_θ(x_t, t) and the variance σ_t² of p_θ(x_{t-1} | x_t) (`_reverse`: DDPM eq. 7, 11, 15)
        mean, log_var, x0 = self._reverse(self.step_chain.at(i, sample), model_output, sample)
        # 3. x_{t-1} = μ_θ + σ_t z, z ~ N(0, I), with z = 0 at the chain's last step (Algorithm 2, line 4)
        if i < len(self._timestep_list) - 1:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            mean = mean + torch.exp(0.5 * log_var) * noise
        if not return_dict:
            return (mean, x0)
        return DDPMSchedulerOutput(prev_sample=mean, pred_original_sample=x0)

    # ------------------------------------------------------------------ the variational bound (DDPM eq. 5)

    def prior_kl(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per element, in nats."""
        c = self.train_chain.at(self.config.num_train_timesteps - 1, x_start)  # t = T-1: one row, 0-d tensors
        zero = torch.zeros_like(x_start)
        return normal_kl(c.sqrt_alpha_bar * x_start, c.log_one_minus_alpha_bar, zero, zero)

    def bound_terms(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        clip_denoised: bool | None = None,
    ) -> torch.Tensor:
        """Per-element terms of the bound at timesteps t (B,), in nats, on the training chain.

        t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)), two Gaussians in closed form;
        t = 0: L_0 = -log p_θ(x_0 | x_1), the discretized Gaussian decoder (DDPM eq. 13).
        x_start holds the data scaled to [-1, 1]; compute in float64 for exact values. clip_denoised: as in
        `p_mean_variance` (training passes False).
        """
        true_mean, true_log_var = self.q_posterior(x_start, x_t, timesteps)
        mean, log_var, _ = self.p_mean_variance(model_output, x_t, timesteps, clip_denoised)
        kl = normal_kl(true_mean, true_log_var, mean, log_var)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var).to(kl.dtype)
        is_first = (timesteps.to(x_t.device) == 0).view(-1, *([1] * (x_t.dim() - 1)))
        return torch.where(is_first, decoder_nll, kl)
