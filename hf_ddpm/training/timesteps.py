"""How training draws t: uniformly, or by importance sampling on the loss's second moment (Improved DDPM §3.3).

A sampler returns timesteps and the weights that keep the loss unbiased: E_{t~p}[w_t L_t] = E_{t~U}[L_t] with
w_t = 1 / (T p_t). Draws use the caller's generator, so they are reproducible and resume exactly.
"""

from __future__ import annotations

import math

import torch


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
