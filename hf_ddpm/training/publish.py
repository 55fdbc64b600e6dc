"""The training script's --push_to_hub hooks: check at start-up that a push can succeed, push the finished run.

The Hub side (what a repo holds, the push itself and its guards) is hf_ddpm/hub.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..hub import check_can_push, push_to_hub, retry_command

if TYPE_CHECKING:
    from .run_config import TrainingConfig

__all__ = ["check_publish", "publish", "repo_id_of"]


def repo_id_of(args: TrainingConfig) -> str:
    """The repo --push_to_hub pushes to: --hub_model_id, else the output directory's name (the token owner's)."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def check_publish(args: TrainingConfig) -> None:
    """Training start-up: fail before any training when --push_to_hub cannot succeed (offline mode, no token)."""
    if not getattr(args, "push_to_hub", False):
        return
    command = retry_command(args.output_dir, repo_id_of(args), args.hub_private_repo)
    check_can_push(args.output_dir, command, args.hub_token)


def publish(output_dir: str | Path, args: TrainingConfig) -> str:
    """Training's --push_to_hub hook (main process, after the pipeline is saved): push `output_dir` as
    --hub_model_id (default: the output directory's name, in the token owner's namespace), private with
    --hub_private_repo, with --hub_token or the usual token sources. Returns the commit URL; raises HubPushError."""
    return push_to_hub(output_dir, repo_id_of(args), private=args.hub_private_repo, token=args.hub_token)
