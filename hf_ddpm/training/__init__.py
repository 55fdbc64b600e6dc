"""Training DDPMs with accelerate: the entry point (`main.main`), the command line (`cli`), the run config and its
resolution (`config`), the loop (`loop`), checkpoints and their run record, interruptions, data batches, the model."""

from .cli import build_parser, parse_args
from .main import train

__all__ = ["build_parser", "parse_args", "train"]
