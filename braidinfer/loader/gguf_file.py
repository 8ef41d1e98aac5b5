"""GGUF checkpoints: llama.cpp's single-file format, dequantised to Hugging Face tensors with the `gguf` package."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from gguf import GGUFReader, dequantize

from braidinfer.errors import InvalidModelError, UnsupportedModelError
from braidinfer.loader.gguf_config import gguf_architecture, gguf_hf_config
from braidinfer.loader.gguf_families import FAMILIES, GGUFFamily
from braidinfer.loader.gguf_tensors import NON_PARAMETERS, hf_name, permuted_projection, unpermute_rows

GGUF_MAGIC = b"GGUF"


class GGUFCheckpoint:
    """An open GGUF file; tensors are dequantised to float32 one at a time, in file order."""

    def __init__(self, path: str, reader: GGUFReader, hf_config: dict[str, Any], family: GGUFFamily):
        self.path = path
        # Parsing the header costs seconds for a large vocabulary, so the reader opened at resolution is kept.
        self.reader = reader
        self.family, self.hf_config = family, hf_config
        self.heads = {"q": hf_config["num_attention_heads"], "k": hf_config["num_key_value_heads"]}
        self.params = [(t, hf_name(t.name, family)) for t in reader.tensors if t.name not in NON_PARAMETERS]
        self.tensor_count = len(self.params)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor in HF shape and row order) for every parameter of the file."""
        for info, name in self.params:
            try:
                array = dequantize(info.data, info.tensor_type)
            except NotImplementedError as e:
                raise UnsupportedModelError(f"{self.path}: tensor {info.name}: {e}") from None
            weight = torch.from_numpy(array if array.flags.writeable else array.copy())
            projection = permuted_projection(info.name) if self.family.permuted_qk else None
            if projection is not None:
                weight = unpermute_rows(weight, self.heads[projection])
            if self.family.tensor is not None:
                weight = self.family.tensor(name, weight, self.hf_config)
            yield name, weight

    def load_tokenizer(self) -> Any:
        """transformers' conversion of the GGUF vocabulary; the chat template comes from the GGUF metadata."""
        from transformers import AutoTokenizer

        directory, file = os.path.split(self.path)
        return AutoTokenizer.from_pretrained(directory, gguf_file=file, local_files_only=True)


def has_gguf_magic(path: str) -> bool:
    """Whether the file starts with the GGUF magic bytes (cheap: reads four bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path: str) -> tuple[dict[str, Any], GGUFCheckpoint]:
    """Parses the GGUF header (metadata and tensor table, no tensor data) into (hf_config, checkpoint)."""
    try:
        reader = GGUFReader(path)
    except Exception as e:  # GGUFReader signals a bad file with ValueError, struct or numpy errors alike
        raise InvalidModelError(f"{path} is not a valid GGUF file: {e}") from None
    family = FAMILIES[gguf_architecture(reader, path)]
    if not any(t.name == "token_embd.weight" for t in reader.tensors):
        raise InvalidModelError(f"{path} has no token_embd.weight tensor")
    unknown = [t.name for t in reader.tensors if t.name not in NON_PARAMETERS and hf_name(t.name, family) is None]
    if unknown:
        raise UnsupportedModelError(f"{path} has tensors the engine does not know: {', '.join(unknown[:5])}")
    hf_config = gguf_hf_config(reader, path)
    return hf_config, GGUFCheckpoint(path, reader, hf_config, family)
