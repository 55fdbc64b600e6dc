"""Gaussian math of DDPM's variational bound (eq. 5), independent of the noise schedule and of any model.

Gaussian KL divergences (the L_{t-1} and L_T terms), the discretized Gaussian decoder of eq. 13 (the L_0 term),
and the conversion from nats to bits per dimension. Everything here works elementwise; callers sum over dimensions.
The decoder is evaluated in float64 and in log space: in float32 both CDF values round to 1 in the upper tail.
"""

from __future__ import annotations

import math

import torch

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
