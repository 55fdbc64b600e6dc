"""The respaced steps: which `timestep_spacing` gives Improved DDPM's steps (improved-diffusion's `space_timesteps`:
evenly spaced, rounded, T-1 and 0 included), checked against its closed form at the paper's step counts."""

from fractions import Fraction

import pytest
from diffusers import DDPMScheduler

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.chain import spaced_timesteps
from hf_ddpm.evaluation.steps import (
    IMPROVED_DDPM_SPACING,
    describe_spacing,
    few_step_scheduler,
    improved_ddpm_timesteps,
)


def space_timesteps_closed_form(num_train_timesteps: int, num_steps: int) -> list[int]:
    """t_k = round(k (T-1) / (S-1)), k = S-1 .. 0, in exact arithmetic, ties to even (Python's round, as there)."""
    return [round(Fraction(k * (num_train_timesteps - 1), num_steps - 1)) for k in reversed(range(num_steps))]


@pytest.mark.parametrize("T", [1000, 4000])
@pytest.mark.parametrize("S", [25, 50, 100, 250])
def test_improved_ddpm_spacing_gives_space_timesteps_at_the_papers_counts(T, S):
    expected = space_timesteps_closed_form(T, S)
    assert expected[0] == T - 1 and expected[-1] == 0 and len(set(expected)) == S
    gaps = {a - b for a, b in zip(expected, expected[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced up to rounding
    assert improved_ddpm_timesteps(T, S).tolist() == expected
    assert spaced_timesteps(T, S, IMPROVED_DDPM_SPACING).tolist() == expected
    ours = HFDDPMScheduler(num_train_timesteps=T, timestep_spacing=IMPROVED_DDPM_SPACING)
    theirs = DDPMScheduler(num_train_timesteps=T, timestep_spacing=IMPROVED_DDPM_SPACING)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(S)
        assert scheduler.timesteps.tolist() == expected
    assert describe_spacing(T, S, IMPROVED_DDPM_SPACING) == "Improved DDPM's steps (timestep_spacing='linspace')"


def test_diffusers_default_leading_is_not_improved_ddpms():
    """leading starts at 980 for 50 of 1000: the chain starts from x_980 drawn as if it were x_T."""
    leading = spaced_timesteps(1000, 50, "leading").tolist()
    assert leading[:3] == [980, 960, 940] and leading[-1] == 0
    assert improved_ddpm_timesteps(1000, 50).tolist()[:3] == [999, 979, 958]
    assert HFDDPMScheduler().config.timestep_spacing == "leading"  # diffusers' default, kept for diffusers users
    assert (
        describe_spacing(1000, 50, "leading")
        == "timestep_spacing='leading' (diffusers' choice, not Improved DDPM's steps)"
    )
    assert describe_spacing(1000, 1000, "leading") == "all 1000 timesteps"


def test_improved_ddpm_timesteps_round_ties_as_improved_diffusion_does():
    """space_timesteps adds the stride up in floats: for 21 of 1000, 10 · 49.95 comes out just below 499.5 and rounds
    to 499, where linspace (and exact arithmetic) give 500. The results say so."""
    ours, linspace = improved_ddpm_timesteps(1000, 21).tolist(), spaced_timesteps(1000, 21, "linspace").tolist()
    assert ours[10] == 499 and linspace[10] == 500
    assert [i for i, (a, b) in enumerate(zip(ours, linspace)) if a != b] == [10]
    assert describe_spacing(1000, 21, "linspace") == (
        "timestep_spacing='linspace' (1 of its 21 steps 1 off Improved DDPM's: rounded ties)"
    )


def test_evaluate_samples_few_step_fids_at_improved_ddpms_steps_and_says_so():
    from diffusers import DDIMScheduler

    saved = HFDDPMScheduler()  # diffusers' default spacing, leading
    scheduler, named = few_step_scheduler(saved, 50)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == improved_ddpm_timesteps(1000, 50).tolist()
    assert named == "Improved DDPM's steps (timestep_spacing='linspace')" and saved.config.timestep_spacing == "leading"
    assert few_step_scheduler(saved, 1000) == (saved, "all 1000 timesteps")
    ddim = DDIMScheduler.from_config(saved.config)
    assert few_step_scheduler(ddim, 50) == (ddim, "DDIMScheduler's own (timestep_spacing='leading')")
