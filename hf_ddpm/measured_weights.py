"""Which weights a metrics file measured: the sha256 of the UNet's one safetensors weights file.

`python -m hf_ddpm evaluate --metrics_out` records it in every entry (WEIGHTS_KEY of evaluation/schema.py), and
`push` / `export` refuse a metrics file whose entries name other weights than the folder's own, so that a card never
carries another model's numbers. The identity is the file as published, `unet/diffusion_pytorch_model.safetensors`
(the Hub shows the same sha256 for it), found in a local folder or, for a Hub repo, in the snapshot of
huggingface_hub's cache that the pipeline was just loaded from. Where the weights are not that one file (sharded:
diffusers reads an index first; not found) nothing is recorded, rather than a value that may be wrong.

    file_sha256(path)                 the sha256 of a file, read in chunks
    weights_sha256(model)             the identity of a pipeline folder's or a cached Hub repo's UNet weights, or None
    check_measured_weights(metrics, pipeline_dir, what)   push's and export's refusal of another model's numbers

Pure Python (hashlib, huggingface_hub's cache lookup): push and export never import torch.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path

from .evaluation.schema import WEIGHTS_KEY

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' one-file weights, as saved and as pushed
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"  # sharded weights: diffusers loads these whenever the index exists
CHUNK = 1 << 20  # bytes read at a time: a 450 MB UNet is never held in memory whole


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (64 hex digits) of the file at `path`, read CHUNK bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def unet_weights_file(model: str | os.PathLike) -> Path | None:
    """The one safetensors file the UNet of `model` loads from: in a pipeline folder its unet/, else the top level
    (a UNet saved alone, the flat layout of google/ddpm-*); for a Hub repo id, that file in huggingface_hub's cache
    (revision main, as `python -m hf_ddpm evaluate` loads it; call after the load). None where the weights are
    sharded or the file is not there."""
    if os.path.isdir(model):
        root = Path(model)
        folder = root / "unet" if (root / "unet").is_dir() else root
        found = {name: folder / name for name in (INDEX_NAME, WEIGHTS_NAME) if (folder / name).is_file()}
    else:
        from huggingface_hub import try_to_load_from_cache

        def cached(name: str) -> Path | None:  # a path, None (not cached) or a marker of a file the repo lacks
            path = try_to_load_from_cache(str(model), name)
            return Path(path) if isinstance(path, str) else None

        prefix = "unet/" if cached("unet/config.json") else ""
        found = {name: path for name in (INDEX_NAME, WEIGHTS_NAME) if (path := cached(prefix + name))}
    return None if INDEX_NAME in found else found.get(WEIGHTS_NAME)


def weights_sha256(model: str | os.PathLike) -> str | None:
    """The sha256 of `unet_weights_file(model)`, or None where there is no such one file."""
    path = unet_weights_file(model)
    return file_sha256(path) if path is not None else None


def check_measured_weights(
    metrics: dict | None, pipeline_dir: str | os.PathLike, what: str, metrics_file: str | os.PathLike | None = None
) -> None:
    """ValueError, one line naming `what` (the metrics file), both digests and the command that measures this
    folder, when an entry of `metrics` names (WEIGHTS_KEY) weights other than the pipeline in `pipeline_dir` holds
    in unet/diffusion_pytorch_model.safetensors, or when its weights are sharded and cannot be compared. Metrics
    without the key (written by hand, by an older hf_ddpm, or in memory) are accepted as they are; a folder whose
    unet/ holds neither file is left to `check_pipeline_dir`, which names what it lacks."""
    named = [
        (name, e[WEIGHTS_KEY]) for name, e in (metrics or {}).items() if isinstance(e, dict) and e.get(WEIGHTS_KEY)
    ]
    if not named:
        return
    unet = Path(pipeline_dir) / "unet"
    if not (unet / WEIGHTS_NAME).is_file() and not (unet / INDEX_NAME).is_file():
        return
    # a file of its own for the new numbers: the one given holds the other model's, which may have cost hours
    own_file = Path(metrics_file or "metrics.json").with_name(f"{Path(pipeline_dir).resolve().name}-metrics.json")
    fix = (
        f"evaluate this folder: python -m hf_ddpm evaluate {shlex.quote(str(pipeline_dir))} --metrics_out "
        f"{shlex.quote(str(own_file))}, and pass that file"
    )
    if (unet / INDEX_NAME).is_file():
        name, digest = named[0]
        raise ValueError(
            f"{what} measured the UNet weights sha256 {digest[:12]} (its {name} entry), and {unet} holds sharded weights "
            f"({INDEX_NAME}), which cannot be compared with them: the card might report another model's numbers; {fix}"
        )
    own = file_sha256(unet / WEIGHTS_NAME)
    for name, digest in named:
        if digest != own:
            raise ValueError(
                f"{what} measured other weights than {pipeline_dir}: its {name} entry names the UNet weights sha256 "
                f"{digest[:12]}, and {unet / WEIGHTS_NAME} has sha256 {own[:12]}, so the card would report another "
                f"model's numbers; {fix}"
            )
