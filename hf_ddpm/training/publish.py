"""The hook through which a finished run is published to the Hub; the Hub issue implements it in hf_ddpm/hub.py."""

from __future__ import annotations

_NOT_YET = (
    "--push_to_hub is not implemented yet: publishing the pipeline and its model card arrives with the Hub "
    "issue (hf_ddpm/hub.py); train without --push_to_hub for now"
)


def check_publish(args) -> None:
    """Fail before training when --push_to_hub cannot succeed (called by `check_args`' caller at start-up)."""
    if args.push_to_hub:
        raise NotImplementedError(_NOT_YET)


def publish(output_dir: str, args) -> None:
    """Push the pipeline in `output_dir` (not its checkpoints or logs) with a model card. Main process only."""
    raise NotImplementedError(_NOT_YET)
