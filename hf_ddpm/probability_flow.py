"""The exact likelihood of a DDPM through the probability-flow ODE of the VP SDE (Song et al. 2021, "Score-based
generative modeling through SDEs", Sec. 4.3 and App. D), as score_sde computes it for the DDPM checkpoints.

The VP SDE of a discrete schedule β_0 .. β_{T-1} (diffusers indices), on t in [0, 1]:

    dx = -½ β(t) x dt + sqrt(β(t)) dw,   β(t) = T · β_{t(T-1)}   (β_s linearly interpolated between timesteps),

which for DDPM's linear schedule is score_sde's VPSDE with β_min = T β_0 and β_max = T β_{T-1} (0.1 and 20 for
T = 1000: its discrete β_i = linspace(β_min/N, β_max/N, N) are the DDPM's own). The network is asked at the timestep
input t(T-1) (a float: diffusers' UNet embeds any real timestep) and its ε read as the score ∇ log p_t(x) = -ε/σ,
with σ = sqrt(1 - ᾱ_i) of the discrete chain at i = floor(t(T-1)), as score_sde's `get_score_fn` does for models
trained on the discrete chain. Learned-range models give their first C output channels (the mean's ε); x_0- and
v-prediction models their ε = (x - sqrt(ᾱ_i) x̂_0)/σ_i and ε = sqrt(ᾱ_i) v + σ_i x.

The probability-flow ODE (Song et al. eq. 13) dx/dt = f̃(x, t) = -½ β(t) (x - ε/σ) carries p_t exactly, so for the
data point x(ε_t) = x (Song et al. App. D.2, eq. 39)

    log p_ε(x) = log p_1(x(1)) + ∫_ε^1 ∇·f̃(x(t), t) dt,   ∇·f̃ = -½ β(t) (D - ∇·ε / σ),

with p_1 = N(0, I). The divergence is the Skilling-Hutchinson estimate E_v[vᵀ (∂ε/∂x) v] with K probes v
(Rademacher, or Gaussian), fixed along the path so that the ODE is deterministic, or exact (the Jacobian's diagonal:
D vector-Jacobian products per evaluation, for small images). Each image is integrated alone, with its own adaptive
steps (scipy's RK45, as score_sde), in float64; the model runs in float32 on the K probes at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from diffusers.utils import BaseOutput

from .bound import progress_counter
from .schedules import check_choice, check_positive_int

Divergence = Literal["rademacher", "gaussian", "exact"]
DIVERGENCES = get_args(Divergence)
# Uniform dequantization of 8-bit data on [-1, 1] (score_sde_pytorch #51): y = 2 (k + u) / 256 - 1, u ~ U[0, 1)^D.
# The density of u' = (k + u)/256 on [0, 1) is p_y · 2^D, and P(k) = ∫ p_u'(·)/256^D over the cube ≥ exp E_u[log ...]
# (Jensen), so -log2 P(k) / D ≤ E_u[-log2 p_y(y)] / D - 1 + 8: the offset is 8 bits for the 256 levels, minus
# 1 for the factor 2 from [0, 1) to [-1, 1]. score_sde writes it as `7 - inverse_scaler(-1)`.
DEQUANTIZATION_OFFSET_BITS = 7.0


class ODELikelihoodError(RuntimeError):
    """The probability-flow ODE of one image could not be integrated to the requested tolerance."""


@dataclass(frozen=True)
class VPSDE:
    """The VP SDE of a discrete schedule (module docstring): β(t), the timestep input and σ, ᾱ at that input."""

    betas: np.ndarray  # β_0 .. β_{T-1}, float64

    @classmethod
    def of(cls, scheduler) -> VPSDE:
        return cls(np.asarray(scheduler.betas, dtype=np.float64))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def beta(self, t: float) -> float:
        """β(t) = T · β_{t(T-1)}, β interpolated linearly between timesteps (the VP SDE's β_min + t(β_max - β_min)
        for a linear schedule, Song et al. eq. 11 and App. B)."""
        T = self.num_train_timesteps
        return T * float(np.interp(t * (T - 1), np.arange(T), self.betas))

    def timestep_input(self, t: float) -> float:
        """The UNet's timestep for ODE time t: t(T-1), as score_sde's `labels = t * (sde.N - 1)`."""
        return t * (self.num_train_timesteps - 1)

    def discrete_alpha_bar(self, t: float) -> float:
        """ᾱ_i of the discrete chain at i = floor(t(T-1)), the noise level the network was trained at."""
        index = min(int(math.floor(self.timestep_input(t))), self.num_train_timesteps - 1)
        return float(np.prod(1.0 - self.betas[: index + 1]))


def epsilon_from_output(output: torch.Tensor, x: torch.Tensor, alpha_bar: float, config) -> torch.Tensor:
    """ε from a model's output for the scheduler config's `prediction_type` and `variance_type` (module docstring).
    A model output whose shape fits neither the sample's (B, C, H, W) nor (B, 2C, H, W) for learned_range is refused."""
    channels = x.shape[1]
    expected = 2 * channels if config.variance_type in ("learned", "learned_range") else channels
    if output.shape[0] != x.shape[0] or output.shape[1] != expected or output.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"the model's output has shape {tuple(output.shape)}; the probability-flow ODE needs "
            f"{(x.shape[0], expected, *x.shape[2:])} (variance_type={config.variance_type!r}, {channels} channels)"
        )
    output = output[:, :channels]
    sigma = math.sqrt(1.0 - alpha_bar)
    if config.prediction_type == "epsilon":
        return output
    if config.prediction_type == "sample":
        return (x - math.sqrt(alpha_bar) * output) / sigma  # x = sqrt(ᾱ) x_0 + σ ε (DDPM eq. 4)
    return math.sqrt(alpha_bar) * output + sigma * x  # v = sqrt(ᾱ) ε - σ x_0 (Salimans & Ho 2022)


@dataclass
class ODELikelihoodOutput(BaseOutput):
    """log p(x) of each image (N,) in nats, through the probability-flow ODE.

    log_likelihood: the mean over probes of log p_1(x(1)) + ∫ ∇·f̃. probe_log_likelihood: (N, K), one value per
    Hutchinson probe (K = 1 for the exact divergence). standard_error: over probes (NaN for K = 1; 0 for exact),
    for the continuous x given; of an 8-bit image the dequantization draw adds its own spread, unmeasured here
    (`log_likelihood(method="ode")` reports NaN for it, and these as details["probe_standard_error"]).
    prior_log_likelihood: log p_1(x(1)) (N,). num_function_evaluations: NFE of the solver per image (N,);
    each evaluation runs the model on K probes (exact: D) and one vector-Jacobian product for them.
    """

    log_likelihood: torch.Tensor
    probe_log_likelihood: torch.Tensor
    standard_error: torch.Tensor
    prior_log_likelihood: torch.Tensor
    num_function_evaluations: torch.Tensor


def _probes(kind: str, num_probes: int, shape, generator) -> torch.Tensor:
    draw_on = generator.device if generator is not None else "cpu"
    if kind == "gaussian":
        return torch.randn((num_probes, *shape), generator=generator, device=draw_on, dtype=torch.float64).cpu()
    signs = torch.randint(0, 2, (num_probes, *shape), generator=generator, device=draw_on).cpu()
    return signs.to(torch.float64) * 2 - 1  # Rademacher: ±1


class _Solve:
    """The probability-flow ODE of one image, state [x (D), log-density increments (one per probe)]."""

    def __init__(self, model_fn, sde: VPSDE, config, weights: torch.Tensor, exact: bool, where: str, max_evaluations,
                 bar=None):  # fmt: skip
        self.model_fn, self.sde, self.config, self.weights, self.exact = model_fn, sde, config, weights, exact
        self.where, self.max_evaluations, self.calls = where, max_evaluations, 0
        self.bar, self.said = bar, -math.inf  # the progress bar's line: where in t the image is, once a second

    def field(self, t: float, state: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.bar is not None and time.monotonic() - self.said >= 1.0:  # an image can take many seconds
            self.said = time.monotonic()
            self.bar.set_postfix_str(f"t={t:.3f} of 1, {self.calls} evaluations", refresh=True)
        if self.calls > self.max_evaluations:
            raise ODELikelihoodError(
                f"the probability-flow ODE of {self.where} needed more than max_evaluations={self.max_evaluations} "
                f"function evaluations and stopped at t={t:.6g}: loosen rtol/atol or raise max_evaluations"
            )
        weights, sde = self.weights, self.sde
        num_dims, shape = weights[0].numel(), weights.shape[1:]
        x_t = torch.from_numpy(state[:num_dims]).to(weights.device).reshape(1, *shape)
        alpha_bar, beta = sde.discrete_alpha_bar(t), sde.beta(t)
        sigma = math.sqrt(1.0 - alpha_bar)
        rows = x_t.to(torch.float32).expand(len(weights), *shape).clone().requires_grad_(True)
        with torch.enable_grad():
            label = torch.full((len(weights),), sde.timestep_input(t), dtype=torch.float32, device=weights.device)
            epsilon = epsilon_from_output(self.model_fn(rows, label), rows, alpha_bar, self.config)
            (grad,) = torch.autograd.grad((epsilon * weights).sum(), rows)
        div_eps = (grad.to(torch.float64) * weights.to(torch.float64)).flatten(1).sum(1)  # vᵀ (∂ε/∂x) v per probe
        if self.exact:
            div_eps = div_eps.sum(0, keepdim=True)  # Σ_i e_iᵀ J e_i = tr J
        drift = -0.5 * beta * (x_t[0] - epsilon[0].detach().to(torch.float64) / sigma)  # Song et al. eq. 13
        div_drift = -0.5 * beta * (num_dims - div_eps / sigma)
        out = torch.cat([drift.flatten(), div_drift]).cpu().numpy()
        if not np.all(np.isfinite(out)):
            raise ODELikelihoodError(
                f"the probability-flow ODE of {self.where} gave a non-finite value at t={t:.6g}: the model's output "
                "is not finite there"
            )
        return out

    def __call__(self, x: torch.Tensor, rtol: float, atol: float, eps: float):
        """(log p per probe (K,), log p_1(x(1)), NFE) for one image x (C, H, W), integrated from t = eps to 1."""
        from scipy.integrate import solve_ivp

        num_dims = x.numel()
        increments = np.zeros(1 if self.exact else len(self.weights))
        start = np.concatenate([x.detach().to(torch.float64).cpu().numpy().ravel(), increments])
        solution = solve_ivp(self.field, (eps, 1.0), start, method="RK45", rtol=rtol, atol=atol)
        end = solution.y[:, -1]
        if not solution.success or not np.all(np.isfinite(end)):
            raise ODELikelihoodError(
                f"the probability-flow ODE of {self.where} did not converge: {solution.message} "
                f"(stopped at t={solution.t[-1]:.6g} after {self.calls} evaluations)"
            )
        prior = -0.5 * (num_dims * math.log(2 * math.pi) + float(np.sum(end[:num_dims] ** 2)))  # log N(x(1); 0, I)
        return torch.from_numpy(prior + end[num_dims:]), prior, self.calls


def ode_log_likelihood(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    x: torch.Tensor,
    *,
    divergence: Divergence = "rademacher",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    max_evaluations: int = 10_000,
    generator: torch.Generator | None = None,
    progress_bar: Callable | None = None,
    image_offset: int = 0,
) -> ODELikelihoodOutput:
    """log p_ε(x) of continuous data x (N, C, H, W) on the [-1, 1] scale (dequantize 8-bit data first) under the
    probability-flow ODE of the DDPM that `model_fn(x, t)` and `scheduler` (its β, prediction and variance type)
    define; module docstring for the SDE, the time map and the estimator. rtol, atol, eps: score_sde's defaults.

    Raises ODELikelihoodError naming the image (its index + `image_offset`), t and the tolerance where the model
    gives a non-finite value, the solver fails, or it needs more than `max_evaluations` function evaluations.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_positive_int(num_probes, "num_probes (Hutchinson probes K)")
    check_positive_int(max_evaluations, "max_evaluations")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps (the ODE's start time) must lie in (0, 1), got {eps!r}")
    sde, shape = VPSDE.of(scheduler), tuple(x.shape[1:])
    num_dims = int(np.prod(shape))
    if divergence == "exact":  # the basis vectors e_i: Σ_i e_iᵀ J e_i is the trace
        weights = torch.eye(num_dims, dtype=torch.float32, device=x.device).reshape(num_dims, *shape)
    results = []
    with progress_counter(progress_bar, len(x)) as bar:
        for n in range(len(x)):
            if divergence != "exact":  # K probes per image, fixed along its path (the ODE stays deterministic)
                weights = _probes(divergence, num_probes, shape, generator).to(x.device, torch.float32)
            where = f"image {image_offset + n} (rtol={rtol}, atol={atol})"
            solve = _Solve(model_fn, sde, scheduler.config, weights, divergence == "exact", where, max_evaluations, bar)
            results.append(solve(x[n], rtol, atol, eps))
            bar.update(1)
    per_probe = torch.stack([r[0] for r in results])
    mean = per_probe.mean(dim=1)
    if divergence == "exact":
        stderr = torch.zeros_like(mean)
    elif num_probes > 1:
        stderr = per_probe.std(dim=1) / math.sqrt(num_probes)
    else:
        stderr = torch.full_like(mean, math.nan)
    return ODELikelihoodOutput(
        log_likelihood=mean,
        probe_log_likelihood=per_probe,
        standard_error=stderr,
        prior_log_likelihood=torch.tensor([r[1] for r in results], dtype=torch.float64),
        num_function_evaluations=torch.tensor([r[2] for r in results], dtype=torch.long),
    )


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of uint8 images (N, C, H, W): y = 2 (k + u) / 256 - 1, u ~ U[0, 1), float64 on
    [-1, 1) (score_sde: `(data * 255 + rand) / 256` then scaled). Add DEQUANTIZATION_OFFSET_BITS to -log2 p(y) / D."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 pixel values 0..255, got dtype {images.dtype}")
    draw_on = generator.device if generator is not None else "cpu"
    u = torch.rand(images.shape, generator=generator, device=draw_on, dtype=torch.float64).to(images.device)
    return 2.0 * (images.to(torch.float64) + u) / 256.0 - 1.0
