"""braidinfer.cpu_graphs: layers whose recorded kernel calls replay compute, step after step with new inputs, what
the kernels' plain-PyTorch references compute; layers the recording cannot account for (a torch op between the
kernels, a pointer into memory the layer was neither given nor owns) keep running eagerly and stay right."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from braid_kernels import cpu_library, cpu_norm, cpu_quant
from braidinfer.attention.metadata import AttentionMetadata
from braidinfer.cpu_graphs import CpuGraphs
from braidinfer.models.forward_batch import ForwardBatch
from tests.support.gguf_quant import quantize

pytestmark = pytest.mark.skipif(not cpu_library.available(), reason=f"{cpu_library.unavailable_reason()}")

DIM, EPS = 64, 1e-5


class Layer(nn.Module):
    """A decoder layer's shape: h = x + residual (the first layer: h = x); normed = RMSNorm(h), then RMSNorm by the
    step's `scale`; out = silu_and_mul(normed @ W.T) with W [2 DIM, DIM] Q8_0. Returns (out, h)."""

    def __init__(self, seed: int, first: bool = False, torch_op: bool = False, outside: torch.Tensor | None = None):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.weight = nn.Parameter(torch.from_numpy(rng.standard_normal(DIM).astype(np.float32)))
        self.proj = cpu_quant.pack(torch.from_numpy(quantize(
            rng.standard_normal((2 * DIM, DIM)).astype(np.float32) * 0.2, "Q8_0")), "Q8_0")
        self.first, self.torch_op, self.outside = first, torch_op, outside

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch):
        if self.first:
            normed, residual = cpu_norm.rms_norm(x, self.weight, EPS), x
        else:
            normed, residual = cpu_norm.rms_norm(x, self.weight, EPS, residual)
        if self.torch_op:
            normed.mul_(2)  # arithmetic outside the kernels (on a kernel's output), which a replay would skip
        scale = self.outside if self.outside is not None else STEP_SCALE[id(batch)]
        normed = cpu_norm.rms_norm(normed, scale, EPS)
        return cpu_norm.silu_and_mul(cpu_quant.linear(normed, self.proj)), residual

    def reference(self, x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor):
        h = x if residual is None else x + residual
        normed = cpu_norm.rms_norm_ref(h, self.weight, EPS) * (2 if self.torch_op else 1)
        normed = cpu_norm.rms_norm_ref(normed, scale, EPS)
        return cpu_norm.silu_and_mul_ref(cpu_quant.linear_ref(normed, self.proj, x_terms=2)), h


STEP_SCALE: dict[int, torch.Tensor] = {}  # id(batch) -> the step's scale vector


def step_inputs(batch: ForwardBatch) -> dict[str, torch.Tensor]:
    return {"scale": STEP_SCALE[id(batch)]}


def run_steps(layers: list[Layer], rows: list[int], seed: int = 0):
    """Runs the layers over steps of `rows` rows, new x and scale each step, comparing each layer's outputs with the
    references on the same inputs; returns the last step's output."""
    gen = torch.Generator().manual_seed(seed)
    for num_rows in rows:
        x = torch.randn(num_rows, DIM, generator=gen)
        scale = torch.rand(DIM, generator=gen) + 0.5
        batch = ForwardBatch(positions=torch.zeros(num_rows, dtype=torch.int64),
                             meta=AttentionMetadata([], torch.zeros(num_rows, dtype=torch.int64), num_rows),
                             attention=None)
        STEP_SCALE[id(batch)] = scale
        out, residual = x, None
        for layer in layers:
            expected = layer.reference(out, residual, layer.outside if layer.outside is not None else scale)
            out, residual = layer(out, residual, batch)
            # the kernels sum in another order than the references and round x to ~16 bits for the product
            torch.testing.assert_close(out, expected[0], rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(residual, expected[1], rtol=0, atol=0)
        del STEP_SCALE[id(batch)]
    return out


def graphs_of(layers: list[Layer], max_rows: int = 8) -> CpuGraphs:
    persistent = [p for layer in layers for p in layer.parameters()]
    return CpuGraphs(layers, persistent, max_rows=max_rows, step_inputs=step_inputs)


def test_layers_replay_with_each_steps_inputs():
    """Three chained layers replay at 1 and 3 rows (a graph per layer and row count) with new x and step inputs each
    step; the replayed outputs equal the eager ones bit for bit."""
    layers = [Layer(0, first=True), Layer(1), Layer(2)]
    eager = [Layer(0, first=True), Layer(1), Layer(2)]
    graphs = graphs_of(layers)
    rows = [1, 1, 3, 1, 3, 3, 1]
    run_steps(layers, rows, seed=5)
    assert graphs.num_graphs == 6  # captured on the first step of each row count, replayed after
    assert torch.equal(run_steps(layers, [3], seed=9), run_steps(eager, [3], seed=9))


def test_first_layer_returns_the_current_input():
    """The first layer returns its own input as the residual stream: a replay returns this step's x, not the
    captured step's."""
    layer = Layer(0, first=True)
    graphs = graphs_of([layer])
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, DIM, generator=gen)
        batch = ForwardBatch(positions=torch.zeros(2, dtype=torch.int64),
                             meta=AttentionMetadata([], torch.zeros(2, dtype=torch.int64), 2), attention=None)
        STEP_SCALE[id(batch)] = torch.ones(DIM)
        _, residual = layer(x, None, batch)
        assert residual is x
    assert graphs.num_graphs == 1


def test_torch_op_between_kernels_keeps_the_layer_eager():
    layers = [Layer(0, first=True), Layer(1, torch_op=True), Layer(2)]
    graphs = graphs_of(layers)
    run_steps(layers, [2, 2, 2], seed=3)  # right on every step, the middle layer eagerly
    assert graphs.num_graphs == 2


def test_pointer_outside_the_layer_keeps_it_eager():
    """A layer reading a tensor that is neither a parameter, nor given, nor its own (a plain attribute) runs
    eagerly: a replay could not know that tensor changes (here it is overwritten between steps)."""
    outside = torch.ones(DIM)
    layers = [Layer(0, first=True), Layer(1, outside=outside)]
    graphs = graphs_of(layers)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        outside.copy_(torch.rand(DIM, generator=gen) + 0.5)
        run_steps(layers, [1], seed=int(torch.randint(100, (1,), generator=gen)))
    assert graphs.num_graphs == 1


def test_steps_past_max_rows_or_without_inputs_run_eagerly():
    layers = [Layer(0, first=True), Layer(1)]
    graphs = CpuGraphs(layers, [p for la in layers for p in la.parameters()], max_rows=2,
                       step_inputs=lambda batch: None if batch.meta.num_tokens == 1 else step_inputs(batch))
    run_steps(layers, [1, 3, 4, 1], seed=6)  # one row: no step inputs; 3, 4 rows: over max_rows
    assert graphs.num_graphs == 0
    run_steps(layers, [2, 2], seed=7)
    assert graphs.num_graphs == 2


def test_thread_count_is_the_replays_own():
    """The products' OpenMP thread-count argument is set at each replay (the engine changes the count between decode
    steps), not frozen at the capture: one graph per layer and row count whatever the count."""
    from braid_kernels.cpu_library import SIGNATURES
    from braid_kernels.cpu_program import KERNELS

    layers = [Layer(0, first=True), Layer(1)]
    graphs = graphs_of(layers)
    before = torch.get_num_threads()
    index = SIGNATURES["braid_cpu_quant_linear"][2]
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            run_steps(layers, [1, 1], seed=count)
            # the arguments a program's last run put into its calls (cpu_program.c writes the patches in place)
            products = [op for g in graphs._graphs.values() for op in g.program._ops
                        if op.kernel == KERNELS.index("braid_cpu_quant_linear")]
            assert len(products) == 2 and all(op.a[index] == count for op in products)
    finally:
        torch.set_num_threads(before)
    assert graphs.num_graphs == 2


def test_installing_twice_is_refused():
    layers = [Layer(0, first=True)]
    graphs_of(layers)
    with pytest.raises(ValueError, match="installed twice"):
        graphs_of(layers)


class HiddenCall(Layer):
    """Makes its SiLU-and-mul through a function looked up before any recording (so no recording sees it)."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.silu_mul = cpu_library.library().braid_cpu_silu_mul

    def forward(self, x, residual, batch):
        normed, residual = cpu_norm.rms_norm(x, self.weight, EPS, residual)
        normed = cpu_norm.rms_norm(normed, STEP_SCALE[id(batch)], EPS)
        y = cpu_quant.linear(normed, self.proj)
        out = y.new_empty((y.shape[0], DIM))
        self.silu_mul(y.data_ptr(), out.data_ptr(), y.shape[0], DIM)
        return out, residual


def test_a_call_the_recording_missed_keeps_the_layer_eager():
    """The capture's check replay (its memory poisoned first) finds the output the recorded calls do not compute."""
    layers = [Layer(0, first=True), HiddenCall(1)]
    graphs = graphs_of(layers)
    run_steps(layers, [1, 1, 1], seed=8)
    assert graphs.num_graphs == 1 and graphs.num_eager == 1


def test_no_step_inputs_once_no_layer_replays():
    """When no layer can replay (found at the first shape), later steps skip building the step's inputs."""
    calls = []
    layers = [Layer(0, first=True, torch_op=True), Layer(1, torch_op=True)]
    graphs = CpuGraphs(layers, [p for la in layers for p in la.parameters()],
                       step_inputs=lambda batch: calls.append(1) or step_inputs(batch))
    run_steps(layers, [1, 1, 2, 1], seed=10)
    assert calls == [1] and graphs.num_eager == 2
