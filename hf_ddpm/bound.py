"""DDPM's variational bound (eq. 5) over a batch of images: exact, or a K-term Monte Carlo estimate.

`variational_bound` computes L_T + Σ_t L_{t-1} + L_0 with one loop over (image, t) pairs; the exact bound takes
every t, the estimate K stratified draws. `rate_distortion` reads the exact bound's terms as progressive coding.

The KL terms of DDPM's bound (eq. 5) are far from equal: for a trained model the first ten of a thousand hold more
than half of Σ_t L_{t-1}, L_0 excluded. K timesteps drawn uniformly miss them most of the time, so a single image's
estimate is usually far too low and, now and then, far too high, and the spread of the K drawn terms understates
the error (at K = 64 a 2-standard-error interval covered the exact value about half of the time).

The estimate here samples the KL terms t = 1 .. T-1 from a defensive importance proposal

    p(t) = ½ · 1/(T-1) + ½ · (1/t) / H_{T-1}           (H_n = 1 + 1/2 + ... + 1/n)

(half uniform, so that no term is weighted more than twice as heavily as under uniform sampling; half ∝ 1/t,
the decay of the terms near t = 1) and stratifies the draws: u_k = (k + U_k)/K, U_k ~ U[0, 1), k = 0 .. K-1,
t_k = F⁻¹(u_k). Each t is then drawn K·p(t) times in expectation, so Σ_k L(t_k) / (K p(t_k)) is unbiased. Its
variance is estimated by collapsing the strata in adjacent pairs (a trailing three together when K is odd):
Σ_g n_g s²_g over groups g, which can only overstate it (Cochran, Sampling Techniques, 3rd ed., §5A.12). It is
the variance of the sampled KL terms alone: L_T is exact, and L_0 is taken at one draw of x_1 (as in the exact
bound), whose spread it does not include.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .gaussians import nats_to_bits_per_dim
from .schedules import check_positive_int


def progress_counter(progress_bar: Callable | None, total: int):
    """A bar counting `total` units of work with `update(n)`: `progress_bar(total=...)` as diffusers' pipelines make
    it (`DiffusionPipeline.progress_bar`, which `set_progress_bar_config(disable=True)` silences), or a silent tqdm.

    Use it as a context manager: the bar (a tqdm) closes when the block ends.
    """
    return progress_bar(total=total) if progress_bar is not None else tqdm(total=total, disable=True)


def proposal(num_terms: int) -> torch.Tensor:
    """p(t) for t = 1 .. num_terms (float64, sums to 1): ½ uniform + ½ ∝ 1/t."""
    t = torch.arange(1, num_terms + 1, dtype=torch.float64)
    harmonic = 1.0 / t
    return 0.5 / num_terms + 0.5 * harmonic / harmonic.sum()


def stratified_draws(
    num_images: int, num_samples: int, num_terms: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, weight), each (num_images, num_samples) on the CPU: timesteps in 1 .. num_terms, one per stratum of the
    proposal's CDF, increasing along a row, and the weight 1 / (K p(t)) that makes Σ_k weight·L(t_k) unbiased."""
    p = proposal(num_terms)
    cdf = p.cumsum(0)
    draw_on = generator.device if generator is not None else "cpu"
    jitter = torch.rand((num_images, num_samples), generator=generator, device=draw_on, dtype=torch.float64).cpu()
    u = (torch.arange(num_samples, dtype=torch.float64) + jitter) / num_samples  # u_k in stratum [k/K, (k+1)/K)
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=num_terms - 1)  # F⁻¹(u): P(index = i) = p[i]
    return index + 1, 1.0 / (num_samples * p[index])


def collapsed_strata_stderr(weighted_terms: torch.Tensor) -> torch.Tensor:
    """Standard error of Σ_k y_k for one draw y_k per stratum, rows (N, K) in stratum order: strata collapsed in
    adjacent pairs (a trailing three together when K is odd), variance Σ_g n_g s²_g. NaN when K = 1."""
    num_samples = weighted_terms.shape[1]
    if num_samples < 2:
        return torch.full(
            weighted_terms.shape[:1], float("nan"), dtype=weighted_terms.dtype, device=weighted_terms.device
        )
    paired = num_samples - 3 if num_samples % 2 else num_samples
    pairs = weighted_terms[:, :paired].reshape(len(weighted_terms), -1, 2)
    variance = (pairs[..., 0] - pairs[..., 1]).pow(2).sum(dim=1)  # n s² = (y_a - y_b)² for a pair
    if paired < num_samples:
        variance = variance + 3 * weighted_terms[:, paired:].var(dim=1)
    return variance.sqrt()


@dataclass
class BoundOutput(BaseOutput):
    """The variational bound per image, in bits/dim (N,), with its terms.

    bits_per_dim: L_T + Σ L_{t-1} + L_0 (exact), or its Monte Carlo estimate.
    prior_bpd: L_T. decoder_bpd: L_0.
    terms_bpd: exact: (N, T) with column t the term at timestep t (column 0 = L_0, column t ≥ 1 = L_{t-1});
        Monte Carlo: (N, K) the sampled L_{t-1} terms, at `timesteps`.
    timesteps: (T,) for the exact bound, (N, K) for the estimate (increasing along a row: one per stratum).
    standard_error: Monte Carlo: the standard error of each image's estimate over the drawn timesteps (N,), NaN for
        K = 1. Exact bound: NaN, not 0, because it is not free of sampling error: each of its T KL terms is taken at one
        draw x_t ~ q(x_t | x_0), and one draw per term gives no estimate of that error (repeat with other generator
        seeds to measure it).
    distortion: exact bound with `distortion=True`: (N, T), column t the RMSE of x̂_0 predicted from that term's x_t
        (clipped as the scheduler's config says, as DDPM's evaluation code does) against x_0, on the [0, 255] scale:
        the distortion of progressive coding (DDPM section 4.3, Fig. 5); else None.
    weights: Monte Carlo: (N, K) the weight 1 / (K p(t)) of each sampled term, so that bits_per_dim = prior_bpd +
        decoder_bpd + Σ_k weights · terms_bpd (see stratified_draws); exact: ones (N, T).
    """

    bits_per_dim: torch.Tensor
    prior_bpd: torch.Tensor
    decoder_bpd: torch.Tensor
    terms_bpd: torch.Tensor
    timesteps: torch.Tensor
    standard_error: torch.Tensor
    weights: torch.Tensor
    distortion: torch.Tensor | None = None


@torch.no_grad()
def variational_bound(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    x_start: torch.Tensor,
    num_timesteps: int | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    distortion: bool = False,
    progress_bar: Callable | None = None,
) -> BoundOutput:
    """DDPM's bound (eq. 5) on data x_start (N, C, H, W) in [-1, 1] under the model `model_fn(x_t, t) -> output`.

    num_timesteps=None: all T terms, each KL at one draw x_t ~ q(x_t | x_0) (as the DDPM evaluation does).
    num_timesteps=K: L_T + L_0 + Σ_k L_{t_k - 1} / (K p(t_k)), t_k stratified draws from p on {1 .. T-1}: an
    unbiased estimate of the same bound, with a standard error that can only overstate the spread of its sampled
    KL terms (L_0's one draw of x_1 is not in it; see the module docstring for p and the strata). The model runs on
    `batch_size` (image, t) pairs at a time; the terms are computed in float64. distortion=True (exact bound only) also returns each term's x̂_0 error (see
    BoundOutput.distortion), from the same model evaluations. progress_bar: see `progress_counter`.
    """
    if num_timesteps is not None and (
        isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1
    ):
        raise ValueError(f"num_timesteps must be None (exact bound) or an integer >= 1, got {num_timesteps!r}")
    check_positive_int(batch_size, "batch_size")
    if distortion and num_timesteps is not None:
        raise ValueError(f"distortion=True needs the exact bound (num_timesteps=None), got {num_timesteps}")
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
    errors = torch.zeros(timesteps.shape, dtype=torch.float64, device=device) if distortion else None

    image_index = torch.arange(num_images).repeat_interleave(timesteps.shape[1])
    flat_t = timesteps.reshape(-1)
    with progress_counter(progress_bar, len(flat_t)) as bar:
        for start in range(0, len(flat_t), batch_size):
            n, t = image_index[start : start + batch_size], flat_t[start : start + batch_size]
            x0 = x_start[n.to(device)]
            noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=torch.float32).to(torch.float64)
            x_t = scheduler.add_noise(x0, noise, t)  # x_t ~ q(x_t | x_0), DDPM eq. 4
            output = model_fn(x_t.to(torch.float32), t.to(device)).to(torch.float64)
            term = scheduler.bound_terms(output, x0, x_t, t).flatten(1).sum(dim=1)
            terms.view(-1)[start : start + len(t)] = term
            if errors is not None:  # RMSE of x̂_0 on [0, 255]: 127.5 per unit of the [-1, 1] scale
                x0_hat = scheduler.p_mean_variance(output, x_t, t)[2]
                errors.view(-1)[start : start + len(t)] = 127.5 * (x0_hat - x0).pow(2).flatten(1).mean(1).sqrt()
            bar.update(len(t))

    prior = scheduler.prior_kl(x_start).flatten(1).sum(dim=1)  # L_T
    decoder, kl = terms[:, 0], terms[:, 1:]
    if num_timesteps is None:
        total = prior + terms.sum(dim=1)
        standard_error = torch.full_like(total, float("nan"))  # one draw of x_t per term: see BoundOutput
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
        distortion=errors,
    )


def rate_distortion(terms_bpd: torch.Tensor, prior_bpd: torch.Tensor, distortion: torch.Tensor):
    """Progressive coding (DDPM section 4.3, Algorithm 3, Fig. 5) from the exact bound's terms: the receiver holding
    x_t has been sent x_T (cost L_T) and then x_{T-1}, ..., x_t (costs L_{T-1}, ..., L_t), and reads x̂_0 from it.

    terms_bpd: (N, T), column i the exact bound's term at timestep i (column 0 the decoder); prior_bpd: (N,);
    distortion: (N, T), column i the RMSE of x̂_0 predicted from x_i, on the [0, 255] scale. Returns (rate, distortion),
    each (N, T + 1) in the order the receiver gets them: column j after j reverse steps (x_{T-1-j} held), rate in
    cumulative bits/dim; the last column is the whole bound with the data itself received (distortion 0).
    """
    kl_from_top = terms_bpd[:, 1:].flip(1)  # the costs of x_{T-2}, ..., x_0 in the order they are sent
    rate = prior_bpd[:, None] + torch.cat([torch.zeros_like(prior_bpd)[:, None], kl_from_top.cumsum(1)], dim=1)
    rate = torch.cat([rate, (rate[:, -1] + terms_bpd[:, 0])[:, None]], dim=1)
    distortion = torch.cat([distortion.flip(1), torch.zeros_like(distortion[:, :1])], dim=1)
    return rate, distortion
