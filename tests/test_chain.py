"""The chain's coefficients (hf_ddpm/chain.py) against the papers' closed forms (tests/closed_forms.py), and the
timestep subsequences that respace it against diffusers' (DDPM eq. 6, 7; Improved DDPM section 4)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from closed_forms import (
    LINEAR_AC,
    LINEAR_BETAS,
    alphas_cumprod,
    compose_forward,
    cosine_betas,
    linear_betas,
    moments_on_a_grid,
    posterior,
)
from diffusers import DDPMScheduler
from scheduler_inputs import F64, SHAPE, pixels, seeded
from torch.testing import assert_close

from hf_ddpm import HFDDPMScheduler, schedules
from hf_ddpm.chain import Chain, spaced_timesteps

# ---------------------------------------------------------------- posterior tables (DDPM eq. 6, 7)


@pytest.mark.parametrize("schedule, T", [("linear", 1000), ("linear", 10), ("squaredcos_cap_v2", 1000)])
def test_posterior_tables_match_closed_forms(schedule, T):
    kwargs = dict(num_train_timesteps=T, beta_schedule=schedule)
    if schedule == "linear" and T != 1000:
        kwargs.update(beta_start=0.01, beta_end=0.2)
    betas = linear_betas(T, kwargs.get("beta_start", 1e-4), kwargs.get("beta_end", 0.02))
    if schedule != "linear":
        betas = cosine_betas(T)
    ac = alphas_cumprod(betas)
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


# ---------------------------------------------------------------- the Chain itself


def test_beta_is_derived_once_from_the_schedule():
    """The training chain's β is the schedule's own array, and a respaced step that skips no timestep keeps it:
    only a step over skipped timesteps takes β' = 1 - ᾱ_{S_k} / ᾱ_{S_{k-1}} (Improved DDPM section 4)."""
    ours = HFDDPMScheduler(beta_schedule="cosine")
    betas = schedules.cosine_betas(1000)
    assert np.array_equal(ours.train_chain.beta, betas) and np.array_equal(ours.betas.numpy(), betas)
    assert np.array_equal(ours.train_chain.alpha_bar, schedules.alphas_cumprod_from_betas(betas))
    assert np.array_equal(ours.step_chain.beta, betas[::-1])  # before set_timesteps: every t, in timesteps order
    ours.set_timesteps(timesteps=[999, 998, 640, 5, 4, 0])
    ac = ours.train_chain.alpha_bar
    expected = [betas[999], 1 - ac[998] / ac[640], 1 - ac[640] / ac[5], betas[5], 1 - ac[4] / ac[0], betas[0]]
    assert ours.step_chain.beta.tolist() == expected


def test_rows_follow_the_order_the_timesteps_are_given_in():
    betas = linear_betas(50, 1e-3, 0.2)
    down, up = Chain.of(betas, [49, 30, 7, 0]), Chain.of(betas, [0, 7, 30, 49])
    for field in dataclasses.fields(Chain):
        if field.init:
            assert np.array_equal(getattr(down, field.name), getattr(up, field.name)[::-1]), field.name
    assert down.timesteps.tolist() == [49, 30, 7, 0] and len(down) == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        down.beta = betas


def test_rows_are_handed_out_in_the_callers_dtype_device_and_shape():
    chain = Chain.of(linear_betas(50, 1e-3, 0.2))
    like32, like64 = torch.zeros(SHAPE), torch.zeros(SHAPE, dtype=F64)
    rows = chain.at(torch.tensor([3, 0]), like64)
    assert rows.sqrt_alpha_bar.shape == (2, 1, 1, 1) and rows.sqrt_alpha_bar.dtype == F64
    assert rows.sqrt_alpha_bar.flatten().tolist() == np.sqrt(chain.alpha_bar[[3, 0]]).tolist()
    one = chain.at(3, like32).beta_tilde
    assert one.shape == () and one.dtype == torch.float32 and one.item() == np.float32(chain.beta_tilde[3])
    assert chain.on(like32.device, torch.float32) is chain.on(like32.device, torch.float16)  # cached, float32


# ---------------------------------------------------------------- timestep spacings


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
