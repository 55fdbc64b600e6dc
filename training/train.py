"""Train a DDPM (Ho et al. 2020) with accelerate: `accelerate launch training/train.py [flags]`.

With no flags it trains the `digits-16-tiny` UNet on scikit-learn's bundled digits (a few minutes on two CPU cores)
and writes an `HFDDPMPipeline` (EMA weights, safetensors) with a sample grid to --output_dir. `--help` lists the
options; they follow diffusers' train_unconditional.py. The work is done in `hf_ddpm.training`; an installed hf_ddpm
runs the same function without a checkout: `accelerate launch -m hf_ddpm.train [flags]` (hf_ddpm/train.py).

Examples:
    accelerate launch --num_processes 1 --cpu training/train.py --output_dir outputs/digits
    accelerate launch --multi_gpu --num_processes 8 training/train.py --dataset_name uoft-cs/cifar10 \
        --model_config ddpm-cifar10-32 --learning_rate 2e-4 --train_batch_size 16 --mixed_precision bf16
    accelerate launch --multi_gpu --num_processes 8 training/train.py --output_dir outputs/digits \
        --resume_from_checkpoint latest

An error ends the output with one line, `error: <message>` (`--debug` prints the traceback above it; accelerate
launch adds its own report of the failed process after it unless it is given `--quiet`). SIGTERM, SIGINT and SIGUSR1
stop the run at the next optimizer step with a checkpoint (before the first step: at once) and exit with status 128 +
the signal number.
"""

import sys

from hf_ddpm.launch import later_rank

if not later_rank():  # one line for the launch at once: importing torch, diffusers and accelerate takes seconds
    print("training/train.py: starting (importing torch, diffusers and accelerate) ...", file=sys.stderr, flush=True)

from hf_ddpm.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
