"""A resolved model: where it lives, its config, and how to stream its weights and load its tokenizer."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from braidinfer.loader.quantized import QuantizedTensor


class Checkpoint(Protocol):
    """What a checkpoint format provides to `ModelSource` (see `hf.py` and `gguf_file.py`)."""

    tensor_count: int

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face parameter name, CPU tensor in the file's own or a float dtype), one at a time."""

    def load_tokenizer(self) -> Any:
        """The checkpoint's transformers tokenizer, loaded offline."""


@dataclass(frozen=True)
class ModelSource:
    """A model found on local disk, ready to load; building one reads metadata only, never weights.

    `name` is a display name (directory name, GGUF file stem or hub id), `path` the directory or `.gguf` file,
    `format` is "safetensors" or "gguf", `hf_config` a config.json-style dict (synthesised for GGUF), and
    `generation_config` the directory's generation_config.json ({} when absent, and for GGUF, whose end-of-turn ids
    are already in `hf_config`).
    """

    name: str
    path: str
    format: str
    hf_config: dict[str, Any]
    checkpoint: Checkpoint = field(repr=False, compare=False)
    generation_config: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # hf_config is a dict, so hash by identity of the files instead
        return hash((self.path, self.format))

    def iter_weights(self, dtype: torch.dtype, progress: bool = True,
                     quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """Yields (Hugging Face parameter name, CPU tensor cast to `dtype`) for every tensor, one at a time.

        quantized: a checkpoint that stores quantised tensors (GGUF) yields those of a type the engine computes from
        as QuantizedTensor (uncast); see `quantized_names`.

        Names match transformers' state_dict keys ("model.layers.0.self_attn.q_proj.weight", ...); "lm_head.weight"
        is absent when the checkpoint ties it to the embeddings. A tqdm bar counts tensors unless `progress` is False.
        """
        bar = tqdm(total=self.checkpoint.tensor_count, desc=f"Loading {self.name}", unit="tensor",
                   disable=not progress, leave=False)
        with bar:
            # A GGUF is read with quantized=True even when none of its types has a kernel: that read notes each
            # tensor dequantised, and why, for the load summary.
            quantizable = getattr(self.checkpoint, "quantized_names", None) is not None
            tensors = self.checkpoint.tensors(quantized=True) if quantized and quantizable else \
                self.checkpoint.tensors()
            for name, tensor in tensors:
                yield name, tensor if isinstance(tensor, QuantizedTensor) else tensor.to(dtype)
                bar.update(1)

    def quantized_names(self) -> dict[str, str]:
        """HF name -> qtype of the tensors `iter_weights(quantized=True)` yields as QuantizedTensor; {} for formats
        without quantised tensors."""
        names = getattr(self.checkpoint, "quantized_names", None)
        return names() if names is not None else {}

    def dequantized_names(self) -> dict[str, str]:
        """After `iter_weights(quantized=True)`: HF name -> why a quantised tensor was dequantised anyway."""
        return dict(getattr(self.checkpoint, "dequantized", {}))

    def load_tokenizer(self) -> Any:
        """The model's transformers tokenizer (a PreTrainedTokenizerBase) with its chat template, loaded offline."""
        return self.checkpoint.load_tokenizer()

    def release(self) -> None:
        """Closes the checkpoint's files once the engine has loaded what it needs (a GGUF stays memory-mapped until
        then); `iter_weights` and `load_tokenizer` cannot run afterwards."""
        close = getattr(self.checkpoint, "close", None)
        if close is not None:
            close()
