"""Run the benchmarks and write benchmarks/results/: one JSON per benchmark, RESULTS.md and PNG plots.

    python -m benchmarks.run                       # everything (about three hours on two CPU cores)
    python -m benchmarks.run --quick               # a few minutes: fewer steps, rounds and samples
    python -m benchmarks.run --only sampling training
    python -m benchmarks.run --train_data_dir ./my_images   # quality also on an image folder (or --dataset_name)
    python -m benchmarks.report                    # re-render RESULTS.md and the plots from the JSON files
    python -m benchmarks.run --only evaluation     # `python -m hf_ddpm evaluate` throughput, paper-protocol projection
    python -m benchmarks.run --only schedulers     # FID against model evaluations (also: python -m benchmarks.schedulers)
    python -m benchmarks.run --only allocator      # the CPU floor under glibc's defaults, mallopt, jemalloc, tcmalloc
    python -m benchmarks.run --only likelihood     # eq. 5, eq. 3, IW, the ODE, rate-distortion on two models

Each JSON records the machine (CPU, cores, threads, versions) and the load average before and after; timings are
medians over interleaved rounds, ratios are taken between runs of the same round.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time

import torch

from hf_ddpm.cpu import tune_allocator

from . import report
from .measure import RESULTS_DIR, log, measured, read_json, write_json

BENCHMARKS = ("sampling", "training", "quality", "schedulers", "gpu", "evaluation", "data", "allocator", "likelihood")
# Timing comparisons run on one thread: on two cores a second OpenMP thread gains little for these small models and
# makes every number hostage to any other process; quality and schedulers (FID: pure throughput) use all cores.
DEFAULT_THREADS = {"sampling": 1, "training": 1, "quality": None, "schedulers": None, "gpu": None, "evaluation": 1,
                   "data": 1, "allocator": 1, "likelihood": 1}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer steps, rounds and samples (a few minutes)")
    mode.add_argument("--smoke", action="store_true", help="tiny models, seconds: checks that the code runs")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks to run")
    p.add_argument(
        "--threads", type=int, help="torch threads for all benchmarks (default: 1 for timing, all for quality)"
    )
    p.add_argument("--results_dir", default=RESULTS_DIR, help="where the JSON files, RESULTS.md and plots go")
    p.add_argument("--verbose", action="store_true", help="show the training loops' logs and progress bars")
    data = p.add_argument_group("quality: also evaluate on this data (the bundled digits always)")
    src = data.add_mutually_exclusive_group()
    src.add_argument("--dataset_name", help="a Hub dataset id or local dataset directory")
    src.add_argument("--train_data_dir", help="an image folder")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column")
    data.add_argument("--max_train_samples", type=int, help="train on a subset of this many images")
    return p.parse_args(argv)


def run_one(name: str, profile: str, args: argparse.Namespace) -> dict:
    module = importlib.import_module(f".{name}", __package__)  # only this benchmark's dependencies
    torch.set_num_threads(args.threads if args.threads is not None else DEFAULT_THREADS[name] or os.cpu_count())
    if name == "quality":
        flags = {k: getattr(args, k) for k in module.DATA_FLAGS}
        return measured(name, lambda: module.run(profile, flags), allocator=args.allocator)
    if name == "likelihood":  # the ODE solvers' table of an earlier run is kept (no profile measures it again)
        earlier = read_json(name, args.results_dir)
        return measured(name, lambda: module.run(profile, earlier=earlier), allocator=args.allocator)
    return measured(name, lambda: module.run(profile), allocator=args.allocator)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # the package's own programs run with hf_ddpm.cpu's allocator settings, so the floors measured here are theirs
    args.allocator = tune_allocator()
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    logging.basicConfig(level=logging.WARNING)  # the training loops log each run's setup at INFO
    for name in ("diffusers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    # torch.compile's warmup is reported: compile into an empty cache, not one a previous run filled
    own_cache = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if own_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hf_ddpm_bench_inductor_")
    started = time.perf_counter()
    try:
        run_all(args, profile)
    finally:
        if own_cache:
            shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)
    report.write(args.results_dir)  # results_dir only: README.md states the headline numbers itself
    log(f"all done in {time.perf_counter() - started:.0f} s; see {os.path.join(args.results_dir, 'RESULTS.md')}")


def run_all(args: argparse.Namespace, profile: str) -> None:
    for name in args.only:
        log(f"=== {name} ({profile}) ===")
        quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO())
        with quiet:  # the training loops' progress bars
            result = run_one(name, profile, args)
        path = write_json(name, result, args.results_dir)
        log(f"{name}: {result['wall_seconds']:.0f} s -> {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
