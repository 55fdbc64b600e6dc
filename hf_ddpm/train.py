"""Train a DDPM (Ho et al. 2020) with accelerate, from an installed hf_ddpm: `accelerate launch -m hf_ddpm.train [flags]`.

The same run as the checkout's documented entry point `accelerate launch training/train.py [flags]` (which calls
`main` here): with no flags it trains the `digits-16-tiny` UNet on the bundled digits and writes an
`HFDDPMPipeline` to --output_dir; `--help` lists the options. The work is done in `hf_ddpm.training`.

Examples (no checkout needed):
    pip install hf_ddpm
    accelerate launch --num_processes 1 --cpu -m hf_ddpm.train --output_dir outputs/digits
    accelerate launch --multi_gpu --num_processes 8 -m hf_ddpm.train --dataset_name uoft-cs/cifar10 \
        --model_config ddpm-cifar10-32 --mixed_precision bf16
"""

from __future__ import annotations

import sys

from .training.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
