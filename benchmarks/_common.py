"""Helpers shared by the benchmark modules: the parameter grid, seeded inputs, warm-up, and the
copy floor that bandwidth is compared with.

Nothing here is a benchmark (no name starts with ``time_``, ``peakmem_``, ``track_`` or
``mem_``), so asv's discovery passes over it.

The grid shrinks to tiny shapes when ``NBXENT_ASV_QUICK=1`` is set in the environment, so CI
can run every benchmark once in a few minutes (``benchmarks/ci_quick.sh``)::

    NBXENT_ASV_QUICK=1 asv run --python=same --quick

asv re-runs ``setup`` before every timed call (so that each call sees fresh state), which is
why inputs are built once per process and cached here, and why :func:`warm_up_once` compiles
once per process rather than once per ``setup``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np

QUICK = os.environ.get("NBXENT_ASV_QUICK", "") not in ("", "0")
"""True when ``NBXENT_ASV_QUICK`` is set (and not "0"): tiny shapes, for CI."""

if QUICK:
    # ci_quick.sh runs asv with its forkserver, which imports the benchmark modules once and
    # forks a process per parameter combination: PyTorch imported here is imported once, not
    # in each of the Torch and GPU benchmarks' processes (about 2 s each). Only in quick mode:
    # a real run's peak-memory figures must not carry PyTorch.
    try:
        import torch  # noqa: F401
    except ImportError:
        pass

# Launch-bound, then language-model vocabularies (Llama 2, Llama 3, Gemma) at the same
# number of logits (about 65.5 million: 256 MB in float32, 128 MB in bfloat16), so that
# times and GB/s are comparable across V.
# Quick mode keeps one small shape with more rows than make_logits draws, so every code path
# runs once in the fewest processes (asv starts one per parameter combination).
SHAPES = ["80x4000"] if QUICK else ["8x1000", "2048x32000", "512x128256", "256x256000"]
"""Logits shapes as ``"NxV"`` strings (asv shows parameters by their repr)."""

DTYPES = ["float32", "bfloat16"]
"""Logits dtypes: float32, and the 16-bit type models are trained in (``ml_dtypes.bfloat16``)."""

BANDWIDTH_DTYPES = [*DTYPES, "float64"]
"""``bench_cpu.Bandwidth`` also tracks float64, NumPy's default dtype (its rows run the
vectorized ``exp_f64`` since commit 722495f, 4-6x faster than the libm exp before)."""

OPTIONS = ["plain", "softcap", "smoothing+z_loss+softcap", "class weights"]
"""Names of the option sets; :func:`options` turns one into keyword arguments."""

OPS = ["forward", "forward+backward", "forward+backward in place"]
"""The operations: ``cross_entropy``; ``cross_entropy_with_grad``; the same with ``out=logits``."""

SEED = 20240611


def parse_shape(shape: str) -> tuple[int, int]:
    """``"2048x32000"`` -> ``(2048, 32000)``."""
    n_rows, n_cols = shape.split("x")
    return int(n_rows), int(n_cols)


def np_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype named by a ``DTYPES`` entry.

    Raises
    ------
    NotImplementedError
        For bfloat16 when ``ml_dtypes`` is not installed (asv then reports the case as skipped).
    """
    if dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:
            raise NotImplementedError("bfloat16 needs ml_dtypes: pip install ml_dtypes") from e
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def make_logits(shape: str, dtype: str, seed: int = SEED) -> np.ndarray:
    """Seeded logits of a ``SHAPES`` entry, a new array on every call.

    Values are normal with standard deviation 4 (a realistic spread for a language model's
    output). To build 256 MB in a fraction of a second, at most 64 distinct rows are drawn
    and tiled; the kernels' speed does not depend on whether rows repeat. The 16-bit array
    is cast from the small block, so building it never holds a float32 copy of the whole.
    """
    n_rows, n_cols = parse_shape(shape)
    rng = np.random.default_rng(seed)
    block = (4 * rng.standard_normal((min(n_rows, 64), n_cols), dtype=np.float32)).astype(np_dtype(dtype))
    reps = -(-n_rows // block.shape[0])
    return np.ascontiguousarray(np.tile(block, (reps, 1))[:n_rows]) if reps > 1 else block


@functools.lru_cache(maxsize=1)
def cached_logits(shape: str, dtype: str, seed: int = SEED) -> np.ndarray:
    """:func:`make_logits`, built once per process; only the latest shape is kept.

    Never write into it: benchmarks that overwrite their logits work on a copy. (It is not
    marked read-only because Numba compiles read-only arrays as a type of their own, and the
    benchmarks should time what users pass.)
    """
    return make_logits(shape, dtype, seed)


def make_targets(shape: str, seed: int = SEED) -> np.ndarray:
    """Seeded int64 class ids in ``[0, V)``, one per row."""
    n_rows, n_cols = parse_shape(shape)
    return np.random.default_rng(seed + 1).integers(0, n_cols, n_rows)


def options(name: str, n_cols: int, seed: int = SEED) -> dict:
    """Keyword arguments of the option set ``name`` (an ``OPTIONS`` entry) for ``V = n_cols``.

    'class weights' are seeded float32 weights in [0.5, 1.5).
    """
    if name == "plain":
        return {}
    if name == "softcap":  # Gemma 2's logit cap alone (docs/cpu.md item 5)
        return {"softcap": 30.0}
    if name == "smoothing+z_loss+softcap":
        return {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}
    if name == "class weights":
        weight = np.random.default_rng(seed + 2).uniform(0.5, 1.5, n_cols).astype(np.float32)
        return {"weight": weight}
    raise ValueError(f"unknown option set {name!r}; expected one of {OPTIONS}")


_WARMED: set = set()


def warm_up_once(key, fn: Callable[[], object]) -> None:
    """Call ``fn`` the first time ``key`` is seen in this process, and never again.

    asv calls ``setup`` before every timed call; this keeps compilation (and one-off costs such
    as starting Numba's thread pool) out of the timings without repeating the warm-up call.
    """
    if key not in _WARMED:
        fn()
        _WARMED.add(key)


def copy_floor(a: np.ndarray) -> Callable[[], object]:
    """A no-argument parallel copy of the 2-D ``a`` into a same-sized buffer (rows split over
    Numba's threads, ``nbxent.bench.parallel_copy``): the memory floor.

    A copy reads ``a.nbytes`` and writes ``a.nbytes``; its bytes-moved per second is the
    bandwidth that a streaming kernel on this machine can hope for (``np.copyto`` uses one
    thread: on a 2-core machine it took 2.5x as long). The destination is touched once here,
    so page faults are not timed. 16-bit arrays are copied as bits.
    """
    from nbxent.bench import parallel_copy

    src = a.view(np.uint16) if a.dtype.itemsize == 2 else a
    dst = np.empty_like(src)
    parallel_copy(src, dst)
    return functools.partial(parallel_copy, src, dst)


def read_floor(a: np.ndarray) -> Callable[[], object]:
    """A no-argument parallel read of the 2-D ``a`` (rows summed over Numba's threads,
    ``nbxent.bench.read_pass``): the memory floor of a pass that writes nothing, the loss
    alone. 16-bit arrays are read as bits."""
    from nbxent.bench import read_pass

    src = a.view(np.uint16) if a.dtype.itemsize == 2 else a
    sink = np.empty(a.shape[0], np.float64)
    read_pass(src, sink)
    return functools.partial(read_pass, src, sink)


def paired_median_seconds(
    fn: Callable[[], object], floor: Callable[[], object], repeats: int, before: Callable[[], object] | None = None
) -> tuple[float, float]:
    """Median wall times of ``fn`` and ``floor``, timed in turns (``fn`` then ``floor``,
    ``repeats`` times), so that a slow spell of a shared machine falls on both: their ratio
    is then a measure of ``fn`` and not of when each was timed. ``before`` runs untimed
    before each call of ``fn``."""
    fn_seconds, floor_seconds = turns_median_seconds([fn, floor], repeats, before)
    return fn_seconds, floor_seconds


def turns_median_seconds(
    fns: list[Callable[[], object]], repeats: int, before: Callable[[], object] | None = None
) -> list[float]:
    """``paired_median_seconds`` for any number of functions: each round calls them in order
    (``before``, untimed, ahead of the first), and each gets the median of its times."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        if before is not None:
            before()
        for fn, fn_times in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def num_threads() -> int:
    """Numba's thread count; peers (PyTorch) are given the same number."""
    return numba.get_num_threads()


def import_torch():
    """PyTorch, set to Numba's thread count.

    Raises
    ------
    NotImplementedError
        When PyTorch is not importable (asv reports the benchmark as skipped).
    """
    try:
        import torch
    except ImportError as e:
        raise NotImplementedError("PyTorch is not installed") from e
    torch.set_num_threads(num_threads())
    return torch


def to_torch(a: np.ndarray, torch):
    """A PyTorch CPU tensor sharing ``a``'s memory; bfloat16 arrays become ``torch.bfloat16``."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def cuda_gpu_count() -> int:
    """How many CUDA GPUs the driver reports; 0 without a driver or a GPU.

    Asks the driver library directly (``cuInit``, ``cuDeviceGetCount``), which takes
    milliseconds and imports nothing, so a machine without a GPU skips the GPU suite at once.
    Call it in ``setup`` only, never at import: asv forks each benchmark from a server process
    that imported the module, and CUDA initialized before a fork is unusable after it.
    """
    try:
        driver = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value
