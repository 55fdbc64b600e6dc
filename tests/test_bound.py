"""The variational bound (DDPM eq. 5) in bits/dim (hf_ddpm/bound.py): closed forms, an independent term-by-term
check, and the K-term Monte Carlo estimate: the proposal, the strata, unbiasedness and the collapsed-strata standard
error, checked on term profiles shaped like a trained model's (most of Σ L_{t-1} in the first timesteps)."""

import math

import closed_forms as paper
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.bound import collapsed_strata_stderr, proposal, stratified_draws, variational_bound

T = 40
SHAPE = (3, 4, 4)
D = int(np.prod(SHAPE))
# A point mass at x0 = C: a few pixel values, the two edge bins (-1 and +1, which are open) among them.
C_PIXELS = torch.tensor([0, 255, 128, 7, 200, 64], dtype=torch.uint8).repeat(8)[:D].reshape(1, *SHAPE)
C = C_PIXELS.double() / 127.5 - 1.0
BETAS = paper.linear_betas(T, 1e-4, 0.02 * 1000 / T)  # the paper's linear schedule scaled to T (make_scheduler)


def perfect_denoiser(scheduler, prediction_type):
    """The optimal model for data that is always C: it knows x_0 exactly, so it predicts ε or x_0 without error."""
    ac = torch.from_numpy(paper.alphas_cumprod(BETAS))

    def model(x_t, t):
        x0 = C.to(x_t.dtype).expand_as(x_t)
        if prediction_type == "sample":
            return x0
        a = ac[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()  # ε = (x_t - sqrt(ᾱ) x_0) / sqrt(1 - ᾱ), from DDPM eq. 4

    return model


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
    prior, kl, decoder = paper.point_mass_bound_nats(BETAS, C.numpy(), variance_type)
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

    betas = paper.linear_betas(12, 1e-4, 0.2)
    x0_64 = pixels.double().numpy() / 127.5 - 1
    flat_terms = []
    for x_t, ts, eps in calls:  # the pairs run image-major: image 0 at t = 0..11, then image 1, ...
        for x_t_i, t_i, eps_i in zip(x_t, ts, eps, strict=True):
            n = len(flat_terms) // 12
            flat_terms.append(paper.fixed_small_bound_term(betas, x0_64[n], x_t_i, int(t_i), eps_i))
    expected = np.array(flat_terms).reshape(3, 12) / (192 * math.log(2))  # D = 3·8·8
    np.testing.assert_allclose(out.terms_bpd.numpy(), expected, rtol=2e-5)
    ac_last = np.prod(1 - betas)
    prior = paper.prior_kl(ac_last, x0_64)
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


# ---------------------------------------------------------------- the Monte Carlo estimate's draws and standard error

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
