"""Every push's guards, its error and its flags, for a model repo (hub.py) and a Space (space.py) alike: before any
request, a valid repo id (`check_repo_id_value`), no offline mode and a token (`check_can_push`; also training's
start-up checks of --push_to_hub, worded for a run not yet trained: `push_later`); a last guard that no file pushed
holds the token (`refuse_secret_in`); a bound on each request (`request_timeout`); the error of a push the Hub did not
take, with the command that pushes again (`push_failed`, a `HubPushError`); and the push flags.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from pathlib import Path

DEFAULT_TIMEOUT = 60.0  # seconds without progress on one HTTP request before a push gives up
PUSH_FLAGS = ("private", "token", "commit_message", "timeout")  # every push command's: keywords of push_to_hub
TOKEN_SOURCES = "pass --token (--hub_token in training), set HF_TOKEN, or run `hf auth login`"


class HubPushError(RuntimeError):
    """A push that did not happen or did not finish; the message says why and how to push again."""

    def __init__(self, message: str, retry_command: str | None = None):
        super().__init__(message)
        self.retry_command = retry_command


def check_repo_id_value(repo_id: str, origin: str, advice: str = "") -> None:
    """ValueError unless `repo_id` is a valid Hub repo id ('name' or 'namespace/name'); `origin` names where it
    came from (e.g. "--repo_id 'a/b/c'"), `advice` a sentence on how to mend it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"{origin} is not a valid Hub repo id: {str(err).split(': ')[0]}. {advice}"
            "Use 'name' or 'namespace/name' with letters, digits, '-', '_' and '.'"
        ) from None


def push_failed(what: str, err: Exception, command: str, kept: str = "") -> HubPushError:
    """The error of a push the Hub did not take (network, HTTP 4xx/5xx, a timeout): what, why, and how to push
    again. kept: a sentence on what is left untouched."""
    return HubPushError(
        f"pushing {what} failed: {type(err).__name__}: {err}\n{kept}To push it again, run:\n    {command}\n"
        f"(for the token, {TOKEN_SOURCES})",
        command,
    )


def check_can_push(what, command: str, token: str | None = None, *, training: bool = False) -> str:
    """The guards every push passes before any request: refused in offline mode and without a token (`token`,
    else HF_TOKEN or the saved login), each HubPushError naming `what` is pushed and `command` to push it again.
    training: the start-up checks of a run with --push_to_hub, not yet trained (there is nothing to push again): each
    says how to train and push, or to push once trained with `command`. Returns the token."""
    _refuse_offline(what, command, training)
    return _resolve_token(token, what, command, training)


def push_later(command: str) -> str:
    """The way out of a training run's Hub check besides mending it (said once the check says nothing was trained)."""
    return f"or train without --push_to_hub and push the result later with: {command}"


def _refuse_offline(what, command: str, training: bool = False) -> None:
    """HubPushError in offline mode (HF_HUB_OFFLINE=1), before any request is made."""
    from huggingface_hub import constants

    if not (constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")):
        return
    if training:
        raise HubPushError(
            "--push_to_hub: HF_HUB_OFFLINE is set, so hf_ddpm does not push; nothing was trained. Unset "
            f"HF_HUB_OFFLINE to train and push, {push_later(command)}",
            command,
        )
    raise HubPushError(
        f"HF_HUB_OFFLINE is set, so hf_ddpm does not push and nothing was sent ({what} is as it was); to push "
        f"it later, unset HF_HUB_OFFLINE and run:\n    {command}",
        command,
    )


def _resolve_token(token: str | None, what, command: str, training: bool = False) -> str:
    """`token`, else HF_TOKEN or the saved login; HubPushError when there is none (no request made)."""
    from huggingface_hub import get_token

    token = token or get_token()
    if token:
        return token
    if training:
        raise HubPushError(
            "--push_to_hub: no Hugging Face token; nothing was trained. Pass --hub_token, set HF_TOKEN, or run "
            f"`hf auth login` to train and push, {push_later(command)}",
            command,
        )
    raise HubPushError(f"no Hugging Face token: {TOKEN_SOURCES}. Then push {what} with:\n    {command}", command)


def refuse_secret_in(folder: Path, token: str) -> None:
    """A last guard: refuse to upload a folder in which any file contains the token."""
    needle = token.encode()
    for path in folder.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            raise HubPushError(f"refusing to push: {path.relative_to(folder)} contains the Hub token")


def add_push_flags(parser, what: str) -> None:
    """The flags of every push command (`push`, `push-space`): privacy, token, commit message and request timeout."""
    parser.add_argument("--private", action="store_true", help=f"create the {what} private (an existing one keeps its)")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN or the saved `hf auth login` token")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help="seconds one request may stall")


def _seconds(text: str) -> float:
    """--timeout's value: a finite number of seconds above 0 (0, inf and nan reach the HTTP client as nonsense)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


@contextlib.contextmanager
def request_timeout(seconds: float):
    """huggingface_hub's shared HTTP client waits forever by default; bound each request while pushing."""
    from huggingface_hub.utils import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = previous
