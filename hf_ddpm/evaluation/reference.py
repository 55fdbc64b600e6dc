"""Reference statistics for the sample metrics: computed once per (data, split, resolution, count, extractor),
saved as `.npz` (mu, sigma, features) with a small `.json` manifest, and reused by every later run; or read from a
mu/sigma `.npz` made elsewhere (the layout pytorch-fid and guided-diffusion's reference batches use).

A cached `.npz` that does not read (truncated, damaged, of other features) is computed again, with a warning that
names it; a `--fid_reference` that does not read is refused naming the file and how to make a good one. Neither is
ever loaded with pickles allowed: a `.npz` of arrays needs none, and unpickling runs code.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import write_atomically
from .feature_metrics import statistics
from .processes import Processes

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """What samples are compared with: μ and Σ of its features, and the features themselves where known
    (precision/recall and KID need them; a mu/sigma file from elsewhere allows FID only)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    count: int
    description: str
    path: str | None = None
    computed: bool = False  # True: the feature extractor ran on the reference images in this run

    @property
    def stats(self) -> dict:
        return {"mu": self.mu, "sigma": self.sigma, "n": self.count}


def default_cache_dir() -> Path:
    """HF_DDPM_CACHE, else hf_ddpm/reference_statistics under HF_HOME (~/.cache/huggingface)."""
    if os.environ.get("HF_DDPM_CACHE"):
        return Path(os.environ["HF_DDPM_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hf_ddpm" / "reference_statistics"


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"reference-{key.get('split', 'images')}-{digest}.npz"


def features_in_blocks(
    extractor,
    images_of_block: Callable[[int], object],
    num_blocks: int,
    processes: Processes,
    *,
    sizes: list[int] | None = None,
    desc: str = "features",
) -> np.ndarray:
    """The extractor's features of every block (divided among processes), gathered in block order. The main
    process shows a progress bar (count and ETA) of its blocks: in images where `sizes` (images per block) is given.
    Inception runs at a few images/s on a CPU, so a few thousand images take minutes."""
    blocks = processes.mine(list(range(num_blocks)))
    total = sum(sizes[b] for b in blocks) if sizes is not None else len(blocks)
    mine = []
    unit = "image" if sizes is not None else "block"
    with tqdm(total=total, desc=desc, unit=unit, disable=not processes.is_main) as bar:
        for b in blocks:
            mine.append((b, extractor(images_of_block(b))))
            bar.update(sizes[b] if sizes is not None else 1)
    gathered = sorted(processes.gather(mine), key=lambda r: r[0])
    return np.concatenate([f for _, f in gathered])


def cached_reference(
    key: dict,
    extractor,
    images: Callable[[], object],
    description: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    block_size: int = 50,  # the Inception batch: the progress bar moves every batch, the features are the same
    processes: Processes | None = None,
) -> Reference:
    """The reference for `key` (what identifies the images: data, split, resolution, channels, count) and the
    extractor: read from the cache, or computed from `images()` (uint8 (N, C, H, W), called only then) and saved."""
    processes = processes or Processes()
    key = {**key, "feature_extractor": extractor.name}
    path = cache_path(cache_dir or default_cache_dir(), key)
    reference = None
    if path.is_file():
        try:
            reference = _read(path, extractor.dim, description, "the cached reference statistics")
        except ReferenceFileError as err:
            logger.warning("%s: computing them again", err)
    if all(processes.gather([reference is not None])):  # every process read it (no one waits in a collective alone)
        logger.info("reference statistics of %s read from %s (no feature extraction)", description, path)
        return reference
    pixels = images()
    blocks = -(-len(pixels) // block_size)
    sizes = [min(block_size, len(pixels) - b * block_size) for b in range(blocks)]
    features = features_in_blocks(extractor, lambda b: pixels[b * block_size : (b + 1) * block_size], blocks,
                                  processes, sizes=sizes, desc="reference statistics")  # fmt: skip
    stats = statistics(features)
    if processes.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest = {**key, "count": len(features), "description": description,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        path.with_suffix(".json").write_text(json.dumps(manifest, indent=2))
        write_atomically(  # the .npz last: its presence means the entry is whole
            path, lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"], features=features), "wb", unique=True
        )
        logger.info("reference statistics of %s saved to %s", description, path)
    processes.barrier()
    return Reference(stats["mu"], stats["sigma"], features, len(features), description, str(path), computed=True)


class ReferenceFileError(ValueError):
    """A statistics `.npz` that cannot be used: truncated, not an archive of arrays, or of other features."""


def _arrays(path: Path, what: str) -> dict:
    """The arrays of an `.npz`, read without pickles; ReferenceFileError naming the file and why it does not read."""
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ReferenceFileError(f"{what} {path} holds a single array, not an .npz archive of mu and sigma")
        with loaded as f:
            return {name: f[name] for name in f.files}
    except (zipfile.BadZipFile, EOFError) as err:
        why = f"it is truncated or damaged ({type(err).__name__})"
    except ValueError as err:  # numpy refuses pickled objects; its message would advise allowing them: do not
        if isinstance(err, ReferenceFileError):
            raise
        why = "it holds pickled Python objects, which are never loaded" if "pickle" in str(err) else str(err)
    except OSError as err:
        why = f"{type(err).__name__}: {err.strerror or err}"
    raise ReferenceFileError(f"{what} {path} cannot be read as an .npz of arrays: {why}")


def _read(path: Path, dim: int, description: str, what: str) -> Reference:
    f = _arrays(path, what)
    if "mu" not in f or "sigma" not in f:
        raise ReferenceFileError(f"{what} {path} is not a statistics file: it has {sorted(f)}, expected 'mu' and 'sigma'")  # fmt: skip
    mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    features = f["features"].astype(np.float64) if "features" in f else None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ReferenceFileError(
            f"{what} {path} holds statistics of {mu.shape[-1] if mu.ndim else '?'}-d features (mu {mu.shape}, sigma "
            f"{sigma.shape}); the feature extractor gives {dim}-d features: mu must be ({dim},) and sigma ({dim}, {dim})"
        )
    count = len(features) if features is not None else -1
    return Reference(mu, sigma, features, count, description, str(path))


def external_reference(path: str | os.PathLike, dim: int) -> Reference:
    """A mu/sigma `.npz` made elsewhere (e.g. published CIFAR-10 training-set statistics); FID only, unless it
    also holds `features`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--fid_reference {path}: no such file")
    manifest = path.with_suffix(".json")
    try:
        about = json.loads(manifest.read_text()).get("description") if manifest.is_file() else None
    except (OSError, ValueError):  # a damaged manifest beside it only loses the description
        about = None
    try:
        return _read(path, dim, about or f"the statistics in {path.name}", "--fid_reference")
    except ReferenceFileError as err:
        raise ReferenceFileError(f"{err}. Make one with np.savez(path, mu=mu, sigma=sigma) from float arrays: mu "
                                 f"({dim},), sigma ({dim}, {dim})") from None  # fmt: skip
