"""Fused linear cross-entropy: the loss of ``logits = hidden @ weight.T + bias`` and its
gradients with respect to ``hidden``, ``weight`` and ``bias``, without ever holding all N x V
logits (for a language-model head they are the largest tensor in training).

The rows are processed in chunks whose logits fit a memory budget (``CHUNK_BYTES``):

1. Validate everything once, and compute the mean reduction's divisor (the number of
   non-ignored rows, or the sum of their class weights) from the targets alone, so that every
   chunk's gradient is scaled correctly as soon as it exists.
2. For each chunk: ``logits_c = hidden_c @ weight.T (+ bias)`` into one reused chunk buffer, by
   a matrix product of the array library (BLAS through NumPy, cuBLAS through CuPy).
3. The backend's fused kernel (the one ``cross_entropy_with_grad`` runs) turns ``logits_c``
   into per-row losses and overwrites it, in place, with ``g_c = d objective / d logits_c``:
   it is run with reduction 'none' and a per-row factor (grad_output, divided by the global
   divisor of step 1 for 'mean'), which is exactly the gradient of the whole batch's loss.
4. The chain rule through the matrix product: ``grad_hidden_c = g_c @ weight``,
   ``grad_weight += g_c.T @ hidden_c`` and ``grad_bias += g_c.sum(0)``. NumPy's matmul cannot
   accumulate into its output, so ``grad_weight`` is accumulated a block of vocabulary rows
   at a time through a scratch of 16 MiB, never a second V x H array.

Memory beyond the inputs and the returned gradients: the chunk buffer (64 MiB by default) and
the 16 MiB scratch. Time: the same three matrix products as the materialized path, in chunks
of hundreds of rows that BLAS runs at full speed, plus one add over ``grad_weight`` per chunk.

The chunk loop (``chunked_linear_xent``) sees only an array namespace ``xp`` and a callable
that runs the fused kernel on one chunk, so the CPU (NumPy) and GPU (CuPy) paths share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _backend_cpu, _checks
from .api import is_gpu_array

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad"]

# The default memory budget of one chunk's logits (``chunk_size`` rows overrides it).
CHUNK_BYTES = 64 * 2**20
# The budget of the scratch through which grad_weight is accumulated, a block of rows at a time:
# 8192 rows of 512 floats. Blocks of 2048 rows cost 10 % more CPU time at the shape
# (each block is a BLAS call that packs hidden_c again); a whole (V, H) scratch gains nothing.
SCRATCH_BYTES = 16 * 2**20

HEAD_DTYPES = ("float32", "float64")

# fused(logits_c, targets_c, scale_c) -> per-row losses of the chunk; when scale_c (the
# per-row gradient factor) is not None it also overwrites logits_c with the gradient.
FusedChunk = Callable[[Any, Any, Any], Any]


def linear_cross_entropy(
    hidden: Any,
    weight: Any,
    targets: Any,
    *,
    bias: Any = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool = True,
    stream: Any = None,
) -> Any:
    """Softmax cross-entropy of ``hidden @ weight.T + bias`` against integer ``targets``,
    computed a chunk of rows at a time, so the N x V logits never exist at once.

    Equal to ``cross_entropy(hidden @ weight.T + bias, targets, ...)`` with the same options;
    only the memory differs.

    Parameters
    ----------
    hidden : array of shape (..., H)
        float32 or float64; leading axes are flattened into N rows. A NumPy array runs on the
        CPU; a CuPy array on its GPU (other array arguments are then CuPy arrays, or host
        arrays that are copied to the GPU).
    weight : array of shape (V, H)
        The output projection (a language-model head's layout), the dtype of ``hidden``.
    targets : integer array of shape (...)
        ``hidden``'s shape without its last axis; class ids in ``[0, V)``, or ``ignore_index``.
    bias : array of shape (V,), optional
        Added to every row of logits; the dtype of ``hidden``.
    chunk_size : int >= 1, optional
        Rows per chunk. By default as many as keep one chunk's logits within ``CHUNK_BYTES``
        (64 MiB): 524 rows for V = 32000 in float32.
    reduction, ignore_index, label_smoothing, z_loss, softcap, validate, stream
        As in :func:`nbxent.cross_entropy`.
    class_weight : array of shape (V,), optional
        Per-class weights: the ``weight`` option of :func:`nbxent.cross_entropy` (PyTorch's
        ``weight``), renamed because ``weight`` is the projection here.

    Returns
    -------
    loss
        A scalar for 'mean' and 'sum', an array shaped like ``targets`` for 'none'; in the
        dtype of ``hidden``.

    Raises
    ------
    TypeError
        ``hidden``/``weight``/``bias`` not float32 or float64 or of different dtypes (16-bit
        inputs included: NumPy has no 16-bit matrix product; convert with ``.astype(np.float32)``),
        arrays of different kinds (NumPy and CuPy), targets not integers, or an option of the
        wrong type.
    ValueError
        A shape mismatch between ``hidden``, ``weight``, ``bias``, ``targets`` and
        ``class_weight``; a target outside ``[0, V)`` that is not ``ignore_index``; a
        ``chunk_size`` below 1; or an option out of its range.

    Examples
    --------
    Three classes whose logits are ``[2, 0, 0]`` and ``[0, 2, 0]``; both rows hit their target:

    >>> import numpy as np
    >>> from nbxent.linear import linear_cross_entropy
    >>> hidden = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> weight = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=np.float32)
    >>> print(round(float(linear_cross_entropy(hidden, weight, np.array([0, 1]))), 4))
    0.2395
    """
    result = _linear_xent(
        hidden,
        weight,
        targets,
        _checks.check_options(reduction, ignore_index, label_smoothing, z_loss, softcap),
        bias=bias,
        chunk_size=chunk_size,
        class_weight=class_weight,
        validate=validate,
        stream=stream,
        grad=False,
        grad_output=None,
    )
    return result[0]


def linear_cross_entropy_with_grad(
    hidden: Any,
    weight: Any,
    targets: Any,
    *,
    bias: Any = None,
    chunk_size: int | None = None,
    grad_output: Any = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool = True,
    stream: Any = None,
) -> tuple[Any, ...]:
    """The loss of :func:`linear_cross_entropy` and its gradients with respect to ``hidden``,
    ``weight`` and (when given) ``bias``, from one pass over the chunks of rows.

    Parameters
    ----------
    hidden, weight, targets, bias, chunk_size, class_weight
        As in :func:`linear_cross_entropy`.
    grad_output : scalar, or for reduction='none' an array shaped like ``targets``
        The gradient of the final objective with respect to the loss (1 by default).
    reduction, ignore_index, label_smoothing, z_loss, softcap, validate, stream
        As in :func:`nbxent.cross_entropy`.

    Returns
    -------
    (loss, grad_hidden, grad_weight) or (loss, grad_hidden, grad_weight, grad_bias)
        ``grad_bias`` only when ``bias`` is given. Each gradient has the shape and dtype of
        its input; the arrays are of the inputs' kind (NumPy or CuPy).

    Raises
    ------
    TypeError, ValueError
        As :func:`linear_cross_entropy`; also ``grad_output`` of the wrong shape or dtype.

    Examples
    --------
    Zero logits over four classes: the gradient of the logits is ``softmax - onehot``, and
    the chain rule carries it to the projection and the bias:

    >>> import numpy as np
    >>> from nbxent.linear import linear_cross_entropy_with_grad
    >>> hidden = np.ones((1, 2), dtype=np.float32)
    >>> weight = np.zeros((4, 2), dtype=np.float32)
    >>> loss, g_hidden, g_weight, g_bias = linear_cross_entropy_with_grad(
    ...     hidden, weight, np.array([2]), bias=np.zeros(4, dtype=np.float32))
    >>> print(round(float(loss), 4), g_bias)
    1.3863 [ 0.25  0.25 -0.75  0.25]
    >>> print(g_weight[2], g_hidden)
    [-0.75 -0.75] [[0. 0.]]
    """
    return _linear_xent(
        hidden,
        weight,
        targets,
        _checks.check_options(reduction, ignore_index, label_smoothing, z_loss, softcap),
        bias=bias,
        chunk_size=chunk_size,
        class_weight=class_weight,
        validate=validate,
        stream=stream,
        grad=True,
        grad_output=grad_output,
    )


@dataclasses.dataclass(frozen=True)
class Device:
    """Where a call runs: the array namespace, the backend whose ``xent`` is the fused kernel,
    a device-to-host copy (for the checks that read values), and the context that makes the
    matrix products run on the kernels' stream."""

    xp: Any
    backend: Any
    to_host: Callable[[Any], np.ndarray]
    stream_context: Any


def _device(hidden, others: dict, stream) -> Device:
    """The CPU for NumPy inputs, the GPU for CuPy inputs; every array from one of them."""
    if not is_gpu_array(hidden):
        if any(a is not None and is_gpu_array(a) for a in others.values()):
            raise TypeError(
                "hidden is a NumPy (CPU) array but another argument is a GPU array; pass all arrays from one device"
            )
        if stream is not None:
            raise ValueError("stream= applies to GPU arrays only; these arrays are NumPy (CPU) arrays")
        return Device(np, _backend_cpu, np.asarray, contextlib.nullcontext())
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(
            f"hidden is a GPU array; the linear functions run on the GPU through CuPy, which is not available ({e})"
        ) from e
    for label, array in {"hidden": hidden, **others}.items():
        if array is not None and is_gpu_array(array) and not isinstance(array, cupy.ndarray):
            raise TypeError(
                f"{label} is a {type(array).__module__}.{type(array).__name__}; on the GPU the array arguments "
                f"must be CuPy arrays: convert with cupy.asarray({label})"
            )
    try:
        from . import _backend_cuda
    except ImportError as e:
        raise RuntimeError(
            f"hidden is a GPU array but CUDA support is not available ({e}); "
            "install it with: pip install 'nbxent[cuda]'"
        ) from e
    return Device(cupy, _backend_cuda, cupy.asnumpy, _cupy_stream(cupy, stream))


def _cupy_stream(cupy, stream):
    """A context making ``stream`` CuPy's current stream, so the matrix products (CuPy) and
    the fused kernel (which launches on CuPy's current stream) are ordered on it."""
    if stream is None:
        return contextlib.nullcontext()
    if isinstance(stream, cupy.cuda.Stream):
        return stream
    handle = stream if isinstance(stream, int) and not isinstance(stream, bool) else None
    for attribute in ("ptr", "cuda_stream"):  # CuPy, PyTorch
        if handle is None and isinstance(getattr(stream, attribute, None), int):
            handle = getattr(stream, attribute)
    if handle is None:
        raise TypeError(
            "stream must be a CuPy stream, a CUDA stream handle (int) or an object with a ptr or "
            f"cuda_stream attribute (PyTorch); got {type(stream).__name__}"
        )
    return cupy.cuda.ExternalStream(handle)


def _linear_xent(
    hidden,
    weight,
    targets,
    opts: _checks.Options,
    *,
    bias,
    chunk_size,
    class_weight,
    validate,
    stream,
    grad,
    grad_output,
) -> tuple:
    """The body of both public functions: ``(loss,)``, or ``(loss, grad_hidden, grad_weight[, grad_bias])``."""
    others = {"weight": weight, "targets": targets, "bias": bias, "class_weight": class_weight}
    device = _device(hidden, others, stream)
    with device.stream_context:
        return _run(device, hidden, weight, targets, opts, bias, chunk_size, class_weight, validate, grad, grad_output)


def _run(device: Device, hidden, weight, targets, opts, bias, chunk_size, class_weight, validate, grad, grad_output):
    """Validate, compute the mean's divisor and the per-row gradient factors, run the chunks,
    reduce."""
    xp = device.xp
    hidden, weight, targets = xp.asarray(hidden), xp.asarray(weight), xp.asarray(targets)
    bias = None if bias is None else xp.asarray(bias)
    n_hidden, n_classes = _check_head(hidden, weight, bias)
    _checks.check_targets(targets.shape, targets.dtype, hidden.shape[:-1] + (n_classes,))
    chunk = _check_chunk_size(chunk_size)
    dtype = np.dtype(hidden.dtype)
    acc = _backend_cpu.acc_dtype(dtype)
    if class_weight is not None:
        class_weight = xp.asarray(class_weight)
        _checks.check_weight(class_weight.shape, class_weight.dtype, n_classes, name="class_weight")
        class_weight = xp.ascontiguousarray(class_weight, dtype=acc)
    if validate:
        _checks.check_target_range(device.to_host(targets), n_classes, opts.ignore_index)
    t = _checks.int64_targets(xp, targets.reshape(-1))
    n_rows = int(t.size)
    total_weight = _backend_cpu.mean_divisor(xp, t, class_weight, opts.ignore_index, n_classes)
    scale = None
    if grad:
        go = device.to_host(grad_output)
        scale = xp.asarray(_backend_cpu._row_scale(go, opts.reduction, targets.shape, n_rows, total_weight, acc))
    # A chunk needs the rows contiguous, and the projection in a layout BLAS reads directly:
    # copy once here rather than once per chunk inside matmul.
    hidden2d = xp.ascontiguousarray(hidden.reshape(n_rows, n_hidden))
    if not (weight.flags.c_contiguous or weight.flags.f_contiguous):
        weight = xp.ascontiguousarray(weight)
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (n_classes * dtype.itemsize))
    fused = fused_chunk(device.backend, class_weight, dataclasses.replace(opts, reduction="none"))
    loss_rows, grads = chunked_linear_xent(xp, fused, hidden2d, weight, bias, t, scale, chunk)
    loss = _reduce(xp, loss_rows, opts.reduction, targets.shape, total_weight, acc)
    if not grad:
        return (loss,)
    grad_hidden, grad_weight, grad_bias = grads
    result = (loss, grad_hidden.reshape(hidden.shape), grad_weight)
    return result if bias is None else (*result, grad_bias)


def fused_chunk(backend, class_weight, row_opts: _checks.Options) -> FusedChunk:
    """The fused kernel of ``backend`` on one chunk, as ``chunked_linear_xent`` calls it.

    It runs with reduction 'none' and ``grad_output`` = the per-row factor (grad_output,
    divided by the whole batch's weight sum for 'mean'): each row's gradient is then exactly
    that row's share of the gradient of the whole batch's loss.
    """

    def fused(logits_c, targets_c, scale_c):
        want_grad = scale_c is not None
        loss_c, _ = backend.xent(
            logits_c,
            targets_c,
            class_weight,
            row_opts,
            grad=want_grad,
            grad_output=scale_c,
            out=logits_c if want_grad else None,
            validate=False,
            stream=None,  # the current stream of the array library (see _cupy_stream)
        )
        return loss_c

    return fused


def chunked_linear_xent(xp, fused: FusedChunk, hidden2d, weight, bias, targets, scale, chunk: int):
    """The chunk loop, for any array namespace ``xp`` (NumPy or CuPy).

    Parameters
    ----------
    xp : module
        ``numpy`` or ``cupy``: where the chunk buffer lives and whose ``matmul`` runs.
    fused : callable
        ``fused(logits_c, targets_c, scale_c)`` returns the chunk's per-row losses and, when
        ``scale_c`` is not None, overwrites ``logits_c`` with their gradient times ``scale_c``.
    hidden2d : (N, H) C-contiguous array
    weight : (V, H) array, C- or F-contiguous
    bias : (V,) array or None
    targets : (N,) int64 array
    scale : (N,) array of per-row gradient factors, or None for the loss alone
    chunk : rows per chunk, >= 1

    Returns
    -------
    (loss_rows, grads)
        ``loss_rows`` of shape (N,); ``grads`` is ``(grad_hidden, grad_weight, grad_bias)``
        (``grad_bias`` None without a bias), or None without ``scale``.
    """
    n_rows, n_hidden = hidden2d.shape
    n_classes = weight.shape[0]
    dtype = hidden2d.dtype
    want_grad = scale is not None
    loss_rows = xp.empty(n_rows, dtype=_backend_cpu.acc_dtype(dtype))
    if want_grad:
        grad_hidden = xp.empty((n_rows, n_hidden), dtype=dtype)
        grad_weight = xp.zeros((n_classes, n_hidden), dtype=dtype)
        # float64 sums of up to N gradient rows; cast to the bias's dtype at the end
        grad_bias = None if bias is None else xp.zeros(n_classes, dtype=np.float64)
        block = max(1, min(n_classes, SCRATCH_BYTES // max(1, n_hidden * dtype.itemsize)))
        scratch = xp.empty((block, n_hidden), dtype=dtype)
    chunk = max(1, min(chunk, n_rows))
    buffer = xp.empty((chunk, n_classes), dtype=dtype)
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        hidden_c = hidden2d[start:stop]
        # 1. The chunk's logits, in the one reused buffer.
        logits_c = buffer[: stop - start]
        xp.matmul(hidden_c, weight.T, out=logits_c)
        if bias is not None:
            xp.add(logits_c, bias, out=logits_c)
        # 2. Per-row losses, and the gradient of the logits written over them.
        loss_rows[start:stop] = fused(logits_c, targets[start:stop], scale[start:stop] if want_grad else None)
        if not want_grad:
            continue
        # 3. The chain rule through logits = hidden @ weight.T + bias.
        xp.matmul(logits_c, weight, out=grad_hidden[start:stop])
        if start == 0:
            xp.matmul(logits_c.T, hidden_c, out=grad_weight)
        else:
            _accumulate_matmul(xp, logits_c.T, hidden_c, grad_weight, scratch)
        if bias is not None:
            xp.add(grad_bias, logits_c.sum(axis=0, dtype=np.float64), out=grad_bias)
    if not want_grad:
        return loss_rows, None
    if bias is not None:
        grad_bias = grad_bias.astype(bias.dtype)
    return loss_rows, (grad_hidden, grad_weight, grad_bias)


def _accumulate_matmul(xp, a, b, out, scratch) -> None:
    """``out += a @ b`` through ``scratch``, a block of ``out``'s rows at a time.

    BLAS could accumulate in place (beta = 1) but ``matmul`` exposes no beta; blocks of
    thousands of rows keep the products large enough to run at full speed without a second
    ``out``.
    """
    block = scratch.shape[0]
    for row in range(0, out.shape[0], block):
        part = scratch[: min(out.shape[0], row + block) - row]
        xp.matmul(a[row : row + block], b, out=part)
        xp.add(out[row : row + block], part, out=out[row : row + block])


def _reduce(xp, loss_rows, reduction: str, shape, total_weight: float, acc):
    """As ``cross_entropy`` reduces: a float64 sum in a fixed order; 'mean' divides by the
    weight sum (NaN when it is 0). On the CPU it is ``cross_entropy``'s own reduction (the same
    bits from the same row losses); on a GPU, CuPy's sum."""
    if xp is np:
        return _backend_cpu._reduce(loss_rows, reduction, shape, total_weight, acc)
    if reduction == "none":
        return loss_rows.reshape(shape)
    # NaN from losses of +inf and -inf, inf beyond float32, 0 / 0: silently, as in PyTorch
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        total = xp.sum(loss_rows, dtype=np.float64)
        if reduction == "mean":
            total = total / np.float64(total_weight)
        return total.astype(acc)


def _check_head(hidden, weight, bias) -> tuple[int, int]:
    """``hidden`` (..., H), ``weight`` (V, H) and ``bias`` (V,), all float32 or all float64;
    returns ``(H, V)``."""
    name = np.dtype(hidden.dtype).name
    if name not in HEAD_DTYPES:
        hint = " (NumPy has no 16-bit matrix product)" if name in ("float16", "bfloat16") else ""
        raise TypeError(f"hidden must be float32 or float64{hint}, got {name}; convert with hidden.astype(np.float32)")
    if hidden.ndim == 0:
        raise ValueError("hidden must have at least one axis (the hidden axis, last); got a 0-d array")
    n_hidden = int(hidden.shape[-1])
    for label, array in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if array is None:
            continue
        _checks.check_native(array.dtype, label)
        if np.dtype(array.dtype) != np.dtype(name):
            raise TypeError(
                f"{label} has dtype {np.dtype(array.dtype).name} but hidden has {name}; they must match: "
                f"convert with {label}.astype(np.{name})"
            )
    if weight.ndim != 2 or weight.shape[1] != n_hidden:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but must be (V, {n_hidden}): one row of H = {n_hidden} "
            "(hidden's last axis) per class, the layout of a language-model head (transpose a (H, V) matrix)"
        )
    n_classes = int(weight.shape[0])
    if n_classes == 0:
        raise ValueError("weight has no rows; the vocabulary must have at least one class")
    if bias is not None and tuple(bias.shape) != (n_classes,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; it needs one entry per class, shape ({n_classes},)")
    return n_hidden, n_classes


def _check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an integer number of rows (or None), got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 row (or None for the 64 MiB default), got {chunk_size}")
    return int(chunk_size)
