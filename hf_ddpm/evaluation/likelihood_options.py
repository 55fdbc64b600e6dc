"""The command line's likelihood options (`python -m hf_ddpm evaluate --likelihood ...`), without torch: the parser
of every subcommand is built at start, and `export`/`push` never import torch. The methods: evaluation/likelihood.py."""

from __future__ import annotations

import argparse

METHODS = ("bound", "trajectory", "iw", "ode", "rate_distortion")
METHOD_BOUNDS = {  # what each method's number bounds, in results and on the card
    "bound": "upper bound on -log2 P(x)/D (DDPM eq. 5)",
    "trajectory": "upper bound on -log2 P(x)/D (DDPM eq. 3: eq. 5's bound, estimated from whole trajectories)",
    "iw": "upper bound on -log2 P(x)/D, no looser than eq. 3 (importance-weighted, Burda et al. 2016)",
    "ode": "upper bound on -log2 P(x)/D by uniform dequantization, from the exact density of the probability-flow "
    "ODE (Song et al. 2021)",
    "rate_distortion": "upper bound on -log2 P(x)/D (DDPM eq. 5) as progressive coding: rate and distortion at every t",
}


# The options' values when not given (None on the command line: given or not is then known), and the methods that
# read each: one that none of the methods asked for reads is refused, as log_likelihood refuses it.
DEFAULTS = {"iw_samples": 16, "divergence": "rademacher", "num_probes": 1, "rtol": 1e-5, "atol": 1e-5, "ode_eps": 1e-5}
READ_BY = {"num_timesteps": ("bound",), "num_trajectories": ("trajectory", "iw"), "iw_samples": ("iw",),
           **dict.fromkeys(("divergence", "num_probes", "rtol", "atol", "ode_eps"), ("ode",))}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("likelihood (bits/dim beyond eq. 5; hf_ddpm/evaluation/likelihood.py)")
    group.add_argument("--likelihood", default="bound",
                       help=f"comma-separated methods among {','.join(METHODS)} (default: bound, DDPM eq. 5)")  # fmt: skip
    group.add_argument("--num_trajectories", type=int, default=None, help="trajectory: M (16); iw: a multiple of K")
    helps = {"iw_samples": "iw: K trajectories per bound", "num_probes": "ode: Hutchinson probes K per image",
             "divergence": "ode: the Skilling-Hutchinson probes, or the exact trace (small images)",
             "rtol": "ode: the solver's relative tolerance (score_sde's)",
             "atol": "ode: the solver's absolute tolerance (score_sde's)",
             "ode_eps": "ode: the time ε the integration starts from (score_sde's)"}  # fmt: skip
    for flag, default in DEFAULTS.items():  # None: not given (see DEFAULTS)
        kind = {"type": type(default)} if flag != "divergence" else {"choices": ("rademacher", "gaussian", "exact")}
        group.add_argument(f"--{flag}", default=None, help=f"{helps[flag]} (default: {default})", **kind)
    group.add_argument("--likelihood_dir", default=None,
                       help="finished blocks, for resuming (default: under the cache dir, named by the settings)")  # fmt: skip


def parse_methods(value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--likelihood {value!r}: unknown methods {unknown}; choose among {','.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _value(args: argparse.Namespace, flag: str):
    given = getattr(args, flag)
    return DEFAULTS.get(flag) if given is None else given


def method_options(method: str, args: argparse.Namespace) -> dict:
    if method == "bound":
        return {"num_timesteps": args.num_timesteps}
    if method in ("trajectory", "iw"):
        options = {"num_trajectories": args.num_trajectories}
        return options | ({"num_samples": _value(args, "iw_samples")} if method == "iw" else {})
    if method == "ode":
        return {"divergence": _value(args, "divergence"), "num_probes": _value(args, "num_probes"),
                "rtol": _value(args, "rtol"), "atol": _value(args, "atol"), "eps": _value(args, "ode_eps")}  # fmt: skip
    return {}


def check_arguments(args: argparse.Namespace) -> None:
    methods = parse_methods(args.likelihood)
    for flag in ("iw_samples", "num_probes", "num_trajectories"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    for flag in ("rtol", "atol"):
        if not _value(args, flag) > 0:
            raise ValueError(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if not 0 < _value(args, "ode_eps") < 1:
        raise ValueError(f"--ode_eps must lie in (0, 1), got {args.ode_eps}")
    iw_samples = _value(args, "iw_samples")
    if args.num_trajectories is not None and "iw" in methods and args.num_trajectories % iw_samples:
        raise ValueError(f"--num_trajectories {args.num_trajectories} must be a multiple of --iw_samples {iw_samples}")
    if args.num_images != 0:  # options given that no method asked for reads: refused, not silently dropped
        unread = [flag for flag, readers in READ_BY.items() if getattr(args, flag) is not None
                  and not set(readers) & set(methods)]  # fmt: skip
        if unread:
            said = ", ".join(f"--{flag} (read by {' and '.join(READ_BY[flag])})" for flag in unread)
            raise ValueError(f"--likelihood {','.join(methods)} reads none of {said}: drop it, or add its method")
