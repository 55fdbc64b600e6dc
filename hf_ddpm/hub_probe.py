"""Reaching the Hub before a load: one request with a short timeout, so an unreachable Hub is named in seconds.

huggingface_hub and datasets retry a failed connection with backoff (a minute or more for a model, several for a
dataset) and then report a missing file, not the network. A loader that is about to read a Hub repo asks
`hub_status` first: any HTTP answer means the Hub is reachable (its status says whether the repo exists), no
answer raises HubUnreachable, a ConnectionError that names the endpoint and the reason.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

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
