"""Numba CPU kernels for logits split along the vocabulary: one block holds columns
``[col0, col0 + n_cols)`` of ``n_classes`` for a band of rows, float32 or float64 (16-bit
blocks are widened to float32 by the caller). As in ``_cpu``, the block is a 1-D buffer ``x``
and row offsets ``x_off`` (row ``i`` is ``x[x_off[i] : x_off[i] + n_cols]``), so that a block
that is a column slice of a larger array is read in place.

The softmax of a split row is assembled in two passes, as in online softmax:

1. ``chunk_stats``: per row of a block, the statistics ``row_stats`` gives for a whole row,
   over the block's columns only, plus the target's (capped) logit and weight when the target
   falls in the block. The caller merges blocks by rescaling to the larger max.
2. ``chunk_grad``: with the merged lse of every row, the gradient of each block on its own.

Rows run in parallel; each row is handled by one thread, so results do not depend on the
thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._cpu import padded_ebuf, row_lse, row_stats, skip_value, write_grad
from ._jit import as_dtype_of, fast_tanh, jit_kernel, jit_serial

MAX_TASKS = 256


@jit_kernel
def chunk_stats(x, x_off, n_cols, col0, targets, w, cap, smooth, m, s, sm, xt, wt, nan):
    """Per-row partial statistics of one vocabulary block.

    For each row: ``m`` a reference max of ``xc = cap * tanh(x / cap)`` (``x`` when ``cap`` is 0)
    over the block (its max, or below it by less than ``_cpu.EXP_CLAMP``: see ``row_stats``),
    ``s = sum_j exp(xc_j - m)`` and, when ``smooth``, ``sm = sum_j w_j (m - xc_j)`` over the
    block, with ``w`` the block's slice of the class weights (empty: all 1). A block of all
    ``-inf`` gives ``m = -inf`` and ``s = sm = 0``, so that it drops out of the merge instead
    of poisoning it with ``-inf - -inf``.

    ``xt`` and ``wt`` get the target's capped logit and weight when ``targets[i] - col0`` is a
    column of the block, and 0 otherwise, so that summing them over blocks gives the row's
    values. ``targets`` may be empty (logsumexp).

    ``nan`` gets 1 where the row's block holds a NaN, else 0: where the block's lse
    (``_cpu.row_lse``, which looks for a NaN only when ``m`` is infinite) is NaN. ``m`` and ``s``
    do not always show it (a max skips NaN; ``s`` of a block of ``-inf`` and NaN is set to 0
    here, and a block holding ``+inf`` has ``s`` NaN without one).
    """
    zero = as_dtype_of(m, 0)
    one = as_dtype_of(m, 1)
    has_t = targets.size > 0
    has_w = w.size > 0
    # rows in up to MAX_TASKS contiguous ranges, each with one scratch for ``row_stats`` (the
    # thread count is not asked for here: a jitted call to it keeps Numba from caching the
    # kernel; MAX_TASKS ranges keep many threads busy, and each range's scratch is one
    # allocation however many rows it has)
    n_rows = m.size
    tasks = min(n_rows, MAX_TASKS)
    per_task = (n_rows + tasks - 1) // max(tasks, 1)
    for task in numba.prange(tasks):
        ebuf = padded_ebuf(x)
        for i in range(task * per_task, min(n_rows, (task + 1) * per_task)):
            xr = x[x_off[i] : x_off[i] + n_cols]
            mi, si, smi = row_stats(xr, cap, w, smooth, ebuf)
            nan[i] = one if math.isnan(row_lse(xr, mi, si)) else zero
            if mi == -np.inf:
                si = zero
                smi = zero
            m[i] = mi
            s[i] = si
            sm[i] = smi
            if not has_t:
                continue
            j = targets[i] - col0
            if 0 <= j < n_cols:
                v = xr[j]
                if cap > zero:
                    v = cap * fast_tanh(v * (one / cap))
                xt[i] = v
                wt[i] = w[j] if has_w else one
            else:
                xt[i] = zero
                wt[i] = zero


@jit_serial
def grad_row(x, g, jt, w, cap, m, a, b, c):
    """The gradient of one row's block (see ``_cpu.xent_row`` for its derivation):

        g_j = [a exp(xc_j - m) - b w_j - c [j == jt]] * (1 - (xc_j / cap)^2)

    with ``m`` the row's merged reference max (the largest of its blocks': every ``xc_j - m``
    is below ``_cpu.EXP_CLAMP``, so no exp overflows) and ``s`` its sum over the whole row
    (merged from every block), ``a = scale ((1 - eps) w_t + eps W / V + 2 z w_t lse) / s``, ``b = scale eps / V`` and
    ``c = scale (1 - eps) w_t`` computed once per row by the caller, and ``jt`` the target's
    column in the block (outside ``[0, n_cols)`` when it lies in another block). As in memory,
    ``exp(xc_j - m) / s`` rather than ``exp(xc_j - lse)``: ``xc_j - m`` is exact, while ``lse``
    rounded at a large offset would cost the softmax digits.
    """
    zero = as_dtype_of(x, 0)
    one = as_dtype_of(x, 1)
    # 1. The softmax and smoothing terms, the sweep of the in-memory kernel.
    write_grad(x, g, m, a, b, w, cap)
    # 2. The target's own term, when the target is in this block.
    if 0 <= jt < x.size:
        d_t = one
        if cap > zero:
            inv_cap = one / cap
            r = cap * fast_tanh(x[jt] * inv_cap) * inv_cap
            d_t = one - r * r
        g[jt] -= c * d_t


@jit_kernel
def chunk_grad(x, x_off, n_cols, col0, n_classes, targets, ignore_index, w, cap, m, a, b, c, g):
    """Gradient of one vocabulary block into ``g`` (C-contiguous, rows x n_cols), given the
    per-row reference max ``m`` of the whole row and the per-row factors ``a``, ``b``, ``c`` of
    ``grad_row``.

    Ignored rows get 0 and rows whose target is outside ``[0, n_classes)`` get NaN, as the
    in-memory kernels give.
    """
    for i in numba.prange(g.shape[0]):
        fill = skip_value(targets[i], ignore_index, n_classes)
        if fill != -1.0:
            g[i, :] = fill
            continue
        xr = x[x_off[i] : x_off[i] + n_cols]
        grad_row(xr, g[i], targets[i] - col0, w, cap, m[i], a[i], b[i], c[i])
