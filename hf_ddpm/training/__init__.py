"""Training DDPMs with accelerate: options (`config`), the loop (`loop`), checkpoints, batches and evaluation."""

from .config import build_parser, parse_args
from .errors import main
from .loop import train

__all__ = ["build_parser", "main", "parse_args", "train"]
