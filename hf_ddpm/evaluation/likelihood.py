"""The likelihood of images under a pipeline, every estimator behind one call, and over a split in resumable blocks.

    pipe.log_likelihood(images, method="bound" | "trajectory" | "iw" | "ode" | "rate_distortion", ...)
    python -m hf_ddpm evaluate MODEL --likelihood bound,trajectory,iw,ode,rate_distortion

Every method reports bits/dim per image, an upper bound on -log2 P(x) / D of the 8-bit image (in expectation over
its estimator's randomness), with the estimator's standard error, its cost in model evaluations and what it bounds:

- bound: DDPM eq. 5, all T KL terms in closed form (or K stratified terms: num_timesteps=K); T evaluations.
- trajectory: the same bound as DDPM eq. 3 writes it, estimated from M whole trajectories (hf_ddpm.trajectories); M·T.
- iw: the importance-weighted bound (Burda et al. 2016) over K trajectories: between eq. 5's and the true value.
- ode: the probability-flow ODE (Song et al. 2021; hf_ddpm.probability_flow): the exact density of the uniformly
  dequantized image, which bounds the 8-bit likelihood by Jensen; NFE·K evaluations (and as many backward passes).
- rate_distortion: eq. 5's exact pass, with the rate and distortion of progressive coding (DDPM section 4.3).

Over a split (`likelihood_over_split`), the images are cut into blocks seeded `seed + block` and divided among the
processes (bits_per_dim.evaluate_in_blocks): each process integrates its own images with its own solver steps, never
inside a collective, so the numbers do not depend on the process count, and a run started again skips the blocks
already written.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from diffusers.utils import BaseOutput

from ..gaussians import nats_to_bits_per_dim
from ..schedules import check_positive_int
from .bits_per_dim import evaluate_in_blocks, images_digest, mean_and_stderr
from .likelihood_options import METHOD_BOUNDS, METHODS, method_options, parse_methods
from .processes import Processes
from .schema import Metric

METRIC_NAMES = {"bound": "bits_per_dim", "trajectory": "bits_per_dim_trajectory", "iw": "bits_per_dim_iw",
                "ode": "bits_per_dim_ode", "rate_distortion": "rate_distortion"}  # fmt: skip


@dataclass
class LikelihoodOutput(BaseOutput):
    """Bits/dim per image (N,) from one method, and what it is.

    method: the METHODS entry. bits_per_dim: per image. standard_error: of each image's estimate over the
    estimator's own randomness (NaN where one draw gives no estimate of it: the bound's exact pass, one x_t per term;
    the ODE, one dequantization draw per image, whose probes' spread is details["probe_standard_error"]).
    model_evaluations: per image (N,).
    bounds: what the number bounds. details: method-specific (e.g. "nfe" per image, "rate"/"distortion" curves).
    """

    method: str
    bits_per_dim: torch.Tensor
    standard_error: torch.Tensor
    model_evaluations: torch.Tensor
    bounds: str
    details: dict = field(default_factory=dict)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a likelihood method; choose one of {METHODS}")


# The options of `log_likelihood` each method reads, beside generator, batch_size and image_offset.
METHOD_OPTIONS = {
    "bound": ("num_timesteps",),
    "rate_distortion": ("num_timesteps",),  # read to refuse K: rate and distortion need every term
    "trajectory": ("num_trajectories",),
    "iw": ("num_samples", "num_trajectories"),
    "ode": ("divergence", "num_probes", "rtol", "atol", "eps", "max_evaluations"),
}


def _check_options(method: str, given: dict) -> None:
    """ValueError naming the options given (other than at their defaults) that `method` does not read: ignored, they
    would leave the caller believing the estimate was made with them."""
    defaults = inspect.signature(log_likelihood).parameters
    unused = [f"{k}={v!r}" for k, v in given.items() if k not in METHOD_OPTIONS[method] and v != defaults[k].default]
    if unused:
        reads = ", ".join(METHOD_OPTIONS[method])
        raise ValueError(f"method={method!r} does not use {', '.join(unused)}; it reads {reads} (and generator, "
                         "batch_size)")  # fmt: skip


def log_likelihood(
    pipeline,
    images,
    method: str = "bound",
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    num_timesteps: int | None = None,
    num_trajectories: int | None = None,
    num_samples: int = 16,
    divergence: str = "rademacher",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    max_evaluations: int = 10_000,
    image_offset: int = 0,
) -> LikelihoodOutput:
    """Bits/dim of `images` (uint8 (N, C, H, W) tensor or array, or PIL images) by `method` (module docstring).

    bound: num_timesteps (None: exact, K: stratified Monte Carlo). trajectory: num_trajectories M (default 16).
    iw: num_samples K (default 16) and num_trajectories (default K; a multiple of K: the standard error is over the
    M / K groups). ode: divergence ("rademacher", "gaussian", "exact"), num_probes K, rtol, atol, eps (score_sde's
    1e-5), max_evaluations; image_offset numbers the images in its errors. Progress follows the pipeline's
    `set_progress_bar_config`.
    """
    from ..bound import rate_distortion, variational_bound
    from ..images import images_to_model_range
    from ..trajectories import importance_weighted_bound, trajectory_bound, trajectory_log_weights

    _check_method(method)
    _check_options(method, {"num_timesteps": num_timesteps, "num_trajectories": num_trajectories,
                            "num_samples": num_samples, "divergence": divergence, "num_probes": num_probes,
                            "rtol": rtol, "atol": atol, "eps": eps, "max_evaluations": max_evaluations})  # fmt: skip
    check_positive_int(batch_size, "batch_size")
    x_start = images_to_model_range(images, pipeline._image_shape).to(pipeline._execution_device)
    num_images, num_dims = len(x_start), x_start[0].numel()
    scheduler, model_fn, bar = pipeline.bound_scheduler(), pipeline._denoise, pipeline.progress_bar
    num_train = scheduler.config.num_train_timesteps

    def result(bpd, stderr, evaluations, **details):
        cost = torch.full((num_images,), evaluations) if isinstance(evaluations, int) else evaluations
        return LikelihoodOutput(method, bpd.cpu(), stderr.cpu(), cost.long().cpu(), METHOD_BOUNDS[method], details)

    if method in ("bound", "rate_distortion"):
        exact = method == "rate_distortion" or num_timesteps is None
        if method == "rate_distortion" and num_timesteps is not None:
            raise ValueError(f"rate_distortion needs the exact bound (num_timesteps=None), got {num_timesteps}")
        out = variational_bound(model_fn, scheduler, x_start, num_timesteps, batch_size, generator,
                                distortion=method == "rate_distortion", progress_bar=bar)  # fmt: skip
        cost = num_train if exact else num_timesteps + 1  # + the decoder term
        if method == "bound":
            return result(out.bits_per_dim, out.standard_error, cost, num_timesteps=num_timesteps)
        rate, distortion = rate_distortion(out.terms_bpd, out.prior_bpd, out.distortion)
        return result(out.bits_per_dim, out.standard_error, cost, rate=rate.cpu(), distortion=distortion.cpu())
    if method in ("trajectory", "iw"):
        check_positive_int(num_samples, "num_samples (the importance-weighted bound's K)")
        count = num_trajectories if num_trajectories is not None else (16 if method == "trajectory" else num_samples)
        check_positive_int(count, "num_trajectories")
        if method == "iw" and count % num_samples:
            raise ValueError(f"num_trajectories={count} must be a multiple of num_samples K = {num_samples}")
        log_w = trajectory_log_weights(model_fn, scheduler, x_start, count, batch_size, generator, bar)
        if method == "trajectory":
            return result(*trajectory_bound(log_w, num_dims), count * num_train, num_trajectories=count)
        bpd, stderr = importance_weighted_bound(log_w, num_samples, num_dims)
        return result(bpd, stderr, count * num_train, num_samples=num_samples, num_trajectories=count)
    from ..probability_flow import DEQUANTIZATION_OFFSET_BITS, dequantize, ode_log_likelihood

    pixels = ((x_start + 1.0) * 127.5).round().to(torch.uint8)  # the validated images back as 0..255
    out = ode_log_likelihood(model_fn, scheduler, dequantize(pixels, generator), divergence=divergence,
                             num_probes=num_probes, rtol=rtol, atol=atol, eps=eps, max_evaluations=max_evaluations,
                             generator=generator, progress_bar=bar, image_offset=image_offset)  # fmt: skip
    bpd = nats_to_bits_per_dim(-out.log_likelihood, num_dims) + DEQUANTIZATION_OFFSET_BITS
    probes = num_dims if divergence == "exact" else num_probes
    nfe = out.num_function_evaluations
    # One dequantization draw u per image moves its value (a few hundredths to tenths of a bit), and the spread
    # over the probes (0 for the exact trace) does not hold it: unmeasured, so NaN, as for eq. 5's one x_t per term.
    # The probes' own spread, at this u, is in details["probe_standard_error"].
    unmeasured, over_probes = torch.full_like(bpd, float("nan")), nats_to_bits_per_dim(out.standard_error, num_dims)
    return result(bpd, unmeasured, nfe * probes, nfe=nfe, probe_standard_error=over_probes.cpu(),
                  divergence=divergence, num_probes=probes, rtol=rtol, atol=atol, eps=eps)  # fmt: skip


def likelihood_over_split(
    pipeline,
    images: torch.Tensor,
    method: str,
    *,
    options: dict | None = None,
    block_size: int = 64,
    seed: int = 0,
    split: str = "held-out split",
    processes: Processes | None = None,
    block_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Metric:
    """Mean bits/dim of `method` over `images` (uint8 (N, C, H, W)) and its standard error over images, as a Metric
    named METRIC_NAMES[method]. `options`: log_likelihood's keyword arguments. Block b runs with a generator
    seeded seed + b; `block_dir` keeps each finished block, so that an interrupted run resumes."""
    _check_method(method)
    options = dict(options or {})
    started = time.perf_counter()

    def compute(block, generator, first):
        out = log_likelihood(pipeline, block, method, generator=generator, batch_size=block_size,
                             image_offset=first, **options)  # fmt: skip
        arrays = {"bits_per_dim": out.bits_per_dim, "standard_error": out.standard_error,
                  "model_evaluations": out.model_evaluations}  # fmt: skip
        arrays.update({k: v for k, v in out.details.items() if isinstance(v, torch.Tensor)})
        return arrays

    settings = {"method": method, "options": options}
    values = evaluate_in_blocks(pipeline, images, compute, block_size=block_size, seed=seed, processes=processes,
                                block_dir=block_dir, settings=settings, desc=METRIC_NAMES[method], progress=progress)  # fmt: skip
    bpd = values["bits_per_dim"]
    value, stderr = mean_and_stderr(bpd, values["standard_error"])
    details = {"method": method, "bounds": METHOD_BOUNDS[method], "num_images": len(bpd), "split": split,
               "block_size": block_size, "seed": seed, **options,
               "model_evaluations_per_image": values["model_evaluations"].double().mean().item(),
               "seconds": time.perf_counter() - started}  # fmt: skip
    if "nfe" in values:
        details["nfe_per_image"] = {"mean": values["nfe"].double().mean().item(), "max": int(values["nfe"].max())}
        details["seconds_per_image"] = details["seconds"] / len(bpd)
    if "rate" in values:  # the mean curve, in the order the receiver gets x_{T-1}, ..., x_0, then the data
        details["rate_bits_per_dim"] = [round(v, 6) for v in values["rate"].mean(0).tolist()]
        details["distortion_rmse"] = [round(v, 4) for v in values["distortion"].mean(0).tolist()]
    how = {"ode": f"probability-flow ODE, {options.get('divergence', 'rademacher')} divergence",
           "iw": f"importance-weighted, K = {options.get('num_samples', 16)}",
           "trajectory": f"eq. 3 from {options.get('num_trajectories') or 16} trajectories per image",
           "bound": "exact bound" if options.get("num_timesteps") is None else f"Monte Carlo, K = {options['num_timesteps']}",
           "rate_distortion": "exact bound with its rate-distortion curve"}[method]  # fmt: skip
    return Metric(
        METRIC_NAMES[method],
        value,
        stderr,
        len(bpd),
        f"{how}; {len(bpd)} image{'s' * (len(bpd) != 1)} of the {split}",
        details,
    )


# ------------------------------------------------------------------ the command line's step


def split_metrics(pipe, images, args, *, seed: int, split: str, processes: Processes) -> Iterator[Metric]:
    """The Metric of each --likelihood method over `images` (the command line's bits/dim step), yielded as soon as
    it is done (a later method may take hours, or be interrupted). Blocks are kept in --likelihood_dir/<method>, or
    for the methods other than the bound (minutes, not hours) in a directory under the cache named by the model's
    fingerprint, the images and the settings, so that the same command started again resumes."""
    from .bits_per_dim import bits_per_dim
    from .reference import default_cache_dir
    from .sample_shards import fingerprint

    identity = None  # the model's and the images' digests, for the default cache's names: computed once
    for method in parse_methods(args.likelihood):
        options = method_options(method, args)
        if args.likelihood_dir is not None:
            block_dir = os.path.join(args.likelihood_dir, method)
        elif method != "bound":
            identity = identity or [fingerprint(pipe), images_digest(images)]
            key = [*identity, method, options, seed, args.batch_size, split]
            block_dir = os.path.join(default_cache_dir().parent, "likelihood", _digest(key))
        else:
            block_dir = None
        common = {"block_size": args.batch_size, "seed": seed, "split": split, "processes": processes,
                  "block_dir": block_dir, "progress": True}  # fmt: skip
        if method == "bound":  # today's bits/dim, unchanged
            yield bits_per_dim(pipe, images, num_timesteps=args.num_timesteps, **common)
        else:
            yield likelihood_over_split(pipe, images, method, options=options, **common)


def _digest(key) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
