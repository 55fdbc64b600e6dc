"""`python -m hf_ddpm ...`: the command line of hf_ddpm (see hf_ddpm/cli.py)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
