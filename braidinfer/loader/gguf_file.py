"""GGUF checkpoints: llama.cpp's single-file format, dequantised to Hugging Face tensors with the `gguf` package."""
from __future__ import annotations

import functools
import glob
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter, GGMLQuantizationType, Keys, dequantize

from braidinfer.errors import BraidError, InvalidModelError, UnsupportedModelError
from braidinfer.loader.gguf_config import gguf_architecture, gguf_hf_config, metadata
from braidinfer.loader.gguf_families import FAMILIES, GGUFFamily
from braidinfer.loader.gguf_tensors import NON_PARAMETERS, hf_name, permuted_projection, unpermute_rows
from braidinfer.loader.lfs import check_not_lfs_pointer
from braidinfer.loader.quantized import QUANTIZED_TYPES, QuantizedTensor

GGUF_MAGIC = b"GGUF"
# The parts of a split GGUF are named "%s-%05d-of-%05d.gguf" (llama.cpp's llama_split_path; gguf-py's GGUFWriter).
_SPLIT_NAME = re.compile(r"(?P<stem>.+)-\d{5}-of-(?P<count>\d{5})\.gguf")
# GGUFReader builds GGMLQuantizationType(id) from each tensor's type id: Python's enum error for an id it lacks.
_UNKNOWN_TYPE = re.compile(r"(\d+)\)? is not a valid GGMLQuantizationType")


class GGUFCheckpoint:
    """An open GGUF file; tensors are dequantised to float32 one at a time, in file order.

    The file stays memory-mapped until `close`, which the engine calls once the weights and the tokenizer are loaded.
    """

    def __init__(self, path: str, reader: GGUFReader, hf_config: dict[str, Any], family: GGUFFamily):
        self.path = path
        # Parsing the header costs seconds for a large vocabulary, so the reader opened at resolution is kept.
        self.reader = reader
        self.family, self.hf_config = family, hf_config
        self.heads = {"q": hf_config["num_attention_heads"], "k": hf_config["num_key_value_heads"]}
        self.params = [(t, hf_name(t.name, family)) for t in reader.tensors if t.name not in NON_PARAMETERS]
        self.tensor_count = len(self.params)
        self._quantized_names = {name: info.tensor_type.name for info, name in self.params
                                 if info.tensor_type.name in QUANTIZED_TYPES and len(info.shape) >= 2}

    def tensors(self, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """(HF name, float32 tensor in HF shape and row order) for every parameter of the file.

        quantized: matrices of a type in QUANTIZED_TYPES come as QuantizedTensor (their blocks, rows in HF order)
        instead (a quantised vector, e.g. a bias, comes dequantised), except where the family's tensor hook changes
        the values (then dequantised, noted in `dequantized`). Every matrix dequantised despite `quantized` is noted
        there with the reason.
        """
        self._check_open()
        self.dequantized: dict[str, str] = {}
        for info, name in self.params:
            qtype = info.tensor_type.name
            if quantized and name in self._quantized_names:
                yield name, self._quantized(info, name, qtype)
                continue
            if quantized and len(info.shape) >= 2 and qtype not in ("F32", "F16", "BF16"):
                self.dequantized[name] = f"{qtype}: no kernel for this type"
            yield name, self._dequantized(info, name)

    def quantized_names(self) -> dict[str, str]:
        """HF name -> qtype of the tensors `tensors(quantized=True)` yields as QuantizedTensor (from the header)."""
        return dict(self._quantized_names)

    def close(self) -> None:
        """Unmaps the file (drops the reader and its tensor table); tensors and the tokenizer cannot be read after."""
        self.reader = None
        self.params = []

    def _check_open(self) -> None:
        if self.reader is None:
            raise RuntimeError(f"{self.path}: the checkpoint was closed after loading; resolve the model again")

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
        """transformers' conversion of the GGUF vocabulary; the chat template comes from the GGUF metadata.

        A family transformers cannot read (`GGUFFamily.tokenizer_architecture`) converts from a small GGUF that
        holds only the file's tokenizer metadata under an architecture it can. A file without a vocabulary, or
        one transformers cannot convert, raises InvalidModelError.
        """
        from transformers import AutoTokenizer

        self._check_open()
        if "tokenizer.ggml.tokens" not in self.reader.fields:
            raise InvalidModelError(f"{self.path} has no tokenizer (no tokenizer.ggml.tokens metadata); Braid reads "
                                    "the vocabulary from the GGUF file, so use a file exported with it (llama.cpp's "
                                    "converter writes it)")
        with tempfile.TemporaryDirectory(prefix="braid-tokenizer-") as scratch:
            path = self.path
            if self.family.tokenizer_architecture is not None:
                path = os.path.join(scratch, "tokenizer.gguf")
                _write_tokenizer_gguf(self.reader, path, self.family.tokenizer_architecture)
            directory, file = os.path.split(path)
            try:
                return AutoTokenizer.from_pretrained(directory, gguf_file=file, local_files_only=True)
            except Exception as e:  # transformers' GGUF conversion raises ValueError, KeyError, TypeError alike
                raise InvalidModelError(f"{self.path}: transformers cannot build its tokenizer: "
                                        f"{type(e).__name__}: {e}") from e


def copy_tokenizer_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    """Adds every tokenizer.* field of `reader` (vocabulary, merges, special ids, chat template) to `writer`."""
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            writer.add_key_value(key, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)


def _write_tokenizer_gguf(reader: GGUFReader, path: str, architecture: str) -> None:
    """A GGUF at `path` with the reader's tokenizer.* metadata, no tensors, and `architecture` as its own."""
    writer = GGUFWriter(path, architecture)
    copy_tokenizer_metadata(reader, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def has_gguf_magic(path: str) -> bool:
    """Whether the file starts with the GGUF magic bytes (cheap: reads four bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_files_in(directory: str) -> list[str]:
    """The `.gguf` files directly inside a directory, sorted by name."""
    return sorted(glob.glob(os.path.join(glob.escape(directory), "*.gguf")))


def open_gguf(path: str) -> tuple[dict[str, Any], GGUFCheckpoint]:
    """Parses the GGUF header (metadata and tensor table, no tensor data) into (hf_config, checkpoint)."""
    check_not_lfs_pointer(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # GGUFReader signals a bad file with ValueError, struct or numpy errors alike
        raise _reader_error(path, e) from None
    num_parts = metadata(reader, Keys.Split.LLM_KV_SPLIT_COUNT, 1)
    if num_parts > 1:  # checked first: only the first part has general.architecture
        raise UnsupportedModelError(f"{path} is one part of a GGUF split into {num_parts} files; "
                                    f"{merge_split_hint(path)}")
    family = FAMILIES[gguf_architecture(reader, path)]
    if not any(t.name == "token_embd.weight" for t in reader.tensors):
        raise InvalidModelError(f"{path} has no token_embd.weight tensor")
    unknown = [t.name for t in reader.tensors if t.name not in NON_PARAMETERS and hf_name(t.name, family) is None]
    if unknown:
        raise UnsupportedModelError(f"{path} has tensors the engine does not know: {', '.join(unknown[:5])}")
    undecodable = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if not _decodable(t.tensor_type)]
    if undecodable:
        raise UnsupportedModelError(f"{path} has tensors of a type Braid cannot decode: {', '.join(undecodable[:5])}"
                                    f"{' ...' if len(undecodable) > 5 else ''}; requantise the file to a llama.cpp "
                                    "type such as Q4_K_M or Q8_0")
    hf_config = gguf_hf_config(reader, path)
    return hf_config, GGUFCheckpoint(path, reader, hf_config, family)


def split_part(path: str) -> tuple[str, int] | None:
    """(NAME, N) when the file is named like a part of a split GGUF, NAME-0000k-of-0000N.gguf; else None."""
    match = _SPLIT_NAME.fullmatch(os.path.basename(path))
    return (match["stem"], int(match["count"])) if match else None


def merge_split_hint(path: str) -> str:
    """What to do with a part of a split GGUF: merge the parts with llama.cpp's tool (the first part names them)."""
    directory = os.path.dirname(path)
    part = split_part(path)
    first = os.path.join(directory, f"{part[0]}-00001-of-{part[1]:05d}.gguf") if part else path
    merged = os.path.join(directory, f"{part[0] if part else 'merged'}.gguf")
    return (f"split GGUFs are not supported: merge the parts into one file with `llama-gguf-split --merge {first} "
            f"{merged}` and load that file")


def _reader_error(path: str, error: Exception) -> BraidError:
    """The error for a file GGUFReader cannot parse: a tensor type newer than the installed `gguf`, or corruption."""
    unknown = _UNKNOWN_TYPE.search(str(error)) if isinstance(error, ValueError) else None
    if unknown:
        return UnsupportedModelError(f"{path} has a tensor of type id {unknown[1]}, which the installed gguf package "
                                     f"(version {_package_version('gguf')}) does not know: upgrade it "
                                     "(`pip install -U gguf`), or requantise the file to a llama.cpp type such as "
                                     "Q4_K_M or Q8_0")
    return InvalidModelError(f"{path} is not a valid GGUF file (truncated or corrupt? {os.path.getsize(path):,} "
                             f"bytes): {error}")


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # e.g. run from a source tree
        return "unknown"


@functools.cache
def _decodable(kind: GGMLQuantizationType) -> bool:
    """Whether the `gguf` package decodes tensors of this type (tried on one block of zeros)."""
    if kind not in GGML_QUANT_SIZES:
        return False
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[kind][1]), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True
