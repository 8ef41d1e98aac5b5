"""The one-row integer-dot GEMV as persistent programs that stream weight rows: y = x @ W.T for one row of x (its
int8 runs, int8_rows.py) and Q4_K or Q6_K weights (a decode step of one sequence), the arithmetic of quant_dot.py.

Why another schedule: quant_dot.py's one-row launch gives each row of W its own one-warp program. A decode step's
smaller matrices (4096 x 4096, 6144 x 4096) then run as a single wave in which every warp first waits for its
row's bytes and only then computes, so the memory system idles while the SMs decode and the SMs idle while the
bytes arrive (on an H200, 4096 x 4096 Q4_K took 5.8 us, 1.6 TB/s). Here a fixed number of programs per SM each
walk rows pid, pid + P, pid + 2P, ... and load the next row's raw fields (quant words, packed scales, fp16 heads)
before decoding and multiplying the current one, so each warp keeps a row's loads in flight while it computes;
x's int8 runs, scales and sums, the same for every row, are loaded once per program.

The raw fields of a group (quant_decode.py's groups: 2 x 16-32 weights sharing their scales) are loaded by
`_raw_fields` and decoded by `_decode_raw`, kept apart so that decoding, which waits for the loads, comes after the
current row's products in program order. A whole row of K is one tile (BLOCK_G groups), spread over 1-4 warps
(stream_warps: 8 words of quants a thread at K = 4096, 16 at 14336); so streaming is taken only for the shapes it was
measured on (uses_stream: at least STREAM_MIN_ROWS rows, at most STREAM_MAX_K columns), where narrower matrices keep
quant_dot's launch, which splits K, and wider rows would not fit in registers.

`launch_stream_gemv_pair` streams two matrices of one x in one launch (a layer's Q4_K q/k rows beside its Q6_K v
rows, which would take two launches of their own, the second waiting for the first), its programs shared between them.

On an H200, against quant_dot's one-row launch (benchmarks/RESULTS.md): Q4_K 4096 x 4096 4.9 against 5.8 us,
28672 x 4096 19.9 against 24.6 us (3.3 TB/s), 4096 x 14336 12.4 against 15.9; Q6_K 4096 x 14336 15.5 against 17.3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_rows import Int8Rows
from .numerics import is_interpreted, pdl_options, round_to_dtype, wait_for_inputs
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, Q4_K, QTYPE_IDS, block_fields, fp16_bits, \
    k_unpack_scale_min, num_groups
from .quant_dot import _dp4a
from .quant_formats import BLOCK_SIZE, TYPE_SIZE

STREAM_TYPES = ("Q4_K", "Q6_K")
ROW_BYTES_IN_FLIGHT = 16 * 4096  # programs per SM x weights per row: 16 programs at K = 4096, 4 at K = 14336
WORDS_PER_THREAD = 8  # quant words of a row per thread: the number of warps follows from it
MAX_WARPS = 4
WIDE = 65536  # rows from which (lm_heads) programs take half the warps
STREAM_MIN_ROWS = 1024  # the narrowest matrix measured (a v projection); narrower ones keep quant_dot's split K
STREAM_MAX_K = 16384  # the widest rows measured were 14336 (a down projection); a row of K is held in registers


def stream_warps(qtype: str, n: int, k: int) -> int:
    """Warps per program for n rows of k weights of qtype: one per 256 words of quants a row (Q6_K: low quants),
    rounded up to a power of two, at most MAX_WARPS, halved for lm_head-sized matrices (n >= WIDE).

    Swept on an H200 (1-8 warps, 4-32 programs per SM; benchmarks/RESULTS.md): 2 warps best for Q4_K rows of 4096
    (4096-28672 rows: 4.9-19.9 us against 5.3-22.7 on one warp), 4 for rows of 14336 (Q4_K 12.4 us, Q6_K 15.5), one
    for Q6_K's 128256 x 4096 (104.5 against 107.8 us on two)."""
    words = num_groups(qtype, k) * GROUP_LANES[qtype] // 4
    warps = min(MAX_WARPS, triton.next_power_of_2(triton.cdiv(words, 32 * WORDS_PER_THREAD)))
    return max(1, warps // 2 if n >= WIDE else warps)


def uses_stream(num_rows: int, qtype: str, blocks: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether quant_linear's default "dot" path streams rows: one row of x, Q4_K or Q6_K blocks of whole 32-bit words
    a row, STREAM_MIN_ROWS rows or more of at most STREAM_MAX_K weights, no bias."""
    n, row_bytes = blocks.shape
    k = row_bytes // TYPE_SIZE[qtype] * BLOCK_SIZE[qtype] if qtype in STREAM_TYPES else 0
    return (num_rows == 1 and qtype in STREAM_TYPES and row_bytes % 4 == 0 and n >= STREAM_MIN_ROWS
            and 0 < k <= STREAM_MAX_K and bias is None)


def stream_programs(n: int, k: int, num_sms: int, resident: int | None = None) -> int:
    """Programs of a launch over n rows of k weights: per SM, 16 at K = 4096 down to 4 at K = 14336 (about the same
    bytes of rows in flight, rounded down to a power of two), no more than `resident` (the programs of the compiled
    kernel one SM holds at once, `resident_programs`; None: no bound), at most one per row.

    Every program walks its share of the rows, so one that does not fit beside the others starts only as a resident
    one ends and holds the launch up for its whole share: at K = 12288 (Qwen3-8B's down projection; H100,
    benchmarks/RESULTS.md) Q4_K 4096 x 12288 took 12.40 us on 4 programs per SM against 14.67 on the 5 that bytes
    alone give, of which 4 fit (107 registers a thread on its 4 warps, compiled for sm_90 by Triton 3.6). Rounded to a
    power of two, every streamed matrix of the two 8B shapes fits; Q6_K rows of 2048-6144 weights (65-72 registers)
    do not, hence the bound (benchmarks/stream_registers.py lists both)."""
    per_sm = max(4, min(32, ROW_BYTES_IN_FLIGHT // max(k, 1)))
    per_sm = 1 << (per_sm.bit_length() - 1)
    if resident is not None:
        per_sm = max(1, min(per_sm, resident))
    return max(1, min(n, num_sms * per_sm))


def programs_that_fit(registers: int, shared: int, warps: int, registers_per_sm: int = 65536,
                      shared_per_sm: int = 228 * 1024, warps_per_sm: int = 64, programs_per_sm: int = 32) -> int:
    """Programs of `warps` warps, `registers` registers a thread and `shared` bytes of shared memory that one SM
    holds at once (the defaults: sm_90's limits), as CUDA's occupancy calculator counts them (cuda_occupancy.h):
    registers are allocated to a warp in units of 256 from one of the SM's four register-file partitions, so a warp
    never straddles two; the driver reserves 1 KB of shared memory a program."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = registers_per_sm // 4 // per_warp * 4 // warps
    by_shared = shared_per_sm // (shared + 1024)
    return max(1, min(by_registers, by_shared, warps_per_sm // warps, programs_per_sm))


_RESIDENT: dict[tuple, int] = {}  # resident_programs' results
_PROGRAMS_PER_SM = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24}  # resident programs an SM allows where not 32


def resident_programs(kernel, args: tuple, consts: dict, num_warps: int, device: torch.device) -> int | None:
    """Programs of `kernel` compiled for these arguments that one SM of `device` holds at once, from the registers
    and shared memory of the compiled code (compiled here on the first call, found in Triton's cache by the launch
    after it); cached per kernel, sizes, constexprs, warps and device. None off CUDA and under the interpreter."""
    if device.type != "cuda" or is_interpreted(kernel):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    shape = tuple(a for a in args if isinstance(a, int))  # the launch's sizes: Triton specialises on them too
    key = (kernel, shape, tuple(sorted(consts.items())), num_warps, index)
    if key not in _RESIDENT:
        compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **consts)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        compiled._init_handles()  # loads the binary, which sets n_regs (as Triton's fused-softmax tutorial reads them)
        props = torch.cuda.get_device_properties(index)
        _RESIDENT[key] = programs_that_fit(compiled.n_regs, compiled.metadata.shared, num_warps,
                                           getattr(props, "regs_per_multiprocessor", 65536),
                                           props.shared_memory_per_multiprocessor,
                                           props.max_threads_per_multi_processor // 32,
                                           _PROGRAMS_PER_SM.get((props.major, props.minor), 32))
    return _RESIDENT[key]


def _stream_consts(qtype: str, k: int) -> dict:
    """The stream kernels' constexprs for rows of k weights of qtype (_stream_kernel's names; the pair kernel's with
    an A_ or B_ prefix)."""
    groups = num_groups(qtype, k)
    return dict(QTYPE=QTYPE_IDS[qtype], BLOCK_SIZE=BLOCK_SIZE[qtype], TYPE_SIZE=TYPE_SIZE[qtype],
                GROUPS=GROUPS_PER_BLOCK[qtype], WORDS=GROUP_LANES[qtype] // 4, NUM_GROUPS=groups,
                BLOCK_G=triton.next_power_of_2(groups))


def launch_stream_gemv(x: Int8Rows, blocks: torch.Tensor, qtype: str, out: torch.Tensor, num_sms: int,
                       num_programs: int | None = None, num_warps: int | None = None) -> None:
    """out [1, N] = x [1, K] @ W.T, W as qtype blocks [N, row_bytes] in the planes layout (row_bytes a multiple of
    4), x as its int8 runs; arguments checked by the caller. num_programs, num_warps: the launch (None: the
    defaults, stream_programs and stream_warps)."""
    (num_rows, k), n = x.q.shape, blocks.shape[0]
    assert num_rows == 1 and qtype in STREAM_TYPES and blocks.shape[1] % 4 == 0
    if n == 0:
        return
    args, consts = _stream_args(x, blocks, qtype, out)
    warps = num_warps or stream_warps(qtype, n, k)
    if num_programs is None:
        num_programs = _bounded_programs(_stream_kernel, args, consts, warps, n, k, num_sms, blocks.device)
    _stream_kernel[(num_programs,)](*args, num_warps=warps, **consts)


def default_stream_launch(x: Int8Rows, blocks: torch.Tensor, qtype: str, out: torch.Tensor,
                          num_sms: int) -> tuple[int, int]:
    """(programs, warps) of launch_stream_gemv's default launch with these arguments."""
    (_, k), n = x.q.shape, blocks.shape[0]
    warps = stream_warps(qtype, n, k)
    args, consts = _stream_args(x, blocks, qtype, out)
    return _bounded_programs(_stream_kernel, args, consts, warps, n, k, num_sms, blocks.device), warps


def _bounded_programs(kernel, args: tuple, consts: dict, num_warps: int, n: int, k: int, num_sms: int,
                      device: torch.device) -> int:
    """stream_programs of n rows of k weights, bounded by the programs of `kernel` (compiled for `args`,
    `consts`, `num_warps`) that one SM holds."""
    return stream_programs(n, k, num_sms, resident_programs(kernel, args, consts, num_warps, device))


def _stream_args(x: Int8Rows, blocks: torch.Tensor, qtype: str, out: torch.Tensor) -> tuple[tuple, dict]:
    """_stream_kernel's arguments and constexprs (launch options included) for out = x @ W.T."""
    (_, k), n = x.q.shape, blocks.shape[0]
    return (x.q, x.dx, x.sx, blocks, out, n, k, blocks.shape[1]), {**_stream_consts(qtype, k), **pdl_options(blocks)}


def launch_stream_gemv_pair(x: Int8Rows, a: torch.Tensor, a_qtype: str, b: torch.Tensor, b_qtype: str,
                            out: torch.Tensor, num_sms: int, num_programs: int | None = None) -> None:
    """out [1, Na + Nb] = x @ [A; B].T in one launch: launch_stream_gemv of A into out's first Na columns and of B
    into the rest (both matrices streamable: uses_stream), e.g. a layer's q/k rows in Q4_K beside its v rows in Q6_K.
    The programs (num_programs, None: stream_programs of all the rows; compiled offline for sm_90 as launched, the
    Q4_K + Q6_K kernel at K = 4096 takes 64 registers, as the one-matrix kernel) are shared in proportion to the
    matrices' bytes, each matrix at least one; warps: the larger of the two stream_warps (the same for both at every
    K of a projection's parts). Arguments checked by the caller."""
    (num_rows, k), na, nb = x.q.shape, a.shape[0], b.shape[0]
    assert num_rows == 1 and a_qtype in STREAM_TYPES and b_qtype in STREAM_TYPES and na > 0 and nb > 0
    consts = {prefix + name: value for prefix, qtype in (("A_", a_qtype), ("B_", b_qtype))
              for name, value in _stream_consts(qtype, k).items()}
    consts.update(pdl_options(a))
    warps = max(stream_warps(a_qtype, na, k), stream_warps(b_qtype, nb, k))
    out_row = out.view(-1)

    def launch_args(programs: int) -> tuple:
        a_programs = min(programs - 1, max(1, round(programs * a.numel() / (a.numel() + b.numel()))))
        return x.q, x.dx, x.sx, a, out_row[:na], na, a.shape[1], a_programs, b, out_row[na:], nb, b.shape[1]

    if num_programs is None:  # a_programs is not specialised on: the arguments of any split compile the same code
        num_programs = _bounded_programs(_stream_pair_kernel, launch_args(2), consts, warps, na + nb, k, num_sms,
                                         a.device)
    programs = max(2, num_programs)
    _stream_pair_kernel[(programs,)](*launch_args(programs), num_warps=warps, **consts)


@triton.jit
def _words(ptr, j, mask):
    """The int32 words j (a broadcastable index tensor) at 4-aligned byte pointer ptr."""
    return tl.load(ptr.to(tl.pointer_type(tl.int32)) + j, mask=mask, other=0)


@triton.jit
def _half(ptr, mask):
    """The uint16 at 2-aligned byte pointer ptr, as int32."""
    return tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.int32)


@triton.jit
def _raw_fields(row, nb, g, j, mask, QTYPE: tl.constexpr, GROUPS: tl.constexpr):
    """The undecoded fields of groups g (BG, 1) of the row at byte pointer row (planes layout, nb blocks), words j
    (1, WORDS): (words, high words, s0, s1, s2, head), int32. Q4_K: the group's 32 quant bytes as words, the same
    words again (unused), the packed scale bytes its two sub-blocks read as three 16-bit pairs (bytes 2c..2c+1,
    2c+4..2c+5, (2c % 4)..+1), and (d, dmin) as one word. Q6_K: ql words, qh words, the two int8 scales (low | high <<
    8), then d's bits three times (only s1 is read)."""
    blk = g // GROUPS
    c = g % GROUPS
    qs, qh, scales, head = block_fields(row, blk, nb, QTYPE)  # the fields' pointers in the row's planes
    if QTYPE == Q4_K:
        w = _words(qs + c * 32, j, mask)
        s0 = _half(scales + 2 * c, mask)
        s1 = _half(scales + 2 * c + 4, mask)
        s2 = _half(scales + (2 * c) % 4, mask)
        return w, w, s0, s1, s2, _words(head, 0, mask)
    else:  # Q6_K: group c = (half h, quarter t), as quant_decode.q6_group
        h = c // 4
        t = c % 4
        ql = _words(qs + h * 64 + t * 16, j, mask)
        qh_words = _words(qh + h * 32 + (t % 2) * 16, j, mask)
        sc_lo = tl.load(scales + h * 8 + t, mask=mask, other=0).to(tl.int32)
        sc_hi = tl.load(scales + h * 8 + t + 4, mask=mask, other=0).to(tl.int32)
        d = _half(head, mask)
        return ql, qh_words, sc_lo | (sc_hi << 8), d, d, d


@triton.jit
def _decode_raw(w, wh, s0, s1, s2, head, g, QTYPE: tl.constexpr, GROUPS: tl.constexpr):
    """_raw_fields' values -> (c_lo, c_hi, a_lo, b_lo, a_hi, b_hi): code words of the group's low and high runs
    and their affine maps weight = a * code + b (float32, gguf's arithmetic)."""
    c = g % GROUPS
    if QTYPE == Q4_K:
        d = fp16_bits(head)
        dmin = fp16_bits(head >> 16)
        sc_lo, mn_lo = k_unpack_scale_min(s0 & 0xFF, s1 & 0xFF, s2 & 0xFF, 2 * c)
        sc_hi, mn_hi = k_unpack_scale_min(s0 >> 8, s1 >> 8, s2 >> 8, 2 * c + 1)
        return (w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F, d * sc_lo.to(tl.float32), -(dmin * mn_lo.to(tl.float32)),
                d * sc_hi.to(tl.float32), -(dmin * mn_hi.to(tl.float32)))
    else:
        t = c % 4
        d = fp16_bits(s1)
        a_lo = d * ((s0 << 24) >> 24).to(tl.float32)  # the signed bytes
        a_hi = d * ((s0 << 16) >> 24).to(tl.float32)
        qh = wh >> (2 * (t // 2))
        c_lo = (w & 0x0F0F0F0F) | ((qh & 0x03030303) << 4)
        c_hi = ((w >> 4) & 0x0F0F0F0F) | (((qh >> 4) & 0x03030303) << 4)
        return c_lo, c_hi, a_lo, -32.0 * a_lo, a_hi, -32.0 * a_hi


@triton.jit
def _group_columns(g, QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUPS: tl.constexpr):
    """Columns of the first weight of group g's low and high runs."""
    blk = g // GROUPS
    c = g % GROUPS
    if QTYPE == Q4_K:
        col_lo = blk * BLOCK_SIZE + c * 64
        return col_lo, col_lo + 32
    else:
        col_lo = blk * BLOCK_SIZE + (c // 4) * 128 + (c % 4) * 16
        return col_lo, col_lo + 64


@triton.jit
def _first_row(blocks_ptr, row, N, row_bytes, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
               WORDS: tl.constexpr, NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    """_raw_fields of row `row` of an [N, row_bytes] matrix (nothing loaded where row is not in [0, N))."""
    g = tl.arange(0, BLOCK_G)[:, None]  # (BG, 1)
    j = tl.arange(0, WORDS)[None, :]  # (1, W)
    ok = (g < NUM_GROUPS) & (g * 0 + row < N) & (g * 0 + row >= 0)
    return _raw_fields(blocks_ptr + row.to(tl.int64) * row_bytes, row_bytes // TYPE_SIZE, g, j, ok, QTYPE, GROUPS)


@triton.jit
def _stream_rows(q_ptr, dx_ptr, sx_ptr, blocks_ptr, out_ptr, N, row_bytes, first, step, w, wh, s0, s1, s2, head,
                 QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
                 WORDS: tl.constexpr, NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[0, r] for rows r = first, first + step, ... of an [N, row_bytes] matrix, the first row's raw fields given
    (w ... head): x's int8 runs loaded once, then each row's next row loaded before the row is decoded."""
    g = tl.arange(0, BLOCK_G)[:, None]  # (BG, 1)
    j = tl.arange(0, WORDS)[None, :]  # (1, W)
    g_ok = g < NUM_GROUPS
    nb = row_bytes // TYPE_SIZE
    col_lo, col_hi = _group_columns(g, QTYPE, BLOCK_SIZE, GROUPS)
    q_words = q_ptr.to(tl.pointer_type(tl.int32))
    x_lo = tl.load(q_words + col_lo // 4 + j, mask=g_ok, other=0)  # (BG, W): x's int8 codes, four a word
    x_hi = tl.load(q_words + col_hi // 4 + j, mask=g_ok, other=0)
    dx_lo = tl.load(dx_ptr + col_lo // 32, mask=g_ok, other=0.0)
    dx_hi = tl.load(dx_ptr + col_hi // 32, mask=g_ok, other=0.0)
    sx_lo = tl.load(sx_ptr + col_lo // 16, mask=g_ok, other=0.0)
    sx_hi = tl.load(sx_ptr + col_hi // 16, mask=g_ok, other=0.0)
    if WORDS == 8:  # runs of 32 columns: both halves
        sx_lo += tl.load(sx_ptr + col_lo // 16 + 1, mask=g_ok, other=0.0)
        sx_hi += tl.load(sx_ptr + col_hi // 16 + 1, mask=g_ok, other=0.0)

    dtype: tl.constexpr = out_ptr.dtype.element_ty
    for row in range(first, N, step):
        nxt = row + step
        nw, nwh, ns0, ns1, ns2, nhead = _raw_fields(blocks_ptr + nxt.to(tl.int64) * row_bytes, nb, g, j,
                                                    g_ok & (g * 0 + nxt < N), QTYPE, GROUPS)
        c_lo, c_hi, a_lo, b_lo, a_hi, b_hi = _decode_raw(w, wh, s0, s1, s2, head, g, QTYPE, GROUPS)
        dot_lo = tl.sum(_dp4a(c_lo, x_lo), axis=1, keep_dims=True).to(tl.float32)
        dot_hi = tl.sum(_dp4a(c_hi, x_hi), axis=1, keep_dims=True).to(tl.float32)
        acc = a_lo * (dx_lo * dot_lo) + b_lo * sx_lo + a_hi * (dx_hi * dot_hi) + b_hi * sx_hi  # (BG, 1)
        y = tl.sum(tl.sum(acc, axis=1), axis=0)
        tl.store(out_ptr + row, round_to_dtype(y, dtype).to(dtype))
        w, wh, s0, s1, s2, head = nw, nwh, ns0, ns1, ns2, nhead


@triton.jit
def _stream_kernel(
    q_ptr, dx_ptr, sx_ptr, blocks_ptr, out_ptr, N, K, row_bytes,
    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
    WORDS: tl.constexpr, NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, PDL: tl.constexpr,
):
    """Program p: out[0, r] for rows r = p, p + P, ... (P programs), each over all NUM_GROUPS groups of K at once;
    the next row's raw fields are loaded before the current row is decoded. The first row's are loaded before
    waiting for the kernel ahead (programmatic dependent launch): weights are written by no kernel, and the norm,
    SiLU-and-mul and rounding kernels that compute x release this one early (numerics.release_dependents), so its
    first loads overlap them (the decode attention before o_proj releases it too)."""
    w, wh, s0, s1, s2, head = _first_row(blocks_ptr, tl.program_id(0), N, row_bytes, QTYPE, TYPE_SIZE, GROUPS, WORDS,
                                         NUM_GROUPS, BLOCK_G)
    wait_for_inputs(PDL)
    _stream_rows(q_ptr, dx_ptr, sx_ptr, blocks_ptr, out_ptr, N, row_bytes, tl.program_id(0), tl.num_programs(0),
                 w, wh, s0, s1, s2, head, QTYPE, BLOCK_SIZE, TYPE_SIZE, GROUPS, WORDS, NUM_GROUPS, BLOCK_G)


@triton.jit(do_not_specialize=["a_programs"])  # one compiled variant for every split of the programs
def _stream_pair_kernel(
    q_ptr, dx_ptr, sx_ptr, a_blocks_ptr, a_out_ptr, a_rows, a_row_bytes, a_programs,
    b_blocks_ptr, b_out_ptr, b_rows, b_row_bytes,
    A_QTYPE: tl.constexpr, A_BLOCK_SIZE: tl.constexpr, A_TYPE_SIZE: tl.constexpr, A_GROUPS: tl.constexpr,
    A_WORDS: tl.constexpr, A_NUM_GROUPS: tl.constexpr, A_BLOCK_G: tl.constexpr,
    B_QTYPE: tl.constexpr, B_BLOCK_SIZE: tl.constexpr, B_TYPE_SIZE: tl.constexpr, B_GROUPS: tl.constexpr,
    B_WORDS: tl.constexpr, B_NUM_GROUPS: tl.constexpr, B_BLOCK_G: tl.constexpr, PDL: tl.constexpr,
):
    """_stream_kernel over two matrices of one x in one launch (e.g. a layer's Q4_K q/k rows and Q6_K v rows):
    programs [0, a_programs) stream matrix a's rows, the others matrix b's. Each loads its first row before the
    wait (only the matrix it serves: the other's rows are out of range for it)."""
    pid = tl.program_id(0)
    b_pid = pid - a_programs
    aw, awh, as0, as1, as2, ahead = _first_row(a_blocks_ptr, pid, tl.where(b_pid < 0, a_rows, 0), a_row_bytes,
                                               A_QTYPE, A_TYPE_SIZE, A_GROUPS, A_WORDS, A_NUM_GROUPS, A_BLOCK_G)
    bw, bwh, bs0, bs1, bs2, bhead = _first_row(b_blocks_ptr, b_pid, b_rows, b_row_bytes, B_QTYPE, B_TYPE_SIZE,
                                               B_GROUPS, B_WORDS, B_NUM_GROUPS, B_BLOCK_G)
    wait_for_inputs(PDL)
    if b_pid < 0:
        _stream_rows(q_ptr, dx_ptr, sx_ptr, a_blocks_ptr, a_out_ptr, a_rows, a_row_bytes, pid, a_programs,
                     aw, awh, as0, as1, as2, ahead, A_QTYPE, A_BLOCK_SIZE, A_TYPE_SIZE, A_GROUPS, A_WORDS,
                     A_NUM_GROUPS, A_BLOCK_G)
    else:
        _stream_rows(q_ptr, dx_ptr, sx_ptr, b_blocks_ptr, b_out_ptr, b_rows, b_row_bytes, b_pid,
                     tl.num_programs(0) - a_programs, bw, bwh, bs0, bs1, bs2, bhead, B_QTYPE, B_BLOCK_SIZE,
                     B_TYPE_SIZE, B_GROUPS, B_WORDS, B_NUM_GROUPS, B_BLOCK_G)
