"""Hub ids downloaded through huggingface_hub from a local stand-in for the hub (an HTTP server on 127.0.0.1 set as
HF_ENDPOINT, answering the model-info and file-resolve endpoints), into a fresh hub cache per test. The reference
is the same model loaded from its directory; nothing reaches the network."""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.errors import InvalidModelError, ModelNotFoundError
from braidinfer.loader import resolve_model
from tests.conftest import build_tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


class FakeHub:
    """Repositories (repo id -> {path: bytes}) served as the hub serves them; `requests` logs (method, path)."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_dir(self, repo_id: str, directory, extra: dict[str, bytes] | None = None) -> None:
        files = {}
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, directory).replace(os.sep, "/")] = f.read()
        self.repos[repo_id] = {**files, **(extra or {})}

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            repo = self.repos.get(m[1])
            if repo is None:
                return self.send(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"},
                                 body)
            info = {"id": m[1], "sha": COMMIT, "siblings": [{"rfilename": name} for name in sorted(repo)]}
            return self.send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            data = self.repos.get(m[1], {}).get(m[3])
            if data is None:
                return self.send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            return self.send(handler, 200, data, {"X-Repo-Commit": COMMIT, "ETag": etag}, body)
        self.send(handler, 404, b"", {}, body)

    @staticmethod
    def send(handler, status: int, data: bytes, headers: dict, body: bool) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def downloads(self) -> set[str]:
        return {path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and "/resolve/" in path}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running fake hub as HF_ENDPOINT, an empty hub cache, and downloads allowed."""
    import huggingface_hub.constants

    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import (tests set it)
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers, with a tokenizer and chat template."""
    from qwen3_fixture import build_qwen3_tokenizer

    tok = build_qwen3_tokenizer()
    path = tmp_path_factory.mktemp("tiny-llama-hub")
    build_tiny_model("llama", path, tok, seed=5, vocab_size=len(tok), bos_token_id=tok.bos_token_id or 0,
                     eos_token_id=tok.eos_token_id)
    return str(path)


def _snapshot_files(cache) -> set[str]:
    root = next(cache.glob("models--*/snapshots/*"))
    return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names}


def test_download_generates_like_the_directory(hub, llama_dir, tmp_path):
    junk = {"pytorch_model.bin": b"not needed", "README.md": b"# tiny", "onnx/model.onnx": b"not needed"}
    hub.add_dir("tiny/llama", llama_dir, extra=junk)
    with LLM(model=llama_dir, device="cpu") as local:
        expected = local.generate([5, 6, 7, 8], GREEDY)[0].token_ids
    with LLM(model="tiny/llama", device="cpu") as downloaded:
        assert downloaded.generate([5, 6, 7, 8], GREEDY)[0].token_ids == expected
    served = set(hub.repos["tiny/llama"]) - set(junk)
    assert hub.downloads() == served and _snapshot_files(tmp_path / "hub-cache") == served


def test_cached_download_loads_offline_without_requests(hub, llama_dir, monkeypatch):
    hub.add_dir("tiny/llama", llama_dir)
    online = resolve_model("tiny/llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    offline = resolve_model("tiny/llama")
    assert offline.path == online.path and offline.hf_config == online.hf_config
    assert hub.requests == []


def test_sharded_checkpoint_downloads_every_shard(hub, tmp_path):
    import transformers
    from qwen3_fixture import build_qwen3_tokenizer

    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    build_qwen3_tokenizer().save_pretrained(tmp_path / "sharded")
    hub.add_dir("tiny/sharded", tmp_path / "sharded")
    shards = {f for f in hub.repos["tiny/sharded"] if f.endswith(".safetensors")}
    assert len(shards) > 1
    source = resolve_model("tiny/sharded")
    assert shards <= hub.downloads()
    ours = dict(source.iter_weights(torch.float32, progress=False))
    for name, ref in model.state_dict().items():
        assert torch.equal(ours[name], ref), name


def test_offline_and_not_cached_names_the_repo(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"'tiny/llama' is neither a local path nor in the Hugging Face "
                                                 r"cache .*HF_HUB_OFFLINE"):
        resolve_model("tiny/llama")
    assert hub.requests == []


def test_missing_repo(hub):
    with pytest.raises(ModelNotFoundError, match="'tiny/absent' was not found on the Hugging Face hub"):
        resolve_model("tiny/absent")


def test_repo_without_weights(hub):
    hub.repos["tiny/empty"] = {"config.json": b"{}", "README.md": b""}
    with pytest.raises(InvalidModelError, match=r"'tiny/empty' has no weights .*it has: README.md, config.json"):
        resolve_model("tiny/empty")


def test_unreachable_hub_falls_back_to_the_cache(hub, llama_dir, monkeypatch):
    hub.add_dir("tiny/llama", llama_dir)
    cached = resolve_model("tiny/llama").path
    hub.server.shutdown()
    hub.server.server_close()  # nothing listens on the endpoint any more
    assert resolve_model("tiny/llama").path == cached
    with pytest.raises(ModelNotFoundError, match="could not download model 'tiny/other'.*not in the cache"):
        resolve_model("tiny/other")


# --- GGUF repositories: the file chosen by quant type or name ---------------------------------------------------
@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """Two different tiny Qwen3 GGUFs, as a repository would name two quantisations, and their reference models."""
    import transformers

    from tests.unit.test_loader import TINY, _write_gguf

    files = {}
    for seed, name in enumerate(["tiny-qwen3-Q4_K_M.gguf", "tiny-qwen3-Q8_0.gguf"]):
        torch.manual_seed(seed)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=32)).eval()
        path = tmp_path_factory.mktemp("gguf") / name
        _write_gguf(model, path)
        files[name] = (path.read_bytes(), model)
    return files


@pytest.mark.parametrize("selector", ["Q8_0", "q8_0", "tiny-qwen3-Q8_0.gguf"])
def test_gguf_selected_by_quant_or_name(hub, gguf_files, selector):
    hub.repos["tiny/qwen3-GGUF"] = {name: data for name, (data, _) in gguf_files.items()} | {"README.md": b""}
    source = resolve_model(f"tiny/qwen3-GGUF:{selector}")
    assert source.format == "gguf" and os.path.basename(source.path) == "tiny-qwen3-Q8_0.gguf"
    assert hub.downloads() == {"tiny-qwen3-Q8_0.gguf"}
    ref = gguf_files["tiny-qwen3-Q8_0.gguf"][1].state_dict()
    ours = dict(source.iter_weights(torch.float32, progress=False))
    assert torch.equal(ours["model.layers.0.mlp.down_proj.weight"], ref["model.layers.0.mlp.down_proj.weight"])


def test_gguf_selector_without_match_lists_the_files(hub, gguf_files):
    hub.repos["tiny/qwen3-GGUF"] = {name: data for name, (data, _) in gguf_files.items()}
    with pytest.raises(ModelNotFoundError, match=r"no GGUF file in 'tiny/qwen3-GGUF' matches 'Q4_K'; its GGUF "
                                                 r"files: tiny-qwen3-Q4_K_M.gguf, tiny-qwen3-Q8_0.gguf"):
        resolve_model("tiny/qwen3-GGUF:Q4_K")
    assert hub.downloads() == set()


def test_gguf_repo_needs_a_selector_when_it_has_several(hub, gguf_files):
    hub.repos["tiny/qwen3-GGUF"] = {name: data for name, (data, _) in gguf_files.items()}
    with pytest.raises(ModelNotFoundError, match=r"several GGUF files; pick one with \"tiny/qwen3-GGUF:QUANT\""):
        resolve_model("tiny/qwen3-GGUF")


def test_gguf_selected_from_the_cache_offline(hub, gguf_files, monkeypatch):
    hub.repos["tiny/qwen3-GGUF"] = {name: data for name, (data, _) in gguf_files.items()}
    downloaded = resolve_model("tiny/qwen3-GGUF:Q4_K_M").path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tiny/qwen3-GGUF:Q4_K_M").path == downloaded
    with pytest.raises(ModelNotFoundError, match="no GGUF file in 'tiny/qwen3-GGUF' matches 'Q8_0'"):
        resolve_model("tiny/qwen3-GGUF:Q8_0")  # not downloaded: the cache has only the Q4_K_M file
