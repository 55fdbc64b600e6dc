"""Which diffusers scheduler configs can configure HFDDPMScheduler, and the keys that must survive a swap.

`HFDDPMScheduler.from_config` reads a config of itself, of diffusers' `DDPMScheduler` or of any scheduler of a
β-schedule process (`CONFIG_SOURCES`), including the early google/ddpm-* keys; it refuses the rest with a message
that names the class and the allowed ones. The pipeline samples with the `PIPELINE_SCHEDULERS`; what it needs to
know of a swapped-in scheduler lives here too: whether its step reads a learned variance
(`uses_learned_variance`), which arguments its step takes (`step_kwargs`), and the DDPM process its config defines,
for the bound (`ddpm_scheduler_from_config`).
"""

from __future__ import annotations

import inspect

from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

PIPELINE_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
    "LMSDiscreteScheduler",
)
CONFIG_SOURCES = tuple(e.name for e in KarrasDiffusionSchedulers)  # diffusers' schedulers of a β-schedule process
# The first diffusers release's name and keys, still in the root scheduler_config.json of the google/ddpm-* repos.
EARLY_CLASS_NAMES = ("GaussianDDPMScheduler",)
EARLY_KEYS = {"timesteps": "num_train_timesteps"}
# The keys that define the DDPM process (and so the bound). diffusers gives a scheduler swapped in with `from_config`
# its own defaults for the keys the source config left at theirs (`_use_default_values`): HeunDiscreteScheduler would
# get β from 0.00085 to 0.012 instead of DDPM's. These keys are recorded as set, so every swap keeps them.
PROCESS_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "variance_type",
    "clip_sample",
    "clip_sample_range",
    "prediction_type",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
)


def from_early_keys(config):
    """A GaussianDDPMScheduler config (diffusers' first release) as a DDPMScheduler one: `timesteps` is T."""
    if not config or config.get("_class_name") not in EARLY_CLASS_NAMES:
        return config
    renamed = {EARLY_KEYS.get(k, k): v for k, v in config.items() if k != "_class_name"}
    return {"_class_name": "DDPMScheduler", **renamed}


def check_foreign_config(cls, config) -> None:
    """Refuse a config that describes no β schedule for `cls` (see `HFDDPMScheduler.from_config`)."""
    if not config:
        return
    name = config.get("_class_name")
    own = {cls.__name__, "HFDDPMScheduler", "DDPMScheduler"}
    allowed = sorted(own | set(CONFIG_SOURCES))
    what = f"a {name} config"
    if name is None:  # an in-memory config (e.g. `EDMEulerScheduler().config`) names no class: judged by its keys
        keys = cls._get_init_keys(cls)  # a set
        if not keys & set(config):
            raise ValueError(
                f"this scheduler config has none of {cls.__name__}'s keys (it has {sorted(config)}): it is not a "
                f"diffusers scheduler config. Expected keys such as num_train_timesteps, beta_schedule, beta_start, "
                f"beta_end, variance_type, prediction_type (the config of one of {allowed})"
            )
        # a partial dict of our own keys is ours; one with keys we do not take is another scheduler's, and without
        # a β schedule (EDM's σ range, flow matching's shift) it would silently give DDPM's default linear betas
        foreign = sorted(k for k in config if k not in keys and k[0] != "_")
        if not foreign or {"beta_schedule", "trained_betas"} & set(config):
            return
        what = f"a config with foreign keys {foreign}"
    elif name in own or name in allowed and "beta_schedule" in config:
        return
    raise ValueError(
        f"{what} cannot configure {cls.__name__}: it holds no β schedule for DDPM. Load a config of one "
        f"of {allowed} (with beta_schedule), or build {cls.__name__}(num_train_timesteps=..., beta_schedule=...)"
    )


LEARNED_VARIANCES = ("learned", "learned_range")  # diffusers' variance types that read the extra output channels
VARIANCE_READERS = ("HFDDPMScheduler", "DDPMScheduler")  # the schedulers whose step uses a learned variance


def uses_learned_variance(scheduler) -> bool:
    """Whether `scheduler.step` takes a learned-range model's 2C output channels (mean and variance)."""
    variance = scheduler.config.get("variance_type")
    return type(scheduler).__name__ in VARIANCE_READERS and variance in LEARNED_VARIANCES


def step_kwargs(scheduler, generator) -> dict:
    """`generator=` for the schedulers whose step draws noise (DDPM, DDIM, Euler ancestral, SDE solvers)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def ddpm_scheduler_from_config(cls, config, learned_variance: bool = False, name: str | None = None):
    """A `cls` (HFDDPMScheduler) for the DDPM process a scheduler config defines (any diffusers scheduler with a β
    schedule).

    The keys `cls` shares are taken as they are; a key the config lacks or leaves None keeps `cls`'s default, except
    `variance_type`: `learned_range` when `learned_variance` (a UNet with 2C output channels), since schedulers
    without the key (Euler, Heun, ...) still sample that model's mean. A config without a β schedule (e.g.
    EDMEulerScheduler's) raises ValueError naming its class and keys.
    """
    config = dict(config)
    name = name or config.get("_class_name", "this")
    init_keys = cls._get_init_keys(cls)  # diffusers' reading of the signature, as check_foreign_config's
    kwargs = {k: v for k, v in config.items() if k in init_keys and v is not None}
    if learned_variance and kwargs.get("variance_type") not in LEARNED_VARIANCES:
        kwargs["variance_type"] = "learned_range"
    if "beta_schedule" not in config and "trained_betas" not in kwargs:
        raise ValueError(
            f"bits_per_dim evaluates the DDPM process that the pipeline's scheduler config defines, but the {name} "
            f"config defines none (it has no beta_schedule or trained_betas; keys: {sorted(config)}). Swap in a "
            "scheduler with a β schedule (HFDDPMScheduler, DDPMScheduler, DDIMScheduler, ...) to evaluate the bound"
        )
    try:
        return cls.from_config({"_class_name": config.get("_class_name", cls.__name__), **kwargs})
    except ValueError as err:
        raise ValueError(
            f"bits_per_dim: the {name} config defines no DDPM process that can be evaluated: {err}"
        ) from err
