"""The coefficients of a diffusion chain, named as in the paper, and the timestep subsequences that respace it.

A chain visits some timesteps of the training chain t = 0 .. T-1: all of them (the training chain, ascending) or a
kept subsequence S_0 < ... < S_{K-1} (a respaced chain, visited by `step` in descending order). Improved DDPM
(section 4) shows that every quantity of the reverse process follows from ᾱ alone: β'_k = 1 - ᾱ_{S_k} / ᾱ_{S_{k-1}},
then the posterior. Row i of every table belongs to `timesteps[i]`, in the order the chain was given. All tables
are float64; `at` hands rows out in the caller's dtype and device, cached so a sampling loop does no host-to-device
copies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

from .schedules import alphas_cumprod_from_betas, betas_from_alphas_cumprod, check_choice

TimestepSpacing = Literal["linspace", "leading", "trailing"]
TIMESTEP_SPACINGS = get_args(TimestepSpacing)


@dataclass(frozen=True, eq=False)
class Chain:
    """Per-step coefficients of DDPM eq. 4, 6, 7 (float64 numpy arrays, or tensors from `on`); row i ↔ timesteps[i].

    Respaced, β is β'_k and ᾱ_{t-1} is ᾱ of the previous kept timestep (Improved DDPM section 4).
    """

    timesteps: np.ndarray  # the training-chain timestep of each row
    beta: np.ndarray  # β_t
    alpha_bar: np.ndarray  # ᾱ_t = Π_{s<=t} (1 - β_s) (eq. 4)
    sqrt_alpha_bar: np.ndarray  # the mean gain of q(x_t | x_0) (eq. 4)
    sqrt_one_minus_alpha_bar: np.ndarray  # its standard deviation
    log_one_minus_alpha_bar: np.ndarray  # its log-variance
    beta_tilde: np.ndarray  # β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t, the posterior variance (eq. 7)
    # β̃_0 = 0: its log is clipped to log β̃_1, as in the DDPM code (only the decoder at t = 0 uses it).
    log_beta_tilde_clipped: np.ndarray
    # fixed_large: σ² = β_t, with β̃_1 at t = 0 so the decoder likelihood stays finite (DDPM code).
    log_beta_clipped: np.ndarray
    # learned_range: the upper end log β_t is not clipped at t = 0 (Improved DDPM code: np.log(betas)).
    log_beta: np.ndarray
    mu_tilde_coef_x0: np.ndarray  # μ̃_t = mu_tilde_coef_x0 · x_0 + mu_tilde_coef_xt · x_t (eq. 7)
    mu_tilde_coef_xt: np.ndarray
    _on: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def of(cls, betas: np.ndarray, timesteps=None) -> Chain:
        """The chain of the training schedule `betas` (β_0 .. β_{T-1}) that visits `timesteps` (distinct, in any
        order; all T ascending when None). β is derived once: a kept step with no timestep skipped before it keeps
        the schedule's β_t exactly; a respaced step takes β'_k = 1 - ᾱ_{S_k} / ᾱ_{S_{k-1}}."""
        betas = np.asarray(betas, dtype=np.float64)
        order = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
        kept = np.sort(order)  # S_0 < ... < S_{K-1}
        ac = alphas_cumprod_from_betas(betas)[kept]
        ac_prev = np.concatenate([[1.0], ac[:-1]])  # ᾱ_{t-1}, with ᾱ_{-1} = 1
        consecutive = np.diff(kept, prepend=-1) == 1
        beta = np.where(consecutive, betas[kept], betas_from_alphas_cumprod(ac))  # Improved DDPM section 4
        posterior_variance = beta * (1.0 - ac_prev) / (1.0 - ac)  # β̃_t, DDPM eq. 7
        first = posterior_variance[1] if len(ac) > 1 else beta[0]
        ascending = cls(
            timesteps=kept,
            beta=beta,
            alpha_bar=ac,
            sqrt_alpha_bar=np.sqrt(ac),
            sqrt_one_minus_alpha_bar=np.sqrt(1.0 - ac),
            log_one_minus_alpha_bar=np.log(1.0 - ac),
            beta_tilde=posterior_variance,
            log_beta_tilde_clipped=np.log(np.concatenate([[first], posterior_variance[1:]])),
            log_beta_clipped=np.log(np.concatenate([[first], beta[1:]])),
            log_beta=np.log(beta),
            mu_tilde_coef_x0=beta * np.sqrt(ac_prev) / (1.0 - ac),
            mu_tilde_coef_xt=(1.0 - ac_prev) * np.sqrt(1.0 - beta) / (1.0 - ac),
        )
        rows = np.searchsorted(kept, order)  # back into the order given
        return cls(**{name: value[rows] for name, value in ascending._tables().items()})

    def _tables(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __len__(self) -> int:
        return len(self.timesteps)

    def on(self, device: torch.device, dtype: torch.dtype) -> Chain:
        """This chain as tensors on `device`: float64 for float64 callers, float32 otherwise (cached)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (torch.device(device), dtype)
        if key not in self._on:
            self._on[key] = Chain(**{k: torch.from_numpy(v).to(device, dtype) for k, v in self._tables().items()})
        return self._on[key]

    def at(self, index, like: torch.Tensor) -> ChainRows:
        """Rows `index` of the tables, shaped to broadcast against `like` (B, C, H, W), in its dtype and device.

        `index` is an int (one row: 0-d tensors) or a (B,) tensor of rows (shape (B, 1, 1, 1)).
        """
        return ChainRows(self.on(like.device, like.dtype), index, like)


class ChainRows:
    """Some rows of a chain's tables, read by the same names (`rows.sqrt_alpha_bar`); each table gathered on first use."""

    def __init__(self, tables: Chain, index, like: torch.Tensor):
        self._tables = tables
        if isinstance(index, int):
            self._index, self._shape = index, ()
        else:
            self._index = index.to(like.device).long().reshape(-1)
            self._shape = (-1,) + (1,) * (like.dim() - 1)

    def __getattr__(self, name: str) -> torch.Tensor:
        value = getattr(self._tables, name)[self._index].reshape(self._shape)
        setattr(self, name, value)  # later reads skip __getattr__
        return value


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps, spacing: TimestepSpacing, steps_offset: int = 0
) -> np.ndarray:
    """S distinct timesteps in [0, T-1], descending, chosen as diffusers' `timestep_spacing` names them
    (Lin et al. 2023, Table 2). Unlike diffusers, `trailing` never yields timestep -1. `linspace` is Improved DDPM's
    respacing (at its paper's counts; hf_ddpm.evaluation.steps); `leading`, diffusers' default, starts below
    T-1 (980 for 50 of 1000), so its chain starts from x_980 drawn as if it were x_T.

    Worked example, T = 10, S = 3: linspace → [9, 4, 0]; leading → [6, 3, 0]; trailing → [9, 6, 2].
    """
    num_train = num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an integer in [1, {num_train}], got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is out of range: it must lie in [1, {num_train}] "
            f"(num_train_timesteps={num_train})"
        )
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    steps = int(num_inference_steps)
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        timesteps = (np.arange(steps) * (num_train // steps))[::-1].astype(np.int64) + steps_offset
    else:  # trailing
        # t_k = round(T - k·T/S) - 1 for k = 0 .. S-1, the last one >= round(T/S) - 1 >= 0. The values come from
        # np.arange as in diffusers, whose float stepping decides ties (T = 1000, S = 48: 1000 - 3·T/S = 937.5 comes
        # out as 937.4999999999999 → 937), so the timesteps are diffusers' own; np.arange can overshoot by one value
        # near 0 (which becomes -1): keep the first S.
        timesteps = np.round(np.arange(num_train, 0, -num_train / steps))[:steps].astype(np.int64) - 1
    if timesteps[0] >= num_train or timesteps[-1] < 0:
        raise ValueError(
            f"timesteps {timesteps[[0, -1]].tolist()} fall outside [0, {num_train - 1}] "
            f"(steps_offset={steps_offset}); lower steps_offset"
        )
    return timesteps
