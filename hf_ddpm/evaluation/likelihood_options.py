"""The command line's likelihood options (`python -m hf_ddpm evaluate --likelihood ...`), without torch: the parser
of every subcommand is built at start, and `export`/`push` never import torch. The methods: evaluation/likelihood.py."""

from __future__ import annotations

import argparse

METHODS = ("bound", "trajectory", "iw", "ode", "rate_distortion")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("likelihood (bits/dim beyond eq. 5; hf_ddpm/evaluation/likelihood.py)")
    group.add_argument("--likelihood", default="bound",
                       help=f"comma-separated methods among {','.join(METHODS)} (default: bound, DDPM eq. 5)")  # fmt: skip
    group.add_argument("--num_trajectories", type=int, default=None, help="trajectory: M (16); iw: a multiple of K")
    group.add_argument("--iw_samples", type=int, default=16, help="iw: K trajectories per bound")
    group.add_argument("--divergence", choices=("rademacher", "gaussian", "exact"), default="rademacher",
                       help="ode: the Skilling-Hutchinson probes, or the exact trace (small images)")  # fmt: skip
    group.add_argument("--num_probes", type=int, default=1, help="ode: Hutchinson probes K per image")
    for flag in ("rtol", "atol", "ode_eps"):
        group.add_argument(f"--{flag}", type=float, default=1e-5, help="ode: score_sde's default 1e-5")
    group.add_argument("--likelihood_dir", default=None,
                       help="finished blocks, for resuming (default: under the cache dir, named by the settings)")  # fmt: skip


def parse_methods(value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--likelihood {value!r}: unknown methods {unknown}; choose among {','.join(METHODS)}")
    return list(dict.fromkeys(methods))


def method_options(method: str, args: argparse.Namespace) -> dict:
    if method == "bound":
        return {"num_timesteps": args.num_timesteps}
    if method in ("trajectory", "iw"):
        options = {"num_trajectories": args.num_trajectories}
        return options | ({"num_samples": args.iw_samples} if method == "iw" else {})
    if method == "ode":
        return {"divergence": args.divergence, "num_probes": args.num_probes, "rtol": args.rtol, "atol": args.atol,
                "eps": args.ode_eps}  # fmt: skip
    return {}


def check_arguments(args: argparse.Namespace) -> None:
    parse_methods(args.likelihood)
    for flag in ("iw_samples", "num_probes") + (("num_trajectories",) if args.num_trajectories is not None else ()):
        value = getattr(args, flag)
        if value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    for flag in ("rtol", "atol"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if not 0 < args.ode_eps < 1:
        raise ValueError(f"--ode_eps must lie in (0, 1), got {args.ode_eps}")
    if args.num_trajectories is not None and "iw" in args.likelihood and args.num_trajectories % args.iw_samples:
        raise ValueError(
            f"--num_trajectories {args.num_trajectories} must be a multiple of --iw_samples {args.iw_samples}"
        )
