"""The bound as DDPM writes it (eq. 3), estimated from whole trajectories, and the importance-weighted bound.

DDPM's eq. 3 bounds the negative log-likelihood by the expectation over trajectories x_{1:T} ~ q(x_{1:T} | x_0) of

    -log w,   log w = log p(x_T) + Σ_{t>1} log p_θ(x_{t-1} | x_t) + log p_θ(x_0 | x_1) - Σ_{t>=1} log q(x_t | x_{t-1}),

with the discretized decoder of eq. 13 for p_θ(x_0 | x_1). Eq. 5 rewrites the same expectation as a sum of KL terms,
each taken in closed form, to reduce the variance of its estimate (hf_ddpm.bound); here it is estimated as written,
one log-weight per sampled trajectory, so that the variance the rewrite removes can be measured. The same weights give
the importance-weighted bound of Burda et al. 2016 (IWAE, eq. 8): -log (1/K) Σ_k w_k, which is no looser than eq. 3
in expectation and tightens as K grows.

Indices are diffusers': latent z_i (i = 0 .. T-1) is the paper's x_{i+1}, and the data x_0 comes before z_0. Every
log-density is summed over the D = C·H·W dimensions in float64; the model sees float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .bound import progress_counter
from .gaussians import discretized_gaussian_log_likelihood, nats_to_bits_per_dim
from .schedules import check_positive_int

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_var) I) summed over all but the first dimension, in nats (float64)."""
    log_p = -0.5 * (LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))
    return log_p.flatten(1).sum(dim=1)


@torch.no_grad()
def trajectory_log_weights(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    x_start: torch.Tensor,
    num_trajectories: int,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress_bar: Callable | None = None,
) -> torch.Tensor:
    """log w = log p_θ(x_{0:T}) - log q(x_{1:T} | x_0) (DDPM eq. 3) of `num_trajectories` trajectories per image:
    (N, M) float64, in nats. x_start: (N, C, H, W) data in [-1, 1]. Each trajectory costs T model evaluations,
    as many as the exact bound of eq. 5; `batch_size` trajectories advance together."""
    check_positive_int(num_trajectories, "num_trajectories")
    check_positive_int(batch_size, "batch_size")
    num_images, num_train = x_start.shape[0], scheduler.config.num_train_timesteps
    device = x_start.device
    x_start = x_start.to(torch.float64)
    betas = scheduler.betas.to(device, torch.float64)
    rows = torch.arange(num_images, device=device).repeat_interleave(num_trajectories)  # (image, trajectory) pairs
    log_w = torch.zeros(len(rows), dtype=torch.float64, device=device)
    with progress_counter(progress_bar, len(rows) * num_train) as bar:
        for start in range(0, len(rows), batch_size):
            x0 = x_start[rows[start : start + batch_size]]
            z_prev, total = x0, torch.zeros(len(x0), dtype=torch.float64, device=device)
            for i in range(num_train):
                t = torch.full((len(x0),), i, dtype=torch.long, device=device)
                noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=torch.float32).double()
                mean_q, log_var_q = torch.sqrt(1.0 - betas[i]) * z_prev, torch.log(betas[i]).expand_as(x0)
                z = (
                    mean_q + torch.sqrt(betas[i]) * noise
                )  # z_i ~ q(x_t | x_{t-1}) = N(sqrt(1-β_t) x_{t-1}, β_t) (eq. 2)
                total -= gaussian_log_density(z, mean_q, log_var_q)
                output = model_fn(z.to(torch.float32), t).to(torch.float64)
                mean, log_var, _ = scheduler.p_mean_variance(output, z, t)  # p_θ(x_{t-1} | x_t) (eq. 1, 11)
                if i == 0:  # log p_θ(x_0 | x_1), the discretized decoder (eq. 13)
                    total += discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).sum(dim=1)
                else:
                    total += gaussian_log_density(z_prev, mean, log_var)
                z_prev = z
                bar.update(len(x0))
            zero = torch.zeros_like(z_prev)
            total += gaussian_log_density(z_prev, zero, zero)  # log p(x_T), p(x_T) = N(0, I)
            log_w[start : start + len(x0)] = total
    return log_w.reshape(num_images, num_trajectories)


def trajectory_bound(log_weights: torch.Tensor, num_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 estimated from M trajectories per image: (bits/dim, its standard error over trajectories), each (N,).
    The standard error is NaN for M = 1."""
    nats = -log_weights.mean(dim=1)
    spread = log_weights.std(dim=1) / math.sqrt(log_weights.shape[1]) if log_weights.shape[1] > 1 else nats * math.nan
    return nats_to_bits_per_dim(nats, num_dims), nats_to_bits_per_dim(spread, num_dims)


def importance_weighted_bound(
    log_weights: torch.Tensor, num_samples: int, num_dims: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The IWAE bound (Burda et al. 2016, eq. 8) with K = `num_samples`: -log (1/K) Σ_k w_k in bits/dim, per image.

    The M trajectories of each image are cut into M // K disjoint groups of K (M must be a multiple of K); each group
    gives one bound, computed with logsumexp in float64; returns their mean and its standard error over groups
    (NaN for one group), each (N,). K = 1 is the eq. 3 estimate itself.
    """
    check_positive_int(num_samples, "num_samples (the importance-weighted bound's K)")
    num_trajectories = log_weights.shape[1]
    if num_trajectories % num_samples:
        raise ValueError(
            f"num_samples K = {num_samples} must divide the number of trajectories per image ({num_trajectories})"
        )
    groups = log_weights.to(torch.float64).reshape(len(log_weights), -1, num_samples)
    nats = -(torch.logsumexp(groups, dim=2) - math.log(num_samples))  # (N, M // K): one bound per group
    mean = nats.mean(dim=1)
    spread = nats.std(dim=1) / math.sqrt(nats.shape[1]) if nats.shape[1] > 1 else mean * math.nan
    return nats_to_bits_per_dim(mean, num_dims), nats_to_bits_per_dim(spread, num_dims)
