"""The CPU backend: NumPy arrays in, NumPy arrays out, through the kernels of ``_cpu``.

Both backends (this one and ``_backend_cuda``) offer the same two entry points, called by
``api`` after the scalar options are validated:

- ``xent(logits, targets, weight, opts, grad=..., grad_output=..., out=..., validate=..., stream=...)``
  returns ``(loss, grad or None)``;
- ``normalize(logits, mode, out, stream=...)`` returns the lse (mode ``MODE_LSE``) or the
  softmax / log-softmax array.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import NamedTuple

import numba
import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _checks, _cpu, _cpu_short, _cpu_split
from ._cpu import HALF_BF16, HALF_F16, MODE_LSE

_LOCK = threading.Lock()
_SAFE_LAYERS = ("tbb", "omp")

# Whether this process was forked from one whose GNU OpenMP thread pool was running (Numba's
# ``omp`` layer with libgomp, the layer of a pip-installed Numba without TBB). Such a child
# cannot use the pool: Numba terminates it on its first parallel launch ("Terminating: fork()
# called from a process already using GNU OpenMP, this is unsafe."), so a multiprocessing
# Pool (fork, Linux's default) whose workers called nbxent hung, each worker killed as it
# started. A child so forked runs every kernel on its own thread (``threads`` is 1), as PyTorch
# does in forked children; the bits are the same as on any thread count.
_POOL_LOST = False


def _after_fork_in_child() -> None:
    global _POOL_LOST
    try:
        layer = numba.threading_layer()
    except ValueError:  # the parent started no pool: the child may start its own
        return
    if layer == "omp":
        from numba.np.ufunc import omppool

        _POOL_LOST = _POOL_LOST or getattr(omppool, "openmp_vendor", "GNU") == "GNU"


os.register_at_fork(after_in_child=_after_fork_in_child)


def threads() -> int:
    """Numba's thread count for this thread, or 1 in a child forked from a running GNU
    OpenMP pool (``_POOL_LOST``)."""
    return 1 if _POOL_LOST else numba.get_num_threads()


@functools.cache
def _serial_twin(kernel):
    """``kernel`` compiled without ``parallel`` (its ``prange`` loops become plain loops), for
    a child that has lost the thread pool; compiled there on first use, not cached on disk
    (its cache file would be the parallel kernel's)."""
    options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}  # njit's own
    return numba.njit(**{**options, "parallel": False})(kernel.py_func)


def launch(kernel, *args) -> None:
    """Run a parallel kernel; serialized when the threading layer is not thread-safe.

    Numba's ``workqueue`` layer must not be entered from two threads at once; the layer is
    only known after the first parallel call, so that call is serialized too. In a child
    that has lost the thread pool (``_POOL_LOST``) the kernel's serial twin runs instead: the
    row kernels never get here there (``threads`` is 1), the ``nbxent.dask`` block kernels do.
    """
    if _POOL_LOST:
        _serial_twin(kernel)(*args)
        return
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        layer = None
    if layer in _SAFE_LAYERS:
        kernel(*args)
        return
    with _LOCK:
        kernel(*args)


# Below this many logits, waking the worker threads costs more than the work itself.
SERIAL_BELOW = 1 << 16
# What a row costs besides its logits, in logits: about 150 ns (its setup, the block calls,
# the log), where a logit costs 0.3-0.5 ns. Without it, 4096 rows of 10 logits ran on one
# thread in 662 us where two took 324 us (the Zen 3 VM; docs/cpu.md "The fixed cost of a call").
ROW_LOGITS = 512
# The same for the kernels of short rows (``_cpu_short``), whose rows cost 20-30 ns besides
# their logits, and whose logits cost more each (0.5-1 ns: short vectors): one thread was
# faster up to about 2048 rows of 10 and 512 rows of 100 (docs/cpu.md).
SHORT_ROW_LOGITS = 32


def run_rows(kernel, range_fn, n_rows: int, n_cols: int, *args, row_logits: int = ROW_LOGITS) -> None:
    """Run ``range_fn(lo, hi, *args)`` over rows ``0:n_rows``: directly for small inputs, else
    through the parallel ``kernel`` with a few row ranges per thread. A row counts as
    ``row_logits`` logits more than it has."""
    small = n_rows * (n_cols + row_logits) < SERIAL_BELOW
    if small or n_rows == 1 or (n_threads := threads()) == 1:
        range_fn(0, n_rows, *args)
    else:
        launch(kernel, min(n_rows, 4 * n_threads), n_rows, *args)


# Below this many logits, splitting rows among threads (``split_parts``) did not pay: one row
# of 65536 or 100000 float32 logits 0.88-1.07x, 131072 1.11-1.19x, 256000 1.31-1.38x
# (two threads against one, the Zen 3 VM; docs/cpu.md item 6).
SPLIT_BELOW = 1 << 17


def split_parts(n_rows: int, n_cols: int) -> int:
    """Into how many parts each row's vocabulary is split (``_cpu_split``), 1 for none: rows
    fewer than threads, each of more than one block of ``_cpu.STATS_BLOCK``, and enough work to
    wake the threads for. About 4 parts a thread, for balance. The split changes no bit."""
    n_blocks = -(-n_cols // _cpu.STATS_BLOCK)
    if n_rows * n_cols < SPLIT_BELOW or n_blocks < 2 or n_rows >= (n_threads := threads()):
        return 1
    return min(n_blocks, -(-4 * n_threads // max(n_rows, 1)))


def acc_dtype(dtype: np.dtype) -> type:
    """Accumulation dtype: float64 for float64 logits, float32 for everything else."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


class _Constants(NamedTuple):
    acc: type  # acc_dtype
    half: int  # _half_code
    n_cols: np.floating  # V in acc: the class-weight sum without weights
    cap: np.floating  # the options in acc, as the kernels take them
    eps: np.floating
    z: np.floating
    empty: np.ndarray  # zero-size stand-ins for the kernels' unused arrays: acc,
    empty_bits: np.ndarray  # the row buffer's dtype (uint16 bits for 16-bit logits),
    empty_off: np.ndarray  # and int64 offsets. Zero-size, never written: shared.


@functools.lru_cache(maxsize=64)
def _constants(dtype: np.dtype, n_cols: int, cap: float, eps: float, z: float) -> _Constants:
    """What ``xent`` hands the kernels besides the arrays, remembered: a call repeats the last
    one's dtype, V and options as a rule, and building these NumPy scalars and empty arrays
    took 3-4 us of a 19 us call on few logits."""
    acc = acc_dtype(dtype)
    half = _half_code(dtype)
    bits = np.uint16 if half else dtype
    empty = np.empty(0, dtype=acc)
    return _Constants(
        acc, half, acc(n_cols), acc(cap), acc(eps), acc(z), empty, np.empty(0, bits), np.empty(0, np.int64)
    )


def _half_code(dtype: np.dtype) -> int:
    """Which 16-bit format validated logits are in (0: none). Cheap: it runs on every call."""
    if dtype.itemsize != 2:
        return 0
    return HALF_F16 if dtype == np.float16 else HALF_BF16


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def row_view(a: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A 1-D view ``buf`` of ``a``'s memory and row offsets ``off`` such that
    ``buf[off[i] : off[i] + V]`` is row ``i`` of ``a.reshape(-1, V)``, without copying.

    Works for any layout whose last axis is contiguous and whose other strides are
    non-negative multiples of the item size (row-strided views included); None otherwise.
    16-bit arrays come back as uint16 views of their bits.
    """
    n_cols = a.shape[-1]
    item = a.itemsize
    bits = a.view(np.uint16) if _half_code(a.dtype) else a
    if a.flags.c_contiguous and a.size:  # the common case, without the general stride walk
        return bits.reshape(-1), _row_offsets(a.size // n_cols, n_cols)
    if a.size == 0:
        return np.empty(0, dtype=bits.dtype), np.zeros(a.size // max(n_cols, 1), dtype=np.int64)
    lead_shape = a.shape[:-1]
    lead_strides = tuple(0 if size == 1 else stride for size, stride in zip(lead_shape, a.strides[:-1], strict=True))
    if n_cols > 1 and a.strides[-1] != item:
        return None
    if any(s < 0 or s % item for s in lead_strides):
        return None
    off = np.zeros(lead_shape, dtype=np.int64)
    for axis, (size, stride) in enumerate(zip(lead_shape, lead_strides, strict=True)):
        index_shape = [1] * len(lead_shape)
        index_shape[axis] = size
        off += np.arange(size, dtype=np.int64).reshape(index_shape) * (stride // item)
    off = off.reshape(-1)
    span = int(off.max()) + n_cols
    return as_strided(bits, shape=(span,), strides=(item,)), off


# Above this many rows the arange is cheap beside the call, and not worth keeping.
_SHARED_OFFSETS_MAX_ROWS = 4096


def _arange_offsets(n_rows: int, n_cols: int) -> np.ndarray:
    return np.arange(0, n_rows * n_cols, n_cols, dtype=np.int64)


_shared_offsets = functools.lru_cache(maxsize=16)(_arange_offsets)


def _row_offsets(n_rows: int, n_cols: int) -> np.ndarray:
    """``arange(n_rows) * n_cols``, remembered for a few row counts (a tiny call repeats its
    shape). The kernels only read offsets, so the remembered array is shared."""
    if n_rows > _SHARED_OFFSETS_MAX_ROWS:
        return _arange_offsets(n_rows, n_cols)
    return _shared_offsets(n_rows, n_cols)


def _rows_of(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``row_view`` of ``a``, or of a contiguous copy when its layout has no such view."""
    view = row_view(a)
    return view if view is not None else row_view(np.ascontiguousarray(a))


def _output(out: np.ndarray | None, logits: np.ndarray):
    """Where a kernel writes an N x V result: ``(target array, buf, off, copy-back array,
    in place)``.

    ``out`` may be ``logits`` itself (in place: then ``buf, off`` are the logits' own row
    view). When ``out`` has a layout the kernels cannot address, they write to a temporary
    that is copied into ``out`` afterwards.
    """
    if out is None:
        out = np.empty(logits.shape, dtype=logits.dtype)
        buf, off = row_view(out)
        return out, buf, off, None, False
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array for NumPy logits, got {type(out).__name__}")
    _checks.check_out(out.shape, out.dtype, logits.shape, logits.dtype)
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")
    same = False
    if np.may_share_memory(out, logits):  # cheap, and False for a separate array
        same = _address(out) == _address(logits) and out.strides == logits.strides
        if not same and np.shares_memory(out, logits):
            raise ValueError("out overlaps logits without being logits itself; pass out=logits or a separate array")
    view = row_view(out)
    if view is None:
        tmp = np.empty(out.shape, dtype=out.dtype)
        buf, off = row_view(tmp)
        return tmp, buf, off, out, False
    return out, view[0], view[1], None, same


def _as_logits(logits) -> np.ndarray:
    logits = np.asarray(logits)
    _checks.check_logits(logits.shape, logits.dtype)
    return logits


def mean_divisor(xp, t, class_weight, ignore_index: int, n_classes: int) -> float:
    """The mean's divisor: the number of non-ignored rows, or the sum of their class weights
    (rows whose target is out of range, possible only with validate=False, count as weight 0).
    ``xp`` is the array namespace of ``t`` (NumPy here, CuPy for the linear loss on a GPU)."""
    kept = t != ignore_index
    if class_weight is None:
        return float(xp.count_nonzero(kept))
    in_range = kept & (t >= 0) & (t < n_classes)
    # selected, not multiplied by in_range: an ignored row reads class 0's weight, and a NaN or
    # inf there times 0 was NaN, where PyTorch sums the kept rows' weights alone
    picked = class_weight.astype(np.float64)[xp.where(in_range, t, 0)]
    with np.errstate(over="ignore", invalid="ignore"):  # inf + -inf is NaN, silently as in PyTorch
        return float(xp.sum(xp.where(in_range, picked, 0.0)))


# float32 rounds values of this magnitude and above to inf (2**128 - 2**103: halfway between
# its largest finite value and 2**128, a tie that rounds to even, the infinity).
_F32_OVERFLOW = 2.0**128 - 2.0**103


def _in_range_of(v: float, acc) -> float:
    """``v`` as ``acc(v)`` rounds it, beyond float32's range its signed infinity: the same value
    that NumPy's cast gives, without its 'overflow encountered in cast' warning."""
    if acc is np.float32 and abs(v) >= _F32_OVERFLOW:
        return math.copysign(math.inf, v)
    return v


def _row_scale(grad_output, reduction: str, targets_shape, n_rows: int, total_weight: float, acc) -> np.ndarray:
    """The factor each row's gradient is multiplied by."""
    go = np.asarray(grad_output)
    _checks.check_grad_output_dtype(go.dtype)
    _checks.check_grad_output_shape(go.shape, reduction, targets_shape)
    if reduction == "none":
        with np.errstate(over="ignore"):  # beyond float32's range: inf, as PyTorch's cast gives
            return np.ascontiguousarray(np.broadcast_to(go, targets_shape).reshape(-1), dtype=acc)
    g = float(go)
    if reduction == "mean":
        g = _divide(g, total_weight)
    scale = np.empty(n_rows, dtype=acc)
    scale.fill(_in_range_of(g, acc))  # np.full's fill, without its Python wrapper (3 us of a tiny call)
    return scale


def _divide(a: float, b: float) -> float:
    """``a / b`` as float64 division gives it (inf or NaN for ``b = 0``), without the cost of
    ``np.errstate`` where ``b`` is not 0 (Python's float division is IEEE's there)."""
    if b != 0.0:
        return a / b
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def xent(logits, targets, weight, opts: _checks.Options, *, grad: bool, grad_output, out, validate: bool, stream):
    """Cross-entropy loss (reduced per ``opts.reduction``) and, when ``grad``, its gradient."""
    if stream is not None:
        raise ValueError("stream= applies to GPU arrays only; these logits are a NumPy (CPU) array")
    logits = _as_logits(logits)
    n_cols = logits.shape[-1]
    targets = np.asarray(targets)
    _checks.check_targets(targets.shape, targets.dtype, logits.shape)
    k = _constants(logits.dtype, n_cols, opts.softcap, opts.label_smoothing, opts.z_loss)
    acc = k.acc
    if weight is None:
        w, w_sum = k.empty, k.n_cols
    else:
        weight = np.asarray(weight)
        _checks.check_weight(weight.shape, weight.dtype, n_cols)
        with np.errstate(over="ignore", invalid="ignore"):  # inf beyond float32, NaN from inf - inf
            w = np.ascontiguousarray(weight, dtype=acc)
            w_sum = acc(np.sum(w, dtype=np.float64))
    # The kernels guard the range themselves (an unchecked bad target gives a NaN row), so
    # clipping to int64 here can never turn into an out-of-bounds read.
    t = _checks.int64_targets(np, targets.reshape(-1))
    if validate:  # the range check counts the kept targets too: the mean's divisor without weights
        kept = _checks.check_target_range(targets, n_cols, opts.ignore_index, t)
    elif not w.size:  # (with weights the divisor is their sum, below: no count needed)
        kept = _cpu.scan_targets(t, n_cols, opts.ignore_index)[1]
    n_rows = t.size
    total_weight = mean_divisor(np, t, w, opts.ignore_index, n_cols) if w.size else float(kept)
    if grad:
        scale = _row_scale(grad_output, opts.reduction, targets.shape, n_rows, total_weight, acc)
        result, g_buf, g_off, copy_back, in_place = _output(out, logits)
    elif out is not None:
        raise ValueError("out= is where the gradient goes; cross_entropy computes no gradient")
    x_buf, x_off = _rows_of(logits)
    if not grad:  # empty stand-ins of the kernel's gradient arguments
        scale, g_buf, g_off, result, copy_back = k.empty, k.empty_bits, k.empty_off, None, None
        in_place = False
    loss_rows = np.empty(n_rows, dtype=acc)
    lse = np.empty(n_rows, dtype=acc)
    common = (x_buf, x_off, n_cols, t, opts.ignore_index, w, w_sum, k.cap, k.eps, k.z, scale, g_buf, g_off)
    half = k.half
    if n_cols <= _cpu_short.SHORT_COLS:  # chosen by V alone, so that the bits depend on nothing else
        args = (*common, half, n_cols <= _cpu_short.TINY_COLS, loss_rows, lse)
        kernel, range_fn = _cpu_short.xent_short_rows, _cpu_short.xent_short_range
        run_rows(kernel, range_fn, n_rows, n_cols, *args, row_logits=SHORT_ROW_LOGITS)
    elif half:
        claim = grad and not in_place and _cpu.claims_output(n_cols)
        if (parts := split_parts(n_rows, n_cols)) > 1:
            launch(_cpu_split.xent_split_16, parts, *common, half, claim, loss_rows, lse)
        else:
            ring = _cpu.scratch_ring(n_cols)  # the kernel takes one window for the loss alone
            args = (*common, half, ring, in_place, claim, loss_rows, lse)
            run_rows(_cpu.xent_rows_16, _cpu.xent_range_16, n_rows, n_cols, *args)
    elif not in_place and (parts := split_parts(n_rows, n_cols)) > 1:
        launch(_cpu_split.xent_split, parts, *common, loss_rows, lse)
    else:
        run_rows(_cpu.xent_rows, _cpu.xent_range, n_rows, n_cols, *common, in_place, loss_rows, lse)
    if copy_back is not None:
        np.copyto(copy_back, result)
        result = copy_back
    return _reduce(loss_rows, opts.reduction, targets.shape, total_weight, acc), result


def _reduce(loss_rows: np.ndarray, reduction: str, shape, total_weight: float, acc):
    """Reduce per-row losses in a fixed order (``_cpu.pairwise_total``, a float64 pairwise
    sum), so the result is the same for any thread count; 'mean' divides by the weight sum
    (NaN when it is 0). No NumPy floating-point warnings: losses of +inf and -inf give NaN,
    and a sum beyond float32's range inf, silently, as in PyTorch."""
    if reduction == "none":
        return loss_rows.reshape(shape)
    total = _cpu.pairwise_total(loss_rows)
    if reduction == "mean":
        total = _divide(total, total_weight)
    return acc(_in_range_of(total, acc))


def normalize(logits, mode: int, out, *, stream):
    """logsumexp (``MODE_LSE``), softmax or log-softmax over the last axis."""
    if stream is not None:
        raise ValueError("stream= applies to GPU arrays only; these logits are a NumPy (CPU) array")
    logits = _as_logits(logits)
    n_cols = logits.shape[-1]
    k = _constants(logits.dtype, n_cols, 0.0, 0.0, 0.0)
    acc, half = k.acc, k.half
    lse = np.empty(logits.size // n_cols, dtype=acc)  # V >= 1 (check_logits)
    x_buf, x_off = _rows_of(logits)
    if mode == MODE_LSE:
        result, copy_back, in_place = None, None, False
        # nothing is written: an empty stand-in (x_buf may be read-only)
        o_buf, o_off = k.empty_bits, k.empty_off
    else:
        result, o_buf, o_off, copy_back, in_place = _output(out, logits)
    common = (x_buf, x_off, n_cols, mode, o_buf, o_off)
    parts = split_parts(lse.size, n_cols)
    if n_cols <= _cpu_short.SHORT_COLS:  # by V alone, as in ``xent``
        args = (*common, half, n_cols <= _cpu_short.TINY_COLS, lse)
        kernel, range_fn = _cpu_short.normalize_short_rows, _cpu_short.normalize_short_range
        run_rows(kernel, range_fn, lse.size, n_cols, *args, row_logits=SHORT_ROW_LOGITS)
    elif half and parts > 1:
        launch(_cpu_split.normalize_split_16, parts, *common, half, lse)
    elif half:
        run_rows(_cpu.normalize_rows_16, _cpu.normalize_range_16, lse.size, n_cols, *common, half, lse)
    elif parts > 1:
        launch(_cpu_split.normalize_split, parts, *common, in_place, lse)
    else:
        run_rows(_cpu.normalize_rows, _cpu.normalize_range, lse.size, n_cols, *common, in_place, lse)
    if mode == MODE_LSE:
        return lse.reshape(logits.shape[:-1])
    if copy_back is not None:
        np.copyto(copy_back, result)
        result = copy_back
    return result
