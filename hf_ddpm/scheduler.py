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

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import schedules
from .chain import ChainTables, spaced_timesteps
from .gaussians import discretized_gaussian_log_likelihood, normal_kl

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
SCHEDULE_ALIASES = {"cosine": "squaredcos_cap_v2"}  # Improved DDPM's name for diffusers' squaredcos_cap_v2
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


@dataclass
class HFDDPMSchedulerOutput(BaseOutput):
    """Output of `HFDDPMScheduler.step`.

    prev_sample: x_{t-1} (B, C, H, W), the input of the next step.
    pred_original_sample: the model's prediction of x_0 (B, C, H, W), for previews.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}")


class HFDDPMScheduler(SchedulerMixin, ConfigMixin):
    """Ancestral sampling and the variational bound of DDPM (Ho et al. 2020), with Improved DDPM's respacing and
    learned variances (Nichol & Dhariwal 2021).

    Args: as diffusers' `DDPMScheduler`. `beta_schedule` also accepts `"cosine"` (stored as `squaredcos_cap_v2`).
    `variance_type`: `fixed_small` (σ² = β̃_t), `fixed_large` (σ² = β_t, with β̃_1 at t = 0 as the DDPM code does),
    their `_log` forms (the same variances handled in log space), or `learned_range` (Improved DDPM eq. 15).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "cosine"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: Literal[
            "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range"
        ] = "fixed_small",
        clip_sample: bool = True,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if beta_schedule in SCHEDULE_ALIASES:
            beta_schedule = SCHEDULE_ALIASES[beta_schedule]
            self.register_to_config(beta_schedule=beta_schedule)  # saved configs stay readable by diffusers
        if trained_betas is None:
            _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES + tuple(SCHEDULE_ALIASES))
        if variance_type == "learned":
            raise ValueError(
                "variance_type='learned' (the model outputs σ² directly) is not supported; use 'learned_range' "
                "(Improved DDPM eq. 15: the model interpolates between log β̃_t and log β_t)"
            )
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if rescale_betas_zero_snr:
            raise ValueError(
                "rescale_betas_zero_snr=True is not supported: it sets ᾱ_{T-1} = 0, where ε-prediction divides by "
                "zero and the prior term of the bound is undefined; use False"
            )

        if trained_betas is not None:
            betas = schedules.check_betas(trained_betas)
            if len(betas) != num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(betas)} values but num_train_timesteps={num_train_timesteps}; "
                    "they must be equal"
                )
        elif beta_schedule == "linear":
            betas = schedules.linear_betas(num_train_timesteps, beta_start, beta_end)
        elif beta_schedule == "scaled_linear":
            betas = schedules.scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
        elif beta_schedule == "squaredcos_cap_v2":
            betas = schedules.cosine_betas(num_train_timesteps)
        else:
            betas = schedules.sigmoid_betas(num_train_timesteps, beta_start, beta_end)

        # The training chain t = 0 .. T-1, float64 (DDPM eq. 4, 6, 7).
        self.betas = torch.from_numpy(betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.train_chain = ChainTables.from_alphas_cumprod(self.alphas_cumprod.numpy())
        self.init_noise_sigma = 1.0

        # Runtime state (not config): the chain that `step` walks, set by `set_timesteps`.
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_chain(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64))

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As diffusers' `ConfigMixin.from_config` (and so `from_pretrained`), but a config that does not describe a
        β schedule is refused instead of silently giving the defaults: a config of a class other than this one,
        `DDPMScheduler` or a scheduler diffusers lists as compatible (`DDIMScheduler`, `EulerDiscreteScheduler`,
        ...), one of such a class without `beta_schedule`, or a dict without `_class_name` that has none of this
        class's keys (a config from another library). From a compatible scheduler's config this takes the keys it
        shares (T, the β schedule, `prediction_type`, `timestep_spacing`, ...); the others keep their defaults."""
        _check_foreign_config(cls, getattr(config, "config", config))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

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
        self._set_chain(chosen)

    def _set_chain(self, timesteps: np.ndarray) -> None:
        self.timesteps = torch.from_numpy(timesteps.copy())  # kept on the CPU: reading one is not a device sync
        self._timestep_list = timesteps.tolist()
        self._step_index = {t: i for i, t in enumerate(self._timestep_list)}
        # Respaced ᾱ in ascending time order; `step_chain` row k belongs to timestep timesteps[S - 1 - k].
        self.step_chain = ChainTables.from_alphas_cumprod(self.alphas_cumprod.numpy()[timesteps[::-1]])

    def previous_timestep(self, timestep: int) -> int:
        """The timestep that follows `timestep` in the sampling chain; -1 after the last one."""
        i = self._index_of(timestep)
        return self._timestep_list[i + 1] if i + 1 < len(self._timestep_list) else -1

    def _index_of(self, timestep) -> int:
        t = int(timestep)
        if t not in self._step_index:
            raise ValueError(
                f"timestep {t} is not in this scheduler's chain; call set_timesteps first or pick one of "
                f"{self._timestep_list[:5]}...{self._timestep_list[-3:]}"
            )
        return self._step_index[t]

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM feeds x_t to the model unscaled."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ forward process

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample from q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) (DDPM eq. 4) given the noise ε."""
        sqrt_ac, sqrt_one_minus_ac = self.train_chain.gather(
            ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), timesteps, original_samples
        )
        return sqrt_ac * original_samples + sqrt_one_minus_ac * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022), the v_prediction target."""
        sqrt_ac, sqrt_one_minus_ac = self.train_chain.gather(
            ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), timesteps, sample
        )
        return sqrt_ac * noise - sqrt_one_minus_ac * sample

    # ------------------------------------------------------------------ posterior q(x_{t-1} | x_t, x_0)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0) on the training chain (DDPM eq. 6, 7).

        μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t) x_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) x_t;
        log β̃_t is clipped at t = 0 (where β̃_0 = 0) to log β̃_1, as in the DDPM code.
        """
        coef_x0, coef_xt, log_var = self.train_chain.gather(
            ("posterior_coef_x0", "posterior_coef_xt", "posterior_log_variance_clipped"), timesteps, x_t
        )
        return coef_x0 * x_start + coef_xt * x_t, log_var

    # ------------------------------------------------------------------ reverse process p_θ(x_{t-1} | x_t)

    def _predict_x0(self, chain: ChainTables, index, model_output, sample):
        """x_0 from the model's output: eq. 15 inverted for ε, the output itself for `sample`, or from v."""
        sqrt_ac, sqrt_one_minus_ac = chain.gather(
            ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), index, sample
        )
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - sqrt_one_minus_ac * model_output) / sqrt_ac
        elif kind == "sample":
            x0 = model_output
        else:
            x0 = sqrt_ac * sample - sqrt_one_minus_ac * model_output
        if self.config.thresholding:
            return self._threshold_sample(x0)
        if self.config.clip_sample:
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def _model_log_variance(self, chain: ChainTables, index, predicted_variance, like: torch.Tensor):
        """log σ_t² of p_θ(x_{t-1} | x_t) for the configured variance type."""
        kind = self.config.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            (log_small,) = chain.gather(("posterior_log_variance_clipped",), index, like)
            return log_small  # broadcasts against x_t; no full-size tensor per step
        if kind in ("fixed_large", "fixed_large_log"):
            (log_large,) = chain.gather(("log_betas_clipped",), index, like)
            return log_large
        # Improved DDPM eq. 15: log σ² = v' log β_t + (1 - v') log β̃_t, v' = (v + 1) / 2 in [0, 1]. The upper end
        # is log β_t itself, also at t = 0 (only β̃_0 = 0 needs clipping), as in the Improved DDPM code.
        log_small, log_large = chain.gather(("posterior_log_variance_clipped", "log_betas"), index, like)
        frac = (predicted_variance + 1.0) / 2.0
        return frac * log_large + (1.0 - frac) * log_small

    def _split_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        channels = sample.shape[1]
        if self.config.variance_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
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

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor):
        """Mean, log-variance and predicted x_0 of p_θ(x_{t-1} | x_t) on the training chain (DDPM eq. 11, 12)."""
        return self._reverse(self.train_chain, timesteps, model_output, x_t)

    def _reverse(self, chain: ChainTables, index, model_output, x_t):
        model_output = model_output.to(x_t.dtype)
        mean_output, predicted_variance = self._split_output(model_output, x_t)
        x0 = self._predict_x0(chain, index, mean_output, x_t)
        coef_x0, coef_xt = chain.gather(("posterior_coef_x0", "posterior_coef_xt"), index, x_t)
        mean = coef_x0 * x0 + coef_xt * x_t  # DDPM eq. 7 with x_0 predicted
        log_var = self._model_log_variance(chain, index, predicted_variance, x_t)
        return mean, log_var, x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> HFDDPMSchedulerOutput | tuple:
        """One ancestral step x_t → x_{t-1} ~ p_θ(x_{t-1} | x_t) on the current (possibly respaced) chain.

        1. x̂_0 from the model output (DDPM eq. 15 for ε), clipped or thresholded;
        2. the posterior mean μ̃(x_t, x̂_0) (eq. 7) with the chain's coefficients;
        3. add σ_t z unless this is the chain's last step (Algorithm 2, line 4: z = 0 for the final step).
        """
        i = self._index_of(timestep)
        row = len(self._timestep_list) - 1 - i  # row in ascending order
        mean, log_var, x0 = self._reverse(self.step_chain, row, model_output, sample)
        if row > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            mean = mean + torch.exp(0.5 * log_var) * noise
        if not return_dict:
            return (mean, x0)
        return HFDDPMSchedulerOutput(prev_sample=mean, pred_original_sample=x0)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen, Saharia et al. 2022) of x̂_0, as diffusers' `thresholding=True`."""
        batch = sample.shape[0]
        flat = sample.reshape(batch, -1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32 or float64; float64 stays float64 (the bound is exact)
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1.0, max=self.config.sample_max_value).unsqueeze(1)
        return (flat.clamp(-s, s) / s).reshape(sample.shape).to(sample.dtype)

    # ------------------------------------------------------------------ the variational bound (DDPM eq. 5)

    def prior_kl(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per element, in nats."""
        last = torch.full((x_start.shape[0],), self.config.num_train_timesteps - 1, dtype=torch.long)
        sqrt_ac, log_one_minus_ac = self.train_chain.gather(
            ("sqrt_alphas_cumprod", "log_one_minus_alphas_cumprod"), last, x_start
        )
        return normal_kl(sqrt_ac * x_start, log_one_minus_ac, torch.zeros_like(x_start), torch.zeros_like(x_start))

    def bound_terms(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Per-element terms of the bound at timesteps t (B,), in nats, on the training chain.

        t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)), two Gaussians in closed form;
        t = 0: L_0 = -log p_θ(x_0 | x_1), the discretized Gaussian decoder (DDPM eq. 13).
        x_start holds the data scaled to [-1, 1]; compute in float64 for exact values.
        """
        true_mean, true_log_var = self.q_posterior(x_start, x_t, timesteps)
        mean, log_var, _ = self.p_mean_variance(model_output, x_t, timesteps)
        kl = normal_kl(true_mean, true_log_var, mean, log_var)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var).to(kl.dtype)
        is_first = (timesteps.to(x_t.device) == 0).view(-1, *([1] * (x_t.dim() - 1)))
        return torch.where(is_first, decoder_nll, kl)


def _check_foreign_config(cls, config) -> None:
    if not config:
        return
    name = config.get("_class_name")
    own = {cls.__name__, "HFDDPMScheduler", "DDPMScheduler"}
    allowed = sorted(own | set(cls._compatibles))
    if name is None:
        known = set(cls._get_init_keys(cls)) & set(config)
        if not known:
            raise ValueError(
                f"this scheduler config has none of {cls.__name__}'s keys (it has {sorted(config)}): it is not a "
                f"diffusers scheduler config. Expected keys such as num_train_timesteps, beta_schedule, beta_start, "
                f"beta_end, variance_type, prediction_type (the config of one of {allowed})"
            )
    elif name not in allowed or (name not in own and "beta_schedule" not in config):
        raise ValueError(
            f"a {name} config cannot configure {cls.__name__}: it holds no β schedule for DDPM. Load a config of one "
            f"of {allowed} (with beta_schedule), or build {cls.__name__}(num_train_timesteps=..., beta_schedule=...)"
        )
