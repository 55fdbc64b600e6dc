"""HFDDPMScheduler (hf_ddpm/scheduler.py) against the papers' closed forms (tests/closed_forms.py): the forward
process, the posterior, the reverse step's pieces and the terms of the bound; and its errors on bad input.
Its agreement with diffusers' DDPMScheduler is in test_scheduler_diffusers.py."""

import math
import typing

import numpy as np
import pytest
import torch
from closed_forms import (
    LINEAR_AC,
    LINEAR_BETAS,
    alphas_cumprod,
    bin_probability_erf,
    gaussian_kl,
    linear_betas,
    posterior,
)
from diffusers import DDPMScheduler
from scheduler_inputs import F64, SHAPE, model_output, pixels, seeded
from torch.testing import assert_close

from hf_ddpm import HFDDPMScheduler

# ---------------------------------------------------------------- posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6, 7)


def test_q_posterior_mean_and_log_variance_match_closed_forms():
    ours = HFDDPMScheduler()
    ts = torch.tensor([0, 1, 500, 999])
    x0, x_t = pixels(0)[:1].expand(4, -1, -1, -1), torch.randn((4, *SHAPE[1:]), generator=seeded(1), dtype=F64)
    mean, log_var = ours.q_posterior(x0, x_t, ts)
    for b, t in enumerate(ts.tolist()):
        c0, ct, var = posterior(LINEAR_AC[t], LINEAR_AC[t - 1] if t else 1.0, LINEAR_BETAS[t])
        # within 1e-10 of the closed forms (see test_posterior_tables_match_closed_forms)
        assert_close(mean[b], c0 * x0[b] + ct * x_t[b], rtol=1e-10, atol=1e-12)
        clipped = var if t else posterior(LINEAR_AC[1], LINEAR_AC[0], LINEAR_BETAS[1])[2]
        assert_close(log_var[b].expand_as(x0[b]), torch.full_like(x0[b], math.log(clipped)), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- forward process, v, and x_0 from v


def test_add_noise_and_velocity_match_closed_forms_in_float64():
    ours = HFDDPMScheduler()
    ts = torch.tensor([0, 1, 500, 999])
    x0 = pixels(2)[:1].expand(4, -1, -1, -1).contiguous()
    eps = torch.randn(x0.shape, generator=seeded(3), dtype=F64)
    sa = torch.tensor(np.sqrt(LINEAR_AC[ts.numpy()])).view(-1, 1, 1, 1)
    sb = torch.tensor(np.sqrt(1.0 - LINEAR_AC[ts.numpy()])).view(-1, 1, 1, 1)
    assert_close(ours.add_noise(x0, eps, ts), sa * x0 + sb * eps, rtol=1e-13, atol=1e-15)  # DDPM eq. 4
    assert_close(ours.get_velocity(x0, eps, ts), sa * eps - sb * x0, rtol=1e-13, atol=1e-15)


def test_add_noise_and_velocity_match_diffusers_in_float32():
    ours, theirs = HFDDPMScheduler(), DDPMScheduler()
    ts = torch.tensor([0, 1, 500, 999])
    x0 = pixels(4, torch.float32)[:1].expand(4, -1, -1, -1).contiguous()
    eps = torch.randn(x0.shape, generator=seeded(5))
    ours_xt, theirs_xt = ours.add_noise(x0, eps, ts), theirs.add_noise(x0, eps, ts)
    assert ours_xt.dtype == torch.float32
    # diffusers' float32 ᾱ: sqrt(1 - ᾱ_0) is ~1e-4 relative off, values are O(3): ~2e-6 apart at most
    assert_close(ours_xt, theirs_xt, rtol=0, atol=1e-5)
    assert_close(ours.get_velocity(x0, eps, ts), theirs.get_velocity(x0, eps, ts), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_x0_recovered_from_v_prediction(dtype, tol, t):
    # x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε and v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0 give x_0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v
    ours = HFDDPMScheduler(prediction_type="v_prediction", clip_sample=False)
    x0 = pixels(6, dtype) * 1.5  # outside [-1, 1] too: nothing is clipped
    eps = torch.randn(SHAPE, generator=seeded(7), dtype=dtype)
    ts = torch.full((SHAPE[0],), t)
    x_t, v = ours.add_noise(x0, eps, ts), ours.get_velocity(x0, eps, ts)
    out = ours.step(v, t, x_t, generator=seeded(0))
    assert_close(out.pred_original_sample, x0, rtol=0, atol=tol)


# ---------------------------------------------------------------- step(): its outputs and thresholding


def test_step_return_dict_false_gives_the_same_tuple():
    ours = HFDDPMScheduler()
    x_t, out = torch.randn(SHAPE, generator=seeded(0)), model_output("fixed_small", 1)
    prev, x0 = ours.step(out, 500, x_t, generator=seeded(2), return_dict=False)
    res = ours.step(out, 500, x_t, generator=seeded(2))
    assert torch.equal(prev, res.prev_sample) and torch.equal(x0, res.pred_original_sample)


def test_thresholding_is_float64_exact_in_float64():
    # Imagen's dynamic thresholding: s = quantile(|x̂_0|, p) clamped to [1, max]; x̂_0 → clip(x̂_0, -s, s) / s
    ours = HFDDPMScheduler(
        prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2
    )
    x0_hat = torch.randn(SHAPE, generator=seeded(0), dtype=F64)
    got = ours.step(x0_hat, 500, torch.zeros(SHAPE, dtype=F64), generator=seeded(1)).pred_original_sample
    flat = x0_hat.numpy().reshape(SHAPE[0], -1)
    s = np.clip(np.quantile(np.abs(flat), 0.9, axis=1), 1.0, 2.0)[:, None]
    assert np.all((s > 1.0) & (s < 2.0))  # the quantile, not a bound, decides here
    np.testing.assert_allclose(got.numpy().reshape(SHAPE[0], -1), np.clip(flat, -s, s) / s, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- bad input: the value and the allowed ones


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta_schedule="cosinus"), r"beta_schedule='cosinus' is not supported; choose one of 'linear'.*'cosine'"),
        (dict(variance_type="learned"), r"variance_type='learned' .* not supported; use 'learned_range'"),
        (dict(variance_type="fixed"), r"variance_type='fixed' is not supported; choose one of 'fixed_small'.*'learned_range'"),
        (dict(prediction_type="x0"), r"prediction_type='x0' is not supported; choose one of 'epsilon', 'sample', 'v_prediction'"),
        (dict(timestep_spacing="uniform"), r"timestep_spacing='uniform' is not supported; choose one of 'linspace', 'leading', 'trailing'"),
        (dict(num_train_timesteps=10, trained_betas=[0.1] * 5), r"trained_betas has 5 values but num_train_timesteps=10"),
        (dict(trained_betas=[0.1, 1.2]), r"beta at timestep 1 is 1\.2;"),
        (dict(rescale_betas_zero_snr=True), r"rescale_betas_zero_snr=True is not supported"),
        (dict(num_train_timesteps=0), r"num_train_timesteps must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HFDDPMScheduler(**kwargs)


def test_the_allowed_values_are_the_literal_hints_of_the_config():
    """Each option's values are written once, as the Literal hint of its config key: every value of the hint builds
    a scheduler, and the error for a wrong one lists exactly those values."""
    hints = typing.get_type_hints(HFDDPMScheduler.__init__)
    for key in ("variance_type", "prediction_type", "timestep_spacing", "beta_schedule"):
        allowed = typing.get_args(hints[key])
        allowed = tuple(v for arg in allowed for v in (typing.get_args(arg) or (arg,)))  # BetaSchedule | "cosine"
        for value in allowed:
            HFDDPMScheduler(num_train_timesteps=10, **{key: value})
        with pytest.raises(ValueError) as refused:
            HFDDPMScheduler(num_train_timesteps=10, **{key: "nonsense"})
        assert str(refused.value).endswith("choose one of " + ", ".join(map(repr, allowed))), str(refused.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_inference_steps=0), r"num_inference_steps=0 is out of range: it must lie in \[1, 1000\]"),
        (dict(num_inference_steps=-1), r"num_inference_steps=-1 is out of range: it must lie in \[1, 1000\]"),
        (dict(num_inference_steps=1001), r"num_inference_steps=1001 is out of range: it must lie in \[1, 1000\]"),
        (dict(num_inference_steps=2.5), r"num_inference_steps must be an integer in \[1, 1000\], got 2\.5"),
        (dict(num_inference_steps="50"), r"num_inference_steps must be an integer in \[1, 1000\], got '50'"),
        (dict(num_inference_steps=True), r"num_inference_steps must be an integer in \[1, 1000\], got True"),
        (dict(timesteps=[10, 20, 5]), r"strictly decreasing, got \[10, 20, 5\]"),
        (dict(timesteps=[10, 10, 5]), r"strictly decreasing, got \[10, 10, 5\]"),
        (dict(timesteps=[]), r"non-empty and strictly decreasing, got \[\]"),
        (dict(timesteps=[1000, 5]), r"timesteps must lie in \[0, 999\], got \[1000, 5\]"),
        (dict(timesteps=[5, -1]), r"timesteps must lie in \[0, 999\], got \[5, -1\]"),
        (dict(), r"pass exactly one of num_inference_steps and timesteps"),
        (dict(num_inference_steps=10, timesteps=[5, 0]), r"pass exactly one of num_inference_steps and timesteps"),
    ],
)
def test_bad_set_timesteps_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HFDDPMScheduler().set_timesteps(**kwargs)


def test_leading_steps_offset_past_the_end_raises():
    with pytest.raises(ValueError, match=r"timesteps \[1000, 1\] fall outside \[0, 999\] \(steps_offset=1\)"):
        HFDDPMScheduler(steps_offset=1).set_timesteps(1000)


def test_bad_step_input_raises():
    x_t = torch.randn(SHAPE)
    with pytest.raises(
        ValueError, match=r"variance_type='learned_range' needs a model with 2 × 3 output channels .* got 3"
    ):
        HFDDPMScheduler(variance_type="learned_range").step(torch.randn(SHAPE), 10, x_t)
    for variance_type in ("fixed_small", "fixed_large"):
        with pytest.raises(
            ValueError, match=rf"model_output has 6 channels but the sample has 3; with variance_type='{variance_type}'"
        ):
            HFDDPMScheduler(variance_type=variance_type).step(model_output("learned_range", 0), 10, x_t)
    scheduler = HFDDPMScheduler()
    scheduler.set_timesteps(timesteps=[900, 500, 0])
    with pytest.raises(ValueError, match=r"timestep 7 is not in this scheduler's chain.*900"):
        scheduler.step(torch.randn(SHAPE), 7, x_t)
    with pytest.raises(ValueError, match=r"timestep 1000 is not in this scheduler's chain"):
        HFDDPMScheduler().step(torch.randn(SHAPE), torch.tensor(1000), x_t)


# ---------------------------------------------------------------- the bound's pieces (DDPM eq. 5)


@pytest.mark.parametrize("T, start, end", [(1000, 1e-4, 0.02), (10, 1e-3, 0.2)])
def test_prior_kl_matches_closed_form(T, start, end):
    ours = HFDDPMScheduler(num_train_timesteps=T, beta_start=start, beta_end=end)
    ac_last = alphas_cumprod(linear_betas(T, start, end))[-1]
    x0 = pixels(8)
    # KL(N(m, v) || N(0, 1)) = ½ (v - 1 - log v + m²), m = sqrt(ᾱ_{T-1}) x_0, v = 1 - ᾱ_{T-1}; with u = ᾱ_{T-1}
    # small, v - 1 - log v = -u - log1p(-u) keeps its digits
    expected = 0.5 * (-ac_last - math.log1p(-ac_last) + ac_last * x0.numpy() ** 2)
    got = ours.prior_kl(x0)
    assert got.dtype == F64
    # ours forms log v2 - log v1 + v1/v2 - 1 directly: exact to ~1e-16 absolute, which is ~1e-8 relative here
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-15)
    assert got.max() < (1e-4 if T == 1000 else 1.0) and got.min() > 0


def expected_model_variance(variance_type: str, t: int, v: np.ndarray) -> np.ndarray:
    """σ_t² of p_θ: β̃_t (fixed_small), β_t (fixed_large), Improved DDPM eq. 15 (learned_range); at t = 0 the
    clipped β̃_0 → β̃_1 (and β_0 → β̃_1 for fixed_large, as the DDPM code does)."""
    tilde = [posterior(LINEAR_AC[s], LINEAR_AC[s - 1] if s else 1.0, LINEAR_BETAS[s])[2] for s in (0, 1, t)]
    small = tilde[2] if t else tilde[1]
    if variance_type == "fixed_small":
        return np.full_like(v, small)
    if variance_type == "fixed_large":
        return np.full_like(v, LINEAR_BETAS[t] if t else tilde[1])
    frac = (v + 1) / 2
    return np.exp(frac * math.log(LINEAR_BETAS[t]) + (1 - frac) * math.log(small))


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_bound_terms_match_closed_forms(variance_type, clip_sample):
    ours = HFDDPMScheduler(variance_type=variance_type, clip_sample=clip_sample)
    ts = torch.tensor([0, 1, 37, 999, 0, 500])
    x0 = pixels(9).repeat(3, 1, 1, 1)  # (6, C, H, W)
    eps = torch.randn(x0.shape, generator=seeded(10), dtype=F64)
    x_t = ours.add_noise(x0, eps, ts)
    eps_hat = eps + 0.3 * torch.randn(x0.shape, generator=seeded(11), dtype=F64)  # a slightly wrong model
    v = torch.rand(x0.shape, generator=seeded(12), dtype=F64) * 2 - 1
    output = torch.cat([eps_hat, v], dim=1) if variance_type == "learned_range" else eps_hat
    got = ours.bound_terms(output, x0, x_t, ts).numpy()

    for b, t in enumerate(ts.tolist()):
        ac_t, ac_prev = LINEAR_AC[t], (LINEAR_AC[t - 1] if t else 1.0)
        c0, ct, tilde = posterior(ac_t, ac_prev, LINEAR_BETAS[t])
        xb, xtb, eb = x0[b].numpy(), x_t[b].numpy(), eps_hat[b].numpy()
        x0_hat = (xtb - math.sqrt(1 - ac_t) * eb) / math.sqrt(ac_t)  # DDPM eq. 15
        if clip_sample:
            x0_hat = np.clip(x0_hat, -1, 1)
        mean_p = c0 * x0_hat + ct * xtb
        var_p = expected_model_variance(variance_type, t, v[b].numpy())
        if t > 0:  # L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t))
            expected = gaussian_kl(c0 * xb + ct * xtb, tilde, mean_p, var_p)
            np.testing.assert_allclose(got[b], expected, rtol=1e-9, atol=1e-12, err_msg=f"t={t}")
        else:  # L_0 = -log p_θ(x_0 | x_1), discretized Gaussian (eq. 13)
            expected = np.vectorize(lambda x, m, s2: -math.log(bin_probability_erf(x, m, math.sqrt(s2))))(
                xb, mean_p, var_p
            )
            np.testing.assert_allclose(got[b], expected, rtol=1e-9, err_msg="t=0")
            assert np.all(got[b] > 0)


@pytest.mark.parametrize("thresholding", [False, True])
def test_clip_denoised_overrides_the_configured_clipping(thresholding):
    """None: x̂_0 as configured (clip_sample / thresholding); False: as predicted; True: clipped (or thresholded)."""
    ts = torch.tensor([3, 400])
    x_t = torch.randn((2, *SHAPE[1:]), generator=seeded(0), dtype=F64)
    x0 = pixels(1)[:2]
    eps_hat = 3 * torch.randn(x_t.shape, generator=seeded(2), dtype=F64)  # sends x̂_0 far outside [-1, 1]
    options = dict(thresholding=thresholding, dynamic_thresholding_ratio=0.9, sample_max_value=5.0)
    on, off = HFDDPMScheduler(clip_sample=True, **options), HFDDPMScheduler(clip_sample=False)
    raw = off.p_mean_variance(eps_hat, x_t, ts)[2]
    assert raw.abs().max() > 5
    clipped = on.p_mean_variance(eps_hat, x_t, ts)[2]
    assert clipped.abs().max() <= 1 + 1e-12
    assert torch.equal(on.p_mean_variance(eps_hat, x_t, ts, clip_denoised=False)[2], raw)
    if not thresholding:
        assert torch.equal(off.p_mean_variance(eps_hat, x_t, ts, clip_denoised=True)[2], raw.clamp(-1, 1))
    assert torch.equal(on.bound_terms(eps_hat, x0, x_t, ts, clip_denoised=False), off.bound_terms(eps_hat, x0, x_t, ts))
    assert not torch.equal(on.bound_terms(eps_hat, x0, x_t, ts), off.bound_terms(eps_hat, x0, x_t, ts))


def test_learned_range_spans_log_beta_tilde_to_log_beta_also_at_t0():
    """Improved DDPM eq. 15 and its code: min_log = log β̃_t (clipped at t = 0 to log β̃_1), max_log = log β_t
    (not clipped: β_0 is positive). v = -1 gives β̃, v = +1 gives β, at every t including 0."""
    ours = HFDDPMScheduler(variance_type="learned_range")
    ts = torch.tensor([0, 1, 500])
    x_t = torch.zeros((3, *SHAPE[1:]), dtype=F64)
    tilde = {t: posterior(LINEAR_AC[t], LINEAR_AC[t - 1], LINEAR_BETAS[t])[2] for t in (1, 500)}
    ends = {-1.0: [tilde[1], tilde[1], tilde[500]], 1.0: [LINEAR_BETAS[0], LINEAR_BETAS[1], LINEAR_BETAS[500]]}
    for v, expected in ends.items():
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        _, log_var, _ = ours.p_mean_variance(out, x_t, ts)
        np.testing.assert_allclose(log_var[:, 0, 0, 0].numpy(), np.log(expected), rtol=1e-12)
    # v = 0 at t = 0: the geometric mean of β̃_1 and β_0 (clipping β_0 to β̃_1 too would leave v no effect at t = 0)
    out = torch.cat([torch.zeros_like(x_t), torch.zeros_like(x_t)], dim=1)
    _, log_var, _ = ours.p_mean_variance(out, x_t, ts)
    assert log_var[0, 0, 0, 0].item() == pytest.approx(0.5 * math.log(tilde[1] * LINEAR_BETAS[0]), rel=1e-12)
