"""Reference statistics for the sample metrics: computed once per (data, split, resolution, count, extractor),
saved as `.npz` (mu, sigma, features) with a small `.json` manifest, and reused by every later run; or read from a
mu/sigma `.npz` made elsewhere (the layout pytorch-fid and guided-diffusion's reference batches use).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import write_atomically
from .processes import Processes
from .sample_metrics import statistics

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
    if all(processes.gather([path.is_file()])):  # every process can read it (no one waits in a collective alone)
        reference = _read(path, extractor.dim, description)
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


def _read(path: Path, dim: int, description: str) -> Reference:
    with np.load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path} is not a statistics file: it has {sorted(f.files)}, expected 'mu' and 'sigma'")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        features = f["features"].astype(np.float64) if "features" in f.files else None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(
            f"{path} holds statistics of {mu.shape[-1] if mu.ndim else '?'}-d features (mu {mu.shape}, sigma "
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
    about = json.loads(manifest.read_text()).get("description") if manifest.is_file() else None
    return _read(path, dim, about or f"the statistics in {path.name}")
