"""The pieces of DDPM's variational bound (eq. 5) that do not depend on the noise schedule.

Gaussian KL divergences (the L_{t-1} and L_T terms), the discretized Gaussian decoder of eq. 13 (the L_0 term),
and the conversion from nats to bits per dimension. Everything here works elementwise; callers sum over dimensions.
The decoder is evaluated in float64 and in log space: in float32 both CDF values round to 1 in the upper tail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .monte_carlo import collapsed_strata_stderr, stratified_draws

# Pixels are uint8 scaled to [-1, 1]; each of the 256 values owns a bin of width 2/255 (DDPM eq. 13).
BIN_HALF_WIDTH = 1.0 / 255.0


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_sub_exp(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(exp(log_a) - exp(log_b)) for log_a >= log_b, without forming exp(log_a)."""
    return log_a + torch.log(-torch.expm1(log_b - log_a))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) under N(mean, exp(log_scale)²) integrated over x's pixel bin (DDPM eq. 13), per element, in nats.

    x holds pixel values scaled to [-1, 1] (k / 127.5 - 1 for k in 0..255). The bin of x is
    [x - 1/255, x + 1/255], except the edge bins, which are open: (-inf, -1 + 1/255] and [1 - 1/255, inf).

    Computed in float64 with log-CDFs. Interior bins are reflected into the lower tail before subtracting
    (Φ(b) - Φ(a) = Φ(-a) - Φ(-b)), so a bin far above the mean keeps its tiny probability instead of 1 - 1 = 0.
    """
    x, mean, log_scale = (torch.as_tensor(v).to(torch.float64) for v in (x, mean, log_scale))
    x, mean, log_scale = torch.broadcast_tensors(x, mean, log_scale)
    inv_scale = torch.exp(-log_scale)
    lower = (x - BIN_HALF_WIDTH - mean) * inv_scale  # standardized bin edges a < b
    upper = (x + BIN_HALF_WIDTH - mean) * inv_scale
    reflect = lower + upper > 0  # bin centre above the mean: use the mirrored bin (-b, -a)
    a = torch.where(reflect, -upper, lower)
    b = torch.where(reflect, -lower, upper)
    log_cdf_a = torch.special.log_ndtr(a)
    log_cdf_b = torch.special.log_ndtr(b)
    interior = _log_sub_exp(log_cdf_b, torch.minimum(log_cdf_a, log_cdf_b))
    at_bottom = x < -1.0 + 1e-3  # open bin (-inf, -1 + 1/255]: log Φ(upper)
    at_top = x > 1.0 - 1e-3  # open bin [1 - 1/255, inf): log(1 - Φ(lower)) = log Φ(-lower)
    log_probs = torch.where(at_bottom, torch.special.log_ndtr(upper), interior)
    return torch.where(at_top, torch.special.log_ndtr(-lower), log_probs)


def nats_to_bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits per dimension = L / (D ln 2), D = C·H·W (how DDPM Table 1 reports the bound)."""
    return nats / (num_dims * math.log(2.0))


@dataclass
class BoundOutput(BaseOutput):
    """The variational bound per image, in bits/dim (N,), with its terms.

    bits_per_dim: L_T + Σ L_{t-1} + L_0 (exact), or its Monte Carlo estimate.
    prior_bpd: L_T. decoder_bpd: L_0.
    terms_bpd: exact: (N, T) with column t the term at timestep t (column 0 = L_0, column t ≥ 1 = L_{t-1});
        Monte Carlo: (N, K) the sampled L_{t-1} terms, at `timesteps`.
    timesteps: (T,) for the exact bound, (N, K) for the estimate (increasing along a row: one per stratum).
    standard_error: Monte Carlo only: the standard error of each image's estimate (N,), NaN for K = 1; zeros for
        the exact bound.
    weights: Monte Carlo: (N, K) the weight 1 / (K p(t)) of each sampled term, so that bits_per_dim = prior_bpd +
        decoder_bpd + Σ_k weights · terms_bpd (hf_ddpm.monte_carlo); exact: ones (N, T).
    """

    bits_per_dim: torch.Tensor
    prior_bpd: torch.Tensor
    decoder_bpd: torch.Tensor
    terms_bpd: torch.Tensor
    timesteps: torch.Tensor
    standard_error: torch.Tensor
    weights: torch.Tensor


@torch.no_grad()
def variational_bound(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    x_start: torch.Tensor,
    num_timesteps: int | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> BoundOutput:
    """DDPM's bound (eq. 5) on data x_start (N, C, H, W) in [-1, 1] under the model `model_fn(x_t, t) -> output`.

    num_timesteps=None: all T terms, each KL at one draw x_t ~ q(x_t | x_0) (as the DDPM evaluation does).
    num_timesteps=K: L_T + L_0 + Σ_k L_{t_k - 1} / (K p(t_k)), t_k stratified draws from p on {1 .. T-1}: an
    unbiased estimate of the same bound, with a standard error that can only overstate its spread (see
    hf_ddpm.monte_carlo for p and the strata). The model runs on `batch_size` (image, t) pairs at a time; the
    terms are computed in float64.
    """
    if num_timesteps is not None and (
        isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1
    ):
        raise ValueError(f"num_timesteps must be None (exact bound) or an integer >= 1, got {num_timesteps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    num_images, num_dims = x_start.shape[0], x_start[0].numel()
    num_train = scheduler.config.num_train_timesteps
    device = x_start.device
    x_start = x_start.to(torch.float64)

    if num_timesteps is None:
        timesteps = torch.arange(num_train).expand(num_images, num_train)
    else:  # column 0 is the decoder (t = 0), always computed exactly
        if num_train > 1:
            sampled, weights = stratified_draws(num_images, num_timesteps, num_train - 1, generator)
        else:  # T = 1: the bound is L_T + L_0, nothing to sample
            sampled = torch.zeros(num_images, 0, dtype=torch.long)
            weights = torch.zeros(num_images, 0, dtype=torch.float64)
        timesteps = torch.cat([torch.zeros(num_images, 1, dtype=torch.long), sampled], dim=1)
    terms = torch.zeros(timesteps.shape, dtype=torch.float64, device=device)

    image_index = torch.arange(num_images).repeat_interleave(timesteps.shape[1])
    flat_t = timesteps.reshape(-1)
    for start in range(0, len(flat_t), batch_size):
        n, t = image_index[start : start + batch_size], flat_t[start : start + batch_size]
        x0 = x_start[n.to(device)]
        noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=torch.float32).to(torch.float64)
        x_t = scheduler.add_noise(x0, noise, t)  # x_t ~ q(x_t | x_0), DDPM eq. 4
        output = model_fn(x_t.to(torch.float32), t.to(device)).to(torch.float64)
        term = scheduler.bound_terms(output, x0, x_t, t).flatten(1).sum(dim=1)
        terms.view(-1)[start : start + len(t)] = term

    prior = scheduler.prior_kl(x_start).flatten(1).sum(dim=1)  # L_T
    decoder, kl = terms[:, 0], terms[:, 1:]
    if num_timesteps is None:
        total = prior + terms.sum(dim=1)
        standard_error = torch.zeros_like(total)
        terms_out, timesteps_out, weights = terms, torch.arange(num_train), torch.ones_like(terms)
    else:
        weights = weights.to(device)
        weighted = kl * weights  # L(t_k) / (K p(t_k)): each stands for its stratum of the T-1 terms
        total = prior + decoder + weighted.sum(dim=1)
        standard_error = collapsed_strata_stderr(weighted) if num_train > 1 else torch.zeros_like(total)
        terms_out, timesteps_out = kl, timesteps[:, 1:]

    def bpd(nats):
        return nats_to_bits_per_dim(nats, num_dims)

    return BoundOutput(
        bits_per_dim=bpd(total),
        prior_bpd=bpd(prior),
        decoder_bpd=bpd(decoder),
        terms_bpd=bpd(terms_out),
        timesteps=timesteps_out,
        standard_error=bpd(standard_error),
        weights=weights,
    )
