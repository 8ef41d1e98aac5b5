"""Downloads a model from the Hugging Face hub into the local hub cache, only the files the loader reads.

A safetensors repository gives its config, generation config, tokenizer files and weights (`model.safetensors`, or
the index and the shards it names); a GGUF repository gives the one GGUF file the selector picks ("org/name:Q4_K_M"
or "org/name:file.gguf"; no selector when it has just one). huggingface_hub shows a progress bar per file, resumes
interrupted downloads and reuses files already cached. HF_ENDPOINT, HF_TOKEN and the cache variables are read at
call time, so they may be set after import.
"""
from __future__ import annotations

import json
import os

from huggingface_hub.file_download import repo_folder_name

from braidinfer.errors import InvalidModelError, ModelNotFoundError
from braidinfer.loader.hub import find_cached_model, hub_cache_dir, select_gguf

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def download_model(repo_id: str, selector: str | None = None, revision: str = "main") -> str:
    """Downloads what Braid needs of `repo_id` into the hub cache; returns the snapshot directory, or the GGUF file.

    Raises ModelNotFoundError naming the repository when it does not exist (or is gated or private without a
    token), when the hub cannot be reached and the model is not cached, or when no GGUF file matches `selector`;
    InvalidModelError when the repository holds no weights Braid can load."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        wanted = needed_files(repo_id, files, selector)
        paths = _download(repo_id, info.sha, endpoint, wanted)
        if WEIGHTS_INDEX in wanted:  # the shards are named in the index
            paths += _download(repo_id, info.sha, endpoint, _shards(repo_id, paths[wanted.index(WEIGHTS_INDEX)]))
    except GatedRepoError as e:
        raise ModelNotFoundError(f"model {repo_id!r} is gated on the Hugging Face hub: accept its terms on its hub "
                                 "page, then log in (`hf auth login`) or set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"model {repo_id!r} was not found on the Hugging Face hub: check the id; if it is "
                                 "private, log in (`hf auth login`) or set HF_TOKEN") from e
    except (ModelNotFoundError, InvalidModelError):
        raise
    except Exception as e:  # HfHubHTTPError (a server error), or no connection: the network's many error types
        return _from_cache_after(repo_id, selector, e)
    _write_ref(repo_id, revision, info.sha)
    if selector is not None or (WEIGHTS_FILE not in wanted and WEIGHTS_INDEX not in wanted):
        return paths[0]  # the GGUF file
    return os.path.dirname(paths[0])  # the snapshot: every wanted file sits at its top


def needed_files(repo_id: str, files: list[str], selector: str | None) -> list[str]:
    """The files of the repository (paths as listed by the hub) that the loader reads, weights index first."""
    if selector is not None:
        return [select_gguf(repo_id, files, selector)]
    if WEIGHTS_FILE in files or WEIGHTS_INDEX in files:
        if "config.json" not in files:
            raise InvalidModelError(f"hub repository {repo_id!r} has safetensors weights but no config.json")
        weights = WEIGHTS_INDEX if WEIGHTS_INDEX in files else WEIGHTS_FILE
        return [weights, *(f for f in (*CONFIG_FILES, *TOKENIZER_FILES) if f in files)]
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        raise ModelNotFoundError(f"hub repository {repo_id!r} has several GGUF files; pick one with "
                                 f"\"{repo_id}:QUANT\" (e.g. Q4_K_M) or \"{repo_id}:FILE.gguf\": "
                                 f"{', '.join(sorted(ggufs))}")
    raise InvalidModelError(f"hub repository {repo_id!r} has no weights Braid can load: no {WEIGHTS_FILE}, no "
                            f"{WEIGHTS_INDEX} and no .gguf file (it has: {', '.join(sorted(files)) or 'no files'})")


def _download(repo_id: str, commit: str, endpoint: str | None, files: list[str]) -> list[str]:
    from huggingface_hub import hf_hub_download

    return [hf_hub_download(repo_id, f, revision=commit, endpoint=endpoint, cache_dir=hub_cache_dir()) for f in files]


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    """Records `commit` as `revision` in the cache (as snapshot_download does), for later offline loads by id."""
    if revision == commit:
        return
    ref = os.path.join(hub_cache_dir(), repo_folder_name(repo_id=repo_id, repo_type="model"), "refs", revision)
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    with open(ref + ".tmp", "w", encoding="utf-8") as f:
        f.write(commit)
    os.replace(ref + ".tmp", ref)


def _shards(repo_id: str, index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidModelError(f"{WEIGHTS_INDEX} of {repo_id!r} has no usable weight_map ({e})") from e


def _from_cache_after(repo_id: str, selector: str | None, error: Exception) -> str:
    """The cached copy when the hub could not be asked; else an error naming both failures."""
    try:
        return find_cached_model(repo_id, selector)
    except ModelNotFoundError:
        raise ModelNotFoundError(f"could not download model {repo_id!r} from the Hugging Face hub "
                                 f"({type(error).__name__}: {error}) and it is not in the cache {hub_cache_dir()}"
                                 ) from error
