"""On a GPU: the paper's CIFAR-10 model (35.7M parameters) training throughput at batch 128 in fp32 / bf16 / fp16,
against the DDPM paper's 21 steps/s on a TPU v3-8 (Appendix B), and its sampling throughput.

Runs only where `torch.cuda.is_available()`; elsewhere it records why it did not. Training is hf_ddpm's own loop
(`hf_ddpm.training.train`) on the bundled digits upscaled to 32x32 RGB (the content of the images does not change
the speed); throughput is taken between a short and a long run, so compilation, cuDNN autotuning and allocator
warmup cancel out. Sampling compares ours, diffusers' DDPMPipeline and the bare UNet as the CPU benchmark does.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from hf_ddpm.unet import unet_config

from .measure import log
from .models import train_run, untrained_unet
from .sampling import compare

PAPER_STEPS_PER_SECOND = 21.0  # DDPM (Ho et al. 2020), Appendix B: CIFAR-10, batch 128, TPU v3-8
PROFILES = {
    "smoke": {"model": "test-tiny", "resolution": 8, "T": 50, "batch": 4, "steps": (2, 4),
              "sampling": {"batch": 2, "steps": 10, "rounds": 1}},
    "quick": {"model": "ddpm-cifar10-32", "resolution": 32, "T": 1000, "batch": 128, "steps": (5, 25),
              "sampling": {"batch": 128, "steps": 50, "rounds": 2}},
    "full": {"model": "ddpm-cifar10-32", "resolution": 32, "T": 1000, "batch": 128, "steps": (10, 110),
             "sampling": {"batch": 256, "steps": 100, "rounds": 3}},
}  # fmt: skip
NOT_MEASURED = "not measured: no GPU lent"


def train_seconds(settings: dict, workdir: str, steps: int, precision: str) -> float:
    config = os.path.join(workdir, "unet.json")  # a JSON config (not the preset name) keeps in_channels = 3
    with open(config, "w") as f:
        json.dump(unet_config(settings["model"]), f)
    flags = ["--lr_warmup_steps", "0", "--mixed_precision", precision, "--eval_size", "0", "--eval_batch_size", "1",
             "--ddpm_num_inference_steps", "1", "--learning_rate", "2e-4"]  # fmt: skip
    return train_run(settings | {"model": config}, steps, os.path.join(workdir, "out"), *flags)["train_seconds"]


def run(profile: str = "full") -> dict:
    if not torch.cuda.is_available():
        return {"measured": False, "reason": NOT_MEASURED, "paper_steps_per_second": PAPER_STEPS_PER_SECOND}
    settings, short, long_ = PROFILES[profile], *PROFILES[profile]["steps"]
    # the host's CPU time says nothing about GPU work: wall clock only
    result = {"measured": True, "clock": "wall", "device": "cuda", "gpu": torch.cuda.get_device_name(0),
              "model": settings["model"], "batch": settings["batch"], "paper_steps_per_second": PAPER_STEPS_PER_SECOND,
              "training": {}, "sampling": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        for precision in ("no", "bf16", "fp16"):
            log(f"gpu: training {settings['model']} at batch {settings['batch']}, mixed precision {precision}")
            t_short = train_seconds(settings, workdir, short, precision)
            t_long = train_seconds(settings, workdir, long_, precision)
            steps_per_second = (long_ - short) / max(t_long - t_short, 1e-9)
            result["training"][precision] = {
                "steps_per_second": steps_per_second,
                "images_per_second": steps_per_second * settings["batch"],
                "vs_paper_tpu_v3_8": steps_per_second / PAPER_STEPS_PER_SECOND,
            }
    cfg = settings["sampling"]
    unet = untrained_unet(settings["model"]).eval().to("cuda")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        log(f"gpu: sampling {settings['model']} in {name}, batch {cfg['batch']}, {cfg['steps']} steps")
        row = compare(unet.to(dtype), settings["T"], cfg["batch"], cfg["steps"], cfg["rounds"])
        row.pop("cpu")
        row["images_per_second_at_1000_steps"] = 1.0 / (
            row["wall"]["seconds_per_image_step"]["hf_ddpm"]["median"] * 1000
        )
        result["sampling"][name] = row
    from .likelihood import cifar10

    try:  # google/ddpm-cifar10-32 and the CIFAR-10 test set from the Hub: eq. 5 and the ODE against the papers
        result["likelihood"] = cifar10(profile)
    except OSError as err:  # no network and nothing cached
        result["likelihood"] = {"measured": False, "reason": f"{type(err).__name__}: {err}"}
    return result
