"""Publishing the Gradio demo as a Hugging Face Space: copy the app folder, point it at a model repo, upload it.

    python -m hf_ddpm push-space --space_id you/ddpm-demo --model_id you/ddpm-digits [--app_dir DIR] [--private]
        [--token TOKEN] [--timeout SECONDS]   (hf_ddpm/cli.py; `python -m hf_ddpm.space` takes the same flags)

A push is refused before any request in offline mode (HF_HUB_OFFLINE=1) or without a token, each HTTP request may
stall `timeout` seconds at most, and a failure says how to push again: the guards of `python -m hf_ddpm push`.

The Space's app reads its model from the first `models:` entry of its README front matter (unless the Space sets
HF_DDPM_MODEL), so that entry is the one place the model id is written; it also links the Space to the model page.
Beside it, `model_revision:` pins the model repo's commit the Space loads: the model's remote code runs inside the
Space (trust_remote_code=True), so a later commit to the model repo runs there only once someone pushes the Space
again (which pins the model's commit of that moment, or `model_revision=`) or edits that line after reviewing it.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from huggingface_hub import HfApi, metadata_load, metadata_save
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

from .flags import FlagParser
from .push_guards import (
    DEFAULT_TIMEOUT,
    PUSH_FLAGS,
    HubPushError,
    add_push_flags,
    check_can_push,
    check_repo_id_value,
    push_failed,
    request_timeout,
)
from .shipped import shipped_dir

__all__ = ["DEFAULT_APP_DIR", "REVISION_KEY", "prepare_space", "push_space"]

DEFAULT_APP_DIR = shipped_dir("gradio_space", "examples/gradio_space")
SPACE_IGNORE = ("__pycache__", "*.pyc", ".gradio", "flagged", ".DS_Store")  # never uploaded
REVISION_KEY = "model_revision"  # front matter: the model commit the Space loads (app.py reads the same key)


def prepare_space(app_dir: str | Path, model_id: str, out_dir: str | Path, revision: str | None = None) -> Path:
    """Copy the Space folder `app_dir` to `out_dir` with `models: [model_id]` in its README front matter, and
    `model_revision: <revision>` (a commit of the model repo) when one is given.

    app_dir must hold README.md with Space front matter (`sdk: gradio`) and the `app_file` it names.
    """
    app_dir, out_dir = Path(app_dir), Path(out_dir)
    validate_repo_id(model_id)  # the Space loads it from the Hub: a local path will not do
    readme = app_dir / "README.md"
    if not readme.is_file():
        raise FileNotFoundError(f"{app_dir} has no README.md: a Space needs one with its front matter")
    metadata = metadata_load(readme) or {}
    if metadata.get("sdk") != "gradio":
        raise ValueError(f"{readme} front matter must say `sdk: gradio`, got sdk={metadata.get('sdk')!r}")
    app_file = metadata.get("app_file", "app.py")
    if not (app_dir / app_file).is_file():
        raise FileNotFoundError(f"{app_dir} has no {app_file} (the README's app_file)")
    shutil.copytree(app_dir, out_dir, ignore=shutil.ignore_patterns(*SPACE_IGNORE), dirs_exist_ok=True)
    metadata = {k: v for k, v in metadata.items() if k != REVISION_KEY}  # the app folder's own pin is not this model's
    metadata_save(
        out_dir / "README.md", {**metadata, "models": [model_id], **({REVISION_KEY: revision} if revision else {})}
    )
    return out_dir


def space_retry_command(space_id: str, model_id: str, app_dir, private: bool = False, *, model_revision=None,
                        commit_message=None, timeout: float = DEFAULT_TIMEOUT) -> str:  # fmt: skip
    """The command that pushes the Space again as it was asked for: the same pinned model revision, message and
    timeout (never with a token in it)."""
    command = f"python -m hf_ddpm push-space --space_id {shlex.quote(space_id)} --model_id {shlex.quote(model_id)}"
    if Path(app_dir) != DEFAULT_APP_DIR:
        command += f" --app_dir {shlex.quote(str(app_dir))}"
    if model_revision is not None:
        command += f" --model_revision {shlex.quote(model_revision)}"
    if commit_message:
        command += f" --commit_message {shlex.quote(commit_message)}"
    if timeout != DEFAULT_TIMEOUT:
        command += f" --timeout {timeout:g}"
    return command + (" --private" if private else "")


def _model_info(api: HfApi, model_id: str, revision: str | None, timeout: float):
    """The model repo's info at `revision` (default: the latest): its commit hash, whether it is private; ValueError
    when the repo or revision is not there. A timeout is passed: huggingface_hub's info requests pass their own (none by default), which
    overrides the shared client's that request_timeout sets."""
    try:
        return api.model_info(model_id, revision=revision, timeout=timeout)
    except GatedRepoError as err:
        raise ValueError(f"model repo {model_id!r} is gated: its commit cannot be read to pin it; {err}") from err
    except RevisionNotFoundError as err:
        raise ValueError(f"model repo {model_id!r} has no revision {revision!r} on {api.endpoint}") from err
    except RepositoryNotFoundError as err:
        raise ValueError(
            f"model repo {model_id!r} not found on {api.endpoint}: push the model before its Space"
        ) from err


def push_space(
    app_dir: str | Path,
    space_id: str,
    model_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    model_revision: str | None = None,
) -> str:
    """Create (or reuse) the Gradio Space `space_id` and upload `app_dir` to it, set to load `model_id` at one commit:
    `model_revision` (a branch, tag or commit of the model repo) resolved to its commit hash, default the latest.

    The model repo must already exist (push it first); a private model needs the Space to have an HF_TOKEN secret.
    Refused before any request in offline mode or without a token (HF_TOKEN or the saved login); `timeout`: seconds
    one HTTP request may stall. Returns the Space's URL; raises HubPushError (saying how to push again) or
    ValueError / OSError for a bad id or app folder.
    """
    # the ids first, naming their flags: the refusals below print a command that must work later
    check_repo_id_value(space_id, f"--space_id {space_id!r}")
    check_repo_id_value(model_id, f"--model_id {model_id!r}", "The Space loads the model from the Hub. ")
    command = space_retry_command(space_id, model_id, app_dir, private, model_revision=model_revision,
                                  commit_message=commit_message, timeout=timeout)  # fmt: skip
    token = check_can_push(app_dir, command, token)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_ddpm_space_") as tmp, request_timeout(timeout):
        prepare_space(app_dir, model_id, tmp)  # bad input fails here, before any request
        try:
            model = _model_info(api, model_id, model_revision, timeout)
            folder = prepare_space(app_dir, model_id, tmp, model.sha)
            url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            api.upload_folder(
                repo_id=url.repo_id,
                repo_type="space",
                folder_path=folder,
                commit_message=commit_message or f"Gradio demo of {model_id}",
            )
        except ValueError:
            raise
        except Exception as err:  # network, HTTP 4xx/5xx, timeouts: all end the same way for the user
            raise push_failed(f"the Space {space_id}", err, command) from err
    if model.private:  # pushed, but the Space's first load would fail without the secret
        warnings.warn(f"the model repo {model_id} is private: the Space loads it only once given an HF_TOKEN secret "
                      f"that can read it (the Space's settings, Variables and secrets)", UserWarning, stacklevel=2)  # fmt: skip
    return str(url)


def add_arguments(parser) -> None:
    """The flags of `python -m hf_ddpm push-space` (hf_ddpm/cli.py) and of `python -m hf_ddpm.space`."""
    parser.add_argument("--space_id", required=True, help="USER/NAME of the Space")
    parser.add_argument("--model_id", required=True, help="the model repo (pushed)")
    parser.add_argument("--app_dir", default=None, help="default: the shipped demo app")
    parser.add_argument(
        "--model_revision",
        default=None,
        help="the model commit (or branch, tag) the Space loads, pinned as its hash; default: the model's latest",
    )
    add_push_flags(parser, "Space")


def run(args) -> str:
    """Push the Space the parsed flags describe; returns the line to print."""
    app_dir = args.app_dir or DEFAULT_APP_DIR
    options = {name: getattr(args, name) for name in PUSH_FLAGS}
    with warnings.catch_warnings(record=True) as said:  # each a line of its own, not Python's warning format
        warnings.simplefilter("always", UserWarning)
        url = push_space(app_dir, args.space_id, args.model_id, model_revision=args.model_revision, **options)
    notes = "".join(f"\nnote: {w.message}" for w in said if issubclass(w.category, UserWarning))
    return f"pushed {app_dir} to the Space {args.space_id} (model {args.model_id}): {url}{notes}"


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_ddpm.space FLAGS`: the same as `python -m hf_ddpm push-space FLAGS`."""
    parser = FlagParser(prog="python -m hf_ddpm.space", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(run(args))
    except (HubPushError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
