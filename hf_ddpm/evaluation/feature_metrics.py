"""FID, precision/recall and KID from features of reference images and of samples (float64 (N, d) arrays).

- FID (Heusel et al. 2017): |μ_r - μ_g|² + tr Σ_r + tr Σ_g - 2 tr sqrt(Σ_r Σ_g).
- Precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models", section 2): each point's k-NN radius in its own set (k = 3) defines a manifold, a union of balls;
  precision = share of samples inside the reference manifold, recall = share of reference images inside the
  samples' manifold.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs", section 4): the unbiased MMD² with the kernel
  k(x, y) = (xᵀy / d + 1)³, averaged over random subsets of at most 1000 points of each set.
"""

from __future__ import annotations

import numpy as np
import torch

K_NEAREST = 3  # Kynkäänniemi et al. 2019 use k = 3


def check_sample_count(num_samples: int, fid_reference) -> None:
    """Refuse, before anything is drawn, a sample count the metrics cannot use: FID needs 2 samples (a covariance);
    precision/recall (k-NN radii within the samples) more than K_NEAREST, unless --fid_reference asks for FID only."""
    if not num_samples:
        return
    if num_samples < 2:
        raise ValueError(f"--num_samples {num_samples}: FID needs at least 2 samples (their covariance)")
    if fid_reference is None and num_samples <= K_NEAREST:
        raise ValueError(
            f"--num_samples {num_samples}: precision/recall measure each sample's distance to its k = {K_NEAREST}-th "
            f"nearest other sample, so they need more than {K_NEAREST} samples; pass --num_samples "
            f"{K_NEAREST + 1} or more (or --fid_reference STATS.npz for FID alone)"
        )


def statistics(features: np.ndarray) -> dict:
    """μ and Σ of features (float64), and their count."""
    if len(features) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got {len(features)}")
    return {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False), "n": len(features)}


def frechet_distance(reference: dict, features: np.ndarray) -> float:
    """FID of `features` (n, d) against reference {mu, sigma}.

    tr sqrt(Σ_r Σ_g) is the sum of the square roots of the eigenvalues of a symmetric PSD matrix with the same
    spectrum as Σ_r Σ_g: A Σ_r Aᵀ (n x n, A the centred features / sqrt(n - 1), so Σ_g = AᵀA) when n <= d, else
    S Σ_g S with S = Σ_r^½ (d x d). Both agree with scipy's sqrtm and need no scipy."""
    n = len(features)
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    mu, sigma_r = features.mean(axis=0), reference["sigma"]
    centred = (features - mu) / np.sqrt(n - 1)  # Σ_g = centredᵀ centred
    trace_g = np.einsum("ij,ij->", centred, centred)
    if n <= features.shape[1]:
        product = centred @ sigma_r @ centred.T  # (n, n)
    else:
        values, vectors = np.linalg.eigh(sigma_r)
        root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # Σ_r^½
        product = root @ (centred.T @ centred) @ root  # (d, d)
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu - reference["mu"]
    return float(diff @ diff + np.trace(sigma_r) + trace_g - 2 * trace_sqrt)


def bootstrap_fid(reference: dict, features: np.ndarray, resamples: int, seed: int = 0) -> float:
    """Standard deviation of the FID over bootstrap resamples of the samples' features (its sampling noise)."""
    if resamples < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = len(features)
    return float(
        np.std([frechet_distance(reference, features[rng.integers(0, n, n)]) for _ in range(resamples)], ddof=1)
    )


def _pairwise(a: torch.Tensor, b: torch.Tensor, rows: int):
    """Euclidean distances from a's rows to b, `rows` rows of a at a time: yields (start, (rows, len(b)))."""
    for start in range(0, len(a), rows):
        yield start, torch.cdist(a[start : start + rows], b)


def knn_radii(features: np.ndarray, k: int = 3, rows: int = 1024) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (the point itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} points, got {len(features)}")
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float64))
    out = np.empty(len(x))
    for start, d in _pairwise(x, x, rows):
        out[start : start + len(d)] = d.kthvalue(k + 1, dim=1).values.numpy()  # the smallest, 0, is the point
    return out


def share_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, rows: int = 1024) -> float:
    """Share of `points` inside at least one ball (centre, radius): |p - c| <= r (Kynkäänniemi et al. eq. 1-2)."""
    p = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64))
    c = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float64))
    r = torch.from_numpy(np.asarray(radii, dtype=np.float64))
    inside = sum(int((d <= r).any(dim=1).sum()) for _, d in _pairwise(p, c, rows))
    return inside / len(p)


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = K_NEAREST) -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference`, both (N, d) features."""
    precision = share_inside(samples, reference, knn_radii(reference, k))
    recall = share_inside(reference, samples, knn_radii(samples, k))
    return precision, recall


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def kernel_inception_distance(
    reference: np.ndarray, samples: np.ndarray, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """(KID, its standard deviation over subsets). With both sets within `subset_size` points, one exact
    unbiased estimate on the whole sets (standard deviation 0)."""
    if len(reference) < 2 or len(samples) < 2:
        raise ValueError(f"KID needs at least 2 points in each set, got {len(reference)} and {len(samples)}")
    if len(reference) <= subset_size and len(samples) <= subset_size:
        return _mmd2_unbiased(reference, samples), 0.0
    rng = np.random.default_rng(seed)
    m, n = min(subset_size, len(reference)), min(subset_size, len(samples))
    values = [
        _mmd2_unbiased(
            reference[rng.choice(len(reference), m, replace=False)], samples[rng.choice(len(samples), n, replace=False)]
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values, ddof=1))
