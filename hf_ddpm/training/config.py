"""Command-line options of `training/train.py` and their validation.

Flag names follow diffusers' `examples/unconditional_image_generation/train_unconditional.py` wherever it has one.
Defaults train the `digits-16-tiny` model on scikit-learn's bundled digits in a few minutes on two CPU cores.
`check_args` rejects bad combinations before anything is written or any process group is started.
"""

from __future__ import annotations

import argparse
import os

import torch

from ..losses import LOSS_TYPES
from ..scheduler import BETA_SCHEDULES, PREDICTION_TYPES, SCHEDULE_ALIASES, VARIANCE_TYPES
from .faults import NAN_POLICIES

DEFAULT_MODEL = "digits-16-tiny"
DEFAULT_SAVE_IMAGES_EPOCHS = 10  # diffusers' default, used when neither --save_images_steps nor _epochs is given
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
SECRET_ARGS = ("hub_token",)  # never written to disk


def _eval_size(value: str) -> float | int:
    """'0.1' -> a fraction of the images, '100' -> a count."""
    try:
        return int(value)
    except ValueError:
        return float(value)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a non-trivial default unless the help text already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        trivial = action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS
        if trivial or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a DDPM (Ho et al. 2020) UNet2DModel with accelerate; with no flags, on the bundled digits.",
        formatter_class=_HelpFormatter,
    )
    # fmt: off
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", help="a Hub dataset id or a local dataset directory (default: the bundled digits)")
    g.add_argument("--dataset_config_name", help="the dataset's configuration, if it has several")
    g.add_argument("--train_data_dir", help="an image folder (read with datasets' imagefolder)")
    g.add_argument("--image_column", help="default: detected (the datasets.Image column, or image, img, ...)")
    g.add_argument("--cache_dir", help="the datasets cache")
    g.add_argument("--resolution", type=int, help="default: the model's sample_size")
    crop = g.add_mutually_exclusive_group()
    crop.add_argument("--center_crop", dest="center_crop", action="store_true", default=True,
                      help="crop the centre square (the default)")
    crop.add_argument("--random_crop", dest="center_crop", action="store_false",
                      help="crop a random square, drawn once per image with --seed")
    g.add_argument("--random_flip", action="store_true", help="flip training images horizontally with probability 1/2")
    g.add_argument("--eval_size", type=_eval_size, default=0.1,
                   help="held-out images for bits/dim: a fraction (float) or a count (int)")
    g.add_argument("--max_train_samples", type=int, help="train on a seeded subset of this many images")
    g.add_argument("--on_corrupt_image", choices=("skip", "stop"), default="skip",
                   help="an image that fails to decode: skip it (one warning with the count and names) or stop")

    g = p.add_argument_group("model")
    g.add_argument("--model_config", "--model_config_name_or_path", dest="model_config",
                   help=f"a UNet preset name or a UNet2DModel JSON config (default: {DEFAULT_MODEL})")
    g.add_argument("--pretrained_model_name_or_path",
                   help="fine-tune: a pipeline directory (unet/ and scheduler/) to start from")

    g = p.add_argument_group("objective")
    g.add_argument("--prediction_type", choices=PREDICTION_TYPES,
                   help="what the UNet predicts (default: epsilon, or the pretrained scheduler's)")
    g.add_argument("--ddpm_num_steps", "--num_train_timesteps", dest="ddpm_num_steps", type=int,
                   help="T (default: 1000, or the pretrained scheduler's)")
    g.add_argument("--ddpm_beta_schedule", "--beta_schedule", dest="ddpm_beta_schedule",
                   choices=BETA_SCHEDULES + tuple(SCHEDULE_ALIASES),
                   help="default: linear, with the paper's endpoints scaled by 1000/T; cosine: Improved DDPM")
    g.add_argument("--variance_type", choices=VARIANCE_TYPES,
                   help="default: fixed_small (learned_range with --loss hybrid), or the pretrained scheduler's")
    g.add_argument("--loss", choices=LOSS_TYPES, default="simple",
                   help="simple: DDPM eq. 14; vlb: the bound; hybrid: simple + 0.001 vlb (needs learned_range)")
    g.add_argument("--importance_sampling", action="store_true",
                   help="sample t by the loss's second moment (Improved DDPM section 3.3; meant for --loss vlb)")
    g.add_argument("--ddpm_num_inference_steps", type=int, default=250,
                   help="sampling steps of the sample grids (a respaced chain when fewer than T)")

    g = p.add_argument_group("optimization (steps are optimizer steps)")
    g.add_argument("--train_batch_size", type=int, default=64, help="images per process per micro-step")
    g.add_argument("--num_epochs", type=int, default=40, help="passes over the training images")
    g.add_argument("--max_train_steps", type=int, help="optimizer steps; overrides --num_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--learning_rate", type=float, default=2e-3, help="peak learning rate of AdamW")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="cosine", help="decay after the warmup")
    g.add_argument("--lr_warmup_steps", type=int, default=100, help="linear warmup from 0")
    g.add_argument("--adam_beta1", type=float, default=0.95, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an EMA of the weights; the saved pipeline holds it (default: on)")
    g.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warmup: decay = 1 - (1 + step/inv_gamma)^-power")
    g.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warmup power")
    g.add_argument("--ema_max_decay", type=float, default=0.9999, help="the EMA decay it warms up to")
    g.add_argument("--seed", type=int, default=0, help="weights, data order, noise: one seed for all")
    g.add_argument("--on_nan", choices=NAN_POLICIES, default="stop",
                   help="a NaN/inf loss or gradient: stop, naming the step, before anything of it is written; "
                        "or skip that step's update with a warning")

    g = p.add_argument_group("precision and speed")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"),
                   help="default: as `accelerate launch` / accelerate config says; fp16 needs CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (accelerate's dynamo backend)")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster on GPUs)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on Ampere+ GPUs")

    g = p.add_argument_group("checkpoints and outputs")
    g.add_argument("--output_dir", default="ddpm-model", help="the pipeline, samples, checkpoints and logs")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in --output_dir: delete its checkpoints and logs")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", help="'latest' (starts fresh if there is none) or a checkpoint directory")
    g.add_argument("--save_model_epochs", type=int, help="also write the pipeline every N epochs")
    g.add_argument("--save_model_steps", type=int, help="also write the pipeline every N steps")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--logger", choices=("tensorboard", "wandb"), default="tensorboard", help="accelerate tracker")
    g.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    g.add_argument("--save_images_epochs", type=int,
                   help=f"a sample grid every N epochs (default: {DEFAULT_SAVE_IMAGES_EPOCHS})")
    g.add_argument("--save_images_steps", type=int, help="a sample grid every N steps instead")
    g.add_argument("--eval_batch_size", type=int, default=16, help="images in each sample grid")
    g.add_argument("--eval_bits_per_dim_steps", type=int,
                   help="Monte Carlo bits/dim on the held-out split every N steps (always at the end)")
    g.add_argument("--eval_num_images", type=int, default=256, help="held-out images in the bits/dim estimate")
    g.add_argument("--eval_num_timesteps", type=int, default=16, help="K sampled terms of the bound per image")

    g = p.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true", help="publish the pipeline and a model card at the end")
    g.add_argument("--hub_model_id", help="the repo id (default: the output directory's name)")
    g.add_argument("--hub_private_repo", action="store_true", help="create the repo private")
    g.add_argument("--hub_token", help="default: the token saved by `hf auth login` (never written to disk)")
    # fmt: on
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def effective_mixed_precision(args) -> str:
    """--mixed_precision, else what `accelerate launch --mixed_precision` put in the environment."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError for an option value or combination that cannot work; nothing is written before this."""
    positive = [
        "train_batch_size",
        "num_epochs",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "eval_batch_size",
        "eval_num_images",
        "eval_num_timesteps",
        "ddpm_num_inference_steps",
    ]
    optional_positive = [
        "max_train_steps",
        "checkpoints_total_limit",
        "save_images_epochs",
        "save_images_steps",
        "save_model_epochs",
        "save_model_steps",
        "eval_bits_per_dim_steps",
        "ddpm_num_steps",
        "resolution",
        "max_train_samples",
    ]
    for name in positive + optional_positive:
        value = getattr(args, name)
        if (value is not None or name in positive) and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name in ("learning_rate", "lr_warmup_steps", "adam_weight_decay", "max_grad_norm", "ema_inv_gamma"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.ema_max_decay <= 1.0:
        raise ValueError(f"--ema_max_decay must lie in [0, 1], got {args.ema_max_decay}")

    precision = effective_mixed_precision(args)
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU (it trains with a gradient scaler for fp16 on CUDA) and none is "
            "available; on a CPU use --mixed_precision bf16 (or no)"
        )
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError(
            f"pass --dataset_name ({args.dataset_name}) or --train_data_dir ({args.train_data_dir}), not both"
        )
    if args.pretrained_model_name_or_path is not None and args.model_config is not None:
        raise ValueError("--model_config and --pretrained_model_name_or_path both choose the model; pass one")
    if args.save_images_epochs is not None and args.save_images_steps is not None:
        raise ValueError("pass --save_images_epochs or --save_images_steps, not both")
    if args.save_model_epochs is not None and args.save_model_steps is not None:
        raise ValueError("pass --save_model_epochs or --save_model_steps, not both")
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        raise ValueError(
            "--resume_from_checkpoint continues the run in --output_dir; --overwrite_output_dir deletes it: pass one"
        )
    hub_flags = [f"--{n}" for n in ("hub_model_id", "hub_private_repo", "hub_token") if getattr(args, n)]
    if hub_flags and not args.push_to_hub:
        raise ValueError(f"{', '.join(hub_flags)} only apply with --push_to_hub, which was not given")

    # The objective. A pretrained scheduler's values are checked against these once it is loaded.
    variance = args.variance_type or "fixed_small"
    if args.loss == "hybrid" and args.variance_type not in (None, "learned_range"):
        raise ValueError(f"--loss hybrid trains the variance and needs --variance_type learned_range, got {variance}")
    if args.loss == "simple" and variance == "learned_range":
        raise ValueError(
            "--variance_type learned_range with --loss simple leaves the variance channels untrained; "
            "use --loss hybrid (Improved DDPM) or --loss vlb"
        )
    if args.loss == "hybrid" and args.variance_type is None and args.pretrained_model_name_or_path is None:
        args.variance_type = "learned_range"  # the only variance that --loss hybrid can train


def serializable_args(args: argparse.Namespace) -> dict:
    """The options as a JSON-ready dict for the model card, without secrets (the Hub token)."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_ARGS}
