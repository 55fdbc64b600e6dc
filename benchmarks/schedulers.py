"""Quality against sampling cost: FID at 10 / 20 / 50 / 100 / 1000 model evaluations for DDPM ancestral sampling
(HFDDPMScheduler, respaced), DDIM, DPM-Solver++ 2M and UniPC, all on the same trained digits model.

The model, its training and the FID protocol are benchmarks/quality.py's (L_simple, fixed_small; FID of N samples
against a seeded subset of training images, Inception pool3 features, a bootstrap standard deviation). Each of these
schedulers evaluates the model once per step, so steps = model evaluations (UniPC's corrector reuses the last one).
Sample i of every set starts from seed i. 1000 evaluations are run for the ancestral sampler only: it is the
reference. Target (issue 15): a diffusers scheduler within 10% of the 1000-step ancestral FID at <= 25 model
evaluations.

    python -m benchmarks.schedulers [--profile quick|full]   # writes benchmarks/results/schedulers.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler
from hf_ddpm.data import load_data
from hf_ddpm.evaluation.features import InceptionFeatures
from hf_ddpm.evaluation.sample_metrics import bootstrap_fid, frechet_distance, statistics

from .common import log, machine, write_json
from .quality import PROFILES as QUALITY_PROFILES
from .quality import sample_uint8, train_model

SCHEDULERS = {  # name -> the scheduler class swapped in with from_config (diffusers' defaults otherwise)
    "DDPM ancestral (respaced)": HFDDPMScheduler,
    "DDIM (eta = 0)": DDIMScheduler,
    "DPM-Solver++ 2M": DPMSolverMultistepScheduler,
    "UniPC": UniPCMultistepScheduler,
}
PROFILES = {
    "smoke": {**QUALITY_PROFILES["smoke"], "evaluations": (2, 4), "samples": 8, "reference": 16, "bootstrap": 2},
    "quick": {**QUALITY_PROFILES["quick"], "evaluations": (10, 20, 50), "samples": 64, "reference": 256,
              "bootstrap": 5},
    "full": {**QUALITY_PROFILES["full"], "evaluations": (10, 20, 50, 100, 1000), "samples": 300, "reference": 1000,
             "bootstrap": 20},
}  # fmt: skip
TARGET_EVALUATIONS, TARGET_RATIO = 25, 0.10


def run(profile: str = "full", seed: int = 0, partial_dir: str | None = None) -> dict:
    """The benchmark; with `partial_dir`, the rows so far are written to schedulers_partial.json after each one."""
    settings = PROFILES[profile]
    started = time.perf_counter()
    features = InceptionFeatures()
    with tempfile.TemporaryDirectory() as workdir:
        log(f"schedulers: training the L_simple digits model ({settings['train_steps']} steps)")
        training = train_model(settings, "simple", os.path.join(workdir, "model"), {})
        pipe = HFDDPMPipeline.from_pretrained(os.path.join(workdir, "model"))
        pipe.set_progress_bar_config(disable=True)
        ddpm_config = pipe.scheduler.config
        data = load_data(
            resolution=settings["resolution"], channels=pipe.unet.config.in_channels, eval_size=0.1, seed=0
        )
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
        reference = statistics(features(data.train[order[: settings["reference"]]]))
        rows = []
        for name, scheduler_class in SCHEDULERS.items():
            pipe.scheduler = scheduler_class.from_config(ddpm_config)
            for evaluations in settings["evaluations"]:
                if evaluations == 1000 and scheduler_class is not HFDDPMScheduler:
                    continue  # the reference only
                steps = min(evaluations, settings["T"])
                log(f"schedulers: {name} at {steps} model evaluations ({settings['samples']} samples)")
                began = time.perf_counter()
                sample_dir = os.path.join(workdir, f"samples-{scheduler_class.__name__}-{steps}")
                images = sample_uint8(pipe, settings["samples"], steps, sample_dir, seed)
                seconds = time.perf_counter() - began
                feats = features(images)
                rows.append({
                    "scheduler": name, "class": scheduler_class.__name__, "model_evaluations": steps,
                    "fid": frechet_distance(reference, feats),
                    "bootstrap_std": bootstrap_fid(reference, feats, settings["bootstrap"], seed),
                    "sampling_seconds": seconds,
                })  # fmt: skip
                if partial_dir:
                    write_json("schedulers_partial", {"profile": profile, "rows": rows}, partial_dir)
    return {
        "benchmark": "schedulers",
        "machine": machine(),
        "profile": profile,
        "model": settings["model"],
        "train_steps": settings["train_steps"],
        "num_train_timesteps": settings["T"],
        "training": training,
        "feature_extractor": features.name,
        "samples_per_set": settings["samples"],
        "reference": f"{settings['reference']} training images (seeded random subset)",
        "rows": rows,
        "target": target(rows),
        "seconds": time.perf_counter() - started,
    }


def target(rows: list[dict]) -> dict | None:
    """The best diffusers scheduler at <= 25 model evaluations against the 1000-step ancestral FID."""
    reference = [r for r in rows if r["class"] == "HFDDPMScheduler" and r["model_evaluations"] == 1000]
    fast = [r for r in rows if r["class"] != "HFDDPMScheduler" and r["model_evaluations"] <= TARGET_EVALUATIONS]
    if not reference or not fast:
        return None
    best = min(fast, key=lambda r: r["fid"])
    ratio = best["fid"] / reference[0]["fid"] - 1.0
    return {
        "ancestral_1000_fid": reference[0]["fid"],
        "best": f"{best['scheduler']} at {best['model_evaluations']}",
        "best_fid": best["fid"],
        "relative_change": ratio,
        "met": ratio <= TARGET_RATIO,
    }


def markdown(result: dict) -> str:
    counts = sorted({r["model_evaluations"] for r in result["rows"]})
    lines = [
        f"FID ({result['feature_extractor']}; {result['samples_per_set']} samples per cell against "
        f"{result['reference']}; ± bootstrap std) of the {result['model']} digits model "
        f"({result['train_steps']} training steps, T = {result['num_train_timesteps']}) by scheduler and model "
        "evaluations:",
        "",
        "| scheduler | " + " | ".join(str(c) for c in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    for name in dict.fromkeys(r["scheduler"] for r in result["rows"]):
        cells = {r["model_evaluations"]: r for r in result["rows"] if r["scheduler"] == name}
        row = [f"{cells[c]['fid']:.1f} ± {cells[c]['bootstrap_std']:.1f}" if c in cells else "" for c in counts]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    t = result["target"]
    if t:
        lines += ["", f"Target (≤ {TARGET_EVALUATIONS} evaluations within {TARGET_RATIO:.0%} of 1000-step ancestral "
                  f"FID {t['ancestral_1000_fid']:.1f}): best {t['best']}: {t['best_fid']:.1f} "
                  f"({t['relative_change']:+.1%}), **{'met' if t['met'] else 'not met'}**"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--results_dir", default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    result = run(args.profile, partial_dir=args.results_dir)
    kwargs = {"results_dir": args.results_dir} if args.results_dir else {}
    log(f"schedulers: wrote {write_json('schedulers', result, **kwargs)}")
    print(markdown(result))


if __name__ == "__main__":
    main()
