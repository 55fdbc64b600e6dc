"""Decoding the examples of a stream (streaming.py), in the training process or in worker processes that die with it.

`decode_example` turns one encoded example into a (C, R, R) uint8 image, or a `Failure` that says whether its file
could not be read (the source: missing, no permission, an I/O error) or its bytes are not an image (a corrupt file):
the two are handled differently (a vanished source stops the run; a corrupt image is skipped). `init_worker` starts
each decoding worker: it leaves the preemption signals to the trainer and dies with the process that started it.
"""

from __future__ import annotations

import signal
from typing import NamedTuple

import numpy as np

from .decode import decode_image, read_bytes
from .workers import die_with_parent


class Failure(NamedTuple):
    """Why an example gave no image: `unreadable` (its file could not be read: the source, not the image) or not
    (the bytes are not a decodable image); `message` says what the reader raised."""

    unreadable: bool
    message: str


def init_worker(parent_pid: int) -> None:
    """A decoding worker ignores the signals the training process checkpoints on (a Ctrl-C reaches the whole
    process group: a worker killed by one would break the pool before the trainer's checkpoint), and dies with the
    process that started it (workers.py says why)."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    die_with_parent(parent_pid)


def decode_example(value, resolution: int, channels: int) -> np.ndarray | Failure:
    """(C, R, R) uint8 for one encoded image, or the Failure that says why there is none: the file could not be
    read (missing, no permission, I/O error), or its bytes do not decode."""
    if value.get("bytes") is None and value.get("path"):
        try:
            value = {"bytes": read_bytes(value["path"]), "path": value["path"]}
        except OSError as err:
            return Failure(True, f"{type(err).__name__}: {err.strerror or err}")
    try:
        arr, _ = decode_image(value, resolution, channels, None)
    except Exception as err:  # Pillow's plugins raise OSError, ValueError, SyntaxError, struct.error, ...
        return Failure(False, f"{type(err).__name__}: {err}")
    return np.broadcast_to(arr, (channels, resolution, resolution))
