"""Evaluate a DDPM pipeline: bits/dim on a held-out split and FID, precision/recall and KID of its samples.

    python examples/evaluate.py MODEL                        # exact bound on the run's held-out split
    python examples/evaluate.py MODEL --num_timesteps 100    # unbiased Monte Carlo estimate, 100 timesteps per image
    python examples/evaluate.py MODEL --num_samples 1000 --num_inference_steps 250   # needs `pip install hf_ddpm[eval]`

A thin caller of `python -m hf_ddpm evaluate` (hf_ddpm/evaluation/run.py, where the flags are described): the
same flags, also under `accelerate launch`. --metrics_out writes the JSON that `python -m hf_ddpm push --metrics`
reads.
"""

from __future__ import annotations

from hf_ddpm.cli import main as hf_ddpm_main
from hf_ddpm.evaluation.schema import INCEPTION as FID_EXTRACTOR  # noqa: F401  the one name of the extractor


def main(argv: list[str] | None = None) -> int:
    import sys

    return hf_ddpm_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
