"""Numba CPU kernels for calls with fewer rows than threads: each row's vocabulary is split
among threads, and the results are bitwise those of the one-thread-a-row kernels of ``_cpu``
(``xent_range``, ``xent_range_16``, ``normalize_range``, ``normalize_range_16``), whether
each was compiled in the process or loaded from the cache (docs/cpu.md item 6).

``_cpu.row_stats`` sums a row block by block against one reference max ``m0`` (taken from
the row's first logits) and raises it only where a block's sum reaches ``RESUM_AT``; where
no block does, every block's sums depend on that block and ``m0`` alone, and the row's sums
are those block sums added in block order. So:

1. every thread takes a range of blocks of a row and computes their sums (``block_store``,
   or ``block_store16`` for 16-bit bits: the loop of the one-thread pass, storing the exps
   where the gradient, or the row's float32 scratch, goes);
2. per row, the block sums are added in block order, which gives the one-thread pass's ``s``
   and ``sm`` to the bit, then its loss and gradient factors. A row where a block reached
   ``RESUM_AT``, or whose first block gives no finite reference max (masked leading
   vocabulary, NaN, +inf), is done again on one thread by the one-thread row function;
3. every thread rescales its blocks into the gradient (or the softmax into ``out``) and,
   where it holds the target, adds the target's term.

Float logits in place are not split (``_backend_cpu``): a block's exps overwrite its logits as
soon as they are summed, and step 2's fall-back could not read them again. 16-bit logits are,
in place too: their exps go to the scratch, and the bits are written only in step 3. The
normalizations store nothing in step 1, so they are split in place too.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._cpu import (
    MODE_LSE,
    RESUM_AT,
    STATS_BLOCK,
    block_exp_sum,
    block_exp_sum16,
    block_store,
    block_store16,
    cap_max,
    capped_narrow,
    first_max,
    grad_factors,
    narrow_row,
    narrow_value,
    normalize_row,
    padded_ebuf,
    rescale_grad,
    rescale_narrow,
    row_loss,
    skip_value,
    target_term,
    widen_row,
    write_capped_grad,
    write_normalized,
    xent_row,
    zero_block,
)
from ._jit import as_dtype_of, fast_exp16, fast_tanh, jit_kernel, jit_serial, widen


@jit_serial
def task_blocks(task, parts, n_blocks):
    """Task ``task``'s row ``i`` and blocks ``k0:k1``: ``parts`` tasks a row, each a contiguous
    range of its blocks (empty where there are more parts than blocks)."""
    per_part = (n_blocks + parts - 1) // parts
    part = task % parts
    return task // parts, part * per_part, min(n_blocks, (part + 1) * per_part)


@jit_serial
def block_span(k, n_cols):
    """Columns ``lo:hi`` of block ``k`` of a row of ``n_cols``."""
    return k * STATS_BLOCK, min((k + 1) * STATS_BLOCK, n_cols)


@jit_serial
def one_thread(m0, bs, big):
    """Whether a row goes back to one thread (step 2 of ``xent_split``): it has no finite
    reference max, or a block reached ``big`` (RESUM_AT), where the one-thread pass would have
    raised its max and summed that block again."""
    return not math.isfinite(m0) or np.any(bs >= big)


@jit_serial
def merged_row(like, bs, bsm, m0, v, cap, inv_cap, wt, w_sum, eps, z, scale, want_grad):
    """Step 2 of ``xent_split`` and ``xent_split_16`` for one split row: its block sums ``bs``
    and ``bsm`` added in block order (the one-thread pass's ``s`` and ``sm`` to the bit), its
    target's capped logit from the raw one ``v``, its loss and lse, and with ``want_grad`` its
    gradient factors. Returns ``(s, xt, loss, lse, a, b)`` in the dtype of ``like``."""
    zero = as_dtype_of(like, 0)
    s = zero
    sm = zero
    for k in range(bs.size):
        s += bs[k]
        sm += bsm[k]
    xt = cap * fast_tanh(v * inv_cap) if cap > zero else v
    loss, lse = row_loss(like, m0, s, sm, xt, wt, w_sum, eps, z)
    a, b = grad_factors(like, s, lse, wt, w_sum, eps, z, scale) if want_grad else (zero, zero)
    return s, xt, loss, lse, a, b


@jit_kernel
def xent_split(parts, x, x_off, n_cols, targets, ignore_index, w, w_sum, cap, eps, z, scale, g, g_off, loss, lse):
    """``_cpu.xent_range(0, n_rows, ...)`` (same arguments, out of place) with each row's
    blocks in ``parts`` contiguous ranges, one task each, over all threads."""
    zero = as_dtype_of(x, 0)
    one = as_dtype_of(x, 1)
    capped = cap > zero
    inv_cap = one / cap if capped else zero
    smooth = eps > zero
    plain = not capped and not smooth
    has_w = w.size > 0
    want_grad = scale.size > 0
    big = as_dtype_of(x, RESUM_AT)
    n_rows = targets.size
    n_blocks = (n_cols + STATS_BLOCK - 1) // STATS_BLOCK
    # 0. Each row's reference max, as ``row_stats`` takes it from the row's first block; a row
    #    without a finite one, and an ignored row, is left to step 2.
    m0 = np.empty(n_rows, x.dtype)
    split = np.empty(n_rows, np.bool_)  # left to step 3: not ignored, not done on one thread
    for i in range(n_rows):
        xr = x[x_off[i] : x_off[i] + n_cols]
        m0[i] = cap_max(first_max(xr[: min(STATS_BLOCK, n_cols)], None, 0), cap, inv_cap)
        split[i] = skip_value(targets[i], ignore_index, n_cols) == -1.0
    # 1. The block sums, every block against its row's m0 (``row_stats`` step 2).
    bs = np.zeros((n_rows, n_blocks), x.dtype)
    bsm = np.zeros((n_rows, n_blocks), x.dtype)
    for task in numba.prange(n_rows * parts):
        i, k0, k1 = task_blocks(task, parts, n_blocks)
        if not split[i] or not math.isfinite(m0[i]):
            continue
        ebuf = padded_ebuf(x)
        xr = x[x_off[i] : x_off[i] + n_cols]
        gr = g[g_off[i] : g_off[i] + n_cols] if want_grad else ebuf[:0]
        for k in range(k0, k1):
            lo, hi = block_span(k, n_cols)
            if plain:  # (bsm stays 0)
                bs[i, k] = block_exp_sum(xr[lo:hi], gr[lo:hi] if want_grad else ebuf[: hi - lo], m0[i], ebuf)
                continue
            gb = gr[lo:hi] if want_grad else gr
            bs[i, k], bsm[i, k] = block_store(xr[lo:hi], gb, m0[i], w[lo:hi] if has_w else w, smooth, cap, ebuf)
    # 2. Per row: its sums in block order, its loss and gradient factors; or the whole row on
    #    one thread where the one-thread pass would have raised its reference max. (A serial
    #    loop: a few rows of little work, not worth waking the threads once more.)
    a = np.empty(n_rows, x.dtype)
    b = np.empty(n_rows, x.dtype)
    xt = np.empty(n_rows, x.dtype)
    for i in range(n_rows):
        tgt = targets[i]
        fill = skip_value(tgt, ignore_index, n_cols)
        if fill != -1.0:  # an ignored row (0) or a bad target (NaN)
            loss[i] = fill
            lse[i] = fill
            if want_grad:
                g[g_off[i] : g_off[i] + n_cols] = fill
            continue
        xr = x[x_off[i] : x_off[i] + n_cols]
        row_scale = scale[i] if want_grad else zero
        if one_thread(m0[i], bs[i], big):
            split[i] = False
            block_m = np.empty(n_blocks, x.dtype)
            gr = g[g_off[i] : g_off[i] + n_cols] if want_grad else g[:0]
            loss[i], lse[i] = xent_row(
                xr, gr, False, tgt, w, w_sum, cap, eps, z, row_scale, want_grad, block_m, padded_ebuf(x), None, None, 0
            )
            continue
        wt = w[tgt] if has_w else one
        _, xt[i], loss[i], lse[i], a[i], b[i] = merged_row(
            xr, bs[i], bsm[i], m0[i], xr[tgt], cap, inv_cap, wt, w_sum, eps, z, row_scale, want_grad
        )
    if not want_grad:
        return
    # 3. The gradient sweep of ``xent_row`` over each task's blocks (every block was summed
    #    against m0, so none is rescaled), then the target's own term where it lies.
    for task in numba.prange(n_rows * parts):
        i, k0, k1 = task_blocks(task, parts, n_blocks)
        if not split[i]:
            continue
        gr = g[g_off[i] : g_off[i] + n_cols]
        for k in range(k0, k1):
            lo, hi = block_span(k, n_cols)
            wb = w[lo:hi] if has_w and smooth else w[:0]  # w_j with smoothing only (``_cpu.xent_row``)
            if capped and smooth:  # g holds the capped logits (``block_store``)
                write_capped_grad(gr[lo:hi], m0[i], a[i], b[i], wb, inv_cap)
            else:
                rescale_grad(gr[lo:hi], a[i], b[i], wb)
        tgt = targets[i]
        if k0 * STATS_BLOCK <= tgt < min(k1 * STATS_BLOCK, n_cols):
            wt = w[tgt] if has_w else one
            gr[tgt] -= target_term(x, xt[i], cap, inv_cap, scale[i], eps, wt)


@jit_kernel
def normalize_split(parts, x, x_off, n_cols, mode, out, out_off, in_place, lse):
    """``_cpu.normalize_range(0, n_rows, ...)`` (same arguments) with each row's blocks in
    ``parts`` ranges over all threads: steps 1 and 2 of ``xent_split`` give the lse, and the
    softmax or log-softmax is written block by block. In place too: the sums store nothing."""
    big = as_dtype_of(x, RESUM_AT)
    n_rows = lse.size
    n_blocks = (n_cols + STATS_BLOCK - 1) // STATS_BLOCK
    m0 = np.empty(n_rows, x.dtype)
    for i in range(n_rows):
        m0[i] = first_max(x[x_off[i] : x_off[i] + min(STATS_BLOCK, n_cols)], None, 0)
    bs = np.zeros((n_rows, n_blocks), x.dtype)
    for task in numba.prange(n_rows * parts):
        i, k0, k1 = task_blocks(task, parts, n_blocks)
        if not math.isfinite(m0[i]):
            continue
        ebuf = padded_ebuf(x)
        xr = x[x_off[i] : x_off[i] + n_cols]
        for k in range(k0, k1):
            lo, hi = block_span(k, n_cols)
            bs[i, k] = block_exp_sum(xr[lo:hi], ebuf[: hi - lo], m0[i], ebuf)
    s = np.zeros(n_rows, x.dtype)
    split = np.ones(n_rows, np.bool_)
    for i in range(n_rows):
        if one_thread(m0[i], bs[i], big):  # as in memory
            split[i] = False
            outr = out[out_off[i] : out_off[i] + n_cols] if mode != MODE_LSE else out[:0]
            lse[i] = normalize_row(x[x_off[i] : x_off[i] + n_cols], outr, in_place, mode, padded_ebuf(x))
            continue
        for k in range(n_blocks):
            s[i] += bs[i, k]
        lse[i] = m0[i] + math.log(s[i])  # m0 is finite
    if mode == MODE_LSE:
        return
    for task in numba.prange(n_rows * parts):
        i, k0, k1 = task_blocks(task, parts, n_blocks)
        if not split[i]:
            continue
        lo, hi = k0 * STATS_BLOCK, min(k1 * STATS_BLOCK, n_cols)
        if lo >= hi:
            continue
        outb = out[out_off[i] + lo : out_off[i] + hi]
        if in_place:
            write_normalized(outb, outb, m0[i], s[i], mode)  # out is x: read through the writable name
        else:
            write_normalized(x[x_off[i] + lo : x_off[i] + hi], outb, m0[i], s[i], mode)


@jit_kernel
def xent_split_16(
    parts, x, x_off, n_cols, targets, ignore_index, w, w_sum, cap, eps, z, scale, g, g_off, half, claim, loss, lse
):
    """``_cpu.xent_range_16`` (same arguments; a float32 scratch row per row instead of the
    ring) with each row's blocks in ``parts`` ranges over all threads, as ``xent_split``: the
    pass widens each block's bits and stores its exps in the row's scratch (the loss alone:
    in each task's L1 buffer), the sweep rescales and rounds them into ``g``. In place too:
    the bits are read by the pass and the fall-back, and written only by the sweep."""
    zero = np.float32(0)
    one = np.float32(1)
    capped = cap > zero
    inv_cap = one / cap if capped else zero
    smooth = eps > zero
    plain = not capped and not smooth
    has_w = w.size > 0
    want_grad = scale.size > 0
    claim = claim and want_grad
    big = np.float32(RESUM_AT)
    n_rows = targets.size
    n_blocks = (n_cols + STATS_BLOCK - 1) // STATS_BLOCK
    scratch = np.empty((n_rows, n_cols), np.float32)
    m0 = np.empty(n_rows, np.float32)
    split = np.empty(n_rows, np.bool_)  # left to step 3: not ignored, not done on one thread
    for i in range(n_rows):
        head = x[x_off[i] : x_off[i] + min(STATS_BLOCK, n_cols)]
        m0[i] = cap_max(first_max(scratch[i, :0], head, half), cap, inv_cap)
        split[i] = skip_value(targets[i], ignore_index, n_cols) == -1.0
    bs = np.zeros((n_rows, n_blocks), np.float32)
    bsm = np.zeros((n_rows, n_blocks), np.float32)
    for task in numba.prange(n_rows * parts):
        i, k0, k1 = task_blocks(task, parts, n_blocks)
        if not split[i] or not math.isfinite(m0[i]):
            continue
        ebuf = padded_ebuf(scratch)
        xr = x[x_off[i] : x_off[i] + n_cols]
        for k in range(k0, k1):
            lo, hi = block_span(k, n_cols)
            if claim:
                zero_block(g[g_off[i] + lo : g_off[i] + hi])
            gb = scratch[i, lo:hi] if want_grad else ebuf[: hi - lo]
            if plain:  # (bsm stays 0)
                bs[i, k] = block_exp_sum16(xr[lo:hi], gb, m0[i], half)
            else:
                bs[i, k], bsm[i, k] = block_store16(xr[lo:hi], gb, m0[i], w[lo:hi] if has_w else w, smooth, half, cap)
    a = np.empty(n_rows, np.float32)
    b = np.empty(n_rows, np.float32)
    s = np.empty(n_rows, np.float32)
    xt = np.empty(n_rows, np.float32)
    for i in range(n_rows):
        tgt = targets[i]
        fill = skip_value(tgt, ignore_index, n_cols)
        if fill != -1.0:  # an ignored row (0) or a bad target (NaN)
            loss[i] = fill
            lse[i] = fill
            if want_grad:
                scratch[i] = fill
                narrow_row(scratch[i], g[g_off[i] : g_off[i] + n_cols], half)
            continue
        xr = x[x_off[i] : x_off[i] + n_cols]
        if one_thread(m0[i], bs[i], big):
            split[i] = False
            block_m = np.empty(n_blocks, np.float32)
            ebuf = padded_ebuf(scratch)
            if want_grad:
                gr = g[g_off[i] : g_off[i] + n_cols]
                loss[i], lse[i] = xent_row(
                    scratch[i], scratch[i], True, tgt, w, w_sum, cap, eps, z, scale[i], True, block_m, ebuf, xr, gr,
                    half, claim,
                )  # fmt: skip
            else:
                loss[i], lse[i] = xent_row(
                    scratch[i], scratch[i], True, tgt, w, w_sum, cap, eps, z, zero, False, block_m, ebuf, xr, None,
                    half,
                )  # fmt: skip
            continue
        wt = w[tgt] if has_w else one
        row_scale = scale[i] if want_grad else zero
        s[i], xt[i], loss[i], lse[i], a[i], b[i] = merged_row(
            scratch[i], bs[i], bsm[i], m0[i], np.float32(widen(xr[tgt], half)), cap, inv_cap, wt, w_sum, eps, z,
            row_scale, want_grad,
        )  # fmt: skip
    if not want_grad:
        return
    # The sweep of ``xent_row`` for 16-bit rows: rescale and round each block, then redo the
    # target's entry from the scratch, as it rounds it.
    for task in numba.prange(n_rows * parts):
        i, k0, k1 = task_blocks(task, parts, n_blocks)
        if not split[i]:
            continue
        gr = g[g_off[i] : g_off[i] + n_cols]
        sr = scratch[i]
        finite_row = s[i] == s[i] and math.isfinite(b[i])
        not_nan = finite_row and math.isfinite(a[i])
        for k in range(k0, k1):
            lo, hi = block_span(k, n_cols)
            wb = w[lo:hi] if has_w and smooth else w[:0]  # w_j with smoothing only (``_cpu.xent_row``)
            if capped and smooth:  # the scratch holds the capped logits
                capped_narrow(sr[lo:hi], gr[lo:hi], m0[i], a[i], b[i], wb, inv_cap, half)
            else:
                rescale_narrow(sr[lo:hi], gr[lo:hi], a[i], b[i], wb, half, not_nan)
        tgt = targets[i]
        if k0 * STATS_BLOCK <= tgt < min(k1 * STATS_BLOCK, n_cols):
            wt = w[tgt] if has_w else one
            b_t = b[i] * w[tgt] if has_w and smooth else b[i]
            if capped and smooth:  # the scratch holds the capped logits (as in ``xent_row``)
                r = sr[tgt] * inv_cap
                g_t = (a[i] * fast_exp16(sr[tgt] - m0[i]) - b_t) * (one - r * r)
                term = target_term(sr, sr[tgt], cap, inv_cap, scale[i], eps, wt)
            else:
                g_t = a[i] * sr[tgt] - b_t
                term = target_term(sr, xt[i], cap, inv_cap, scale[i], eps, wt)
            gr[tgt] = narrow_value(g_t - term, half)


@jit_kernel
def normalize_split_16(parts, x, x_off, n_cols, mode, out, out_off, half, lse):
    """``_cpu.normalize_range_16(0, n_rows, ...)`` (same arguments) as ``normalize_split``: each
    task widens its blocks into the row's float32 scratch and sums them, and rescales and
    rounds them into ``out`` at the end (in place too: the bits are read before any is
    written)."""
    big = np.float32(RESUM_AT)
    n_rows = lse.size
    n_blocks = (n_cols + STATS_BLOCK - 1) // STATS_BLOCK
    scratch = np.empty((n_rows, n_cols), np.float32)
    m0 = np.empty(n_rows, np.float32)
    for i in range(n_rows):  # the reference max of the widened first block, as row_stats takes it
        head = min(STATS_BLOCK, n_cols)
        sr = scratch[i]
        widen_row(x[x_off[i] : x_off[i] + head], sr[:head], half)
        m0[i] = first_max(sr[:head], None, 0)
    bs = np.zeros((n_rows, n_blocks), np.float32)
    for task in numba.prange(n_rows * parts):
        i, k0, k1 = task_blocks(task, parts, n_blocks)
        ebuf = padded_ebuf(scratch)
        for k in range(k0, k1):
            lo, hi = block_span(k, n_cols)
            sb = scratch[i][lo:hi]
            widen_row(x[x_off[i] + lo : x_off[i] + hi], sb, half)
            if math.isfinite(m0[i]):
                bs[i, k] = block_exp_sum(sb, ebuf[: hi - lo], m0[i], ebuf)
    s = np.zeros(n_rows, np.float32)
    split = np.ones(n_rows, np.bool_)
    for i in range(n_rows):
        if one_thread(m0[i], bs[i], big):  # as in memory
            split[i] = False
            lse[i] = normalize_row(scratch[i], scratch[i], True, mode, padded_ebuf(scratch))
            if mode != MODE_LSE:
                narrow_row(scratch[i], out[out_off[i] : out_off[i] + n_cols], half)
            continue
        for k in range(n_blocks):
            s[i] += bs[i, k]
        lse[i] = m0[i] + math.log(s[i])  # m0 is finite
    if mode == MODE_LSE:
        return
    for task in numba.prange(n_rows * parts):
        i, k0, k1 = task_blocks(task, parts, n_blocks)
        lo, hi = k0 * STATS_BLOCK, min(k1 * STATS_BLOCK, n_cols)
        if not split[i] or lo >= hi:
            continue
        sb = scratch[i][lo:hi]
        write_normalized(sb, sb, m0[i], s[i], mode)  # the scratch in place, as in memory
        narrow_row(sb, out[out_off[i] + lo : out_off[i] + hi], half)
