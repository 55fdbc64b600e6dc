"""Training DDPMs with accelerate: the entry point (`main.main`), the command line (`cli`), the run config and its
resolution (`config`, `resolve`), the loop (`loop`), checkpoints and their run record, interruptions, the output
directory's ownership, the model. The run's images and batches come from hf_ddpm.data (`load_training_data`,
`make_batches`)."""

from .cli import build_parser, parse_args
from .main import train

__all__ = ["build_parser", "parse_args", "train"]
