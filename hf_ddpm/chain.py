"""Coefficient tables of a diffusion chain, and the timestep subsequences that respace it.

A chain is given by its ᾱ in ascending time order: the full training chain (ᾱ_0 .. ᾱ_{T-1}) or a respaced one
(ᾱ_{S_0} .. ᾱ_{S_{K-1}} for kept timesteps S_0 < ... < S_{K-1}). Improved DDPM (section 4) shows that every
quantity of the reverse process follows from ᾱ alone: β'_k = 1 - ᾱ_{S_k} / ᾱ_{S_{k-1}}, then the posterior.
All tables are float64; `gather` hands them out in the caller's dtype and device, cached so a sampling loop does
no host-to-device copies.
"""

from __future__ import annotations

import numpy as np
import torch


class ChainTables:
    """Per-step coefficients of DDPM eq. 4, 6, 7 for one chain (row k ↔ the k-th smallest kept timestep)."""

    def __init__(self, tables: dict[str, np.ndarray]):
        self.tables = tables
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray) -> ChainTables:
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        ac_prev = np.concatenate([[1.0], ac[:-1]])  # ᾱ_{t-1}, with ᾱ_{-1} = 1
        betas = 1.0 - ac / ac_prev  # β'_k (Improved DDPM section 4); the original β_t on the full chain
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # β̃_t, DDPM eq. 7
        # β̃_0 = 0: its log is clipped to log β̃_1, as in the DDPM code (only the decoder at t = 0 uses it).
        first = posterior_variance[1] if len(ac) > 1 else betas[0]
        tables = {
            "betas": betas,
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.concatenate([[first], posterior_variance[1:]])),
            # fixed_large: σ² = β_t, with β̃_1 at t = 0 so the decoder likelihood stays finite (DDPM code).
            "log_betas_clipped": np.log(np.concatenate([[first], betas[1:]])),
            # learned_range: the upper end log β_t is not clipped at t = 0 (Improved DDPM code: np.log(betas)).
            "log_betas": np.log(betas),
            # μ̃_t = coef_x0 · x_0 + coef_xt · x_t (DDPM eq. 7)
            "posterior_coef_x0": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_coef_xt": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        }
        return cls(tables)

    def __len__(self) -> int:
        return len(self.tables["alphas_cumprod"])

    def on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """All tables as tensors on `device`: float64 for float64 callers, float32 otherwise."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = {k: torch.from_numpy(v).to(dtype).to(device) for k, v in self.tables.items()}
        return self._cache[key]

    def gather(self, names, index, like: torch.Tensor) -> list[torch.Tensor]:
        """The rows `index` of the named tables, shaped to broadcast against `like` (B, C, H, W).

        `index` is an int (one row: 0-d tensors) or a (B,) tensor of rows (shape (B, 1, 1, 1)).
        """
        tables = self.on(like.device, like.dtype)
        if isinstance(index, int):
            return [tables[n][index] for n in names]
        index = index.to(like.device).long().reshape(-1)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return [tables[n][index].reshape(shape) for n in names]


def spaced_timesteps(num_train_timesteps: int, num_inference_steps, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """S distinct timesteps in [0, T-1], descending, chosen as diffusers' `timestep_spacing` names them
    (Lin et al. 2023, Table 2). Unlike diffusers, `trailing` never yields timestep -1.

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
    steps = int(num_inference_steps)
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        timesteps = (np.arange(steps) * (num_train // steps))[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        # t_k = round(T - k·T/S) - 1 for k = 0 .. S-1, the last one >= round(T/S) - 1 >= 0. The values come from
        # np.arange as in diffusers, whose float stepping decides ties (T = 1000, S = 48: 1000 - 3·T/S = 937.5 comes
        # out as 937.4999999999999 → 937), so the timesteps are diffusers' own; np.arange can overshoot by one value
        # near 0 (which becomes -1): keep the first S.
        timesteps = np.round(np.arange(num_train, 0, -num_train / steps))[:steps].astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose 'linspace', 'leading' or 'trailing'")
    if timesteps[0] >= num_train or timesteps[-1] < 0:
        raise ValueError(
            f"timesteps {timesteps[[0, -1]].tolist()} fall outside [0, {num_train - 1}] "
            f"(steps_offset={steps_offset}); lower steps_offset"
        )
    return timesteps
