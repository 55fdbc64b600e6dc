"""HFDDPMScheduler against diffusers' DDPMScheduler: the same steps, configs that load both ways, and where
diffusers is wrong (and we are not).

Comparisons with diffusers hold to float32
precision only, because diffusers computes ᾱ in float32: at small t, 1 - ᾱ_t keeps only ~4 digits, so its
posterior coefficients are ~1e-4 (linear) to ~4e-4 (cosine) relative off (x_{t-1} up to ~2e-4 off for the linear
schedule); at large t, ᾱ_t is ~1e-7 (linear) to ~1e-5 (cosine) relative off, which ε-prediction's
x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t) carries into values of size up to 1 / sqrt(ᾱ_{T-1}). Hence atol 2e-4
with rtol 1e-4 there (DIFFUSERS_TOL), and test_diffusers_posterior_coefficients_lose_digits_at_small_t.
"""

import json
import math

import pytest
import torch
from closed_forms import LINEAR_AC, LINEAR_BETAS, alphas_cumprod, cosine_betas, linear_betas, posterior
from diffusers import DDPMScheduler
from scheduler_inputs import SHAPE, model_output, seeded
from torch.testing import assert_close

from hf_ddpm import HFDDPMScheduler

DIFFUSERS_TOL = dict(rtol=1e-4, atol=2e-4)  # float32 ᾱ in diffusers, see the module docstring


def step_both(ours, theirs, output, t, x_t, seed=7):
    a = ours.step(output, t, x_t, generator=seeded(seed))
    b = theirs.step(output, t, x_t, generator=seeded(seed))
    return a, b


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
    betas = linear_betas() if schedule == "linear" else cosine_betas(1000)
    ac = alphas_cumprod(betas)
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
