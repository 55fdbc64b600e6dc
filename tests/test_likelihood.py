"""Likelihood beyond eq. 5 (hf_ddpm/trajectories.py, hf_ddpm/probability_flow.py) against closed forms.

The oracle: data drawn from a known Gaussian (and a two-component Gaussian mixture) in a few dimensions, with the
analytically optimal ε-prediction for it wrapped as a model. Everything the assertions compare with (log-densities,
bin probabilities, the flow's Jacobian, improved-diffusion's `_vb_terms_bpd` formulas) is computed here in float64
from closed forms, never by hf_ddpm.
"""

import math

import closed_forms as paper
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.bound import rate_distortion, variational_bound
from hf_ddpm.probability_flow import ODELikelihoodError, dequantize, ode_log_likelihood
from hf_ddpm.trajectories import importance_weighted_bound, trajectory_bound, trajectory_log_weights

SHAPE = (1, 2, 2)
D = 4
MU = np.array([0.2, -0.3, 0.5, 0.0])
S = 0.3
H = 1.0 / 255.0  # half a pixel bin on [-1, 1] (DDPM eq. 13)


def discrete_gaussian_model(betas):
    """ε*(x_i, i) = E[ε | x_i] for continuous data N(MU, S²) under q(x_i | x_0) = N(sqrt(ᾱ_i) x_0, 1 - ᾱ_i)."""
    ac = paper.alphas_cumprod(betas)
    mu = torch.from_numpy(MU).reshape(1, *SHAPE)

    def model(x, t):
        a = torch.from_numpy(ac)[t.long().cpu()].reshape(-1, 1, 1, 1).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * mu.to(x.dtype)) / (a * S**2 + 1 - a)

    return model


def quantized_gaussian_images(n, seed=0):
    rng = np.random.default_rng(seed)
    x = np.clip(np.round((MU + S * rng.standard_normal((n, D)) + 1) * 127.5), 0, 255)
    return torch.from_numpy(x.astype(np.uint8)).reshape(n, *SHAPE)


def data_nll_bits(images):
    """-log2 P_data(bins) / D of quantized N(MU, S²): each pixel's bin probability by its normal CDF, open edges."""
    x = images.reshape(len(images), D).numpy() / 127.5 - 1.0
    lo = np.where(x < -0.999, -np.inf, x - H)
    hi = np.where(x > 0.999, np.inf, x + H)
    log_p = np.log(norm.cdf((hi - MU) / S) - norm.cdf((lo - MU) / S))
    return -log_p.sum(1) / (D * math.log(2))


# ------------------------------------------------------------------ eq. 3, the IWAE bound and eq. 5 on Gaussian data


@pytest.fixture(scope="module")
def gaussian_bounds():
    T = 50
    betas = paper.linear_betas(T, 1e-4, 0.02 * 1000 / T)
    scheduler = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.02 * 1000 / T)
    model = discrete_gaussian_model(betas)
    images = quantized_gaussian_images(48)
    x0 = images.double() / 127.5 - 1
    exact = variational_bound(model, scheduler, x0, batch_size=4096, generator=torch.manual_seed(1))
    log_w = trajectory_log_weights(model, scheduler, x0, 64, batch_size=4096, generator=torch.manual_seed(2))
    return {"images": images, "exact": exact, "log_w": log_w, "truth": data_nll_bits(images)}


def test_eq3_trajectory_estimate_has_the_mean_of_eq5(gaussian_bounds):
    exact = gaussian_bounds["exact"].bits_per_dim.numpy()
    traj, traj_se = (v.numpy() for v in trajectory_bound(gaussian_bounds["log_w"], D))
    assert np.all(np.isfinite(traj_se)) and np.all(traj_se > 0)
    diff = traj - exact  # both unbiased for the same bound of each image
    assert abs(diff.mean()) < 2 * diff.std(ddof=1) / math.sqrt(len(diff)), (diff.mean(), diff.std())
    # ... and the trajectory's spread is what eq. 5 removes: far larger than eq. 5's spread over x_t draws
    assert traj_se.mean() * math.sqrt(64) > 3 * np.std(exact - exact.mean()) / 10


def test_bounds_lie_above_the_data_nll_and_iw_tightens_with_k(gaussian_bounds):
    truth = gaussian_bounds["truth"]
    exact = gaussian_bounds["exact"].bits_per_dim.numpy()
    log_w = gaussian_bounds["log_w"]
    iw = {k: importance_weighted_bound(log_w, k, D)[0].numpy() for k in (1, 4, 16, 64)}
    # E_data[bound] >= E_data[-log P_θ] >= E_data[-log P_data] (Gibbs): compare the averages over the same images
    gap_se = np.std(exact - truth, ddof=1) / math.sqrt(len(truth))
    assert exact.mean() - truth.mean() > 2 * gap_se
    means = [iw[k].mean() for k in (1, 4, 16, 64)]
    assert means[0] == pytest.approx(trajectory_bound(log_w, D)[0].mean().item(), rel=1e-12)  # K = 1 is eq. 3
    assert all(b <= a + 1e-9 for a, b in zip(means, means[1:])), means  # non-increasing in K
    assert means[-1] < means[0] - 0.01  # and it does tighten here
    assert truth.mean() - 2 * gap_se < means[-1] < exact.mean() + 2 * gap_se


def test_iw_bound_is_logsumexp_over_groups_in_float64():
    rng = np.random.default_rng(0)
    log_w = rng.normal(-800.0, 30.0, size=(3, 8))  # exp(-800) underflows even in float64: needs logsumexp
    bpd, se = importance_weighted_bound(torch.from_numpy(log_w), 4, 10)
    groups = log_w.reshape(3, 2, 4)
    expected = -(logsumexp(groups, axis=2) - math.log(4)) / (10 * math.log(2))
    np.testing.assert_allclose(bpd.numpy(), expected.mean(1), rtol=1e-13)
    np.testing.assert_allclose(se.numpy(), expected.std(1, ddof=1) / math.sqrt(2), rtol=1e-12)
    with pytest.raises(ValueError, match="must divide"):
        importance_weighted_bound(torch.from_numpy(log_w), 3, 10)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"got {bad}"):
            importance_weighted_bound(torch.from_numpy(log_w), bad, 10)


# ------------------------------------------------------------------ improved-diffusion's per-step formulas


def id_normal_kl(m1, lv1, m2, lv2):
    """improved_diffusion/losses.py normal_kl."""
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def id_discretized_log_likelihood(x, means, log_scales):
    """improved_diffusion/losses.py discretized_gaussian_log_likelihood (its tanh approximation of the CDF)."""

    def cdf(v):
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))

    inv = np.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv * (x - means + H)), cdf(inv * (x - means - H))
    return np.where(
        x < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))),
    )


class ImprovedDiffusion:
    """GaussianDiffusion's tables (improved_diffusion/gaussian_diffusion.py __init__), ε-prediction, fixed_small,
    clip_denoised=True: q_posterior_mean_variance, p_mean_variance and _vb_terms_bpd, in numpy float64."""

    def __init__(self, betas):
        self.betas = betas
        self.ac = np.cumprod(1.0 - betas)
        self.ac_prev = np.append(1.0, self.ac[:-1])
        self.post_var = betas * (1.0 - self.ac_prev) / (1.0 - self.ac)
        self.post_log_var = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = betas * np.sqrt(self.ac_prev) / (1.0 - self.ac)
        self.coef2 = (1.0 - self.ac_prev) * np.sqrt(1.0 - betas) / (1.0 - self.ac)

    def q_posterior(self, x0, xt, t):
        return self.coef1[t] * x0 + self.coef2[t] * xt, self.post_log_var[t]

    def p_mean_variance(self, eps, xt, t):
        x0 = np.clip(np.sqrt(1.0 / self.ac[t]) * xt - np.sqrt(1.0 / self.ac[t] - 1) * eps, -1, 1)
        return self.q_posterior(x0, xt, t)[0], self.post_log_var[t]

    def vb_terms_bpd(self, eps, x0, xt, t):
        true_mean, true_lv = self.q_posterior(x0, xt, t)
        mean, lv = self.p_mean_variance(eps, xt, t)
        if t == 0:
            return -id_discretized_log_likelihood(x0, mean, 0.5 * lv).mean() / math.log(2.0)
        return id_normal_kl(true_mean, true_lv, mean, lv).mean() / math.log(2.0)


def gauss_log_pdf(x, mean, log_var):
    return np.sum(-0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * np.exp(-log_var)))


def test_trajectory_weight_is_improved_diffusions_terms_summed_along_the_path():
    """log w of one trajectory = [log p(x_T) - log q(x_T | x_0)] + Σ_t [log p_θ(x_{t-1} | x_t) - log q(x_{t-1} | x_t,
    x_0)] + log p_θ(x_0 | x_1) (Bayes: q(x_{1:T} | x_0) = q(x_T | x_0) Π q(x_{t-1} | x_t, x_0)); each piece from
    improved-diffusion's formulas, the decoder with the exact CDF (theirs approximates it, compared separately)."""
    T = 30
    betas = paper.linear_betas(T, 1e-4, 0.02 * 1000 / T)
    scheduler = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.02 * 1000 / T)
    model = discrete_gaussian_model(betas)
    images = quantized_gaussian_images(2, seed=3)
    x0_t = images.double() / 127.5 - 1
    log_w = trajectory_log_weights(model, scheduler, x0_t, 1, generator=torch.manual_seed(5))
    gen, ref = torch.manual_seed(5), ImprovedDiffusion(betas)
    noises = [torch.randn((2, *SHAPE), generator=gen, dtype=torch.float32).double().numpy() for _ in range(T)]
    for n in range(2):
        x0 = x0_t[n].numpy()
        z, prev = [], x0
        for i in range(T):
            prev = math.sqrt(1 - betas[i]) * prev + math.sqrt(betas[i]) * noises[i][n]  # DDPM eq. 2
            z.append(prev)
        eps = [model(torch.from_numpy(z[i][None]).float(), torch.tensor([i])).double().numpy()[0] for i in range(T)]
        expected = gauss_log_pdf(z[-1], 0.0, 0.0) - gauss_log_pdf(
            z[-1], math.sqrt(ref.ac[-1]) * x0, math.log(1 - ref.ac[-1])
        )
        for i in range(1, T):
            mean, lv = ref.p_mean_variance(eps[i], z[i], i)
            true_mean, true_lv = ref.q_posterior(x0, z[i], i)
            expected += gauss_log_pdf(z[i - 1], mean, lv) - gauss_log_pdf(z[i - 1], true_mean, true_lv)
        mean, lv = ref.p_mean_variance(eps[0], z[0], 0)
        s = np.exp(0.5 * lv)
        lo, hi = np.where(x0 < -0.999, -np.inf, x0 - H), np.where(x0 > 0.999, np.inf, x0 + H)
        expected += np.sum(np.log(norm.cdf((hi - mean) / s) - norm.cdf((lo - mean) / s)))
        assert log_w[n, 0].item() == pytest.approx(expected, rel=1e-9, abs=1e-7)


def test_per_step_terms_match_improved_diffusions_vb_terms_bpd():
    T = 40
    betas = paper.linear_betas(T, 1e-4, 0.02 * 1000 / T)
    scheduler, ref = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.02 * 1000 / T), ImprovedDiffusion(betas)
    rng = np.random.default_rng(0)
    x0 = quantized_gaussian_images(1, seed=1).double().numpy() / 127.5 - 1
    for t in (0, 1, 7, T - 1):
        xt = math.sqrt(ref.ac[t]) * x0 + math.sqrt(1 - ref.ac[t]) * rng.standard_normal(x0.shape)
        eps = rng.standard_normal(x0.shape) * 0.5
        ours = scheduler.bound_terms(*(torch.from_numpy(a) for a in (eps, x0, xt)), torch.tensor([t]))
        ours_bpd = ours.sum().item() / (D * math.log(2))
        theirs = ref.vb_terms_bpd(eps, x0, xt, t)
        # the KL terms agree to float64 rounding; the decoder within their tanh approximation of Φ
        assert ours_bpd == pytest.approx(theirs, rel=1e-10 if t else 2e-3), t


def test_rate_distortion_is_cumulative_and_ends_at_the_bound():
    T = 50
    betas = paper.linear_betas(T, 1e-4, 0.02 * 1000 / T)
    scheduler = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.02 * 1000 / T)
    x0 = quantized_gaussian_images(3).double() / 127.5 - 1
    out = variational_bound(
        discrete_gaussian_model(betas), scheduler, x0, distortion=True, generator=torch.manual_seed(0)
    )
    rate, distortion = rate_distortion(out.terms_bpd, out.prior_bpd, out.distortion)
    assert rate.shape == distortion.shape == (3, T + 1)
    np.testing.assert_allclose(rate[:, 0].numpy(), out.prior_bpd.numpy())
    np.testing.assert_allclose(rate[:, -1].numpy(), out.bits_per_dim.numpy(), rtol=1e-12)
    assert torch.all(rate.diff(dim=1) >= 0)  # every KL term is >= 0
    assert torch.all(distortion[:, -1] == 0)
    # distortion at the top (x_{T-1}, nearly pure noise) is far larger than at the bottom (x_0 nearly known)
    assert torch.all(distortion[:, 0] > 5 * distortion[:, -2])
    # RMSE on [0, 255] of the clipped x̂_0 from x_t: recompute one entry by hand
    t = 10
    noise_free = out.distortion[:, t]
    assert torch.all((noise_free > 0) & (noise_free < 255))
    with pytest.raises(ValueError, match="exact bound"):
        variational_bound(discrete_gaussian_model(betas), scheduler, x0, num_timesteps=4, distortion=True)


# ------------------------------------------------------------------ the probability-flow ODE


def vp_alpha_bar(t, beta_min, beta_max):
    """ᾱ(t) = exp(-∫_0^t β) of the VP SDE with β(t) = β_min + t (β_max - β_min) (Song et al. eq. 11, 33)."""
    return math.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t * t))


class ContinuousOracle:
    """The optimal ε for a Gaussian mixture under the VP SDE, as the network is read (probability_flow docstring):
    asked at timestep input s = t (T-1), it returns -σ_i ∇ log p_t(x) with σ_i = sqrt(1 - ᾱ_i), i = floor(s)."""

    def __init__(self, T, beta_end, means, std, weights=None):
        self.T, self.betas = T, paper.linear_betas(T, 1e-4, beta_end)
        self.beta_min, self.beta_max = T * 1e-4, T * beta_end
        self.ac = paper.alphas_cumprod(self.betas)
        self.means, self.std = np.asarray(means, dtype=np.float64), std
        self.weights = np.full(len(self.means), 1 / len(self.means)) if weights is None else np.asarray(weights)

    def marginal(self, t):
        a = vp_alpha_bar(t, self.beta_min, self.beta_max)
        return math.sqrt(a) * self.means, a * self.std**2 + 1 - a

    def log_density(self, x, t):
        m, v = self.marginal(t)
        comp = np.log(self.weights) + np.sum(-0.5 * (np.log(2 * np.pi * v) + (x[None] - m) ** 2 / v), axis=1)
        return logsumexp(comp)

    def score(self, x, t):
        m, v = self.marginal(t)
        comp = np.log(self.weights) + np.sum(-0.5 * (x[None] - m) ** 2 / v, axis=1)
        r = np.exp(comp - logsumexp(comp))
        return -(r[:, None] * (x[None] - m)).sum(0) / v

    def __call__(self, x, labels):
        out = []
        for row, s in zip(x.detach().double().reshape(len(x), -1).numpy(), labels.tolist()):
            sigma = math.sqrt(1 - self.ac[min(int(math.floor(s)), self.T - 1)])
            out.append(-sigma * self.score(row, s / (self.T - 1)))
        # the model must stay differentiable in x: ε is affine for one Gaussian, so a linear map reproduces it
        return self._differentiable(x, labels, torch.from_numpy(np.stack(out)).reshape(x.shape))

    def _differentiable(self, x, labels, value):
        """value + J (x - x.detach()), with J the Jacobian of ε by central differences: gives autograd the same
        derivatives the closed form has (to ~1e-9), so the divergence modes can be checked."""
        x64 = x.detach().double().reshape(len(x), -1).numpy()
        jac = []
        for row, s in zip(x64, labels.tolist()):
            sigma = math.sqrt(1 - self.ac[min(int(math.floor(s)), self.T - 1)])
            cols = []
            for j in range(row.size):
                step = np.zeros_like(row)
                step[j] = 1e-5
                t = s / (self.T - 1)
                cols.append(-sigma * (self.score(row + step, t) - self.score(row - step, t)) / 2e-5)
            jac.append(np.stack(cols, axis=1))
        jac = torch.from_numpy(np.stack(jac)).to(x.dtype)
        delta = (x - x.detach()).reshape(len(x), -1, 1)
        return value.to(x.dtype) + (jac @ delta).reshape(x.shape)


def oracle_scheduler(oracle):
    return HFDDPMScheduler(num_train_timesteps=oracle.T, beta_end=float(oracle.betas[-1]))


def test_ode_likelihood_of_a_gaussian_is_the_flows_change_of_variables():
    """For Gaussian data the flow is affine per dimension, x(1) = m_1 + (s_1/s_ε)(x - m_ε), so the model's density
    with prior N(0, I) is log N(x(1); 0, I) + Σ log(s_1/s_ε), exactly."""
    mu = np.array([0.3, -0.4, 0.1, 0.6])
    oracle = ContinuousOracle(1000, 0.02, [mu], 0.25)
    x = torch.tensor([[0.5, -0.2, 0.0, 0.3], [-0.9, 0.1, 0.4, 0.8]], dtype=torch.float64).reshape(2, *SHAPE)
    out = ode_log_likelihood(oracle, oracle_scheduler(oracle), x, divergence="exact", eps=1e-5)
    m_e, v_e = oracle.marginal(1e-5)
    m_1, v_1 = oracle.marginal(1.0)
    for n in range(2):
        z = m_1[0] + math.sqrt(v_1 / v_e) * (x[n].reshape(-1).numpy() - m_e[0])
        expected = np.sum(norm.logpdf(z)) + D * 0.5 * math.log(v_1 / v_e)
        assert out.log_likelihood[n].item() == pytest.approx(expected, abs=2e-3)
    assert torch.all(out.num_function_evaluations > 10) and torch.all(out.standard_error == 0)
    # Rademacher probes give the trace of a diagonal Jacobian exactly: the same value for every probe, and the
    # exact mode's within the solver's tolerance (its steps differ: the model runs in float32 on other rows)
    rad = ode_log_likelihood(oracle, oracle_scheduler(oracle), x, num_probes=2, generator=torch.manual_seed(0))
    assert torch.all(rad.probe_log_likelihood[:, 0] == rad.probe_log_likelihood[:, 1])
    np.testing.assert_allclose(rad.log_likelihood.numpy(), out.log_likelihood.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def mixture():
    # β up to 0.04: ᾱ(1) = e^-20, so p_1 is N(0, I) to 1e-9 and log p_ε(x) itself is the oracle's value
    return ContinuousOracle(1000, 0.04, [[-0.4, 0.3], [0.5, -0.2]], 0.2)


def test_ode_likelihood_of_a_mixture_is_its_log_density(mixture):
    x = torch.tensor([[-0.3, 0.2], [0.45, -0.1], [0.0, 0.0]], dtype=torch.float64).reshape(3, 1, 1, 2)
    out = ode_log_likelihood(mixture, oracle_scheduler(mixture), x, divergence="exact")
    for n in range(3):
        expected = mixture.log_density(x[n].reshape(-1).numpy(), 1e-5)
        assert out.log_likelihood[n].item() == pytest.approx(expected, abs=2e-3)


def test_hutchinson_estimate_is_unbiased(mixture):
    x = torch.tensor([[0.1, -0.05]], dtype=torch.float64).reshape(1, 1, 1, 2)
    scheduler = oracle_scheduler(mixture)
    exact = ode_log_likelihood(mixture, scheduler, x, divergence="exact").log_likelihood.item()
    for kind in ("gaussian", "rademacher"):
        out = ode_log_likelihood(mixture, scheduler, x, divergence=kind, num_probes=24, generator=torch.manual_seed(3))
        se = out.standard_error.item()
        assert se > 0 and abs(out.log_likelihood.item() - exact) < 2 * se + 2e-3, (kind, out.log_likelihood, exact, se)


def test_ode_errors_name_the_image_t_and_tolerance(mixture):
    scheduler = oracle_scheduler(mixture)
    x = torch.zeros(2, 1, 1, 2, dtype=torch.float64)

    def nan_late(x, labels):
        out = mixture(x, labels)
        return out * float("nan") if labels[0] > 500 else out

    with pytest.raises(ODELikelihoodError, match=r"image 7 \(rtol=1e-05, atol=1e-05\).*non-finite value at t=0\.5"):
        ode_log_likelihood(nan_late, scheduler, x, divergence="exact", image_offset=7)
    with pytest.raises(ODELikelihoodError, match=r"image 0 \(rtol=1e-09.*max_evaluations=20.*stopped at t="):
        ode_log_likelihood(mixture, scheduler, x, divergence="exact", rtol=1e-9, max_evaluations=20)

    def wrong_shape(x, labels):
        return torch.zeros(len(x), 3, 1, 2, dtype=x.dtype)

    with pytest.raises(ValueError, match=r"shape \(2, 3, 1, 2\).*needs \(2, 1, 1, 2\)"):
        ode_log_likelihood(wrong_shape, scheduler, x, divergence="exact")
    with pytest.raises(ValueError, match="num_probes.*got 0"):
        ode_log_likelihood(mixture, scheduler, x, num_probes=0)
    with pytest.raises(ValueError, match="divergence='hutch'"):
        ode_log_likelihood(mixture, scheduler, x, divergence="hutch")
    with pytest.raises(ValueError, match="rtol must be a positive number, got -1"):
        ode_log_likelihood(mixture, scheduler, x, rtol=-1)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        dequantize(torch.zeros(1, 1, 2, 2))


def test_dequantization_stays_in_each_pixels_bin():
    images = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2).repeat(500, 1, 1, 1)
    y = dequantize(images, torch.manual_seed(0))
    k = images.double()
    assert torch.all(y >= 2 * k / 256 - 1) and torch.all(y < 2 * (k + 1) / 256 - 1)
    assert (y - (2 * k + 1) / 256 + 1).abs().mean().item() == pytest.approx(0.25 * 2 / 256, rel=0.1)  # E|u - ½| = ¼
