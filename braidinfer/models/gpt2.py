"""GPT-2: learned absolute position embeddings, pre-LayerNorm blocks with biases, multi-head attention without rotary
embeddings, a GELU (tanh) MLP, and the token embedding as the output head.

Checkpoints name the body `transformer.*` (or, in the original OpenAI conversion, nothing) and store their projections
as Conv1D, [in, out]; `load_hook` renames them onto this module tree (`model.layers.N`, `model.embed_tokens`, as the
loader's tying of the head expects) and transposes the projections to nn.Linear's [out, in]. The fused c_attn (q, k,
v columns) is already the packed qkv projection PagedAttention takes.

The context is bounded by the learned positions (n_positions): the engine serves at most max_position_embeddings
tokens. Keys cannot be moved to a later position (the position is added to the residual stream, not rotated into the
keys), so prompts composed from chunks computed elsewhere are not supported.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from braidinfer.attention.spec import AttentionSpec
from braidinfer.errors import UnsupportedModelError
from braidinfer.layers import Gelu, LayerNorm, Linear, PagedAttention
from braidinfer.models.config import ModelConfig
from braidinfer.models.forward_batch import ForwardBatch

_CONV1D = re.compile(r".*\.(c_attn|c_proj|c_fc)\.weight")
_DROPPED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older checkpoints saved
_LAYER_PREFIX = re.compile(r"^h\.(\d+)\.")


def _eps(cfg: ModelConfig) -> float:
    return cfg.hf_config.get("layer_norm_epsilon", 1e-5)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.c_attn = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)  # q, k, v
        self.c_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.attn = PagedAttention(layer_idx, cfg.num_attention_heads, cfg.num_attention_heads, cfg.head_dim,
                                   rotary=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        o = self.attn(self.c_attn(x), batch)  # (T, hidden): k and v into the pool, attention
        return self.c_proj(o)


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.act = Gelu(cfg.hf_config.get("activation_function", "gelu_new"))
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))  # (T, hidden) -> (T, inner) -> (T, hidden)


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, _eps(cfg))
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = LayerNorm(cfg.hidden_size, _eps(cfg))
        self.mlp = GPT2MLP(cfg)

    def forward(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), batch)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # the checkpoint's wte
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, _eps(cfg))

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids) + self.wpe(batch.positions)  # (T, hidden)
        for layer in self.layers:
            h = layer(h, batch)
        return self.ln_f(h)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in the model's dtype."""
        return self.lm_head(hidden)

    def load_hook(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor -> (parameter name, layout), or None for the mask buffers. Names of a transformers
        checkpoint (`transformer.h.N...`) are mapped onto this module tree and its Conv1D projections transposed
        from [in, out] to nn.Linear's [out, in]; names already in this tree (`model.`, `lm_head.`: a GGUF file, whose
        projections llama.cpp stores as [out, in]) are taken as they are."""
        if name.endswith(_DROPPED):
            return None
        if name.startswith(("model.", "lm_head.")):
            return name, tensor
        name = name.removeprefix("transformer.")
        name = _LAYER_PREFIX.sub(r"layers.\1.", name, count=1)
        name = "model." + ("embed_tokens." + name.removeprefix("wte.") if name.startswith("wte.") else name)
        if _CONV1D.fullmatch(name):
            tensor = tensor.t()  # Conv1D [in, out] -> Linear [out, in]
        return name, tensor

    cannot_shift_keys = ("GPT-2's positions are learned and added before the first layer, so a chunk's keys cannot "
                         "be moved to another position; compose prompts from chunks with a rotary-embedding model")
    """Why a composed prompt's chunks cannot be moved (the request builder refuses one before any work)."""

    def shift_keys(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        raise UnsupportedModelError(self.cannot_shift_keys)

    def attention_specs(self) -> list[AttentionSpec]:
        """Scale 1 / sqrt(head_dim) (1 with scale_attn_weights false), further divided by layer_idx + 1 with
        scale_attn_by_inverse_layer_idx, as transformers' GPT2Attention computes it."""
        hf = self.config.hf_config
        scale = self.config.head_dim**-0.5 if hf.get("scale_attn_weights", True) else 1.0
        by_layer = hf.get("scale_attn_by_inverse_layer_idx", False)
        return [AttentionSpec(scale=scale / (i + 1) if by_layer else scale)
                for i in range(self.config.num_hidden_layers)]
