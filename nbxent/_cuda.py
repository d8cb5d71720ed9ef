"""CUDA kernels: fused softmax cross-entropy and its gradient, and row normalizations.

Imported only when a GPU array reaches ``nbxent`` (``api._backend`` imports
``_backend_cuda``, which imports this module), so ``import nbxent`` never loads
``numba.cuda``. The launch logic lives in ``_backend_cuda``; this module holds arithmetic.

Memory model
------------
Every kernel sees a logits buffer as 64-bit words: ``E`` elements per word (4 for float16
and bfloat16, 2 for float32, 1 for float64). Row ``i`` of the flattened ``(N, V)`` logits is
the elements ``[a_i, a_i + V)`` of the buffer, with

    a_i = x0 + (i // n1) * xs0 + (i % n1) * xs1

(and likewise for the gradient or output buffer ``g``, with its own ``g0, gn1, gs0, gs1``),

which covers contiguous arrays, row-strided views (the ``logits[:, :-1]`` next-token
shift of a ``(B, T, V)`` array) and in-place output alike. A row need not start on a word
boundary: words are loaded whole (one 8-byte load per ``E`` elements, coalesced across the
threads of a warp) and lanes outside the row are masked, never summed. Gradient words that
lie wholly inside the row are stored whole; the at most two partial words at the row's
ends are stored element by element, so neighbouring rows (other blocks) never race.

16-bit data is ``uint16`` bits, converted with integer operations and bit casts (one code
path for float16 and bfloat16, which the simulator also runs). Arithmetic is float32
(float64 for float64 logits); ``exp`` is ``exp2`` of a scaled difference, one MUFU op.

Kernels take raw device addresses as int64 arguments (``as_pointer`` turns them into
typed pointers), so a launch marshals a few integers, not array structs. Under the
simulator (``NUMBA_ENABLE_CUDASIM=1``) the same kernels receive arrays instead and
``as_pointer`` is a NumPy view.

Kernels are built per storage format, job and target dtype by ``kernel_sources``: the
format and the job are compile-time constants, so a variant pays only for what it does.
Launch geometry is set by the tunables below and by ``_backend_cuda``.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

try:  # numba-cuda >= 0.14 has its own config; older releases share numba's
    from numba.cuda.core.config import ENABLE_CUDASIM as SIMULATOR
except ImportError:  # pragma: no cover
    from numba.core.config import ENABLE_CUDASIM as SIMULATOR

# ----------------------------------------------------------------------------------------
# Tunables: the one place launch geometry is set. Tests patch them small so that several
# blocks, several row groups per block and the split-row path all run in the simulator.
# ----------------------------------------------------------------------------------------
# Defaults: the best of a sweep on an H200 (docs/gpu.md, "Measured"): 4 blocks of 256 threads
# per SM (64 registers; ptxas spills 8-72 bytes, cheaper than the lost occupancy of 1 x 512).
THREADS = 256  # threads per block (a power of two)
UNROLL = 4  # 64-bit words a thread loads before it uses any (loads in flight per thread)
MIN_GROUP = 32  # fewest threads that share one row (small V: several rows per block)
BLOCKS_PER_SM = 4  # blocks per SM of the persistent grid; ptxas fits registers to it (4 x 256: <= 64)
SPLIT_CHUNK = 8192  # smallest row chunk (elements) when one row is split over blocks
PREFETCH = False  # ask for the next step's words before using this step's (+20% at 1 x 512; nothing at 4 x 256)
SIM_SM_COUNT = 2  # the simulator's stand-in for the SM count

# Storage formats; elements per 64-bit word.
FMT_F16, FMT_BF16, FMT_F32, FMT_F64 = 0, 1, 2, 3
FMT_NAMES = {"float16": FMT_F16, "bfloat16": FMT_BF16, "float32": FMT_F32, "float64": FMT_F64}
ELEMS_PER_WORD = {FMT_F16: 4, FMT_BF16: 4, FMT_F32: 2, FMT_F64: 1}

# Jobs: the loss alone, the loss and its gradient, or a row normalization.
JOB_LOSS, JOB_GRAD, JOB_NORM = 0, 1, 2

# Reductions (runtime argument of the loss kernels), as in ``_checks.REDUCTIONS``.
RED_MEAN, RED_SUM, RED_NONE = 0, 1, 2

# Normalization modes: the same values as ``_cpu.MODE_*``.
MODE_LSE, MODE_SOFTMAX, MODE_LOG_SOFTMAX = 0, 1, 2

# Flags of ``reduce_rows``, the single-block kernel that runs before and after the main one.
F_DIVISOR = 1  # stats[0] = the 'mean' divisor: count or weight sum of non-ignored rows
F_CHECK = 2  # stats[1] = the first row whose target is out of range, or -1
F_SCALE = 4  # stats[2] = grad_output / stats[0], the gradient factor of 'mean'
F_SUM = 8  # out[0] = sum of the per-row losses
F_MEAN = 16  # out[0] = sum of the per-row losses / stats[0]
F_WSUM = 32  # stats[3] = sum of the class weights (label smoothing with weights needs it)

# Values per (row, chunk) in the split path: max, sum of exp, smoothing sum, weight sum,
# and the target's (capped) logit, stored by the chunk holding it.
PART = 5


def jit_options(threads: int, blocks_per_sm: int) -> dict:
    """Options for ``cuda.jit`` / ``cuda.compile_ptx`` of a kernel run with ``threads`` per
    block and meant to keep ``blocks_per_sm`` blocks resident per SM.

    No fast-math: no flush-to-zero (the float16 conversion needs float32 subnormals) and
    IEEE division; the fast exp is chosen explicitly below. The launch bounds make ptxas
    fit the registers to the occupancy the launch geometry assumes (at most 128 per thread
    for one block of 512; 64 for four blocks of 256): a kernel that used more would silently
    run fewer blocks per SM, and a block size it was not built for would fail to launch.
    With one block of 512 the kernels need 64-128 registers and spill nothing; at 64 the
    fused kernels spill 8-72 bytes per thread, and still run faster on an H200
    (``tests/test_cuda_ptx.py`` checks the defaults with ptxas, spills bounded).
    """
    if SIMULATOR:
        return {"fastmath": False}
    return {"fastmath": False, "launch_bounds": (threads, blocks_per_sm)}


_LOG2E = 1.4426950408889634
_HAS_EXP2 = hasattr(math, "exp2")  # Python >= 3.11; numba-cuda lowers it to ex2.approx.f32


# ----------------------------------------------------------------------------------------
# Memory primitives: the only code that differs between a GPU and the simulator.
# ----------------------------------------------------------------------------------------
if SIMULATOR:

    def device_function(func):
        """Under the simulator a device function is the plain Python function: the same
        code, simulated many times faster than through the simulator's device-function
        wrapper. (A running simulated kernel has already swapped this module's ``cuda``.)"""
        return func

    # NumPy's exp gives inf where math.exp raises, as a GPU does (lanes of other rows may
    # hold anything: they are computed and never stored).
    exp, exp2 = np.exp, np.exp2

    def as_pointer(buf, dtype):
        """The simulator passes arrays: a NumPy view of the same memory."""
        ary = getattr(buf, "_item", buf)
        return getattr(ary, "_ary", ary).view(dtype)

    @device_function
    def load_last(p, k):
        return p[k]

    @device_function
    def store_streaming(p, k, value):
        p[k] = value

else:
    device_function = cuda.jit(device=True)
    exp, exp2 = math.exp, getattr(math, "exp2", None)

    from llvmlite import ir
    from numba.cuda import types as _types

    try:
        from numba.cuda.extending import intrinsic
    except ImportError:  # pragma: no cover - older numba-cuda
        from numba.core.extending import intrinsic

    @intrinsic
    def as_pointer(typingctx, address, dtype):
        """A typed pointer to global memory from an int64 device address.

        The pointer is made in the global address space and cast to a generic one, so
        NVVM emits ``ld.global``/``st.global`` instead of generic loads.
        """
        elem = dtype.instance_type
        sig = _types.CPointer(elem)(address, dtype)

        def codegen(context, builder, signature, args):
            ltype = context.get_value_type(elem)
            global_ptr = builder.inttoptr(args[0], ir.PointerType(ltype, addrspace=1))
            return builder.addrspacecast(global_ptr, ir.PointerType(ltype))

        return sig, codegen

    @device_function
    def load_last(p, k):
        """A load marked last-use (``ld.global.cs``): the line may leave L2 first."""
        return cuda.ldcs(p, k)

    @device_function
    def store_streaming(p, k, value):
        """A streaming store (``st.global.cs``): the gradient does not evict logits from L2."""
        cuda.stcs(p, k, value)


# ----------------------------------------------------------------------------------------
# Bit-level conversions, shared by all variants. Numba widens 32-bit integer arithmetic to
# 64 bits, so every step that must stay 32-bit is cast back before a bit cast.
# ----------------------------------------------------------------------------------------
_U16_MASK = np.uint64(0xFFFF)
_U32_MASK = np.uint64(0xFFFFFFFF)
_F16_EXP_INF = np.uint32(0x7C00 << 13)
_F32_EXP_ALL = np.uint32(0x7F800000)
_HALF_TO_F32_SCALE = np.uint32(0x77800000).view(np.float32)  # 2**112


@device_function
def bf16_to_f32(h):
    """bfloat16 bits (low 16 bits of a uint64) -> float32: bfloat16 is a float32's top half."""
    return np.uint32((h & _U16_MASK) << np.uint64(16)).view(np.float32)


@device_function
def f16_to_f32(h):
    """IEEE half bits (low 16 bits of a uint64) -> float32, exact for every half value.

    Exponent and mantissa are shifted into float32 position and multiplied by 2**112 to
    rebias the exponent (this also normalizes half subnormals); inf and NaN get an
    all-ones exponent instead. Needs float32 subnormals, hence no flush-to-zero.
    """
    hb = np.uint32(h & _U16_MASK)
    em = np.uint32((hb & np.uint32(0x7FFF)) << np.uint32(13))
    sign = np.uint32((hb & np.uint32(0x8000)) << np.uint32(16))
    finite = np.float32(em.view(np.float32) * _HALF_TO_F32_SCALE).view(np.uint32)
    bits = np.uint32(em | _F32_EXP_ALL) if em >= _F16_EXP_INF else finite
    return np.uint32(bits | sign).view(np.float32)


@device_function
def f32_to_bf16(x):
    """float32 -> bfloat16 bits, rounding to nearest even; NaN stays a quiet NaN."""
    u = np.uint32(np.float32(x).view(np.uint32))
    rounded = np.uint32((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    quiet_nan = np.uint32((u >> np.uint32(16)) | np.uint32(0x40))
    return np.uint64(quiet_nan if x != x else rounded) & _U16_MASK


@device_function
def f32_to_f16(x):
    """float32 -> IEEE half bits, rounding to nearest even (one ``cvt.rn.f16.f32``)."""
    return np.uint64(np.float16(np.float32(x)).view(np.uint16))


@device_function
def row_start(row, n1, off0, s0, s1):
    """Buffer position of the first element of flattened row ``row``."""
    return off0 + (row // n1) * s0 + (row % n1) * s1


@device_function
def target_fill(t, ignore_index, n_cols):
    """-1 for a row to compute; 0 for an ignored row; 1 for a target outside [0, V)
    (reachable only with validate=False: the row becomes NaN and nothing is read)."""
    if t == ignore_index:
        return 0
    if t < 0 or t >= n_cols:
        return 1
    return -1


def _check_threads(threads: int) -> None:
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"THREADS must be a power of two, got {threads}")


# ----------------------------------------------------------------------------------------
# Device functions, in three cached layers so that kernel variants share compiled code:
# arithmetic per accumulation type, storage access per format, the writer per job.
# ----------------------------------------------------------------------------------------
@functools.cache
def _arithmetic(f64: bool) -> SimpleNamespace:
    """Helpers that depend only on the accumulation type (float64 or float32)."""
    ACC = np.float64 if f64 else np.float32
    ZERO, ONE, TWO = ACC(0.0), ACC(1.0), ACC(2.0)
    NEG_INF, NAN = ACC(-np.inf), ACC(np.nan)
    LOWEST = ACC(np.finfo(ACC).min)  # where running maxima start (see _storage.thread_stats)
    LOG2E = ACC(_LOG2E)
    USE_EXP2 = _HAS_EXP2 and not f64

    @device_function
    def exp_acc(d):
        """exp(d): ``ex2.approx`` of d * log2(e) for float32 (one MUFU op), libdevice for
        float64. Callers pass differences (x - max), which are <= 0 and exact."""
        if USE_EXP2:
            return ACC(exp2(d * LOG2E))
        return ACC(exp(d))

    @device_function
    def log_acc(s):
        """log(s), with log(0) = -inf (the simulator's math.log would raise)."""
        return ACC(math.log(s)) if s > ZERO else (NEG_INF if s == ZERO else NAN)

    @device_function
    def rebase(m_part, s_part, sm_part, ws_part, m):
        """A partial ``(s, sm)`` taken relative to ``m_part``, re-expressed relative to
        ``m >= m_part``. A part without weight skips the shift of ``sm``: its ``m_part`` may
        still be -FLT_MAX, and (m - m_part) * 0 must not become inf * 0 = NaN."""
        shift = (m - m_part) * ws_part if ws_part != ZERO else ZERO
        return s_part * exp_acc(m_part - m), sm_part + shift

    @device_function
    def group_stats(red, tid, lane, group, m, s, sm, ws):
        """Combine the threads' ``(m, s, sm, ws)`` over each group of ``group`` threads.

        Two fixed-order tree reductions through shared memory ``red`` (no warp shuffles, so
        the simulator runs them): the max first, then each thread rebases its sums to it
        and the sums are added. They run once per row: a few hundred cycles against the
        thousands the row's loads take. Every thread of the block must call this.
        """
        cuda.syncthreads()  # the previous row group's results have been read
        red[0, tid] = m
        cuda.syncthreads()
        off = group // 2
        while off > 0:
            if lane < off and red[0, tid + off] > red[0, tid]:
                red[0, tid] = red[0, tid + off]
            cuda.syncthreads()
            off //= 2
        m_row = red[0, tid - lane]
        s, sm = rebase(m, s, sm, ws, m_row)
        red[1, tid] = s
        red[2, tid] = sm
        red[3, tid] = ws
        cuda.syncthreads()
        off = group // 2
        while off > 0:
            if lane < off:
                red[1, tid] += red[1, tid + off]
                red[2, tid] += red[2, tid + off]
                red[3, tid] += red[3, tid + off]
            cuda.syncthreads()
            off //= 2
        return m_row, red[1, tid - lane], red[2, tid - lane], red[3, tid - lane]

    @device_function
    def row_loss(m, log_s, sm, xt, wt, w_sum, n_cols, eps, z):
        """The loss of one row from its statistics.

        With ``xc`` the (capped) logits, ``lse = m + log s``, weights ``w`` (all 1 without
        weights, ``W = sum_j w_j``) and V classes, PyTorch's label-smoothed loss plus PaLM's
        z-loss is

            loss = (1 - eps) w_t (lse - xc_t) + eps / V * sum_j w_j (lse - xc_j) + z w_t lse^2

        with lse - xc_t = log s + (m - xc_t) and sum_j w_j (lse - xc_j) = W log s + sm, so that
        no large offset cancels.
        """
        lse = m + log_s
        loss = (ONE - eps) * wt * (log_s + (m - xt))
        if eps > ZERO:
            loss += eps / ACC(n_cols) * (w_sum * log_s + sm)
        if z > ZERO:
            loss += z * wt * lse * lse
        return loss

    @device_function
    def row_scale(row, reduction, stats, go, n_go, go_scalar):
        """grad_output for this row: 'mean' reads grad_output / divisor from ``stats[2]``
        (computed on the device by ``reduce_rows``); otherwise a per-row array, a 1-element
        device array, or a host scalar."""
        if reduction == RED_MEAN:
            return ACC(stats[2])
        if n_go > 1:
            return go[row]
        if n_go == 1:
            return go[0]
        return go_scalar

    @device_function
    def grad_coefficients(sc, wt, w_sum, n_cols, eps, z, lse):
        """Since d lse / d xc_j = p_j, the gradient of ``row_loss`` is

            dloss/dxc_j = p_j [(1 - eps) w_t + eps W / V + 2 z w_t lse] - eps w_j / V
                          - (1 - eps) w_t [j == t]

        returned as the three coefficients (of p_j, of w_j, of [j == t]) times ``sc``.
        """
        n = ACC(n_cols)
        coef_p = sc * ((ONE - eps) * wt + eps * w_sum / n + TWO * z * wt * lse)
        return coef_p, sc * eps / n, sc * (ONE - eps) * wt

    functions = {k: v for k, v in locals().items() if callable(v) and not isinstance(v, type)}
    return SimpleNamespace(LOWEST=LOWEST, **functions)


@functools.cache
def _storage(fmt: int, unroll: int, prefetch: bool) -> SimpleNamespace:
    """Helpers that read and write one storage format: element access, the statistics pass
    (``prefetch``: each step's loads are issued during the step before, see PREFETCH)."""
    PREFETCH = prefetch
    E = ELEMS_PER_WORD[fmt]
    ACC = np.float64 if fmt == FMT_F64 else np.float32
    ELEM = {4: np.uint16, 2: np.uint32, 1: np.uint64}[E]
    LANE_BITS = 64 // E
    U = unroll
    UE = unroll * E  # values a thread holds per step (soft-capped variants)
    ZERO, ONE = ACC(0.0), ACC(1.0)
    LOWEST = _arithmetic(fmt == FMT_F64).LOWEST
    exp_acc = _arithmetic(fmt == FMT_F64).exp_acc

    @device_function
    def unpack(word, e):
        """Element ``e`` of a 64-bit word, widened to the accumulation type."""
        if fmt == FMT_F64:
            return word.view(np.float64)
        lane = word >> np.uint64(e * LANE_BITS)
        if fmt == FMT_F32:
            return np.uint32(lane & _U32_MASK).view(np.float32)
        if fmt == FMT_BF16:
            return bf16_to_f32(lane)
        return f16_to_f32(lane)

    @device_function
    def pack(value):
        """The storage bits of one element (in the low bits of a uint64)."""
        if fmt == FMT_F64:
            return np.float64(value).view(np.uint64)
        if fmt == FMT_F32:
            return np.uint64(np.float32(value).view(np.uint32))
        if fmt == FMT_BF16:
            return f32_to_bf16(value)
        return f32_to_f16(value)

    @device_function
    def capped(v, cap, inv_cap):
        """Gemma 2's soft-cap ``cap * tanh(v / cap)``; ``cap == 0`` means off."""
        if cap > ZERO:
            return ACC(cap * ACC(math.tanh(v * inv_cap)))
        return v

    @device_function
    def element(xw, j, cap, inv_cap):
        """The (capped) value of buffer element ``j``, read on its own (the target logit)."""
        return capped(unpack(xw[j // E], j % E), cap, inv_cap)

    def make_stats(CAPPED):
        @device_function
        def stats_steps(xw, lo, hi, a, lane, group, cap, inv_cap, w, has_w, smooth):
            """``thread_stats``'s loop, with the soft-cap compiled in or out (``CAPPED``).

            Capped values are computed in a loop of their own into ``vals``, so that each
            loop body stays small enough to be unrolled (and the arrays kept in registers).
            """
            m = LOWEST
            s = ZERO
            sm = ZERO
            ws = ZERO
            k0 = lo // E
            k1 = (hi - 1) // E + 1
            step = group * U
            n_steps = (k1 - k0 - lane + step - 1) // step if k1 - k0 > lane else 0
            words = cuda.local.array(U, np.uint64)
            ahead = cuda.local.array(U, np.uint64)  # the next step's words (PREFETCH)
            vals = cuda.local.array(UE, ACC)
            if PREFETCH and n_steps > 0:
                for u in range(U):
                    k = k0 + lane + u * group
                    ahead[u] = xw[k] if k < k1 else np.uint64(0)
            for it in range(n_steps):
                kb = k0 + lane + it * step
                if PREFETCH:  # this step's words arrived during the last one; ask for the next
                    for u in range(U):
                        words[u] = ahead[u]
                    if it + 1 < n_steps:
                        for u in range(U):
                            k = kb + step + u * group
                            ahead[u] = xw[k] if k < k1 else np.uint64(0)
                else:
                    for u in range(U):
                        k = kb + u * group
                        words[u] = xw[k] if k < k1 else np.uint64(0)
                if not CAPPED and not smooth and kb * E >= lo and (kb + (U - 1) * group + 1) * E <= hi:
                    # Interior step (all but a row's first and last steps): every lane is in
                    # the row, so no index per element; the step's max first (branch-free),
                    # one rescale per step, then one exp per element.
                    mx = m
                    for u in range(U):
                        for e in range(E):
                            v = unpack(words[u], e)
                            mx = v if v > mx else mx
                    if mx > m:
                        s *= exp_acc(m - mx)
                        m = mx
                    for u in range(U):
                        for e in range(E):
                            s += exp_acc(unpack(words[u], e) - m)
                    continue
                if CAPPED:
                    for u in range(U):
                        for e in range(E):
                            v = unpack(words[u], e)
                            vals[u * E + e] = ACC(cap * ACC(math.tanh(v * inv_cap)))
                for u in range(U):
                    for e in range(E):
                        j = (kb + u * group) * E + e
                        if j >= lo and j < hi:
                            v = vals[u * E + e] if CAPPED else unpack(words[u], e)
                            if v > m:
                                s *= exp_acc(m - v)
                                if smooth and ws != ZERO:
                                    sm += (v - m) * ws
                                m = v
                            s += exp_acc(v - m)
                            if smooth:
                                wc = w[j - a] if has_w else ONE
                                sm += wc * (m - v)
                                ws += wc
            return m, s, sm, ws

        return stats_steps

    stats_plain, stats_capped = make_stats(False), make_stats(True)

    @device_function
    def thread_stats(xw, lo, hi, a, lane, group, cap, inv_cap, w, has_w, smooth):
        """One thread's share of the row statistics over buffer elements ``[lo, hi)``.

        Returns ``(m, s, sm, ws)``: the largest (capped) value ``m``, ``s = sum exp(v - m)``,
        ``sm = sum w_c (m - v)`` (label smoothing; relative to ``m`` so that a large common
        offset does not cancel) and ``ws = sum w_c`` over this thread's elements
        (``w_c = 1`` unweighted; ``c = j - a`` is the class of element ``j``).

        1. Each step loads UNROLL words, ``group`` words apart (coalesced across the group),
           before using any, so UNROLL loads per thread are in flight.
        2. Online softmax, one element at a time: when an element raises the running max,
           ``s`` is rescaled by exp(m - v) and ``sm`` shifted by (v - m) * ws; that branch is
           rare after the first few elements, so it costs one exp per element.
        3. The running max starts at -FLT_MAX, not -inf: a -inf element (masked vocabulary)
           then adds exp(-inf) = 0 and never makes exp(-inf - -inf) = NaN, and a thread that
           sees only -inf contributes s = 0. No per-element guard is needed.
        4. Lanes outside ``[lo, hi)`` (the neighbouring rows' halves of the end words) are
           skipped: they never enter the max or a sum.
        """
        if cap > ZERO:
            return stats_capped(xw, lo, hi, a, lane, group, cap, inv_cap, w, has_w, smooth)
        return stats_plain(xw, lo, hi, a, lane, group, cap, inv_cap, w, has_w, smooth)

    @device_function
    def fill_span(gw, ge, lo, hi, lane, group, value):
        """Set ``g``'s buffer elements ``[lo, hi)`` to ``value`` (ignored rows: 0; rows with a
        bad target under validate=False: NaN)."""
        bits = pack(ACC(value))
        word = np.uint64(0)
        for e in range(E):
            word |= bits << np.uint64(e * LANE_BITS)
        k0 = lo // E
        k1 = (hi - 1) // E + 1
        for k in range(k0 + lane, k1, group):
            if k * E >= lo and k * E + E <= hi:
                store_streaming(gw, k, word)
            else:
                for e in range(E):
                    j = k * E + e
                    if j >= lo and j < hi:
                        ge[j] = ELEM(bits)

    return SimpleNamespace(**{k: v for k, v in locals().items() if callable(v) and not isinstance(v, type)})


@functools.cache
def _writer(fmt: int, job: int, unroll: int, prefetch: bool):
    """``write_span`` for one format and job (JOB_GRAD: the gradient; JOB_NORM: softmax or
    log-softmax)."""
    PREFETCH = prefetch
    E = ELEMS_PER_WORD[fmt]
    ACC = np.float64 if fmt == FMT_F64 else np.float32
    ELEM = {4: np.uint16, 2: np.uint32, 1: np.uint64}[E]
    LANE_BITS = 64 // E
    GRAD = job == JOB_GRAD
    NORM = job == JOB_NORM
    U = unroll
    UE = unroll * E
    ZERO, ONE = ACC(0.0), ACC(1.0)
    exp_acc = _arithmetic(fmt == FMT_F64).exp_acc
    storage = _storage(fmt, unroll, prefetch)
    unpack, pack = storage.unpack, storage.pack

    def make_steps(CAPPED):
        @device_function
        def write_steps(xw, gw, ge, span, lane, group, cap, inv_cap, coefs, w, has_w):
            """``write_span``'s loop, with the soft-cap compiled in or out (``CAPPED``), so
            that the plain loop's body is small enough to be unrolled."""
            lo, hi, a, g_lo = span
            m, log_s, coef_p, coef_w, coef_t, t_j = coefs
            k0 = lo // E
            k1 = (hi - 1) // E + 1
            shift = g_lo - lo
            aligned = shift % E == 0
            dk = shift // E
            step = group * U
            n_steps = (k1 - k0 - lane + step - 1) // step if k1 - k0 > lane else 0
            words = cuda.local.array(U, np.uint64)
            ahead = cuda.local.array(U, np.uint64)  # the next step's words (PREFETCH)
            vals = cuda.local.array(UE, ACC)
            fast = not CAPPED and aligned and not (GRAD and has_w)
            tk = t_j // E if t_j >= 0 else np.int64(-1)  # the target's word (GRAD)
            if PREFETCH and n_steps > 0:
                for u in range(U):
                    k = k0 + lane + (n_steps - 1) * step + u * group
                    ahead[u] = load_last(xw, k) if k < k1 else np.uint64(0)
            for it in range(n_steps - 1, -1, -1):
                kb = k0 + lane + it * step
                if PREFETCH:  # as in thread_stats; the words are this thread's alone, so
                    for u in range(U):  # reading the next ones before storing is safe in place
                        words[u] = ahead[u]
                    if it > 0:
                        for u in range(U):
                            k = kb - step + u * group
                            ahead[u] = load_last(xw, k) if k < k1 else np.uint64(0)
                else:
                    for u in range(U):
                        k = kb + u * group
                        words[u] = load_last(xw, k) if k < k1 else np.uint64(0)
                if (
                    fast
                    and kb * E >= lo
                    and (kb + (U - 1) * group + 1) * E <= hi
                    and not (tk >= kb and (tk - kb) % group == 0 and (tk - kb) // group < U)
                ):
                    # Interior step without the target: every word is whole and in the row,
                    # so no index per element and one store per word (as in thread_stats).
                    for u in range(U):
                        packed = np.uint64(0)
                        for e in range(E):
                            d = (unpack(words[u], e) - m) - log_s
                            if NORM and coef_p == ZERO:
                                f = d
                            else:
                                f = coef_p * exp_acc(d)
                            if GRAD:
                                f -= coef_w
                            packed |= pack(f) << np.uint64(e * LANE_BITS)
                        store_streaming(gw, kb + u * group + dk, packed)
                    continue
                if CAPPED:  # in a loop of its own, as in thread_stats
                    for u in range(U):
                        for e in range(E):
                            v = unpack(words[u], e)
                            vals[u * E + e] = ACC(cap * ACC(math.tanh(v * inv_cap)))
                for u in range(U):
                    k = kb + u * group
                    if k < k1:
                        whole = aligned and k * E >= lo and k * E + E <= hi
                        packed = np.uint64(0)
                        for e in range(E):
                            j = k * E + e
                            v = vals[u * E + e] if CAPPED else unpack(words[u], e)
                            d = (v - m) - log_s
                            if NORM and coef_p == ZERO:
                                f = d
                            else:
                                f = coef_p * exp_acc(d)
                            if GRAD:
                                # d loss / d xc_j = a p_j - b w_j - c [j == t], times the
                                # soft-cap factor d xc / dx = 1 - (xc / cap)^2. Lanes outside
                                # the span read the weight of its nearest class and are
                                # never stored.
                                if has_w:
                                    f -= coef_w * w[min(max(j, lo), hi - 1) - a]
                                else:
                                    f -= coef_w
                                if j == t_j:
                                    f -= coef_t
                                if CAPPED:
                                    r = v * inv_cap
                                    f *= ONE - r * r
                            bits = pack(f)
                            if whole:
                                packed |= bits << np.uint64(e * LANE_BITS)
                            elif j >= lo and j < hi:
                                ge[j + shift] = ELEM(bits)
                        if whole:
                            store_streaming(gw, k + dk, packed)

        return write_steps

    steps_plain, steps_capped = make_steps(False), make_steps(True)

    @device_function
    def write_span(xw, gw, ge, span, lane, group, cap, inv_cap, coefs, w, has_w):
        """Write one thread's share of ``f(x)`` for buffer elements ``[lo, hi)`` to ``g``.

        ``span = (lo, hi, a, g_lo)``: the elements, the row start ``a`` (element ``j`` is
        class ``j - a``) and the position of element ``lo`` in ``g``'s buffer.
        ``coefs = (m, log_s, coef_p, coef_w, coef_t, t_j)``: the row max and log of the sum
        of exp(v - m), so that ``v - lse = (v - m) - log_s`` keeps full precision next to a
        large common offset; for the loss (JOB_GRAD) ``f`` is its gradient, coefficients
        from ``grad_coefficients`` and ``t_j`` the target's element; for JOB_NORM it is the
        softmax (``coef_p = 1``) or, when ``coef_p == 0``, the log-softmax ``v - lse``.

        1. The words are visited in the reverse order of ``thread_stats``: the words read
           last in the first pass are re-read first, while they are most likely still in
           L2. Loads are marked last-use and stores streaming, so neither evicts logits that
           other rows have yet to re-read.
        2. When ``g`` has the same alignment as ``x`` (always for ``out=logits`` and for
           outputs allocated here), a word wholly inside ``[lo, hi)`` is packed in registers
           and stored as one word; the partial end words (and every word of a misaligned
           ``g``) are stored element by element, touching only this row's elements.
        """
        if cap > ZERO:
            steps_capped(xw, gw, ge, span, lane, group, cap, inv_cap, coefs, w, has_w)
        else:
            steps_plain(xw, gw, ge, span, lane, group, cap, inv_cap, coefs, w, has_w)

    return write_span


@functools.cache
def kernel_sources(fmt: int, job: int, tgt_bits: int, threads: int, unroll: int, prefetch: bool) -> dict:
    """The Python functions of one kernel variant, and their explicit Numba signatures.

    Returns ``{"rows": (func, sig), "chunk_stats": (func, sig), "chunks": (func, sig)}``:
    the fused one-block-per-row-group kernel, and the two kernels of the split path (chunk
    statistics, then combine and write). Compiling is left to the caller
    (``cuda.jit(sig)(func)`` on a GPU, ``cuda.compile_ptx`` in the tests).

    Parameters
    ----------
    fmt : FMT_*
        Storage format of the logits.
    job : JOB_*
        Loss only, loss and gradient, or a normalization.
    tgt_bits : {32, 64}
        Target dtype (int32 or int64); ignored for JOB_NORM.
    threads, unroll, prefetch : int, int, bool
        THREADS, UNROLL and PREFETCH, frozen into the variant.
    """
    _check_threads(threads)
    E = ELEMS_PER_WORD[fmt]
    ACC = np.float64 if fmt == FMT_F64 else np.float32
    ELEM = {4: np.uint16, 2: np.uint32, 1: np.uint64}[E]
    TGT = np.int32 if tgt_bits == 32 else np.int64
    GRAD = job == JOB_GRAD
    NORM = job == JOB_NORM
    ZERO, ONE, NAN = ACC(0.0), ACC(1.0), ACC(np.nan)
    arith = _arithmetic(fmt == FMT_F64)
    LOWEST = arith.LOWEST
    log_acc, rebase, group_stats = arith.log_acc, arith.rebase, arith.group_stats
    row_loss, row_scale, grad_coefficients = arith.row_loss, arith.row_scale, arith.grad_coefficients
    storage = _storage(fmt, unroll, prefetch)
    element, thread_stats, fill_span = storage.element, storage.thread_stats, storage.fill_span
    write_span = _writer(fmt, JOB_NORM if NORM else JOB_GRAD, unroll, prefetch)

    @device_function
    def row_lse(xw, a, n_cols, m, lse):
        """The lse a row stores, as ``torch.logsumexp`` (and ``_cpu.row_lse``) gives it: NaN
        for a row holding a NaN, ``+inf`` for one holding ``+inf`` and no NaN, else ``lse``.
        Only an infinite max looks for NaN (the max reductions skip NaN, and with a finite max
        a NaN has made ``s`` NaN already); one thread reads the row, which only such rows pay."""
        if not math.isinf(m):
            return lse
        for j in range(a, a + n_cols):
            v = element(xw, j, ZERO, ZERO)
            if v != v:
                return NAN
        return m

    # ------------------------------------------------------------------------------------
    # Kernels. Every argument is an int64 or a float64: addresses (``*_addr``), sizes,
    # strides, options. See ``_backend_cuda`` for how each is made.
    # ------------------------------------------------------------------------------------
    def rows(
        x_addr,
        g_addr,
        t_addr,
        w_addr,
        go_addr,
        stats_addr,
        out_addr,
        n_rows,
        n_cols,
        n1,
        x0,
        xs0,
        xs1,
        g0,
        gn1,
        gs0,
        gs1,
        ignore_index,
        reduction,
        n_go,
        n_w,
        group,
        cap_,
        eps_,
        z_,
        go_scalar_,
    ):
        """Fused kernel: groups of ``group`` threads each take one row, ``THREADS // group``
        rows per block, the grid striding over row groups (a persistent grid, so the rows in
        flight, and with them the L2 footprint of the re-read, stay bounded).

        Per row: 1. one pass for the row statistics (``thread_stats``); 2. the group's tree
        reductions; 3. the loss (or lse); 4. for the gradient or a normalization, a second
        pass that re-reads the row and writes ``g`` (``write_span``). Per row: one read for
        the loss; one read, one (mostly L2) re-read and one write for the gradient.

        JOB_LOSS / JOB_GRAD: ``out`` gets the per-row loss (ignored rows 0, bad targets NaN).
        JOB_NORM: ``reduction`` is the MODE_*, ``out`` gets the lse.
        """
        xw = as_pointer(x_addr, np.uint64)
        gw = as_pointer(g_addr, np.uint64)
        ge = as_pointer(g_addr, ELEM)
        tg = as_pointer(t_addr, TGT)
        w = as_pointer(w_addr, ACC)
        go = as_pointer(go_addr, ACC)
        stats = as_pointer(stats_addr, np.float64)
        out = as_pointer(out_addr, ACC)
        red = cuda.shared.array((4, threads), ACC)
        cap = ACC(cap_)
        inv_cap = ONE / cap if cap > ZERO else ZERO
        eps = ACC(eps_)
        z = ACC(z_)
        has_w = n_w > 0
        smooth = eps > ZERO and not NORM
        w_sum = ACC(stats[3]) if has_w and smooth else ACC(n_cols)
        tid = cuda.threadIdx.x
        lane = tid % group
        rows_per_block = threads // group
        n_groups = (n_rows + rows_per_block - 1) // rows_per_block
        for grp in range(cuda.blockIdx.x, n_groups, cuda.gridDim.x):
            row = grp * rows_per_block + tid // group
            fill = 0
            t = -1
            if row < n_rows:
                if not NORM:
                    t = np.int64(tg[row])
                    fill = target_fill(t, ignore_index, n_cols)
                else:
                    fill = -1
            live = row < n_rows and fill == -1
            a = row_start(row, n1, x0, xs0, xs1)
            m = LOWEST
            s = ZERO
            sm = ZERO
            ws = ZERO
            xt = ZERO
            if live:
                m, s, sm, ws = thread_stats(xw, a, a + n_cols, a, lane, group, cap, inv_cap, w, has_w, smooth)
                if not NORM:
                    xt = element(xw, a + t, cap, inv_cap)  # read before any gradient write
            m, s, sm, ws = group_stats(red, tid, lane, group, m, s, sm, ws)
            log_s = log_acc(s)
            lse = m + log_s
            if NORM:
                if live:
                    if lane == 0:
                        out[row] = row_lse(xw, a, n_cols, m, lse)
                    if reduction != MODE_LSE:
                        g_a = row_start(row, gn1, g0, gs0, gs1)
                        coef_p = ONE if reduction == MODE_SOFTMAX else ZERO
                        coefs = (m, log_s, coef_p, ZERO, ZERO, np.int64(-1))
                        write_span(xw, gw, ge, (a, a + n_cols, a, g_a), lane, group, ZERO, ZERO, coefs, w, False)
            elif live:
                wt = w[t] if has_w else ONE
                loss = row_loss(m, log_s, sm, xt, wt, w_sum, n_cols, eps, z)
                if lane == 0:
                    out[row] = loss
                if GRAD:
                    sc = row_scale(row, reduction, stats, go, n_go, ACC(go_scalar_))
                    coef_p, coef_w, coef_t = grad_coefficients(sc, wt, w_sum, n_cols, eps, z, lse)
                    g_a = row_start(row, gn1, g0, gs0, gs1)
                    coefs = (m, log_s, coef_p, coef_w, coef_t, a + t)
                    write_span(
                        xw, gw, ge, (a, a + n_cols, a, g_a), lane, group, cap, inv_cap, coefs, w, has_w and smooth
                    )
            elif row < n_rows:
                value = ZERO if fill == 0 else NAN
                if lane == 0:
                    out[row] = value
                if GRAD:
                    g_a = row_start(row, gn1, g0, gs0, gs1)
                    fill_span(gw, ge, g_a, g_a + n_cols, lane, group, value)

    def chunk_stats(
        x_addr,
        t_addr,
        w_addr,
        part_addr,
        n_rows,
        n_cols,
        n1,
        x0,
        xs0,
        xs1,
        ignore_index,
        n_w,
        n_chunks,
        chunk,
        cap_,
        eps_,
    ):
        """Split path, first kernel: the statistics of one chunk of one row per block.

        For few rows of a large vocabulary, one block per row cannot fill the GPU; each row
        is cut into ``n_chunks`` chunks of ``chunk`` elements instead. Block ``b`` (striding)
        takes row ``b // n_chunks``, chunk ``b % n_chunks``, and stores its chunk's
        ``(m, s, sm, ws)``, and the target's logit when the chunk holds it, at
        ``part[(row * n_chunks + chunk) * PART]``. ``chunks`` combines them.
        """
        xw = as_pointer(x_addr, np.uint64)
        tg = as_pointer(t_addr, TGT)
        w = as_pointer(w_addr, ACC)
        part = as_pointer(part_addr, ACC)
        red = cuda.shared.array((4, threads), ACC)
        cap = ACC(cap_)
        inv_cap = ONE / cap if cap > ZERO else ZERO
        smooth = ACC(eps_) > ZERO and not NORM
        has_w = n_w > 0
        tid = cuda.threadIdx.x
        for b in range(cuda.blockIdx.x, n_rows * n_chunks, cuda.gridDim.x):
            row = b // n_chunks
            c = b % n_chunks
            t = np.int64(-1)
            live = True
            if not NORM:
                t = np.int64(tg[row])
                live = target_fill(t, ignore_index, n_cols) == -1
            a = row_start(row, n1, x0, xs0, xs1)
            lo = a + c * chunk
            hi = min(lo + chunk, a + n_cols)
            m = LOWEST
            s = ZERO
            sm = ZERO
            ws = ZERO
            if live:
                m, s, sm, ws = thread_stats(xw, lo, hi, a, tid, threads, cap, inv_cap, w, has_w, smooth)
            m, s, sm, ws = group_stats(red, tid, tid, threads, m, s, sm, ws)
            if live and tid == 0:
                p = b * PART
                part[p] = m
                part[p + 1] = s
                part[p + 2] = sm
                part[p + 3] = ws
                if not NORM and a + t >= lo and a + t < hi:
                    part[p + 4] = element(xw, a + t, cap, inv_cap)

    def chunks(
        x_addr,
        g_addr,
        t_addr,
        w_addr,
        go_addr,
        stats_addr,
        part_addr,
        out_addr,
        n_rows,
        n_cols,
        n1,
        x0,
        xs0,
        xs1,
        g0,
        gn1,
        gs0,
        gs1,
        ignore_index,
        reduction,
        n_go,
        n_w,
        n_chunks,
        chunk,
        blocks_per_row,
        cap_,
        eps_,
        z_,
        go_scalar_,
    ):
        """Split path, second kernel: combine a row's chunk statistics, then write.

        Block ``b`` (striding) takes row ``b // blocks_per_row`` and chunk
        ``b % blocks_per_row`` (``blocks_per_row`` is 1 when nothing is written but the
        loss). Every thread combines the row's ``n_chunks`` partials itself, in chunk order
        (a fixed order, so results do not depend on scheduling), and needs no shared memory
        or barrier. Chunk 0's thread 0 stores the loss (or lse); with a gradient or a
        normalization each block writes its chunk. This re-reads the logits from memory
        (the chunks were read by the first kernel), which is the price of filling the GPU
        with few rows.
        """
        xw = as_pointer(x_addr, np.uint64)
        gw = as_pointer(g_addr, np.uint64)
        ge = as_pointer(g_addr, ELEM)
        tg = as_pointer(t_addr, TGT)
        w = as_pointer(w_addr, ACC)
        go = as_pointer(go_addr, ACC)
        stats = as_pointer(stats_addr, np.float64)
        part = as_pointer(part_addr, ACC)
        out = as_pointer(out_addr, ACC)
        cap = ACC(cap_)
        inv_cap = ONE / cap if cap > ZERO else ZERO
        eps = ACC(eps_)
        z = ACC(z_)
        has_w = n_w > 0
        w_sum = ACC(stats[3]) if has_w and eps > ZERO and not NORM else ACC(n_cols)
        tid = cuda.threadIdx.x
        for b in range(cuda.blockIdx.x, n_rows * blocks_per_row, cuda.gridDim.x):
            row = b // blocks_per_row
            c = b % blocks_per_row
            t = np.int64(-1)
            fill = -1
            if not NORM:
                t = np.int64(tg[row])
                fill = target_fill(t, ignore_index, n_cols)
            a = row_start(row, n1, x0, xs0, xs1)
            lo = a + c * chunk
            hi = min(lo + chunk, a + n_cols)
            g_a = row_start(row, gn1, g0, gs0, gs1)
            if fill != -1:
                value = ZERO if fill == 0 else NAN
                if c == 0 and tid == 0:
                    out[row] = value
                if GRAD:
                    fill_span(gw, ge, g_a + (lo - a), g_a + (hi - a), tid, threads, value)
                continue
            first = row * n_chunks * PART
            m = LOWEST
            for i in range(n_chunks):
                if part[first + i * PART] > m:
                    m = part[first + i * PART]
            s = ZERO
            sm = ZERO
            for i in range(n_chunks):
                p = first + i * PART
                s_i, sm_i = rebase(part[p], part[p + 1], part[p + 2], part[p + 3], m)
                s += s_i
                sm += sm_i
            log_s = log_acc(s)
            lse = m + log_s
            if NORM:
                if c == 0 and tid == 0:
                    out[row] = row_lse(xw, a, n_cols, m, lse)
                if reduction != MODE_LSE:
                    coef_p = ONE if reduction == MODE_SOFTMAX else ZERO
                    coefs = (m, log_s, coef_p, ZERO, ZERO, np.int64(-1))
                    write_span(xw, gw, ge, (lo, hi, a, g_a + (lo - a)), tid, threads, ZERO, ZERO, coefs, w, False)
                continue
            xt = part[first + (t // chunk) * PART + 4]
            wt = w[t] if has_w else ONE
            loss = row_loss(m, log_s, sm, xt, wt, w_sum, n_cols, eps, z)
            if c == 0 and tid == 0:
                out[row] = loss
            if GRAD:
                sc = row_scale(row, reduction, stats, go, n_go, ACC(go_scalar_))
                coef_p, coef_w, coef_t = grad_coefficients(sc, wt, w_sum, n_cols, eps, z, lse)
                coefs = (m, log_s, coef_p, coef_w, coef_t, a + t)
                write_span(
                    xw, gw, ge, (lo, hi, a, g_a + (lo - a)), tid, threads, cap, inv_cap, coefs, w, has_w and eps > ZERO
                )

    i64, f64 = "int64", "float64"
    return {
        "rows": (rows, f"void({', '.join([i64] * 22 + [f64] * 4)})"),
        "chunk_stats": (chunk_stats, f"void({', '.join([i64] * 14 + [f64] * 2)})"),
        "chunks": (chunks, f"void({', '.join([i64] * 25 + [f64] * 4)})"),
    }


@functools.cache
def reduce_source(tgt_bits: int, acc_bits: int, threads: int) -> tuple:
    """``(func, sig)`` of ``reduce_rows``, the single-block kernel around the main one.

    Before the main kernel it computes the 'mean' divisor, the first bad target (for
    ``validate=True``), the gradient factor of 'mean' and the weight sum; after it, the
    summed or mean loss.
    One block, each thread striding over the rows and accumulating in float64, then a
    fixed-order tree: the result is the same on every run, and nothing waits on the host.
    """
    _check_threads(threads)
    TGT = np.int32 if tgt_bits == 32 else np.int64
    ACC = np.float32 if acc_bits == 32 else np.float64
    ZERO = np.float64(0.0)

    def reduce_rows(
        t_addr,
        w_addr,
        go_addr,
        loss_addr,
        stats_addr,
        out_addr,
        n_rows,
        n_cols,
        ignore_index,
        n_w,
        n_go,
        flags,
        go_scalar,
    ):
        """See ``reduce_source``. ``flags`` is a sum of F_*."""
        tg = as_pointer(t_addr, TGT)
        w = as_pointer(w_addr, ACC)
        go = as_pointer(go_addr, ACC)
        loss = as_pointer(loss_addr, ACC)
        stats = as_pointer(stats_addr, np.float64)
        out = as_pointer(out_addr, ACC)
        red = cuda.shared.array((4, threads), np.float64)
        tid = cuda.threadIdx.x
        divisor = ZERO
        total = ZERO
        w_total = ZERO
        first_bad = n_rows
        if flags & F_WSUM:
            for j in range(tid, n_cols, threads):
                w_total += np.float64(w[j])
        for i in range(tid, n_rows, threads):
            if flags & (F_DIVISOR | F_CHECK):
                t = np.int64(tg[i])
                kept = t != ignore_index
                in_range = t >= 0 and t < n_cols
                # As on the CPU: unweighted, every non-ignored row counts; weighted, a row
                # counts its target's weight (a bad target, possible only unvalidated, adds 0).
                if kept and n_w == 0:
                    divisor += 1.0
                elif kept and in_range:
                    divisor += np.float64(w[t])
                if kept and not in_range and first_bad == n_rows:
                    first_bad = i
            if flags & (F_SUM | F_MEAN):
                total += np.float64(loss[i])
        red[0, tid] = divisor
        red[1, tid] = total
        red[2, tid] = np.float64(first_bad)
        red[3, tid] = w_total
        cuda.syncthreads()
        off = threads // 2
        while off > 0:
            if tid < off:
                red[0, tid] += red[0, tid + off]
                red[1, tid] += red[1, tid + off]
                red[3, tid] += red[3, tid + off]
                if red[2, tid + off] < red[2, tid]:
                    red[2, tid] = red[2, tid + off]
            cuda.syncthreads()
            off //= 2
        if tid == 0:
            if flags & F_DIVISOR:
                stats[0] = red[0, 0]
            if flags & F_CHECK:
                stats[1] = red[2, 0] if red[2, 0] < n_rows else -1.0
            if flags & F_WSUM:
                stats[3] = red[3, 0]
            if flags & F_SCALE:
                g = np.float64(go[0]) if n_go == 1 else go_scalar
                stats[2] = g / stats[0]
            if flags & F_SUM:
                out[0] = ACC(red[1, 0])
            if flags & F_MEAN:
                out[0] = ACC(red[1, 0] / stats[0])

    return reduce_rows, "void(" + ", ".join(["int64"] * 12 + ["float64"]) + ")"
