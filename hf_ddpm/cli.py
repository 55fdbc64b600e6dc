"""The `python -m hf_ddpm` command line: push a saved pipeline directory to the Hub, or export what a push uploads.

    python -m hf_ddpm push OUTPUT_DIR --repo_id USER/NAME [--private] [--token TOKEN] [--metrics METRICS.json]
    python -m hf_ddpm export OUTPUT_DIR DEST --repo_id USER/NAME
    python -m hf_ddpm evaluate MODEL [--num_timesteps K] [--num_samples N] [--metrics_out METRICS.json]
    python -m hf_ddpm push-space --space_id USER/NAME --model_id USER/MODEL [--app_dir DIR] [--private] [--token TOKEN]

Flags are spelled with underscores, as in the training script; the dash spellings (--repo-id) are read as the same
flags (hf_ddpm/flags.py).

The token defaults to HF_TOKEN or the one saved by `hf auth login` (a --token on the command line is visible to
other users of the machine in the process list). Errors print one message, never the token, and exit with 1.
"""

from __future__ import annotations

import signal
import sys

from .evaluation.run import add_arguments as add_evaluate_arguments
from .flags import FlagParser
from .hub import export_hub_folder, push_to_hub
from .launch import later_rank
from .model_card import DEFAULT_LICENSE, read_metrics_file
from .push_guards import PUSH_FLAGS, HubPushError, add_push_flags, check_repo_id_value
from .space import add_arguments as add_space_arguments
from .space import run as run_space

INTERRUPTED = (
    "interrupted (SIGINT): the metrics printed above are complete. The same command started again reuses the sample "
    "shards and likelihood blocks written so far (the bound's only with --likelihood_dir)"
)


def build_parser() -> FlagParser:
    parser = FlagParser(prog="python -m hf_ddpm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    push = commands.add_parser("push", help="push a saved HFDDPMPipeline directory (e.g. a training --output_dir)")
    push.add_argument("output_dir", help="the pipeline directory: model_index.json, unet/, scheduler/")
    push.add_argument("--repo_id", required=True, help="USER/NAME or ORG/NAME (NAME alone: the token owner's)")

    export = commands.add_parser("export", help="write the folder a push would upload, without any network use")
    export.add_argument("output_dir")
    export.add_argument("dest", help="a new or empty directory")
    export.add_argument("--repo_id", required=True, help="the repo id the model card's code examples name")

    space = commands.add_parser("push-space", help="push the Gradio demo as a Space that loads a pushed model repo")
    add_space_arguments(space)
    add_push_flags(push, "repo")

    evaluate = commands.add_parser("evaluate", help="bits/dim, FID, precision/recall, KID (also under accelerate)")
    add_evaluate_arguments(evaluate)

    for sub in (push, export):
        sub.add_argument("--metrics", default=None, help="JSON file of metrics for the card (bits_per_dim, fid)")
        sub.add_argument("--license", default=DEFAULT_LICENSE, help="license of the weights, in the card")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "evaluate":
        from .cpu import tune_process
        from .evaluation.processes import close_process_group
        from .evaluation.run import evaluate

        try:
            tune_process(args.num_threads)  # this program owns the process: threads and allocator for UNet work
            evaluate(args)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C: what finished is printed above; what is kept on disk is reused
            if not later_rank():  # one line for a launch of several processes
                print(f"\n{INTERRUPTED}", file=sys.stderr)
            return 128 + signal.SIGINT
        close_process_group()
        return 0
    try:
        if args.command == "push-space":
            print(run_space(args))
            return 0
        check_repo_id_value(args.repo_id, f"--repo_id {args.repo_id!r}")  # at the door, before the offline guard
        if args.metrics is not None:  # read again by the push or export: the same reader, its flag named here
            read_metrics_file(args.metrics, f"--metrics {args.metrics}")
        if args.command == "export":
            files = export_hub_folder(
                args.output_dir, args.dest, repo_id=args.repo_id, metrics=args.metrics, license=args.license
            )
            print(f"wrote {len(files)} files to {args.dest}: {', '.join(files)}")
            return 0
        options = {name: getattr(args, name) for name in PUSH_FLAGS}
        url = push_to_hub(args.output_dir, args.repo_id, metrics=args.metrics, license=args.license, **options)
    except (HubPushError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pushed {args.output_dir} to {args.repo_id}: {url}")
    return 0
