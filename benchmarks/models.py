"""The models the benchmarks measure: untrained preset UNets (speed does not depend on the weights) and small models
trained by hf_ddpm's own training loop (the quality, schedulers and likelihood benchmarks measure those), with the
held-out split their training kept out.

hf_ddpm's training and data are imported where they are used: the allocator benchmark's measured processes build
their models here, and their peak memory is measured.
"""

from __future__ import annotations

import json
import os

import torch
from diffusers import UNet2DModel

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config

from .measure import log


def untrained_unet(name: str, **overrides) -> UNet2DModel:
    """A preset UNet (`overrides` on its config), freshly initialized from seed 0."""
    torch.manual_seed(0)
    return UNet2DModel(**unet_config(name, **overrides))


def untrained_pipeline(num_train_timesteps: int, name: str = "digits-16-tiny") -> HFDDPMPipeline:
    """Our pipeline on an untrained preset UNet (in eval mode), without a progress bar."""
    scheduler = HFDDPMScheduler(num_train_timesteps=num_train_timesteps)
    pipe = HFDDPMPipeline(unet=untrained_unet(name).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; each run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_run(settings: dict, steps: int, output_dir: str, *flags: str) -> dict:
    """One run of hf_ddpm's training loop (`hf_ddpm.training.train`, with its own Accelerator) of `settings`' model,
    resolution, T and batch for `steps` optimizer steps, no checkpoint or sample grid inside the loop, and `flags`;
    returns the run's summary. The one place the benchmarks start our training."""
    from hf_ddpm.training import parse_args, train

    argv = ["--output_dir", output_dir, "--overwrite_output_dir", "--model_config", settings["model"],
            "--resolution", str(settings["resolution"]), "--ddpm_num_steps", str(settings["T"]),
            "--train_batch_size", str(settings["batch"]), "--max_train_steps", str(steps),
            "--checkpointing_steps", "1000000", "--save_images_steps", "1000000", *flags]  # fmt: skip
    reset_accelerate()
    try:
        return train(parse_args(argv))
    finally:
        reset_accelerate()


def trained(settings: dict, loss: str, model_dir: str, data: dict | None = None) -> tuple[HFDDPMPipeline, dict]:
    """The `loss` model of `settings` on `data` (training's data flags; none: the bundled digits) and its training:
    the pipeline an earlier run trained into `model_dir` (its training_summary.json), so that reruns measure the same
    weights, or else trained there now by `hf_ddpm.training.train` (our defaults, `train_steps` optimizer steps)."""
    data, summary_path = data or {}, os.path.join(model_dir, "training_summary.json")
    if not os.path.isfile(summary_path):
        steps, source = settings["train_steps"], data.get("dataset_name") or data.get("train_data_dir") or "digits"
        log(f"training the {loss} model on {source} ({steps} steps)")
        flags = ["--lr_warmup_steps", str(min(100, steps // 2)), "--loss", loss, "--mixed_precision", "no",
                 "--eval_num_images", "16", "--eval_num_timesteps", "4", "--eval_batch_size", "4",
                 "--ddpm_num_inference_steps", "10"]  # fmt: skip
        flags += [arg for flag, value in data.items() if value is not None for arg in (f"--{flag}", str(value))]
        train_run(settings, steps, model_dir, *flags)
    with open(summary_path) as f:
        summary = json.load(f)
    pipe = HFDDPMPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    kept = ("optimizer_steps", "train_seconds", "parameter_sha256")
    return pipe, {"loss": loss, **{k: summary.get(k) for k in kept}}


def held_out(settings: dict, pipe: HFDDPMPipeline, data: dict | None = None):
    """`data`'s split (training's data flags; none: the digits) with the held-out images its training kept out (10%,
    seed 0), at the model's resolution and channels."""
    from hf_ddpm.data import load_data

    flags = {
        k: v for k, v in (data or {}).items() if k != "max_train_samples"
    }  # the held-out split does not depend on it
    return load_data(resolution=settings["resolution"], channels=pipe.unet.config.in_channels, eval_size=0.1, seed=0,
                     **flags)  # fmt: skip
