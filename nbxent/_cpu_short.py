"""Numba CPU kernels for short rows: cross-entropy, logsumexp, softmax and log-softmax of rows
of at most SHORT_COLS logits.

``_cpu.xent_range`` reads a row in blocks of STATS_BLOCK logits, through a dozen row and
block functions that keep a long row in one pass over memory. A row of 10 logits paid all of
that for a few entries: 167 ns a row on one thread, where a bare jitted loop that takes the
max, the sum of exps and the log took 24 ns (65536 x 10 float32, the Zen 3 VM; docs/cpu.md
"Many rows of few logits"). A short row is in L1 anyway, so here it takes plain sweeps
instead, with no block logic:

1. the (widened, soft-capped) logits ``xc`` into an L1 scratch row, and their max ``m``: the
   true max, so no exp can overflow and no block is summed again;
2. ``e_j = exp(xc_j - m)`` into a second scratch row, summed in the same loop, and the
   smoothing sum ``sum_j w_j (m - xc_j)``;
3. the loss and, for the fused call, the gradient ``(a e_j - b w_j) dxc_j/dx_j`` (the factors
   and the derivation are ``_cpu.xent_row``'s), the target's term after, written out
   (rounded to 16 bits for 16-bit logits): one row at a time straight from the exps into
   the output, a group at a time over the exps and then moved out.

Two layouts of the same steps:

- ``xent_short_range`` and ``normalize_short_range``, rows of up to SHORT_COLS: one row at
  a time, each sweep a vector loop along the row;
- ``xent_tiny_range`` and ``normalize_tiny_range``, rows of up to TINY_COLS (the short range
  functions call them, told by ``tiny``): a group of rows at a time, transposed, so that
  SIMD lanes hold rows and each sweep is a loop over the group for one entry. A row of 10
  float32 logits fills no vector of 8 x 4 that LLVM's loops take, so along the row every
  exp was scalar; across rows all are vectors (2.6x faster on one thread).

Rows are read and written through their offsets, never as slices: a slice takes a reference
to its array, an atomic add on a counter that every thread shares. The offsets are unsigned:
a signed index is wrapped around when negative, and that select kept LLVM from vectorizing
the loop (a row of 1000 copied 6.6x slower).

The loss alone and the fused call run the same steps 1 and 2 (the exps are stored either
way), and each row is copied to the scratch before its gradient is written, so the loss has
the same bits alone, fused, in place or not. The scratch rows are allocated ``padded_ebuf``'s
way, so LLVM's run-time overlap check of the exp loop always passes and its vector order is
the one order. The tiny kernels take each row's max and sums entry by entry in order, in
every lane, so a row's bits do not depend on its group or lane. Which kernel a call takes
depends on V alone (``_backend_cpu``), so calls that differ only in rows, threads or the
gradient give the same bits. Short rows never reach ``_cpu_split`` (a split row has at least
two blocks of STATS_BLOCK).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.core import types

from ._cpu import (
    FAR_BYTES,
    MODE_LOG_SOFTMAX,
    MODE_LSE,
    MODE_SOFTMAX,
    grad_factors,
    narrow_value,
    row_loss,
    row_lse,
    skip_value,
    smoothing_sum,
    target_term,
)
from ._jit import (
    as_dtype_of,
    fast_exp,
    fast_tanh,
    jit_inline,
    jit_kernel,
    jit_reduce,
    jit_serial,
    overload_helper,
    row_max,
    widen,
)

# Rows of at most SHORT_COLS logits take these kernels, of at most TINY_COLS the tiny ones; a
# tiny group holds up to TINY_GROUP rows. Measured (docs/cpu.md "Many rows of few logits").
SHORT_COLS = 512
TINY_COLS = 24
TINY_GROUP = 64


@jit_serial
def padded_row(like, n):
    """``n`` entries of ``like``'s dtype, FAR_BYTES into their allocation (``_cpu.padded_ebuf``)."""
    pad = FAR_BYTES // like.itemsize
    return np.empty(n + pad, like.dtype)[pad:]


@jit_reduce
def exp_sum(xc, e, m):
    """``e_j = exp(xc_j - m)``, returning their sum (step 2). ``m`` is the row's max, so every
    argument is at most 0, or NaN (a NaN entry, or ``inf - inf``), which the sum keeps."""
    s = as_dtype_of(e, 0)
    for j in range(xc.size):
        v = fast_exp(xc[j] - m)
        e[j] = v
        s += v
    return s


@jit_inline
def load_row(x, base, c, half, cap):
    """``c_j = x[base + j]`` (floats, or 16-bit bits in format ``half`` widened to float32),
    soft-capped ``cap tanh(x / cap)`` when ``cap > 0`` (step 1); ``base`` unsigned (see the
    module's note). The format and the cap are the same for every entry, so LLVM takes them
    out of the loop and each loop holds one conversion."""
    if cap > as_dtype_of(c, 0):
        inv_cap = as_dtype_of(c, 1) / cap
        for j in range(np.uint64(c.size)):
            c[j] = cap * fast_tanh(widen(x[base + j], half) * inv_cap)
    else:
        for j in range(np.uint64(c.size)):
            c[j] = widen(x[base + j], half)


@jit_inline
def store_row(e, g, base, half):
    """``g[base + j] = e_j``, rounded to 16 bits in format ``half`` where ``g`` holds bits."""
    for j in range(np.uint64(e.size)):
        g[base + j] = stored(g, e[j], half)


def stored(g, v, half):
    """``v`` as an entry of ``g``: rounded to 16-bit bits in format ``half`` where ``g`` holds
    such bits (uint16), else ``v`` itself."""
    return v


@overload_helper(stored)
def _stored_impl(g, v, half):
    if g.dtype == types.uint16:
        return lambda g, v, half: narrow_value(v, half)
    return lambda g, v, half: v


@jit_inline
def short_row(c, e, tgt, w, w_sum, cap, eps, z, scale, want_grad, g, base, half):
    """Loss and lse of one row of (capped, float) logits ``c`` whose target ``tgt`` is valid
    (steps 2 and 3); with ``want_grad`` its gradient from the exps ``e`` into ``g[base:]``
    (rounded to 16 bits in format ``half`` where ``g`` holds bits), in the loop that computes
    it. The target's entry is written again after, with its own term: ``e`` still holds its
    exp, so it is the value of one sweep through ``e`` followed by the term, as before.
    Through ``e`` and a copy out, V = 256-512 fused calls took 1.0-1.2x the time of the
    block kernels (docs/cpu.md)."""
    zero = as_dtype_of(e, 0)
    one = as_dtype_of(e, 1)
    has_w = w.size > 0
    m = row_max(c)
    s = exp_sum(c, e, m)
    sm = smoothing_sum(c, m, w, 0, e) if eps > zero else zero
    xt = c[tgt]
    wt = w[tgt] if has_w else one
    loss, lse = row_loss(c, m, s, sm, xt, wt, w_sum, eps, z)
    if not want_grad:
        return loss, lse
    a, b = grad_factors(c, s, lse, wt, w_sum, eps, z, scale)
    capped = cap > zero
    inv_cap = one / cap if capped else zero
    n = np.uint64(e.size)
    has_wj = has_w and eps > zero  # w_j with smoothing only, as ``_cpu.xent_row`` (b = 0 without)
    if capped:  # times the cap's derivative, from the capped logits
        for j in range(n):
            r = c[j] * inv_cap
            g[base + j] = stored(g, (a * e[j] - (b * w[j] if has_wj else b)) * (one - r * r), half)
    elif has_wj:
        for j in range(n):
            g[base + j] = stored(g, a * e[j] - b * w[j], half)
    else:
        for j in range(n):
            g[base + j] = stored(g, a * e[j] - b, half)
    v = a * e[tgt] - (b * w[tgt] if has_wj else b)
    if capped:
        r = c[tgt] * inv_cap
        v = v * (one - r * r)
    g[base + np.uint64(tgt)] = stored(g, v - target_term(e, xt, cap, inv_cap, scale, eps, wt), half)
    return loss, lse


@jit_serial
def xent_short_range(
    lo, hi, x, x_off, n_cols, targets, ignore_index, w, w_sum, cap, eps, z, scale, g, g_off, half, tiny, loss, lse
):
    """``_cpu.xent_range`` for rows of at most SHORT_COLS logits: floats (``half`` 0) or 16-bit
    bits in format ``half``, widened to float32 into the scratch and rounded as the gradient is
    written. With ``tiny`` (rows of at most TINY_COLS), in transposed groups
    (``xent_tiny_range``). Each row is copied to the scratch before its gradient is written,
    so a gradient in place needs no care."""
    if tiny:
        xent_tiny_range(
            lo, hi, x, x_off, n_cols, targets, ignore_index, w, w_sum, cap, eps, z, scale, g, g_off, half, loss, lse
        )
        return
    want_grad = scale.size > 0
    c = padded_row(loss, n_cols)
    e = padded_row(loss, n_cols)
    for i in range(lo, hi):
        tgt = targets[i]
        fill = skip_value(tgt, ignore_index, n_cols)
        if fill != -1.0:  # an ignored row (0) or a bad target (NaN)
            loss[i] = fill
            lse[i] = fill
            if want_grad:
                e[:] = fill
                store_row(e, g, np.uint64(g_off[i]), half)
            continue
        load_row(x, np.uint64(x_off[i]), c, half, cap)
        row_scale = scale[i] if want_grad else as_dtype_of(loss, 0)
        base = np.uint64(g_off[i]) if want_grad else np.uint64(0)
        loss[i], lse[i] = short_row(c, e, tgt, w, w_sum, cap, eps, z, row_scale, want_grad, g, base, half)


@jit_kernel
def xent_short_rows(tasks, n_rows, *args):
    """``xent_short_range(lo, hi, *args)`` over all rows, in parallel."""
    per_task = (n_rows + tasks - 1) // max(tasks, 1)
    for task in numba.prange(tasks):
        xent_short_range(task * per_task, min(n_rows, (task + 1) * per_task), *args)


@jit_inline
def tiny_sums(tt, e, rows, n_cols, stride, m, s):
    """Steps 1 and 2 over a transposed group (``tiny_group``): each row's max into ``m`` (a NaN
    entry may or may not win it; the sum is NaN either way), ``e = exp(xc - m)`` and each
    row's sum of it into ``s``, entry by entry in order 0..V-1 in every lane.

    The max runs through ``e``: column ``j`` gets the max of columns ``0..j``, so no store
    goes back where its loop loaded. Kept in ``m`` (``m[r] = v if v > m[r] else m[r]``),
    LLVM stored only the lanes that changed, with ``vmaskmovps``, which is microcoded on
    AMD Zen: the max took 0.55 ns an entry, a third of the step (docs/cpu.md)."""
    for r in range(rows):
        e[r] = tt[r]
    for j in range(1, n_cols):
        jb = np.uint64(j) * stride
        for r in range(rows):
            v = tt[jb + r]
            p = e[jb - stride + r]
            e[jb + r] = v if v > p else p
    last = np.uint64(n_cols - 1) * stride
    for r in range(rows):
        m[r] = e[last + r]
    for r in range(rows):
        s[r] = as_dtype_of(s, 0)
    for j in range(n_cols):
        jb = np.uint64(j) * stride
        for r in range(rows):
            v = fast_exp(tt[jb + r] - m[r])
            e[jb + r] = v
            s[r] += v


@jit_serial
def tiny_group(tt, e, n, n_cols, tgts, i0, ignore_index, w, w_sum, cap, eps, z, scale, loss, lse, like, lanes):
    """Loss (and, with a non-empty ``scale``, gradient into ``e``) of rows ``i0 .. i0 + n`` of a
    group, whose (widened) logits ``tt`` holds transposed: entry ``j`` of the group's row ``r``
    at ``tt[j * R + r]``, ``R`` the group's stride (``tt.size // n_cols``).

    The steps of ``short_row``, each a loop over the rows of the group for one entry ``j``:
    SIMD lanes hold rows, so a row of 10 logits needs no vector remainder, and each row's max
    and sums are taken entry by entry in order 0..V-1 in every lane, whatever the group, its
    size or the lane: the bits depend on the row alone. ``lanes`` is scratch of 5 R entries, and
    ``like`` any array of V entries in the accumulation dtype (for ``row_loss``).
    """
    zero = as_dtype_of(e, 0)
    one = as_dtype_of(e, 1)
    has_w = w.size > 0
    capped = cap > zero
    inv_cap = one / cap if capped else zero
    stride = np.uint64(tt.size // n_cols)
    rows = np.uint64(n)
    m = lanes[:stride]
    s = lanes[stride : 2 * stride]
    sm = lanes[2 * stride : 3 * stride]
    a = lanes[3 * stride : 4 * stride]
    b = lanes[4 * stride : 5 * stride]
    if capped:  # xc = cap tanh(x / cap), in place
        for k in range(np.uint64(n_cols) * stride):
            tt[k] = cap * fast_tanh(tt[k] * inv_cap)
    tiny_sums(tt, e, rows, n_cols, stride, m, s)  # steps 1 and 2
    for r in range(rows):
        sm[r] = zero
    if eps > zero:  # the smoothing sum
        for j in range(n_cols):
            jb = np.uint64(j) * stride
            wj = w[j] if has_w else one
            for r in range(rows):
                sm[r] += wj * (m[r] - tt[jb + r])
    # 3. the loss, row by row
    want_grad = scale.size > 0
    for r in range(rows):
        i = i0 + r
        t = tgts[i]
        fill = skip_value(t, ignore_index, n_cols)
        if fill != -1.0:  # an ignored row (0) or a bad target (NaN): the caller fills its gradient
            loss[i] = fill
            lse[i] = fill
            a[r] = zero
            b[r] = zero
            continue
        xt = tt[np.uint64(t) * stride + r]
        wt = w[t] if has_w else one
        loss[i], lse[i] = row_loss(like, m[r], s[r], sm[r], xt, wt, w_sum, eps, z)
        if want_grad:
            a[r], b[r] = grad_factors(like, s[r], lse[i], wt, w_sum, eps, z, scale[i])
    if not want_grad:
        return
    # 4. the gradient (a e_j - b w_j) dxc_j/dx_j, then each row's target term (w_j with
    #    smoothing only, as ``_cpu.xent_row``: b = 0 without)
    for j in range(n_cols):
        jb = np.uint64(j) * stride
        wj = w[j] if has_w and eps > zero else one
        if capped:
            for r in range(rows):
                q = tt[jb + r] * inv_cap
                e[jb + r] = (a[r] * e[jb + r] - b[r] * wj) * (one - q * q)
        else:
            for r in range(rows):
                e[jb + r] = a[r] * e[jb + r] - b[r] * wj
    for r in range(rows):
        i = i0 + r
        t = tgts[i]
        if skip_value(t, ignore_index, n_cols) == -1.0:
            k = np.uint64(t) * stride + r
            wt = w[t] if has_w else one
            e[k] -= target_term(like, tt[k], cap, inv_cap, scale[i], eps, wt)


@jit_inline
def load_group(x, x_off, i0, n, n_cols, tt, half):
    """Rows ``i0 .. i0 + n`` of ``x`` (floats, or 16-bit bits in format ``half``, widened) into
    ``tt``, transposed: entry ``j`` of row ``i0 + r`` at ``tt[j * R + r]``, ``R`` the group's
    stride (``tt.size // n_cols``). One scalar move an entry."""
    stride = np.uint64(tt.size // n_cols)
    for r in range(n):
        base = np.uint64(x_off[i0 + r])
        lane = np.uint64(r)
        for j in range(np.uint64(n_cols)):
            tt[j * stride + lane] = widen(x[base + j], half)


@jit_inline
def store_group(e, g, g_off, i0, n, n_cols, half):
    """``load_group`` back: the group's rows of ``e`` (transposed) into rows ``i0 .. i0 + n`` of
    ``g`` (rounded to 16 bits in format ``half`` where ``g`` holds bits)."""
    stride = np.uint64(e.size // n_cols)
    for r in range(n):
        base = np.uint64(g_off[i0 + r])
        lane = np.uint64(r)
        for j in range(np.uint64(n_cols)):
            g[base + j] = stored(g, e[j * stride + lane], half)


@jit_serial
def xent_tiny_range(
    lo, hi, x, x_off, n_cols, targets, ignore_index, w, w_sum, cap, eps, z, scale, g, g_off, half, loss, lse
):
    """``_cpu.xent_range`` for rows of at most TINY_COLS logits, in groups of TINY_GROUP rows
    (``tiny_group``): floats (``half`` 0) or 16-bit bits in format ``half``, widened to float32
    as they are moved into the group and rounded as the gradient is moved out. Each group is
    read in full before its gradient is written, so a gradient in place needs no care."""
    want_grad = scale.size > 0
    group = min(TINY_GROUP, max(hi - lo, 1))
    tt = padded_row(loss, group * n_cols)
    e = padded_row(loss, group * n_cols)
    lanes = np.empty(5 * group, loss.dtype)
    like = np.empty(n_cols, loss.dtype)
    for i0 in range(lo, hi, group):
        n = min(group, hi - i0)
        load_group(x, x_off, i0, n, n_cols, tt, half)
        tiny_group(tt, e, n, n_cols, targets, i0, ignore_index, w, w_sum, cap, eps, z, scale, loss, lse, like, lanes)
        if not want_grad:
            continue
        store_group(e, g, g_off, i0, n, n_cols, half)
        for i in range(i0, i0 + n):  # ignored rows (0) and bad targets (NaN) filled over
            fill = skip_value(targets[i], ignore_index, n_cols)
            if fill != -1.0:
                bits = stored(g, as_dtype_of(loss, fill), half)
                base = np.uint64(g_off[i])
                for j in range(np.uint64(n_cols)):
                    g[base + j] = bits


# The normalizations of short rows (``_cpu.normalize_range`` for long ones): the same steps 1
# and 2, then the lse of each row and, by ``mode``, its softmax ``e_j / s`` or log-softmax
# ``(x_j - m) - log s`` written out. The lse is ``_cpu.row_lse``'s (NaN for a row holding a
# NaN, -inf for one of all -inf, +inf for one holding +inf); the softmax of the last two is
# NaN (``torch.softmax``).


@jit_inline
def short_normal(c, e, mode):
    """lse of one row of float logits ``c``; its softmax or log-softmax (``mode``) into ``e``."""
    m = row_max(c)
    s = exp_sum(c, e, m)
    if mode == MODE_SOFTMAX:
        inv_s = as_dtype_of(e, 1) / s
        for j in range(e.size):
            e[j] *= inv_s
    elif mode == MODE_LOG_SOFTMAX:
        log_s = math.log(s)
        for j in range(e.size):
            e[j] = (c[j] - m) - log_s
    return row_lse(c, m, s)


@jit_serial
def normalize_short_range(lo, hi, x, x_off, n_cols, mode, out, out_off, half, tiny, lse):
    """``_cpu.normalize_range`` for rows of at most SHORT_COLS logits, floats (``half`` 0) or
    16-bit bits in format ``half`` through the float32 scratch; with ``tiny``, in transposed
    groups (``normalize_tiny_range``). Each row is copied to the scratch first, so an output
    in place needs no care."""
    if tiny:
        normalize_tiny_range(lo, hi, x, x_off, n_cols, mode, out, out_off, half, lse)
        return
    c = padded_row(lse, n_cols)
    e = padded_row(lse, n_cols)
    for i in range(lo, hi):
        load_row(x, np.uint64(x_off[i]), c, half, as_dtype_of(lse, 0))
        lse[i] = short_normal(c, e, mode)
        if mode != MODE_LSE:
            store_row(e, out, np.uint64(out_off[i]), half)


@jit_serial
def normalize_tiny_range(lo, hi, x, x_off, n_cols, mode, out, out_off, half, lse):
    """``_cpu.normalize_range`` for rows of at most TINY_COLS logits, floats (``half`` 0) or
    16-bit bits in format ``half``, in transposed groups as ``xent_tiny_range``."""
    group = min(TINY_GROUP, max(hi - lo, 1))
    tt = padded_row(lse, group * n_cols)
    e = padded_row(lse, group * n_cols)
    lanes = np.empty(2 * group, lse.dtype)
    stride = np.uint64(group)
    m = lanes[:stride]
    s = lanes[stride:]
    one = as_dtype_of(lse, 1)
    for i0 in range(lo, hi, group):
        n = min(group, hi - i0)
        rows = np.uint64(n)
        load_group(x, x_off, i0, n, n_cols, tt, half)
        tiny_sums(tt, e, rows, n_cols, stride, m, s)
        for r in range(n):
            lse[i0 + r] = m[r] + math.log(s[r])
            if math.isinf(m[r]):  # ``_cpu.row_lse``: m, or NaN for a row holding a NaN
                lse[i0 + r] = m[r]
                for j in range(n_cols):
                    v = tt[j * group + r]
                    if v != v:
                        lse[i0 + r] = v
        if mode == MODE_LSE:
            continue
        if mode == MODE_SOFTMAX:
            for r in range(rows):
                s[r] = one / s[r]
            for j in range(n_cols):
                jb = np.uint64(j) * stride
                for r in range(rows):
                    e[jb + r] *= s[r]
        else:
            for r in range(rows):
                s[r] = math.log(s[r])
            for j in range(n_cols):
                jb = np.uint64(j) * stride
                for r in range(rows):
                    e[jb + r] = (tt[jb + r] - m[r]) - s[r]
        store_group(e, out, out_off, i0, n, n_cols, half)


@jit_kernel
def normalize_short_rows(tasks, n_rows, *args):
    """``normalize_short_range(lo, hi, *args)`` over all rows, in parallel."""
    per_task = (n_rows + tasks - 1) // max(tasks, 1)
    for task in numba.prange(tasks):
        normalize_short_range(task * per_task, min(n_rows, (task + 1) * per_task), *args)
