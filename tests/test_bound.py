"""The variational bound (DDPM eq. 5) in bits/dim: closed forms, an independent term-by-term check, Monte Carlo."""

import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from scipy.stats import norm

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.bound import variational_bound

T = 40
SHAPE = (3, 4, 4)
D = int(np.prod(SHAPE))
# A point mass at x0 = C: a few pixel values, the two edge bins (-1 and +1, which are open) among them.
C_PIXELS = torch.tensor([0, 255, 128, 7, 200, 64], dtype=torch.uint8).repeat(8)[:D].reshape(1, *SHAPE)
C = C_PIXELS.double() / 127.5 - 1.0


def perfect_denoiser(scheduler, prediction_type):
    """The optimal model for data that is always C: it knows x_0 exactly, so it predicts ε or x_0 without error."""
    ac = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02 * 1000 / T, T)))

    def model(x_t, t):
        x0 = C.to(x_t.dtype).expand_as(x_t)
        if prediction_type == "sample":
            return x0
        a = ac[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()  # ε = (x_t - sqrt(ᾱ) x_0) / sqrt(1 - ᾱ), from DDPM eq. 4

    return model


def closed_form_bound_nats(variance_type):
    """The bound of the perfect denoiser on the point mass C, from the paper's definitions alone.

    L_T = KL(N(sqrt(ᾱ_T) C, 1 - ᾱ_T) || N(0, 1)). For t >= 1 the model's mean is the true posterior mean, so
    L_{t-1} = D · KL(N(0, β̃_t) || N(0, σ_t²)): zero for σ² = β̃ (fixed_small), positive for σ² = β (fixed_large).
    L_0: pixels sit at their bin centres, the decoder mean is C and its variance β̃_1, so each interior pixel costs
    -log(Φ(h/σ) - Φ(-h/σ)) and each edge pixel (open bin) -log Φ(h/σ), h = 1/255.
    """
    betas = np.linspace(1e-4, 0.02 * 1000 / T, T)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    beta_tilde = betas * (1 - ac_prev) / (1 - ac)
    c = C.numpy().ravel()
    prior = np.sum(0.5 * (-np.log(1 - ac[-1]) + (1 - ac[-1]) + ac[-1] * c**2 - 1))
    if variance_type == "fixed_small":
        kl = 0.0
    else:
        ratio = beta_tilde[1:] / betas[1:]
        kl = D * np.sum(0.5 * (-np.log(ratio) + ratio - 1))
    sigma = math.sqrt(beta_tilde[1])
    h = 1.0 / 255.0
    edge = np.abs(c) == 1.0
    interior_p = norm.cdf(h / sigma) - norm.cdf(-h / sigma)
    decoder = -(np.sum(~edge) * np.log(interior_p) + np.sum(edge) * norm.logcdf(h / sigma))
    return prior, kl, decoder


def make_scheduler(variance_type="fixed_small", prediction_type="epsilon", **kwargs):
    return HFDDPMScheduler(
        num_train_timesteps=T, beta_end=0.02 * 1000 / T, variance_type=variance_type,
        prediction_type=prediction_type, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_perfect_denoiser_on_a_point_mass_matches_closed_form(variance_type, prediction_type):
    scheduler = make_scheduler(variance_type, prediction_type)
    model = perfect_denoiser(scheduler, prediction_type)
    out = variational_bound(model, scheduler, C.repeat(2, 1, 1, 1), generator=torch.manual_seed(0))
    prior, kl, decoder = closed_form_bound_nats(variance_type)
    to_bpd = 1.0 / (D * math.log(2))
    tol = 1e-9 if prediction_type == "sample" else 5e-5  # the model predicts ε in float32
    np.testing.assert_allclose(out.prior_bpd.numpy(), prior * to_bpd, rtol=1e-9)
    np.testing.assert_allclose(out.decoder_bpd.numpy(), decoder * to_bpd, rtol=tol)
    np.testing.assert_allclose(out.terms_bpd[:, 1:].sum(1).numpy(), kl * to_bpd, atol=tol)
    np.testing.assert_allclose(out.bits_per_dim.numpy(), (prior + kl + decoder) * to_bpd, rtol=tol, atol=tol)
    # Theory: even a perfect model pays for the decoder's fixed variance β̃_1 (about 1.2 bits for interior
    # pixels here), and fixed_large pays KL(β̃ || β) > 0 on every step on top; fixed_small pays nothing there.
    if variance_type == "fixed_small":
        assert kl == 0.0 and 0.5 < out.bits_per_dim[0].item() < 2.0
    else:
        assert kl > 0.0 and out.bits_per_dim[0] > out.decoder_bpd[0] + out.prior_bpd[0] + 1.0


def test_monte_carlo_estimate_is_unbiased():
    """Mean of many K-term estimates lies within 3 standard errors of the exact (here deterministic) bound."""
    scheduler = make_scheduler("fixed_large", "sample")
    model = perfect_denoiser(scheduler, "sample")
    x = C
    exact = variational_bound(model, scheduler, x).bits_per_dim.item()
    gen = torch.manual_seed(1)
    runs = [variational_bound(model, scheduler, x, num_timesteps=4, generator=gen) for _ in range(400)]
    estimates = torch.tensor([r.bits_per_dim.item() for r in runs])
    mean, se = estimates.mean().item(), estimates.std().item() / math.sqrt(len(estimates))
    assert se > 0  # the estimate really is random (the KL terms differ across t)
    assert abs(mean - exact) < 3 * se, (mean, exact, se)
    # The reported standard error (strata collapsed in pairs) may overstate the estimator's spread, never
    # understate it: its square is, on average, at least the variance (0.8: sampling slack over 400 runs).
    reported_var = torch.tensor([r.standard_error.item() ** 2 for r in runs]).mean().item()
    assert 0.8 < reported_var / estimates.var().item() < 4.0, (reported_var, estimates.var().item())
    for r in runs:  # the estimate is the prior, the decoder and the weighted sampled terms, nothing else
        total = r.prior_bpd + r.decoder_bpd + (r.weights * r.terms_bpd).sum(dim=1)
        torch.testing.assert_close(r.bits_per_dim, total, rtol=1e-12, atol=1e-12)
        assert bool((r.timesteps.diff(dim=1) >= 0).all()), r.timesteps  # one per stratum, in order


def test_monte_carlo_with_zero_kl_terms_is_exact():
    scheduler = make_scheduler("fixed_small", "sample")
    model = perfect_denoiser(scheduler, "sample")
    x = C
    exact = variational_bound(model, scheduler, x)
    estimate = variational_bound(model, scheduler, x, num_timesteps=5, generator=torch.manual_seed(3))
    assert estimate.timesteps.shape == (1, 5) and bool((estimate.timesteps >= 1).all())
    torch.testing.assert_close(estimate.bits_per_dim, exact.bits_per_dim, rtol=1e-9, atol=1e-9)


def test_monte_carlo_with_a_single_timestep_is_the_prior_and_decoder_alone():
    """T = 1 has no KL terms to sample: the estimate is L_T + L_0 exactly, with no spread."""
    scheduler = HFDDPMScheduler(num_train_timesteps=1, beta_start=0.02, beta_end=0.02)
    model = lambda x_t, t: torch.zeros_like(x_t)  # predicts ε = 0
    exact = variational_bound(model, scheduler, C, generator=torch.manual_seed(0))
    estimate = variational_bound(model, scheduler, C, num_timesteps=8, generator=torch.manual_seed(0))
    assert estimate.terms_bpd.shape == estimate.timesteps.shape == estimate.weights.shape == (1, 0)
    torch.testing.assert_close(estimate.bits_per_dim, exact.bits_per_dim, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(estimate.bits_per_dim, estimate.prior_bpd + estimate.decoder_bpd)
    assert estimate.standard_error.item() == 0.0


def _independent_terms(scheduler_betas, x0, x_t, t, eps_hat):
    """One bound term in nats from the paper's formulas, in float64 numpy/scipy, sharing no code with hf_ddpm."""
    betas = scheduler_betas
    ac = np.cumprod(1 - betas)
    a_t, a_prev = ac[t], (ac[t - 1] if t > 0 else 1.0)
    x0_hat = np.clip((x_t - np.sqrt(1 - a_t) * eps_hat) / np.sqrt(a_t), -1, 1)  # eq. 15 inverted, clipped
    coef_x0 = np.sqrt(a_prev) * betas[t] / (1 - a_t)  # eq. 7
    coef_xt = np.sqrt(1 - betas[t]) * (1 - a_prev) / (1 - a_t)
    model_mean = coef_x0 * x0_hat + coef_xt * x_t
    beta_tilde = betas * (1 - np.concatenate([[1.0], ac[:-1]])) / (1 - ac)
    var = beta_tilde[t] if t > 0 else beta_tilde[1]  # fixed_small, clipped at t = 0
    if t == 0:
        h = 1 / 255
        lo = np.where(x0 < -0.999, -np.inf, x0 - h)
        hi = np.where(x0 > 0.999, np.inf, x0 + h)
        s = np.sqrt(var)
        p = norm.cdf((hi - model_mean) / s) - norm.cdf((lo - model_mean) / s)
        return -np.sum(np.log(p))
    true_mean = coef_x0 * x0 + coef_xt * x_t
    return np.sum(0.5 * (np.log(var / beta_tilde[t]) + beta_tilde[t] / var + (true_mean - model_mean) ** 2 / var - 1))


def test_exact_bound_of_a_tiny_unet_equals_a_term_by_term_computation():
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny")).eval()
    scheduler = HFDDPMScheduler(num_train_timesteps=12, beta_end=0.2)
    calls = []

    def spy(x_t, t):
        out = unet(x_t, t).sample
        calls.append((x_t.double().numpy(), t.numpy(), out.double().numpy()))
        return out

    pixels = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.manual_seed(1), dtype=torch.uint8)
    x0 = pixels.float() / 127.5 - 1
    out = variational_bound(spy, scheduler, x0, batch_size=7, generator=torch.manual_seed(2))
    assert out.terms_bpd.shape == (3, 12)

    betas = np.linspace(1e-4, 0.2, 12)
    x0_64 = pixels.double().numpy() / 127.5 - 1
    flat_terms = []
    for x_t, ts, eps in calls:  # the pairs run image-major: image 0 at t = 0..11, then image 1, ...
        for x_t_i, t_i, eps_i in zip(x_t, ts, eps, strict=True):
            n = len(flat_terms) // 12
            flat_terms.append(_independent_terms(betas, x0_64[n], x_t_i, int(t_i), eps_i))
    expected = np.array(flat_terms).reshape(3, 12) / (192 * math.log(2))  # D = 3·8·8
    np.testing.assert_allclose(out.terms_bpd.numpy(), expected, rtol=2e-5)
    ac_last = np.prod(1 - betas)
    prior = 0.5 * (-np.log(1 - ac_last) + (1 - ac_last) + ac_last * x0_64**2 - 1)
    total = prior.reshape(3, -1).sum(1) / (192 * math.log(2)) + expected.sum(1)
    np.testing.assert_allclose(out.bits_per_dim.numpy(), total, rtol=2e-5)


def test_pipeline_bits_per_dim_accepts_arrays_tensors_and_pil_alike():
    torch.manual_seed(0)
    pipe = HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=10))
    pixels = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.manual_seed(1), dtype=torch.uint8)
    from_tensor = pipe.bits_per_dim(pixels, generator=torch.manual_seed(5))
    from_numpy = pipe.bits_per_dim(pixels.numpy(), generator=torch.manual_seed(5))
    pil = [pipe.numpy_to_pil(p.permute(1, 2, 0).numpy() / 255.0)[0] for p in pixels]  # uint8 round trip is exact
    from_pil = pipe.bits_per_dim(pil, generator=torch.manual_seed(5))
    torch.testing.assert_close(from_tensor.bits_per_dim, from_numpy.bits_per_dim)
    torch.testing.assert_close(from_tensor.bits_per_dim, from_pil.bits_per_dim)
    mc = pipe.bits_per_dim(pixels, num_timesteps=4, generator=torch.manual_seed(5))
    assert mc.terms_bpd.shape == (2, 4) and mc.bits_per_dim.shape == (2,)
    assert torch.isfinite(mc.bits_per_dim).all() and (mc.standard_error > 0).all()


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(2, 3, 8, 8), "uint8"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), r"shape \(N, 3, 8, 8\)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), r"got \(2, 1, 8, 8\)"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), r"\(2, 3, 16, 16\)"),
        ([], "non-empty list of PIL"),
    ],
)
def test_bits_per_dim_rejects_bad_images(images, match):
    pipe = HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=10))
    with pytest.raises(ValueError, match=match):
        pipe.bits_per_dim(images)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bound_rejects_bad_num_timesteps(bad):
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="num_timesteps must be None"):
        variational_bound(perfect_denoiser(scheduler, "epsilon"), scheduler, C.float(), num_timesteps=bad)
