"""A resolved model: where it lives, its config, and how to stream its weights and load its tokenizer."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm


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
    `format` is "safetensors" or "gguf", and `hf_config` a config.json-style dict (synthesised for GGUF).
    """

    name: str
    path: str
    format: str
    hf_config: dict[str, Any]
    checkpoint: Checkpoint = field(repr=False, compare=False)

    def __hash__(self) -> int:  # hf_config is a dict, so hash by identity of the files instead
        return hash((self.path, self.format))

    def iter_weights(self, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (Hugging Face parameter name, CPU tensor cast to `dtype`) for every tensor, one at a time.

        Names match transformers' state_dict keys ("model.layers.0.self_attn.q_proj.weight", ...); "lm_head.weight"
        is absent when the checkpoint ties it to the embeddings. A tqdm bar counts tensors unless `progress` is False.
        """
        bar = tqdm(total=self.checkpoint.tensor_count, desc=f"Loading {self.name}", unit="tensor",
                   disable=not progress, leave=False)
        with bar:
            for name, tensor in self.checkpoint.tensors():
                yield name, tensor.to(dtype)
                bar.update(1)

    def load_tokenizer(self) -> Any:
        """The model's transformers tokenizer (a PreTrainedTokenizerBase) with its chat template, loaded offline."""
        return self.checkpoint.load_tokenizer()
