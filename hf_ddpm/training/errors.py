"""`training/train.py`'s entry point: one readable line for an error, the documented status for a preemption.

A training error ends the output with `error: <message>` on one line, status 1. The traceback is printed above it
only with --debug (it is the same for every bad option or input, and pushes the message out of sight). A signal
that stopped the run (hf_ddpm/training/preemption.py) exits with 128 + its number after its own line.
"""

from __future__ import annotations

import sys
import traceback

ERROR_STATUS = 1


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined), else its type."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Parse the options and train; returns the exit status (0, 1 for an error, 128 + N after signal N)."""
    from .config import parse_args
    from .loop import train

    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        args = parse_args(argv)
        train(args)
    except SystemExit as stop:  # --help, argparse's usage errors (already printed), a preemption
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else ERROR_STATUS)
    except Exception as err:
        if args.debug if args is not None else "--debug" in argv:  # (also from a --config file once parsed)
            traceback.print_exc()
        sys.stdout.flush()
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return ERROR_STATUS
    return 0
