"""The K-term Monte Carlo estimate of the bound (hf_ddpm.bound): the proposal, the strata, unbiasedness and
the collapsed-strata standard error, checked on term profiles shaped like a trained model's (most of Σ L_{t-1} in
the first timesteps)."""

import math

import numpy as np
import pytest
import torch

from hf_ddpm.bound import collapsed_strata_stderr, proposal, stratified_draws

M = 999  # the KL terms t = 1 .. T-1 of a T = 1000 model


def skewed_terms(num_terms: int = M, power: float = 1.3) -> torch.Tensor:
    """L(t) ∝ t^-power: with power 1.3, t = 1 holds 29% of the sum and t = 1..10 65%, close to the bound of the
    digits model that `make demo` trains (24% and 61%)."""
    return torch.arange(1, num_terms + 1, dtype=torch.float64).pow(-power)


def estimates(terms: torch.Tensor, k: int, draws: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`draws` estimates of Σ terms from k stratified draws each, and their standard errors."""
    t, w = stratified_draws(draws, k, len(terms), torch.Generator().manual_seed(seed))
    weighted = terms[t - 1] * w
    return weighted.sum(dim=1), collapsed_strata_stderr(weighted)


def test_proposal_is_half_uniform_half_one_over_t():
    p = proposal(M)
    harmonic = sum(1.0 / t for t in range(1, M + 1))
    assert p.dtype == torch.float64 and p.shape == (M,)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert p[0].item() == pytest.approx(0.5 / M + 0.5 / harmonic, rel=1e-12)
    assert p[-1].item() == pytest.approx(0.5 / M + 0.5 / (M * harmonic), rel=1e-12)
    assert bool((p.diff() < 0).all())
    # defensive: no term is weighted more than twice as heavily as under uniform sampling
    assert (1 / (M * p)).max().item() < 2.0


@pytest.mark.parametrize("k", [1, 2, 7, 64, 999, 2500])
def test_one_draw_per_stratum_of_the_proposal(k):
    t, w = stratified_draws(300, k, M, torch.Generator().manual_seed(k))
    assert t.shape == w.shape == (300, k) and t.dtype == torch.long and w.dtype == torch.float64
    assert int(t.min()) >= 1 and int(t.max()) <= M
    torch.testing.assert_close(w, 1.0 / (k * proposal(M)[t - 1]), rtol=0, atol=0)
    # draw j lies where the proposal's CDF crosses [j/K, (j+1)/K): between the quantiles of its stratum's ends
    cdf = proposal(M).cumsum(0)
    edges = torch.arange(k + 1, dtype=torch.float64) / k
    lowest = torch.searchsorted(cdf, edges[:-1], right=True).clamp(max=M - 1) + 1
    highest = torch.searchsorted(cdf, edges[1:], right=False).clamp(max=M - 1) + 1
    assert bool(((t >= lowest) & (t <= highest)).all())
    assert bool((t.diff(dim=1) >= 0).all())


def test_draws_come_from_the_generator():
    a = stratified_draws(4, 16, M, torch.Generator().manual_seed(7))
    b = stratified_draws(4, 16, M, torch.Generator().manual_seed(7))
    c = stratified_draws(4, 16, M, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("k", [1, 3, 16])
def test_each_timestep_is_drawn_k_p_times_so_the_estimate_is_unbiased(k):
    """E[#draws of t] = K p(t) is what makes Σ_k L(t_k) / (K p(t_k)) unbiased, for any terms L."""
    num_terms, rows = 30, 40_000
    t, _ = stratified_draws(rows, k, num_terms, torch.Generator().manual_seed(0))
    counts = torch.bincount(t.flatten() - 1, minlength=num_terms).double() / rows
    expected = k * proposal(num_terms)
    # each count is a sum of `rows` independent per-row counts bounded by k: 5 standard errors at most
    assert bool(((counts - expected).abs() <= 5 * (expected * k / rows).sqrt() + 1e-12).all()), (counts, expected)
    terms = torch.rand(num_terms, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 4
    values, _ = estimates(terms, k, rows, seed=2)
    assert abs(values.mean().item() - terms.sum().item()) < 4 * values.std().item() / math.sqrt(rows)


def test_collapsed_strata_standard_error_closed_forms():
    y = torch.tensor([[1.0, 3.0, 2.0, 6.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(collapsed_strata_stderr(y), torch.tensor([math.sqrt(4 + 16), 0.0], dtype=torch.float64))
    # K odd: the last three strata form one group: n s² = 3 · var(2, 6, 4) = 12, plus (1 - 3)² = 4
    odd = torch.tensor([[1.0, 3.0, 2.0, 6.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(collapsed_strata_stderr(odd), torch.tensor([4.0], dtype=torch.float64))
    three = torch.tensor([[2.0, 6.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(collapsed_strata_stderr(three), torch.tensor([math.sqrt(12.0)], dtype=torch.float64))
    assert bool(collapsed_strata_stderr(torch.ones(3, 1, dtype=torch.float64)).isnan().all())  # K = 1: unknown


@pytest.mark.parametrize("k", [16, 64])
def test_skewed_terms_are_estimated_closely_and_the_2se_interval_covers_them(k):
    """On a trained model's shape of terms, uniformly drawn timesteps are usually far off and their spread
    understates it; this estimate is within a few percent and its 2-SE interval covers the sum ≥ 90% of the time."""
    terms = skewed_terms()
    total = terms.sum().item()
    values, stderrs = estimates(terms, k, 4000)
    relative_rmse = ((values / total - 1) ** 2).mean().sqrt().item()
    uniform_rmse = math.sqrt(M**2 * terms.var(unbiased=False).item() / k) / total  # i.i.d. uniform t, closed form
    assert relative_rmse < 0.08 and relative_rmse < uniform_rmse / 10, (relative_rmse, uniform_rmse)
    coverage = ((values - total).abs() <= 2 * stderrs).double().mean().item()
    assert coverage >= 0.9, coverage
    # conservative, within an order of magnitude: the mean reported variance against the estimator's variance (it
    # overstates most at small K, where a pair of strata spans the steepest terms: ~7.5x at K = 16, ~2x at K = 64)
    ratio = stderrs.pow(2).mean().item() / values.var().item()
    assert 0.9 < ratio < (10.0 if k < 64 else 3.0), ratio


def test_terms_spread_evenly_are_not_worse_than_uniform_by_more_than_the_defence():
    """Flat terms (the worst case for a 1/t proposal): the error stays within √2 of uniform sampling's."""
    terms = 1.0 + 0.1 * torch.rand(M, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values, _ = estimates(terms, 64, 4000)
    uniform_sd = math.sqrt(M**2 * terms.var(unbiased=False).item() / 64)
    assert values.std().item() < math.sqrt(2) * uniform_sd
    np.testing.assert_allclose(values.mean().item(), terms.sum().item(), rtol=1e-3)
