"""Publishing a pipeline on the Hugging Face Hub: a repo that loads three ways, its model card, and nothing else.

    save_hub_pipeline(pipe, directory)   the one save route: diffusers' save (safetensors) + the remote-code modules
                                         (remote_code.py), with no local path, swapped in atomically
    save_pipeline, push_pipeline         what HFDDPMPipeline.save_pretrained / push_to_hub do (thin delegates)
    export_hub_folder(output_dir, dest)  the exact folder a push uploads, built from a training output directory
    push_to_hub(output_dir, repo_id)     create the repo and upload that folder
    python -m hf_ddpm push OUTPUT_DIR --repo_id ID [--private] [--token TOKEN]   (hf_ddpm/cli.py)
    check_can_push, request_timeout, push_failed, ...   every push's guards, error and flags: push_guards.py
    check_publish, check_token, publish   training's --push_to_hub hooks: the start-up checks and the push

A push uploads a staged copy (model_index.json, unet/ weights in safetensors and config, scheduler/ config, the
remote-code modules, README.md, samples.png), never the output directory itself: checkpoints, logs, optimizer
states and training_args.json stay local, and a failed push leaves the output untouched and says how to push again.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from . import __version__
from .atomic import replace_dir, staging_name, swap_in
from .measured_weights import check_measured_weights
from .model_card import (
    DEFAULT_LICENSE,
    SAMPLE_GRID,
    read_json_object,
    read_metrics_file,
    render_model_card,
    weight_files,
)
from .pipeline_folder import drop_local_paths
from .push_guards import (
    DEFAULT_TIMEOUT,
    HubPushError,
    check_can_push,
    check_repo_id_value,
    push_failed,
    push_later,
    refuse_secret_in,
    request_timeout,
)
from .remote_code import PIPELINE_CLASS, PIPELINE_PREFIX, SCHEDULER_PREFIX, add_remote_code

if TYPE_CHECKING:  # the hooks read a training run's options; training imports this module
    from .training.config import TrainingConfig

# What a pushed repo may hold (upload_folder's allow_patterns, on top of staging only these files).
PUSHED_PATTERNS = [
    "model_index.json",
    f"{PIPELINE_PREFIX}_*.py",
    "README.md",
    SAMPLE_GRID,
    "unet/config.json",
    "unet/*.safetensors",
    "unet/*.safetensors.index.json",
    "scheduler/scheduler_config.json",
    f"scheduler/{SCHEDULER_PREFIX}_*.py",
]


PIPELINE_STAGING = staging_name("pipeline", hidden=True)  # .pipeline.tmp: the new pipeline, before it is swapped in
PIPELINE_REPLACED = staging_name("pipeline-old", hidden=True)  # the previous pipeline's files, until then


def save_hub_pipeline(
    pipeline, directory: str | Path, *, safe_serialization: bool = True, variant=None, max_shard_size=None
) -> list[str]:
    """Save `pipeline` (an HFDDPMPipeline) so that the folder, or a repo holding it, loads all three ways.

    diffusers' `save_pretrained` (safetensors unless `safe_serialization=False`; `variant`, `max_shard_size` as
    there), then `pipeline_hf_ddpm_*.py` and `scheduler/scheduling_hf_ddpm_*.py` generated once from this package's
    source and named in model_index.json, and no path of this machine in any config (`drop_local_paths`: after
    `from_pretrained(<absolute path>)` diffusers would write it). Returns the written remote-code files.

    Atomic for a process killed at any moment: the pipeline is written into `directory/.pipeline.tmp`; then
    model_index.json, which every loader reads first, is removed, the components are swapped in by renames, and
    the new model_index.json is renamed into place last. A kill leaves the previous pipeline, the new one, or a
    directory without model_index.json that no loader accepts: never a mix that loads.
    """
    from diffusers import DiffusionPipeline

    directory = Path(directory)
    stage, replaced = directory / PIPELINE_STAGING, directory / PIPELINE_REPLACED
    for leftover in (stage, replaced):
        shutil.rmtree(leftover, ignore_errors=True)
    DiffusionPipeline.save_pretrained(
        pipeline, stage, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
    )
    written = add_remote_code(stage)
    drop_local_paths(stage)
    old_code = [p.name for p in directory.glob(f"{PIPELINE_PREFIX}_*.py")]  # an older version's modules go too
    swap_in(stage, directory, "model_index.json", parked=replaced, also_replaces=old_code)
    return written


def save_pipeline(pipeline, save_directory, *, safe_serialization: bool = True, **kwargs):
    """`HFDDPMPipeline.save_pretrained`: `save_hub_pipeline`, then with push_to_hub=True the folder pushed as
    `push_to_hub` does (kwargs: repo_id, default the folder's name; token, private, commit_message)."""
    push = kwargs.pop("push_to_hub", False)  # diffusers' keyword; as a parameter it would hide push_to_hub below
    hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message") if k in kwargs}
    save_hub_pipeline(pipeline, save_directory, safe_serialization=safe_serialization, **kwargs)
    if not push:
        return None
    repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
    private = bool(hub_kwargs.pop("private", None))
    return push_to_hub(save_directory, repo_id, private=private, **hub_kwargs)


def push_pipeline(pipeline, repo_id: str, *, commit_message=None, private=None, token=None, **kwargs) -> str:
    """`HFDDPMPipeline.push_to_hub`: the pipeline saved by `save_hub_pipeline` into a temporary folder and pushed
    with `push_to_hub` (its model card, its checks); returns the commit URL. kwargs: `variant`, `max_shard_size`;
    diffusers' `create_pr` and `safe_serialization=False` are refused, as is any other keyword, before any work."""
    if kwargs.pop("create_pr", False):
        raise ValueError("create_pr=True is not supported by HFDDPMPipeline.push_to_hub; push to a branch you own")
    if kwargs.pop("safe_serialization", True) is not True:
        raise ValueError("safe_serialization=False is not supported by HFDDPMPipeline.push_to_hub: only safetensors "
                         "weights are pushed (pickled weights run code when loaded); leave it out")  # fmt: skip
    unknown = sorted(set(kwargs) - {"variant", "max_shard_size"})
    if unknown:
        raise TypeError(f"HFDDPMPipeline.push_to_hub got unexpected keyword arguments {unknown}; it takes repo_id, "
                        "commit_message, private, token and max_shard_size")  # fmt: skip
    if kwargs.get("variant") is not None:
        raise ValueError(
            f"variant={kwargs['variant']!r} is not supported by HFDDPMPipeline.push_to_hub: a repo of variant weights "
            "does not load without variant=; push the pipeline as it is (or cast it first: pipeline.to(torch.float16))"
        )
    try:  # first: the refusals below print a call to make again
        check_repo_id_value(repo_id, f"repo_id {repo_id!r}")
    except ValueError as err:
        raise HubPushError(f"not pushing the pipeline: {err}") from None
    again = f"pipeline.push_to_hub({repo_id!r})"  # the call itself: the folder it saves into is temporary
    token = check_can_push("the pipeline", again, token)
    with tempfile.TemporaryDirectory(prefix="hf_ddpm_save_") as folder:
        save_hub_pipeline(pipeline, folder, **kwargs)
        try:
            return push_to_hub(folder, repo_id, private=bool(private), token=token, commit_message=commit_message)
        except HubPushError as err:
            if err.__cause__ is None:
                raise
            raise push_failed(f"the pipeline to the Hub as {repo_id}", err.__cause__, again) from err.__cause__


def check_pipeline_dir(output_dir: str | Path) -> None:
    """Raise ValueError unless `output_dir` holds a saved HFDDPMPipeline with safetensors UNet weights."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"{output_dir} holds no model_index.json: no such directory (name a saved pipeline's folder)")
    if not (output_dir / "model_index.json").is_file():
        raise ValueError(f"{output_dir} holds no model_index.json: it is not a saved pipeline (train or save first)")
    index = read_json_object(output_dir / "model_index.json")
    name = index.get("_class_name")
    if (name[1] if isinstance(name, list) else name) != PIPELINE_CLASS:
        raise ValueError(f"{output_dir} holds a {name}, not an {PIPELINE_CLASS}")
    for needed in ("unet/config.json", "scheduler/scheduler_config.json"):
        if not (output_dir / needed).is_file():
            raise ValueError(f"{output_dir} lacks {needed}: save the whole pipeline with save_pretrained")
    unet = output_dir / "unet"
    files = [unet / name for name in weight_files(unet)]
    if not files[0].is_file():
        variants = sorted(p.name for p in unet.glob("*.safetensors"))
        if variants:
            raise ValueError(
                f"{unet} holds only variant weights ({', '.join(variants)}), which a repo does not load without "
                "variant=: save the pipeline with save_pretrained (no variant) to push it"
            )
        pickled = sorted(p.name for p in unet.glob("*.bin"))
        raise ValueError(
            f"{unet} holds no safetensors weights{f' (only pickled {pickled})' if pickled else ''}; "
            "only safetensors are pushed: load the pipeline and save it with save_pretrained(safe_serialization=True)"
        )
    for path in files:  # whole: the header's promise kept (a copy cut short is never published)
        try:
            with safe_open(path, framework="numpy"):  # the header and the length alone: no torch
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{path} ({os.path.getsize(path) if path.is_file() else 0} bytes) is incomplete or corrupt ({err}): "
                "save the pipeline again with save_pretrained"
            ) from None


def _measured_metrics(metrics, output_dir) -> dict | None:
    """The card's metrics (a dict, or the path of a JSON file: read and checked), refused when they name other UNet
    weights than `output_dir`'s (`check_measured_weights`): a card never reports another model's numbers."""
    metrics_file = metrics if isinstance(metrics, (str, Path)) else None
    if metrics_file is not None:
        metrics = read_metrics_file(metrics_file)
    what = f"the metrics file {metrics_file}" if metrics_file is not None else "the metrics"
    check_measured_weights(metrics, output_dir, what, metrics_file)
    return metrics


def export_hub_folder(
    output_dir: str | Path,
    dest: str | Path,
    *,
    repo_id: str,
    metrics: dict | str | Path | None = None,
    license: str = DEFAULT_LICENSE,
) -> list[str]:
    """Write into `dest` (new or empty) exactly what `push_to_hub` uploads; returns its files, relative to `dest`.
    Written beside it as `dest.tmp` and renamed into place: an export that fails or is killed leaves no `dest`.

    metrics: for the card (see `render_model_card`), or the path of a JSON file holding them; refused when its entries
    name other UNet weights than `output_dir`'s (`check_measured_weights`: `evaluate --metrics_out` records them).
    """
    output_dir, dest = Path(output_dir), Path(dest)
    check_repo_id_value(repo_id, f"repo_id {repo_id!r}")  # the card's code examples name it
    metrics = _measured_metrics(metrics, output_dir)  # a folder lacking its weights: named by check_pipeline_dir
    check_pipeline_dir(output_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(
            f"{dest} is {'not empty' if dest.is_dir() else 'a file'}; export into a new or empty directory"
        )
    unet = output_dir / "unet"
    files = ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"]
    weights = (".safetensors", ".safetensors.index.json")  # never pickled .bin weights or their index
    files += [f"unet/{p.name}" for p in sorted(unet.iterdir()) if p.name.endswith(weights)]
    files += [SAMPLE_GRID] if (output_dir / SAMPLE_GRID).is_file() else []
    stage = Path(staging_name(dest))  # `dest` appears whole or not at all
    shutil.rmtree(stage, ignore_errors=True)
    try:
        for name in files:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(output_dir / name, stage / name)
        add_remote_code(stage)
        drop_local_paths(stage)  # a run fine-tuned from a local folder recorded it in unet/config.json
        card = render_model_card(stage, repo_id, training_dir=output_dir, metrics=metrics, license=license)
        card.save(stage / "README.md")
        replace_dir(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())


def retry_command(output_dir, repo_id: str, private: bool = False, extra: str = "") -> str:
    """The command that pushes `output_dir` again (never with a token in it)."""
    command = f"python -m hf_ddpm push {shlex.quote(str(output_dir))} --repo_id {shlex.quote(repo_id)}"
    return command + (" --private" if private else "") + extra


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    metrics: dict | str | Path | None = None,
    license: str = DEFAULT_LICENSE,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Push the pipeline in `output_dir` to the Hub repo `repo_id` (created if needed); returns the commit URL.

    Only the files of `export_hub_folder` are uploaded. Refuses before any network call an invalid `repo_id` or
    metrics file, or metrics of other weights than `output_dir`'s (first: the later refusals print a command to push
    again), then in offline mode (HF_HUB_OFFLINE=1), without a token, or when `output_dir` is not a complete
    safetensors pipeline. Any failure raises HubPushError, whose message says how to push again; `output_dir` is
    never modified.
    token: default HF_TOKEN or the token saved by `hf auth login`. metrics: as `export_hub_folder`'s.
    timeout: seconds one HTTP request may stall.
    """
    extra = f" --license {shlex.quote(license)}" if license != DEFAULT_LICENSE else ""
    if isinstance(metrics, (str, Path)):
        extra += f" --metrics {shlex.quote(str(metrics))}"
    if commit_message:  # the command repeats the push as it was asked for
        extra += f" --commit_message {shlex.quote(commit_message)}"
    if timeout != DEFAULT_TIMEOUT:
        extra += f" --timeout {timeout:g}"
    try:  # before the offline and token guards: their messages print a command that must work later
        check_repo_id_value(repo_id, f"repo_id {repo_id!r}")
        metrics = _measured_metrics(metrics, output_dir)
    except ValueError as err:  # no command to print: run with this id or these metrics, it would fail again
        raise HubPushError(f"not pushing {output_dir}: {err}") from None
    command = retry_command(output_dir, repo_id, private, extra)
    token = check_can_push(output_dir, command, token)
    try:
        check_pipeline_dir(output_dir)
    except ValueError as err:
        raise HubPushError(f"not pushing {output_dir}: {err}", command) from err
    from huggingface_hub import create_repo, upload_folder

    with tempfile.TemporaryDirectory(prefix="hf_ddpm_push_") as stage, request_timeout(timeout):
        stage = Path(stage)
        files = export_hub_folder(output_dir, stage, repo_id=repo_id, metrics=metrics, license=license)
        refuse_secret_in(stage, token)
        try:
            canonical = create_repo(repo_id, token=token, private=True if private else None, exist_ok=True).repo_id
            if canonical != repo_id:  # the Hub added the namespace: the card's code names the full id
                card = render_model_card(stage, canonical, training_dir=output_dir, metrics=metrics, license=license)
                card.save(stage / "README.md")
                refuse_secret_in(stage, token)
            commit = upload_folder(
                repo_id=canonical,
                folder_path=stage,
                allow_patterns=PUSHED_PATTERNS,
                delete_patterns=PUSHED_PATTERNS,  # what an earlier push left that this one does not hold (old shards)
                token=token,
                commit_message=commit_message
                or f"Upload {PIPELINE_CLASS} ({len(files)} files) with hf_ddpm {__version__}",
            )
        except HubPushError:
            raise
        except Exception as err:  # network, HTTP 4xx/5xx, timeouts: all end the same way for the user
            kept = f"Nothing in {output_dir} was changed. "
            raise push_failed(f"{output_dir} to the Hub as {repo_id}", err, command, kept) from err
    return commit.commit_url


# ------------------------------------------------------------------------------------------------ training's hooks


def repo_id_of(args: TrainingConfig) -> str:
    """The repo --push_to_hub pushes to: --hub_model_id, else the output directory's name (the token owner's)."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def check_publish(args: TrainingConfig) -> None:
    """Training start-up: fail before any training when --push_to_hub cannot succeed (offline mode, no token)."""
    if not args.push_to_hub:
        return
    check_repo_id(args)
    command = retry_command(args.output_dir, repo_id_of(args), args.hub_private_repo)
    check_can_push(args.output_dir, command, args.hub_token, training=True)  # worded for a run not yet trained


TOKEN_CHECK_TIMEOUT = 10.0  # seconds for the Hub's answer to whoami: a start-up check, not a push


def check_token(args: TrainingConfig) -> None:
    """Training start-up, after `check_publish`: the Hub answers whoami for the token, so that a revoked or mistyped
    token is refused now instead of after the training; an unreachable Hub is named within TOKEN_CHECK_TIMEOUT."""
    if not args.push_to_hub:
        return
    import httpx
    from huggingface_hub import constants, get_token, whoami
    from huggingface_hub.errors import HfHubHTTPError

    command = retry_command(args.output_dir, repo_id_of(args), args.hub_private_repo)
    later = push_later(command)
    try:
        with request_timeout(TOKEN_CHECK_TIMEOUT):
            whoami(token=args.hub_token or get_token(), cache=False)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status not in (401, 403):
            raise HubPushError(f"--push_to_hub: the Hub at {constants.ENDPOINT} answered the token check with HTTP "
                               f"{status}; nothing was trained. Try again, {later}", command) from None  # fmt: skip
        source = "--hub_token" if args.hub_token else "the token (HF_TOKEN or the saved login)"
        raise HubPushError(
            f"--push_to_hub: the Hub at {constants.ENDPOINT} refuses {source} (HTTP {status}: invalid or revoked); "
            f"nothing was trained. Pass a valid --hub_token or log in again (hf auth login), {later}",
            command,
        ) from None
    except (OSError, httpx.TransportError) as err:
        raise ConnectionError(
            f"--push_to_hub: the Hub at {constants.ENDPOINT} cannot be reached to check the token "
            f"({type(err).__name__}: {err}); nothing was trained. Check the network, {later}"
        ) from None


def check_repo_id(args: TrainingConfig) -> str | None:
    """The repo --push_to_hub will push to (given, or the output directory's name): refused now when invalid, and
    said where it goes. None without --push_to_hub."""
    if not args.push_to_hub:
        return None
    from huggingface_hub import constants

    given = args.hub_model_id is not None
    repo_id = repo_id_of(args)  # the one the push uses
    origin = f"--hub_model_id {repo_id!r}" if given else f"the repo id {repo_id!r} (from --output_dir's name)"
    check_repo_id_value(repo_id, origin, "" if given else "Pass --hub_model_id NAME or rename the output directory. ")
    where = repo_id if "/" in repo_id else f"<your namespace>/{repo_id}"
    message = "--push_to_hub: will push the pipeline to %s/%s at the end"
    logging.getLogger(__name__).info(message, constants.ENDPOINT, where)  # before accelerate's state exists
    return repo_id


def publish(output_dir: str | Path, args: TrainingConfig) -> str:
    """Training's --push_to_hub hook (main process, after the pipeline is saved): push `output_dir` as
    --hub_model_id (default: the output directory's name, in the token owner's namespace), private with
    --hub_private_repo, with --hub_token or the usual token sources. Returns the commit URL; raises HubPushError."""
    return push_to_hub(output_dir, repo_id_of(args), private=args.hub_private_repo, token=args.hub_token)
