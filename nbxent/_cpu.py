"""Numba CPU kernels: softmax cross-entropy, its gradient, and row normalizations.

Every kernel sees the logits as a 1-D buffer ``x`` and a row table ``x_off``: row ``i`` is
``x[x_off[i] : x_off[i] + V]``. That serves contiguous arrays, row-strided views (the usual
``logits[:, :-1]`` next-token shift) and in-place output alike, and keeps each row a
contiguous slice that LLVM can vectorize. Rows run in parallel (``prange``); each row is
handled by one thread from start to end, so results do not depend on the thread count.

Each row is read once from memory, in blocks of STATS_BLOCK logits (online softmax: see
``row_stats``); the fused kernels store exp(x - m_k) where the gradient goes and rescale it
in one more sweep while the row is in cache. docs/cpu.md has the measurements.

16-bit logits arrive as ``uint16`` bits (``half`` says which format) at the ``*_16`` kernels,
and are widened block by block into float32 (the fused path) or a whole row at a time (the
others); the gradient is rounded back to 16 bits as it is written.
"""

from __future__ import annotations

import functools
import glob
import math

import numba
import numpy as np

from ._jit import (
    HALF_BF16,
    HALF_F16,
    as_dtype_of,
    bf16_to_f32,
    exact_sub,
    f16_to_f32,
    f32_to_bf16,
    f32_to_bf16_not_nan,
    f32_to_f16,
    fast_exp,
    fast_exp16,
    fast_tanh,
    jit_inline,
    jit_kernel,
    jit_poly,
    jit_reduce,
    jit_serial,
    max_bits16,
    row_max,
    widen,
)

# Normalization modes of ``normalize_rows``.
MODE_LSE, MODE_SOFTMAX, MODE_LOG_SOFTMAX = 0, 1, 2


# Logits per block of ``row_stats``: 8 KB of float32, which stay in L1 while a block is
# summed (and, rarely, summed again). 2048 was the fastest of 1024-8192 on the bench shapes.
STATS_BLOCK = 2048

# The block sums of ``row_stats`` take each exp against a reference max that may lie below
# the block's entries, and clamp its exponent at EXP_CLAMP so that none can overflow; a
# block whose sum reaches RESUM_AT (below) is summed again against its own max. Stored exps
# are then at most e^EXP_CLAMP (see ``row_stats_store``).
EXP_CLAMP = 32.0

# The reference max is that of the first REF_SAMPLE logits of the row's first block above
# -inf (all of the block when those are all -inf): any m works, and a block that rises
# EXP_CLAMP above it is summed again. A max over the whole first block read it from memory
# in a loop of its own, ahead of the sums: 2-3% of the loss alone on one thread (V = 32000).
REF_SAMPLE = 64


@jit_serial
def first_max(xb, src16, half):
    """The reference max of a row's first block above -inf (``row_stats`` step 1): the max of
    its first REF_SAMPLE logits, or of the whole block if those are all -inf. ``xb`` is the
    float block, or ``src16`` (not None) its 16-bit bits in format ``half``."""
    if src16 is not None:
        mb = as_dtype_of(xb, widen(max_bits16(src16[:REF_SAMPLE]), half))
        return as_dtype_of(xb, widen(max_bits16(src16), half)) if mb == -np.inf else mb
    mb = row_max(xb[:REF_SAMPLE])
    return row_max(xb) if mb == -np.inf else mb


# A block whose sum reaches RESUM_AT is summed again (``row_stats`` step 3): half of
# e^EXP_CLAMP, so that one clamped entry alone reaches it whatever the exp's last bits (the
# 16-bit pass's shorter exp, or LLVM folding a constant argument with other roundings).
RESUM_AT = math.exp(EXP_CLAMP) / 2


# ``src16 is None`` tests below are resolved when Numba compiles: float rows never compile the
# 16-bit code (which tripled their first compile while an empty array stood for "no 16-bit
# row"). The block reads are written out in both one-pass functions: a shared helper that
# returned the block cost 4% of the loss's time.


@jit_serial
def raise_max(m, s, sm, seen, live, mb, lo, smooth):
    """Steps 1 and 3 of ``row_stats``: a block (starting at ``lo``) whose max ``mb`` is above the
    reference max ``m`` rescales what was summed so far to the new max; the first block above
    -inf starts the sums (``live``). A NaN max makes ``m`` NaN, as a whole-row max does.
    Returns the new ``(m, s, sm, live)``."""
    if mb > m or mb != mb:
        if live >= 0:
            s *= fast_exp(m - mb)
            if smooth:
                sm += (mb - m) * seen
        else:
            live = lo
        m = mb
    return m, s, sm, live


@jit_serial
def cap_max(mb, cap, inv_cap):
    """A block's max after soft-capping (tanh is monotone): ``cap * tanh(mb / cap)``."""
    return cap * fast_tanh(mb * inv_cap) if cap > 0 else mb


@jit_serial
def row_stats(x, cap, w, smooth, ebuf):
    """Statistics of one row after optional soft-capping ``xc = cap * tanh(x / cap)``.

    Returns ``(m, s, sm)``: a reference max ``m`` (the row's max, or below it by less than
    EXP_CLAMP), ``s = sum_j exp(xc_j - m)`` and, when ``smooth``, ``sm = sum_j w_j (m - xc_j)``
    (``w_j = 1`` when ``w`` is empty). Any such ``m`` gives the same lse = m + log s; ``sm`` is
    accumulated relative to ``m`` so that a large common offset (1e5) does not cancel.

    One pass over memory (online softmax over blocks of STATS_BLOCK logits):
    1. the first block above -inf: the max of its first REF_SAMPLE logits (or of the whole
       block, if those are all -inf) is the reference max m;
    2. every block: s += sum_j exp(min(xc_j - m, EXP_CLAMP)), one loop that reads the block
       once, from memory. The exp is the cost; while it runs, the hardware prefetcher
       streams the next block in, so memory and arithmetic overlap. The loop is the fused
       pass's (``block_store``), its exps stored to ``ebuf``, so that both sum in one order;
    3. a block whose sum reached RESUM_AT = e^EXP_CLAMP / 2 (an entry at least EXP_CLAMP -
       log(4096) above m, or +inf) takes its max mb, now from L1; what was summed so far is
       rescaled to it (s *= exp(m - mb), sm += (mb - m) * (weight summed so far)) and the
       block is summed again against m = mb. Rare: a row's blocks seldom rise that far above
       its first logits.
    (Taking every block's max first, in a loop that streamed the block from memory with
    little arithmetic to hide behind, made the loss alone 1.28-1.38x slower on one core.)
    Leading blocks that are all ``-inf`` (masked vocabulary) are summed at the end against
    the final m, exactly as a two-pass computation would (exp(-inf - m) = 0, and sm gets its
    +inf). tanh is monotone, so the capped max is the cap of the raw max.

    Float rows: the loss alone of ``xent_row`` without soft-capping (its fused calls, 16-bit
    and soft-capped rows take ``row_stats_store``), ``normalize_row``, and the vocabulary
    blocks of ``_cpu_vocab``. ``ebuf`` is ``padded_ebuf``'s scratch.
    """
    zero = as_dtype_of(x, 0)
    capped = cap > zero
    inv_cap = as_dtype_of(x, 1) / cap if capped else zero
    has_w = w.size > 0
    n = x.size
    big = as_dtype_of(x, RESUM_AT)
    m = as_dtype_of(x, -np.inf)
    s = zero
    sm = zero
    seen = zero  # weight of the entries in s and sm
    live = -1  # start of the first block whose max is above -inf
    plain = not capped and not smooth
    none = ebuf[:0]  # no gradient (writable, for read-only x too): block_store's exps go to ebuf
    for lo in range(0, n, STATS_BLOCK):
        hi = min(lo + STATS_BLOCK, n)
        xb = x[lo:hi]
        if live < 0:  # 1. the reference max, from the first block above -inf
            mb = first_max(xb, None, 0)
            m, s, sm, live = raise_max(m, s, sm, seen, live, cap_max(mb, cap, inv_cap), lo, smooth)
            if live < 0:
                continue
        wb = w[lo:hi] if has_w else w
        if plain:
            bs, bsm = block_exp_sum(xb, ebuf[: hi - lo], m, ebuf), zero  # 2.
        else:
            bs, bsm = block_store(xb, none, m, wb, smooth, cap, ebuf)
        if bs >= big:  # 3. summed again against the block's own max
            m, s, sm, live = raise_max(m, s, sm, seen, live, cap_max(row_max(xb), cap, inv_cap), lo, smooth)
            bs, bsm = block_store(xb, none, m, wb, smooth, cap, ebuf)
        s += bs
        sm += bsm
        if smooth:
            seen += as_dtype_of(x, np.sum(wb)) if has_w else as_dtype_of(x, hi - lo)
    if live != 0:  # blocks before the first live one, or the whole row if none is
        head = n if live < 0 else live
        bs, bsm = block_store(x[:head], none, m, w[:head] if has_w else w, smooth, cap, ebuf)
        s += bs
        sm += bsm
    return m, s, sm


@jit_inline
def store_exp_sum(x, g, m, half):
    """``g_j = exp(min(x_j - m, EXP_CLAMP))``, returning their sum, in one loop: for 16-bit bits
    ``x`` (``half``) with ``fast_exp16`` (5 ulp, for a gradient rounded to 8 or 11 bits), for
    floats (``half`` 0) with ``fast_exp``. Inlined by Numba with a constant ``half``, so that
    the loop holds one conversion and the caller's ``reassoc``. ``g`` must never be where
    LLVM's run-time overlap check fails (``block_store``), so that the vector loop, and its
    order of the sum, always runs."""
    s = as_dtype_of(g, 0)
    clamp = as_dtype_of(g, EXP_CLAMP)
    for j in range(x.size):
        d = widen(x[j], half) - m
        d = clamp if d > clamp else d
        e = fast_exp16(d) if half != 0 else fast_exp(d)
        g[j] = e
        s += e
    return s


@jit_inline
def store_exp_sum_capped(x, g, m, half, cap):
    """``store_exp_sum`` after soft-capping, ``xc_j = cap tanh(x_j / cap)``: stores
    ``exp(min(xc_j - m, EXP_CLAMP)) * (1 - (xc_j / cap)^2)`` (the exp times dxc_j/dx_j) and
    returns the sum of the exps alone. ``x`` holds 16-bit bits (``half``, with ``fast_exp16``)
    or floats (``half`` 0); ``g`` is never where LLVM's run-time overlap check would fail (the
    float32 scratch of 16-bit rows; for float rows the gradient where ``far_apart`` allows it,
    else the padded L1 buffer: ``block_store``), so the vector loop always runs and the sum's
    order is fixed."""
    one = as_dtype_of(g, 1)
    inv_cap = one / cap
    s = as_dtype_of(g, 0)
    clamp = as_dtype_of(g, EXP_CLAMP)
    for j in range(x.size):
        v = cap * fast_tanh(widen(x[j], half) * inv_cap)
        d = v - m
        d = clamp if d > clamp else d
        e = fast_exp16(d) if half != 0 else fast_exp(d)
        r = v * inv_cap
        g[j] = e * (one - r * r)
        s += e
    return s


@jit_inline
def store_capped_sums(x, g, m, half, cap, w):
    """Soft-capped rows with smoothing: stores the capped logits ``xc_j = cap tanh(x_j / cap)``
    into ``g`` and returns ``block_sums``' pair ``(sum_j exp(min(xc_j - m, EXP_CLAMP)),
    sum_j w_j (m - xc_j))`` (``w_j = 1`` for an empty ``w``), so that the gradient sweep takes
    one exp an entry and no tanh (the dearer of the two). ``x`` and ``g`` as in
    ``store_exp_sum_capped``."""
    inv_cap = as_dtype_of(g, 1) / cap
    s = as_dtype_of(g, 0)
    sm = as_dtype_of(g, 0)
    clamp = as_dtype_of(g, EXP_CLAMP)
    has_w = w.size > 0
    for j in range(x.size):
        v = cap * fast_tanh(widen(x[j], half) * inv_cap)
        g[j] = v
        d = v - m
        d = clamp if d > clamp else d
        s += fast_exp16(d) if half != 0 else fast_exp(d)
        dm = exact_sub(m, v)  # a leaf that ``reassoc`` cannot merge into the sum
        sm += w[j] * dm if has_w else dm
    return s, sm


@jit_reduce
def smoothing_sum(x, m, w, half, like):
    """``sum_j w_j (m - x_j)`` (``w_j = 1`` when ``w`` is empty) over one block of floats, or of
    16-bit bits in format ``half``, in the dtype of ``like``: the label-smoothing term of an
    uncapped block in ``block_store`` and ``block_store16``."""
    has_w = w.size > 0
    sm = as_dtype_of(like, 0)
    for j in range(x.size):
        d = exact_sub(m, widen(x[j], half))  # a leaf that ``reassoc`` cannot merge into the sum
        sm += w[j] * d if has_w else d
    return sm


@jit_reduce
def block_store(x, g, m, w, smooth, cap, ebuf):
    """``g_j = exp(min(x_j - m, EXP_CLAMP))`` over one block of float logits; returns the block's
    ``(s, sm)``: ``s = sum_j exp(min(xc_j - m, EXP_CLAMP))`` and, with ``smooth``,
    ``sm = sum_j w_j (m - xc_j)`` (``w_j = 1`` when ``w`` is empty). 16-bit blocks take
    ``block_store16``: apart, so that neither compiles the other's loops (each an exp, a tanh
    or both, vectorized for nothing).

    The exps are summed in the loop that stores them, and that loop's store goes to ``g`` where
    ``g`` lies far from ``x`` (``far_apart``) and to ``ebuf`` otherwise, copied to ``g`` after
    it, or to ``ebuf`` alone where there is no gradient (an empty ``g``: the loss alone,
    ``row_stats``). ``ebuf`` is far from every array (``padded_ebuf``). LLVM vectorizes the loop
    behind a run-time check that the store does not overlap the next loads, and its scalar
    version sums in another order: with a destination for which that check never fails, the
    loss alone, in place and out of place run the same vector loop and give the same bits.
    (Until 2026-11-27 plain float rows were summed in loops that stored nothing, the loss
    alone's with the exp, the fused pass's over the stored exps: on a host with AVX-512 LLVM
    gave both the same vector width and interleave, so the same order; on an AVX2 host it
    interleaved the exp loop 2 and the plain sum 4, and 30-50% of rows came out a bit apart.)
    ``g`` may be ``x`` itself (in place, the masked leading blocks' fix-up): it is never far
    from itself, so the exps go through ``ebuf``, and each entry is read before it is written.

    With soft-capping (``cap > 0``) and no ``smooth``, ``g_j`` is the exp times the cap's
    derivative ``1 - (xc_j / cap)^2``, so that the gradient sweep needs no tanh and no exp;
    with ``smooth``, whose gradient needs the derivative apart from the exp, ``g_j`` is the
    capped logit itself (``store_capped_sums``), summed the same way. Storing to ``g`` in the
    loop, rather than copying ``ebuf`` to it after, overlaps the fetch of ``g``'s lines with
    the arithmetic (soft-capped, out of place, 1.1x).
    """
    zero = as_dtype_of(g, 0)
    has_w = w.size > 0
    sm = zero
    if smooth and not cap > zero:  # before an in-place store overwrites x (capped: in the loop)
        sm = smoothing_sum(x, m, w, 0, g)
    s = zero
    direct = g.size > 0 and far_apart(x, g)
    for c0 in range(0, x.size, ebuf.size):  # one piece for a block
        c1 = min(c0 + ebuf.size, x.size)
        # (ebuf from 0: indexing it from an offset kept LLVM from vectorizing)
        dst = g[c0:c1] if direct else ebuf[: c1 - c0]
        if cap > zero and smooth:
            bs, bsm = store_capped_sums(x[c0:c1], dst, m, 0, cap, w[c0:c1] if has_w else w)
            s += bs
            sm += bsm
        elif cap > zero:
            s += store_exp_sum_capped(x[c0:c1], dst, m, 0, cap)
        else:
            s += block_exp_sum(x[c0:c1], dst, m, ebuf)
        if g.size > 0 and not direct:
            copy_block(dst, g[c0:c1])
    return s, sm


@jit_reduce
def block_exp_sum(x, g, m, ebuf):
    """``block_store`` of one block of at most STATS_BLOCK plain float logits (no soft-cap, no
    smoothing): the same loop, storing its exps to ``g`` where that is far from ``x``, else to
    ``ebuf`` and copied to ``g``; the loss alone passes ``ebuf`` itself as ``g``. ``g`` must
    hold ``x.size`` entries (unlike ``block_store``'s, it is never empty: nothing checks).

    The same loop gives the same bits, and here it compiles tighter: inside ``block_store``,
    with every variant's values live around it, LLVM reloaded a dozen broadcast constants
    each iteration (56 instructions for 16 entries); here it keeps most in registers (46).
    The float32 loss alone got 1.08-1.12x faster (in-process A/B; docs/cpu.md). The block
    loops call it themselves for plain rows; ``block_store`` calls it too (for blocks summed
    again, and leading all--inf blocks), but leaving every plain block to go through
    ``block_store`` measured 0.88-0.98x of that."""
    if far_apart(x, g):
        return store_exp_sum(x, g, m, 0)
    s = store_exp_sum(x, ebuf[: x.size], m, 0)
    copy_block(ebuf[: x.size], g)
    return s


@jit_reduce
def block_store16(x, g, m, w, smooth, half, cap):
    """``block_store`` for a block of 16-bit bits ``x`` (format ``half``), widened in the loop
    that takes the exp, as they are loaded, into the float32 scratch ``g``. The bits and the
    scratch are never the same memory, so LLVM's run-time check (here one of bounds) always
    picks the vector loop and the sum can be taken as the exps are stored (8% less time an
    entry in cache); a constant format in each loop gives one conversion an entry."""
    zero = as_dtype_of(g, 0)
    sm = zero
    if smooth and not cap > zero:
        sm = smoothing_sum(x, m, w, half, g)
    if cap > zero and smooth:
        if half == HALF_BF16:
            return store_capped_sums(x, g, m, HALF_BF16, cap, w)
        return store_capped_sums(x, g, m, HALF_F16, cap, w)
    if cap > zero:
        if half == HALF_BF16:
            return store_exp_sum_capped(x, g, m, HALF_BF16, cap), sm
        return store_exp_sum_capped(x, g, m, HALF_F16, cap), sm
    return block_exp_sum16(x, g, m, half), sm


@jit_reduce
def block_exp_sum16(x, g, m, half):
    """``block_store16`` of one block of plain 16-bit logits (no soft-cap, no smoothing), in a
    small function for the reason ``block_exp_sum`` gives; ``g`` holds ``x.size`` entries."""
    if half == HALF_BF16:
        return store_exp_sum(x, g, m, HALF_BF16)
    return store_exp_sum(x, g, m, HALF_F16)


# LLVM vectorizes a loop that loads ``x`` and stores ``g`` behind a run-time check that
# ``g - x`` (as an unsigned number) is at least the bytes of one unrolled vector iteration, and
# runs its scalar version, which sums in another order, when it is not. FAR_BYTES is well
# above any such iteration (256 bytes in the loops compiled here, float32 and float64).
FAR_BYTES = 4096


@jit_serial
def far_apart(x, g):
    """Whether the vector loop that loads ``x`` and stores ``g`` always passes LLVM's check:
    ``g`` lies before ``x`` or at least FAR_BYTES after it."""
    d = g.ctypes.data - x.ctypes.data
    return d < 0 or d >= FAR_BYTES


@jit_serial
def padded_ebuf(like):
    """The scratch of ``block_store``: STATS_BLOCK entries of ``like``'s dtype that start
    FAR_BYTES into their allocation, so that every array allocated before them ends at least
    that far before them: ``far_apart(x, ebuf)`` holds for every ``x`` that does not overlap
    them."""
    pad = FAR_BYTES // like.itemsize
    return np.empty(STATS_BLOCK + pad, like.dtype)[pad:]


@jit_serial
def copy_block(src, dst):
    """``dst[:] = src`` as a plain loop (Numba's slice assignment checks for overlap first)."""
    for j in range(src.size):
        dst[j] = src[j]


@jit_serial
def zero_block(dst):
    """``dst[:] = 0`` as a plain loop."""
    for j in range(dst.size):
        dst[j] = 0


@jit_serial
def row_stats_store(x, g, in_place, w, smooth, cap, ebuf, block_m, src16, half, keep, claim=None):
    """``row_stats``, in the same one pass over blocks, that also stores
    ``g_j = exp(min(x_j - m_k, EXP_CLAMP))`` with ``m_k`` the reference max block ``k`` was
    summed against; ``m_k`` goes to ``block_m[k]``, and the gradient sweep scales block ``k``
    by ``exp(m_k - m)``: exactly 1, and skipped, unless a later block was summed again
    (``row_stats`` step 3). The stored exps are at most e^EXP_CLAMP.

    In place (``g`` is ``x``), each block's exps go to an 8 KB buffer in L1 and are copied
    to ``g`` once the block's sums stand, since a block summed again reads its logits again.

    A ``src16`` that is not None holds the row as 16-bit bits (format ``half``; ``x`` is ``g``, a
    float32 scratch row): the exp loop widens the bits as it loads them, so the row is read
    once from memory, in step with the arithmetic, and the scratch row is written once an
    entry. (Widening each block into an L1 buffer first, the way this was done before, cost
    12% more time an entry.) Without ``keep`` (the loss alone), the exps of 16-bit rows go to
    the L1 buffer instead: writing them to the scratch row, which lives in L2, made the loss
    1.3x slower. Soft-capped float rows come here for the loss alone too, with an empty ``g``.

    Soft-capped rows (``cap > 0``) store the exps times the cap's derivative instead, or with
    ``smooth`` the capped logits (``block_store``); the reference max and the max of a block
    summed again are capped (tanh is monotone).

    ``claim``, when not None, is the 16-bit output row of an out-of-place gradient: each of
    its blocks is zeroed as the pass reaches it, so that its cache lines are fetched for
    writing while the exps are computed and are in cache when the final sweep writes them.
    Left to the sweep, which does little arithmetic an entry, those fetches stalled it:
    bfloat16 and float16 out of place 1.06-1.22x faster with rows of 32000-128256 (two
    threads, in-process A/B) on one host, slower on another (``CLAIM_MIN_L2``).
    """
    zero = as_dtype_of(x, 0)
    inv_cap = as_dtype_of(x, 1) / cap if cap > zero else zero
    has_w = w.size > 0
    n = x.size
    big = as_dtype_of(x, RESUM_AT)
    m = as_dtype_of(x, -np.inf)
    s = zero
    sm = zero
    seen = zero
    live = -1  # start of the first block whose max is above -inf (see row_stats)
    # in place, and for the 16-bit loss alone, each block's exps go to ebuf (the L1 buffer)
    buffered = in_place if src16 is None else not keep
    plain = not cap > zero and not smooth
    for lo in range(0, n, STATS_BLOCK):
        hi = min(lo + STATS_BLOCK, n)
        if live < 0:  # the reference max from the first block above -inf (row_stats step 1)
            if src16 is not None:
                mb = first_max(x[lo:hi], src16[lo:hi], half)
            else:  # in place, read through the writable name
                mb = first_max(g[lo:hi] if in_place else x[lo:hi], None, 0)
            m, s, sm, live = raise_max(m, s, sm, seen, live, cap_max(mb, cap, inv_cap), lo, smooth)
            if live < 0:
                block_m[lo // STATS_BLOCK] = m
                if src16 is not None:  # kept, widened, for the fix-up after the loop
                    widen_row(src16[lo:hi], g[lo:hi], half)
                continue
        wb = w[lo:hi] if has_w else w
        gb = ebuf[: hi - lo] if buffered else g[lo:hi]
        if src16 is not None:
            if claim is not None:
                zero_block(claim[lo:hi])
            if plain:
                bs, bsm = block_exp_sum16(src16[lo:hi], gb, m, half), zero
            else:
                bs, bsm = block_store16(src16[lo:hi], gb, m, wb, smooth, half, cap)
            if bs >= big:  # row_stats step 3
                mb = cap_max(as_dtype_of(x, widen(max_bits16(src16[lo:hi]), half)), cap, inv_cap)
                m, s, sm, live = raise_max(m, s, sm, seen, live, mb, lo, smooth)
                bs, bsm = block_store16(src16[lo:hi], gb, m, wb, smooth, half, cap)
        else:
            xb = g[lo:hi] if in_place else x[lo:hi]
            if plain:
                bs, bsm = block_exp_sum(xb, gb, m, ebuf), zero
            else:
                bs, bsm = block_store(xb, gb, m, wb, smooth, cap, ebuf)
            if bs >= big:  # row_stats step 3
                mb = cap_max(row_max(xb), cap, inv_cap)
                m, s, sm, live = raise_max(m, s, sm, seen, live, mb, lo, smooth)
                bs, bsm = block_store(xb, gb, m, wb, smooth, cap, ebuf)
            if in_place:
                copy_block(gb, g[lo:hi])
        block_m[lo // STATS_BLOCK] = m
        s += bs
        sm += bsm
        if smooth:
            seen += as_dtype_of(x, np.sum(wb)) if has_w else as_dtype_of(x, hi - lo)
    if live != 0:  # leading all--inf blocks: stored against the final max, as exp(-inf - m) = 0
        head = n if live < 0 else live
        xh = g[:head] if in_place else x[:head]
        bs, bsm = block_store(xh, g[:head], m, w[:head] if has_w else w, smooth, cap, ebuf)
        s += bs
        sm += bsm
        block_m[: (head + STATS_BLOCK - 1) // STATS_BLOCK] = m
    return m, s, sm


@jit_serial
def block_factor(a, block_m, k, m):
    """``a`` for the entries of block ``k``, stored as exp(x - m_k): ``a exp(m_k - m)``."""
    mk = block_m[k]
    return a if mk == m else a * fast_exp(mk - m)


@jit_serial
def rescale_grad(g, a, b, w):
    """``g_j = a g_j - b w_j`` (``w_j = 1`` when ``w`` is empty): ``write_grad`` for a row
    that already holds ``exp(x_j - m)``."""
    if w.size > 0:
        for j in range(g.size):
            g[j] = a * g[j] - b * w[j]
    else:
        for j in range(g.size):
            g[j] = a * g[j] - b


@jit_poly
def rescale_narrow(g, out, a, b, w, half, not_nan):
    """``out_j = 16-bit(a g_j - b w_j)``: ``rescale_grad`` and ``narrow_row`` in one sweep.
    ``not_nan`` says that no value can be NaN, which spares bfloat16's NaN test (``xent_row``
    decides it once a block)."""
    has_w = w.size > 0
    # (np.float32 casts are no-ops: ``g`` is float32 scratch; they let float64 callers compile)
    if half == HALF_BF16 and not_nan and not has_w:
        for j in range(g.size):
            out[j] = f32_to_bf16_not_nan(np.float32(a * g[j] - b))
    elif half == HALF_BF16:
        for j in range(g.size):
            out[j] = f32_to_bf16(np.float32(a * g[j] - (b * w[j] if has_w else b)))
    else:
        for j in range(g.size):
            out[j] = f32_to_f16(np.float32(a * g[j] - (b * w[j] if has_w else b)))


@jit_serial
def narrow_value(v, half):
    """One float32 -> 16-bit bits."""
    return f32_to_bf16(np.float32(v)) if half == HALF_BF16 else f32_to_f16(np.float32(v))


@jit_serial
def pairwise_total(a):
    """The float64 sum of a 1-D array in one fixed order, the reduced loss's (``_backend_cpu``):
    blocks of 128 entries, each summed by 8 partial sums of every 8th entry, added in pairs,
    then the blocks' sums added in pairs, level by level. Pairwise summation's error (NumPy's
    scheme, its order not promised), the same bits for any thread count, and compiled: no
    floating-point warning from NumPy when losses of +inf and -inf give NaN (PyTorch gives it
    silently; with warnings as errors, NumPy's sum raised)."""
    n = a.size
    n_blocks = (n + 127) // 128
    sums = np.empty(max(n_blocks, 1), np.float64)
    sums[0] = 0.0
    for k in range(n_blocks):
        lo = k * 128
        hi = min(lo + 128, n)
        p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = 0.0
        j = lo
        while j + 8 <= hi:
            p0 += a[j]
            p1 += a[j + 1]
            p2 += a[j + 2]
            p3 += a[j + 3]
            p4 += a[j + 4]
            p5 += a[j + 5]
            p6 += a[j + 6]
            p7 += a[j + 7]
            j += 8
        total = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
        while j < hi:
            total += a[j]
            j += 1
        sums[k] = total
    m = n_blocks
    while m > 1:
        half = m // 2
        for k in range(half):
            sums[k] = sums[2 * k] + sums[2 * k + 1]
        if m % 2:
            sums[half] = sums[m - 1]
        m = half + m % 2
    return sums[0]


@jit_serial
def row_loss(x, m, s, sm, xt, wt, w_sum, eps, z):
    """``(loss, lse)`` of a row of ``x``'s dtype and length from its statistics (``row_stats``:
    reference max ``m``, ``s``, ``sm``), the target's (capped) logit ``xt`` and weight ``wt``,
    as ``xent_row`` derives it; lse - xc_t is taken as log s + (m - xc_t), so that a large
    common offset does not cancel."""
    zero = as_dtype_of(x, 0)
    one = as_dtype_of(x, 1)
    n = as_dtype_of(x, x.size)
    log_s = math.log(s)
    lse = m + log_s
    loss = (one - eps) * wt * (log_s + (m - xt))
    if eps > zero:
        loss += eps / n * (w_sum * log_s + sm)
    if z > zero:
        loss += z * wt * lse * lse
    return loss, lse


@jit_serial
def grad_factors(x, s, lse, wt, w_sum, eps, z, scale):
    """The factors ``(a, b)`` of a row's gradient ``g_j = a exp(xc_j - m) - b w_j`` (before the
    target's term and the cap's derivative; see ``xent_row``). p_j = exp(xc_j - m) / s rather
    than exp(xc_j - lse): xc_j - m is exact, while lse rounded at a large offset (1e4) would
    cost p_j 3 digits. The 1 / s goes into ``a``."""
    one = as_dtype_of(x, 1)
    n = as_dtype_of(x, x.size)
    c = (one - eps) * wt
    if eps > as_dtype_of(x, 0):  # W with smoothing only: without, 0 * W made a NaN or inf weight of
        c += eps * w_sum / n  # a class no row targets NaN everywhere (PyTorch reads w_t alone)
    a = scale * (c + as_dtype_of(x, 2) * z * wt * lse) / s
    b = scale * eps / n
    return a, b


@jit_serial
def target_term(x, xc_t, cap, inv_cap, scale, eps, w_t):
    """The target's own gradient term ``scale (1 - eps) w_t``, soft-capped rows' times the cap's
    derivative ``1 - (xc_t / cap)^2`` at the target's capped logit ``xc_t`` (see ``xent_row``),
    in the dtype of ``x``."""
    one = as_dtype_of(x, 1)
    d_t = one
    if cap > as_dtype_of(x, 0):
        r = xc_t * inv_cap
        d_t = one - r * r
    return scale * (one - eps) * w_t * d_t


@jit_serial
def xent_row(
    x, g, in_place, tgt, w, w_sum, cap, eps, z, scale, want_grad, block_m, ebuf, src16, narrow_to, half, claim=False
):
    """Loss (and gradient into ``g``) of one row whose target ``tgt`` is a valid class.

    With ``xc`` the (capped) logits, ``lse = logsumexp(xc)``, ``p = softmax(xc)``, weights
    ``w`` (all 1 without weights, ``W = sum_j w_j``) and ``V`` classes, PyTorch's loss with
    label smoothing ``eps`` plus PaLM's z-loss is

        loss = (1 - eps) w_t (lse - xc_t) + eps / V * sum_j w_j (lse - xc_j) + z w_t lse^2

    and since d lse / d xc_j = p_j, its gradient is

        dloss/dxc_j = p_j [(1 - eps) w_t + eps W / V + 2 z w_t lse] - eps w_j / V
                      - (1 - eps) w_t [j == t]

    times ``scale`` (grad_output, divided by the weight sum for 'mean'), times the soft-cap
    factor d xc / d x = 1 - (xc / cap)^2. ``g`` may be ``x`` itself (say so with
    ``in_place``): each entry is read before it is written, the target's entry up front.
    ``block_m`` and ``ebuf`` are scratch for ``row_stats_store`` (one entry per STATS_BLOCK
    logits; STATS_BLOCK entries when ``cap > 0``, else none).

    16-bit rows (bits in format ``half``): ``x`` and ``g`` are the same float32 scratch row,
    ``src16`` is the row to widen into it block by block (``row_stats_store``) or None, and
    ``narrow_to`` receives the gradient rounded to 16 bits; both are None for float rows.
    ``claim`` says that ``narrow_to`` is not ``src16`` (out of place): the pass zeroes it block
    by block ahead of the sweep (``row_stats_store``).
    """
    zero = as_dtype_of(x, 0)
    one = as_dtype_of(x, 1)
    capped = cap > zero
    inv_cap = one / cap if capped else zero
    # The target's logit, read after the pass over the row unless the pass overwrites it (in
    # place): at its start, the load missed the cache and stalled the pass behind it.
    xt = x[tgt] if in_place and src16 is None else zero
    # The sum sweep stores exp(xc_j - m_k) in g (times dxc_j/dx_j when soft-capped) and the
    # gradient sweep only rescales it: one exp (and tanh) per entry instead of two (they are
    # the cost on a CPU). Soft-capped rows with smoothing, whose gradient needs dxc_j/dx_j
    # apart, store the capped logits xc_j instead: one tanh and two exps. 16-bit and
    # soft-capped rows take that pass for the loss alone too (storing into an L1 buffer,
    # ``keep`` off), so that both calls sum in the same loop and give the same bits.
    store = want_grad or src16 is not None or capped
    smooth = eps > zero
    if store and claim and narrow_to is not None:
        m, s, sm = row_stats_store(x, g, in_place, w, smooth, cap, ebuf, block_m, src16, half, want_grad, narrow_to)
    elif store:
        m, s, sm = row_stats_store(x, g, in_place, w, smooth, cap, ebuf, block_m, src16, half, want_grad)
    else:
        m, s, sm = row_stats(x, cap, w, smooth, ebuf)  # float rows, the loss alone
    if src16 is not None:
        xt = as_dtype_of(x, widen(src16[tgt], half))
    elif not in_place:
        xt = x[tgt]
    if capped:
        xt = cap * fast_tanh(xt * inv_cap)
    has_w = w.size > 0
    wt = w[tgt] if has_w else one
    # 1. The loss.
    loss, lse = row_loss(x, m, s, sm, xt, wt, w_sum, eps, z)
    if not want_grad:
        return loss, lse
    # 2. The gradient, one sweep that writes each entry once (factors: ``grad_factors``).
    a, b = grad_factors(x, s, lse, wt, w_sum, eps, z, scale)
    # (A gradient always takes the storing pass, ``store`` above: g holds what it stored.)
    if capped and smooth:  # g holds the capped logits: one exp an entry, no tanh
        if narrow_to is not None:
            for lo in range(0, x.size, STATS_BLOCK):
                hi = min(lo + STATS_BLOCK, x.size)
                capped_narrow(g[lo:hi], narrow_to[lo:hi], m, a, b, w[lo:hi] if has_w else w, inv_cap, half)
            r = g[tgt] * inv_cap
            g_t = (a * fast_exp16(g[tgt] - m) - (b * w[tgt] if has_w else b)) * (one - r * r)
            narrow_to[tgt] = narrow_value(g_t - target_term(x, g[tgt], cap, inv_cap, scale, eps, wt), half)
            return loss, lse
        write_capped_grad(g, m, a, b, w, inv_cap)
    else:
        # g holds exp(x_j - m_k): block k is scaled by a exp(m_k - m). A 16-bit output is
        # rescaled and rounded in one sweep that reads the scratch and does not write it, so
        # its target entry is then redone from the scratch, rounded exactly as the float32
        # steps below would. A finite sum means every stored exp is in [0, e^EXP_CLAMP]: with
        # finite factors (and no weights, which may hold anything) no entry can be NaN.
        finite_row = s == s and math.isfinite(b)
        # w_j enters with smoothing only (b = 0 without): 0 * w_j would make a NaN or inf
        # weight of a class no kept row targets a NaN column, where PyTorch reads w_t alone
        has_wj = has_w and smooth
        for lo in range(0, x.size, STATS_BLOCK):
            hi = min(lo + STATS_BLOCK, x.size)
            a_k = block_factor(a, block_m, lo // STATS_BLOCK, m)
            wb = w[lo:hi] if has_wj else w[:0]
            if narrow_to is not None:
                not_nan = finite_row and math.isfinite(a_k)
                rescale_narrow(g[lo:hi], narrow_to[lo:hi], a_k, b, wb, half, not_nan)
            else:
                rescale_grad(g[lo:hi], a_k, b, wb)
        if narrow_to is not None:
            # (g_t holds the cap's derivative already; the target's term takes it from xt)
            g_t = block_factor(a, block_m, tgt // STATS_BLOCK, m) * g[tgt] - (b * w[tgt] if has_wj else b)
            narrow_to[tgt] = narrow_value(g_t - target_term(x, xt, cap, inv_cap, scale, eps, wt), half)
            return loss, lse
    # 3. The target's own term -(1 - eps) w_t, with its soft-cap factor.
    g[tgt] -= target_term(x, xt, cap, inv_cap, scale, eps, wt)
    return loss, lse


@jit_inline
def write_grad(x, g, m, a, b, w, cap):
    """``g_j = (a exp(xc_j - m) - b w_j) * dxc_j/dx_j``: the gradient sweep of a block that stored
    nothing in its pass (``_cpu_vocab.grad_row``; ``xent_row`` rescales what its pass stored).
    Inlined by Numba, as ``write_normalized``.
    """
    zero = as_dtype_of(x, 0)
    one = as_dtype_of(x, 1)
    capped = cap > zero
    inv_cap = one / cap if capped else zero
    has_w = w.size > 0
    for j in range(x.size):
        v = x[j]
        if capped:
            v = cap * fast_tanh(v * inv_cap)
        gj = a * fast_exp(v - m) - (b * w[j] if has_w else b)
        if capped:
            r = v * inv_cap
            gj *= one - r * r
        g[j] = gj


@jit_inline
def write_capped_grad(g, m, a, b, w, inv_cap):
    """``write_grad`` for a row whose pass stored the capped logits ``xc_j`` in ``g`` (soft-capping
    with smoothing): ``g_j = (a exp(xc_j - m) - b w_j) (1 - (xc_j / cap)^2)``, no tanh."""
    one = as_dtype_of(g, 1)
    has_w = w.size > 0
    for j in range(g.size):
        v = g[j]
        r = v * inv_cap
        g[j] = (a * fast_exp(v - m) - (b * w[j] if has_w else b)) * (one - r * r)


@jit_poly
def capped_narrow(g, out, m, a, b, w, inv_cap, half):
    """``write_capped_grad`` for 16-bit rows, rounded into ``out`` in the same sweep (as
    ``rescale_narrow``), with the 16-bit pass's exp."""
    one = np.float32(1)
    has_w = w.size > 0
    if half == HALF_BF16:
        for j in range(g.size):
            r = g[j] * inv_cap
            gj = (a * fast_exp16(g[j] - m) - (b * w[j] if has_w else b)) * (one - r * r)
            out[j] = f32_to_bf16(np.float32(gj))
    else:
        for j in range(g.size):
            r = g[j] * inv_cap
            gj = (a * fast_exp16(g[j] - m) - (b * w[j] if has_w else b)) * (one - r * r)
            out[j] = f32_to_f16(np.float32(gj))


@jit_serial
def scan_targets(t, n_cols, ignore_index):
    """``(first, kept)`` for int64 targets: the index of the first target outside [0, V) that
    is not ``ignore_index`` (-1 if none), and how many are not ``ignore_index`` (the mean's
    divisor without class weights). One loop for the range check of
    ``_checks.check_target_range`` (0.4 us for a few targets, where the NumPy expression it
    replaced took 5 us) and that count (NumPy's ``count_nonzero(t != ignore_index)``: 1.3 us)."""
    first = -1
    kept = 0
    for j in range(t.size):
        v = t[j]
        if v != ignore_index:
            kept += 1
            if first < 0 and (v < 0 or v >= n_cols):
                first = j
    return first, kept


@jit_serial
def skip_value(tgt, ignore_index, n_cols):
    """What an ignored row holds (0) and what a row with a target outside [0, V) holds (NaN:
    reachable only with validate=False, and never read out of bounds); -1 for a normal row."""
    if tgt == ignore_index:
        return 0.0
    if tgt < 0 or tgt >= n_cols:
        return np.nan
    return -1.0


@jit_serial
def widen_row(src, dst, half):
    """16-bit bits -> float32 row (vectorized bit arithmetic)."""
    if half == HALF_BF16:
        for j in range(src.size):
            dst[j] = bf16_to_f32(src[j])
    else:
        for j in range(src.size):
            dst[j] = f16_to_f32(src[j])


@jit_serial
def narrow_row(src, dst, half):
    """float32 row -> 16-bit bits, rounding to nearest even."""
    if half == HALF_BF16:
        for j in range(src.size):
            dst[j] = f32_to_bf16(np.float32(src[j]))
    else:
        for j in range(src.size):
            dst[j] = f32_to_f16(np.float32(src[j]))


@jit_serial
def xent_range(
    lo, hi, x, x_off, n_cols, targets, ignore_index, w, w_sum, cap, eps, z, scale, g, g_off, in_place, loss, lse
):
    """Cross-entropy of rows ``lo:hi`` of float32/float64 logits; the gradient too when
    ``scale`` (the per-row gradient factor) is not empty.

    ``w``, ``w_sum``, ``cap``, ``eps``, ``z``, ``scale``, ``loss`` and ``lse`` are in the
    logits' dtype. Ignored rows get loss 0, lse 0 and a zero gradient. ``in_place`` says that
    ``g`` and ``g_off`` address the same memory as ``x`` and ``x_off``.
    """
    want_grad = scale.size > 0
    block_m = np.empty((n_cols + STATS_BLOCK - 1) // STATS_BLOCK, x.dtype)
    ebuf = padded_ebuf(block_m)
    for i in range(lo, hi):
        xr = x[x_off[i] : x_off[i] + n_cols]
        gr = g[g_off[i] : g_off[i] + n_cols] if want_grad else g[:0]
        fill = skip_value(targets[i], ignore_index, n_cols)
        if fill != -1.0:  # an ignored row (0) or a bad target (NaN)
            loss[i] = fill
            lse[i] = fill
            if want_grad:
                gr[:] = fill
            continue
        row_scale = scale[i] if want_grad else as_dtype_of(loss, 0)
        loss[i], lse[i] = xent_row(
            xr, gr, in_place, targets[i], w, w_sum, cap, eps, z, row_scale, want_grad, block_m, ebuf, None, None, 0
        )


# The 16-bit gradient's float32 scratch row is read back while the 16-bit gradient streams
# out. A scratch row that fits in L2 (32000 entries: 128 KB) but is partly evicted by that
# stream comes back with misses the prefetcher does not cover; a ring of windows at least
# twice the size of L2 makes it a plain sequential stream instead (measured on this
# project's VM, 1 MB of L2 per core, bfloat16 2048x32000: the rescale-and-round sweep alone
# 10.7 -> 7.3 ms on one thread; the fused call 16.6 -> 13.6 ms in place and 22.1 -> 17.5 ms
# out of place on two, docs/cpu.md).
SCRATCH_RING_BYTES = 2 << 20

# Out of place, the fused 16-bit pass can zero each block of the output row as it goes (the
# "claim", ``row_stats_store``), so that the sweep finds its lines in cache. Whether that pays
# depends on the host, and only measurement told (two threads, in-process A/B, same bits):
# - a Zen 4 host with 1 MB of L2 a core: 1.06-1.22x faster for rows whose float32 scratch and
#   16-bit output (6 bytes an entry) fit in 3/4 of L2 (up to 128256 entries, 770 KB), and
#   0.85-1.00x at 256000 (1.5 MB), whose zeroed lines left L2 before the sweep;
# - a Zen 3 host with 512 KB of L2 a core: 0.84-0.91x at every row length from 32000 to
#   128256, bfloat16 and float16, one thread and two (2026-11-27).
# So rows are claimed where L2 is at least CLAIM_MIN_L2 and the row takes at most
# CLAIM_L2_SHARE of it; where the L2 size is unknown, it is taken to be 1 MB (the rule of the
# first host, where the claim was measured first).
CLAIM_MIN_L2 = 1 << 20
CLAIM_L2_SHARE = 0.75
ASSUMED_L2 = 1 << 20


def cache_size_bytes(text: str) -> int | None:
    """A cache size as Linux sysfs writes it (``512K``, ``1M``, ``1048576``) in bytes; None for
    anything else."""
    text = text.strip()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    return int(digits) * scale if digits.isdigit() else None


@functools.cache
def l2_cache_bytes() -> int | None:
    """The level-2 cache of one core, in bytes, as Linux reports it for CPU 0; None elsewhere."""
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{index}/level") as f:
                level = f.read().strip()
            with open(f"{index}/type") as f:
                kind = f.read().strip()
            with open(f"{index}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data"):
            return cache_size_bytes(size)
    return None


def claims_output(n_cols: int, l2: int | None = None) -> bool:
    """Whether the out-of-place 16-bit pass should claim output rows of ``n_cols`` entries on a
    host with ``l2`` bytes of L2 a core (this host's by default); see CLAIM_MIN_L2."""
    if l2 is None:
        l2 = l2_cache_bytes() or ASSUMED_L2
    return l2 >= CLAIM_MIN_L2 and 6 * n_cols <= CLAIM_L2_SHARE * l2


def scratch_ring(n_cols: int) -> int:
    """Rows of float32 scratch in the ring: enough for ``SCRATCH_RING_BYTES``, at least 1."""
    return max(1, SCRATCH_RING_BYTES // (4 * max(n_cols, 1)))


@jit_serial
def xent_range_16(
    lo,
    hi,
    x,
    x_off,
    n_cols,
    targets,
    ignore_index,
    w,
    w_sum,
    cap,
    eps,
    z,
    scale,
    g,
    g_off,
    half,
    ring,
    in_place,
    claim,
    loss,
    lse,
):
    """``xent_range`` for 16-bit logits given as uint16 bits (``half`` says which format),
    accumulating in float32 in a scratch row: the fused path widens each block into it as
    it goes and narrows the gradient straight into ``g`` (``xent_row``); the others widen the
    row first.

    The scratch row is a window that moves through a ring of ``ring`` rows (row ``i`` uses
    window ``i % ring``); see ``scratch_ring``. ``in_place`` says that ``g`` is ``x``; out of
    place, ``claim`` says that the fused pass claims each output block ahead of the sweep
    (``row_stats_store``; the caller decides by ``claims_output``).
    """
    want_grad = scale.size > 0
    claim = claim and not in_place
    ring = max(1, min(ring, hi - lo)) if want_grad else 1  # the loss alone reads no scratch back
    ring_buf = np.empty(ring * n_cols, dtype=np.float32)
    block_m = np.empty((n_cols + STATS_BLOCK - 1) // STATS_BLOCK, np.float32)
    ebuf = padded_ebuf(block_m)
    for i in range(lo, hi):
        r0 = ((i - lo) % ring) * n_cols
        scratch = ring_buf[r0 : r0 + n_cols]
        fill = skip_value(targets[i], ignore_index, n_cols)
        if fill != -1.0:  # an ignored row (0) or a bad target (NaN)
            loss[i] = fill
            lse[i] = fill
            if want_grad:
                scratch[:] = fill
                narrow_row(scratch, g[g_off[i] : g_off[i] + n_cols], half)
            continue
        xr = x[x_off[i] : x_off[i] + n_cols]
        tgt = targets[i]
        if not want_grad:  # the loss: blocks widened as the one pass reaches them
            no_scale = as_dtype_of(loss, 0)
            loss[i], lse[i] = xent_row(
                scratch, scratch, True, tgt, w, w_sum, cap, eps, z, no_scale, False, block_m, ebuf, xr, None, half
            )
            continue
        gr = g[g_off[i] : g_off[i] + n_cols]  # fused: the bits widened block by block as the pass reads them
        loss[i], lse[i] = xent_row(
            scratch, scratch, True, tgt, w, w_sum, cap, eps, z, scale[i], True, block_m, ebuf, xr, gr, half, claim
        )


# The parallel kernels split rows 0..n_rows into ``tasks`` contiguous ranges (a few per
# thread, chosen by the caller) and run one ``*_range`` function on each. Each row is done by
# one thread start to end, so results do not depend on the split; small inputs skip these and
# call the ``*_range`` function directly, without waking threads.


@jit_kernel
def xent_rows(tasks, n_rows, *args):
    """``xent_range(lo, hi, *args)`` over all rows, in parallel."""
    per_task = (n_rows + tasks - 1) // max(tasks, 1)
    for task in numba.prange(tasks):
        xent_range(task * per_task, min(n_rows, (task + 1) * per_task), *args)


@jit_kernel
def xent_rows_16(tasks, n_rows, *args):
    """``xent_range_16(lo, hi, *args)`` over all rows, in parallel."""
    per_task = (n_rows + tasks - 1) // max(tasks, 1)
    for task in numba.prange(tasks):
        xent_range_16(task * per_task, min(n_rows, (task + 1) * per_task), *args)


@jit_inline
def write_normalized(x, out, m, s, mode):
    """Softmax ``exp(x - m) / s`` or log-softmax ``(x - m) - log s`` of a row into ``out``:
    relative to ``m`` (exact differences), not to the rounded lse.

    Inlined by Numba, so that the in-place call (``out`` passed as both) compiles to a loop
    over one pointer that LLVM vectorizes; with two pointers that may alias, it would add a
    run-time overlap check and take a scalar loop whenever they do."""
    if mode == MODE_SOFTMAX:
        inv_s = as_dtype_of(x, 1) / s
        for j in range(x.size):
            out[j] = fast_exp(x[j] - m) * inv_s
    elif mode == MODE_LOG_SOFTMAX:
        log_s = math.log(s)
        for j in range(x.size):
            out[j] = (x[j] - m) - log_s


@jit_serial
def normalize_row(x, out, in_place, mode, ebuf):
    """lse of one row; with ``mode`` also its softmax or log-softmax written to ``out``
    (``ebuf``: ``padded_ebuf``'s scratch, for ``row_stats``).

    The lse is ``row_lse``'s; the softmax of a row of all ``-inf`` or holding ``+inf`` is NaN,
    as ``torch.softmax`` gives.
    """
    m, s, _ = row_stats(x, as_dtype_of(x, 0), x[:0], False, ebuf)
    lse = row_lse(x, m, s)  # before an in-place write
    if in_place:
        write_normalized(out, out, m, s, mode)  # out is x: read through the writable name
    else:
        write_normalized(x, out, m, s, mode)
    return lse


@jit_serial
def row_lse(x, m, s):
    """A row's lse from its max ``m`` (or a reference max, when finite) and ``s``, as
    ``torch.logsumexp`` gives it: NaN for a row holding a NaN, ``m`` where that is infinite (a
    row of all ``-inf``: ``-inf``; one holding ``+inf``: ``+inf``), else ``m + log s``. Only an
    infinite ``m`` takes a look for NaN (a row max may skip a NaN: ``_jit.row_max``)."""
    if not math.isinf(m):
        return m + math.log(s)
    for j in range(x.size):
        if x[j] != x[j]:
            return as_dtype_of(x, np.nan)
    return m


@jit_serial
def normalize_range(lo, hi, x, x_off, n_cols, mode, out, out_off, in_place, lse):
    """lse of rows ``lo:hi`` into ``lse``; for MODE_SOFTMAX / MODE_LOG_SOFTMAX also rows of
    ``out`` (``in_place``: ``out`` is ``x``)."""
    ebuf = padded_ebuf(x)
    for i in range(lo, hi):
        xr = x[x_off[i] : x_off[i] + n_cols]
        outr = out[out_off[i] : out_off[i] + n_cols] if mode != MODE_LSE else out[:0]
        lse[i] = normalize_row(xr, outr, in_place, mode, ebuf)


@jit_serial
def normalize_range_16(lo, hi, x, x_off, n_cols, mode, out, out_off, half, lse):
    """``normalize_range`` for 16-bit logits given as uint16 bits, through a float32 scratch row."""
    scratch = np.empty(n_cols, dtype=np.float32)
    ebuf = padded_ebuf(scratch)
    for i in range(lo, hi):
        widen_row(x[x_off[i] : x_off[i] + n_cols], scratch, half)
        lse[i] = normalize_row(scratch, scratch, True, mode, ebuf)
        if mode != MODE_LSE:
            narrow_row(scratch, out[out_off[i] : out_off[i] + n_cols], half)


@jit_kernel
def normalize_rows(tasks, n_rows, *args):
    """``normalize_range(lo, hi, *args)`` over all rows, in parallel."""
    per_task = (n_rows + tasks - 1) // max(tasks, 1)
    for task in numba.prange(tasks):
        normalize_range(task * per_task, min(n_rows, (task + 1) * per_task), *args)


@jit_kernel
def normalize_rows_16(tasks, n_rows, *args):
    """``normalize_range_16(lo, hi, *args)`` over all rows, in parallel."""
    per_task = (n_rows + tasks - 1) // max(tasks, 1)
    for task in numba.prange(tasks):
        normalize_range_16(task * per_task, min(n_rows, (task + 1) * per_task), *args)
