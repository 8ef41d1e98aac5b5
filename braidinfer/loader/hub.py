"""Hub ids ("org/name", "org/name:Q4_K_M", "org/name:file.gguf") and the models already in the local Hugging Face
hub cache, found without touching the network."""
from __future__ import annotations

import os
import re

from huggingface_hub.file_download import repo_folder_name

from braidinfer.errors import ModelNotFoundError

_HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<selector>[\w.+/-]+))?")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a hub model id: "org/name", optionally ":QUANT" or ":file.gguf" after it."""
    return bool(_HUB_SPEC.fullmatch(text)) and ".." not in text


def parse_hub_spec(text: str) -> tuple[str, str | None]:
    """("org/name", selector or None) from "org/name[:selector]"; the selector picks a GGUF file by quant or name."""
    match = _HUB_SPEC.fullmatch(text)
    if match is None or ".." in text:
        raise ModelNotFoundError(f"{text!r} is not a hub id (expected \"org/name\", \"org/name:Q4_K_M\" or "
                                 "\"org/name:file.gguf\")")
    return match["repo"], match["selector"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set true, read now (huggingface_hub reads it once, at import)."""
    return any(os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE") for var in _OFFLINE_VARS)


def select_gguf(repo_id: str, files: list[str], selector: str) -> str:
    """The one GGUF file of `files` (repository paths) that `selector` names: a file name ending in .gguf (the path
    or its last part), or a quant type such as "Q4_K_M" found in the name (any case, not inside a longer word).

    Raises ModelNotFoundError naming the repository and the GGUF files it has when none or several match."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if selector.lower().endswith(".gguf"):
        matches = [f for f in ggufs if f == selector or f.rsplit("/", 1)[-1] == selector]
    else:
        quant = re.compile(rf"(?<![A-Za-z0-9]){re.escape(selector)}(?![A-Za-z0-9]|_[A-Za-z0-9])", re.IGNORECASE)
        matches = [f for f in ggufs if quant.search(f.rsplit("/", 1)[-1])]
    if len(matches) == 1:
        return matches[0]
    available = ", ".join(ggufs) if ggufs else "none"
    if not matches:
        raise ModelNotFoundError(f"no GGUF file in {repo_id!r} matches {selector!r}; its GGUF files: {available}")
    raise ModelNotFoundError(f"several GGUF files in {repo_id!r} match {selector!r} ({', '.join(matches)}); "
                             f"pass the file name instead, e.g. \"{repo_id}:{matches[0].rsplit('/', 1)[-1]}\"")


def find_cached_model(repo_id: str, selector: str | None) -> str:
    """The cached snapshot directory of `repo_id`, or with a selector the GGUF file in it that the selector names."""
    snapshot = find_cached_snapshot(repo_id)
    if selector is None:
        return snapshot
    files = [os.path.relpath(os.path.join(root, name), snapshot).replace(os.sep, "/")
             for root, _, names in os.walk(snapshot) for name in names]
    return os.path.join(snapshot, select_gguf(repo_id, files, selector))


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
        f"model {repo_id!r} is neither a local path nor in the Hugging Face cache {cache}, and downloads are off "
        f"(HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to download it, download it first (e.g. `hf download {repo_id}`), "
        "or set HF_HUB_CACHE / HF_HOME to the cache that has it")


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))
