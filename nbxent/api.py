"""The public functions. Each validates its options once, picks the backend from the kind of
``logits`` (NumPy: CPU; any CUDA array: GPU), and returns results in the caller's array kind.

The loss is PyTorch's ``F.cross_entropy`` over ``logits.reshape(-1, V)`` and
``targets.reshape(-1)``, with the same ``weight``, ``ignore_index``, ``reduction`` and
``label_smoothing`` semantics, plus two options PyTorch lacks in one kernel: ``z_loss``
(PaLM's auxiliary ``z * lse**2`` per row) and ``softcap`` (Gemma 2's ``c * tanh(x / c)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _backend_cpu, _checks
from ._cpu import MODE_LOG_SOFTMAX, MODE_LSE, MODE_SOFTMAX

__all__ = [
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_with_grad",
    "log_softmax",
    "logsumexp",
    "softmax",
]

_CUDA_DEVICE_TYPES = (2, 13)  # DLPack's kDLCUDA and kDLCUDAManaged


def is_gpu_array(a: Any) -> bool:
    """True for arrays that live on an NVIDIA GPU (CUDA array interface or a CUDA DLPack device)."""
    if isinstance(a, np.ndarray):  # the common case, without three attribute lookups and a DLPack call
        return False
    if hasattr(a, "__cuda_array_interface__") or getattr(a, "__cuda_ndarray__", False):
        return True
    dlpack_device = getattr(a, "__dlpack_device__", None)
    if dlpack_device is None:
        return False
    try:
        return dlpack_device()[0] in _CUDA_DEVICE_TYPES
    except Exception:
        return False


def _backend(logits: Any):
    if not is_gpu_array(logits):
        return _backend_cpu
    try:
        from . import _backend_cuda
    except ImportError as e:  # numba-cuda or its toolkit missing
        raise RuntimeError(
            f"logits are a GPU array but CUDA support is not available ({e}); "
            "install it with: pip install 'nbxent[cuda]'"
        ) from e
    return _backend_cuda


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
    stream: Any = None,
) -> Any:
    """Softmax cross-entropy of ``logits`` against integer ``targets``.

    Parameters
    ----------
    logits : array of shape (..., V)
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64; the vocabulary is the
        last axis and leading axes are flattened. Row-strided views are read without a copy.
        A NumPy array runs on the CPU; a CUDA array (CuPy, PyTorch, Numba) on its GPU.
    targets : integer array of shape (...)
        Class ids in ``[0, V)``, or ``ignore_index``.
    reduction : {'mean', 'sum', 'none'}
        'mean' divides the summed loss by the number of non-ignored rows (by the sum of
        ``weight[target]`` over them when weighted); it is NaN when there are none.
    ignore_index : int
        Rows whose target equals it have loss 0 and gradient 0. Any integer, also a class id.
    label_smoothing : float in [0, 1]
        PyTorch's label smoothing, combined with ``weight`` exactly as PyTorch does.
    weight : array of shape (V,), optional
        Per-class weights.
    z_loss : float >= 0
        Adds ``weight[target] * z_loss * lse**2`` to each non-ignored row, before reduction.
    softcap : float > 0, optional
        Replaces the logits by ``softcap * tanh(logits / softcap)`` before everything else.
    validate : bool
        Check that every target is in range (on a GPU this synchronizes). With False, a bad
        target gives NaN for its row; memory is never read out of bounds.
    stream : optional
        GPU only: the CUDA stream to launch on (default: the array library's current stream).

    Returns
    -------
    loss
        A scalar for 'mean' and 'sum', an array shaped like ``targets`` for 'none'; float64 for
        float64 logits, float32 otherwise. NumPy on the CPU, the caller's kind on a GPU.

    Raises
    ------
    TypeError
        Logits not floating point, targets not integers, or an option of the wrong type.
    ValueError
        A target outside ``[0, V)`` that is not ``ignore_index`` (naming its position), a
        shape mismatch, 0-d logits, an unknown reduction, or an option out of its range.

    Examples
    --------
    A model that gives the target token probability 0.7 has loss -ln 0.7:

    >>> import numpy as np, nbxent as nx
    >>> logits = np.log(np.array([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]], dtype=np.float32))
    >>> print(nx.cross_entropy(logits, np.array([0, 1]), reduction="none").round(3))
    [0.357 0.105]
    """
    opts = _checks.check_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    loss, _ = _backend(logits).xent(
        logits, targets, weight, opts, grad=False, grad_output=None, out=None, validate=validate, stream=stream
    )
    return loss


def cross_entropy_with_grad(
    logits: Any,
    targets: Any,
    *,
    grad_output: Any = 1.0,
    out: Any = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool = True,
    stream: Any = None,
) -> tuple[Any, Any]:
    """The loss of :func:`cross_entropy` and its gradient with respect to ``logits``, from one
    fused pass over each row.

    Parameters
    ----------
    logits, targets, reduction, ignore_index, label_smoothing, weight, z_loss, softcap, validate, stream
        As in :func:`cross_entropy`.
    grad_output : scalar, or for reduction='none' an array shaped like ``targets``
        The gradient of the final objective with respect to the loss (1 by default).
    out : array shaped and typed like ``logits``, optional
        Where the gradient is written. ``out=logits`` overwrites the logits with their gradient
        and allocates nothing of size N x V. Otherwise the inputs are never modified.

    Returns
    -------
    (loss, grad)
        ``grad`` has the logits' shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`cross_entropy`; also ``out`` of the wrong shape or dtype, and
        ``grad_output`` of the wrong shape.

    Examples
    --------
    >>> import numpy as np, nbxent as nx
    >>> logits = np.zeros((1, 4), dtype=np.float32)
    >>> loss, grad = nx.cross_entropy_with_grad(logits, np.array([2]))
    >>> print(round(float(loss), 4), grad)
    1.3863 [[ 0.25  0.25 -0.75  0.25]]
    """
    opts = _checks.check_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    return _backend(logits).xent(
        logits, targets, weight, opts, grad=True, grad_output=grad_output, out=out, validate=validate, stream=stream
    )


def cross_entropy_backward(
    logits: Any,
    targets: Any,
    grad_output: Any = 1.0,
    *,
    out: Any = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool = True,
    stream: Any = None,
) -> Any:
    """The gradient of :func:`cross_entropy` with respect to ``logits``, times ``grad_output``.

    Parameters and errors are those of :func:`cross_entropy_with_grad`.

    Returns
    -------
    grad
        Shaped and typed like ``logits`` (``out`` when given).

    Examples
    --------
    >>> import numpy as np, nbxent as nx
    >>> logits = np.zeros((2, 2), dtype=np.float32)
    >>> print(nx.cross_entropy_backward(logits, np.array([0, -100]), 2.0))
    [[-1.  1.]
     [ 0.  0.]]
    """
    _, grad = cross_entropy_with_grad(
        logits,
        targets,
        grad_output=grad_output,
        out=out,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        weight=weight,
        z_loss=z_loss,
        softcap=softcap,
        validate=validate,
        stream=stream,
    )
    return grad


def logsumexp(logits: Any, *, stream: Any = None) -> Any:
    """``log(sum(exp(logits)))`` over the last axis, computed stably.

    Parameters
    ----------
    logits : array of shape (..., V)
        As in :func:`cross_entropy`.
    stream : optional
        GPU only, as in :func:`cross_entropy`.

    Returns
    -------
    array of shape (...)
        float64 for float64 logits, float32 otherwise. A row of all ``-inf`` gives ``-inf``.

    Raises
    ------
    TypeError, ValueError
        Logits not floating point, 0-d, or with an empty last axis.

    Examples
    --------
    >>> import numpy as np, nbxent as nx
    >>> print(nx.logsumexp(np.array([[1e4, 1e4], [0.0, -np.inf]], dtype=np.float32)))
    [10000.693     0.   ]
    """
    return _backend(logits).normalize(logits, MODE_LSE, None, stream=stream)


def softmax(logits: Any, out: Any = None, *, stream: Any = None) -> Any:
    """``exp(logits - logsumexp(logits))`` over the last axis.

    Parameters
    ----------
    logits : array of shape (..., V)
        As in :func:`cross_entropy`.
    out : array shaped and typed like ``logits``, optional
        Where to write the result; may be ``logits`` itself.
    stream : optional
        GPU only, as in :func:`cross_entropy`.

    Returns
    -------
    array shaped and typed like ``logits``

    Raises
    ------
    TypeError, ValueError
        Bad logits, or ``out`` of the wrong shape or dtype.

    Examples
    --------
    >>> import numpy as np, nbxent as nx
    >>> print(nx.softmax(np.log(np.array([[1.0, 3.0]], dtype=np.float32))).round(6))
    [[0.25 0.75]]
    """
    return _backend(logits).normalize(logits, MODE_SOFTMAX, out, stream=stream)


def log_softmax(logits: Any, out: Any = None, *, stream: Any = None) -> Any:
    """``logits - logsumexp(logits)`` over the last axis.

    Parameters, returns and errors are those of :func:`softmax`.

    Examples
    --------
    >>> import numpy as np, nbxent as nx
    >>> print(nx.log_softmax(np.array([[0.0, 0.0]], dtype=np.float32)).round(4))
    [[-0.6931 -0.6931]]
    """
    return _backend(logits).normalize(logits, MODE_LOG_SOFTMAX, out, stream=stream)
