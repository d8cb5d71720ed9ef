"""Argument checks shared by every backend: each public call validates once, here, before any
kernel runs, and every message says what was wrong and how to fix it.

The checks look only at shapes, NumPy dtypes and Python scalars, so the CPU path (NumPy
arrays) and the GPU path (any CUDA array, described by shape and dtype) share them.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np

# The one jitted check (imported with the package anyway; here once, not on every call,
# where the import statement cost more than the search)
from ._cpu import scan_targets

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Options:
    """The loss options, validated. ``softcap`` is 0.0 when soft-capping is off."""

    reduction: str
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float


def _finite_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_options(
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Options:
    """Validate the scalar options of every loss function. A call repeats the last one's options
    as a rule, so validated options are remembered (by value and type: ``True`` is not ``1``)."""
    try:
        return _checked_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    except TypeError:
        if _hashable(reduction, ignore_index, label_smoothing, z_loss, softcap):
            raise
    return _check_options(reduction, ignore_index, label_smoothing, z_loss, softcap)


def _hashable(*values: object) -> bool:
    try:
        hash(values)
    except TypeError:
        return False
    return True


def _check_options(
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Options:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    label_smoothing = _finite_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z_loss = _finite_real("z_loss", z_loss)
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0 (it scales lse**2), got {z_loss}")
    if softcap is None:
        cap = 0.0
    else:
        cap = _finite_real("softcap", softcap)
        if cap <= 0.0:
            raise ValueError(f"softcap must be a positive number (or None for no capping), got {cap}")
    return Options(reduction, ignore_index, label_smoothing, z_loss, cap)


_checked_options = functools.lru_cache(maxsize=64, typed=True)(_check_options)


@functools.cache
def _dtype_name(dtype) -> str:
    """``np.dtype(dtype).name``, remembered: the name is built anew on every lookup (3 us)."""
    return np.dtype(dtype).name


def check_native(dtype, what: str, fix: str = "") -> None:
    """TypeError for numbers stored in the other byte order (a big-endian ``'>f4'`` on this
    machine): the kernels read memory as native numbers, so Numba refused the float32/64
    kinds with an internal typing error and read byte-swapped float16 bits as other numbers
    (a loss of 3e22 for 2.7). Arrays that are converted before use (targets, class weights,
    ``grad_output``) need no check. ``fix`` replaces the hint to convert."""
    dtype = np.dtype(dtype)
    if not dtype.isnative:
        order = "big" if dtype.byteorder == ">" else "little"
        raise TypeError(
            f"{what} has dtype {dtype.str!r}: {order}-endian {dtype.name}, not this machine's byte order; "
            + (fix or f"convert with {what}.astype(np.{dtype.name})")
        )


def logit_dtype_name(dtype: np.dtype) -> str:
    """The name of a supported logits dtype in native byte order; TypeError for anything else."""
    name = _dtype_name(dtype)
    if name not in LOGIT_DTYPES:
        raise TypeError(
            f"logits must be float16, bfloat16, float32 or float64, got {name}; convert with logits.astype(np.float32)"
        )
    check_native(dtype, "logits")
    return name


def check_logits(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Check a logits array of shape (..., V); returns V."""
    logit_dtype_name(dtype)
    if len(shape) == 0:
        raise ValueError("logits must have at least one axis (the vocabulary axis, last); got a 0-d array")
    if shape[-1] == 0:
        raise ValueError(f"logits have an empty vocabulary axis (shape {tuple(shape)}); V must be at least 1")
    return int(shape[-1])


def check_targets(shape: tuple[int, ...], dtype: np.dtype, logits_shape: tuple[int, ...]) -> None:
    """Targets must be integers shaped like the logits without their last axis."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise TypeError(f"targets must have an integer dtype, got {dtype.name}; convert with targets.astype(np.int64)")
    if tuple(shape) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"targets have shape {tuple(shape)} but logits of shape {tuple(logits_shape)} need targets of shape "
            f"{tuple(logits_shape[:-1])} (the logits' shape without the vocabulary axis)"
        )


def target_range_error(position: tuple[int, ...], value: int, n_classes: int, ignore_index: int) -> ValueError:
    """The error for the first target that is neither a class id nor ignore_index."""
    where = ", ".join(str(p) for p in position)
    return ValueError(
        f"targets[{where}] = {value} is outside [0, {n_classes}); use ignore_index (now {ignore_index}) for padding"
    )


def int64_targets(xp, t):
    """Targets as int64 (``xp``: NumPy, or CuPy for GPU targets). Only uint64 can exceed int64:
    its huge values are clipped, so they stay out of range (an unvalidated one gives a NaN row;
    the kernels never read out of bounds)."""
    if t.dtype == np.uint64:
        t = xp.minimum(t, np.uint64(2**63 - 1))
    return t.astype(np.int64, copy=False)


def check_target_range(targets: np.ndarray, n_classes: int, ignore_index: int, flat=None) -> int:
    """ValueError naming the first target outside [0, V) that is not ignore_index; else the
    number of targets that are not ignore_index. ``flat`` is ``int64_targets`` of the
    flattened targets, where the caller has it already. One jitted loop
    (``_cpu.scan_targets``)."""
    if flat is None:
        flat = int64_targets(np, targets.reshape(-1))
    bad, kept = scan_targets(flat, n_classes, ignore_index)
    if bad >= 0:
        position = tuple(int(p) for p in np.unravel_index(bad, targets.shape))
        raise target_range_error(position, int(targets.reshape(-1)[bad]), n_classes, ignore_index)
    return kept


def check_weight(shape: tuple[int, ...], dtype: np.dtype, n_classes: int, name: str = "weight") -> None:
    """Class weights (the option ``name``) must be a real vector of shape (V,)."""
    if np.dtype(dtype).kind not in "fiu" or np.dtype(dtype).kind == "b":
        raise TypeError(f"{name} must hold real numbers, got {np.dtype(dtype).name}")
    if tuple(shape) != (n_classes,):
        raise ValueError(f"{name} has shape {tuple(shape)}; it needs one entry per class, shape ({n_classes},)")


def check_out(shape: tuple[int, ...], dtype: np.dtype, logits_shape: tuple[int, ...], logits_dtype: np.dtype) -> None:
    """``out`` must match the logits in shape and dtype."""
    if tuple(shape) != tuple(logits_shape):
        raise ValueError(f"out has shape {tuple(shape)} but must have the logits' shape {tuple(logits_shape)}")
    check_native(dtype, "out", "pass an array in native order, such as np.empty_like(logits)")
    if np.dtype(dtype) != np.dtype(logits_dtype):
        raise TypeError(
            f"out has dtype {np.dtype(dtype).name} but must have the logits' dtype {np.dtype(logits_dtype).name}"
        )


def check_grad_output_shape(shape: tuple[int, ...], reduction: str, targets_shape: tuple[int, ...]) -> None:
    """grad_output: a scalar, or for reduction='none' an array shaped like targets."""
    if len(shape) == 0:
        return
    if reduction != "none":
        raise ValueError(
            f"grad_output must be a scalar for reduction={reduction!r} (the loss is a scalar), "
            f"got an array of shape {tuple(shape)}"
        )
    if tuple(shape) != tuple(targets_shape):
        raise ValueError(
            f"grad_output has shape {tuple(shape)}; for reduction='none' it must be a scalar or have the "
            f"targets' shape {tuple(targets_shape)}"
        )


def check_grad_output_dtype(dtype: np.dtype) -> None:
    if np.dtype(dtype).kind not in "fiu":
        raise TypeError(f"grad_output must hold real numbers, got {np.dtype(dtype).name}")
