"""Which steps a few-step FID samples: Improved DDPM's respacing (Nichol & Dhariwal 2021, section 4), and how
results name the steps they sampled.

Few-step FIDs are read against Improved DDPM's, so DDPM's ancestral sampler samples its steps; what a pipeline samples
by default stays what its config says (diffusers' `leading`), as diffusers users expect.
"""

from __future__ import annotations

import numpy as np

from ..chain import spaced_timesteps

IMPROVED_DDPM_SPACING = "linspace"  # the timestep_spacing that gives Improved DDPM's steps (improved_ddpm_timesteps)
RESPACED_ANCESTRAL = ("HFDDPMScheduler", "DDPMScheduler")  # the samplers whose timestep_spacing picks DDPM's steps


def improved_ddpm_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """The S timesteps Improved DDPM samples with (improved-diffusion's `space_timesteps(T, "S")`, section 4),
    descending: evenly spaced, rounded, T-1 and 0 included, t_k = round(k (T-1) / (S-1)).

    The stride is accumulated by float addition and rounded half to even, as there, so ties come out as they do
    there. `timestep_spacing="linspace"` gives these same steps at the counts the paper samples with (25, 50, 100, 250
    of T = 1000 or 4000); at some other counts (21 of 1000) the two round one tie differently.
    """
    stride = (num_train_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    taken, position = [], 0.0
    for _ in range(num_steps):
        taken.append(round(position))
        position += stride
    return np.asarray(taken[::-1], dtype=np.int64)


def describe_spacing(num_train_timesteps: int, num_steps: int, spacing: str) -> str:
    """How results name the steps of a respaced chain: whether they are Improved DDPM's."""
    if num_steps >= num_train_timesteps:
        return f"all {num_train_timesteps} timesteps"
    if spacing == IMPROVED_DDPM_SPACING:
        ours = spaced_timesteps(num_train_timesteps, num_steps, spacing)
        off = int((ours != improved_ddpm_timesteps(num_train_timesteps, num_steps)).sum())  # ties rounded otherwise
        if off == 0:
            return f"Improved DDPM's steps (timestep_spacing={spacing!r})"
        return f"timestep_spacing={spacing!r} ({off} of its {num_steps} steps 1 off Improved DDPM's: rounded ties)"
    return f"timestep_spacing={spacing!r} (diffusers' choice, not Improved DDPM's steps)"


def few_step_scheduler(scheduler, steps: int):
    """The scheduler that draws the FID samples at `steps` steps, and how the output names its steps.

    Few-step FIDs are read against Improved DDPM's, so DDPM's ancestral sampler (HFDDPMScheduler or diffusers'
    DDPMScheduler) takes Improved DDPM's steps (timestep_spacing="linspace": 999, 979, 958, ..., 0 for 50 of 1000)
    whatever spacing the saved config holds; diffusers' default "leading" would start at 980, from x_980 drawn as if
    it were x_T. Another scheduler swapped in keeps its own spacing, as diffusers users expect.
    """
    num_train = scheduler.config.num_train_timesteps
    spacing = scheduler.config.get("timestep_spacing")
    if type(scheduler).__name__ not in RESPACED_ANCESTRAL:
        return scheduler, f"{type(scheduler).__name__}'s own (timestep_spacing={spacing!r})"
    if steps < num_train and spacing != IMPROVED_DDPM_SPACING:
        scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing=IMPROVED_DDPM_SPACING)
    return scheduler, describe_spacing(num_train, steps, scheduler.config.timestep_spacing)
