"""Tiny random checkpoints for the families whose configs need more than build_tiny_model_from_config: random biases
(zero at transformers' init, so a misplaced bias would not show) and a check that the reference really windows."""
from __future__ import annotations

import torch


def randomize_biases(model, path, seed: int = 0) -> None:
    """Draws every bias of `model` from N(0, 0.1) and saves the model again to `path` (its tokenizer stays)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)


def window_changes_logits(ref, unwindowed_config, length: int) -> bool:
    """Whether `ref` (a transformers model with sliding windows) gives other logits on a prompt of `length` tokens
    than the same weights under `unwindowed_config` (every layer full attention): proof the reference windows."""
    import transformers

    full = transformers.AutoModelForCausalLM.from_config(unwindowed_config).float().eval()
    full.load_state_dict(ref.state_dict())
    ids = torch.randint(3, ref.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return not torch.allclose(ref(ids).logits, full(ids).logits, atol=1e-3)
