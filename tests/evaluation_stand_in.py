"""A small stand-in for Inception in the evaluation tests, and `python -m hf_ddpm evaluate` run with it.

    python tests/evaluation_stand_in.py MODEL [evaluate flags]          (or as the script of `accelerate launch`)

runs the real evaluation (hf_ddpm.evaluation.run.evaluate) with PixelFeatures as the feature extractor: the logic
(processes, shards, reference cache, metrics) is the same, and no Inception pass (~6 images/s on a CPU) is needed.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from hf_ddpm.evaluation.features import check_images


class PixelFeatures:
    """uint8 (N, C, H, W) → (N, 48): RGB averaged over a 4 x 4 grid of cells, in [0, 1]; counts its images."""

    name, dim = "test stand-in: RGB means of a 4x4 grid", 48

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        rgb = check_images(images).double() / 255
        self.images_seen += len(rgb)
        return F.adaptive_avg_pool2d(rgb, 4).flatten(1).numpy()


if __name__ == "__main__":
    from hf_ddpm.cli import build_parser
    from hf_ddpm.evaluation.processes import close_process_group
    from hf_ddpm.evaluation.run import evaluate

    torch.set_num_threads(1)
    extractor = PixelFeatures()
    evaluate(build_parser().parse_args(["evaluate", *sys.argv[1:]]), extractor=extractor)
    close_process_group()  # as `python -m hf_ddpm evaluate` does
    print(f"stand-in feature extractor: {extractor.images_seen} images")
