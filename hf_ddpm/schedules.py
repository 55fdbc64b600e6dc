"""β schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I) (DDPM eq. 2).

Pure functions of float64 numpy arrays; indices t = 0 .. T-1 as in diffusers. Every schedule passes through
`check_betas`, so a bad schedule fails here with a message that names the offending value. `named_betas` is the
registry from a config's `beta_schedule` name to its β (as improved-diffusion's `get_named_beta_schedule`).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]  # diffusers' names
BETA_SCHEDULES = get_args(BetaSchedule)
SCHEDULE_ALIASES = {"cosine": "squaredcos_cap_v2"}  # Improved DDPM's name for diffusers' squaredcos_cap_v2

# DDPM (section 4): T = 1000, β linear from 1e-4 to 0.02.
PAPER_BETA_START = 1e-4
PAPER_BETA_END = 0.02
PAPER_NUM_TIMESTEPS = 1000


def paper_linear_endpoints(num_train_timesteps: int) -> tuple[float, float]:
    """(beta_start, beta_end) of the paper's linear schedule for any T.

    Improved DDPM (appendix, `get_named_beta_schedule`) scales the DDPM endpoints by 1000 / T so that the total noise
    stays the same when T changes. Write the result into the scheduler config (`beta_start`, `beta_end`): a saved
    config then means the same schedule to diffusers' `DDPMScheduler` and to `HFDDPMScheduler`.
    """
    _check_num_timesteps(num_train_timesteps)
    scale = PAPER_NUM_TIMESTEPS / num_train_timesteps
    return PAPER_BETA_START * scale, PAPER_BETA_END * scale


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """β_t linear from `beta_start` to `beta_end` (DDPM section 4; diffusers' `linear`)."""
    _check_num_timesteps(num_train_timesteps)
    return check_betas(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """sqrt(β_t) linear (diffusers' `scaled_linear`, used by latent diffusion); kept so its configs load."""
    _check_num_timesteps(num_train_timesteps)
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=np.float64) ** 2
    return check_betas(betas)


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM cosine schedule (eq. 17): ᾱ(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2).

    β_t = 1 - ᾱ(t+1)/ᾱ(t), capped at `max_beta` = 0.999 to avoid the singularity at t = T (section 3.2).
    diffusers calls this schedule `squaredcos_cap_v2`.
    """
    _check_num_timesteps(num_train_timesteps)
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    return check_betas(betas)


def sigmoid_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """β_t = beta_start + (beta_end - beta_start) · sigmoid(u_t), u_t linear in [-6, 6] (GeoDiff; diffusers' `sigmoid`)."""
    _check_num_timesteps(num_train_timesteps)
    u = np.linspace(-6.0, 6.0, num_train_timesteps, dtype=np.float64)
    return check_betas(beta_start + (beta_end - beta_start) / (1.0 + np.exp(-u)))


def named_betas(name: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """β_0 .. β_{T-1} of the schedule a config names (`BETA_SCHEDULES` or an alias); the cosine schedule has no
    endpoints and ignores `beta_start` and `beta_end`, as diffusers' `squaredcos_cap_v2` does."""
    check_choice("beta_schedule", name, BETA_SCHEDULES + tuple(SCHEDULE_ALIASES))
    name = SCHEDULE_ALIASES.get(name, name)
    if name == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    from_endpoints = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "sigmoid": sigmoid_betas}
    return from_endpoints[name](num_train_timesteps, beta_start, beta_end)


def check_betas(betas) -> np.ndarray:
    """Return `betas` as float64 after checking 0 < β_t < 1 for every t (so ᾱ_t is positive and decreasing)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
    bad = np.flatnonzero(~((betas > 0.0) & (betas < 1.0)))
    if bad.size:
        t = int(bad[0])
        raise ValueError(
            f"beta at timestep {t} is {float(betas[t])!r}; every beta must lie in the open interval (0, 1) so that "
            "alphas_cumprod is positive and strictly decreasing"
        )
    return betas


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = Π_{s<=t} (1 - β_s) (DDPM eq. 4), in float64."""
    return np.cumprod(1.0 - check_betas(betas))


def betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Inverse of `alphas_cumprod_from_betas`: β_t = 1 - ᾱ_t / ᾱ_{t-1} with ᾱ_{-1} = 1.

    Used for respacing (Improved DDPM section 4): for kept timesteps S_k, β'_k = 1 - ᾱ_{S_k} / ᾱ_{S_{k-1}}.
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    previous = np.concatenate([[1.0], ac[:-1]])
    return check_betas(1.0 - ac / previous)


def check_positive_int(value, name: str) -> int:
    """`value` if an int (not bool) >= 1, else a ValueError naming it: the one check of counts."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_choice(name: str, value, allowed) -> None:
    """A ValueError naming `value` and the `allowed` ones unless it is one of them: the one check of options."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}")


def _check_num_timesteps(num_train_timesteps) -> None:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)):
        check_positive_int(num_train_timesteps, "num_train_timesteps")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
