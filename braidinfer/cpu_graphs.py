"""Replayed decoder layers on the CPU: each layer's decode step recorded once as the calls it makes into Braid's C
kernels (braid_kernels.cpu_library), then made back to back without the layer's Python, in one call
(braid_kernels/cpu_program.c).

On the C kernel plan (KernelPlan.cpu) a decode step of the embedded SmolLM2-135M is ~240 kernel calls. Made back to
back they took 6.7 ms on two cores; inside the layers' Python (module calls, argument checks, allocations) the step
took 13.2 ms, and the same Python with the kernels replaced by no-ops 3.0 ms (benchmarks/RESULTS.md). This is the
CPU's counterpart of the CUDA graphs (braidinfer.cuda_graphs).

Capture: the first decode step of a shape runs each layer eagerly under `_Recording`, which notes every call into the
library and every torch op (a TorchDispatchMode). A layer replays when the torch ops were allocations and views only
(every value computed by the kernels), it returned tensors it allocated or was given, and every pointer a kernel
received lies in memory the recording can account for:
- allocated during the capture (the layer's intermediates and outputs): the graph keeps them;
- the layer's tensor arguments (x, residual) or the step's inputs (`cpu_step_inputs`: the rotary rows and the
  attention's StepRows): re-pointed at every replay to the current step's tensors, at the same offset;
- the model's parameters and buffers and the KV pool, which stay where they are (a packed weight's descriptor,
  passed as a ctypes pointer, is built once per weight and points into its buffers).
The new graph is then replayed once on the captured step's inputs with its own memory poisoned, and kept only if it
reproduces the layer's outputs (a call the recording missed would leave them poisoned). Otherwise the layer runs
eagerly at that shape (the reason logged once). A replay computes what the eager layer would, with the same kernels
and arguments: the same values, bit for bit. Each graph keeps its intermediates: a few rows of each activation, e.g.
~40 KB a layer and row for the embedded model.

A replayed layer returns the captured output tensors, overwritten when the same layer replays again: valid for one
step, as the layers' outputs are used. Shapes: a step of at most `max_rows` decoding rows, keyed by the tensor
arguments' shapes and strides (the kernels' thread-count arguments are set at each replay).
"""
from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from braidinfer.layers.attention import cpu_step_inputs
from braidinfer.models.forward_batch import ForwardBatch

log = logging.getLogger(__name__)

MAX_ROWS = 8
"""Decode steps of up to this many rows replay (a graph per row count and layer; each holds its intermediates)."""
MAX_SLOTS = 32  # tensors bound at each replay: the step's inputs, the thread count, a layer's tensor arguments

_PATCHING = threading.Lock()  # one recording at a time replaces the library's functions (engines on other threads)
_THREAD = threading.local()  # .recording: this thread is inside a capture (a nested layer then runs eagerly)
_ALLOCATIONS = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"})


class _Graph:
    """One layer's recorded calls (a braid_kernels.cpu_program.Program) and how to find its outputs."""

    def __init__(self, program, arg_slots: list[tuple[int, int]], step_names: set[str],
                 outputs: list[tuple[str, object]], single: bool, keep: list):
        self.program, self.arg_slots, self.outputs, self.single = program, arg_slots, outputs, single
        self.step_names = step_names  # the step inputs the calls read (a step without one of them runs eagerly)
        self.keep = keep  # the tensors the calls point into

    def replay(self, bound: ctypes.Array, args: tuple):
        """Makes the calls, `bound` holding the step's slots (its inputs' addresses, the thread count); the layer's
        tensor arguments' addresses are put into theirs here. Returns the layer's outputs."""
        for i, slot in self.arg_slots:
            bound[slot] = args[i].data_ptr()
        rc = self.program.run(bound)
        if rc:
            raise (MemoryError if rc == -2 else ValueError)(f"a replayed decode step's kernel failed (status {rc})")
        outs = [args[value] if kind == "arg" else value for kind, value in self.outputs]
        return outs[0] if self.single else tuple(outs)


class CpuGraphs:
    """Replays the decode steps of `layers` (the model's decoder layers, in order), installed by overriding each
    layer's `forward` (the model's code is unchanged). `persistent`: the tensors that outlive every step (the model's
    parameters and buffers, the KV pool; none of them replaced afterwards). Each layer's forward takes its tensors
    and the step's ForwardBatch. `step_inputs(batch)`: the step-wide tensors the layers' kernels read, None where the
    step must run eagerly."""

    def __init__(self, layers: Iterable[nn.Module], persistent: Iterable[torch.Tensor], max_rows: int = MAX_ROWS,
                 step_inputs: Callable[[ForwardBatch], dict[str, torch.Tensor] | None] = cpu_step_inputs):
        self.max_rows, self.step_inputs = max_rows, step_inputs
        self._persistent = [t for t in persistent if t.numel()]
        self._graphs: dict[tuple, _Graph | None] = {}  # None: that layer and shape run eagerly
        self._step: tuple[ForwardBatch, dict[str, torch.Tensor] | None] | None = None
        self._slots: dict[str, int] = {"threads": 0}  # the names bound at each replay -> their index in _bound
        self._bound = (ctypes.c_int64 * MAX_SLOTS)()
        self._logged: set[str] = set()
        self._none_replay = False  # every layer tried, none replays
        self.layers = list(layers)
        for index, layer in enumerate(self.layers):
            if getattr(layer.forward, "replays", False):
                raise ValueError(f"layer {index} already replays its decode steps (CpuGraphs installed twice)")
            layer.forward = self._replaying(index, layer.forward)

    @property
    def num_graphs(self) -> int:
        """Layer graphs captured so far (over every shape)."""
        return sum(g is not None for g in self._graphs.values())

    @property
    def num_eager(self) -> int:
        """Layers and shapes found not to replay (they run eagerly)."""
        return sum(g is None for g in self._graphs.values())

    def _replaying(self, index: int, eager: Callable) -> Callable:
        def forward(*args):
            step = None if getattr(_THREAD, "recording", False) else self._inputs(args)
            if step is None:
                return eager(*args)
            key = (index, *(_spec(a) for a in args))
            graph = self._graphs.get(key, False)
            if graph is False:
                graph, out = self._capture(index, eager, args, step)
                self._graphs[key] = graph
                self._none_replay = len(self._graphs) >= len(self.layers) and not self.num_graphs
                return out
            if graph is None or not graph.step_names <= step.keys():
                return eager(*args)
            return graph.replay(self._bound, args)
        forward.replays = True
        return forward

    def _inputs(self, args: tuple) -> dict[str, torch.Tensor] | None:
        """The step's inputs when this call may replay (a decode step of at most max_rows rows, some layer
        replayable), else None; their addresses and the thread count put into their slots. Computed by the step's
        first layer, before any capture."""
        batch = next((a for a in args if isinstance(a, ForwardBatch)), None)
        if batch is None or batch.meta.num_tokens > self.max_rows:
            return None
        if self._none_replay:
            return None  # no layer replays (at the first shape tried): skip building the step's inputs
        if self._step is None or self._step[0] is not batch:
            inputs = self.step_inputs(batch)
            if inputs is not None and (len(self._slots.keys() | inputs.keys()) > MAX_SLOTS // 2 or any(
                    name == "threads" or name.startswith("arg") for name in inputs)):
                inputs = None  # (room for the layers' arguments; their names and "threads" are the slots' own)
            for name, t in (inputs or {}).items():
                self._bound[self._slot(name)] = t.data_ptr()
            self._bound[0] = torch.get_num_threads()  # set around the step (braidinfer.step_threads)
            self._step = (batch, inputs)
        return self._step[1]

    def _slot(self, name: str) -> int:
        """The index in the bound array of `name` (a step input, "threads" or "arg{i}"), assigned on first use."""
        if name not in self._slots:
            if len(self._slots) == MAX_SLOTS:
                raise _NotReplayable(f"more than {MAX_SLOTS} bound tensors")
            self._slots[name] = len(self._slots)
        return self._slots[name]

    def _capture(self, index: int, eager: Callable, args: tuple, inputs: dict[str, torch.Tensor]):
        """Runs the layer eagerly under a recording: (its graph, or None if it cannot replay; its output). The graph
        is replayed once on the same inputs, its memory poisoned first, and kept only if it gives the same outputs (a
        kernel call the recording missed would leave them poisoned)."""
        tensors = dict(inputs)
        tensors.update((f"arg{i}", a) for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        with _Recording() as recording:
            out = eager(*args)
        expected = []
        try:
            outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            graph = recording.graph(outs, isinstance(out, torch.Tensor), args, tensors,
                                    [_extent(t) for t in self._persistent], self._slot)
            expected = [(t, t.clone()) for t in outs]
            for t in recording.allocated:
                t.untyped_storage().fill_(255)  # float32 NaN, int -1
            again = graph.replay(self._bound, args)
            if not all(torch.equal(e, a) for (_, e), a in zip(expected, (again,) if graph.single else again)):
                raise _NotReplayable("replayed on the captured step's inputs, it did not reproduce its outputs")
        except Exception as reason:  # noqa: BLE001 (any failure leaves the layer eager, with the reason logged)
            for t, saved in expected:
                t.copy_(saved)  # the eager outputs, which the check replay overwrote
            if str(reason) not in self._logged:
                self._logged.add(str(reason))
                log.info("decoder layer %d (and any other for the same reason) runs eagerly in decode steps: %s",
                         index, reason)
            return None, out
        return graph, out


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder layers: its first ModuleList named "layers" (None if it has none)."""
    return next((m for name, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"), None)


class _NotReplayable(Exception):
    pass


class _Recording(TorchDispatchMode):
    """Notes the calls into Braid's CPU library made on this thread (calls from other threads pass through), and
    every torch op of this thread, while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[Callable, tuple, int | None]] = []  # (function, arguments, thread-count argument)
        self.allocated: list[torch.Tensor] = []
        self.problem: str | None = None
        self._thread = threading.get_ident()
        self._originals: dict[str, Callable] = {}

    def __enter__(self):
        from braid_kernels.cpu_library import SIGNATURES, library  # on use: braid_kernels reads TRITON_INTERPRET

        _PATCHING.acquire()
        try:
            lib = library()
            for name, (_, _, threads) in SIGNATURES.items():
                if name == "braid_cpu_run":
                    continue  # a replay's program, never made during a capture (nested captures run eagerly)
                self._originals[name] = original = getattr(lib, name)
                setattr(lib, name, self._noting(original, threads))
            _THREAD.recording = True
            return super().__enter__()
        except BaseException:
            self._restore(library())
            raise

    def __exit__(self, *exc):
        from braid_kernels.cpu_library import library

        self._restore(library())
        return super().__exit__(*exc)

    def _restore(self, lib) -> None:
        for name, original in self._originals.items():
            setattr(lib, name, original)
        _THREAD.recording = False
        _PATCHING.release()

    def _noting(self, fn: Callable, threads: int | None) -> Callable:
        def call(*args):
            if threading.get_ident() == self._thread:
                self.calls.append((fn, args, threads))
            return fn(*args)
        return call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _ALLOCATIONS:
            self.allocated.append(out)
        elif not (func.is_view and _aliases(out, args)) and self.problem is None:
            self.problem = f"it computes {func} outside Braid's kernels"
        return out

    def graph(self, outs: tuple, single: bool, args: tuple, bound: dict[str, torch.Tensor],
              persistent: list[tuple[int, int]], slot_of: Callable[[str], int]) -> _Graph:
        """The recorded calls as a graph: `bound` the tensors re-pointed at each replay by name ("arg{i}" the
        layer's arguments), `persistent` the extents that stay, `slot_of(name)` a bound name's slot."""
        from braid_kernels.cpu_program import Program

        if self.problem is not None:
            raise _NotReplayable(self.problem)
        if not self.calls:
            raise _NotReplayable("it calls no C kernel")
        own = [_extent(t) for t in self.allocated]
        named = sorted((t.data_ptr(), _extent(t)[1], name) for name, t in bound.items() if t.numel())
        if any(a[1] > b[0] for a, b in zip(named, named[1:])):
            raise _NotReplayable("two of its inputs share memory")
        calls = []
        for fn, values, threads in self.calls:
            patches = [(threads, "threads", 0)] if threads is not None else []
            for i, (value, kind) in enumerate(zip(values, fn.argtypes)):
                if kind is not ctypes.c_void_p or value is None or value == 0:
                    continue
                if not isinstance(value, int):  # a packed weight's descriptor (cpu_quant.PackedWeight._struct)
                    if not isinstance(value, ctypes.c_void_p):
                        raise _NotReplayable(f"{fn.__name__}'s argument {i} is a {type(value).__name__}")
                    continue
                patches += _locate(value, own, named, persistent, fn.__name__, i)
            calls.append((fn.__name__, values, patches))
        used = {name for _, _, patches in calls for _, name, _ in patches}
        arg_slots = [(i, slot_of(f"arg{i}")) for i in range(len(args)) if f"arg{i}" in used]
        program = Program([(name, values, [(i, slot_of(bound_name), offset) for i, bound_name, offset in patches])
                           for name, values, patches in calls])
        outputs = []
        for t in outs:
            arg = next((i for i, a in enumerate(args) if a is t), None)
            if arg is not None:
                outputs.append(("arg", arg))
            elif isinstance(t, torch.Tensor) and any(_inside(t.data_ptr(), e) for e in own):
                outputs.append(("own", t))
            else:
                raise _NotReplayable("it returns a tensor it neither allocated nor was given")
        step_names = {name for name in used if name != "threads" and not name.startswith("arg")}
        return _Graph(program, arg_slots, step_names, outputs, single, self.allocated)


def _locate(pointer: int, own, named, persistent, fn: str, index: int) -> list[tuple[int, str, int]]:
    """The patch for a pointer argument: [] when it stays (own or persistent memory), else [(index, name, offset)]
    into a bound tensor."""
    if any(_inside(pointer, e) for e in own):
        return []
    for start, end, name in named:
        if start <= pointer < end:
            return [(index, name, pointer - start)]
    if any(_inside(pointer, e) for e in persistent):
        return []
    raise _NotReplayable(f"{fn}'s argument {index} points into memory allocated outside the layer")


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the bytes t's storage holds."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _inside(pointer: int, extent: tuple[int, int]) -> bool:
    return extent[0] <= pointer < extent[1]


def _aliases(out, args) -> bool:
    """Whether a view op's outputs share storage with one of its inputs (a view op may also return a new tensor,
    e.g. `to` when it converts, whose values the replay would not compute)."""
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return all(o.untyped_storage().data_ptr() in inputs for o in outs if isinstance(o, torch.Tensor))


def _spec(a) -> object:
    """What a layer argument contributes to the graph's key: a tensor's shape, strides and dtype; a scalar itself;
    else its type (None, the step's ForwardBatch)."""
    if isinstance(a, torch.Tensor):
        return a.shape, a.stride(), a.dtype
    return a if isinstance(a, (bool, int, float, str)) else type(a)
