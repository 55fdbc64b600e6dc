"""The held-out split's size, one rule for training, evaluation and every data source: `--eval_size` is a fraction
of the images in [0, 1) or a count of them, and at least one image is left to train on.

No torch and no datasets here: `python -m hf_ddpm` reads the flag without loading either.
"""

from __future__ import annotations

import math


def parse_eval_size(value: str) -> float | int:
    """--eval_size on a command line: '0.1' -> a fraction of the images, '100' -> a count (`check_eval_size`)."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def check_eval_size(eval_size) -> None:
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)) or not 0 <= eval_size:
        raise ValueError(f"eval_size must be a fraction in [0, 1) or an image count >= 0, got {eval_size!r}")
    if isinstance(eval_size, float) and eval_size >= 1:
        raise ValueError(f"eval_size {eval_size!r} as a fraction must be in [0, 1); pass an int for a count")


def eval_count(eval_size: float | int, n: int) -> int:
    """How many of `n` images to hold out: ceil(fraction * n) or the count; at least one must be left to train on."""
    count = math.ceil(eval_size * n) if isinstance(eval_size, float) else eval_size
    if count >= n:
        raise ValueError(f"eval_size {eval_size!r} holds out {count} of the {n} images, leaving none to train on")
    return count
