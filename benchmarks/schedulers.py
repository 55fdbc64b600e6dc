"""Quality against sampling cost: FID at 10 / 20 / 25 / 50 / 100 / 1000 model evaluations for DDPM ancestral sampling
(HFDDPMScheduler, respaced at Improved DDPM's steps and at diffusers' default `leading` ones), DDIM, DPM-Solver++
2M, UniPC and SDE-DPM-Solver++ 2M, all on the same trained digits model; the DPM-Solver/UniPC rows also with x̂_0
clipped to [-1, 1] (as DDPM's and DDIM's steps do with the model's `clip_sample=True`).

The model, its training and the FID protocol are benchmarks/quality.py's (L_simple, fixed_small; FID of N samples
against a seeded subset of training images, Inception pool3 features, a bootstrap standard deviation). Each of these
schedulers evaluates the model once per step, so steps = model evaluations (UniPC's corrector reuses the last one).
Sample i of every set starts from seed i. 1000 evaluations are run for the ancestral sampler only: it is the
reference. Target: a diffusers scheduler within 10% of the 1000-step ancestral FID at <= 25 model
evaluations.

    python -m benchmarks.schedulers [--profile quick|full]   # writes benchmarks/results/schedulers.json
    python -m benchmarks.schedulers --model_dir DIR --only "UniPC, x̂_0 clipped" --evaluations 20 25 --merge
        # some rows again, on a saved model (the one the stored rows came from), into the stored results
"""

from __future__ import annotations

import argparse
import os
import tempfile

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.evaluation.features import InceptionFeatures
from hf_ddpm.evaluation.steps import IMPROVED_DDPM_SPACING

from . import report
from .measure import RESULTS_DIR, log, measured, read_json, write_json
from .models import held_out, trained
from .quality import PROFILES as QUALITY_PROFILES
from .quality import fid_row, training_reference
from .report import FAST_EVALUATIONS, FAST_FID_RATIO

# diffusers' dynamic thresholding with s clamped to [1, sample_max_value] = [1, 1]: x̂_0 clipped to [-1, 1] at each
# step (diffusers' _threshold_sample), what DDPM's and DDIM's steps do with clip_sample=True
CLIPPED = {"thresholding": True, "sample_max_value": 1.0}
SDE = {"algorithm_type": "sde-dpmsolver++"}  # DPM-Solver++ 2M for the reverse SDE (Lu et al. 2022, "DPM-Solver++")
# Ancestral sampling of the respaced chain, at Improved DDPM's steps (its section 4; the reference row: at 1000 all
# spacings visit every timestep) and at diffusers' default `leading` steps (980, 960, ..., 0 for 50 of 1000). The
# diffusers schedulers keep their own default spacing, as a diffusers user swapping them in gets.
REFERENCE = "DDPM ancestral (Improved DDPM's steps)"
SCHEDULERS = {  # name -> (scheduler class, config overrides): class.from_config(the model's config, **overrides)
    REFERENCE: (HFDDPMScheduler, {"timestep_spacing": IMPROVED_DDPM_SPACING}),
    "DDPM ancestral (diffusers' leading steps)": (HFDDPMScheduler, {"timestep_spacing": "leading"}),
    "DDIM (eta = 0)": (DDIMScheduler, {}),
    "DPM-Solver++ 2M": (DPMSolverMultistepScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DPM-Solver++ 2M, x̂_0 clipped": (DPMSolverMultistepScheduler, CLIPPED),
    "UniPC, x̂_0 clipped": (UniPCMultistepScheduler, CLIPPED),
    "SDE-DPM-Solver++ 2M": (DPMSolverMultistepScheduler, SDE),  # stochastic: fresh noise at each step, as DDPM's
    "SDE-DPM-Solver++ 2M, x̂_0 clipped": (DPMSolverMultistepScheduler, {**SDE, **CLIPPED}),
}
PROFILES = {
    "smoke": {**QUALITY_PROFILES["smoke"], "evaluations": (2,), "samples": 8, "reference": 16, "bootstrap": 2},
    "quick": {**QUALITY_PROFILES["quick"], "evaluations": (10, 20, 50), "samples": 64, "reference": 256,
              "bootstrap": 5},
    "full": {**QUALITY_PROFILES["full"], "evaluations": (10, 20, 25, 50, 100, 1000), "samples": 300, "reference": 1000,
             "bootstrap": 20},
}  # fmt: skip


def run(
    profile: str = "full",
    seed: int = 0,
    partial_dir: str | None = None,
    model_dir: str | None = None,
    only: list[str] | None = None,
    evaluations: list[int] | None = None,
) -> dict:
    """The benchmark; with `partial_dir`, the rows so far are written to schedulers_partial.json after each one.
    `model_dir`: a pipeline this benchmark trained before (its training_summary.json), instead of training one;
    `only` / `evaluations`: those schedulers / model evaluation counts only."""
    settings = PROFILES[profile]
    unknown = sorted(set(only or ()) - set(SCHEDULERS))
    if unknown:
        raise ValueError(f"unknown scheduler rows {unknown}; choose from {sorted(SCHEDULERS)}")
    counts = evaluations or settings["evaluations"]
    if min(counts) < 1:
        raise ValueError(f"model evaluations must be >= 1, got {sorted(counts)}")
    with tempfile.TemporaryDirectory() as workdir:
        pipe, training = trained(settings, "simple", model_dir or os.path.join(workdir, "model"))
        if model_dir:
            training["model_dir"] = model_dir
        data = held_out(settings, pipe)
        ddpm_config, features = pipe.scheduler.config, InceptionFeatures()
        reference = training_reference(data, settings["reference"], features, seed)
        rows = []
        for index, (name, (scheduler_class, overrides)) in enumerate(SCHEDULERS.items()):
            if only and name not in only:
                continue
            pipe.scheduler = scheduler_class.from_config(ddpm_config, **overrides)
            for count in counts:
                if count == 1000 and name != REFERENCE:
                    continue  # the reference only
                steps = min(count, settings["T"])
                log(f"schedulers: {name} at {steps} model evaluations ({settings['samples']} samples)")
                row = fid_row(pipe, steps, reference, features, settings["samples"], settings["bootstrap"],
                              os.path.join(workdir, f"samples-{index}-{steps}"), seed)  # fmt: skip
                rows.append({"scheduler": name, "class": scheduler_class.__name__, "config": overrides,
                             "model_evaluations": steps, **row})  # fmt: skip
                if partial_dir:
                    write_json("schedulers_partial", {"profile": profile, "rows": rows}, partial_dir)
    return {
        "profile": profile,
        "model": settings["model"],
        "train_steps": settings["train_steps"],
        "num_train_timesteps": settings["T"],
        "training": training,
        "feature_extractor": features.name,
        "samples_per_set": settings["samples"],
        "reference": f"{reference.count} training images (seeded random subset)",
        "rows": rows,
        "target": target(rows),
    }


def target(rows: list[dict]) -> dict | None:
    """The best diffusers scheduler at <= 25 model evaluations against the 1000-step ancestral FID."""
    reference = [r for r in rows if r["scheduler"] == REFERENCE and r["model_evaluations"] == 1000]
    fast = [r for r in rows if r["class"] != "HFDDPMScheduler" and r["model_evaluations"] <= FAST_EVALUATIONS]
    if not reference or not fast:
        return None
    best = min(fast, key=lambda r: r["fid"])
    ratio = best["fid"] / reference[0]["fid"] - 1.0
    return {
        "ancestral_1000_fid": reference[0]["fid"],
        "best": f"{best['scheduler']} at {best['model_evaluations']}",
        "best_fid": best["fid"],
        "relative_change": ratio,
        "met": ratio <= FAST_FID_RATIO,
    }


def merge(result: dict, stored: dict) -> dict:
    """`result`'s rows into the `stored` results (same profile): a row of the same scheduler and evaluation count is
    replaced, the others are kept; the target is recomputed."""
    if stored.get("profile") != result["profile"]:
        raise ValueError(f"the stored results are of profile {stored.get('profile')!r}, not {result['profile']!r}")
    new = {(r["scheduler"], r["model_evaluations"]) for r in result["rows"]}
    kept = [r for r in stored["rows"] if (r["scheduler"], r["model_evaluations"]) not in new]
    order = {name: i for i, name in enumerate(SCHEDULERS)}
    rows = sorted(kept + result["rows"], key=lambda r: (order.get(r["scheduler"], len(order)), r["model_evaluations"]))
    merged = {**stored, "rows": rows, "target": target(rows)}
    merged["reruns"] = [*stored.get("reruns", []), {"machine": result["machine"], "training": result["training"],
                                                   "rows": sorted(new, key=str), "seconds": result["wall_seconds"]}]  # fmt: skip
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--results_dir", default=None, help="default: benchmarks/results")
    parser.add_argument("--model_dir", default=None, help="a pipeline this benchmark trained (default: train one)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"scheduler rows: {', '.join(SCHEDULERS)}")
    parser.add_argument("--evaluations", nargs="+", type=int, help="model evaluation counts (default: the profile's)")
    parser.add_argument("--merge", action="store_true", help="replace these rows in the stored schedulers.json")
    args = parser.parse_args(argv)
    if args.model_dir and not os.path.isfile(os.path.join(args.model_dir, "training_summary.json")):
        parser.error(
            f"--model_dir {args.model_dir} holds no training_summary.json: pass a pipeline this benchmark trained"
        )
    results_dir = args.results_dir or RESULTS_DIR
    stored = read_json("schedulers", results_dir) if args.merge else None
    if args.merge and stored is None:
        parser.error(f"--merge: no schedulers.json in {results_dir}")
    result = measured("schedulers", lambda: run(args.profile, partial_dir=args.results_dir, model_dir=args.model_dir,
                                                only=args.only, evaluations=args.evaluations))  # fmt: skip
    if stored is not None:
        result = merge(result, stored)
    log(f"schedulers: wrote {write_json('schedulers', result, results_dir)}")
    print(report.schedulers_section(result))
    report.write(results_dir)  # RESULTS.md and schedulers.md with these rows


if __name__ == "__main__":
    main()
