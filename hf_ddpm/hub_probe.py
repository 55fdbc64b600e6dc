"""Reaching the Hub before a load: one request with a short timeout, so an unreachable Hub is named in seconds.

huggingface_hub and datasets retry a failed connection with backoff (a minute or more for a model, several for a
dataset) and then report a missing file, not the network. A loader that is about to read a Hub repo asks
`hub_status` first: any HTTP answer means the Hub is reachable (its status says whether the repo exists), no
answer raises HubUnreachable, a ConnectionError that names the endpoint and the reason. `check_source` is the
check of a model's source at the door of a load (a local directory, or a Hub repo that answers), which needs
neither torch nor diffusers: `python -m hf_ddpm evaluate` makes it before it imports them.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import warnings

HUB_PROBE_TIMEOUT = 5.0  # seconds to connect and get an answer: the Hub answers in well under one


class HubUnreachable(ConnectionError):
    """No answer from the Hub: `endpoint` and `reason` say where and why."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"the Hugging Face Hub at {endpoint} cannot be reached ({reason})")
        self.endpoint, self.reason = endpoint, reason


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def offline(datasets: bool = False) -> bool:
    """HF_HUB_OFFLINE=1 (read now, as well as when huggingface_hub was imported), or for a dataset also
    HF_DATASETS_OFFLINE=1: use the local cache only, and ask the Hub nothing."""
    from huggingface_hub import constants

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return constants.is_offline_mode() or any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in names
    )


def hub_status(path: str, token: str | bool | None = None, timeout: float = HUB_PROBE_TIMEOUT) -> int:
    """The HTTP status of one GET of `<endpoint>/<path>` (e.g. `api/models/google/ddpm-cifar10-32`), sent with the
    token huggingface_hub would send (`token`: as in from_pretrained; None: the saved one, False: none).
    HubUnreachable when there is no answer within `timeout` seconds."""
    from huggingface_hub.utils import build_hf_headers

    url = f"{endpoint()}/{path.lstrip('/')}"
    given = token if isinstance(token, str) or token is False else None  # True: the saved one, as None
    request = urllib.request.Request(url, headers=build_hf_headers(token=given))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code  # the Hub answered
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise HubUnreachable(endpoint(), str(reason)) from None


def check_dataset_reachable(name: str | None, flag: str = "--dataset_name") -> None:
    """A Hub dataset id (not a local path) with the Hub unreachable fails now, within HUB_PROBE_TIMEOUT, naming the
    network, instead of after datasets' silent retries. Offline mode (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1)
    reads the local cache and is not probed; an HTTP answer of any status counts as reachable (datasets then says
    what is wrong with the name)."""
    if name is None or os.path.exists(name) or offline(datasets=True):
        return
    try:
        hub_status(f"api/datasets/{name}")
    except HubUnreachable as err:
        raise ConnectionError(
            f"{flag} {name}: {err}: a network problem, not the dataset. If it is in the local cache, run with "
            "HF_HUB_OFFLINE=1; or pass a local copy (--dataset_name DIR or --train_data_dir DIR)"
        ) from None


def check_source(pretrained_model_name_or_path, hub: dict) -> dict:
    """The Hub arguments to load `pretrained_model_name_or_path` with, once it is known to exist: a local
    directory, or a Hub repo that answers. FileNotFoundError for a path that is neither a directory nor a repo id,
    or a repo id that the Hub does not know (nor a local directory of that name); ConnectionError when the Hub does
    not answer and the repo is not in the local cache (in the cache: it loads from there, local_files_only)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    source = str(pretrained_model_name_or_path)
    if os.path.isdir(source):
        return hub
    if os.path.exists(source):
        raise NotADirectoryError(
            f"{source} is a file: load a pipeline directory (model_index.json, unet/, scheduler/) or a Hub repo id"
        )
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise FileNotFoundError(
            f"{source}: no such directory (and not a Hub repo id, which is NAME or NAMESPACE/NAME). Pass a pipeline "
            "directory (a training --output_dir, or one save_pretrained wrote) or a Hub repo id"
        ) from None
    revision = hub.get("revision")
    if hub.get("local_files_only") or offline():
        if not in_local_cache(source, hub):
            why = "local_files_only=True" if hub.get("local_files_only") else "offline mode (HF_HUB_OFFLINE=1)"
            raise FileNotFoundError(
                f"{source} is not a local directory, and no Hub repo of that name is in the local cache, the only "
                f"place {why} looks. Check the path, or download the repo once with the network on"
            )
        return {**hub, "local_files_only": True}  # also where HF_HUB_OFFLINE was set after huggingface_hub read it
    path = f"api/models/{source}" + (f"/revision/{revision}" if revision else "")
    try:
        status = hub_status(path, token=hub.get("token"))
    except HubUnreachable as err:
        if in_local_cache(source, hub):
            warnings.warn(f"{err}: loading {source} from the local cache", UserWarning, stacklevel=4)
            return {**hub, "local_files_only": True}
        raise ConnectionError(
            f"{source} is not a local directory, and {err} to look for a Hub repo of that name (none is in the "
            "local cache). Check the path; or the network (HF_ENDPOINT, a proxy); for a repo downloaded before, "
            "pass its cache_dir or set HF_HOME"
        ) from None
    if status in (401, 404):
        what = f"repo {source} at revision {revision}" if revision else f"model repo named {source}"
        raise FileNotFoundError(
            f"{source} is not a local directory, and the Hub at {endpoint()} has no {what} (HTTP {status}; a "
            "private or gated repo needs a token: `hf auth login` or token=). Pass a pipeline directory (a training "
            "--output_dir, or one save_pretrained wrote) or a Hub repo id"
        )
    return hub


def in_local_cache(repo_id: str, hub: dict) -> bool:
    """Whether huggingface_hub's cache holds the repo's model_index.json, or the config.json of the flat layout."""
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(
            try_to_load_from_cache(repo_id, name, cache_dir=hub.get("cache_dir"), revision=hub.get("revision")), str
        )
        for name in ("model_index.json", "config.json")
    )
