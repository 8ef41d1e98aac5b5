"""Which kernel each layer runs: chosen once per engine from its configuration and device, applied to the model by
`select_kernels`, and described line by line by `describe_kernels` (the engine's `kernel_paths`).

The model files make no choice: they call their layers, and each layer runs the path of the plan it was given
(PyTorch by default). The GEMV path's prologue fusion crosses module boundaries (a norm, then the next module's
projection); which norms and activations feed a projection directly is read off the model itself, by running its
forward once on the meta device (`gemv_prologues`), so a new architecture needs no declaration of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

# Steps of at most this many rows take the GEMV kernels when they are enabled: one. At two rows a Qwen3-0.6B
# layer's four GEMVs take as long as cuBLAS and the elementwise kernels (31.4 us both on an H100), at 4-8 rows
# 2-4x longer (benchmarks/gemv.py, benchmarks/RESULTS.md); the kernels themselves take up to kernels.gemv.MAX_ROWS.
GEMV_MAX_ROWS = 1


@dataclass(frozen=True)
class KernelPlan:
    """The execution path of every layer. Both False (the default): PyTorch everywhere.

    triton: the Triton kernels of `braid_kernels/` for RMSNorm (plain and with the residual add), SiLU-and-mul, and the
        attention's QK-norm + RoPE + KV write (the attention backend then only attends). CUDA tensors, or the CPU
        under TRITON_INTERPRET=1 (tests). They keep the PyTorch path's rounding points; only summation orders differ.
    gemv: steps of at most GEMV_MAX_ROWS rows run every projection of the forward as a GEMV kernel, with the norm or
        SiLU-and-mul that feeds it folded into the kernel's prologue. Needs `triton`.
    cpu: on the CPU, float32: RMSNorm (plain and with the residual add), SiLU-and-mul (braid_kernels/cpu_norm.c) and
        the attention of decoding rows (cpu_attention.c) through Braid's C kernels, one call a step instead of several
        torch ops. Chosen with the projections' "dot" form (QuantLinear), whose rounding of their inputs (~16 bits) is
        far above these kernels' summation-order differences from torch; the float path stays equal to transformers
        bit for bit.
    """

    triton: bool = False
    gemv: bool = False
    cpu: bool = False

    def __post_init__(self):
        if self.gemv and not self.triton:
            raise ValueError("KernelPlan(gemv=True) needs triton=True: the GEMV path attends through the fused "
                             "QK-norm + RoPE + KV-write kernel")

    @classmethod
    def choose(cls, fused_kernels: bool, gemv_decode: bool, device: torch.device, cpu_dot: bool = False
               ) -> KernelPlan:
        """The plan for an engine (EngineConfig.fused_kernels, .gemv_decode): the Triton kernels on CUDA; on the
        CPU, the C kernels where `cpu_dot` (some projection holds the "dot" form)."""
        triton = fused_kernels and torch.device(device).type == "cuda"
        cpu = fused_kernels and cpu_dot and torch.device(device).type == "cpu"
        return cls(triton=triton, gemv=triton and gemv_decode, cpu=cpu)


def select_kernels(model: nn.Module, plan: KernelPlan) -> None:
    """Sets every layer of `model` to `plan`'s path. Call before any CUDA graph is captured (a captured graph keeps
    the kernels it recorded). Layers are the modules with a `plan` attribute (braidinfer.layers)."""
    consumers = _consumers(model) if plan.gemv else {}
    prologues = gemv_prologues(model, consumers)
    int8_outputs = _int8_outputs(model, consumers)
    for name, module in model.named_modules():
        if hasattr(module, "plan"):
            module.plan = plan
        if hasattr(module, "feeds_gemv"):
            module.feeds_gemv = name in prologues
        if hasattr(module, "int8_output"):
            module.int8_output = name in int8_outputs


def gemv_prologues(model: nn.Module, consumers: dict[str, list[str]] | None = None) -> set[str]:
    """Names of the modules with a `feeds_gemv` attribute (norms, activations) whose output, in a one-row forward,
    goes straight into projections only (braidinfer.layers.Linear, or QuantLinear in `model` itself): the steps a
    GEMV kernel can take into its prologue (a QuantLinear: the step's kernel writes the int8 rows its GEMV reads).
    consumers: `_consumers(model)`, if computed already. A norm whose output also goes elsewhere would fail loudly
    (a deferred value is not a tensor), never silently."""
    from braidinfer.layers.linear import Linear
    from braidinfer.layers.quant_linear import QuantLinear

    consumers = _consumers(model) if consumers is None else consumers
    modules = dict(model.named_modules())
    # The twin has plain Linears; where the loaded model holds a QuantLinear instead (quantised weights), the step is
    # deferred too: QuantLinear computes it as the int8 rows its GEMV reads, or as a tensor.
    return {name for name, users in consumers.items() if hasattr(modules.get(name), "feeds_gemv")
            and all(isinstance(modules.get(u), (Linear, QuantLinear)) for u in users)}


def _int8_outputs(model: nn.Module, consumers: dict[str, list[str]]) -> set[str]:
    """Names of the modules with an `int8_output` attribute (attention) whose output goes only into QuantLinears
    that round their input to int8 rows (QuantLinear.takes_int8_rows): those may write their output in that form
    too, so that the projection needs no rounding launch of its own."""
    from braidinfer.layers.quant_linear import QuantLinear

    modules = dict(model.named_modules())
    return {name for name, users in consumers.items() if hasattr(modules.get(name), "int8_output") and users
            and all(isinstance(modules.get(u), QuantLinear) and modules[u].takes_int8_rows for u in users)}


def _consumers(model: nn.Module) -> dict[str, list[str]]:
    """For each module with a `feeds_gemv` or `int8_output` attribute whose output, in a one-row forward, goes into
    a projection (braidinfer.layers.Linear): the names of those projections. Found by running the forward of a twin
    of the model (`type(model)(model.config)`) on the meta device, so nothing is computed; forward hooks note each
    candidate's output and each Linear's input."""
    from braidinfer.layers.linear import Linear

    with torch.device("meta"):
        twin = type(model)(model.config)
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (module name, output kept alive)
    fed: dict[str, list[str]] = {}  # candidate -> the Linears its output goes into

    def note_output(name):
        def hook(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            produced[id(t)] = (name, t)
        return hook

    def note_input(name):
        def hook(module, args):
            if args and id(args[0]) in produced:
                fed.setdefault(produced[id(args[0])][0], []).append(name)
        return hook

    hooks = []
    for name, module in twin.named_modules():
        if hasattr(module, "feeds_gemv") or hasattr(module, "int8_output"):
            hooks.append(module.register_forward_hook(note_output(name)))
        elif isinstance(module, Linear):
            hooks.append(module.register_forward_pre_hook(note_input(name)))
    one = torch.zeros(1, dtype=torch.int64, device="meta")
    batch = SimpleNamespace(positions=one, meta=None, attention=_MetaAttention(), rope=None)
    try:
        with torch.inference_mode():
            twin(one, batch)
    finally:
        for h in hooks:
            h.remove()
    return fed


class _MetaAttention:
    """A stand-in attention backend for the meta-device forward: shapes only."""

    def __call__(self, layer, q, k, v, meta):
        return torch.empty_like(q)

    def attend(self, layer, q, meta):
        return torch.empty_like(q)


def describe_kernels(model: nn.Module, attention=None) -> list[str]:
    """One line per kind of layer and path, naming the modules that run it (their last name component), e.g.
    "rmsnorm (input_layernorm, post_attention_layernorm): triton rms_norm / fused_add_rms_norm"; then the attention
    backend's path when `attention` (the runner's backend object) is given."""
    inside_attention = {id(norm) for m in model.modules() for norm in (getattr(m, "qk_norms", None) or ())}
    paths: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if id(module) in inside_attention:
            continue  # described by its PagedAttention's line
        if hasattr(module, "kernel_path"):
            path = module.kernel_path()
        elif type(module) is nn.Linear:
            path = "linear: torch F.linear"
        else:
            continue
        names = paths.setdefault(path, [])
        if name.rsplit(".", 1)[-1] not in names:
            names.append(name.rsplit(".", 1)[-1])
    lines = [path.replace(":", f" ({', '.join(names)}):", 1) for path, names in paths.items()]
    if attention is not None:
        lines.append(f"attention backend: {_backend_path(attention)}")
    return lines


def _backend_path(attention) -> str:
    name = type(attention).__name__
    if name == "TorchAttention":
        return "torch (SDPA per sequence over K/V gathered through its page table)"
    if name == "FlashInferAttention":
        return ("flashinfer (paged prefill / decode, planned once per step; CUDA-graph decodes of up to "
                "TRITON_DECODE_MAX_ROWS rows attend with triton decode_attention)")
    return name
