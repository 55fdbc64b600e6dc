"""`python -m hf_ddpm evaluate MODEL ...`: bits/dim over a split and the sample metrics, on one or several processes.

    python -m hf_ddpm evaluate OUTPUT_DIR                                  # exact bits/dim on the test/held-out split
    python -m hf_ddpm evaluate OUTPUT_DIR --num_timesteps 100 --num_images 1000     # Monte Carlo, K = 100
    accelerate launch -m hf_ddpm evaluate OUTPUT_DIR --num_samples 50000 --num_inference_steps 1000 \\
        --protocol paper --metrics_out metrics.json                        # the DDPM paper's FID protocol

Given a training output directory, the data options (dataset, folder, files, column, crop, eval_size, seed) are read
from its training_args.json unless given here; without one the bundled digits are used. Nothing is written but the
samples (--sample_dir), the reference statistics cache and --metrics_out, whose every entry names the UNet weights
measured (`weights_sha256`: the sha256 of MODEL's unet/diffusion_pytorch_model.safetensors), so that `push --metrics`
refuses it for another folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..data.sources import DATA_SOURCES, one_source
from ..data.split import parse_eval_size
from ..flags import check_writable
from ..hub_probe import check_dataset_reachable, check_source
from ..launch import later_rank
from ..measured_weights import weights_sha256
from . import likelihood_options
from .schema import PROTOCOLS

logger = logging.getLogger(__name__)
DATA_OPTIONS = {"dataset_name": None, "dataset_config_name": None, "train_data_dir": None, "train_data_files": None,
                "image_column": None, "center_crop": True, "eval_size": 0.1, "seed": 0, "cache_dir": None}  # fmt: skip
SOURCE_OPTIONS = (*DATA_SOURCES, "dataset_config_name", "image_column")  # where the images are


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a pipeline directory (a training --output_dir) or a Hub repo id")
    data = parser.add_argument_group("data (default: the run's own, from MODEL/training_args.json; else the digits)")
    for flag in (
        "dataset_name",
        "dataset_config_name",
        "train_data_dir",
        "train_data_files",
        "image_column",
        "cache_dir",
    ):
        data.add_argument(f"--{flag}", default=None)
    data.add_argument("--eval_size", type=parse_eval_size, default=None, help="held-out fraction or count")
    data.add_argument("--seed", type=int, default=None, help="the split's seed; also the base seed of sampling")
    data.add_argument("--resolution", type=int, default=None, help="must equal the model's sample_size")
    bpd = parser.add_argument_group("bits/dim (DDPM eq. 5)")
    bpd.add_argument("--split", choices=("eval", "train"), default="eval", help="eval: the test/held-out split")
    bpd.add_argument(
        "--num_images",
        "--eval_num_images",
        type=int,
        default=None,
        help="the first N images of the split (all); 0: skip",
    )
    bpd.add_argument(
        "--num_timesteps", "--eval_num_timesteps", type=int, default=None, help="Monte Carlo K (default: exact, all T)"
    )
    likelihood_options.add_arguments(parser)  # --likelihood bound,trajectory,iw,ode,rate_distortion and their options
    sample = parser.add_argument_group("sample metrics: FID, precision/recall (k = 3), KID")
    sample.add_argument("--num_samples", type=int, default=0, help="0: none (the paper: 50000)")
    sample.add_argument("--num_inference_steps", type=int, default=None, help="sampling steps (default: T)")
    sample.add_argument("--protocol", choices=tuple(PROTOCOLS), default="held_out",
                        help="paper: samples vs the training split (DDPM); held_out: vs the held-out split")  # fmt: skip
    sample.add_argument("--reference_count", type=int, default=None, help="reference images (default: all)")
    sample.add_argument("--fid_reference", default=None, help="a mu/sigma .npz made elsewhere (FID only)")
    sample.add_argument("--reference_cache_dir", default=None, help="default: $HF_HOME/hf_ddpm/reference_statistics")
    sample.add_argument("--sample_dir", default=None, help="shards of samples (default: under the cache dir)")
    sample.add_argument("--png", action="store_true", help="also write each sample as a PNG")
    parser.add_argument("--batch_size", type=int, default=64, help="images per block (bits/dim) and per shard")
    parser.add_argument("--metrics_out", default=None, help="JSON for `python -m hf_ddpm push --metrics`")
    parser.add_argument("--device", default=None, help="default: this process's accelerate device")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="CPU threads per process (default: 1 on a machine of <= 4 usable CPUs, else the CPUs "
                             "divided among its processes; OMP_NUM_THREADS also sets it: hf_ddpm/cpu.py)")  # fmt: skip


def data_options(args: argparse.Namespace) -> dict:
    """The data options: given here, else the run's training_args.json, else the defaults. A source typed here
    (--dataset_name, --train_data_dir or --train_data_files: one at most) replaces the run's whole source (its dataset,
    folder, files, config and column); `from_run` says whether the images are the run's own (then converted to the
    model's channels as training did) and `streamed` whether the run streamed them (training on its whole split)."""
    run_args = {}
    path = Path(args.model) / "training_args.json"
    if path.is_file():
        try:
            run_args = json.loads(path.read_text())
        except ValueError as err:  # edited by hand (training writes it whole or not at all)
            raise ValueError(
                f"{path} is not valid JSON ({err}): the run's data options (its source, resolution, held-out split "
                "and seed) are read from it; fix the file"
            ) from None
    if one_source({name: getattr(args, name, None) for name in DATA_SOURCES}, "--"):
        run_args = {k: v for k, v in run_args.items() if k not in SOURCE_OPTIONS}
        from_run = False
    else:
        from_run = bool(run_args)
    resolution = run_args.get("resolution") if args.resolution is None else args.resolution
    return {k: getattr(args, k, None) if getattr(args, k, None) is not None else run_args.get(k, d)
            for k, d in DATA_OPTIONS.items()} | {"resolution": resolution, "from_run": from_run,
                                                 "streamed": from_run and bool(run_args.get("streaming"))}  # fmt: skip


def check_held_out(args: argparse.Namespace, streamed: bool, data) -> None:
    """Refuse to call training images held out: a --streaming run trains on its whole training split, so where the
    source has no test/validation split of its own, the split carved from it here holds images the model saw."""
    if not streamed or data.eval_split is not None:
        return
    asked = {
        "--split eval (the default) for bits/dim": args.split == "eval" and args.num_images != 0,
        "--protocol held_out (the default) for the sample metrics": args.num_samples and args.protocol == "held_out",
    }
    uses = [use for use, given in asked.items() if given]
    if uses:
        raise ValueError(
            f"{args.model} was trained with --streaming on all of {data.source}, which has no test/validation split: "
            f"no image was held out, so {' and '.join(uses)} would measure training images as held-out ones. Pass "
            "--split train and --protocol paper (against the training images, as such), or data the model never saw "
            "(--train_data_dir, --train_data_files or --dataset_name)"
        )


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before any work: counts, the seed, the resolution, the device and the paths to write."""
    for flag in ("num_images", "num_samples", "seed", "resolution", "reference_count", "num_timesteps",
                 "num_inference_steps"):  # fmt: skip
        value, least = getattr(args, flag), 0 if flag in ("num_images", "num_samples", "seed") else 1
        if value is not None and value < least:
            raise ValueError(f"--{flag} must be >= {least}, got {value}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    likelihood_options.check_arguments(args)
    for flag, kind in (("metrics_out", "file"), ("sample_dir", "directory"), ("likelihood_dir", "directory"),
                       ("reference_cache_dir", "directory")):  # fmt: skip
        if getattr(args, flag) is not None:
            check_writable(flag, getattr(args, flag), kind)
    if args.device is not None:
        check_device(args.device)
    if args.num_images == 0 and args.num_samples == 0:
        raise ValueError("nothing to evaluate: --num_images 0 skips bits/dim and --num_samples is 0")
    from .feature_metrics import check_sample_count  # here: it imports torch, which push and export never need

    check_sample_count(args.num_samples, args.fid_reference)  # before any sampling (and any bits/dim)


def check_device(device: str) -> None:
    """Refuse a --device that torch cannot name, or whose kind of accelerator this machine or torch lacks."""
    import torch

    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {device!r} is not a device torch can name; use cpu, cuda, cuda:N, mps or xpu"
        ) from None
    if chosen.type == "cpu":
        return
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}
    if chosen.type not in backend:
        raise ValueError(f"--device {device!r}: evaluation runs on cpu, cuda, mps or xpu, not {chosen.type}")
    if backend[chosen.type] is None or not backend[chosen.type].is_available():
        built = " (this torch was built without CUDA)" if chosen.type == "cuda" and torch.version.cuda is None else ""
        raise ValueError(f"--device {device}: {chosen.type} is not available on this machine{built}; use cpu")
    count = backend[chosen.type].device_count() if hasattr(backend[chosen.type], "device_count") else None
    if chosen.index is not None and count is not None and chosen.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} {chosen.type} device(s), {chosen.type}:0 to "
                         f"{chosen.type}:{count - 1}")  # fmt: skip


def evaluate(args: argparse.Namespace, extractor=None) -> list:
    """Run what `args` asks for; returns the Metrics (every process gets them). `extractor`: the feature
    extractor (default: Inception-v3 on this process's device), injectable for tests."""
    # At the door, before diffusers and the data's readers are imported (seconds): the flags, the model's source
    # and the data's (a Hub that does not answer is named in seconds, not after the libraries' retries).
    check_args(args)
    check_source(args.model, {})
    options = data_options(args)
    resolution, from_run, streamed = options.pop("resolution"), options.pop("from_run"), options.pop("streamed")
    check_dataset_reachable(options["dataset_name"])
    if not later_rank():  # the seconds of imports and loading before the first progress bar are not silent
        print(f"evaluate: loading {args.model} (importing diffusers and the data's readers) ...", file=sys.stderr,
              flush=True)  # fmt: skip
    import torch

    from ..data import load_data
    from ..pipeline import HFDDPMPipeline
    from .likelihood import split_metrics as split_likelihood_metrics
    from .processes import accelerate_state, current_processes

    processes = current_processes()
    device = args.device or accelerate_state().device
    pipe = HFDDPMPipeline.from_pretrained(args.model).to(device)
    # which weights are measured, for the metrics file that push and export check: the file just loaded (a folder's,
    # or the Hub cache's snapshot), hashed now; None where the weights are sharded
    measured = weights_sha256(args.model) if args.metrics_out and processes.is_main else None
    # each sampling shard's and bits/dim block's own steps, on the main process, under the outer bars
    pipe.set_progress_bar_config(disable=not processes.is_main, leave=False)
    channels, height, width = pipe._image_shape
    if resolution is not None and resolution != height:
        raise ValueError(f"the data's resolution {resolution} does not match the model's sample_size {height}x{width}")
    num_train = pipe.scheduler.config.num_train_timesteps
    for flag in ("num_timesteps", "num_inference_steps"):
        if (getattr(args, flag) or 0) > num_train:
            raise ValueError(f"--{flag} {getattr(args, flag)} exceeds the model's T = {num_train}")
    if args.num_samples and args.protocol == "paper" and args.fid_reference is None:
        max_train = args.reference_count or None
    else:
        max_train = 1  # only the held-out images are needed; the split does not depend on it
    if args.split == "train" and args.num_images != 0:
        max_train = None if args.num_images is None else max(args.num_images, max_train or 0)
    # a run's own data is converted to the model's channels as training converted it; other data keeps its own
    # channel count, and a model that takes another is refused (an RGB model is not scored on grayscale digits)
    data = load_data(resolution=height, channels=channels if from_run else None, max_train_samples=max_train, **options)
    if data.train.shape[1] != channels:
        raise ValueError(
            f"the data ({data.source}) has {data.train.shape[1]}-channel images and the model takes {channels}: "
            "evaluate on the data the model was trained on (its training_args.json, or the data flags)"
        )
    check_held_out(args, streamed, data)
    where = {"eval": f"held-out split of {data.source} (eval_size {options['eval_size']}, seed {options['seed']})",
             "train": f"training split of {data.source}"}  # fmt: skip
    if args.num_samples:  # a bad --fid_reference or too few reference images: refused before bits/dim and sampling
        from .sample_quality import check_reference

        check_reference(args, data, where, extractor)
    metrics = []

    def report(metric) -> None:  # each metric once it is done: an interruption later loses none of them
        metrics.append(metric)
        if processes.is_main:
            print(metric.summary(), flush=True)

    if args.num_images != 0:
        images = (data.eval if args.split == "eval" else data.train)[: args.num_images]
        for metric in split_likelihood_metrics(pipe, images, args, seed=options["seed"], split=where[args.split],
                                               processes=processes):  # fmt: skip
            report(metric)
    if args.num_samples:
        from .sample_quality import sample_metrics

        for metric in sample_metrics(pipe, args, data, where, options, processes, extractor, torch.device(device)):
            report(metric)
    if processes.is_main:
        if args.metrics_out:
            from .schema import write_metrics

            Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)  # checked writable at the start
            write_metrics(args.metrics_out, metrics, weights_sha256=measured)
            print(f"wrote {args.metrics_out}")
    return metrics
