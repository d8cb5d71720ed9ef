"""``nbxent bench``: nbxent against the machine's memory floor and its peers, side by side.

Every figure is the median of several timed calls in this one process, after a warm-up call
(compilation is never timed). The calls are made round-robin, one of each operation per
round, so that drift of a shared machine falls on the floors and on nbxent alike. The floor
for a pass that reads the logits and writes a gradient is one parallel copy of the logits
(rows split over the same threads as nbxent's: the same bytes read and written); for the
loss alone it is one parallel read of the logits. ``np.copyto``, one thread, is shown too
(the floor issue 5 names): on this project's 2-core VM it has taken from 0.86x to 2.5x the
parallel copy, by host and hour (its memcpy may stream large copies). On x86, so is a
parallel copy with streaming stores, which write whole cache lines without reading them
first (a plain store reads its line before writing it): less traffic than the floor's,
1.3-1.6x faster on this project's VM; nbxent's kernels do not use such stores (docs/cpu.md
says why). Peers: a
vectorized NumPy implementation and, when importable, PyTorch's ``F.cross_entropy``
forward+backward on the same thread count.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numba
import numpy as np

from . import _cpu, api
from ._jit import HALF_BF16, HALF_F16, jit_kernel, jit_reduce, jit_serial, store_fence, stream_line16

DEFAULT_SHAPES = ((2048, 32000), (512, 128256), (256, 256000))


@jit_reduce
def _sum_row(x):
    s = x[0] * 0
    for j in range(x.size):
        s += x[j]
    return s


@jit_reduce
def _copy_row(src, dst):
    for j in range(src.size):
        dst[j] = src[j]


@jit_kernel
def parallel_copy(src2d, dst2d):
    """Copy a 2-D array row by row, rows split over the threads: every byte read and written
    once, the floor of a pass that reads the logits and writes a gradient."""
    if src2d.shape != dst2d.shape:
        raise ValueError("parallel_copy: the source and the destination must have the same shape")
    for i in numba.prange(src2d.shape[0]):
        _copy_row(src2d[i], dst2d[i])


@jit_serial
def _stream_copy_row(src, dst):
    """``dst[:] = src`` (uint16) with non-temporal stores for every whole 64-byte line of ``dst``."""
    n = src.size
    addr = dst.ctypes.data
    # entries before dst's first whole line; all of them for a view at an odd address, where
    # no entry starts a line (copied plainly)
    head = n if addr % 2 else min(((-addr) % 64) // 2, n)
    for j in range(head):
        dst[j] = src[j]
    j = head
    while j + 32 <= n:
        stream_line16(dst, j, src, j)
        j += 32
    for k in range(j, n):
        dst[k] = src[k]


@jit_kernel
def parallel_stream_copy(src2d, dst2d):
    """``parallel_copy`` with streaming (non-temporal) stores, for uint16 rows: a store that
    writes a whole cache line this way skips the read of that line, which a plain store makes
    first, so the copy moves two bytes for every byte copied where a plain copy moves three.
    (x86 only: it ends with ``sfence``.)"""
    if src2d.shape != dst2d.shape:
        raise ValueError("parallel_stream_copy: the source and the destination must have the same shape")
    for i in numba.prange(src2d.shape[0]):
        _stream_copy_row(src2d[i], dst2d[i])
        store_fence()


# Streaming stores and ``sfence`` as written above are x86 instructions.
HAS_STREAM_COPY = platform.machine().lower() in ("x86_64", "amd64")


@jit_kernel
def read_pass(x2d, sink):
    """Sum every row of a 2-D array: a parallel read of every byte, the floor of a forward."""
    for i in numba.prange(x2d.shape[0]):
        sink[i] = _sum_row(x2d[i])


# The compute floor. A forward makes one exp an entry, and on a host whose cores are slow
# beside its memory that arithmetic, not the read, bounds it. These passes run the kernels'
# own exp loop (``_cpu.block_exp_sum``: clamp, exp, store to an L1 buffer, sum; for 16-bit
# bits ``block_exp_sum16``, which widens as it loads) n_rows x n_cols times, over one block of
# logits that stays in L1: the forward's arithmetic without its memory traffic.
@jit_kernel
def exp_pass(block, m, n_rows, n_cols, sink):
    """``sink[i] = sum over n_cols entries of exp(block_j - m)``, the float ``block`` (at most
    STATS_BLOCK logits) repeated along each row, rows split over the threads."""
    for i in numba.prange(n_rows):
        ebuf = _cpu.padded_ebuf(block)
        s = m * 0
        for lo in range(0, n_cols, block.size):
            k = min(block.size, n_cols - lo)
            s += _cpu.block_exp_sum(block[:k], ebuf[:k], m, ebuf)
        sink[i] = s


@jit_kernel
def exp_pass16(bits, m, half, n_rows, n_cols, sink):
    """``exp_pass`` for a block of 16-bit ``bits`` (format ``half``), widened as it is loaded."""
    for i in numba.prange(n_rows):
        ebuf = np.empty(bits.size, np.float32)
        s = m * 0
        for lo in range(0, n_cols, bits.size):
            k = min(bits.size, n_cols - lo)
            s += _cpu.block_exp_sum16(bits[:k], ebuf[:k], m, half)
        sink[i] = s


def exp_floor_call(x: np.ndarray, sink: np.ndarray) -> Callable[[], object]:
    """A call of ``exp_pass`` (``exp_pass16``) as many times as ``x`` has entries, over a copy
    of the first STATS_BLOCK logits of its first row, against their max."""
    n_rows, n_cols = x.shape
    block = np.ascontiguousarray(x[0, : _cpu.STATS_BLOCK])
    if x.itemsize == 2:
        m = np.float32(block.astype(np.float32).max())
        half = HALF_BF16 if x.dtype.name == "bfloat16" else HALF_F16
        bits = block.view(np.uint16)
        return lambda: exp_pass16(bits, m, half, n_rows, n_cols, sink)
    m = block.max()
    return lambda: exp_pass(block, m, n_rows, n_cols, sink)


@dataclass
class Row:
    shape: tuple[int, int]
    dtype: str
    op: str
    ms: float
    nbytes: int
    floor_ms: float
    torch_ms: float | None = None

    @property
    def gbps(self) -> float:
        return self.nbytes / (self.ms * 1e-3) / 1e9

    @property
    def floor_multiple(self) -> float:
        return self.ms / self.floor_ms


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def numpy_cross_entropy_with_grad(x: np.ndarray, t: np.ndarray) -> tuple[np.floating, np.ndarray]:
    """The plain vectorized NumPy way: log-softmax, gather, softmax minus one-hot."""
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(x.shape[0])
    loss = np.mean(np.log(s[:, 0]) + m[:, 0] - x[rows, t])
    e /= s
    e[rows, t] -= 1
    e /= x.shape[0]
    return loss, e


def _logits(shape: tuple[int, int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(3)
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype)


def run(
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    dtype: str = "float32",
    repeats: int = 5,
    with_torch: bool = True,
    with_numpy: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Time every operation at every shape; returns one Row per (shape, operation)."""
    torch = None
    if with_torch:
        try:
            import torch

            torch.set_num_threads(numba.get_num_threads())
        except ImportError:
            torch = None
    rows: list[Row] = []
    rng = np.random.default_rng(0)
    with_numpy = with_numpy and dtype in ("float32", "float64")
    steps = len(shapes) * (1 + with_numpy + (torch is not None))
    step = 0

    def say(what: str) -> None:
        nonlocal step
        step += 1
        if progress:
            progress(f"[{step}/{steps}] {what}")

    for shape in shapes:
        rows += _time_shape(shape, dtype, repeats, rng, torch, with_numpy, say)
    return rows


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, in milliseconds, timed round-robin: every round
    calls each function once, so a slow spell of the machine (another tenant's memory
    traffic) falls on all of them alike and their ratios stay meaningful."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def _time_shape(shape, dtype, repeats, rng, torch, with_numpy, say) -> list[Row]:
    """Rows for one shape: the floors, nbxent's three operations, and the peers."""
    label = f"{shape[0]}x{shape[1]}"
    x = _logits(shape, dtype, rng)
    t = rng.integers(0, shape[1], shape[0])
    out = np.empty_like(x)
    work = x.copy()
    bits = x.view(np.uint16) if x.itemsize == 2 else x  # 16-bit floors read the raw bits
    out_bits = out.view(np.uint16) if x.itemsize == 2 else out
    sink = np.empty(shape[0], np.float64)
    ops = {"copy": lambda: parallel_copy(bits, out_bits), "np.copyto": lambda: np.copyto(out, x)}
    if HAS_STREAM_COPY:  # any dtype's rows, copied as their 16-bit words
        x16, out16 = x.view(np.uint16), out.view(np.uint16)
        ops["stream"] = lambda: parallel_stream_copy(x16, out16)
    ops |= {
        "read": lambda: read_pass(bits, sink),
        "exp": exp_floor_call(x, sink),
        "forward": lambda: api.cross_entropy(x, t),
        "fwdbwd": lambda: api.cross_entropy_with_grad(x, t, out=out),
        # in place: the buffer holds a gradient after the first call, as in a training step
        "inplace": lambda: api.cross_entropy_with_grad(work, t, out=work),
    }
    for fn in ops.values():  # warm-up: compile, and touch every buffer once
        fn()
    say(f"{label}: floors and nbxent, {repeats} rounds")
    ms = interleaved_ms(ops, repeats)
    torch_ms = None
    if torch is not None:
        # Timed apart, after nbxent: PyTorch's OpenMP threads spin for a while after each
        # call, and in the same rounds they took the cores from the next figures (+30%).
        say(f"{label}: PyTorch forward+backward")
        tx = torch.from_numpy(x.astype(np.float32) if x.itemsize == 2 else x)
        if dtype in ("float16", "bfloat16"):
            tx = tx.to(getattr(torch, dtype))
        tt = torch.from_numpy(t)

        def torch_step():
            leaf = tx.detach().requires_grad_()
            torch.nn.functional.cross_entropy(leaf, tt).backward()

        torch_step()
        torch_ms = median_ms(torch_step, max(3, repeats // 2))
        time.sleep(0.5)  # let those threads go idle before the next shape's figures
    nbytes = x.nbytes
    copy_ms, read_ms = ms["copy"], ms["read"]
    rows = [
        Row(shape, dtype, "copy (floor)", copy_ms, 2 * nbytes, copy_ms),
        Row(shape, dtype, "np.copyto (1 thread)", ms["np.copyto"], 2 * nbytes, copy_ms),
    ]
    if HAS_STREAM_COPY:
        rows.append(Row(shape, dtype, "copy, streaming stores", ms["stream"], 2 * nbytes, copy_ms))
    rows += [
        Row(shape, dtype, "read (floor)", read_ms, nbytes, read_ms),
        # the same bytes' worth of exps, computed from L1: × floor says how it compares to the read
        Row(shape, dtype, "exp loop in L1 (compute floor)", ms["exp"], nbytes, read_ms),
        Row(shape, dtype, "forward", ms["forward"], nbytes, read_ms),
        Row(shape, dtype, "forward+backward", ms["fwdbwd"], 2 * nbytes, copy_ms, torch_ms),
        Row(shape, dtype, "forward+backward in place", ms["inplace"], 2 * nbytes, copy_ms, torch_ms),
    ]
    if with_numpy:
        say(f"{label} NumPy forward+backward")
        np_ms = median_ms(lambda: numpy_cross_entropy_with_grad(x, t), max(3, repeats // 2))
        rows.append(Row(shape, dtype, "NumPy forward+backward", np_ms, 2 * nbytes, copy_ms, torch_ms))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table: ms, GB/s, multiple of the floor, PyTorch ms and the speed-up over it."""
    head = "| shape | dtype | operation | ms | GB/s | × floor | PyTorch fwd+bwd ms | speed-up vs PyTorch |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        torch_ms = f"{r.torch_ms:.3g}" if r.torch_ms is not None else "–"
        speedup = f"{r.torch_ms / r.ms:.1f}×" if r.torch_ms is not None else "–"
        lines.append(
            f"| {r.shape[0]}×{r.shape[1]} | {r.dtype} | {r.op} | {r.ms:.3g} | {r.gbps:.3g} | "
            f"{r.floor_multiple:.2f} | {torch_ms} | {speedup} |"
        )
    return "\n".join(lines)


_FIRST_CALL = """
import time, numpy as np
t0 = time.perf_counter()
import nbxent
x = np.zeros((4, 1000), np.float32)
nbxent.cross_entropy_with_grad(x, np.zeros(4, np.int64))
print(time.perf_counter() - t0)
"""

# Numba's own fixed cost, for comparison: its import and the first call of a trivial cached
# function, which loads the same target context (and, where SciPy is installed, imports it).
NUMBA_FLOOR_MODULE = """
import numba


@numba.njit(cache=True)
def first(x):
    return x[0]
"""

_NUMBA_FLOOR = """
import sys, time, numpy as np
t0 = time.perf_counter()
import numba
sys.path.insert(0, sys.argv[1])
import nbxent_numba_floor
nbxent_numba_floor.first(np.zeros(4))
print(time.perf_counter() - t0)
"""


# Prepended to a probe's script, this makes ``import scipy`` fail, as where SciPy is not installed.
HIDE_SCIPY = "import sys; sys.modules['scipy'] = None\n"


@dataclass(frozen=True)
class FirstCall:
    """Seconds for a fresh process's import and first call (``first_call_seconds``): medians,
    but for ``cold``. The ``*_no_scipy`` pair is None where SciPy is not installed."""

    cold: float  # nbxent, compile cache empty: compiles
    warm: float  # nbxent, compile cache warm
    numba_floor: float  # Numba alone, a trivial cached function, cache warm
    warm_no_scipy: float | None  # the same two with SciPy hidden
    numba_floor_no_scipy: float | None


def _probe_seconds(script: str, env: dict, *args: str) -> float:
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"first-call probe failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def first_call_seconds(warm_runs: int = 5) -> FirstCall:
    """A fresh process's import + first fused float32 call: with an empty compile cache
    (compiling), then the median of ``warm_runs`` processes that load the cache the first one
    left; and the same median for Numba alone (import + one trivial cached function), the
    floor under the warm figure that nbxent cannot go below.

    Where SciPy is installed, Numba imports it on that first call (to look for BLAS), which
    nbxent does not need: 0.2-0.3 s of the floor on our VM. Then both warm figures are taken
    once more with SciPy hidden, as on a machine without it. All warm probes alternate, so
    that they see the same neighbours.
    """
    scipy = importlib.util.find_spec("scipy") is not None
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        env.pop("NBXENT_NO_CACHE", None)
        # Python's bytecode cache too, as any install has it (pip byte-compiles; a source or
        # editable checkout writes it on the first import, the cold probe's): where the
        # environment forbids writing it, every probe compiled nbxent's source (about 50 ms
        # on our VM) while NumPy's and Numba's modules had theirs.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        cold = _probe_seconds(_FIRST_CALL, env)
        with open(os.path.join(cache, "nbxent_numba_floor.py"), "w") as f:
            f.write(NUMBA_FLOOR_MODULE)
        _probe_seconds(_NUMBA_FLOOR, env, cache)  # compiles the trivial function
        probes = {"warm": (_FIRST_CALL,), "numba_floor": (_NUMBA_FLOOR, cache)}
        if scipy:
            probes["warm_no_scipy"] = (HIDE_SCIPY + _FIRST_CALL,)
            probes["numba_floor_no_scipy"] = (HIDE_SCIPY + _NUMBA_FLOOR, cache)
        times = {name: [] for name in probes}
        for _ in range(warm_runs):
            for name, (script, *args) in probes.items():
                times[name].append(_probe_seconds(script, env, *args))
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return FirstCall(
        cold, medians["warm"], medians["numba_floor"], medians.get("warm_no_scipy"), medians.get("numba_floor_no_scipy")
    )
