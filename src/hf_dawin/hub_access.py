"""Fail fast when a Hub id must be downloaded but the Hub cannot be reached.

Without a connection, huggingface_hub retries each request several times with growing waits (about half a
minute in all with huggingface_hub 2.4), and a server that accepts the connection but never responds can keep a
request waiting for minutes. One short request before loading turns both cases into a clear error within seconds. Nothing is sent in
offline mode (`HF_HUB_OFFLINE=1`), for local folders, or for repositories already in the local Hub cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.file_download import repo_folder_name


__all__ = ["PROBE_TIMEOUT_SECONDS", "check_hub_reachable", "in_hub_cache"]

PROBE_TIMEOUT_SECONDS = 5.0


def in_hub_cache(repo_id: str, repo_type: str, cache_dir: str | os.PathLike | None) -> bool:
    """Return whether the Hub cache contains a snapshot of the repository."""
    cache = Path(cache_dir) if cache_dir is not None else Path(huggingface_hub.constants.HF_HUB_CACHE)
    return (cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots").is_dir()


def check_hub_reachable(
    source,
    *,
    repo_type: str = "model",
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    timeout: float = PROBE_TIMEOUT_SECONDS,
) -> None:
    """Raise a `ConnectionError` at once if `source` is a Hub id to download and the Hub does not respond.

    The check sends one HEAD request to the repository's API address, without retries. Any HTTP response, an error
    status included, counts as reachable: the loader that follows reports a missing repository in its own words.

    Args:
        source: What the caller will load: a Hub id, a local path or an object. Only a string that is not an
            existing path and whose repository is not in the Hub cache is checked.
        repo_type (`str`, *optional*, defaults to `"model"`): `"model"` or `"dataset"`.
        cache_dir (`str` or `os.PathLike`, *optional*): The Hub cache the loader uses; defaults to `HF_HUB_CACHE`.
        local_files_only (`bool`, *optional*, defaults to `False`): The loader's argument; when true, nothing is sent.
        timeout (`float`, *optional*, defaults to 5): Seconds to wait for the response.

    Raises:
        ConnectionError: If the request fails or times out, with the endpoint, the error and what to do.
    """
    if not isinstance(source, str) or local_files_only or huggingface_hub.constants.is_offline_mode():
        return
    if Path(source).expanduser().exists() or in_hub_cache(source, repo_type, cache_dir):
        return
    endpoint = huggingface_hub.constants.ENDPOINT
    url = f"{endpoint}/api/{repo_type}s/{source}"
    try:
        huggingface_hub.utils.get_session().head(url, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any failure of the request means no response from the Hub
        raise ConnectionError(
            f"{source!r} is neither a local folder nor a {repo_type} repository in the local Hub cache, and the Hub "
            f"at {endpoint} could not be reached ({type(error).__name__}: {error}; timeout {timeout:g} s). Connect this "
            "machine to the network, pass a local folder, or set HF_HUB_OFFLINE=1 to use local files only."
        ) from error
