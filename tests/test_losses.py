"""Training objectives and the importance sampler of t (hf_ddpm.losses)."""

import math

import pytest
import torch

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.losses import HYBRID_VLB_WEIGHT, LossSecondMomentResampler, UniformSampler, training_losses

T = 50
SHAPE = (4, 1, 8, 8)


def make_scheduler(**kwargs):
    return HFDDPMScheduler(num_train_timesteps=T, beta_end=0.2, **{"clip_sample": False, **kwargs})


def batch(seed=0, channels_out=1):
    g = torch.Generator().manual_seed(seed)
    x_start = torch.randint(0, 256, SHAPE, generator=g).float() / 127.5 - 1.0
    noise = torch.randn(SHAPE, generator=g)
    timesteps = torch.tensor([0, 1, 17, T - 1])
    output = torch.randn(SHAPE[0], channels_out, *SHAPE[2:], generator=g).requires_grad_(True)
    return x_start, noise, timesteps, output


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_simple_loss_is_the_mse_to_the_prediction_target(prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type)
    x_start, noise, timesteps, output = batch()
    seen = {}

    def model(x_t, t):
        seen["x_t"] = x_t
        return output

    loss = training_losses(model, scheduler, x_start, noise, timesteps, "simple")["loss"]
    ac = scheduler.alphas_cumprod.float()[timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], ac.sqrt() * x_start + (1 - ac).sqrt() * noise, atol=1e-6)  # DDPM eq. 4
    target = {"epsilon": noise, "sample": x_start, "v_prediction": ac.sqrt() * noise - (1 - ac).sqrt() * x_start}
    expected = ((target[prediction_type] - output) ** 2).mean(dim=(1, 2, 3))  # DDPM eq. 14, per example
    assert loss.shape == (4,)
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("variance_type,channels_out", [("fixed_small", 1), ("fixed_large", 1), ("learned_range", 2)])
def test_vlb_loss_is_the_bound_term_in_bits_per_dim_times_T(variance_type, channels_out):
    scheduler = make_scheduler(variance_type=variance_type)
    x_start, noise, timesteps, output = batch(channels_out=channels_out)
    loss = training_losses(lambda x, t: output, scheduler, x_start, noise, timesteps, "vlb")["loss"]
    x_t = scheduler.add_noise(x_start, noise, timesteps)
    terms = scheduler.bound_terms(output.detach(), x_start, x_t, timesteps)  # nats per element; t=0: decoder NLL
    expected = T * terms.mean(dim=(1, 2, 3)) / math.log(2.0)
    assert torch.allclose(loss.detach(), expected.float(), rtol=1e-5)
    assert loss[0] > 0  # the decoder NLL of a random model


@pytest.mark.parametrize("config", [dict(clip_sample=True), dict(thresholding=True)])
def test_vlb_loss_never_clips_x0_whatever_the_scheduler_samples_with(config):
    """Training asks the sampling scheduler for an unclipped x̂_0 (Improved DDPM's clip_denoised=False) instead of
    building a second scheduler: the loss and its gradient equal those of a clip_sample=False scheduler."""
    x_start, noise, timesteps, _ = batch()
    output = (4.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    x_t = make_scheduler().add_noise(x_start, noise, timesteps)
    unclipped = make_scheduler(clip_sample=True).p_mean_variance(output.detach(), x_t, timesteps, clip_denoised=False)
    assert (unclipped[2].abs() > 1).any()  # the output sends x̂_0 outside [-1, 1]: clipping would matter
    sampling = HFDDPMScheduler(num_train_timesteps=T, beta_end=0.2, **config)
    losses = [training_losses(lambda x, t: output, s, x_start, noise, timesteps, "vlb")["loss"]
              for s in (sampling, make_scheduler())]  # fmt: skip
    grads = [torch.autograd.grad(loss.sum(), output)[0] for loss in losses]
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    x0_as_configured = sampling.p_mean_variance(output.detach(), x_t, timesteps)[2]
    assert x0_as_configured.abs().max() <= 1  # while sampling still clips (or thresholds)


def test_vlb_loss_averaged_over_all_t_is_the_bound_less_the_prior():
    """With t uniform, E_t[vlb loss] = Σ_t L_t in bits/dim: summing the per-t terms gives the same number."""
    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(3)
    x_start = (torch.randint(0, 256, (1, 1, 8, 8), generator=g).float() / 127.5 - 1.0).expand(T, -1, -1, -1)
    noise = torch.randn((T, 1, 8, 8), generator=g)
    output = torch.randn((T, 1, 8, 8), generator=g)
    timesteps = torch.arange(T)
    loss = training_losses(lambda x, t: output, scheduler, x_start, noise, timesteps, "vlb")["loss"]
    x_t = scheduler.add_noise(x_start, noise, timesteps)
    total_bits_per_dim = scheduler.bound_terms(output, x_start, x_t, timesteps).sum() / (64 * math.log(2.0))
    assert loss.mean().item() == pytest.approx(total_bits_per_dim.item(), rel=1e-5)


def test_hybrid_stops_the_mean_gradient_in_the_vlb_term():
    scheduler = make_scheduler(variance_type="learned_range")
    x_start, noise, timesteps, output = batch(channels_out=2)
    terms = training_losses(lambda x, t: output, scheduler, x_start, noise, timesteps, "hybrid")
    assert torch.allclose(terms["loss"], terms["mse"] + HYBRID_VLB_WEIGHT * terms["vlb"])
    (grad,) = torch.autograd.grad(terms["loss"].sum(), output)

    mean_only = output.detach()[:, :1].clone().requires_grad_(True)
    simple = ((noise - mean_only) ** 2).mean(dim=(1, 2, 3)).sum()
    (simple_grad,) = torch.autograd.grad(simple, mean_only)
    assert torch.allclose(grad[:, :1], simple_grad, atol=1e-7)  # the mean learns from L_simple alone

    variance_only = output.detach()[:, 1:].clone().requires_grad_(True)
    full = torch.cat([output.detach()[:, :1], variance_only], dim=1)
    vlb = training_losses(lambda x, t: full, scheduler, x_start, noise, timesteps, "vlb")["loss"]
    (vlb_grad,) = torch.autograd.grad(HYBRID_VLB_WEIGHT * vlb.sum(), variance_only)
    assert torch.allclose(grad[:, 1:], vlb_grad, rtol=1e-4, atol=1e-9)  # the variance learns from the vlb only
    assert vlb_grad.abs().sum() > 0


def test_vlb_with_learned_range_trains_the_mean_too():
    scheduler = make_scheduler(variance_type="learned_range")
    x_start, noise, timesteps, output = batch(channels_out=2)
    loss = training_losses(lambda x, t: output, scheduler, x_start, noise, timesteps, "vlb")["loss"]
    (grad,) = torch.autograd.grad(loss.sum(), output)
    assert grad[:, :1].abs().sum() > 0 and grad[:, 1:].abs().sum() > 0


def test_loss_errors_name_the_problem():
    x_start, noise, timesteps, output = batch()
    with pytest.raises(ValueError, match="learned_range"):
        training_losses(lambda x, t: output, make_scheduler(), x_start, noise, timesteps, "hybrid")
    with pytest.raises(ValueError, match="'simple', 'vlb', 'hybrid'"):
        training_losses(lambda x, t: output, make_scheduler(), x_start, noise, timesteps, "l1")
    with pytest.raises(ValueError, match="outputs 1 channels .* needs 2"):
        training_losses(
            lambda x, t: output, make_scheduler(variance_type="learned_range"), x_start, noise, timesteps, "vlb"
        )


def test_importance_sampler_is_uniform_until_every_t_has_a_full_history():
    sampler = LossSecondMomentResampler(T, history_per_term=10)
    uniform = UniformSampler(T)
    for t in range(T):  # 9 losses for every t, 10 for all but the last
        for _ in range(9 if t == T - 1 else 10):
            sampler.update(torch.tensor([t]), torch.tensor([float(t + 1)]))
    assert not sampler.warmed_up()
    assert torch.allclose(sampler.probabilities(), torch.full((T,), 1.0 / T, dtype=torch.float64))
    t_a, w_a = sampler.sample(64, torch.Generator().manual_seed(1), "cpu")
    t_b, w_b = uniform.sample(64, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(t_a, t_b) and torch.equal(w_a, torch.ones(64)) and torch.equal(w_b, torch.ones(64))

    sampler.update(torch.tensor([T - 1]), torch.tensor([float(T)]))
    assert sampler.warmed_up()
    p = sampler.probabilities()
    rms = torch.arange(1, T + 1, dtype=torch.float64)  # every loss at t was t + 1, so sqrt(E[L²]) = t + 1
    expected = rms / rms.sum() * (1 - sampler.uniform_prob) + sampler.uniform_prob / T
    assert torch.allclose(p, expected) and p.sum().item() == pytest.approx(1.0)


def test_importance_weights_keep_the_loss_unbiased():
    sampler = LossSecondMomentResampler(T, history_per_term=2)
    losses = torch.linspace(0.1, 5.0, T, dtype=torch.float64) ** 2
    for _ in range(2):
        sampler.update(torch.arange(T), losses)
    p = sampler.probabilities()
    t, w = sampler.sample(200_000, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(w.double(), 1.0 / (T * p[t]), rtol=1e-6)
    # Exactly: Σ_t p_t w_t L_t = (1/T) Σ_t L_t; by sampling: the weighted mean estimates the uniform mean.
    assert (p * (1.0 / (T * p)) * losses).sum().item() == pytest.approx(losses.mean().item())
    estimate = (w.double() * losses[t]).mean().item()
    assert estimate == pytest.approx(losses.mean().item(), rel=0.02)
    counts = torch.bincount(t, minlength=T).double() / len(t)
    assert torch.allclose(counts, p, atol=3e-3)  # t is drawn from p


def test_importance_sampler_keeps_the_newest_history_and_round_trips_its_state():
    sampler = LossSecondMomentResampler(3, history_per_term=2)
    sampler.update(torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert sampler.loss_history[0].tolist() == [2.0, 3.0] and sampler.loss_counts.tolist() == [2, 1, 0]
    other = LossSecondMomentResampler(3, history_per_term=2)
    other.load_state_dict(sampler.state_dict())
    assert torch.equal(other.loss_history, sampler.loss_history) and torch.equal(other.loss_counts, sampler.loss_counts)
    with pytest.raises(ValueError, match="another T"):
        LossSecondMomentResampler(4, history_per_term=2).load_state_dict(sampler.state_dict())
