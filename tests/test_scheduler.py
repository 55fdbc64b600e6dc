"""HFDDPMScheduler against DDPM's closed forms, against diffusers' DDPMScheduler, and where diffusers is wrong.

The closed forms at the top of this file are written from the papers (DDPM eq. 2, 4, 6, 7, 13; Improved DDPM
section 4 and eq. 15) in float64 and share no code with hf_ddpm. Comparisons with diffusers hold to float32
precision only, because diffusers computes ᾱ in float32: at small t, 1 - ᾱ_t keeps only ~4 digits, so its
posterior coefficients are ~1e-4 (linear) to ~4e-4 (cosine) relative off (x_{t-1} up to ~2e-4 off for the linear
schedule); at large t, ᾱ_t is ~1e-7 (linear) to ~1e-5 (cosine) relative off, which ε-prediction's
x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t) carries into values of size up to 1 / sqrt(ᾱ_{T-1}). Hence atol 2e-4
with rtol 1e-4 there (DIFFUSERS_TOL), and test_diffusers_posterior_coefficients_lose_digits_at_small_t.
"""

import json
import math

import mpmath
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from test_schedules import closed_alphas_cumprod as running_product  # ᾱ_t (DDPM eq. 4) in Python floats
from torch.testing import assert_close

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.chain import spaced_timesteps
from hf_ddpm.gaussians import discretized_gaussian_log_likelihood, normal_kl

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
F64 = torch.float64
DIFFUSERS_TOL = dict(rtol=1e-4, atol=2e-4)  # float32 ᾱ in diffusers, see the module docstring

# ---------------------------------------------------------------- closed forms (float64, from the papers)


def closed_linear_betas(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    return np.array([start + (end - start) * t / (T - 1) for t in range(T)])


def closed_cosine_betas(T: int) -> np.ndarray:
    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1.0 - f(t + 1) / f(t), 0.999) for t in range(T)])


def compose_forward(betas, first: int, last: int) -> tuple[float, float]:
    """q(x_last | x_{first-1}) = N(a x, v) by composing DDPM eq. 2 step by step: x_j = sqrt(1 - β_j) x_{j-1} + sqrt(β_j) ε."""
    a, v = 1.0, 0.0
    for j in range(first, last + 1):
        a *= math.sqrt(1.0 - betas[j])
        v = (1.0 - betas[j]) * v + betas[j]
    return a, v


def posterior(ac_t: float, ac_prev: float, beta_t: float | None = None) -> tuple[float, float, float]:
    """(coef_x0, coef_xt, β̃) of q(x_prev | x_t, x_0) (DDPM eq. 6, 7); β_t = 1 - ᾱ_t/ᾱ_prev when not given
    (Improved DDPM section 4, respaced chains)."""
    if beta_t is None:
        beta_t = 1.0 - ac_t / ac_prev
    coef_x0 = math.sqrt(ac_prev) * beta_t / (1.0 - ac_t)
    coef_xt = math.sqrt(1.0 - beta_t) * (1.0 - ac_prev) / (1.0 - ac_t)
    return coef_x0, coef_xt, (1.0 - ac_prev) / (1.0 - ac_t) * beta_t


def moments_on_a_grid(log_density) -> tuple[float, float]:
    """Mean and variance of an unnormalized 1-D density by summing on a grid: a coarse pass over [-20, 20] finds
    the mass, a fine one over ±15 standard deviations measures it (a Riemann sum is exact to rounding for smooth,
    fast-decaying densities)."""
    mean, std = 0.0, 20.0 / 15.0
    for n in (400_001, 200_001):
        y = np.linspace(mean - 15 * std, mean + 15 * std, n)
        log_p = log_density(y)
        w = np.exp(log_p - log_p.max())
        mean = (y * w).sum() / w.sum()
        var = ((y - mean) ** 2 * w).sum() / w.sum()
        std = math.sqrt(var)
    return mean, var


def gaussian_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) elementwise, numpy."""
    return 0.5 * (np.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1.0)


def bin_probability_erf(x: float, mean: float, scale: float) -> float:
    """DDPM eq. 13 the plain way: Φ(upper) - Φ(lower) with math.erf; open bins at -1 and +1."""

    def cdf(z):
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    lower, upper = (x - 1 / 255 - mean) / scale, (x + 1 / 255 - mean) / scale
    if x < -0.999:
        return cdf(upper)
    if x > 0.999:
        return 1.0 - cdf(lower)
    return cdf(upper) - cdf(lower)


def bin_log_probability_mp(x: float, mean: float, scale: float) -> float:
    """log of the same bin probability with mpmath (50 digits, unbounded exponent): exact also deep in a tail."""
    with mpmath.workdps(50):
        x, mean, scale = mpmath.mpf(x), mpmath.mpf(mean), mpmath.mpf(scale)
        lower = (x - mpmath.mpf(1) / 255 - mean) / scale
        upper = (x + mpmath.mpf(1) / 255 - mean) / scale
        if x < -0.999:
            p = mpmath.ncdf(upper)
        elif x > 0.999:
            p = mpmath.ncdf(-lower)  # 1 - Φ(lower)
        elif lower > 0:
            p = mpmath.ncdf(-lower) - mpmath.ncdf(-upper)  # the same difference, mirrored to keep its digits
        else:
            p = mpmath.ncdf(upper) - mpmath.ncdf(lower)
        return float(mpmath.log(p))


LINEAR_BETAS = closed_linear_betas()
LINEAR_AC = running_product(LINEAR_BETAS)

# ---------------------------------------------------------------- small helpers


def f64(value) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)  # torch.tensor(python float) would round to float32


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_output(variance_type: str, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A stand-in network output: (B, C, H, W), or (B, 2C, H, W) with v in [-1, 1] for learned_range."""
    gen = seeded(seed)
    out = torch.randn(SHAPE, generator=gen, dtype=dtype)
    if variance_type == "learned_range":
        out = torch.cat([out, torch.rand(SHAPE, generator=gen, dtype=dtype) * 2 - 1], dim=1)
    return out


def pixels(seed: int, dtype=F64) -> torch.Tensor:
    """x_0 on the pixel grid k/127.5 - 1, with both edge values present."""
    k = torch.randint(0, 256, SHAPE, generator=seeded(seed))
    k.view(-1)[:2] = torch.tensor([0, 255])
    return k.to(dtype) / 127.5 - 1.0


def step_both(ours, theirs, output, t, x_t, seed=7):
    a = ours.step(output, t, x_t, generator=seeded(seed))
    b = theirs.step(output, t, x_t, generator=seeded(seed))
    return a, b


# ---------------------------------------------------------------- posterior tables (DDPM eq. 6, 7)


@pytest.mark.parametrize("schedule, T", [("linear", 1000), ("linear", 10), ("squaredcos_cap_v2", 1000)])
def test_posterior_tables_match_closed_forms(schedule, T):
    kwargs = dict(num_train_timesteps=T, beta_schedule=schedule)
    if schedule == "linear" and T != 1000:
        kwargs.update(beta_start=0.01, beta_end=0.2)
    betas = closed_linear_betas(T, kwargs.get("beta_start", 1e-4), kwargs.get("beta_end", 0.02))
    if schedule != "linear":
        betas = closed_cosine_betas(T)
    ac = running_product(betas)
    coefs = np.array([posterior(ac[t], ac[t - 1] if t > 0 else 1.0, betas[t]) for t in range(T)])
    coef_x0, coef_xt, var = coefs.T
    expected = {
        "beta": betas,
        "alpha_bar": ac,
        "sqrt_alpha_bar": np.sqrt(ac),
        "sqrt_one_minus_alpha_bar": np.sqrt(1.0 - ac),
        "mu_tilde_coef_x0": coef_x0,
        "mu_tilde_coef_xt": coef_xt,
        "beta_tilde": var,
        # β̃_0 = 0: its log is clipped to log β̃_1, and fixed_large uses β̃_1 at t = 0 (DDPM code)
        "log_beta_tilde_clipped": np.log(np.r_[var[1], var[1:]]),
        "log_beta_clipped": np.log(np.r_[var[1], betas[1:]]),
        "log_beta": np.log(betas),
    }
    chain = HFDDPMScheduler(**kwargs).train_chain
    assert var[0] == 0.0 and chain.beta_tilde[0] == 0.0
    assert coef_x0[0] == pytest.approx(1.0, rel=1e-15) and coef_xt[0] == 0.0  # at t = 0, μ̃ = x_0
    for name, value in expected.items():
        # β_t is the schedule's own (derived once); ᾱ is a running product: within 1e-10 of the closed forms
        np.testing.assert_allclose(getattr(chain, name), value, rtol=1e-10, atol=0, err_msg=name)


@pytest.mark.parametrize("t_from, t_to", [(1, 0), (2, 1), (500, 499), (999, 998), (999, 640), (300, 77), (40, 0)])
def test_posterior_is_the_product_of_gaussians(t_from, t_to):
    """q(x_to | x_from, x_0) ∝ q(x_from | x_to) q(x_to | x_0) (Bayes), each factor built by composing eq. 2;
    its mean and variance found by integrating the product numerically on a fine grid."""
    x0, x_from = 0.7, -0.3
    a, v = compose_forward(LINEAR_BETAS, t_to + 1, t_from)  # q(x_from | x_to) = N(a x_to, v)
    a0, v0 = compose_forward(LINEAR_BETAS, 0, t_to)  # q(x_to | x_0) = N(a0 x_0, v0)
    mean, var = moments_on_a_grid(lambda y: -((x_from - a * y) ** 2) / (2 * v) - (y - a0 * x0) ** 2 / (2 * v0))

    ours = HFDDPMScheduler()
    ours.set_timesteps(timesteps=[t_from, t_to])
    tab = ours.step_chain  # rows in `timesteps` order: row 0 is the step t_from → t_to
    assert tab.mu_tilde_coef_x0[0] * x0 + tab.mu_tilde_coef_xt[0] * x_from == pytest.approx(mean, rel=1e-9)
    assert tab.beta_tilde[0] == pytest.approx(var, rel=1e-8)
    if t_from == t_to + 1:  # consecutive: also the training chain's q_posterior
        m, log_var = ours.q_posterior(
            torch.tensor([[[[x0]]]], dtype=F64), torch.tensor([[[[x_from]]]], dtype=F64), torch.tensor([t_from])
        )
        assert m.item() == pytest.approx(mean, rel=1e-9)
        assert math.exp(log_var.item()) == pytest.approx(var, rel=1e-8)


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


# ---------------------------------------------------------------- step() against diffusers

CHAINS = {  # name: (timestep_spacing, set_timesteps kwargs or None for the full training chain)
    "full": ("leading", None),
    "linspace-50": ("linspace", {"num_inference_steps": 50}),
    "leading-50": ("leading", {"num_inference_steps": 50}),
    "trailing-50": ("trailing", {"num_inference_steps": 50}),  # ends at 19: diffusers adds noise there, see (c)
    "trailing-7": ("trailing", {"num_inference_steps": 7}),  # 1000/7 is not an integer; ends at 142
    "custom": ("leading", {"timesteps": [999, 900, 700, 420, 137, 42, 3, 0]}),
}
CLIPPING = {
    "clip": dict(clip_sample=True),
    "noclip": dict(clip_sample=False),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
}
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


def check_steps_agree(config: dict, chain: str, seed: int = 0):
    """Step both schedulers from the same x_t with the same output and generator at the chain's first, second,
    middle, second-to-last and last timesteps."""
    spacing, chain_kwargs = CHAINS[chain]
    ours = HFDDPMScheduler(timestep_spacing=spacing, **config)
    theirs = DDPMScheduler(timestep_spacing=spacing, **config)
    if chain_kwargs is not None:
        ours.set_timesteps(**chain_kwargs)
        theirs.set_timesteps(**chain_kwargs)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    n = len(ours.timesteps)
    for i in sorted({0, 1, n // 2, n - 2, n - 1}):
        t = int(ours.timesteps[i])
        x_t = torch.randn(SHAPE, generator=seeded(seed + i))
        output = model_output(config.get("variance_type", "fixed_small"), seed + 100 + i)
        a, b = step_both(ours, theirs, output, t, x_t, seed=seed + 200 + i)
        assert_close(a.pred_original_sample, b.pred_original_sample, **DIFFUSERS_TOL, msg=f"x0 at t={t}")
        if i == n - 1 and t > 0:
            continue  # diffusers adds noise at a last step above t = 0: test_last_step_adds_no_noise
        assert_close(a.prev_sample, b.prev_sample, **DIFFUSERS_TOL, msg=f"x_prev at t={t}")
        assert torch.isfinite(a.prev_sample).all()


@pytest.mark.parametrize("clipping", list(CLIPPING))
@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_step_matches_diffusers(prediction_type, variance_type, chain, clipping):
    config = dict(prediction_type=prediction_type, variance_type=variance_type, **CLIPPING[clipping])
    check_steps_agree(config, chain)


@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("chain", ["full", "linspace-50", "trailing-7"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_matches_diffusers_cosine_schedule(prediction_type, chain, variance_type):
    # not "sample": unclipped x̂_0 ~ N(0, 1) times diffusers' coefficients at t = 1 (4e-4 off, see below) is 6e-4 off
    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, variance_type=variance_type)
    check_steps_agree(dict(config, clip_sample=False), chain)


def test_step_matches_diffusers_scaled_linear_sigmoid_and_short_chain():
    check_steps_agree(dict(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012), "linspace-50")
    check_steps_agree(dict(beta_schedule="sigmoid", variance_type="fixed_large", clip_sample=False), "leading-50")
    check_steps_agree(dict(num_train_timesteps=20, beta_start=1e-3, beta_end=0.2, variance_type="fixed_large"), "full")
    check_steps_agree(dict(prediction_type="sample", clip_sample_range=1.5), "leading-50")  # x̂_0 in [-1.5, 1.5]


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_diffusers_posterior_coefficients_lose_digits_at_small_t(schedule):
    """Why the comparisons above need atol 2e-4 (and why the cosine one leaves out x_0-prediction): diffusers forms
    1 - ᾱ_t from a float32 ᾱ_t ≈ 1, keeping ~4 digits; ours are the float64 closed forms."""
    betas = closed_linear_betas() if schedule == "linear" else closed_cosine_betas(1000)
    ac = running_product(betas)
    theirs_ac = DDPMScheduler(beta_schedule=schedule).alphas_cumprod.double().tolist()
    tab = HFDDPMScheduler(beta_schedule=schedule).train_chain
    worst_theirs = worst_ours = 0.0
    for t in range(1, 11):
        c0, ct, _ = posterior(ac[t], ac[t - 1], betas[t])
        a_t, a_prev = theirs_ac[t], theirs_ac[t - 1]
        theirs = (  # as diffusers' step() forms them (its step 4)
            math.sqrt(a_prev) * (1 - a_t / a_prev) / (1 - a_t),
            math.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t),
        )
        ours = (tab.mu_tilde_coef_x0[t], tab.mu_tilde_coef_xt[t])
        worst_theirs = max(worst_theirs, *(abs(c / e - 1) for c, e in zip(theirs, (c0, ct))))
        worst_ours = max(worst_ours, *(abs(c / e - 1) for c, e in zip(ours, (c0, ct))))
    assert 1e-4 < worst_theirs < 1e-3
    assert worst_ours < 1e-10


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


# ---------------------------------------------------------------- configs: both directions and the round trip

SHARED_KEYS = [
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "variance_type", "clip_sample",
    "prediction_type", "thresholding", "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value",
    "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
]  # fmt: skip


def steps_of(scheduler, variance_type, timesteps_to_check, seed=0):
    outs = []
    for i, t in enumerate(timesteps_to_check):
        x_t = torch.randn(SHAPE, generator=seeded(seed + i))
        res = scheduler.step(model_output(variance_type, seed + 50 + i), t, x_t, generator=seeded(seed + 90 + i))
        outs.append((res.prev_sample, res.pred_original_sample))
    return outs


def test_diffusers_builds_from_our_config_and_steps_the_same(tmp_path):
    ours = HFDDPMScheduler(
        num_train_timesteps=200, beta_schedule="cosine", variance_type="fixed_large", prediction_type="v_prediction",
        timestep_spacing="linspace", clip_sample=False,
    )  # fmt: skip
    assert ours.config.beta_schedule == "squaredcos_cap_v2"  # "cosine" is stored under diffusers' name
    theirs = DDPMScheduler.from_config(ours.config)
    assert type(theirs) is DDPMScheduler
    assert {k: theirs.config[k] for k in SHARED_KEYS} == {k: ours.config[k] for k in SHARED_KEYS}
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    check = [int(t) for t in ours.timesteps[[0, 5, 10, -2, -1]]]
    for (a_prev, a_x0), (b_prev, b_x0) in zip(
        steps_of(ours, "fixed_large", check), steps_of(theirs, "fixed_large", check)
    ):
        assert_close(a_prev, b_prev, **DIFFUSERS_TOL)
        assert_close(a_x0, b_x0, **DIFFUSERS_TOL)

    # through a file, as a pipeline repo's scheduler/ folder is read by plain diffusers
    ours.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "HFDDPMScheduler" and saved["beta_schedule"] == "squaredcos_cap_v2"
    loaded = DDPMScheduler.from_pretrained(tmp_path)
    assert {k: loaded.config[k] for k in SHARED_KEYS} == {k: ours.config[k] for k in SHARED_KEYS}
    assert_close(loaded.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)


def test_we_build_from_diffusers_config_and_step_the_same():
    theirs = DDPMScheduler(
        num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=1e-3, beta_end=0.03,
        variance_type="learned_range", timestep_spacing="leading", steps_offset=1, thresholding=True,
        sample_max_value=1.5,
    )  # fmt: skip
    ours = HFDDPMScheduler.from_config(theirs.config)
    assert type(ours) is HFDDPMScheduler
    assert {k: ours.config[k] for k in SHARED_KEYS} == {k: theirs.config[k] for k in SHARED_KEYS}
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == [91, 81, 71, 61, 51, 41, 31, 21, 11, 1]
    check = [91, 51, 11]  # not the last step (1 > 0): diffusers adds noise there
    pairs = zip(steps_of(ours, "learned_range", check), steps_of(theirs, "learned_range", check))
    for (a_prev, a_x0), (b_prev, b_x0) in pairs:
        assert_close(a_prev, b_prev, **DIFFUSERS_TOL)
        assert_close(a_x0, b_x0, **DIFFUSERS_TOL)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_save_and_load_round_trip_steps_bitwise_equal(tmp_path, variance_type):
    ours = HFDDPMScheduler(
        num_train_timesteps=300, beta_schedule="cosine", variance_type=variance_type, timestep_spacing="trailing",
        prediction_type="epsilon", clip_sample_range=1.5,
    )  # fmt: skip
    ours.save_config(tmp_path)
    loaded = HFDDPMScheduler.from_pretrained(tmp_path)
    public = [k for k in ours.config if not k.startswith("_")]
    assert {k: loaded.config[k] for k in public} == {k: ours.config[k] for k in public}
    for s in (ours, loaded):
        s.set_timesteps(17)
    assert torch.equal(ours.timesteps, loaded.timesteps)
    check = ours.timesteps.tolist()
    for (a_prev, a_x0), (b_prev, b_x0) in zip(
        steps_of(ours, variance_type, check), steps_of(loaded, variance_type, check)
    ):
        assert torch.equal(a_prev, b_prev) and torch.equal(a_x0, b_x0)


# ---------------------------------------------------------------- where diffusers is wrong, and we are not


def test_fixed_large_log_is_finite_where_diffusers_gives_nan():
    """(a) diffusers takes the square root of log β_t (< 0) for fixed_large_log: NaN everywhere."""
    x_t, output = torch.randn(SHAPE, generator=seeded(0)), model_output("fixed_large_log", 1)
    theirs = DDPMScheduler(variance_type="fixed_large_log")
    assert torch.isnan(theirs.step(output, 500, x_t, generator=seeded(2)).prev_sample).all()

    ours = HFDDPMScheduler(variance_type="fixed_large_log").step(output, 500, x_t, generator=seeded(2)).prev_sample
    assert torch.isfinite(ours).all()
    # the same distribution as fixed_large, N(μ̃, β_t): with the same generator, the same sample
    large = HFDDPMScheduler(variance_type="fixed_large").step(output, 500, x_t, generator=seeded(2)).prev_sample
    assert torch.equal(ours, large)
    # ... which is diffusers' (correct) fixed_large sample
    theirs_large = DDPMScheduler(variance_type="fixed_large").step(output, 500, x_t, generator=seeded(2))
    assert_close(ours, theirs_large.prev_sample, **DIFFUSERS_TOL)
    # its noise is sqrt(β_t) z where fixed_small's is sqrt(β̃_t) z, around the same mean μ̃
    small = HFDDPMScheduler(variance_type="fixed_small").step(output, 500, x_t, generator=seeded(2)).prev_sample
    z = torch.randn(SHAPE, generator=seeded(2))
    tilde = posterior(LINEAR_AC[500], LINEAR_AC[499], LINEAR_BETAS[500])[2]
    assert_close(ours - math.sqrt(LINEAR_BETAS[500]) * z, small - math.sqrt(tilde) * z, rtol=0, atol=1e-6)
    # and fixed_small_log is fixed_small
    small_log = HFDDPMScheduler(variance_type="fixed_small_log").step(output, 500, x_t, generator=seeded(2))
    assert torch.equal(small, small_log.prev_sample)


def trailing_defects(max_T: int) -> list[tuple[int, int, list[int]]]:
    """(T, S, diffusers' timesteps) where diffusers' trailing spacing gives timestep -1 or not S values."""
    found = []
    for T in range(1, max_T + 1):
        theirs = DDPMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        for S in range(1, T + 1):
            theirs.set_timesteps(S)
            ts = theirs.timesteps.tolist()
            if len(ts) != S or min(ts) < 0:
                found.append((T, S, ts))
    return found


def test_trailing_spacing_never_ends_at_minus_one():
    """(b) diffusers' trailing: np.arange(T, 0, -T/S) can overshoot by one value, which becomes -1."""
    max_T = 40
    found = trailing_defects(max_T)
    assert found, "expected diffusers' trailing spacing to produce -1 or S+1 timesteps for some small T, S"
    assert (15, 13, [14, 13, 12, 11, 9, 8, 7, 6, 5, 4, 2, 1, 0, -1]) in found
    assert all(ts[-1] == -1 and len(ts) == S + 1 for _, S, ts in found)
    bad = {(T, S): ts for T, S, ts in found}

    for T in range(1, max_T + 1):
        theirs = DDPMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        for S in range(1, T + 1):
            ours = spaced_timesteps(T, S, "trailing")
            assert len(ours) == S and len(set(ours.tolist())) == S
            assert ours[0] == T - 1 and ours[-1] >= 0 and np.all(np.diff(ours) < 0)
            if (T, S) in bad:
                assert ours.tolist() == bad[(T, S)][:S]  # the same timesteps, without the stray -1
            else:
                theirs.set_timesteps(S)
                assert ours.tolist() == theirs.timesteps.tolist()

    scheduler = HFDDPMScheduler(num_train_timesteps=15, timestep_spacing="trailing")
    scheduler.set_timesteps(13)
    assert scheduler.timesteps.tolist() == [14, 13, 12, 11, 9, 8, 7, 6, 5, 4, 2, 1, 0]


def test_trailing_spacing_equals_diffusers_for_every_s_at_t1000():
    # including the ties that np.arange's float stepping decides: at S = 48, T - 3·T/S = 937.5 exactly, but arange
    # gives 937.4999999999999, which rounds to 937 (timestep 936) where 937.5 would round half-to-even to 938
    theirs = DDPMScheduler(timestep_spacing="trailing")
    for S in range(1, 1001):
        theirs.set_timesteps(S)
        assert spaced_timesteps(1000, S, "trailing").tolist() == theirs.timesteps.tolist()[:S], S
    assert spaced_timesteps(1000, 48, "trailing")[:4].tolist() == [999, 978, 957, 936]


@pytest.mark.parametrize("T", [10, 97, 100, 1000])
def test_every_spacing_gives_s_distinct_descending_timesteps_in_range(T):
    for spacing in ("linspace", "leading", "trailing"):
        for S in range(1, T + 1, max(1, T // 97)):
            ts = spaced_timesteps(T, S, spacing)
            assert len(ts) == S and ts[-1] >= 0 and ts[0] <= T - 1 and np.all(np.diff(ts) < 0), (spacing, S)


def test_spacing_worked_example():
    assert spaced_timesteps(10, 3, "linspace").tolist() == [9, 4, 0]
    assert spaced_timesteps(10, 3, "leading").tolist() == [6, 3, 0]
    assert spaced_timesteps(10, 3, "trailing").tolist() == [9, 6, 2]
    assert spaced_timesteps(10, 3, "leading", steps_offset=1).tolist() == [7, 4, 1]


@pytest.mark.parametrize(
    "chain", [dict(timesteps=[50, 20, 5]), dict(num_inference_steps=10)], ids=["custom-50-20-5", "trailing-10"]
)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_last_step_adds_no_noise(chain, variance_type):
    """(c) Algorithm 2 sets z = 0 at the last step; diffusers adds noise whenever that step's t > 0."""
    ours = HFDDPMScheduler(variance_type=variance_type, timestep_spacing="trailing")
    theirs = DDPMScheduler(variance_type=variance_type, timestep_spacing="trailing")
    ours.set_timesteps(**chain)
    theirs.set_timesteps(**chain)
    last = int(ours.timesteps[-1])
    assert last > 0 and last == int(theirs.timesteps[-1])
    x_t, output = torch.randn(SHAPE, generator=seeded(0)), model_output(variance_type, 1)

    a1, a2 = (ours.step(output, last, x_t, generator=seeded(s)) for s in (11, 12))
    assert torch.equal(a1.prev_sample, a2.prev_sample)  # independent of the generator
    # the posterior mean with ᾱ_prev = 1: coef_x0 = 1, coef_xt = 0, so x_{-1} = x̂_0
    assert torch.equal(a1.prev_sample, a1.pred_original_sample)
    x0_expected = ((x_t - math.sqrt(1 - LINEAR_AC[last]) * output[:, :3]) / math.sqrt(LINEAR_AC[last])).clamp(-1, 1)
    assert_close(a1.prev_sample, x0_expected, rtol=1e-5, atol=1e-6)

    b1, b2 = (theirs.step(output, last, x_t, generator=seeded(s)) for s in (11, 12))
    assert_close(b1.pred_original_sample, a1.pred_original_sample, **DIFFUSERS_TOL)
    if variance_type == "fixed_small":
        # diffusers adds sqrt(max(β̃, 1e-20)) z = 1e-10 z there (β̃ = 0 when ᾱ_prev = 1): below float32 resolution
        assert_close(b1.prev_sample, a1.prev_sample, **DIFFUSERS_TOL)
    else:  # diffusers adds noise of variance β' = 1 - ᾱ_last (or up to it): its output depends on the generator
        assert (b1.prev_sample - b2.prev_sample).abs().max() > 1e-2
        assert (b1.prev_sample - a1.prev_sample).abs().max() > 1e-2


# ---------------------------------------------------------------- respacing (Improved DDPM section 4)

RESPACED = {
    "linspace-10": ("linspace", dict(num_inference_steps=10)),
    "leading-10": ("leading", dict(num_inference_steps=10)),
    "trailing-10": ("trailing", dict(num_inference_steps=10)),
    "custom": ("leading", dict(timesteps=[999, 640, 300, 77, 5])),
}


@pytest.mark.parametrize("chain", list(RESPACED))
def test_respaced_betas_are_one_minus_alphas_cumprod_ratios(chain):
    spacing, kwargs = RESPACED[chain]
    ours = HFDDPMScheduler(timestep_spacing=spacing)
    ours.set_timesteps(**kwargs)
    kept = ours.timesteps.tolist()[::-1]  # ascending S_0 < S_1 < ...
    expected = [1.0 - LINEAR_AC[kept[0]]] + [1.0 - LINEAR_AC[s] / LINEAR_AC[p] for p, s in zip(kept, kept[1:])]
    tab = ours.step_chain  # rows in `timesteps` order: descending
    np.testing.assert_allclose(tab.beta[::-1], expected, rtol=1e-12)
    np.testing.assert_allclose(tab.alpha_bar[::-1], LINEAR_AC[kept], rtol=1e-14)
    # β'_k is the variance of the composed forward steps S_{k-1}+1 .. S_k, and 1 - β'_k their squared gain
    for k in range(1, len(kept)):
        a, v = compose_forward(LINEAR_BETAS, kept[k - 1] + 1, kept[k])
        assert v == pytest.approx(expected[k], rel=1e-11)
        assert a**2 == pytest.approx(1.0 - expected[k], rel=1e-12)


@pytest.mark.parametrize("chain", list(RESPACED))
def test_respaced_step_with_an_oracle_samples_the_exact_posterior(chain):
    """With x̂_0 = x_0 (a perfect x_0-predicting model) and fixed_small, each step of the respaced chain draws from
    q(x_{S_{k-1}} | x_{S_k}, x_0), written with ᾱ only: mean sqrt(ᾱ_s)(1 - ᾱ_t/ᾱ_s)/(1 - ᾱ_t) x_0 +
    sqrt(ᾱ_t/ᾱ_s)(1 - ᾱ_s)/(1 - ᾱ_t) x_t, variance (1 - ᾱ_s)/(1 - ᾱ_t)(1 - ᾱ_t/ᾱ_s)."""
    spacing, kwargs = RESPACED[chain]
    ours = HFDDPMScheduler(
        prediction_type="sample", variance_type="fixed_small", clip_sample=False, timestep_spacing=spacing
    )
    ours.set_timesteps(**kwargs)
    ts = ours.timesteps.tolist()
    x0 = pixels(3)
    for k, t in enumerate(ts):
        ac_t = LINEAR_AC[t]
        ac_s = LINEAR_AC[ts[k + 1]] if k + 1 < len(ts) else 1.0
        x_t = math.sqrt(ac_t) * x0 + math.sqrt(1 - ac_t) * torch.randn(SHAPE, generator=seeded(k), dtype=F64)
        out = ours.step(x0, t, x_t, generator=seeded(100 + k))
        mean = (
            math.sqrt(ac_s) * (1 - ac_t / ac_s) / (1 - ac_t) * x0
            + math.sqrt(ac_t / ac_s) * (1 - ac_s) / (1 - ac_t) * x_t
        )
        var = (1 - ac_s) / (1 - ac_t) * (1 - ac_t / ac_s)
        z = (
            torch.randn(SHAPE, generator=seeded(100 + k), dtype=F64)
            if k + 1 < len(ts)
            else torch.zeros(SHAPE, dtype=F64)
        )
        assert_close(out.prev_sample, mean + math.sqrt(var) * z, rtol=1e-12, atol=1e-13)
        assert torch.equal(out.pred_original_sample, x0)


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
    ac_last = running_product(closed_linear_betas(T, start, end))[-1]
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


# ---------------------------------------------------------------- gaussians.py: decoder and KL

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
