"""Cross-entropy of Dask arrays: logits too large for one machine, chunked along the batch
and the vocabulary axes, evaluated lazily by any Dask scheduler (threads, processes, or a
``dask.distributed`` cluster). Importing this module requires ``dask[array]``; ``nbxent``
itself does not.

The results equal those of the in-memory functions of :mod:`nbxent`, with the same options,
dtypes and errors. The graph, for logits of row blocks ``i`` and vocabulary blocks ``j``:

1. Vocabulary in one block (only row blocks): each row block runs the in-memory kernel, loss
   and gradient in one pass; per-row losses and gradients are bitwise those of the in-memory
   functions (sums over rows are taken block by block, so they may differ in the last bits).
2. Vocabulary in several blocks: block ``(i, j)`` gives per-row partial statistics (``STATS``:
   reference max ``m`` (the block's max or less than ``_cpu.EXP_CLAMP`` below it: any ``m``
   gives the same lse), ``s = sum exp(xc - m)``, ``sm = sum w (m - xc)``, the target's logit
   and weight when the target is in the block, the block's weight sum, whether the block holds
   a NaN: a row holding one is NaN throughout, as in memory). A tree reduction
   along the vocabulary (``da.reduction`` with ``combine``) merges them with the online-softmax
   rule, rescaling to the larger max ``M``::

       s = sum_j s_j exp(m_j - M),   sm = sum_j [sm_j + (M - m_j) wc_j]

   which gives each row's lse and loss. The gradient is a blockwise map over ``(i, j)`` that
   reads the merged statistics of row block ``i``.

'mean' divides by the total weight of the non-ignored targets, a lazy scalar computed from
the targets alone, so no logits block waits for it. A gradient block needs its logits block
and its rows' merged statistics: while a row band's statistics are merged, its logits blocks
stay in memory (rows per block x V values); choose row chunks so that a few bands fit.

Checks of shapes, dtypes and options run when the graph is built. The check that targets are
in ``[0, V)`` needs their values: for NumPy targets it runs at graph build, for Dask targets
at compute time, raising the same ValueError, naming the global position of a bad target (the
first of its block, not necessarily the first overall).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numba
import numpy as np

try:
    import dask.array as da
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("nbxent.dask needs Dask; install it with: pip install 'nbxent[dask]'") from e

from . import _backend_cpu, _checks
from ._backend_cpu import acc_dtype, launch, row_view
from ._cpu import MODE_LSE, scan_targets
from ._cpu_vocab import chunk_grad, chunk_stats

__all__ = ["cross_entropy", "cross_entropy_with_grad", "logsumexp"]

# Per-row statistics of a block of vocabulary columns (see the module docstring); float64,
# so that merging many blocks adds no rounding of its own.
STATS = np.dtype([(name, np.float64) for name in ("m", "s", "sm", "xt", "wt", "wc", "nan")])


# ---------------------------------------------------------------------------------------------
# Block functions: each runs on one block, in a worker. A logits block has shape (..., n_cols);
# the arrays that go with it have the same leading shape and a last axis of length 1 (per row)
# or n_cols (weights), so that Dask broadcasts them to every vocabulary block of their rows.


@contextlib.contextmanager
def _one_numba_thread():
    """Run the Numba kernels called inside on the calling thread only.

    Dask runs blocks in parallel (its threads, or worker processes), so a block's kernel does
    not start a thread pool of its own: nested pools oversubscribe the cores, and each
    parallel launch waits for every pool thread to be scheduled, which on a busy machine
    costs milliseconds per block (40 blocks of 6 MB took 5x longer than on one thread).
    ``numba.set_num_threads`` is per thread, so other threads are not affected.
    """
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _rows_of(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``row_view`` of a float32/float64 logits block: read in place when its rows are
    contiguous (a column slice of a larger array is); 16-bit blocks are widened to float32."""
    acc = acc_dtype(x.dtype)
    if x.dtype != acc:
        x = x.astype(acc)
    view = row_view(x)
    return view if view is not None else row_view(np.ascontiguousarray(x))


def _col0(block_info) -> int:
    """The first vocabulary column of the logits block (the first array argument)."""
    return block_info[0]["array-location"][-1][0]


def _targets_block(t, *, n_classes, ignore_index, validate, n_added, block_info=None):
    """Targets as int64, after the range check of ``_checks.check_target_range`` (its search,
    ``scan_targets``) when ``validate``; the error names the global position (without the
    ``n_added`` leading axes added to 0-d targets).

    Values beyond int64 are clipped, as the in-memory path does: they stay out of range.
    """
    flat = _checks.int64_targets(np, t.reshape(-1))
    if validate and (bad := scan_targets(flat, n_classes, ignore_index)[0]) >= 0:
        local = np.unravel_index(bad, t.shape)
        starts = [start for start, _ in block_info[0]["array-location"]]
        position = tuple(int(s + k) for s, k in zip(starts, local, strict=True))[n_added:]
        raise _checks.target_range_error(position, int(t[local]), n_classes, ignore_index)
    return flat.reshape(t.shape)


def _target_weight_block(t, w, *, ignore_index, n_classes):
    """Each row's share of the 'mean' divisor: 1 per non-ignored row, or its target's weight
    (0 for a target out of range, whose loss is NaN anyway)."""
    kept = t != ignore_index
    if w is None:
        return kept.astype(np.float64)
    in_range = kept & (t >= 0) & (t < n_classes)
    return np.where(in_range, w.reshape(-1).astype(np.float64)[np.where(in_range, t, 0)], 0.0)


def _row_scale_block(t, grad_output, total_weight, *, acc):
    """The per-row gradient factor for a scalar grad_output (divided by the weight sum for
    'mean'), rounded to the accumulation dtype as the in-memory path rounds it."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and NaN, silently
        g = np.float64(grad_output)
        if total_weight is not None:
            g = g / np.float64(total_weight)
        return np.full(t.shape, g, dtype=acc)


def _divide_block(total, total_weight, *, acc):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.asarray(total / total_weight, dtype=acc)


# NaN and inf results come silently, as in memory (``_backend_cpu._reduce``) and in PyTorch:
# losses of +inf and -inf summed, sums and factors beyond float32. NumPy's sum and casts warn.
def _quiet_sum(x, axis=None, keepdims=False, **kwargs):
    """``np.sum(x, dtype=float64)`` without floating-point warnings (a ``da.reduction`` step)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sum(x, axis=axis, keepdims=keepdims, dtype=np.float64)


def _quiet_cast(x, *, to):
    """``x.astype(to)`` without NumPy's overflow warning (float32's infinity beyond its range)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(to)


def _sum(a: da.Array) -> da.Array:
    """``a.sum(dtype=float64)``: the same tree of sums, without NumPy's warnings."""
    return da.reduction(a, _quiet_sum, _quiet_sum, dtype=np.float64)


def _cast(a: da.Array, dtype) -> da.Array:
    """``a.astype(dtype)`` without NumPy's overflow warning (float32's infinity beyond its range)."""
    return a.map_blocks(_quiet_cast, to=dtype, dtype=dtype, meta=np.empty((0,) * a.ndim, dtype))


def _one_block_xent(x, t, scale, w, *, opts, want_grad):
    """Vocabulary in one block: the in-memory path on a block of rows, reduction 'none'.
    Returns the rows' losses (shape (..., 1)), or the pair ``(losses, grad)`` when ``want_grad``.

    The losses keep a vocabulary axis of length 1: a map that dropped the axis would make Dask
    "concatenate" the block's one vocabulary block, a copy of the whole logits block."""
    with _one_numba_thread():
        loss, grad = _backend_cpu.xent(
            x,
            t[..., 0],
            None if w is None else w.reshape(-1),
            opts,
            grad=want_grad,
            grad_output=None if scale is None else scale[..., 0],
            out=None,
            validate=False,
            stream=None,
        )
    return (loss[..., None], grad) if want_grad else loss[..., None]


def _one_block_lse(x):
    """Vocabulary in one block: the in-memory lse, shape (..., 1) (see ``_one_block_xent``)."""
    with _one_numba_thread():
        return _backend_cpu.normalize(x, MODE_LSE, None, stream=None)[..., None]


def _first(pair):
    return pair[0]


def _second(pair):
    return pair[1]


def _stats_block(x, t, w, *, cap, smooth, block_info=None):
    """``STATS`` of a logits block, shape (..., 1)."""
    buf, off = _rows_of(x)
    acc = buf.dtype.type
    n_rows, n_cols = off.size, x.shape[-1]
    targets = np.empty(0, np.int64) if t is None else np.ascontiguousarray(t.reshape(-1))
    wv = np.empty(0, acc) if w is None else np.ascontiguousarray(w.reshape(-1), dtype=acc)
    m, s, sm, xt, wt, nan = (np.zeros(n_rows, acc) for _ in range(6))
    with _one_numba_thread():
        launch(chunk_stats, buf, off, n_cols, _col0(block_info), targets, wv, acc(cap), smooth, m, s, sm, xt, wt, nan)
    out = np.empty(n_rows, STATS)
    for name, value in zip(("m", "s", "sm", "xt", "wt", "nan"), (m, s, sm, xt, wt, nan), strict=True):
        out[name] = value
    out["wc"] = np.sum(wv, dtype=np.float64) if wv.size else n_cols
    return out.reshape((*x.shape[:-1], 1))


def _merge_stats(parts, axis, keepdims):
    """Merge ``STATS`` along the last axis (the vocabulary blocks), rescaling to the larger max.

    A block whose max equals the merged max keeps its sums as they are: that also covers rows
    whose maxima are all ``-inf`` (or ``+inf``), where ``m - M`` would be NaN.
    """
    m = parts["m"]
    big_m = np.max(m, axis=-1, keepdims=True)
    same = m == big_m
    out = np.empty(big_m.shape, STATS)
    out["m"] = big_m
    with np.errstate(invalid="ignore", over="ignore"):
        factor = np.where(same, 1.0, np.exp(m - big_m))
        shift = np.where(same, 0.0, (big_m - m) * parts["wc"])
        out["s"] = np.sum(parts["s"] * factor, axis=-1, keepdims=True)
        out["sm"] = np.sum(parts["sm"] + shift, axis=-1, keepdims=True)
    for name in ("xt", "wt", "wc", "nan"):
        out[name] = np.sum(parts[name], axis=-1, keepdims=True)
    return out if keepdims else out[..., 0]


def _keep_block(parts, axis, keepdims):
    return parts


def _loss_rows_block(st, t, *, opts, n_classes, acc):
    """Each row's loss from its merged ``STATS`` (the formula of ``_cpu.xent_row``), in float64,
    rounded to the accumulation dtype. Ignored rows give 0, targets out of range NaN."""
    eps, z = opts.label_smoothing, opts.z_loss
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_s = np.log(st["s"])
        lse = st["m"] + log_s
        wt = st["wt"]
        loss = (1.0 - eps) * wt * (log_s + (st["m"] - st["xt"]))
        if eps > 0.0:
            loss += eps / n_classes * (st["wc"] * log_s + st["sm"])
        if z > 0.0:
            loss += z * wt * lse * lse
    loss = np.where((t >= 0) & (t < n_classes) & (st["nan"] == 0), loss, np.nan)
    return _quiet_cast(np.where(t == opts.ignore_index, 0.0, loss), to=acc)


def _lse_block(st, *, acc):
    """lse from merged ``STATS``, as ``_cpu.row_lse`` gives it: NaN for a row holding a NaN, an
    infinite max (a row of all ``-inf``, or one holding ``+inf``) itself, else ``m + log s``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = st["m"] + np.log(st["s"])
    lse = np.where(np.isinf(st["m"]), st["m"], lse)
    return _quiet_cast(np.where(st["nan"] > 0, np.nan, lse), to=acc)


def _grad_block(x, t, st, scale, w, *, opts, n_classes, block_info=None):
    """The gradient of a logits block, in the logits' dtype."""
    buf, off = _rows_of(x)
    acc = buf.dtype.type
    n_cols = x.shape[-1]
    st, scale = st.reshape(-1), scale.reshape(-1).astype(np.float64)
    t = np.ascontiguousarray(t.reshape(-1))
    eps, z = opts.label_smoothing, opts.z_loss
    # The per-row factors of ``_cpu_vocab.grad_row``, from the merged statistics.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lse = st["m"] + np.log(st["s"])
        wt = st["wt"]
        # W and w_j enter with smoothing only (as in memory): a NaN or inf weight of a class no
        # kept row targets stays out of the gradient, as in PyTorch
        smoothing = eps * st["wc"] / n_classes if eps > 0.0 else 0.0
        a = scale * ((1.0 - eps) * wt + smoothing + 2.0 * z * wt * lse) / st["s"]
        a = np.where(st["nan"] > 0, np.nan, a)  # a row holding a NaN: NaN throughout, as in memory
        b = scale * eps / n_classes
        c = scale * (1.0 - eps) * wt
    factors = tuple(_quiet_cast(np.asarray(f), to=acc) for f in (st["m"], a, b, c))
    wv = np.empty(0, acc) if w is None or eps == 0.0 else np.ascontiguousarray(w.reshape(-1), dtype=acc)
    g = np.empty((off.size, n_cols), acc)
    col0 = _col0(block_info)
    with _one_numba_thread():
        launch(chunk_grad, buf, off, n_cols, col0, n_classes, t, opts.ignore_index, wv, acc(opts.softcap), *factors, g)
    return g.reshape(x.shape).astype(x.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Graph building. Logits of shape (..., V) keep their chunks: every step is blockwise over the
# leading axes (no reshape, which could rechunk the logits), and reduces over the last axis.


def _as_logits(logits: Any) -> da.Array:
    x = logits if isinstance(logits, da.Array) else da.asarray(logits)
    _checks.check_logits(x.shape, x.dtype)
    if any(math.isnan(n) for n in x.shape):
        raise ValueError("logits have unknown chunk sizes; call logits.compute_chunk_sizes() first")
    return x


def _per_row(a: da.Array) -> da.Array:
    """A (...) array as (..., 1): one value per row, broadcast over the vocabulary blocks."""
    return a[..., None]


def _stats(x: da.Array, t, w, cap: float, smooth: bool, split_every: int | None) -> da.Array:
    """Merged ``STATS`` of every row of ``x``, shape (..., 1)."""
    n_blocks = len(x.chunks[-1])
    per_block = da.map_blocks(
        _stats_block,
        x,
        t,
        w,
        cap=cap,
        smooth=smooth,
        chunks=(*x.chunks[:-1], (1,) * n_blocks),
        meta=np.empty((0,) * x.ndim, STATS),
        token="nbxent-stats",
    )
    return da.reduction(
        per_block,
        _keep_block,
        _merge_stats,
        combine=_merge_stats,
        axis=-1,
        keepdims=True,
        dtype=STATS,
        split_every=split_every,
        concatenate=True,
        meta=np.empty((0,) * x.ndim, STATS),
        name="nbxent-merge-stats",
    )


class _Problem:
    """The validated inputs of a loss as Dask arrays aligned with the logits ``x`` (..., V):
    ``t`` int64 targets (...) with the leading chunks of ``x``; ``w_cols`` the weights,
    shape (1, ..., 1, V), chunked like the vocabulary of ``x``, and ``w_full`` the same in one
    chunk (both None without weights). 1-D logits get a leading axis of length 1."""

    def __init__(self, logits, targets, weight, opts: _checks.Options, validate: bool):
        logits = _as_logits(logits)
        n_classes = logits.shape[-1]
        if isinstance(targets, da.Array):
            _checks.check_targets(targets.shape, targets.dtype, logits.shape)
            lazy_check = validate
        else:
            targets = np.asarray(targets)
            _checks.check_targets(targets.shape, targets.dtype, logits.shape)
            if validate:
                _checks.check_target_range(targets, n_classes, opts.ignore_index)
            lazy_check = False
        self.logits_shape, self.targets_shape = logits.shape, targets.shape
        n_added = 1 if logits.ndim == 1 else 0
        x = logits[None] if n_added else logits
        t = da.asarray(targets)
        t = (t[None] if n_added else t).rechunk(x.chunks[:-1])
        t = t.map_blocks(
            _targets_block,
            n_classes=n_classes,
            ignore_index=opts.ignore_index,
            validate=lazy_check,
            n_added=n_added,
            meta=np.empty((0,) * t.ndim, np.int64),
            token="nbxent-targets",
        )
        acc = acc_dtype(x.dtype)
        if weight is None:
            w_cols = w_full = None
        else:
            if not isinstance(weight, da.Array):
                weight = np.asarray(weight)
            _checks.check_weight(weight.shape, weight.dtype, n_classes)
            w = _cast(da.asarray(weight), acc).reshape((1,) * (x.ndim - 1) + (n_classes,))
            w_cols = w.rechunk((*w.chunks[:-1], x.chunks[-1]))
            w_full = w.rechunk((*w.chunks[:-1], (n_classes,)))
        self.x, self.t, self.w_cols, self.w_full = x, t, w_cols, w_full
        self.n_added, self.opts, self.acc, self.n_classes = n_added, opts, acc, n_classes
        self.one_block = len(x.chunks[-1]) == 1

    def total_weight(self) -> da.Array:
        """The 'mean' divisor, a lazy float64 scalar that depends on the targets only."""
        per_row = da.map_blocks(
            _target_weight_block,
            _per_row(self.t),
            self.w_full,
            ignore_index=self.opts.ignore_index,
            n_classes=self.n_classes,
            chunks=(*self.t.chunks, (1,)),
            meta=np.empty((0,) * self.x.ndim, np.float64),
            token="nbxent-target-weight",
        )
        return _sum(per_row)

    def row_scale(self, grad_output: Any, total_weight: da.Array | None) -> da.Array:
        """Each row's gradient factor, shaped like ``t`` in the accumulation dtype."""
        go = grad_output if isinstance(grad_output, da.Array) else np.asarray(grad_output)
        _checks.check_grad_output_dtype(go.dtype)
        _checks.check_grad_output_shape(go.shape, self.opts.reduction, self.targets_shape)
        if go.ndim:  # reduction='none', one value per row
            go = da.asarray(go)
            return _cast((go[None] if self.n_added else go).rechunk(self.t.chunks), self.acc)
        return da.map_blocks(
            _row_scale_block,
            self.t,
            da.asarray(go),
            total_weight if self.opts.reduction == "mean" else None,
            acc=self.acc,
            meta=np.empty((0,) * self.t.ndim, self.acc),
            token="nbxent-row-scale",
        )

    def loss(self, loss_rows: da.Array, total_weight: da.Array | None) -> da.Array:
        """The loss of ``opts.reduction`` from the rows' losses."""
        if self.opts.reduction == "none":
            return loss_rows[0] if self.n_added else loss_rows
        total = _sum(loss_rows)
        if self.opts.reduction == "sum":
            return _cast(total, self.acc)
        return da.map_blocks(_divide_block, total, total_weight, acc=self.acc, meta=np.empty((), self.acc))


def _xent(logits, targets, weight, opts, *, grad, grad_output, validate, split_every):
    p = _Problem(logits, targets, weight, opts, validate)
    x, t, lead = p.x, p.t, p.x.ndim - 1
    total_weight = p.total_weight() if opts.reduction == "mean" else None
    scale = p.row_scale(grad_output, total_weight) if grad else None
    rows_meta = np.empty((0,) * lead, p.acc)
    if p.one_block:
        block_opts = _checks.Options("none", opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap)
        out = da.map_blocks(
            _one_block_xent,
            x,
            _per_row(t),
            None if scale is None else _per_row(scale),
            p.w_full,
            opts=block_opts,
            want_grad=grad,
            chunks=(*x.chunks[:-1], (1,)),
            meta=np.empty((0,) * x.ndim, object if grad else p.acc),
            token="nbxent-xent",
        )
        if not grad:
            return p.loss(out[..., 0], total_weight), None
        # One task per row block computes both: a (loss, grad) pair, then one array of each.
        loss_rows = out.map_blocks(_first, meta=np.empty((0,) * x.ndim, p.acc), token="nbxent-loss")[..., 0]
        grad_x = out.map_blocks(_second, chunks=x.chunks, meta=np.empty((0,) * x.ndim, x.dtype), token="nbxent-grad")
    else:
        st = _stats(x, _per_row(t), p.w_cols, opts.softcap, opts.label_smoothing > 0.0, split_every)
        loss_rows = da.map_blocks(
            _loss_rows_block,
            st[..., 0],
            t,
            opts=opts,
            n_classes=p.n_classes,
            acc=p.acc,
            meta=rows_meta,
            token="nbxent-loss",
        )
        if not grad:
            return p.loss(loss_rows, total_weight), None
        grad_x = da.map_blocks(
            _grad_block,
            x,
            _per_row(t),
            st,
            _per_row(scale),
            p.w_cols,
            opts=opts,
            n_classes=p.n_classes,
            meta=np.empty((0,) * x.ndim, x.dtype),
            token="nbxent-grad",
        )
    return p.loss(loss_rows, total_weight), grad_x[0] if p.n_added else grad_x


def cross_entropy(
    logits: Any,
    targets: Any,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool = True,
    split_every: int | None = None,
) -> da.Array:
    """Softmax cross-entropy of Dask ``logits`` against integer ``targets``, as a lazy Dask array.

    The same loss, options, dtypes and errors as :func:`nbxent.cross_entropy`.

    Parameters
    ----------
    logits : dask.array.Array of shape (..., V)
        float16, bfloat16, float32 or float64 with NumPy blocks, chunked along any axes,
        the vocabulary (last) axis included. Other arrays are wrapped by ``da.asarray``.
    targets : integer Dask or NumPy array of shape (...)
        Class ids in ``[0, V)``, or ``ignore_index``; rechunked to the logits' row chunks.
    reduction, ignore_index, label_smoothing, z_loss, softcap
        As in :func:`nbxent.cross_entropy`; 'mean' divides by the global count (or weight
        sum) of the non-ignored targets.
    weight : Dask or NumPy array of shape (V,), optional
        Per-class weights.
    validate : bool
        Check that every target is in range: at once for NumPy targets, when computed for
        Dask targets. With False, a bad target gives NaN for its row.
    split_every : int, optional
        How many vocabulary blocks each step of the merge tree combines (Dask's default
        when None), as in ``dask.array`` reductions.

    Returns
    -------
    dask.array.Array
        0-d for 'mean' and 'sum', shaped like ``targets`` for 'none'; float64 for float64
        logits, float32 otherwise.

    Raises
    ------
    TypeError
        Logits not floating point, targets not integers, or an option of the wrong type.
    ValueError
        A shape mismatch, an option out of its range, logits with unknown chunk sizes, or
        a target outside ``[0, V)`` that is not ``ignore_index`` (for Dask targets, raised
        by ``compute``).

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> import nbxent.dask as nxd
    >>> logits = da.from_array(np.log(np.array([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]])), chunks=(1, 2))
    >>> loss = nxd.cross_entropy(logits, np.array([0, 1]), reduction="none")
    >>> print(loss.compute(scheduler="sync").round(3))
    [0.357 0.105]
    """
    opts = _checks.check_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    loss, _ = _xent(
        logits, targets, weight, opts, grad=False, grad_output=None, validate=validate, split_every=split_every
    )
    return loss


def cross_entropy_with_grad(
    logits: Any,
    targets: Any,
    *,
    grad_output: Any = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool = True,
    split_every: int | None = None,
) -> tuple[da.Array, da.Array]:
    """The loss of :func:`cross_entropy` and its gradient with respect to ``logits``, as lazy
    Dask arrays: the same values as :func:`nbxent.cross_entropy_with_grad`.

    Parameters
    ----------
    logits, targets, reduction, ignore_index, label_smoothing, weight, z_loss, softcap, validate, split_every
        As in :func:`cross_entropy`.
    grad_output : scalar, or for reduction='none' an array shaped like ``targets``
        The gradient of the final objective with respect to the loss (1 by default); a
        NumPy or Dask array (a 0-d Dask array is a lazy scalar).

    Returns
    -------
    (loss, grad)
        ``grad`` has the logits' shape, chunks and dtype. With several vocabulary blocks, a
        gradient block needs the merged statistics of its rows, so each row band's logits
        blocks are held in memory until the band's merge is done.

    Raises
    ------
    TypeError, ValueError
        As :func:`cross_entropy`; also ``grad_output`` of the wrong shape or dtype.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> import nbxent.dask as nxd
    >>> logits = da.zeros((1, 4), dtype=np.float32, chunks=(1, 2))
    >>> loss, grad = nxd.cross_entropy_with_grad(logits, np.array([2]))
    >>> print(round(float(loss.compute(scheduler="sync")), 4), grad.compute(scheduler="sync"))
    1.3863 [[ 0.25  0.25 -0.75  0.25]]
    """
    opts = _checks.check_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    return _xent(
        logits, targets, weight, opts, grad=True, grad_output=grad_output, validate=validate, split_every=split_every
    )


def logsumexp(logits: Any, *, split_every: int | None = None) -> da.Array:
    """``log(sum(exp(logits)))`` over the last axis of Dask ``logits``, as a lazy Dask array;
    the values of :func:`nbxent.logsumexp`.

    Parameters
    ----------
    logits : dask.array.Array of shape (..., V)
        As in :func:`cross_entropy`.
    split_every : int, optional
        As in :func:`cross_entropy`.

    Returns
    -------
    dask.array.Array of shape (...)
        float64 for float64 logits, float32 otherwise. A row of all ``-inf`` gives ``-inf``.

    Raises
    ------
    TypeError, ValueError
        Logits not floating point, 0-d, with an empty last axis or unknown chunk sizes.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> import nbxent.dask as nxd
    >>> logits = da.from_array(np.array([[1e4, 1e4], [0.0, -np.inf]], dtype=np.float32), chunks=(1, 1))
    >>> print(nxd.logsumexp(logits).compute(scheduler="sync"))
    [10000.693     0.   ]
    """
    logits = _as_logits(logits)
    x = logits[None] if logits.ndim == 1 else logits
    acc = acc_dtype(x.dtype)
    rows_meta = np.empty((0,) * (x.ndim - 1), acc)
    if len(x.chunks[-1]) == 1:
        lse = x.map_blocks(
            _one_block_lse, chunks=(*x.chunks[:-1], (1,)), meta=np.empty((0,) * x.ndim, acc), token="nbxent-lse"
        )[..., 0]
    else:
        st = _stats(x, None, None, 0.0, False, split_every)
        lse = st[..., 0].map_blocks(_lse_block, acc=acc, meta=rows_meta, token="nbxent-lse")
    return lse[0] if logits.ndim == 1 else lse
