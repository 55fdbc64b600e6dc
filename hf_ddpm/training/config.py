"""The run config of `training/train.py`: typed options, one field per flag, checked whenever a config is built.
`hf_ddpm.training.resolve` is the one place where a value that depends on the run is filled in.

Each group of options is a frozen dataclass (its argparse group); `TrainingConfig` inherits them all, so every
option is read as `config.flag_name`. A field's metadata holds its help text and, where it has them, its aliases, its
lower bound, its parser and the scheduler config key it sets; `hf_ddpm.training.cli` builds the command line and
reads `--config FILE` from the fields. Flag names are diffusers' (`examples/unconditional_image_generation/
train_unconditional.py`) wherever it has one, the library's names are aliases. Defaults train the `digits-16-tiny`
model on scikit-learn's bundled digits in a few minutes on two CPU cores (`make demo`); the papers' settings are the
recipes in training/recipes/.

A config is never changed once built. What was given (`parse_args`) leaves None where the value depends on the run;
`resolve.resolve` returns a new config with every such value filled from the facts of the run (the pretrained
scheduler, the checkpoint's record, the launch, the data), and that config is what trains and what
training_args.json holds.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..chain import TimestepSpacing
from ..data.sources import DATA_SOURCES, one_source
from ..data.split import parse_eval_size
from ..flags import BOUNDS, absolute_path, check_number
from ..losses import LossType, check_objective, default_variance_type
from ..scheduler import PredictionType, VarianceType
from ..schedules import BETA_SCHEDULES, SCHEDULE_ALIASES
from .interruptions import NAN_POLICIES, parse_signals

DEFAULT_MODEL = "digits-16-tiny"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
SECRET_ARGS = ("hub_token",)  # never written to disk
# The options that name local paths (and those that may: a Hub id or a preset name is not one), written absolute into
# training_args.json (`to_json`)
LOCAL_PATHS = ("output_dir", "cache_dir", "train_data_dir", "train_data_files")
MAYBE_PATHS = ("dataset_name", "model_config", "pretrained_model_name_or_path", "resume_from_checkpoint")
# The options of the run's length and LR schedule that a checkpoint records and a resume keeps (`resolve`).
SCHEDULE_OPTIONS = ("max_train_steps", "num_epochs", "lr_scheduler", "lr_warmup_steps", "learning_rate")
# The options whose values live in the state a resume restores: AdamW's param groups (betas, weight decay, epsilon; the
# peak learning rate is a SCHEDULE_OPTION) and the EMA's (its decay and warmup). A checkpoint records them and a resume
# keeps them, saying a flag that differs is not applied (`resolve`): the restored state would override it unseen.
STATE_OPTIONS = ("adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "ema_max_decay", "ema_inv_gamma",
                 "ema_power")  # fmt: skip
# The options that decide which images a run trains on and holds out (with --seed): a checkpoint records them, and a
# resume whose data differs from the checkpoint's names the ones given otherwise (`resume_checks.check_data`).
DATA_OPTIONS = ("dataset_name", "dataset_config_name", "train_data_dir", "train_data_files", "image_column",
                "resolution", "center_crop", "eval_size", "max_train_samples", "streaming")  # fmt: skip
# Options that choose the same thing: a config holds one of each pair (`check_args`), and a flag on the command line
# replaces the config file's other one (`cli.REPLACES`).
EXCLUSIVE = (("model_config", "pretrained_model_name_or_path"), ("save_images_epochs", "save_images_steps"),
             ("save_model_epochs", "save_model_steps"))  # fmt: skip
# The options of a preprocessed dataset that a stream, read as it comes (data/streaming.py), has no use for; each image
# is also cropped at its centre (no --random_crop).
NOT_STREAMED = {
    "max_train_samples": "a stream is read as it comes, no subset is drawn from it",
    "max_in_memory_gb": "a stream is decoded as it comes, a batch ahead, and never held in memory",
    "preprocessing_num_workers": "a stream builds no cache; --dataloader_num_workers decodes it in processes",
}
# The options of a stream that a preprocessed dataset has no use for: another value than the default did nothing.
STREAM_ONLY = {
    "shuffle_buffer_size": "a preprocessed dataset is shuffled whole, each epoch",
    "dataloader_num_workers": "a preprocessed dataset is decoded once, into its cache; --preprocessing_num_workers "
    "decodes it in processes",
}
STREAMING_LENGTH = "--streaming needs --max_train_steps: a stream's length, so its epochs, is not known ahead"

# The defaults that depend on the run (None in the fields), filled by `resolve`:
DEFAULT_BATCH_SIZE = 64  # capped when the training split holds fewer images (the papers' 128: training/recipes/)
DEFAULT_WARMUP_STEPS = 100  # a tenth of the default 1000-step digits run (diffusers: 500, DDPM: 5000)
# A new run's length and LR schedule (a resume keeps its run's): 40 epochs of the 1617 training digits at batch 64 are
# 1000 optimizer steps, a few minutes on two CPU cores (`make demo`). 2e-3 (diffusers: 1e-4) for the 0.81M-parameter
# digits-16-tiny: the 1000-step demo run reaches ~3.0 held-out bits/dim with it (README); no sweep is recorded. A
# 35.7M model wants the paper's 2e-4 (the recipes). The cosine decay is diffusers' default.
NEW_RUN_SCHEDULE = {"num_epochs": 40, "learning_rate": 2e-3, "lr_scheduler": "cosine"}
# A new run's AdamW and EMA settings (STATE_OPTIONS; a resume keeps its run's). AdamW's β1, β2, weight decay and ε
# are diffusers' train_unconditional.py defaults (β1 0.95, not Adam's 0.9); the EMA warms up as diffusers' does
# (inv_gamma 1, power 3/4) to DDPM's decay 0.9999 (appendix B).
NEW_RUN_STATE = {"adam_beta1": 0.95, "adam_beta2": 0.999, "adam_weight_decay": 1e-6, "adam_epsilon": 1e-8,
                 "ema_inv_gamma": 1.0, "ema_power": 3 / 4, "ema_max_decay": 0.9999}  # fmt: skip
# 250 respaced steps: a quarter of T = 1000's cost per grid; benchmarks/results/RESULTS.md measured a learned_range
# model's FID at 250 steps within 3.4% of its 1000 steps' (diffusers' default is 1000)
DEFAULT_INFERENCE_STEPS = 250
DEFAULT_SAVE_IMAGES_EPOCHS = 10  # diffusers' default, used when neither --save_images_steps nor _epochs is given

# The allowed values of each choice are Literal hints (the library's own where it has one): the parser takes its
# choices from them with typing.get_args.
BetaScheduleName = Literal[BETA_SCHEDULES + tuple(SCHEDULE_ALIASES)]  # diffusers' names and Improved DDPM's "cosine"
LRScheduler = Literal[LR_SCHEDULERS]
NanPolicy = Literal[NAN_POLICIES]
MixedPrecision = Literal["no", "fp16", "bf16"]


def _kept(text: str, name: str) -> str:
    """The help of a STATE_OPTION: its text, its new run's value and what a resume does."""
    return f"{text} (default: {NEW_RUN_STATE[name]}; a resume: the run's)"


def option(default=None, help: str = "", *, aliases=(), parse=None, negation=None, key=None, **bounds):  # noqa: A002
    """A run-config field. aliases: more flag names; bounds: the allowed range (min, max, above, below of
    `hf_ddpm.flags.check_number`; a number must also be finite); parse: str -> value for the command line; negation:
    (flag, help) of a flag that sets a bool field to False; key: the scheduler config key the option sets."""
    meta = {"help": help, "aliases": tuple(aliases), "parse": parse, "negation": negation, "key": key,
            **dict.fromkeys(BOUNDS), **bounds}  # fmt: skip
    return field(default=default, metadata=meta)


# fmt: off
@dataclass(frozen=True)
class DataOptions:
    dataset_name: str | None = option(
        help="a Hub dataset id or a local dataset directory (default: the bundled digits)")
    dataset_config_name: str | None = option(help="the dataset's configuration, if it has several")
    train_data_dir: str | None = option(
        help="an image folder, decoded once into a cache keyed by its files' resolved paths, sizes and modification "
             "times (not their contents: a file replaced by one of the same size with its mtime kept is not seen)")
    train_data_files: str | None = option(
        help="data files, comma-separated, globs allowed: parquet, arrow, csv/json of image paths, or image files")
    image_column: str | None = option(help="default: detected (the datasets.Image column, or image, img, ...)")
    cache_dir: str | None = option(
        help="the datasets cache, and the decoded images' cache (shared by runs and resumes). Its key sees each "
             "file's resolved path, size and modification time, not its content: a file replaced by another of the "
             "same size with its mtime kept is not noticed (touch it, or pass a fresh --cache_dir)")
    resolution: int | None = option(help="default: the model's sample_size", min=1)
    center_crop: bool = option(True, "crop the centre square (the default)",
                               negation=("--random_crop", "crop a random square, drawn once per image with --seed"))
    random_flip: bool = option(False, "flip training images horizontally with probability 1/2")
    eval_size: float | int = option(0.1, "held-out images for bits/dim: a fraction (float) or a count (int)",
                                    parse=parse_eval_size)  # 0.1 of the 1797 digits: 180 held out, 1617 to train on
    max_train_samples: int | None = option(help="train on a seeded subset of this many images", min=1)
    on_corrupt_image: Literal["skip", "stop"] = option(
        "skip", "an image that fails to decode: skip it (one warning with the count and names) or stop")
    max_in_memory_gb: float | None = option(
        help="hold the preprocessed images in RAM when they fit this many GB per process, else read batches from "
             "the memory-mapped cache (default: a quarter of the machine's memory over its processes)", min=0)
    preprocessing_num_workers: int | None = option(
        help="processes that decode images into the cache on its first run (default: the CPUs, up to 8)", min=1)
    streaming: bool = option(False, "stream the dataset (Hub or data files) instead of preprocessing it into the "
                                    "cache; decoded in worker processes; resumes at the next batch")
    shuffle_buffer_size: int = option(10_000, "--streaming: the shuffle buffer, in examples", min=1)
    dataloader_num_workers: int = option(
        0, "--streaming: processes that decode images, a batch ahead (0: the training process)", min=0)


@dataclass(frozen=True)
class ModelOptions:
    model_config: str | None = option(
        help=f"a UNet preset name or a UNet2DModel JSON config (default: {DEFAULT_MODEL})",
        aliases=("--model_config_name_or_path",))
    pretrained_model_name_or_path: str | None = option(
        help="fine-tune: a pipeline directory (unet/ and scheduler/) to start from")
    dropout: float | None = option(help="the new UNet's dropout probability (default: the preset's or JSON config's)",
                                   min=0, below=1)  # DDPM: 0.1 on CIFAR-10, 0 at 256² (App. B); Improved DDPM CIFAR-10: 0.3


@dataclass(frozen=True)
class ObjectiveOptions:
    # None = the paper's value for a new model (epsilon, T = 1000, linear, fixed_small), or the pretrained scheduler's
    prediction_type: PredictionType | None = option(
        help="what the UNet predicts (default: epsilon, or the pretrained scheduler's)", key="prediction_type")
    ddpm_num_steps: int | None = option(help="T (default: 1000, or the pretrained scheduler's)",
                                        aliases=("--num_train_timesteps",), min=1, key="num_train_timesteps")
    ddpm_beta_schedule: BetaScheduleName | None = option(
        help="default: linear, with the paper's endpoints scaled by 1000/T; cosine: Improved DDPM",
        aliases=("--beta_schedule",), key="beta_schedule")
    variance_type: VarianceType | None = option(
        help="default: fixed_small (learned_range with --loss hybrid), or the pretrained scheduler's",
        key="variance_type")
    loss: LossType = option("simple",  # DDPM section 3.4 and Table 2: L_simple gave the paper's best FID (3.17)
                            "simple: DDPM eq. 14; vlb: the bound; hybrid: simple + 0.001 vlb (needs learned_range)",
                            key="loss")
    importance_sampling: bool = option(
        False, "sample t by the loss's second moment (Improved DDPM section 3.3; meant for --loss vlb)")
    ddpm_num_inference_steps: int | None = option(
        help=f"sampling steps of the sample grids (default: {DEFAULT_INFERENCE_STEPS}, or T if smaller; a respaced "
             "chain when fewer than T)", min=1, aliases=("--num_inference_steps",))  # `evaluate`'s name
    timestep_spacing: TimestepSpacing | None = option(
        help="the timesteps a respaced chain visits, saved with the pipeline: leading (diffusers' default), linspace "
             "(Improved DDPM's: T-1 to 0 evenly, rounded), trailing (default: leading, or the pretrained scheduler's)",
        key="timestep_spacing")


@dataclass(frozen=True)
class OptimizationOptions:
    train_batch_size: int | None = option(
        help=f"images per process per micro-step (default: {DEFAULT_BATCH_SIZE}), capped to fit a smaller training "
             "set", min=1)
    num_epochs: int | None = option(
        help=f"passes over the training images (default: {NEW_RUN_SCHEDULE['num_epochs']}; a resume: the run's)", min=1)
    max_train_steps: int | None = option(help="optimizer steps; overrides --num_epochs", min=1)
    gradient_accumulation_steps: int = option(1, "micro-steps per optimizer step", min=1)
    learning_rate: float | None = option(
        help=f"peak learning rate of AdamW (default: {NEW_RUN_SCHEDULE['learning_rate']}; a resume: the run's)", min=0)
    lr_scheduler: LRScheduler | None = option(
        help=f"decay after the warmup (default: {NEW_RUN_SCHEDULE['lr_scheduler']}; a resume: the run's)")
    lr_warmup_steps: int | None = option(
        help=f"linear warmup from 0 (default: {DEFAULT_WARMUP_STEPS}, a tenth of a shorter run; a resume: the run's)",
        min=0)
    # A resume keeps its run's values of these and the EMA's (STATE_OPTIONS): the restored state holds them.
    adam_beta1: float | None = option(help=_kept("AdamW beta1", "adam_beta1"), min=0, below=1)  # AdamW's ranges
    adam_beta2: float | None = option(help=_kept("AdamW beta2", "adam_beta2"), min=0, below=1)
    adam_weight_decay: float | None = option(help=_kept("AdamW weight decay", "adam_weight_decay"), min=0)
    adam_epsilon: float | None = option(help=_kept("AdamW epsilon", "adam_epsilon"), above=0)  # 0: 0/0 at a zero grad
    max_grad_norm: float = option(1.0, "gradient clipping; 0 disables it", min=0)  # DDPM's official code clips at 1
    use_ema: bool = option(True, "keep an EMA of the weights; the saved pipeline holds it")
    ema_inv_gamma: float | None = option(
        help=_kept("EMA warmup: decay = 1 - (1 + step/inv_gamma)^-power", "ema_inv_gamma"), above=0)
    ema_power: float | None = option(help=_kept("EMA warmup power", "ema_power"), above=0)  # <= 0: never warms up
    ema_max_decay: float | None = option(help=_kept("the EMA decay it warms up to", "ema_max_decay"), min=0, max=1)
    seed: int = option(0, "weights, data order, noise: one seed for all", min=0, max=2**32 - 1)  # torch's, numpy's
    on_nan: NanPolicy = option("stop", "a NaN/inf loss or gradient: stop, naming the step, before anything of it is "
                                       "written; or skip that step's update with a warning")


@dataclass(frozen=True)
class PrecisionOptions:
    mixed_precision: MixedPrecision | None = option(
        help="default: as `accelerate launch` / accelerate config says, or the resumed checkpoint's; fp16 needs CUDA")
    compile: bool = option(False, "torch.compile the UNet (accelerate's dynamo backend)")
    channels_last: bool = option(False, "channels-last memory format (faster on GPUs)")
    allow_tf32: bool = option(False, "TF32 matmuls and convolutions on Ampere+ GPUs")
    # one thread per process: two OpenMP threads on two busy cores ran 20-60x slower (README, Training)
    num_threads: int | None = option(
        help="CPU threads per process (torch.set_num_threads; default: the CPUs this process may use divided by the "
             "processes on this machine, at most 1 when other load is likely: see README)", min=1)


@dataclass(frozen=True)
class OutputOptions:
    output_dir: str = option("ddpm-model", "the pipeline, samples, checkpoints and logs")
    overwrite_output_dir: bool = option(
        False, "start over in --output_dir: delete what an earlier run wrote there (never other files)")
    allow_nonempty_output_dir: bool = option(
        False, "train in a non-empty --output_dir that holds no earlier run (its files are left untouched)")
    # what SLURM (--signal), Kubernetes, spot instances and Ctrl-C send before a kill
    preemption_signals: str = option(
        "TERM,INT,USR1", "signals that stop the run at the next optimizer step with a checkpoint (exit status "
        "128 + the signal number); 'none' keeps the default actions")
    checkpointing_steps: int = option(500, "checkpoint every N steps", min=1)  # diffusers' default
    checkpoints_total_limit: int | None = option(help="keep only the newest N checkpoints", min=1)
    resume_from_checkpoint: str | None = option(
        help="'latest' (starts fresh if there is none) or a checkpoint directory. The resume keeps the run's length, "
             "LR schedule, AdamW and EMA settings, and checks its model, objective, process count and data against "
             "the checkpoint's record: the data's key (for files: their resolved paths, sizes and modification "
             "times, not their contents: a file replaced by one of the same size with its mtime kept is not seen), "
             "its image count and its held-out images, and the options that shape them")
    allow_data_change: bool = option(
        False, "resume although the data changed since the checkpoint (refused otherwise): the held-out split is "
               "drawn again from the data as it is now, and may hold images the model trained on")
    allow_schedule_change: bool = option(
        False, "resume with another length (--max_train_steps, --num_epochs) or LR schedule (--lr_scheduler, "
               "--lr_warmup_steps) than the checkpoint's run (refused otherwise): the schedule is recomputed over the "
               "new length")
    save_model_epochs: int | None = option(help="also write the pipeline every N epochs", min=1)
    save_model_steps: int | None = option(help="also write the pipeline every N steps", min=1)


@dataclass(frozen=True)
class LoggingOptions:
    logger: Literal["tensorboard", "wandb"] = option("tensorboard", "accelerate tracker")
    logging_dir: str = option("logs", "relative to --output_dir")
    debug: bool = option(False, "on an error, print the full traceback (by default: one 'error: ...' line)")
    save_images_epochs: int | None = option(
        help=f"a sample grid every N epochs (default: {DEFAULT_SAVE_IMAGES_EPOCHS})", min=1)
    save_images_steps: int | None = option(help="a sample grid every N steps instead", min=1)
    eval_batch_size: int = option(16, "images in each sample grid", min=1)  # diffusers' default: a 4 x 4 grid
    eval_bits_per_dim_steps: int | None = option(
        help="Monte Carlo bits/dim on the held-out split every N steps (always at the end)", min=1)
    # the names of `python -m hf_ddpm evaluate`'s options for the same quantities are aliases
    eval_num_images: int = option(256, "held-out images in the bits/dim estimate", min=1, aliases=("--num_images",))
    # K = 16 stratified terms: a quarter of K = 64's cost, whose 16-image mean has a standard error of ~0.01 bits/dim
    # in benchmarks/results/RESULTS.md (so ~0.02 at K = 16, the error going as 1/√K): enough for a training curve
    eval_num_timesteps: int = option(16, "K sampled terms of the bound per image", min=1,
                                     aliases=("--num_timesteps",))


@dataclass(frozen=True)
class HubOptions:
    push_to_hub: bool = option(False, "publish the pipeline and a model card at the end")
    hub_model_id: str | None = option(help="the repo id (default: the output directory's name)")
    hub_private_repo: bool = option(False, "create the repo private")
    hub_token: str | None = option(help="default: the token saved by `hf auth login` (never written to disk)")
# fmt: on

# (argparse group title, its options), in the order of `--help` and of training_args.json.
GROUPS = (
    ("data", DataOptions),
    ("model", ModelOptions),
    ("objective", ObjectiveOptions),
    ("optimization (steps are optimizer steps)", OptimizationOptions),
    ("precision and speed", PrecisionOptions),
    ("checkpoints and outputs", OutputOptions),
    ("logging and evaluation", LoggingOptions),
    ("hub", HubOptions),
)


@dataclass(frozen=True)
class TrainingConfig(  # the bases in reverse: a dataclass lists the last base's fields first
    HubOptions, LoggingOptions, OutputOptions, PrecisionOptions, OptimizationOptions, ObjectiveOptions, ModelOptions,
    DataOptions,
):  # fmt: skip
    """Everything a training run is given, or (after `resolve`) runs with: `config.flag_name` for each flag."""

    def __post_init__(self):
        check_args(self)

    def to_json(self, absolute: bool = False) -> dict:
        """The options as a JSON-ready dict (training_args.json, read by the model card), without the Hub token; with
        `absolute` (training_args.json), the local paths absolute: `--config` of it resumes from any directory."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SECRET_ARGS}
        paths = (*LOCAL_PATHS, *MAYBE_PATHS) if absolute else ()
        return values | {k: absolute_path(values[k], k in LOCAL_PATHS, k == "train_data_files") for k in paths}

    @property
    def model_source(self) -> str:
        """The preset name, the JSON file or the pretrained pipeline the UNet comes from (for messages)."""
        return self.pretrained_model_name_or_path or self.model_config or DEFAULT_MODEL


def flag_of_key(key: str) -> str | None:
    """The flag that sets a scheduler config key (`num_train_timesteps` -> `--ddpm_num_steps`), None if none does."""
    flags = {f.metadata["key"]: f"--{f.name}" for f in dataclasses.fields(TrainingConfig) if f.metadata["key"]}
    return flags.get(key)


def launch_precision() -> str:
    """What `accelerate launch --mixed_precision` (or accelerate's config file) put in the environment."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def check_args(args: TrainingConfig) -> None:
    """Raise ValueError for an option value or combination that cannot work (each config, given or resolved, is
    checked when it is built)."""
    for f in dataclasses.fields(args):  # each number finite and in its field's range, naming the flag
        check_number(f"--{f.name}", getattr(args, f.name), **{end: f.metadata[end] for end in BOUNDS})

    if (args.mixed_precision or launch_precision()) == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU (it trains with a gradient scaler for fp16 on CUDA) and none is "
            "available; on a CPU use --mixed_precision bf16 (or no)"
        )
    one_source({name: getattr(args, name) for name in DATA_SOURCES}, "--")  # the data's rule: one source at most
    if args.streaming and args.max_train_steps is None and args.resume_from_checkpoint is None:
        raise ValueError(STREAMING_LENGTH)  # a resume takes the checkpoint's (`resolve`)
    for name, why in NOT_STREAMED.items():
        if args.streaming and getattr(args, name) is not None:
            raise ValueError(f"--{name} {getattr(args, name)} does not apply with --streaming ({why}): drop it, or "
                             "train without --streaming")  # fmt: skip
    for name, why in STREAM_ONLY.items():  # a resume's --streaming is first held to its run's (resume_checks)
        value = getattr(args, name)
        stream_only = value != TrainingConfig.__dataclass_fields__[name].default
        if stream_only and not args.streaming and args.resume_from_checkpoint is None:
            raise ValueError(f"--{name} {value} applies only with --streaming ({why}): drop it, or stream the data "
                             "with --streaming")  # fmt: skip
    if args.streaming and not args.center_crop:
        raise ValueError(
            "--random_crop does not apply with --streaming (a streamed image is cropped at its centre): drop it, or "
            "train without --streaming"
        )
    for a, b in EXCLUSIVE:
        if getattr(args, a) is not None and getattr(args, b) is not None:
            raise ValueError(f"--{a} and --{b} choose the same thing: pass one, not both")
    if args.dropout is not None and args.pretrained_model_name_or_path is not None:
        raise ValueError(f"--dropout {args.dropout} is for a new UNet: a pretrained one keeps its own")
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        raise ValueError(
            "--resume_from_checkpoint continues the run in --output_dir; --overwrite_output_dir deletes it: pass one"
        )
    parse_signals(args.preemption_signals)  # raises ValueError naming an unknown signal
    hub_flags = [f"--{n}" for n in ("hub_model_id", "hub_private_repo", "hub_token") if getattr(args, n)]
    if hub_flags and not args.push_to_hub:
        verb = "applies" if len(hub_flags) == 1 else "apply"
        raise ValueError(f"{', '.join(hub_flags)} only {verb} with --push_to_hub, which was not given")
    T, steps = args.ddpm_num_steps, args.ddpm_num_inference_steps
    if T is not None and steps is not None and steps > T:  # checked now, not at the first sample grid
        raise ValueError(f"--ddpm_num_inference_steps {steps} exceeds the {T} training timesteps (T); choose 1 to {T}")
    # The objective; a pretrained scheduler's variance_type, when no flag overrides it, is checked once resolved.
    if args.variance_type is not None or args.pretrained_model_name_or_path is None:
        source = "--variance_type" if args.pretrained_model_name_or_path is None else "the scheduler"
        check_objective(args.loss, args.variance_type or default_variance_type(args.loss), source)
