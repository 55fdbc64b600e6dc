"""Sample a grid of images from a DDPM pipeline (a Hub repo id or a local directory) and save it as a PNG.

    python examples/generate.py MODEL --out samples.png --num_images 16 --steps 100 --seed 0 --num_threads 1

Fewer steps than the model's T sample the respaced chain (Improved DDPM, section 4); --steps T is the full chain.
--scheduler swaps in one of diffusers' samplers (the same model, fewer model evaluations for the same quality:
benchmarks/schedulers.py), e.g. `--scheduler sde-dpm++2m --steps 20` (the fast one on our models).
"""

from __future__ import annotations

import time

import torch

from hf_ddpm import HFDDPMPipeline
from hf_ddpm.cpu import tune_process
from hf_ddpm.flags import FlagParser
from hf_ddpm.images import check_finite_samples, make_grid

SCHEDULERS = {  # --scheduler -> (diffusers class name, from_config overrides); "ddpm": the pipeline's own
    "ddpm": (None, {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "sde-dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
}


def main(argv: list[str] | None = None) -> None:
    parser = FlagParser(description=__doc__.splitlines()[0])  # one error line, the nearest flag named
    parser.add_argument("model", help="Hub repo id or local pipeline directory (save_pretrained's output)")
    parser.add_argument("--out", default="samples.png", help="PNG file to write")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="sampling steps (at most the model's T)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddpm", help="default: ancestral (DDPM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=None, help="grid rows (default: near square)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # One CPU thread on small machines: beside other load, two OpenMP threads on two cores sampled 4-20x slower
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads (default: hf_ddpm.cpu's policy)")
    args = parser.parse_args(argv)
    tune_process(args.num_threads)  # this script owns the process: threads and glibc's allocator for UNet work

    pipe = HFDDPMPipeline.from_pretrained(args.model).to(args.device)
    class_name, overrides = SCHEDULERS[args.scheduler]
    if class_name is not None:
        import diffusers

        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    num_train = pipe.scheduler.config.num_train_timesteps
    if not 1 <= args.steps <= num_train:
        parser.error(f"--steps must be from 1 to the model's T = {num_train}, got {args.steps}")
    if args.num_images < 1:
        parser.error(f"--num_images must be at least 1, got {args.num_images}")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    images = pipe(
        batch_size=args.num_images, generator=generator, num_inference_steps=args.steps, output_type="np"
    ).images  # (N, H, W, C) in [0, 1]
    seconds = time.perf_counter() - start
    try:
        check_finite_samples(images.transpose(0, 3, 1, 2), pipe.scheduler, args.steps)  # not a grid of black images
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    make_grid(images, num_rows=args.rows).save(args.out)
    print(
        f"wrote {args.out}: {args.num_images} samples, {args.steps} of {num_train} steps ({args.scheduler}), "
        f"seed {args.seed}, {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
