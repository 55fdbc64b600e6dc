"""Two models' likelihood every way: DDPM eq. 5 (exact, and stratified Monte Carlo), eq. 3 from whole trajectories,
the importance-weighted bound for K = 1 .. 64, the probability-flow ODE (NFE, seconds per image), the rate-distortion
curve; the variance the KL rewrite (eq. 5) removes at equal model evaluations; the ODE solver choice (kept from the
run that measured it, with its date and weights). The models:
the bundled digits, and natural-image tiles cut from scikit-learn's two sample photographs into a PNG folder
(a temporary directory), each trained by hf_ddpm's own loop with the same UNet, T, batch and steps.

    python -m benchmarks.run --only likelihood [--quick]    # writes results/likelihood.json and its figure

Equal model evaluations: one exact pass of eq. 5, one Monte Carlo pass with K = T - 1 timesteps (+ the decoder) and
one trajectory of eq. 3 all cost T evaluations per image. The spread of one eq. 5 pass is measured over `repeats`
passes with other seeds; that of one trajectory over the trajectories; the Monte Carlo pass reports its own (which can
only overstate it). Every estimator runs on the first images of the same held-out split, so each is also given as a
paired difference from eq. 5 on its own images, with standard errors over images.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch

from hf_ddpm import HFDDPMPipeline
from hf_ddpm.bound import rate_distortion, variational_bound
from hf_ddpm.evaluation.likelihood import log_likelihood
from hf_ddpm.images import images_to_model_range
from hf_ddpm.trajectories import importance_weighted_bound, trajectory_log_weights

from .measure import CLOCKS, load_average, log, timed
from .models import held_out, trained
from .quality import PROFILES as QUALITY_PROFILES

PROFILES = {
    "smoke": {**QUALITY_PROFILES["smoke"], "tiles": 60, "images": 2, "repeats": 2, "trajectory_repeats": 3,
              "trajectory_images": 2, "trajectories": 4, "iw": (1, 2, 4), "ode_images": 1, "tol": 1e-3},
    "quick": {**QUALITY_PROFILES["quick"], "tiles": None, "images": 4, "repeats": 2, "trajectory_repeats": 4,
              "trajectory_images": 1, "trajectories": 16, "iw": (1, 4, 16), "ode_images": 1, "tol": 1e-5},
    # about 25 minutes on a shared two-core machine (load ~3), both models trained a few minutes' worth
    "full": {**QUALITY_PROFILES["full"], "train_steps": 200, "tiles": None, "images": 24, "repeats": 2,
             "trajectory_repeats": 10, "trajectory_images": 2, "trajectories": 64, "iw": (1, 4, 16, 64),
             "ode_images": 8, "tol": 1e-5},
}  # fmt: skip
MODELS = {"digits": "scikit-learn's 8x8 digits upscaled (the default data)",
          "tiles": "RGB tiles of china.jpg and flower.jpg (scikit-learn's sample images) in a PNG folder"}  # fmt: skip
# Song et al. 2021, Table 2: the DDPM (L_simple) CIFAR-10 checkpoint's NLL through the probability-flow ODE, bits/dim
# on uniformly dequantized test data ("DDPM | 3.28"); DDPM's own bound for it (Table 1): <= 3.75.
SONG_TABLE2_DDPM_ODE_BPD, DDPM_TABLE1_BOUND_BPD = 3.28, 3.75


def image_folder(directory: str, size: int, limit: int | None = None) -> str:
    """scikit-learn's two sample photographs (427x640 RGB) cut into non-overlapping size x size tiles, written as PNG
    files (a seeded subset of `limit` of them): no held-out tile shares a pixel with a training tile."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    tiles = [photo[i : i + size, j : j + size] for photo in load_sample_images().images
             for i in range(0, photo.shape[0] - size + 1, size)
             for j in range(0, photo.shape[1] - size + 1, size)]  # fmt: skip
    os.makedirs(directory, exist_ok=True)
    for n in np.random.default_rng(0).permutation(len(tiles))[:limit]:
        Image.fromarray(tiles[n]).save(os.path.join(directory, f"tile-{n:05d}.png"))
    return directory


def prepared(name: str, settings: dict, workdir: str) -> tuple[HFDDPMPipeline, torch.Tensor, dict]:
    """The L_simple model of `name`'s data, trained into `workdir`, and its first held-out images (the split training
    kept out)."""
    data = {}
    if name == "tiles":
        folder = image_folder(os.path.join(workdir, "tile-images"), settings["resolution"], settings["tiles"])
        data = {"train_data_dir": folder, "cache_dir": os.path.join(workdir, "cache")}
    pipe, training = trained(settings, "simple", os.path.join(workdir, name), data)
    images = held_out(settings, pipe, data).eval
    facts = {"data": MODELS[name], "held_out_split": len(images), "image_shape": list(images.shape[1:]),
             **{k: v for k, v in training.items() if k != "loss"}}  # fmt: skip
    return pipe, images[: settings["images"]], facts


def over_images(bpd: torch.Tensor, eq5: torch.Tensor, **extra) -> dict:
    """Mean bits/dim over images with its standard error, and the paired difference from eq. 5 on the same images."""
    se = lambda v: (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else None  # noqa: E731
    bpd = bpd.double()
    diff = bpd - eq5[: len(bpd)]
    return {"images": len(bpd), "bits_per_dim": bpd.mean().item(), "stderr": se(bpd), "minus_eq5": diff.mean().item(),
            "minus_eq5_stderr": se(diff), "per_image": bpd.tolist(), **extra}  # fmt: skip


def measure(pipe, images: torch.Tensor, settings: dict) -> dict:
    """Every estimator on the first images of `images`; costs in wall and CPU seconds (the load is recorded)."""
    x0, scheduler = images_to_model_range(images, pipe._image_shape), pipe.bound_scheduler()
    num_train, num_dims, seconds = scheduler.config.num_train_timesteps, x0[0].numel(), {}

    def timed_as(key, work):
        out = []
        seconds[key] = dict(zip(CLOCKS, timed(lambda: out.append(work()))))
        return out[0]

    bound = lambda x, seed, **kw: variational_bound(pipe._denoise, scheduler, x, batch_size=256,  # noqa: E731
                                                    generator=torch.manual_seed(seed), **kw)  # fmt: skip
    load, n, m = load_average(), settings["trajectory_images"], settings["trajectories"]
    first = timed_as("eq. 5 exact pass (with the distortion)", lambda: bound(x0, 100, distortion=True))
    exact = torch.stack([first.bits_per_dim] + [bound(x0, 100 + r).bits_per_dim for r in range(1, settings["repeats"])])
    exact, rate, distortion = exact.double(), *rate_distortion(first.terms_bpd, first.prior_bpd, first.distortion)
    # more passes on the trajectory images: the spread of one pass where the trajectories' is measured
    on_traj = torch.cat([exact[:, :n]] + [bound(x0[:n], 200 + r).bits_per_dim.double()[None]
                                          for r in range(settings["trajectory_repeats"] - len(exact))])  # fmt: skip
    eq5 = torch.cat([on_traj.mean(0), exact[:, n:].mean(0)])  # (N,): each image's eq. 5, the mean of its passes
    mc = timed_as("eq. 5 stratified MC pass", lambda: bound(x0, 7, num_timesteps=num_train - 1))
    log(f"likelihood: {len(x0)} images x {settings['repeats'] + 1} bound passes; {n} x {m} trajectories")
    log_w = timed_as("trajectories", lambda: trajectory_log_weights(pipe._denoise, scheduler, x0[:n], m, batch_size=256,
                                                                 generator=torch.manual_seed(8)))  # fmt: skip
    traj = -log_w / (num_dims * math.log(2))  # (n, M): one eq. 3 estimate per trajectory, bits/dim
    sd_exact, sd_mc, sd_traj, sd_on_traj = exact.std(0), mc.standard_error.double(), traj.std(1), on_traj.std(0)
    diff_se = (sd_traj**2 / m + sd_on_traj**2 / len(on_traj)).sqrt()  # eq. 3 - eq. 5 per image: both estimates' noise
    estimators = {
        "eq5_exact": over_images(eq5, eq5, cost=num_train, sd_one_estimate=sd_exact.tolist()),
        "eq5_stratified_mc": over_images(mc.bits_per_dim, eq5, cost=num_train, K=num_train - 1,
                                         sd_one_estimate=sd_mc.tolist()),
        "eq3_trajectory": over_images(traj.mean(1), eq5, cost=m * num_train, sd_one_estimate=sd_traj.tolist(),
                                      z_minus_eq5=((traj.mean(1) - eq5[:n]) / diff_se).tolist()),
    }  # fmt: skip
    for k in settings["iw"]:
        bpd, se = importance_weighted_bound(log_w, k, num_dims)
        groups = [v if math.isfinite(v) else None for v in se.tolist()]
        estimators[f"iw_{k}"] = over_images(bpd, eq5, cost=k * num_train, K=k, stderr_over_groups=groups)
    log(f"likelihood: probability-flow ODE of {settings['ode_images']} images")
    tol = settings["tol"]
    ode = timed_as("ode", lambda: log_likelihood(pipe, images[: settings["ode_images"]], "ode", rtol=tol, atol=tol,
                                              generator=torch.manual_seed(0)))  # fmt: skip
    per_image = {k: v / len(ode.bits_per_dim) for k, v in seconds["ode"].items()}
    estimators["ode"] = over_images(ode.bits_per_dim, eq5, nfe=ode.details["nfe"].tolist(), rtol=tol, atol=tol,
                                    seconds_per_image=per_image, divergence="rademacher", num_probes=1,
                                    eps=1e-5)  # fmt: skip
    pooled = lambda sd: (sd**2).mean().item()  # noqa: E731  variance of one estimate, pooled over its images
    return {
        "num_images": len(x0), "T": num_train, "repeats": len(exact), "trajectory_images": n, "trajectories": m,
        "trajectory_image_repeats": len(on_traj), "load_average": load, "seconds": seconds, "estimators": estimators,
        "variance_one_estimate": {"eq3_trajectory": pooled(sd_traj), "eq5_exact": pooled(sd_on_traj),  # same images
                                  "eq5_stratified_mc": pooled(sd_mc[:n]), "eq5_exact_all_images": pooled(sd_exact),
                                  "eq5_stratified_mc_all_images": pooled(sd_mc)},
        "rate_distortion": {"rate_bits_per_dim": rate.mean(0).tolist(), "distortion_rmse": distortion.mean(0).tolist()},
    }  # fmt: skip


def earlier_solvers(earlier: dict | None) -> dict | None:
    """The solver comparison of an earlier likelihood.json, with when and on which digits weights it was measured."""
    old = earlier or {}
    if "solvers" not in old:
        return None
    sha256 = old.get("models", {}).get("digits", old.get("training", {})).get("parameter_sha256")
    return {"measured": old["machine"]["date_utc"], "load_average": old["machine"]["load_average"],
            "parameter_sha256": sha256, **old["solvers"]}  # fmt: skip


def run(profile: str = "full", earlier: dict | None = None) -> dict:
    """Both models' measurements; the ODE solvers' comparison on the digits model of `earlier` (a likelihood.json),
    kept saying when and on which weights it was measured: no profile measures it again (a few hours on a CPU)."""
    settings, result = PROFILES[profile], {"profile": profile, "model": PROFILES[profile]["model"], "models": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for name in MODELS:
            pipe, images, facts = prepared(name, settings, workdir)
            log(f"likelihood: {name}, {len(images)} held-out images")
            result["models"][name] = {**facts, **measure(pipe, images, settings)}
    if earlier_solvers(earlier):
        result["solvers"] = earlier_solvers(earlier)
    return result


# The GPU section (benchmarks/gpu.py runs it where CUDA is): the DDPM paper's CIFAR-10 model on the CIFAR-10 test set.
GPU_PROFILES = {
    "smoke": {"model": None, "bound_images": 2, "ode_images": 1, "batch": 8, "tol": 1e-3},  # tests this code
    "quick": {"model": "google/ddpm-cifar10-32", "bound_images": 256, "ode_images": 8, "batch": 256, "tol": 1e-5},
    "full": {"model": "google/ddpm-cifar10-32", "bound_images": 10_000, "ode_images": 100, "batch": 500, "tol": 1e-5},
}  # fmt: skip


def cifar10(profile: str = "full", device: str = "cuda", pipe=None, images=None) -> dict:
    """google/ddpm-cifar10-32 on the CIFAR-10 test set (uoft-cs/cifar10): the exact eq. 5 bound against DDPM Table 1
    (<= 3.75 bits/dim for this L_simple model) and the probability-flow ODE (score_sde's settings: rtol = atol =
    eps = 1e-5, one Rademacher probe, uniform dequantization) against Song et al. 2021 Table 2 (3.28 for this
    checkpoint). `pipe`/`images` replace the Hub model and data (the smoke profile's test)."""
    from hf_ddpm.evaluation.bits_per_dim import bits_per_dim
    from hf_ddpm.evaluation.likelihood import likelihood_over_split

    settings = GPU_PROFILES[profile]
    if pipe is None:
        from datasets import load_dataset

        pipe = HFDDPMPipeline.from_pretrained(settings["model"]).to(device)
        test = load_dataset("uoft-cs/cifar10", split="test")
        images = np.stack([np.asarray(im) for im in test.select(range(settings["bound_images"]))["img"]])
        images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # uint8 (N, 3, 32, 32)
    pipe.set_progress_bar_config(disable=True)
    log(f"likelihood (GPU): eq. 5 over {settings['bound_images']} test images")
    bound = bits_per_dim(pipe, images[: settings["bound_images"]], block_size=settings["batch"], split="test split")
    log(f"likelihood (GPU): probability-flow ODE of {settings['ode_images']} test images")
    ode = likelihood_over_split(pipe, images[: settings["ode_images"]], "ode", block_size=settings["batch"],
                                split="test split", options={"rtol": settings["tol"], "atol": settings["tol"]})  # fmt: skip
    return {
        "model": settings["model"] or "a local stand-in", "device": str(pipe.device),
        "bound": {"value": bound.value, "stderr": bound.stderr, "count": bound.count, "seconds": bound.details["seconds"],
                  "paper": DDPM_TABLE1_BOUND_BPD, "source": "DDPM (Ho et al. 2020) Table 1, L_simple: <= 3.75"},
        "ode": {"value": ode.value, "stderr": ode.stderr, "count": ode.count, **{k: ode.details[k] for k in
                ("nfe_per_image", "seconds_per_image")}, "paper": SONG_TABLE2_DDPM_ODE_BPD,
                "source": "Song et al. 2021 (arXiv 2011.13456) Table 2, row 'DDPM': NLL 3.28 bits/dim"},
    }  # fmt: skip
