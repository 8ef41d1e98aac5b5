"""Models already downloaded into the local Hugging Face hub cache, found by id without touching the network."""
from __future__ import annotations

import os
import re

from huggingface_hub.file_download import repo_folder_name

from braidinfer.errors import ModelNotFoundError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a hub model id ("org/name")."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def hub_cache_dir() -> str:
    """The hub cache directory, with huggingface_hub's precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub."""
    # Read at call time: huggingface_hub.constants freezes these at import, before a caller may set them.
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return _expand(env[key])
    if env.get("HF_HOME"):
        return os.path.join(_expand(env["HF_HOME"]), "hub")
    return os.path.join(_expand(env.get("XDG_CACHE_HOME") or "~/.cache"), "huggingface", "hub")


def find_cached_snapshot(repo_id: str) -> str:
    """The snapshot directory of `repo_id` in the hub cache (refs/main, else the newest snapshot).

    Raises ModelNotFoundError naming the id and the cache directory when it is not there.
    """
    cache = hub_cache_dir()
    repo_dir = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    snapshots = os.path.join(repo_dir, "snapshots")
    ref = os.path.join(repo_dir, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            snapshot = os.path.join(snapshots, f.read().strip())
        if os.path.isdir(snapshot):
            return snapshot
    # No usable refs/main (e.g. the model was downloaded at a pinned revision): take the newest snapshot.
    candidates = [e.path for e in os.scandir(snapshots) if e.is_dir()] if os.path.isdir(snapshots) else []
    if candidates:
        return max(candidates, key=os.path.getmtime)
    raise ModelNotFoundError(
        f"model {repo_id!r} is neither a local path nor in the Hugging Face cache {cache}; "
        f"download it first (e.g. `hf download {repo_id}`) or set HF_HUB_CACHE / HF_HOME to the cache that has it")


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))
