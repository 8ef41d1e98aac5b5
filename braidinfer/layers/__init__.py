"""The layers model files are built from. Each runs the path of the KernelPlan it was given (PyTorch by default);
`select_kernels` applies a plan to a whole model and `describe_kernels` says which path each kind of layer runs."""
from braidinfer.layers.activation import GeluAndMul, SiluAndMul
from braidinfer.layers.attention import PagedAttention
from braidinfer.layers.gelu import Gelu
from braidinfer.layers.gemma_norm import GemmaRMSNorm
from braidinfer.layers.layernorm import LayerNorm
from braidinfer.layers.linear import Linear
from braidinfer.layers.longrope import LongRoPEEmbedding
from braidinfer.layers.norm import RMSNorm
from braidinfer.layers.plan import GEMV_MAX_ROWS, KernelPlan, describe_kernels, gemv_prologues, select_kernels
from braidinfer.layers.rotary import RotaryEmbedding, Rotation, apply_rotary, rope_inv_freq

__all__ = [
    "GEMV_MAX_ROWS", "GeluAndMul", "KernelPlan", "Linear", "PagedAttention", "RMSNorm", "RotaryEmbedding",
    "Rotation", "SiluAndMul", "apply_rotary", "describe_kernels", "gemv_prologues", "rope_inv_freq",
    "select_kernels", "GemmaRMSNorm", "Gelu", "LayerNorm", "LongRoPEEmbedding",
]
