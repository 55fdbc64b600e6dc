"""β schedules (hf_ddpm/schedules.py) against the closed forms of tests/closed_forms.py, and against diffusers.

The closed forms are plain Python loops over t (math.cos, math.exp, a running product): they share no code with
the numpy implementation. diffusers computes the same schedules in float32, so it agrees with them only to float32
precision; that loss is largest in 1 - ᾱ_t at small t and in ᾱ_t at large t, where we stay exact.
"""

import math
import re

import closed_forms as paper
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from hf_ddpm import schedules
from hf_ddpm.scheduler import HFDDPMScheduler

# name → (our function, closed form, diffusers' beta_schedule, endpoints)
SCHEDULES = {
    "linear": (schedules.linear_betas, paper.linear_betas, "linear", (1e-4, 0.02)),
    "scaled_linear": (schedules.scaled_linear_betas, paper.scaled_linear_betas, "scaled_linear", (8.5e-4, 0.012)),
    "cosine": (lambda T, *_: schedules.cosine_betas(T), lambda T, *_: paper.cosine_betas(T), "squaredcos_cap_v2", ()),
    "sigmoid": (schedules.sigmoid_betas, paper.sigmoid_betas, "sigmoid", (1e-4, 0.02)),
}


def _ends(name: str) -> dict:
    return dict(zip(("beta_start", "beta_end"), SCHEDULES[name][3]))


def _re(value) -> str:
    """The value as an error message shows it, escaped for `match=`."""
    return re.escape(repr(value) if isinstance(value, (str, float, bool)) or value is None else str(value))


def ours_and_closed(name: str, T: int):
    ours_fn, closed_fn, _, ends = SCHEDULES[name]
    return ours_fn(T, *ends), closed_fn(T, *ends)


def diffusers_betas(name: str, T: int) -> np.ndarray:
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[name][2], **_ends(name)).betas.double().numpy()


# ---------------------------------------------------------------- the schedules themselves


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("T", [2, 10, 1000, 4000])
def test_schedule_equals_closed_form_in_float64(name, T):
    ours, closed = ours_and_closed(name, T)
    assert ours.dtype == np.float64 and ours.shape == (T,)
    # equal to rounding: the cosine's 1 - f(t+1)/f(t) keeps the last-bit difference of np.cos and math.cos in the
    # ratio, i.e. an absolute error of one ulp of 1.0 (2.2e-16)
    np.testing.assert_allclose(ours, closed, rtol=2e-15, atol=2.3e-16)


def test_linear_endpoints_are_exact():
    betas = schedules.linear_betas(1000, 1e-4, 0.02)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    assert schedules.linear_betas(1, 1e-4, 0.02).tolist() == [1e-4]


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_cosine_is_capped_at_0_999_only_at_the_end(T):
    betas = schedules.cosine_betas(T)
    assert betas[-1] == 0.999  # f(T) = cos²(π/2) ≈ 0 would give β ≈ 1 (Improved DDPM section 3.2)
    assert np.all(betas[:-1] < 0.999)
    assert np.all(np.diff(betas) > 0)
    # ᾱ before the cap is the continuous ᾱ(t) = f(t)/f(0) itself
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    np.testing.assert_allclose(paper.alphas_cumprod(betas)[:-1], np.array(f[1:-1]) / f[0], rtol=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_matches_diffusers_float32_betas(name):
    ours, _ = ours_and_closed(name, 1000)
    theirs = diffusers_betas(name, 1000)
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=0)  # float32 rounding of the same formula
    assert not np.array_equal(theirs, ours)  # ... and not more than that: diffusers is float32


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alphas_cumprod_exact_where_diffusers_float32_is_not(name):
    T = 1000
    ours_betas, closed_betas = ours_and_closed(name, T)
    closed_ac = paper.alphas_cumprod(closed_betas)

    ours_ac = schedules.alphas_cumprod_from_betas(ours_betas)
    np.testing.assert_allclose(ours_ac, closed_ac, rtol=1e-14, atol=0)
    np.testing.assert_allclose(ours_ac, np.cumprod(1.0 - ours_betas), rtol=1e-15, atol=0)
    scheduler_ac = HFDDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[name][2], **_ends(name))
    assert scheduler_ac.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(scheduler_ac.alphas_cumprod.numpy(), closed_ac, rtol=1e-14, atol=0)

    theirs_ac = DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[name][2], **_ends(name)).alphas_cumprod
    theirs_ac = theirs_ac.double().numpy()
    # At t = T-1 (ᾱ small, 1000 float32 products) diffusers is off by ~1e-7 (linear) to ~1e-5 (cosine) relative.
    rel_last = abs(theirs_ac[-1] / closed_ac[-1] - 1.0)
    assert 1e-9 < rel_last < 1e-3
    assert abs(ours_ac[-1] / closed_ac[-1] - 1.0) < 1e-14
    # At small t, 1 - ᾱ_t (the noise variance of q(x_t | x_0)) cancels: float32 keeps ~3 digits of it.
    rel_noise = abs((1.0 - theirs_ac[0]) / (1.0 - closed_ac[0]) - 1.0)
    assert 1e-7 < rel_noise < 1e-2
    assert abs((1.0 - ours_ac[0]) / (1.0 - closed_ac[0]) - 1.0) < 1e-11


def test_linear_alphas_cumprod_noise_variance_at_t0_loses_precision_in_diffusers():
    # the one number, spelled out: 1 - ᾱ_0 = β_0 = 1e-4 exactly; diffusers' float32 gives 1.000166e-4
    theirs = DDPMScheduler().alphas_cumprod.double().numpy()
    ours = HFDDPMScheduler().alphas_cumprod.numpy()
    assert 1.0 - ours[0] == pytest.approx(1e-4, rel=1e-12)
    assert 1.0 - theirs[0] == pytest.approx(1.000166e-4, rel=1e-6)


# ---------------------------------------------------------------- the paper's linear endpoints for any T


@pytest.mark.parametrize(
    "T, expected",
    [(1000, (1e-4, 0.02)), (4000, (2.5e-5, 5e-3)), (500, (2e-4, 0.04)), (100, (1e-3, 0.2)), (2000, (5e-5, 0.01))],
)
def test_paper_linear_endpoints_scale_by_1000_over_T(T, expected):
    start, end = schedules.paper_linear_endpoints(T)
    assert start == pytest.approx(expected[0], rel=1e-15)
    assert end == pytest.approx(expected[1], rel=1e-15)


def test_paper_linear_endpoints_at_1000_are_the_paper_values_exactly():
    assert schedules.paper_linear_endpoints(1000) == (1e-4, 0.02)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "1000", True, None])
def test_paper_linear_endpoints_reject_bad_T(bad):
    with pytest.raises(ValueError, match=rf"num_train_timesteps.*{_re(bad)}"):
        schedules.paper_linear_endpoints(bad)


# ---------------------------------------------------------------- check_betas and num_train_timesteps


@pytest.mark.parametrize(
    "betas, t, shown",
    [
        ([0.1, 0.0, 0.2], 1, "0.0"),
        ([0.1, 0.2, -0.01], 2, "-0.01"),
        ([1.0, 0.2], 0, "1.0"),
        ([0.1, 0.5, 0.9, 1.5], 3, "1.5"),
        ([0.1, float("nan"), 0.3], 1, "nan"),
        ([0.1, float("inf")], 1, "inf"),
    ],
)
def test_check_betas_names_the_value_and_timestep(betas, t, shown):
    with pytest.raises(ValueError, match=rf"beta at timestep {t} is {re.escape(shown)}; .*open interval \(0, 1\)"):
        schedules.check_betas(betas)


@pytest.mark.parametrize("betas, shape", [([], r"\(0,\)"), ([[0.1, 0.2]], r"\(1, 2\)"), (0.1, r"\(\)")])
def test_check_betas_rejects_empty_or_not_1d(betas, shape):
    with pytest.raises(ValueError, match=rf"non-empty 1-D sequence, got shape {shape}"):
        schedules.check_betas(betas)


def test_check_betas_returns_float64():
    out = schedules.check_betas(np.array([0.1, 0.2], dtype=np.float32))
    assert out.dtype == np.float64


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_the_registry_names_each_schedule(name):
    """schedules.named_betas (as improved-diffusion's get_named_beta_schedule): a config's name → its β."""
    config_name, ends = SCHEDULES[name][2], SCHEDULES[name][3] or (1e-4, 0.02)
    ours, closed = ours_and_closed(name, 100)
    assert np.array_equal(schedules.named_betas(config_name, 100, *ends), ours)
    np.testing.assert_allclose(schedules.named_betas(config_name, 100, *ends), closed, rtol=1e-12)
    if name == "cosine":  # Improved DDPM's name for it, and no endpoints
        assert np.array_equal(schedules.named_betas("cosine", 100, 0.5, 0.6), ours)


def test_the_registry_refuses_an_unknown_name_with_the_choices():
    with pytest.raises(ValueError, match=r"beta_schedule='cosinus' is not supported; choose one of 'linear', "
                       r"'scaled_linear', 'squaredcos_cap_v2', 'sigmoid', 'cosine'$"):  # fmt: skip
        schedules.named_betas("cosinus", 10, 1e-4, 0.02)


def test_schedule_with_a_bad_endpoint_fails_at_that_timestep():
    with pytest.raises(ValueError, match=r"beta at timestep 0 is 0\.0;"):
        schedules.linear_betas(10, 0.0, 0.02)
    with pytest.raises(ValueError, match=r"beta at timestep 9 is 1\.0;"):
        schedules.linear_betas(10, 1e-4, 1.0)
    with pytest.raises(ValueError, match=r"beta at timestep 0 is 0\.0;"):
        HFDDPMScheduler(num_train_timesteps=10, trained_betas=[0.0] + [0.1] * 9)


@pytest.mark.parametrize("fn", [schedules.linear_betas, schedules.scaled_linear_betas, schedules.sigmoid_betas])
@pytest.mark.parametrize("bad", [0, -1, 10.0, "10", False])
def test_schedules_reject_bad_num_train_timesteps(fn, bad):
    with pytest.raises(ValueError, match=rf"num_train_timesteps must be (an integer )?>= 1, got {_re(bad)}"):
        fn(bad, 1e-4, 0.02)


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_cosine_rejects_bad_num_train_timesteps(bad):
    with pytest.raises(ValueError, match=rf"num_train_timesteps.*got {_re(bad)}"):
        schedules.cosine_betas(bad)


def test_numpy_integer_num_train_timesteps_is_accepted():
    np.testing.assert_array_equal(schedules.linear_betas(np.int64(5), 0.1, 0.5), schedules.linear_betas(5, 0.1, 0.5))


# ---------------------------------------------------------------- β ↔ ᾱ


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("T", [10, 1000])
def test_betas_from_alphas_cumprod_inverts_alphas_cumprod_from_betas(name, T):
    betas, _ = ours_and_closed(name, T)
    ac = schedules.alphas_cumprod_from_betas(betas)
    # β_t = 1 - ᾱ_t/ᾱ_{t-1} cancels: its absolute error is ~1e-16, i.e. ~1e-12 relative to β ~ 1e-4
    np.testing.assert_allclose(schedules.betas_from_alphas_cumprod(ac), betas, rtol=1e-10, atol=0)
    np.testing.assert_allclose(
        schedules.alphas_cumprod_from_betas(schedules.betas_from_alphas_cumprod(ac)), ac, rtol=1e-13, atol=0
    )


def test_betas_from_alphas_cumprod_of_a_subsequence_is_the_respaced_beta():
    # Improved DDPM section 4: β'_k = 1 - ᾱ_{S_k}/ᾱ_{S_{k-1}}, with ᾱ_{S_{-1}} = 1
    betas = paper.linear_betas(1000, 1e-4, 0.02)
    ac = paper.alphas_cumprod(betas)
    kept = [0, 250, 500, 999]
    expected = [1.0 - ac[0], 1.0 - ac[250] / ac[0], 1.0 - ac[500] / ac[250], 1.0 - ac[999] / ac[500]]
    np.testing.assert_allclose(schedules.betas_from_alphas_cumprod(ac[kept]), expected, rtol=1e-13)
    # composing the forward steps 1..250 multiplies the means: 1 - β'_1 = Π (1 - β_s), s = 1..250
    assert 1.0 - expected[1] == pytest.approx(math.prod(1.0 - b for b in betas[1:251]), rel=1e-13)


def test_betas_from_alphas_cumprod_rejects_non_decreasing_alphas_cumprod():
    with pytest.raises(ValueError, match=r"beta at timestep 2 is 0\.0;"):
        schedules.betas_from_alphas_cumprod([0.9, 0.8, 0.8])
    with pytest.raises(ValueError, match=r"beta at timestep 1 is"):
        schedules.betas_from_alphas_cumprod([0.9, 0.95])
