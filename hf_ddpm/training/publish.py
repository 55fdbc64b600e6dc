"""The training script's --push_to_hub hooks: check at start-up that a push can succeed (a valid repo id, a token,
not offline), push the finished run.

The Hub side (what a repo holds, the push itself and its guards) is hf_ddpm/hub.py's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..hub import check_can_push, push_to_hub, retry_command

if TYPE_CHECKING:
    from .config import TrainingConfig

__all__ = ["check_publish", "check_repo_id", "publish", "repo_id_of"]
logger = logging.getLogger(__name__)


def repo_id_of(args: TrainingConfig) -> str:
    """The repo --push_to_hub pushes to: --hub_model_id, else the output directory's name (the token owner's)."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def check_publish(args: TrainingConfig) -> None:
    """Training start-up: fail before any training when --push_to_hub cannot succeed (offline mode, no token)."""
    if not args.push_to_hub:
        return
    check_repo_id(args)
    command = retry_command(args.output_dir, repo_id_of(args), args.hub_private_repo)
    check_can_push(args.output_dir, command, args.hub_token)


def check_repo_id(args: TrainingConfig) -> str | None:
    """The repo --push_to_hub will push to (given, or the output directory's name): refused now when invalid, and
    said where it goes. None without --push_to_hub."""
    if not args.push_to_hub:
        return None
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    given = args.hub_model_id is not None
    repo_id = repo_id_of(args)  # the one the push uses
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        origin = f"--hub_model_id {repo_id!r}" if given else f"the repo id {repo_id!r} (from --output_dir's name)"
        raise ValueError(
            f"{origin} is not a valid Hub repo id: {str(err).split(': ')[0]}. "
            + ("" if given else "Pass --hub_model_id NAME or rename the output directory. ")
            + "Use 'name' or 'namespace/name' with letters, digits, '-', '_' and '.'"
        ) from None
    where = repo_id if "/" in repo_id else f"<your namespace>/{repo_id}"
    logger.info("--push_to_hub: will push the pipeline to %s/%s at the end", constants.ENDPOINT, where)
    return repo_id


def publish(output_dir: str | Path, args: TrainingConfig) -> str:
    """Training's --push_to_hub hook (main process, after the pipeline is saved): push `output_dir` as
    --hub_model_id (default: the output directory's name, in the token owner's namespace), private with
    --hub_private_repo, with --hub_token or the usual token sources. Returns the commit URL; raises HubPushError."""
    return push_to_hub(output_dir, repo_id_of(args), private=args.hub_private_repo, token=args.hub_token)
