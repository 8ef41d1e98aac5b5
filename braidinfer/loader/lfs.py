"""Git LFS pointer files: what a `git clone` made without Git LFS holds in place of each large file.

A pointer is a ~130-byte text stub ("version https://git-lfs.github.com/spec/v1", "oid sha256:...", "size N");
read as safetensors or GGUF it looks merely corrupt, so the loaders check for one first and say what to do.
"""
from __future__ import annotations

import re

from braidinfer.errors import InvalidModelError

LFS_POINTER_PREFIX = b"version https://git-lfs"
_MAX_POINTER_BYTES = 1024  # the spec caps a pointer file at 1024 bytes


def check_not_lfs_pointer(path: str) -> None:
    """InvalidModelError when the file at `path` is a Git LFS pointer instead of the file it stands for."""
    try:
        with open(path, "rb") as f:
            head = f.read(_MAX_POINTER_BYTES)
    except OSError:
        return  # the caller's own read reports it
    if not head.startswith(LFS_POINTER_PREFIX):
        return
    size = re.search(rb"^size (\d+)$", head, re.MULTILINE)
    real = f" (the real file has {int(size[1]):,} bytes)" if size else ""
    raise InvalidModelError(f"{path} is a Git LFS pointer, not the file itself{real}: the repository was cloned "
                            "without Git LFS. Fetch the real files with `git lfs install && git lfs pull` in the "
                            "clone, or download the file itself (e.g. `hf download REPO FILE`)")
