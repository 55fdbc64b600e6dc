"""The pure Gaussian math of the bound (hf_ddpm/gaussians.py): the discretized decoder of DDPM eq. 13 against
erf and against mpmath deep in its tails, and the Gaussian KL against its closed form."""

import math

import numpy as np
import pytest
import torch
from closed_forms import bin_log_probability_mp, bin_probability_erf, gaussian_kl
from scheduler_inputs import F64, f64, seeded

from hf_ddpm.gaussians import discretized_gaussian_log_likelihood, normal_kl

PIXEL_GRID = torch.arange(256, dtype=F64) / 127.5 - 1.0


@pytest.mark.parametrize(
    "mean, scale", [(0.3, 0.05), (-1.0, 1e-3), (0.99, 0.5), (2.0, 3.0), (0.0, 1e-4), (-0.2, 0.007)]
)
def test_decoder_bins_sum_to_one_and_match_erf(mean, scale):
    log_p = discretized_gaussian_log_likelihood(PIXEL_GRID, f64(mean), f64(math.log(scale)))
    assert log_p.dtype == F64 and log_p.shape == (256,)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    erf_probs = np.array([bin_probability_erf(x, mean, scale) for x in PIXEL_GRID.tolist()])
    np.testing.assert_allclose(log_p.exp().numpy(), erf_probs, rtol=0, atol=1e-14)
    big = erf_probs > 1e-6  # where the plain erf difference still has its digits, the logs agree too
    np.testing.assert_allclose(log_p.numpy()[big], np.log(erf_probs[big]), rtol=1e-9)


@pytest.mark.parametrize("k", [255, 254, 200, 128])
def test_decoder_is_finite_and_exact_far_in_the_upper_tail(k):
    x, mean, scale = k / 127.5 - 1.0, -1.0, 1e-3  # x is 1000-2000 σ above the mean: log p down to -2e6
    ours = discretized_gaussian_log_likelihood(f64(x), f64(mean), f64(math.log(scale)))
    exact = bin_log_probability_mp(x, mean, scale)
    assert math.isfinite(ours.item()) and exact < -1e5
    assert ours.item() == pytest.approx(exact, rel=1e-10)

    # the textbook formula in float32 loses it all: both CDF values round to 1
    naive = naive_float32_log_probability(x, mean, scale)
    assert naive == -math.inf


def naive_float32_log_probability(x: float, mean: float, scale: float) -> float:
    """log(Φ(upper) - Φ(lower)) (log(1 - Φ(lower)) in the top bin) with torch.erf in float32."""
    lo, hi = (torch.tensor((v - mean) / scale, dtype=torch.float32) for v in (x - 1 / 255, x + 1 / 255))

    def cdf(z):
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

    return torch.log(1.0 - cdf(lo) if x > 0.999 else cdf(hi) - cdf(lo)).item()


def test_decoder_moderate_tail_where_float32_already_fails():
    # the bin spans 9.3σ .. 10.9σ above the mean: p ~ 1e-20, below float32's (and float64's) 1 - Φ resolution
    x, mean, scale = 128 / 127.5 - 1.0, -0.0465, 0.005
    ours = discretized_gaussian_log_likelihood(f64(x), f64(mean), f64(math.log(scale)))
    exact = bin_log_probability_mp(x, mean, scale)
    assert -80 < exact < -40
    assert ours.item() == pytest.approx(exact, rel=1e-10)
    assert naive_float32_log_probability(x, mean, scale) == -math.inf


def test_decoder_broadcasts_and_handles_the_lower_edge_bin():
    # x = -1 owns (-inf, -1 + 1/255]: with the mean far below, that bin holds almost everything
    log_p = discretized_gaussian_log_likelihood(f64([-1.0, 1.0]), f64([-5.0, 5.0]), f64(0.0))
    assert log_p.tolist() == pytest.approx(
        [bin_log_probability_mp(-1.0, -5.0, 1.0), bin_log_probability_mp(1.0, 5.0, 1.0)], rel=1e-12, abs=1e-15
    )


def test_normal_kl_closed_forms():
    # KL(N(m1, v1) || N(m2, v2)) = ½ (log v2/v1 + v1/v2 + (m1 - m2)²/v2 - 1)
    m1 = torch.tensor([0.0, 1.0, 0.0, -0.3, 2.0], dtype=F64)
    v1 = torch.tensor([1.0, 1.0, 4.0, 0.01, 3.0], dtype=F64)
    m2 = torch.tensor([0.0, 0.0, 0.0, 0.5, -1.0], dtype=F64)
    v2 = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.5], dtype=F64)
    got = normal_kl(m1, v1.log(), m2, v2.log())
    np.testing.assert_allclose(got.numpy(), gaussian_kl(m1.numpy(), v1.numpy(), m2.numpy(), v2.numpy()), rtol=1e-14)
    assert got[0].item() == 0.0
    assert got[1].item() == pytest.approx(0.5, rel=1e-15)  # a unit mean shift
    assert got[2].item() == pytest.approx(0.5 * (4.0 - 1.0 - math.log(4.0)), rel=1e-15)


def test_normal_kl_is_zero_for_equal_gaussians_and_positive_otherwise():
    m = torch.randn(100, generator=seeded(0), dtype=F64)
    log_v = torch.randn(100, generator=seeded(1), dtype=F64)
    assert torch.equal(normal_kl(m, log_v, m, log_v), torch.zeros(100, dtype=F64))
    assert (normal_kl(m, log_v, m + 0.1, log_v) > 0).all() and (normal_kl(m, log_v, m, log_v + 0.1) > 0).all()
