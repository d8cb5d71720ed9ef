"""The GPU backend: CUDA arrays in, arrays of the caller's kind out, through ``_cuda``.

It offers the same two entry points as ``_backend_cpu`` (see there), called by ``api`` for
any array with ``__cuda_array_interface__`` or a CUDA ``__dlpack__``:

- ``xent(logits, targets, weight, opts, grad=..., grad_output=..., out=..., validate=..., stream=...)``
  returns ``(loss, grad or None)``;
- ``normalize(logits, mode, out, stream=...)`` returns the lse (mode ``MODE_LSE``) or the
  softmax / log-softmax array.

What happens in a call
----------------------
1. Every array is reduced to an ``_Array``: device address, shape, byte strides, NumPy dtype
   (bfloat16 as ``ml_dtypes.bfloat16``), and its kind: ``torch`` (PyTorch tensors, read
   directly, bfloat16 included), ``cupy`` (CuPy), or ``numba`` (Numba device arrays,
   anything else with ``__cuda_array_interface__``, and DLPack-only producers).
2. Results and scratch are allocated by the caller's library (PyTorch's caching allocator,
   CuPy's pool, Numba otherwise), so they come back in the caller's kind and allocation
   stays CUDA-graph safe for PyTorch and CuPy.
3. Kernels launch on the ``stream`` argument, else PyTorch's or CuPy's current stream for
   their arrays, else Numba's default stream.
4. Nothing waits for the GPU except ``validate=True``: one single-block kernel looks for a
   bad target, and its answer (8 bytes) is copied back before the main kernel runs, so a
   bad target raises ``_checks.target_range_error`` before ``out=logits`` is overwritten.
   The 'mean' divisor, the weight sum and the reduced loss are computed on the device.

``targets``, ``weight`` and ``grad_output`` may be host arrays (copied to the device) or
device arrays. Device arrays that need a dtype conversion or a contiguous copy are
converted by their own library; Numba device arrays are converted through the host (a
synchronizing copy; pass int32/int64 targets and float32/float64 weights to avoid it).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda

from . import _checks, _cuda
from ._cuda import (
    ELEMS_PER_WORD,
    F_CHECK,
    F_DIVISOR,
    F_MEAN,
    F_SCALE,
    F_SUM,
    F_WSUM,
    FMT_F64,
    FMT_NAMES,
    JOB_GRAD,
    JOB_LOSS,
    JOB_NORM,
    MODE_LSE,
    PART,
    SIMULATOR,
)

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

_REDUCTION_CODE = {"mean": _cuda.RED_MEAN, "sum": _cuda.RED_SUM, "none": _cuda.RED_NONE}
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


@dataclass
class _Array:
    """A strided array in device memory, as the kernels need it."""

    obj: Any  # the caller's object, or what keeps the memory alive
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in bytes
    dtype: np.dtype
    kind: str  # "torch", "cupy" or "numba": the library results are made with
    device: int | None  # CUDA device ordinal, None when not known (current device)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        return self.strides == _contiguous_strides(self.shape, self.dtype.itemsize) or self.size <= 1


def _contiguous_strides(shape, itemsize) -> tuple[int, ...]:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# ----------------------------------------------------------------------------------------
# Recognizing arrays
# ----------------------------------------------------------------------------------------
def _bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError as e:
        raise TypeError("bfloat16 arrays need the ml_dtypes package: pip install 'nbxent[bfloat16]'") from e
    return np.dtype(ml_dtypes.bfloat16)


def _numpy_dtype(name: str) -> np.dtype:
    return _bfloat16() if name == "bfloat16" else np.dtype(name)


def _torch_array(t) -> _Array | None:
    if not t.is_cuda:
        return None
    dtype = _numpy_dtype(str(t.dtype).removeprefix("torch."))
    item = dtype.itemsize
    strides = tuple(s * item for s in t.stride())
    return _Array(t, t.data_ptr(), tuple(t.shape), strides, dtype, "torch", t.device.index)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_DL_KINDS = {0: "int", 1: "uint", 2: "float", 4: "bfloat", 6: "bool"}
_CAPSULE_POINTER = ctypes.pythonapi.PyCapsule_GetPointer
_CAPSULE_POINTER.restype = ctypes.c_void_p
_CAPSULE_POINTER.argtypes = [ctypes.py_object, ctypes.c_char_p]


def dlpack_array(capsule) -> tuple[_Array, int]:
    """Read a (legacy, unversioned) DLPack capsule without taking ownership of it.

    Returns the ``_Array`` (which keeps the capsule alive: the producer frees the memory
    when the capsule is collected) and the DLPack device type.
    """
    tensor = _DLTensor.from_address(_CAPSULE_POINTER(capsule, b"dltensor"))
    kind = _DL_KINDS.get(tensor.dtype.code)
    if kind is None or tensor.dtype.lanes != 1:
        raise TypeError(f"unsupported DLPack dtype (code {tensor.dtype.code}, {tensor.dtype.bits} bits)")
    if kind == "bfloat":
        dtype = _bfloat16()
    elif kind == "bool":
        dtype = np.dtype(np.bool_)
    else:
        dtype = np.dtype(f"{kind}{tensor.dtype.bits}")
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    if tensor.strides:
        strides = tuple(tensor.strides[i] * dtype.itemsize for i in range(tensor.ndim))
    else:
        strides = _contiguous_strides(shape, dtype.itemsize)
    ptr = (tensor.data or 0) + tensor.byte_offset
    return _Array(capsule, ptr, shape, strides, dtype, "numba", tensor.device.device_id), tensor.device.device_type


def _cai_array(obj, cai: dict) -> _Array:
    if cai.get("mask") is not None:
        raise TypeError("masked CUDA arrays are not supported")
    dtype = getattr(obj, "dtype", None)
    if not isinstance(dtype, np.dtype) or dtype.itemsize != np.dtype(cai["typestr"]).itemsize:
        dtype = np.dtype(cai["typestr"])
    shape = tuple(int(n) for n in cai["shape"])
    strides = cai.get("strides")
    strides = tuple(int(s) for s in strides) if strides else _contiguous_strides(shape, dtype.itemsize)
    module = type(obj).__module__
    kind = "cupy" if module.startswith("cupy") else "numba"
    device = obj.device.id if kind == "cupy" else None
    return _Array(obj, int(cai["data"][0] or 0), shape, strides, dtype, kind, device)


def as_array(obj, dlpack_stream=None) -> _Array | None:
    """The ``_Array`` of a device array; None for anything else (host data)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _torch_array(obj)
    if SIMULATOR and isinstance(obj, FakeCUDAArray):
        ary = obj._ary
        return _Array(obj, ary.__array_interface__["data"][0], ary.shape, ary.strides, ary.dtype, "numba", None)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return _cai_array(obj, cai)
    device = getattr(obj, "__dlpack_device__", None)
    if device is not None and device()[0] in _DLPACK_CUDA:
        capsule = obj.__dlpack__(stream=dlpack_stream)
        return dlpack_array(capsule)[0]
    return None


# ----------------------------------------------------------------------------------------
# Streams, devices, allocation and copies
# ----------------------------------------------------------------------------------------
_EXTERNAL_STREAMS: dict[int, Any] = {}
_DEFAULT_STREAMS: dict[int, Any] = {}


def _default_stream():
    """Numba's default stream of the current device, one object per device: numba-cuda
    caches launch configurations per stream object, and ``cuda.default_stream()`` makes a new
    object per call (an H200 profile showed a new configuration per launch, its
    low-occupancy warning built and formatted each time)."""
    device = cuda.get_current_device().id
    stream = _DEFAULT_STREAMS.get(device)
    if stream is None:
        stream = _DEFAULT_STREAMS[device] = cuda.default_stream()
    return stream


def _external_stream(handle: int):
    if handle == 0:
        return _default_stream()
    stream = _EXTERNAL_STREAMS.get(handle)
    if stream is None:
        stream = _EXTERNAL_STREAMS[handle] = cuda.external_stream(handle)
    return stream


def resolve_stream(stream, x: _Array):
    """The Numba stream to launch on (see the module docstring, step 3)."""
    if stream is None:
        if SIMULATOR:
            return cuda.default_stream()
        if x.kind == "torch":
            import torch

            return _external_stream(torch.cuda.current_stream(x.device).cuda_stream)
        if x.kind == "cupy":
            import cupy

            return _external_stream(cupy.cuda.get_current_stream().ptr)
        return _default_stream()
    if hasattr(stream, "auto_synchronize"):  # a Numba stream (also the simulator's)
        return stream
    if isinstance(stream, bool) or not isinstance(stream, int):
        handle = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream
        if handle is None:
            handle = getattr(stream, "ptr", None)  # cupy.cuda.Stream
        if not isinstance(handle, int):
            raise TypeError(
                "stream must be a Numba stream, a CUDA stream handle (int), or an object with a "
                f"cuda_stream or ptr attribute (PyTorch, CuPy); got {type(stream).__name__}"
            )
        stream = handle
    return cuda.default_stream() if SIMULATOR else _external_stream(stream)


def _on_device(device: int | None):
    """Make ``device`` current for the launches (arrays on a non-current GPU)."""
    if SIMULATOR or device is None or cuda.get_current_device().id == device:
        return contextlib.nullcontext()
    return cuda.gpus[device]


_SM_COUNT: dict[int, int] = {}


def _sm_count() -> int:
    if SIMULATOR:
        return _cuda.SIM_SM_COUNT
    dev = cuda.get_current_device()
    if dev.id not in _SM_COUNT:
        _SM_COUNT[dev.id] = dev.MULTIPROCESSOR_COUNT
    return _SM_COUNT[dev.id]


def _empty(kind: str, device: int | None, shape, dtype, stream) -> _Array:
    """An uninitialized C-contiguous device array made by the library of ``kind``."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    if kind == "torch":
        import torch

        obj = torch.empty(shape, dtype=getattr(torch, dtype.name), device=torch.device("cuda", device))
    elif kind == "cupy":
        import cupy

        with cupy.cuda.Device(device):
            obj = cupy.empty(shape, dtype)
    else:
        obj = cuda.device_array(shape, dtype, stream=stream)
    return as_array(obj)


def _upload(host: np.ndarray, kind: str, device: int | None, stream) -> _Array:
    """A device copy of a host array, made by the library of ``kind``."""
    host = np.ascontiguousarray(host)
    if kind == "torch":
        import torch

        obj = torch.from_numpy(host).to(torch.device("cuda", device))
    elif kind == "cupy":
        import cupy

        with cupy.cuda.Device(device):
            obj = cupy.asarray(host)
    else:
        obj = cuda.to_device(host, stream=stream)
    return as_array(obj)


def _sim_view(address: int, count: int, dtype) -> Any:
    """Simulator only: an array over ``count`` elements of host memory at ``address``."""
    dtype = np.dtype(dtype)
    if count == 0:
        return FakeCUDAArray(np.empty(0, dtype))
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(address)
    return FakeCUDAArray(np.frombuffer(raw, dtype=dtype))


def _to_host(arr: _Array, first: int, count: int, stream) -> np.ndarray:
    """Copy ``count`` elements of a contiguous device array, from ``first``, and wait."""
    address = arr.ptr + first * arr.dtype.itemsize
    if SIMULATOR:
        return _sim_view(address, count, arr.dtype).copy_to_host()
    desc = {"shape": (count,), "typestr": arr.dtype.str, "data": (address, False), "version": 3, "strides": None}
    host = cuda.from_cuda_array_interface(desc, owner=arr.obj, sync=False).copy_to_host(stream=stream)
    stream.synchronize()
    return host


def _converted(arr: _Array, dtype, stream) -> _Array:
    """``arr`` as a C-contiguous array of ``dtype`` (itself when it already is one)."""
    dtype = np.dtype(dtype)
    if arr.dtype == dtype and arr.is_contiguous():
        return arr
    if arr.kind == "torch":
        return as_array(arr.obj.to(getattr(sys.modules["torch"], dtype.name)).contiguous())
    if arr.kind == "cupy":
        import cupy

        return as_array(cupy.ascontiguousarray(arr.obj, dtype=dtype))
    host = _host_copy(arr, stream)
    return _upload(host.astype(dtype), "numba", arr.device, stream)


def _host_copy(arr: _Array, stream) -> np.ndarray:
    """A host copy of any (strided) device array: copy its byte span, then view it."""
    if arr.size == 0:
        return np.empty(arr.shape, arr.dtype)
    item = arr.dtype.itemsize
    if any(s < 0 for s in arr.strides):
        raise ValueError("device arrays with negative strides are not supported; pass a contiguous array")
    span = sum((n - 1) * s for n, s in zip(arr.shape, arr.strides, strict=True)) + item
    raw = _to_host(_Array(arr.obj, arr.ptr, (span,), (1,), np.dtype(np.uint8), arr.kind, arr.device), 0, span, stream)
    return np.ndarray(arr.shape, arr.dtype, buffer=raw, strides=arr.strides).copy()


_FEW_BLOCKS = 128  # numba-cuda warns of low occupancy below this many blocks
# (its text may be wrapped in terminal colour codes, hence the leading .*)
_FEW_BLOCKS_WARNING = r".*Grid size \d+ will likely result in GPU under-utilization"


def _launch(kernel, grid: int, stream, args) -> None:
    """Launch ``kernel`` on ``grid`` blocks. Small grids are deliberate here (one block for
    ``reduce_rows``, one block per row group for a few rows), so numba-cuda's low-occupancy
    warning, which would reach the caller on every new stream, is silenced for them."""
    if grid >= _FEW_BLOCKS:
        kernel[grid, _cuda.THREADS, stream](*args)
    elif grid > 0:
        with warnings.catch_warnings():  # matched by text: its class moved between releases
            warnings.filterwarnings("ignore", message=_FEW_BLOCKS_WARNING)
            kernel[grid, _cuda.THREADS, stream](*args)


_COMPILED: dict[tuple, Any] = {}


def _kernel(name: str, fmt: int, job: int, tgt_bits: int):
    """A compiled kernel, compiled on first use for its explicit signature and kept."""
    key = (name, fmt, job, tgt_bits, _cuda.THREADS, _cuda.UNROLL, _cuda.BLOCKS_PER_SM, _cuda.PREFETCH)
    kernel = _COMPILED.get(key)
    if kernel is None:
        func, sig = _cuda.kernel_sources(fmt, job, tgt_bits, _cuda.THREADS, _cuda.UNROLL, _cuda.PREFETCH)[name]
        kernel = _COMPILED[key] = cuda.jit(sig, **_cuda.jit_options(_cuda.THREADS, _cuda.BLOCKS_PER_SM))(func)
    return kernel


def _reduce_kernel(tgt_bits: int, acc_bits: int):
    key = ("reduce", tgt_bits, acc_bits, _cuda.THREADS)
    kernel = _COMPILED.get(key)
    if kernel is None:
        func, sig = _cuda.reduce_source(tgt_bits, acc_bits, _cuda.THREADS)
        kernel = _COMPILED[key] = cuda.jit(sig, **_cuda.jit_options(_cuda.THREADS, 1))(func)
    return kernel


# ----------------------------------------------------------------------------------------
# Kernel arguments
# ----------------------------------------------------------------------------------------
def _addr(arr: _Array | None, dtype=None):
    """A small contiguous array as a kernel argument: its address (0 when absent); under the
    simulator, an array over the same memory."""
    if not SIMULATOR:
        return 0 if arr is None else arr.ptr
    if arr is None:
        return _sim_view(0, 0, dtype or np.float64)
    return _sim_view(arr.ptr, arr.size, arr.dtype)


def row_layout(arr: _Array) -> tuple[int, int, int, int] | None:
    """``(n1, s0, s1, span)`` in elements such that row ``i`` of ``arr.reshape(-1, V)``
    starts at element ``(i // n1) * s0 + (i % n1) * s1`` from ``arr.ptr``; ``span`` is the
    number of elements from the first to past the last. None when the layout needs more
    than two leading strides, or has a non-contiguous last axis or negative strides.
    """
    item = arr.dtype.itemsize
    n_cols = arr.shape[-1]
    if arr.size == 0:
        return 1, 0, 0, 0
    if n_cols > 1 and arr.strides[-1] != item:
        return None
    dims = []  # (size, stride) of the leading axes, innermost last, merged where possible
    for n, s in zip(arr.shape[:-1], arr.strides[:-1], strict=True):
        if n == 1:
            continue
        if s < 0 or s % item:
            return None
        dims.append((n, s // item))
    merged: list[tuple[int, int]] = []
    for n, s in reversed(dims):
        if merged and s == merged[-1][0] * merged[-1][1]:
            merged[-1] = (merged[-1][0] * n, merged[-1][1])
        else:
            merged.append((n, s))
    if len(merged) > 2:
        return None
    inner = merged[0] if merged else (1, 0)
    outer = merged[1] if len(merged) > 1 else (1, 0)
    span = (inner[0] - 1) * inner[1] + (outer[0] - 1) * outer[1] + n_cols
    return inner[0], outer[1], inner[1], span


def _words(arr: _Array, span: int) -> tuple[Any, int]:
    """The kernel's view of a logits-like buffer: the 8-byte aligned address at or below
    ``arr.ptr`` (under the simulator an array of words there) and the element position
    of ``arr.ptr`` in it."""
    item = arr.dtype.itemsize
    if arr.ptr % item:
        raise ValueError(f"the array's address is not a multiple of its item size ({item}); pass an aligned array")
    base = arr.ptr - arr.ptr % 8
    first = (arr.ptr - base) // item
    if not SIMULATOR:
        return base, first
    return _sim_view(base, -(-(first + span) * item // 8), np.uint64), first


def _with_layout(arr: _Array, stream) -> tuple[_Array, tuple[int, int, int, int]]:
    """``arr`` and its ``row_layout``, through a contiguous copy when it has none."""
    layout = row_layout(arr)
    if layout is None:
        arr = _contiguous_copy(arr, stream)
        layout = row_layout(arr)
    return arr, layout


def _contiguous_copy(arr: _Array, stream) -> _Array:
    if arr.kind == "torch":
        return as_array(arr.obj.contiguous())
    if arr.kind == "cupy":
        import cupy

        return as_array(cupy.ascontiguousarray(arr.obj))
    if arr.dtype.itemsize == 2:  # 16-bit data travels as bits
        host = _host_copy(_Array(**{**arr.__dict__, "dtype": np.dtype(np.uint16)}), stream)
        return _Array(**{**_upload(host, "numba", arr.device, stream).__dict__, "dtype": arr.dtype})
    return _upload(_host_copy(arr, stream), "numba", arr.device, stream)


def _gpu_logits(logits) -> tuple[_Array, int, int]:
    """The logits as an ``_Array``, V and the storage format."""
    x = as_array(logits)
    if x is None:  # api sends only GPU arrays here
        raise TypeError(f"logits must be a GPU array for the CUDA backend, got {type(logits).__name__}")
    n_cols = _checks.check_logits(x.shape, x.dtype)
    return x, n_cols, FMT_NAMES[_checks.logit_dtype_name(x.dtype)]


def _device_operand(value, x: _Array, name: str) -> tuple[_Array | None, np.ndarray | None]:
    """A ``targets``/``weight``/``grad_output`` argument: ``(device array, None)`` when it is
    on the GPU (the logits' GPU), else ``(None, host array)``."""
    arr = as_array(value)
    if arr is None:
        return None, np.asarray(value)
    if arr.device is not None and x.device is not None and arr.device != x.device:
        raise ValueError(f"{name} is on GPU {arr.device} but the logits are on GPU {x.device}; move it")
    return arr, None


def _byte_range(arr: _Array) -> tuple[int, int]:
    """``[first, past the last)`` byte addresses an array's elements occupy."""
    low = arr.ptr + sum((n - 1) * s for n, s in zip(arr.shape, arr.strides, strict=True) if s < 0)
    high = arr.ptr + sum((n - 1) * s for n, s in zip(arr.shape, arr.strides, strict=True) if s > 0)
    return low, high + arr.dtype.itemsize


def _output(out, x: _Array, stream) -> tuple[_Array, Any, _Array | None]:
    """Where an N x V result goes: ``(array written by the kernels, returned object,
    array to copy into afterwards or None)``."""
    if out is None:
        g = _empty(x.kind, x.device, x.shape, x.dtype, stream)
        return g, g.obj, None
    o = as_array(out)
    if o is None:
        raise TypeError(
            f"out is a host array ({type(out).__name__}) but the logits are on the GPU; "
            "pass a GPU array of the logits' shape and dtype, or out=None"
        )
    _checks.check_out(o.shape, o.dtype, x.shape, x.dtype)
    if o.device is not None and x.device is not None and o.device != x.device:
        raise ValueError(f"out is on GPU {o.device} but the logits are on GPU {x.device}")
    same = o.ptr == x.ptr and o.strides == x.strides
    (x_lo, x_hi), (o_lo, o_hi) = _byte_range(x), _byte_range(o)
    if not same and x.size and o_lo < x_hi and x_lo < o_hi:
        raise ValueError("out overlaps logits without being logits itself; pass out=logits or a separate array")
    if row_layout(o) is None:
        if o.kind not in ("torch", "cupy"):
            raise ValueError(
                "out has a layout the kernels cannot write (more than two leading strides); pass a contiguous array"
            )
        g = _empty(o.kind, o.device, o.shape, o.dtype, stream)
        return g, out, g
    return o, out, None


def _copy_back(tmp: _Array, out) -> None:
    """Copy a temporary result into a caller's ``out`` whose layout the kernels cannot write."""
    if hasattr(out, "copy_"):  # torch
        out.copy_(tmp.obj)
    else:  # cupy
        out[...] = tmp.obj


def _geometry(n_rows: int, n_cols: int, fmt: int) -> tuple[int, int, int, int]:
    """``(group, grid, n_chunks, chunk)`` for a launch (n_chunks == 1: no split).

    1. ``group`` threads share a row: enough that each thread has about UNROLL words per
       step, at least MIN_GROUP, at most a block. Small V puts several rows in a block.
    2. The grid is persistent: BLOCKS_PER_SM blocks per SM stride over the row groups.
    3. When one block per row would leave SMs idle (fewer rows than blocks wanted) and rows
       are long, each row is split into chunks of at least SPLIT_CHUNK elements, enough of
       them to give every SM work.
    """
    threads = _cuda.THREADS
    words = -(-n_cols // ELEMS_PER_WORD[fmt]) + 1
    group = _cuda.MIN_GROUP
    while group < threads and group * _cuda.UNROLL < words:
        group *= 2
    group = min(group, threads)
    blocks = max(1, _cuda.BLOCKS_PER_SM * _sm_count())
    n_chunks, chunk = 1, n_cols
    if group == threads and 0 < n_rows < blocks:
        wanted = -(-blocks // n_rows)
        chunk = max(_cuda.SPLIT_CHUNK, -(-n_cols // wanted))
        chunk = -(-chunk // 8) * 8  # chunk starts stay word-aligned when rows are
        n_chunks = -(-n_cols // chunk)
        if n_chunks < 2:
            n_chunks, chunk = 1, n_cols
    rows_per_block = threads // group
    grid = min(-(-n_rows // rows_per_block), blocks) if n_chunks == 1 else min(n_rows * n_chunks, blocks)
    return group, grid, n_chunks, chunk


# ----------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------
def xent(logits, targets, weight, opts: _checks.Options, *, grad: bool, grad_output, out, validate: bool, stream):
    """Cross-entropy loss (reduced per ``opts.reduction``) and, when ``grad``, its gradient."""
    x, n_cols, fmt = _gpu_logits(logits)
    acc = np.float64 if fmt == FMT_F64 else np.float32
    with _on_device(x.device):
        s = resolve_stream(stream, x)
        return _xent(x, n_cols, fmt, acc, targets, weight, opts, grad, grad_output, out, validate, s)


def _xent(x, n_cols, fmt, acc, targets, weight, opts, grad, grad_output, out, validate, s):
    """``xent`` on the logits' device and stream ``s``: steps 1-7 below."""
    kind, dev = x.kind, x.device
    # 1. Targets: int32 or int64, contiguous, on the device.
    t_dev, t_host = _device_operand(targets, x, "targets")
    t_arr = t_dev
    t_shape, t_dtype = (t_dev.shape, t_dev.dtype) if t_dev is not None else (t_host.shape, t_host.dtype)
    _checks.check_targets(t_shape, t_dtype, x.shape)
    if t_host is not None:
        if validate:  # on the host already: no device round trip
            _checks.check_target_range(t_host, n_cols, opts.ignore_index)
        t_host = _checks.int64_targets(np, t_host)  # huge uint64 clipped: the kernels guard the range
        t_arr = _upload(t_host, kind, dev, s)
        validate = False
    elif t_dtype not in (np.dtype(np.int32), np.dtype(np.int64)) or not t_dev.is_contiguous():
        t_arr = _converted(t_dev, np.int64, s)
    tgt_bits = 32 if t_arr.dtype == np.int32 else 64
    n_rows = math.prod(t_shape)
    # 2. Weights, in the accumulation dtype.
    w_arr = None
    if weight is not None:
        w_dev, w_host = _device_operand(weight, x, "weight")
        w_shape, w_dtype = (w_dev.shape, w_dev.dtype) if w_dev is not None else (w_host.shape, w_host.dtype)
        _checks.check_weight(w_shape, w_dtype, n_cols)
        w_arr = _converted(w_dev, acc, s) if w_dev is not None else _upload(w_host.astype(acc), kind, dev, s)
    # 3. grad_output: a host scalar, a 1-element device array, or one value per row.
    go_arr, go_scalar = None, 1.0
    if grad:
        go_dev, go_host = _device_operand(grad_output, x, "grad_output")
        go_shape, go_dtype = (go_dev.shape, go_dev.dtype) if go_dev is not None else (go_host.shape, go_host.dtype)
        _checks.check_grad_output_dtype(go_dtype)
        _checks.check_grad_output_shape(go_shape, opts.reduction, t_shape)
        if go_dev is not None:
            go_arr = _converted(go_dev, acc, s)
        elif go_host.ndim == 0:
            go_scalar = float(go_host)
        else:
            go_arr = _upload(go_host.astype(acc), kind, dev, s)
    elif out is not None:
        raise ValueError("out= is where the gradient goes; cross_entropy computes no gradient")
    # 4. Layouts, and where the gradient goes.
    x, (n1, xs0, xs1, x_span) = _with_layout(x, s)
    if grad:
        g, g_result, copy_into = _output(out, x, s)
        g_layout = row_layout(g)
    else:
        g, g_result, copy_into, g_layout = x, None, None, (n1, xs0, xs1, x_span)
    x_arg, x0 = _words(x, x_span)
    g_arg, g0 = _words(g, g_layout[3])
    t_arg, w_arg = _addr(t_arr), _addr(w_arr, acc)
    n_w = 0 if w_arr is None else n_cols
    n_go = 0 if go_arr is None else go_arr.size
    go_arg = _addr(go_arr, acc)
    red = _REDUCTION_CODE[opts.reduction]
    # 32 bytes of device scalars (see F_*), only when a reduction or a check needs them.
    needs_stats = validate or red == _cuda.RED_MEAN or (n_w and opts.label_smoothing > 0)
    stats = _empty(kind, dev, (4,), np.float64, s) if needs_stats else None
    stats_arg = _addr(stats, np.float64)

    def reduce(flags: int, loss_arr: _Array | None, result: _Array | None) -> None:
        args = (t_arg, w_arg, go_arg, _addr(loss_arr, acc), stats_arg, _addr(result, acc))
        args += (n_rows, n_cols, opts.ignore_index, n_w, n_go, flags, go_scalar)
        _launch(_reduce_kernel(tgt_bits, 64 if acc is np.float64 else 32), 1, s, args)

    # 5. Before the main kernel: checks and the device-side scalars it needs.
    flags = (F_CHECK if validate and n_rows else 0) | (F_WSUM if n_w and opts.label_smoothing > 0 else 0)
    if grad and red == _cuda.RED_MEAN:
        flags |= F_DIVISOR | F_SCALE
    if flags:
        reduce(flags, None, None)
    if flags & F_CHECK:
        bad = int(_to_host(stats, 1, 1, s)[0])
        if bad >= 0:
            position = tuple(int(p) for p in np.unravel_index(bad, t_shape))
            value = int(_to_host(t_arr, bad, 1, s)[0])
            raise _checks.target_range_error(position, value, n_cols, opts.ignore_index)
    # 6. The main kernel(s): per-row losses, and the gradient.
    job = JOB_GRAD if grad else JOB_LOSS
    loss_rows = _empty(kind, dev, t_shape if red == _cuda.RED_NONE else (n_rows,), acc, s)
    group, grid, n_chunks, chunk = _geometry(n_rows, n_cols, fmt)
    options = (opts.softcap, opts.label_smoothing, opts.z_loss, go_scalar)
    layouts = (n_rows, n_cols, n1, x0, xs0, xs1, g0, g_layout[0], g_layout[1], g_layout[2])
    common = (x_arg, g_arg, t_arg, w_arg, go_arg, stats_arg)
    if n_chunks == 1:
        args = common + (_addr(loss_rows),) + layouts + (opts.ignore_index, red, n_go, n_w, group) + options
        _launch(_kernel("rows", fmt, job, tgt_bits), grid, s, args)
    else:
        part = _empty(kind, dev, (n_rows * n_chunks * PART,), acc, s)
        stats_args = (x_arg, t_arg, w_arg, _addr(part), n_rows, n_cols, n1, x0, xs0, xs1)
        stats_args += (opts.ignore_index, n_w, n_chunks, chunk, opts.softcap, opts.label_smoothing)
        _launch(_kernel("chunk_stats", fmt, JOB_LOSS, tgt_bits), grid, s, stats_args)  # the same for both jobs
        blocks_per_row = n_chunks if grad else 1
        args = common + (_addr(part), _addr(loss_rows)) + layouts
        args += (opts.ignore_index, red, n_go, n_w, n_chunks, chunk, blocks_per_row) + options
        grid2 = min(n_rows * blocks_per_row, max(1, _cuda.BLOCKS_PER_SM * _sm_count()))
        _launch(_kernel("chunks", fmt, job, tgt_bits), grid2, s, args)
    if copy_into is not None:
        _copy_back(g, g_result)
    # 7. After it: the reduced loss, in a fixed order.
    if red == _cuda.RED_NONE:
        loss = loss_rows.obj
    else:
        result = _empty(kind, dev, (), acc, s)
        if red == _cuda.RED_SUM:
            reduce(F_SUM, loss_rows, result)
        else:
            reduce(F_MEAN | (0 if flags & F_DIVISOR else F_DIVISOR), loss_rows, result)
        loss = result.obj
    return loss, g_result if grad else None


def normalize(logits, mode: int, out, *, stream):
    """logsumexp (``MODE_LSE``), softmax or log-softmax over the last axis."""
    x, n_cols, fmt = _gpu_logits(logits)
    acc = np.float64 if fmt == FMT_F64 else np.float32
    with _on_device(x.device):
        s = resolve_stream(stream, x)
        kind, dev = x.kind, x.device
        lead = x.shape[:-1]
        n_rows = math.prod(lead)
        x, (n1, xs0, xs1, x_span) = _with_layout(x, s)
        if mode == MODE_LSE:
            g, result, copy_into, g_layout = x, None, None, (n1, xs0, xs1, x_span)
        else:
            g, result, copy_into = _output(out, x, s)
            g_layout = row_layout(g)
        lse = _empty(kind, dev, lead, acc, s)
        x_arg, x0 = _words(x, x_span)
        g_arg, g0 = _words(g, g_layout[3])
        none = _addr(None, acc)
        group, grid, n_chunks, chunk = _geometry(n_rows, n_cols, fmt)
        layouts = (n_rows, n_cols, n1, x0, xs0, xs1, g0, g_layout[0], g_layout[1], g_layout[2])
        options = (0.0, 0.0, 0.0, 0.0)
        if n_chunks == 1:
            args = (x_arg, g_arg, none, none, none, none, _addr(lse)) + layouts + (0, mode, 0, 0, group) + options
            _launch(_kernel("rows", fmt, JOB_NORM, 64), grid, s, args)
        else:
            part = _empty(kind, dev, (n_rows * n_chunks * PART,), acc, s)
            stats_args = (
                x_arg,
                none,
                none,
                _addr(part),
                n_rows,
                n_cols,
                n1,
                x0,
                xs0,
                xs1,
                0,
                0,
                n_chunks,
                chunk,
                0.0,
                0.0,
            )
            _launch(_kernel("chunk_stats", fmt, JOB_NORM, 64), grid, s, stats_args)
            blocks_per_row = 1 if mode == MODE_LSE else n_chunks
            args = (x_arg, g_arg, none, none, none, none, _addr(part), _addr(lse)) + layouts
            args += (0, mode, 0, 0, n_chunks, chunk, blocks_per_row) + options
            grid2 = min(n_rows * blocks_per_row, max(1, _cuda.BLOCKS_PER_SM * _sm_count()))
            _launch(_kernel("chunks", fmt, JOB_NORM, 64), grid2, s, args)
        if mode == MODE_LSE:
            return lse.obj
        if copy_into is not None:
            _copy_back(g, result)
        return result
