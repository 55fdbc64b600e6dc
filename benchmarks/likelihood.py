"""Two models' likelihood every way: DDPM eq. 5 (exact, and stratified Monte Carlo), eq. 3 from whole trajectories,
the importance-weighted bound for K = 1 .. 64, the probability-flow ODE (NFE, seconds per image), the rate-distortion
curve; the variance the KL rewrite (eq. 5) removes at equal model evaluations; the ODE solver choice. The models:
the bundled digits, and natural-image tiles cut from scikit-learn's two sample photographs into a PNG folder
(a temporary directory), each trained by hf_ddpm's own loop with the same UNet, T, batch and steps.

    python -m benchmarks.likelihood [--profile full] [--models_dir DIR]    # writes results/likelihood.json

Equal model evaluations: one exact pass of eq. 5, one Monte Carlo pass with K = T - 1 timesteps (+ the decoder) and
one trajectory of eq. 3 all cost T evaluations per image. The spread of one eq. 5 pass is measured over `repeats`
passes with other seeds; that of one trajectory over the trajectories; the Monte Carlo pass reports its own (which can
only overstate it). Every estimator runs on the first images of the same held-out split, so each is also given as a
paired difference from eq. 5 on its own images, with standard errors over images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from hf_ddpm import HFDDPMPipeline
from hf_ddpm.bound import variational_bound
from hf_ddpm.cpu import tune_allocator
from hf_ddpm.data import load_data
from hf_ddpm.evaluation.likelihood import log_likelihood
from hf_ddpm.images import images_to_model_range
from hf_ddpm.likelihood import importance_weighted_bound, rate_distortion, trajectory_log_weights

from .measure import CLOCKS, RESULTS_DIR, load_average, log, measured, read_json, timed, write_json
from .quality import PROFILES as QUALITY_PROFILES
from .quality import train_model
from .report import heading, table

PROFILES = {
    "smoke": {**QUALITY_PROFILES["smoke"], "tiles": 60, "tiles_steps": 3, "images": 2, "repeats": 2,
              "trajectory_repeats": 3, "trajectory_images": 2, "trajectories": 4, "iw": (1, 2, 4), "ode_images": 1,
              "tol": 1e-3, "solvers": False},
    "quick": {**QUALITY_PROFILES["quick"], "tiles": None, "tiles_steps": 150, "images": 4, "repeats": 2,
              "trajectory_repeats": 4, "trajectory_images": 1, "trajectories": 16, "iw": (1, 4, 16), "ode_images": 1,
              "tol": 1e-5, "solvers": False},
    # about 25 minutes on a shared two-core machine (load ~3), both models trained a few minutes' worth; the ODE
    # solvers are kept from the run that measured them (solvers=True measures them again)
    "full": {**QUALITY_PROFILES["full"], "train_steps": 200, "tiles": None, "tiles_steps": 200, "images": 24,
             "repeats": 2, "trajectory_repeats": 10, "trajectory_images": 2, "trajectories": 64, "iw": (1, 4, 16, 64),
             "ode_images": 8, "tol": 1e-5, "solvers": False},
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


def prepared(name: str, settings: dict, models_dir: str, workdir: str) -> tuple[HFDDPMPipeline, torch.Tensor, dict]:
    """The L_simple model of `name`'s data (trained unless `models_dir` holds it) and its held-out images: the split
    training kept out (10%, seed 0)."""
    data = {}
    if name == "tiles":
        folder = image_folder(os.path.join(workdir, "tile-images"), settings["resolution"], settings["tiles"])
        data = {"train_data_dir": folder, "cache_dir": os.path.join(workdir, "cache")}
    model_dir = os.path.join(models_dir, name)
    if not os.path.exists(os.path.join(model_dir, "training_summary.json")):
        steps = settings["tiles_steps"] if name == "tiles" else settings["train_steps"]
        log(f"likelihood: training the L_simple {name} model ({steps} steps)")
        train_model(settings | {"train_steps": steps}, "simple", model_dir, data)
    with open(os.path.join(model_dir, "training_summary.json")) as f:
        summary = json.load(f)
    pipe = HFDDPMPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    held_out = load_data(resolution=settings["resolution"], channels=pipe.unet.config.in_channels, eval_size=0.1,
                         seed=0, **data).eval  # fmt: skip
    facts = {"data": MODELS[name], "held_out_split": len(held_out), "image_shape": list(held_out.shape[1:]),
             **{k: summary.get(k) for k in ("optimizer_steps", "train_seconds", "parameter_sha256")}}  # fmt: skip
    return pipe, held_out[: settings["images"]], facts


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


def solver_comparison(pipe, image: torch.Tensor, tol: float, batch: int = 4) -> dict:
    """The same image's ODE by scipy's RK45 (one image per solve, as hf_ddpm runs it), torchdiffeq's dopri5 and
    torchode's Dopri5 on `batch` copies at once (shared steps vs per-sample steps); seconds per image and NFE."""
    from hf_ddpm.probability_flow import VPSDE, dequantize, epsilon_from_output, ode_log_likelihood

    scheduler, shape = pipe.bound_scheduler(), image.shape[1:]
    sde, num_dims = VPSDE.of(scheduler), int(np.prod(shape))
    y = dequantize(image[:1], torch.manual_seed(0))
    probes = torch.randint(0, 2, (1, *shape), generator=torch.manual_seed(1)).float() * 2 - 1
    started, calls = time.perf_counter(), [0]
    ours = ode_log_likelihood(pipe._denoise, scheduler, y, rtol=tol, atol=tol, generator=torch.manual_seed(1))
    rows = {"scipy solve_ivp RK45 (per image)": {"seconds_per_image": time.perf_counter() - started,
                                                 "nfe": int(ours.num_function_evaluations[0]),
                                                 "log_likelihood": ours.log_likelihood.item()}}  # fmt: skip

    def field(t, state):  # state (B, D + 1); t a scalar (torchdiffeq) or (B,) (torchode)
        calls[0] += 1
        t = t.expand(len(state)) if t.dim() == 0 else t
        x = state[:, :num_dims].reshape(-1, *shape).float().detach().requires_grad_(True)
        alpha_bar = torch.tensor([sde.discrete_alpha_bar(float(s)) for s in t], dtype=torch.float64)
        beta = torch.tensor([sde.beta(float(s)) for s in t], dtype=torch.float64)
        with torch.enable_grad():
            out = pipe._denoise(x, (t * (len(sde.betas) - 1)).float())  # one batch, a timestep per row
            eps = torch.cat([epsilon_from_output(out[i : i + 1], x[i : i + 1], float(alpha_bar[i]), scheduler.config)
                             for i in range(len(x))])  # fmt: skip
            (grad,) = torch.autograd.grad((eps * probes).sum(), x)
        sigma = (1 - alpha_bar).sqrt()[:, None]
        drift = -0.5 * beta[:, None] * (state[:, :num_dims] - eps.detach().double().flatten(1) / sigma)
        div = -0.5 * beta * (num_dims - (grad * probes).flatten(1).sum(1).double() / sigma[:, 0])
        return torch.cat([drift, div[:, None]], dim=1)

    def torchdiffeq_solve(start):
        import torchdiffeq

        span = torch.tensor([1e-5, 1.0], dtype=torch.float64)
        return torchdiffeq.odeint(field, start, span, rtol=tol, atol=tol, method="dopri5")[-1, 0], calls[0]

    def torchode_solve(start):
        import torchode

        term = torchode.ODETerm(field)
        step = torchode.IntegralController(atol=tol, rtol=tol, term=term)
        ends = [torch.full((batch,), v, dtype=torch.float64) for v in (1e-5, 1.0)]
        out = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), step).solve(
            torchode.InitialValueProblem(start, *ends)
        )
        return out.ys[0, -1], int(out.stats["n_f_evals"].max())

    start = torch.cat([y.flatten(1), torch.zeros(1, 1, dtype=torch.float64)], dim=1).expand(batch, -1).clone()
    for name, solve in ((f"torchdiffeq dopri5 (batch {batch}, shared steps)", torchdiffeq_solve),
                        (f"torchode Dopri5 (batch {batch}, per-sample steps)", torchode_solve)):  # fmt: skip
        started, calls[0] = time.perf_counter(), 0
        try:
            end, nfe = solve(start)
        except ImportError as err:
            rows[name] = {"not measured": str(err)}
            continue
        z = end[:num_dims].double()  # log p(y) = log N(z; 0, I) + the integrated divergence
        log_p = -0.5 * (num_dims * math.log(2 * math.pi) + (z**2).sum()) + end[num_dims]
        rows[name] = {"seconds_per_image": (time.perf_counter() - started) / batch, "nfe": nfe,
                      "log_likelihood": log_p.item()}  # fmt: skip
    return {"rtol": tol, "atol": tol, "rows": rows}


def earlier_solvers(earlier: dict | None) -> dict | None:
    """The solver comparison of an earlier likelihood.json, with when and on which digits weights it was measured."""
    old = earlier or {}
    if "solvers" not in old:
        return None
    sha256 = old.get("models", {}).get("digits", old.get("training", {})).get("parameter_sha256")
    return {"measured": old["machine"]["date_utc"], "load_average": old["machine"]["load_average"],
            "parameter_sha256": sha256, **old["solvers"]}  # fmt: skip


def run(profile: str = "full", models_dir: str | None = None, earlier: dict | None = None, keep=None) -> dict:
    """Both models' measurements and the ODE solvers' on the digits model (where the profile leaves them out, those of
    `earlier`, a likelihood.json, are kept, saying when and on which weights); `models_dir` keeps the trained models;
    `keep` is called with the result so far after each model."""
    settings, result = PROFILES[profile], {"profile": profile, "model": PROFILES[profile]["model"], "models": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for name in MODELS:
            pipe, images, facts = prepared(name, settings, models_dir or workdir, workdir)
            log(f"likelihood: {name}, {len(images)} held-out images")
            result["models"][name] = {**facts, **measure(pipe, images, settings)}
            if name == "digits" and settings["solvers"]:
                log("likelihood: ODE solvers side by side")
                result["solvers"] = solver_comparison(pipe, images[:1], settings["tol"])
            elif name == "digits" and earlier_solvers(earlier):
                result["solvers"] = earlier_solvers(earlier)
            if keep is not None:
                keep(result)
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


LABELS = {"eq5_exact": ("eq. 5, exact (all T terms, one x_t each)", "upper bound"),
          "eq5_stratified_mc": ("eq. 5, stratified MC (K = T - 1)", "upper bound (unbiased estimate of eq. 5)"),
          "eq3_trajectory": ("eq. 3, mean of {M} trajectories", "the same bound as eq. 5"),
          "iw": ("importance-weighted, K = {K}", "upper bound, no looser than eq. 3"),
          "ode": ("probability-flow ODE (rtol = atol = {rtol:g}, 1 Rademacher probe)",
                  "exact density of the dequantized image: a bound on P")}  # fmt: skip


def section(r: dict) -> str:
    """The RESULTS.md section of a likelihood.json."""
    ms, pm = r["models"], lambda v, se, f="+.3f": f"{v:{f}}" + ("" if se is None else f" ± {se:.3f}")  # noqa: E731
    first, rows, ode, notes = next(iter(ms.values())), [], [], []
    for key, e in first["estimators"].items():
        cells = [[f"{pm(x['bits_per_dim'], x['stderr'], '.3f')} ({x['images']})",
                  "—" if key == "eq5_exact" else pm(x["minus_eq5"], x["minus_eq5_stderr"]),
                  f"{v**0.5:.4f}" if v else "—"]
                 for x, v in ((m["estimators"][key], m["variance_one_estimate"].get(key))
                              for m in ms.values())]  # fmt: skip
        label, what = LABELS["iw" if key.startswith("iw") else key]
        cost = "NFE (below)" if key == "ode" else f"{e['cost']:,}"
        rows.append([label.format(M=first["trajectories"], **e), cost, what, *sum(cells, [])])
    for name, m in ms.items():
        v, o, rd = m["variance_one_estimate"], m["estimators"]["ode"], m["rate_distortion"]
        below = sum(a < b for a, b in zip(o["per_image"], m["estimators"]["eq5_exact"]["per_image"]))
        ode.append([name, o["images"], f"{np.mean(o['nfe']):.0f} ({min(o['nfe'])}-{max(o['nfe'])})",
                    f"{o['seconds_per_image']['cpu']:.1f}", f"{o['seconds_per_image']['wall']:.1f} (load "
                    f"{m['load_average'][0]})", pm(o["minus_eq5"], o["minus_eq5_stderr"]),
                    f"{below} of {o['images']}"])  # fmt: skip
        z = ", ".join(f"{x:+.1f}" for x in m["estimators"]["eq3_trajectory"]["z_minus_eq5"])
        marks = "; ".join(f"j = {j}: {rd['rate_bits_per_dim'][j]:.3f} bits/dim, RMSE {rd['distortion_rmse'][j]:.1f}"
                          for j in (0, m["T"] // 2, m["T"] - 1, m["T"]))  # fmt: skip
        notes += [f"- **{name}**: variance of one estimate, eq. 3 / eq. 5 exact = "
                  f"{v['eq3_trajectory'] / v['eq5_exact']:.1f}x, eq. 3 / eq. 5 stratified MC = "
                  f"{v['eq3_trajectory'] / v['eq5_stratified_mc']:.0f}x; eq. 3 minus eq. 5 per trajectory image, in "
                  f"combined standard errors: {z}. Rate-distortion: {marks}."]  # fmt: skip
    when = r.get("solvers", {}).get("measured")
    if when:
        sha = r["solvers"]["parameter_sha256"] or "?"
        when = (f"measured {when} UTC (load {r['solvers']['load_average'][0]}) by an earlier run, on the digits "
                f"model with parameter sha256 {sha[:12]}; ")  # fmt: skip
    headers = [h for n in ms for h in (f"{n}: bits/dim ± SE (images)", f"{n}: minus eq. 5", f"{n}: spread of one")]
    lines = heading("Likelihood", r, clocked=False) + [
        f"`python -m benchmarks.likelihood --profile {r['profile']}`: two L_simple models trained by hf_ddpm's "
        f"training, the same {r['model']} UNet, T = {first['T']}, batch {PROFILES[r['profile']]['batch']}: "
        + "; ".join(f"**{n}**, {m['data']} ({'x'.join(map(str, m['image_shape']))}, {m['optimizer_steps']} optimizer "
                    f"steps, {m['held_out_split']} held out)" for n, m in ms.items())
        + ". Bits/dim: the mean over the first held-out images ± its standard error over images (their count in "
        "brackets; no SE for one image); *minus eq. 5*: the paired difference from eq. 5 (exact, the mean of its "
        "passes) on the same images ± its standard error; *spread of one*: the standard deviation of one estimate "
        "costing T model evaluations per image (one pass, one trajectory) over its own randomness, pooled over the "
        f"trajectory images (eq. 5 exact: {first['trajectory_image_repeats']} passes there; the Monte Carlo pass: its "
        "own standard error, which can only overstate it).", "",
        table(["estimator", "model evaluations per image", "what it is", *headers], rows), "",
        "Variance reduction of the KL rewrite at equal model evaluations (T per image), from the spreads above, and "
        "the check that eq. 3 and eq. 5 estimate the same value; rate-distortion (DDPM section 4.3, Fig. 5) from the "
        "first exact pass, mean over images: after j reverse steps, cumulative bits/dim sent and the RMSE of x̂_0 on "
        "[0, 255] (plot: likelihood_rate_distortion.png):", "", *notes, "",
        "Probability-flow ODE (eps = 1e-5; seconds per image: this process's CPU time on one thread, and wall "
        "time beside the 1-minute load average of a shared machine), against eq. 5 on the same images:", "",
        table(["model", "images", "NFE mean (range)", "CPU s/image", "wall s/image", "ODE minus eq. 5",
               "images below their eq. 5"], ode), "",
        "The ODE gives the exact density of another model than the one eq. 5 bounds (the deterministic flow of the "
        "same network, not its reverse chain), so nothing orders the two: the ODE comes out below the bound where the "
        "network's ε is an accurate score (Song et al. 2021: 3.28 against 3.75 bits/dim on CIFAR-10), and each image's "
        "value carries the noise of one Rademacher probe and one dequantization draw."]  # fmt: skip
    if "solvers" in r:
        srows = [[name, f"{v['seconds_per_image']:.2f}", v["nfe"], f"{v['log_likelihood']:.3f}"]
                 for name, v in r["solvers"]["rows"].items() if "nfe" in v]  # fmt: skip
        lines += ["", f"ODE solvers on one digits image (rtol = atol = {r['solvers']['rtol']:g}; {when}wall seconds "
                  "per image):", "", table(["solver", "s/image", "NFE", "log p (nats)"], srows)]  # fmt: skip
    return "\n".join(lines)


def plot(r: dict, results_dir: str) -> None:
    """likelihood_rate_distortion.png, both models' curves (matplotlib, the `bench` extra: none drawn without it)."""
    if importlib.util.find_spec("matplotlib") is None:
        return
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in zip(
        axes, ("distortion_rmse", "rate_bits_per_dim"), ("distortion (RMSE, [0, 255])", "rate (bits/dim)")
    ):
        for name, m in r["models"].items():
            ax.plot(m["rate_distortion"][key], label=name)
        ax.set(xlabel="reverse steps (T - t)", ylabel=label)
    axes[1].legend()
    fig.suptitle("Progressive coding (DDPM Fig. 5)")
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, "likelihood_rate_distortion.png"), dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=tuple(PROFILES), default="quick")
    p.add_argument("--models_dir", help="keep the trained models here and reuse them when run again (default: train "
                   "into a temporary directory)")  # fmt: skip
    p.add_argument("--results_dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread per process beside other load (DESIGN.md, environment facts)
    models_dir = os.path.join(args.models_dir, args.profile) if args.models_dir else None
    allocator = tune_allocator()  # as the package's own programs run (hf_ddpm.cpu)
    earlier = read_json("likelihood", args.results_dir)
    keep = lambda partial: write_json("likelihood-partial", partial, args.results_dir)  # noqa: E731  if it stops
    result = measured("likelihood", lambda: run(args.profile, models_dir, earlier, keep), allocator=allocator)
    path = write_json("likelihood", result, args.results_dir)
    os.remove(os.path.join(args.results_dir, "likelihood-partial.json"))
    plot(result, args.results_dir)
    print(section(result))
    log(f"likelihood: {result['wall_seconds']:.0f} s -> {path}")


if __name__ == "__main__":
    main()
