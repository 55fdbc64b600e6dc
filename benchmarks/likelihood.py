"""The digits model's likelihood every way: DDPM eq. 5 (exact, and stratified Monte Carlo), eq. 3 from whole
trajectories, the importance-weighted bound for K = 1 .. 64, the probability-flow ODE (NFE, seconds per image), the
rate-distortion curve; the variance the KL rewrite (eq. 5) removes at equal model evaluations; the ODE solver choice.

    python -m benchmarks.likelihood [--profile quick] [--model_dir DIR]    # writes results/likelihood.json

Equal model evaluations: one exact pass of eq. 5, one Monte Carlo pass with K = T - 1 timesteps (+ the decoder) and
one trajectory of eq. 3 all cost T evaluations per image. The spread of one eq. 5 pass is measured over `repeats`
passes with other seeds; that of one trajectory over the trajectories; the Monte Carlo pass reports its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from hf_ddpm import HFDDPMPipeline
from hf_ddpm.bound import variational_bound
from hf_ddpm.data import load_data
from hf_ddpm.evaluation.likelihood import log_likelihood
from hf_ddpm.likelihood import importance_weighted_bound, rate_distortion, trajectory_log_weights
from hf_ddpm.pipeline import images_to_model_range

from .common import RESULTS_DIR, log, machine, table, write_json
from .quality import PROFILES as QUALITY_PROFILES
from .quality import train_model

PROFILES = {
    "smoke": {**QUALITY_PROFILES["smoke"], "images": 2, "repeats": 2, "trajectories": 4, "iw": (1, 2, 4),
              "ode_images": 1, "tol": 1e-3, "solvers": False},
    "quick": {**QUALITY_PROFILES["quick"], "images": 2, "repeats": 3, "trajectories": 64, "iw": (1, 4, 16, 64),
              "ode_images": 1, "tol": 1e-5, "solvers": True},
    "full": {**QUALITY_PROFILES["full"], "images": 4, "repeats": 4, "trajectories": 64, "iw": (1, 4, 16, 64),
             "ode_images": 2, "tol": 1e-5, "solvers": True},
}  # fmt: skip
# Song et al. 2021, Table 2: the DDPM (L_simple) CIFAR-10 checkpoint's NLL through the probability-flow ODE, bits/dim
# on uniformly dequantized test data ("DDPM | 3.28"); DDPM's own bound for it (Table 1): <= 3.75.
SONG_TABLE2_DDPM_ODE_BPD, DDPM_TABLE1_BOUND_BPD = 3.28, 3.75


def bound_measurements(pipe, images: torch.Tensor, settings: dict) -> dict:
    """Eq. 5 exact (repeated), stratified MC at K = T - 1, eq. 3 trajectories, IW for each K, rate-distortion."""
    x0, scheduler = images_to_model_range(images, pipe._image_shape), pipe.bound_scheduler()
    num_train, num_dims = scheduler.config.num_train_timesteps, x0[0].numel()
    exact, seconds = [], {}
    for r in range(settings["repeats"]):
        started = time.perf_counter()
        out = variational_bound(pipe._denoise, scheduler, x0, batch_size=256, generator=torch.manual_seed(100 + r),
                                distortion=r == 0)  # fmt: skip
        seconds["exact pass"] = time.perf_counter() - started
        exact.append(out.bits_per_dim.double())
        if r == 0:
            rate, distortion = rate_distortion(out.terms_bpd, out.prior_bpd, out.distortion)
    exact = torch.stack(exact)  # (R, N)
    log(f"likelihood: {settings['repeats']} exact passes, {seconds['exact pass']:.0f} s each")
    mc = variational_bound(pipe._denoise, scheduler, x0, num_timesteps=num_train - 1, batch_size=256,
                           generator=torch.manual_seed(7))  # fmt: skip
    started = time.perf_counter()
    log_w = trajectory_log_weights(pipe._denoise, scheduler, x0, settings["trajectories"], batch_size=256,
                                   generator=torch.manual_seed(8))  # fmt: skip
    seconds["trajectories"] = time.perf_counter() - started
    log(f"likelihood: {log_w.numel()} trajectories in {seconds['trajectories']:.0f} s")
    traj = -log_w / (num_dims * math.log(2))  # (N, M): one eq. 3 estimate per trajectory, bits/dim
    sd_exact, sd_mc, sd_traj = exact.std(0), mc.standard_error.double(), traj.std(1)
    iw = {}
    for k in settings["iw"]:
        bpd, se = importance_weighted_bound(log_w, k, num_dims)
        iw[str(k)] = {"bits_per_dim": bpd.mean().item(), "stderr_over_groups": [_finite(v) for v in se.tolist()]}
    diff = traj.mean(1) - exact.mean(0)
    diff_se = (sd_traj**2 / traj.shape[1] + sd_exact**2 / len(exact)).sqrt()
    return {
        "num_images": len(images), "T": num_train, "repeats": settings["repeats"], "trajectories": traj.shape[1],
        "eq5_exact": {"bits_per_dim": exact.mean().item(), "per_image": exact.mean(0).tolist(),
                      "sd_one_pass": sd_exact.tolist()},
        "eq5_stratified_mc": {"bits_per_dim": mc.bits_per_dim.mean().item(), "K": num_train - 1,
                              "sd_one_pass": sd_mc.tolist()},
        "eq3_trajectory": {"bits_per_dim": traj.mean().item(), "per_image": traj.mean(1).tolist(),
                           "sd_one_trajectory": sd_traj.tolist()},
        "eq3_minus_eq5": {"per_image": diff.tolist(), "stderr": diff_se.tolist(),
                          "within_2se": bool(torch.all(diff.abs() <= 2 * diff_se))},
        "variance_ratio_eq3_over_eq5": (sd_traj**2 / sd_exact**2).tolist(),
        "variance_ratio_eq3_over_mc": (sd_traj**2 / sd_mc**2).tolist(),
        "iw": iw, "seconds": seconds,
        "rate_distortion": {"rate_bits_per_dim": rate.mean(0).tolist(), "distortion_rmse": distortion.mean(0).tolist()},
    }  # fmt: skip


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def ode_measurements(pipe, images: torch.Tensor, tol: float) -> dict:
    started = time.perf_counter()
    out = log_likelihood(pipe, images, "ode", generator=torch.manual_seed(0), rtol=tol, atol=tol)
    seconds = time.perf_counter() - started
    return {"bits_per_dim": out.bits_per_dim.mean().item(), "per_image": out.bits_per_dim.tolist(),
            "nfe": out.details["nfe"].tolist(), "seconds_per_image": seconds / len(images), "rtol": tol, "atol": tol,
            "divergence": "rademacher", "num_probes": 1, "eps": 1e-5}  # fmt: skip


def solver_comparison(pipe, image: torch.Tensor, tol: float, batch: int = 4) -> dict:
    """The same image's ODE by scipy's RK45 (one image per solve, as hf_ddpm runs it), torchdiffeq's dopri5 and
    torchode's Dopri5 on `batch` copies at once (shared steps vs per-sample steps); seconds per image and NFE."""
    from hf_ddpm.probability_flow import VPSDE, dequantize, epsilon_from_output, ode_log_likelihood

    scheduler, shape = pipe.bound_scheduler(), image.shape[1:]
    sde, num_dims = VPSDE.of(scheduler), int(np.prod(shape))
    y = dequantize(image[:1], torch.manual_seed(0))
    probes = torch.randint(0, 2, (1, *shape), generator=torch.manual_seed(1)).float() * 2 - 1
    rows = {}
    started = time.perf_counter()
    ours = ode_log_likelihood(pipe._denoise, scheduler, y, rtol=tol, atol=tol, generator=torch.manual_seed(1))
    rows["scipy solve_ivp RK45 (per image)"] = {"seconds_per_image": time.perf_counter() - started,
                                                "nfe": int(ours.num_function_evaluations[0]),
                                                "log_likelihood": ours.log_likelihood.item()}  # fmt: skip

    def field(t, state):  # state (B, D + 1); t a scalar (torchdiffeq) or (B,) (torchode)
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

    start = torch.cat([y.flatten(1), torch.zeros(1, 1, dtype=torch.float64)], dim=1).expand(batch, -1).clone()
    try:
        import torchdiffeq

        calls = [0]
        counted = lambda t, s: (calls.__setitem__(0, calls[0] + 1), field(t, s))[1]
        started = time.perf_counter()
        end = torchdiffeq.odeint(counted, start, torch.tensor([1e-5, 1.0], dtype=torch.float64), rtol=tol, atol=tol,
                                 method="dopri5")[-1]  # fmt: skip
        rows[f"torchdiffeq dopri5 (batch {batch}, shared steps)"] = {
            "seconds_per_image": (time.perf_counter() - started) / batch, "nfe": calls[0],
            "log_likelihood": _log_p(end[0], num_dims)}  # fmt: skip
    except ImportError as err:
        rows["torchdiffeq"] = {"not measured": str(err)}
    try:
        import torchode

        term = torchode.ODETerm(field)
        solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term),
                                          torchode.IntegralController(atol=tol, rtol=tol, term=term))  # fmt: skip
        started = time.perf_counter()
        problem = torchode.InitialValueProblem(y0=start, t_start=torch.full((batch,), 1e-5, dtype=torch.float64),
                                               t_end=torch.ones(batch, dtype=torch.float64))  # fmt: skip
        solution = solver.solve(problem)
        rows[f"torchode Dopri5 (batch {batch}, per-sample steps)"] = {
            "seconds_per_image": (time.perf_counter() - started) / batch,
            "nfe": int(solution.stats["n_f_evals"].max()), "log_likelihood": _log_p(solution.ys[0, -1], num_dims)}  # fmt: skip
    except ImportError as err:
        rows["torchode"] = {"not measured": str(err)}
    return {"rtol": tol, "atol": tol, "rows": rows}


def _log_p(state: torch.Tensor, num_dims: int) -> float:
    z = state[:num_dims].double()
    return (-0.5 * (num_dims * math.log(2 * math.pi) + (z**2).sum()) + state[num_dims]).item()


def run(profile: str = "full", model_dir: str | None = None) -> dict:
    settings = PROFILES[profile]
    result = {"benchmark": "likelihood", "profile": profile, "machine": machine()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        if model_dir is None:
            log(f"likelihood: training the L_simple digits model ({settings['train_steps']} steps)")
            model_dir = os.path.join(workdir, "model")
            result["training"] = train_model(settings, "simple", model_dir, {})
        else:  # a model this benchmark (or the quality one) trained before
            with open(os.path.join(model_dir, "training_summary.json")) as f:
                summary = json.load(f)
            result["training"] = {k: summary.get(k) for k in ("optimizer_steps", "train_seconds", "parameter_sha256")}
        pipe = HFDDPMPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        data = load_data(
            resolution=settings["resolution"], channels=pipe.unet.config.in_channels, eval_size=0.1, seed=0
        )
        images = data.eval[: settings["images"]]
        log(f"likelihood: bounds of {len(images)} held-out images")
        result["bounds"] = bound_measurements(pipe, images, settings)
        log("likelihood: probability-flow ODE")
        result["ode"] = ode_measurements(pipe, images[: settings["ode_images"]], settings["tol"])
        if settings["solvers"]:
            log("likelihood: ODE solvers side by side")
            result["solvers"] = solver_comparison(pipe, images[:1], settings["tol"])
    result["model"] = settings["model"]
    result["wall_seconds"] = time.perf_counter() - started
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


def section(r: dict) -> str:
    """The RESULTS.md section of a likelihood.json."""
    b, o = r["bounds"], r["ode"]
    ratio = lambda xs: f"{np.median(xs):.0f}x"  # noqa: E731
    rows = [["eq. 5, exact (all T terms)", f"{b['eq5_exact']['bits_per_dim']:.4f}", b["T"], "upper bound",
             f"{np.mean(b['eq5_exact']['sd_one_pass']):.4f}"],
            ["eq. 5, stratified MC (K = T - 1)", f"{b['eq5_stratified_mc']['bits_per_dim']:.4f}", b["T"],
             "upper bound", f"{np.mean(b['eq5_stratified_mc']['sd_one_pass']):.4f}"],
            ["eq. 3, one trajectory", f"{b['eq3_trajectory']['bits_per_dim']:.4f}", b["T"], "upper bound",
             f"{np.mean(b['eq3_trajectory']['sd_one_trajectory']):.4f}"]]  # fmt: skip
    rows += [[f"importance-weighted, K = {k}", f"{v['bits_per_dim']:.4f}", int(k) * b["T"], "upper bound", "—"]
             for k, v in b["iw"].items()]  # fmt: skip
    rows.append([f"probability-flow ODE (rtol = atol = {o['rtol']:g}, 1 Rademacher probe)",
                 f"{o['bits_per_dim']:.4f}", f"NFE {np.mean(o['nfe']):.0f}", "exact density, dequantized (bound)",
                 f"{o['seconds_per_image']:.1f} s/image"])  # fmt: skip
    lines = ["## Likelihood", "", f"`python -m benchmarks.likelihood --profile {r['profile']}`: {b['num_images']} "
             f"held-out digits, the {r['model']} L_simple model, T = {b['T']}. Bits/dim (mean over images); cost in "
             "model evaluations per image; spread: standard deviation of one estimate (one pass / one trajectory) "
             "over its own randomness, mean over images.", "",
             table(["estimator", "bits/dim", "cost", "what it is", "spread of one estimate"], rows), "",
             f"Variance reduction of the KL rewrite at equal model evaluations (T per image), median over images: "
             f"eq. 3 / eq. 5 exact = {ratio(b['variance_ratio_eq3_over_eq5'])}, eq. 3 / stratified MC = "
             f"{ratio(b['variance_ratio_eq3_over_mc'])} (the exact pass's spread from {b['repeats']} repeats: a rough "
             "estimate). Eq. 3 minus eq. 5 per image, in combined standard errors: " + ", ".join(
                 f"{d / se:+.1f}" for d, se in zip(b["eq3_minus_eq5"]["per_image"], b["eq3_minus_eq5"]["stderr"]))
             + "."]  # fmt: skip
    if "solvers" in r:
        srows = [[name, f"{v['seconds_per_image']:.2f}", v["nfe"], f"{v['log_likelihood']:.3f}"]
                 for name, v in r["solvers"]["rows"].items() if "nfe" in v]  # fmt: skip
        lines += ["", f"ODE solvers on one image (rtol = atol = {r['solvers']['rtol']:g}):", "",
                  table(["solver", "s/image", "NFE", "log p (nats)"], srows)]  # fmt: skip
    rd = b["rate_distortion"]
    marks = [0, len(rd["rate_bits_per_dim"]) // 2, len(rd["rate_bits_per_dim"]) - 2, len(rd["rate_bits_per_dim"]) - 1]
    lines += ["", "Rate-distortion (DDPM section 4.3, Fig. 5) from the first exact pass: after j reverse steps, "
              "cumulative bits/dim sent and the RMSE of x̂_0 on [0, 255]: " + "; ".join(
                  f"j = {j}: {rd['rate_bits_per_dim'][j]:.3f} bits/dim, RMSE {rd['distortion_rmse'][j]:.1f}"
                  for j in marks) + " (plot: likelihood_rate_distortion.png)."]  # fmt: skip
    return "\n".join(lines)


def plot(r: dict, results_dir: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rd = r["bounds"]["rate_distortion"]
    steps = np.arange(len(rd["rate_bits_per_dim"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(steps, rd["distortion_rmse"])
    a.set(xlabel="reverse steps (T - t)", ylabel="distortion (RMSE, [0, 255])")
    b.plot(steps, rd["rate_bits_per_dim"])
    b.set(xlabel="reverse steps (T - t)", ylabel="rate (bits/dim)")
    fig.suptitle("Progressive coding (DDPM Fig. 5), digits model")
    fig.tight_layout()
    path = os.path.join(results_dir, "likelihood_rate_distortion.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=tuple(PROFILES), default="quick")
    p.add_argument("--model_dir", default=None, help="a trained digits pipeline (default: train one)")
    p.add_argument("--results_dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread per process beside other load (DESIGN.md, environment facts)
    result = run(args.profile, args.model_dir)
    path = write_json("likelihood", result, args.results_dir)
    plot(result, args.results_dir)
    print(section(result))
    log(f"likelihood: {result['wall_seconds']:.0f} s -> {path}")


if __name__ == "__main__":
    main()
