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
from braidinfer.loader.quantized import QUANTIZED_TYPES, QuantizedTensor

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

    def tensors(self, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """(HF name, float32 tensor in HF shape and row order) for every parameter of the file.

        quantized: tensors of a type in QUANTIZED_TYPES come as QuantizedTensor (their blocks, rows in HF order)
        instead, except where the family's tensor hook changes the values (then dequantised, noted in
        `dequantized`). Every tensor dequantised despite `quantized` is noted there with the reason.
        """
        self.dequantized: dict[str, str] = {}
        for info, name in self.params:
            qtype = info.tensor_type.name
            if quantized and qtype in QUANTIZED_TYPES:
                yield name, self._quantized(info, name, qtype)
                continue
            if quantized and len(info.shape) >= 2 and qtype not in ("F32", "F16", "BF16"):
                self.dequantized[name] = f"{qtype}: no kernel for this type"
            yield name, self._dequantized(info, name)

    def quantized_names(self) -> dict[str, str]:
        """HF name -> qtype of the tensors `tensors(quantized=True)` yields as QuantizedTensor (from the header)."""
        return {name: info.tensor_type.name for info, name in self.params if info.tensor_type.name in QUANTIZED_TYPES}

    def _dequantized(self, info, name: str) -> torch.Tensor:
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
        return weight

    def _quantized(self, info, name: str, qtype: str) -> torch.Tensor | QuantizedTensor:
        blocks = torch.from_numpy(info.data.copy()).view(torch.uint8)  # the mmap is read-only
        shape = tuple(int(n) for n in reversed(info.shape))
        blocks = blocks.reshape(shape[0], -1)
        projection = permuted_projection(info.name) if self.family.permuted_qk else None
        if projection is not None:  # whole rows of blocks move: exact
            blocks = unpermute_rows(blocks, self.heads[projection]).contiguous()
        tensor = QuantizedTensor(blocks, qtype, shape)
        if self.family.hooks(name):
            # The hooks work on float values; a tensor one changes cannot stay quantised.
            values = tensor.dequantize()
            changed = self.family.tensor(name, values.clone(), self.hf_config)
            if changed.shape != values.shape or not torch.equal(changed, values):
                self.dequantized[name] = f"{qtype}: changed by the {self.family.architecture} tensor hook"
                return changed
        return tensor

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
