"""Training objectives: DDPM's simple loss (eq. 14), the variational bound (eq. 5) and Improved DDPM's hybrid; and
how training draws t: uniformly, or by importance sampling on the loss's second moment (Improved DDPM §3.3).

`training_losses` returns per-example losses (B,); the training loop weights and averages them. The diffusion
quantities come from the scheduler (`add_noise`, `get_velocity`, `bound_terms`), never from its tables directly.
A sampler of t returns timesteps and the weights that keep the loss unbiased: E_{t~p}[w_t L_t] = E_{t~U}[L_t] with
w_t = 1 / (T p_t). Draws use the caller's generator, so they are reproducible and resume exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch

from .scheduler import model_output_channels
from .schedules import check_choice

LossType = Literal["simple", "vlb", "hybrid"]
LOSS_TYPES = get_args(LossType)
"""simple: ‖target - model‖² (DDPM eq. 14); vlb: the bound's terms (DDPM eq. 5);
hybrid: simple + λ·vlb with the mean's gradient stopped in the vlb term (Improved DDPM section 3.1)."""

HYBRID_VLB_WEIGHT = 0.001  # λ of Improved DDPM (section 3.1): L_hybrid = L_simple + λ L_vlb


def default_variance_type(loss: str) -> str:
    """A new model's variance_type when --variance_type is not given: learned_range for --loss hybrid, the only
    variance it can train (Improved DDPM section 3.1), else DDPM's fixed_small (β̃_t, DDPM section 3.2)."""
    return "learned_range" if loss == "hybrid" else "fixed_small"


def check_objective(loss_type: str, variance_type: str, source: str = "the scheduler") -> None:
    """The one rule tying the loss to the reverse variance, for every caller (training's flags, a pretrained
    scheduler, `training_losses`): only the vlb term trains Σ_θ, so hybrid needs learned_range (Improved DDPM
    section 3.1), and simple with learned_range would leave the variance channels untrained. `source` says where
    variance_type came from, for the message."""
    if loss_type == "hybrid" and variance_type != "learned_range":
        raise ValueError(
            f"--loss hybrid needs variance_type learned_range; {source} has {variance_type!r} "
            "(the vlb term is what trains the variance; use --loss simple for a fixed variance)"
        )
    if loss_type == "simple" and variance_type == "learned_range":
        raise ValueError(
            f"variance_type learned_range ({source}) with --loss simple leaves the variance channels untrained; "
            "use --loss hybrid (Improved DDPM) or --loss vlb"
        )


def _mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def simple_target(scheduler, x_start: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network regresses: ε (DDPM eq. 14), x_0, or v (Salimans & Ho 2022), per `prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x_start
    if kind == "v_prediction":
        return scheduler.get_velocity(x_start, noise, timesteps)
    raise ValueError(f"prediction_type={kind!r} has no simple-loss target; use 'epsilon', 'sample' or 'v_prediction'")


def vlb_term_bits(scheduler, model_output, x_start, x_t, timesteps) -> torch.Tensor:
    """T · L_t in bits/dim per example (B,): an unbiased estimate of Σ_t L_t (the bound less the constant L_T) when
    t is uniform on {0 .. T-1}. L_0 is the decoder NLL (eq. 13), L_{t>0} the KL of eq. 5 (`scheduler.bound_terms`),
    with x̂_0 unclipped: clipping stops the bound's gradient wherever x̂_0 leaves [-1, 1] (Improved DDPM trains with
    clip_denoised=False).

    With T = 1000 this is Improved DDPM's `vb * num_timesteps / 1000` exactly: the hybrid loss matches theirs.
    """
    terms = scheduler.bound_terms(model_output, x_start, x_t, timesteps, clip_denoised=False)
    nats = _mean_over_dims(terms)  # per dimension
    return scheduler.config.num_train_timesteps * nats / math.log(2.0)


def training_losses(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    loss_type: LossType = "simple",
) -> dict[str, torch.Tensor]:
    """Per-example losses (B,) at x_t ~ q(x_t | x_0) (DDPM eq. 4) for data x_start (B, C, H, W) in [-1, 1].

    model_fn(x_t, t) -> (B, C, H, W), or (B, 2C, H, W) for `learned_range` (mean channels first, then v).
    Returns {"loss"} plus its parts {"mse"} and/or {"vlb"}. The vlb term never clips x̂_0, whatever the
    scheduler's `clip_sample` (see `vlb_term_bits`), so the scheduler that samples also trains.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_objective(loss_type, scheduler.config.variance_type)
    learned = scheduler.config.variance_type == "learned_range"
    x_t = scheduler.add_noise(x_start, noise, timesteps)  # DDPM eq. 4
    output = model_fn(x_t, timesteps).float()
    channels = x_start.shape[1]
    if output.shape[1] != model_output_channels(channels, learned):
        raise ValueError(
            f"the model outputs {output.shape[1]} channels for {channels}-channel data; "
            f"variance_type={scheduler.config.variance_type!r} needs {model_output_channels(channels, learned)}"
        )
    mean_output = output[:, :channels]
    terms = {}
    if loss_type in ("simple", "hybrid"):
        target = simple_target(scheduler, x_start, noise, timesteps)
        terms["mse"] = _mean_over_dims((target.float() - mean_output) ** 2)  # DDPM eq. 14
    if loss_type == "vlb":
        terms["vlb"] = vlb_term_bits(scheduler, output, x_start, x_t, timesteps)
    elif loss_type == "hybrid":
        # Improved DDPM section 3.1: the vlb term trains only the variance; the mean is learned from L_simple.
        frozen = torch.cat([mean_output.detach(), output[:, channels:]], dim=1)
        terms["vlb"] = vlb_term_bits(scheduler, frozen, x_start, x_t, timesteps)
    if loss_type == "simple":
        terms["loss"] = terms["mse"]
    elif loss_type == "vlb":
        terms["loss"] = terms["vlb"]
    else:
        terms["loss"] = terms["mse"] + HYBRID_VLB_WEIGHT * terms["vlb"]
    return terms


# ------------------------------------------------------------------------------------------------ sampling t


class UniformSampler:
    """t ~ U{0 .. T-1}, weight 1 (DDPM Algorithm 1)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)
        return t, torch.ones(batch_size, device=device)


class LossSecondMomentResampler:
    """Improved DDPM's `LossSecondMomentResampler`: p_t ∝ sqrt(E[L_t²]) over the last `history_per_term` losses at
    each t, mixed with `uniform_prob` of the uniform distribution; uniform until every t has a full history.

    Every process must call `update` with the same (gathered) losses so that all replicas sample alike.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def probabilities(self) -> torch.Tensor:
        """p_t (T,), float64."""
        if not self.warmed_up():
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        weights = self.loss_history.pow(2).mean(dim=1).sqrt()
        weights = weights / weights.sum()
        return weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.warmed_up():  # the uniform draw itself, so that a run is unchanged until the history is full
            return UniformSampler(self.num_timesteps).sample(batch_size, generator, device)
        p = self.probabilities()
        t = torch.multinomial(p.to(device, torch.float32), batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p.to(device)[t])  # w_t = 1 / (T p_t): unbiased reweighting
        return t, weights.float()

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the per-example losses at `timesteps` (keeping the newest `history_per_term` per t). A NaN or inf
        loss is not recorded: it would make the sampling probabilities NaN for good (see --on_nan)."""
        for t, loss in zip(timesteps.tolist(), losses.detach().double().cpu().tolist()):
            if not math.isfinite(loss):
                continue
            count = int(self.loss_counts[t])
            if count == self.history_per_term:
                self.loss_history[t, :-1] = self.loss_history[t, 1:].clone()
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, count] = loss
                self.loss_counts[t] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["loss_history"].shape) != tuple(self.loss_history.shape):
            raise ValueError(
                f"importance-sampling history has shape {tuple(state['loss_history'].shape)}, expected "
                f"{tuple(self.loss_history.shape)} (num_train_timesteps x history): the checkpoint is from another T"
            )
        self.loss_history = state["loss_history"].to(torch.float64).clone()
        self.loss_counts = state["loss_counts"].to(torch.long).clone()
