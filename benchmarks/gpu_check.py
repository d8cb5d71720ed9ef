"""Check nbxent's CUDA backend on a real GPU, then time it against the memory-bandwidth floor.

Run from the repository root on a machine with an NVIDIA GPU (sized for about 5 minutes on
one H100 or H200, most of it compiling kernels)::

    python benchmarks/gpu_check.py            # checks, then timings
    python benchmarks/gpu_check.py --sweep    # also try a few launch-geometry tunables
    OUT=results/ python benchmarks/gpu_check.py   # also write gpu_check.txt and .json there
    python benchmarks/gpu_check.py --skip-checks --sweep --seconds 200 --name timings

What it does:

1. Correctness against the float64 NumPy reference (``tests/reference.py``), on the GPU:
   every logits dtype (float32, float64, float16, bfloat16), every option (reductions,
   ignore_index, label smoothing, class weights, z-loss, soft-cap, per-row grad_output),
   both kernel paths (one block per row group; rows split over blocks), a row-strided view
   written in place, the normalizations, V = 128256 and 256000, and one case with more
   than 2**31 logits (64-bit indexing), checked on sampled rows.
2. Timings with CUDA events (medians after warm-up), for bfloat16 and float32 logits of about
   4 GiB at V in {32768, 128256, 256000}: the forward pass, and forward+backward with the
   gradient written in place; next to a device-to-device copy of the same bytes and a
   read-only pass over them (the faster of a Numba XOR pass and ``torch.amax``), measured in
   the same run, and PyTorch's eager
   ``F.cross_entropy`` forward+backward. Bytes counted: forward reads N*V elements once;
   forward+backward reads them once and writes them once (a re-read that hits L2 is not
   counted), so "% of copy" compares equal byte counts.
3. Launch latency of a small batch (8 x 32000) against an empty Numba kernel launch.

Arrays are PyTorch CUDA tensors when PyTorch has CUDA, Numba device arrays otherwise (then
there is no PyTorch comparison). ``--tiny`` runs everything at toy sizes, which is how it is
checked under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) where there is no GPU; its
timings mean nothing.

Nothing runs at import (asv imports every module in ``benchmarks/``), and no name here
starts with ``time_``, ``peakmem_`` or ``track_``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

FULL = {
    "check_shape": (64, 1000),
    "split_shape": (8, 20000),
    "large_vocab": [(16, 128256), (16, 256000), (600, 128256)],
    "big": (17000, 128256),  # bfloat16: 2.18e9 logits, 4.4 GB
    "bench_vocab": [32768, 128256, 256000],
    "bench_bytes": 4 << 30,
    "latency_shape": (8, 32000),
    "repeats": 15,
}
TINY = {
    "check_shape": (6, 37),
    "split_shape": (3, 300),
    "large_vocab": [(2, 500)],
    "big": (5, 101),
    "bench_vocab": [300],
    "bench_bytes": 6 * 300 * 4,
    "latency_shape": (3, 50),
    "repeats": 2,
}


class Arrays:
    """Device arrays, copies and timing through PyTorch (when it has CUDA) or Numba."""

    def __init__(self, simulator: bool):
        self.torch = None
        if not simulator:
            try:
                import torch

                if torch.cuda.is_available():
                    self.torch = torch
            except ImportError:
                pass
        from numba import cuda

        self.cuda = cuda
        self.simulator = simulator
        self.name = "torch" if self.torch is not None else "numba"

    def put(self, a: np.ndarray):
        if self.torch is not None:
            t = self.torch.from_numpy(np.ascontiguousarray(a).view(np.uint16) if a.dtype.itemsize == 2 else a)
            t = t.cuda()
            return t.view(getattr(self.torch, a.dtype.name)) if a.dtype.itemsize == 2 else t
        if a.dtype.itemsize == 2:
            return self.cuda.to_device(np.ascontiguousarray(a).view(np.uint16)).view(a.dtype)
        return self.cuda.to_device(np.ascontiguousarray(a))

    def get(self, d) -> np.ndarray:
        if self.torch is not None:
            if d.dtype == self.torch.bfloat16:
                import ml_dtypes

                return d.contiguous().view(self.torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
            return d.detach().cpu().numpy()
        return np.asarray(d.copy_to_host())

    def empty(self, shape, dtype: np.dtype):
        if self.torch is not None:
            return self.torch.empty(shape, dtype=getattr(self.torch, np.dtype(dtype).name), device="cuda")
        return self.cuda.device_array(shape, dtype)

    def random_logits(self, shape, dtype: np.dtype, seed: int):
        """Normal logits (scale 3) made on the device: a host tile repeated, for big arrays."""
        if self.torch is not None:
            g = self.torch.Generator(device="cuda").manual_seed(seed)
            x = self.torch.randn(shape, generator=g, device="cuda", dtype=self.torch.float32) * 3
            return x.to(getattr(self.torch, np.dtype(dtype).name))
        rng = np.random.default_rng(seed)
        total = math.prod(shape)
        tile = (rng.standard_normal(min(total, 1 << 22)) * 3).astype(dtype)
        flat = self.empty((total,), np.dtype(np.uint16) if tile.itemsize == 2 else tile.dtype)
        d_tile = self.cuda.to_device(tile.view(np.uint16) if tile.itemsize == 2 else tile)
        for start in range(0, total, tile.size):
            n = min(tile.size, total - start)
            flat[start : start + n].copy_to_device(d_tile[:n])
        out = flat.reshape(shape)
        return out.view(dtype) if tile.itemsize == 2 else out

    def copy(self, dst, src) -> None:
        if self.torch is not None:
            dst.copy_(src)
        elif dst.dtype.itemsize == 2:  # as bits: Numba knows no bfloat16
            dst.view(np.uint16).copy_to_device(src.view(np.uint16))
        else:
            dst.copy_to_device(src)

    def synchronize(self) -> None:
        self.cuda.synchronize()
        if self.torch is not None:
            self.torch.cuda.synchronize()

    def measure_ms(self, fn, repeats: int, warmup: int = 2) -> float:
        """Median milliseconds of ``fn`` between CUDA events on the stream it launches on."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.torch is not None:
                start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start, end = self.cuda.event(), self.cuda.event()
                t0 = time.perf_counter()
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)  # -1 in the simulator: wall clock instead
                times.append(ms if ms >= 0 else (time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


# ----------------------------------------------------------------------------------------
# 1. Correctness
# ----------------------------------------------------------------------------------------
def _tolerances(dtype) -> tuple[float, float]:
    name = np.dtype(dtype).name
    if name == "float64":
        return 1e-10, 1e-10
    if name == "float32":
        return 5e-5, 5e-5
    return 5e-5, 2.0 ** -(7 if name == "bfloat16" else 10)


def _compare(name, got_loss, got_grad, want_loss, want_grad, dtype, failures, log) -> None:
    loss_rtol, grad_rel = _tolerances(dtype)
    ok = np.allclose(np.asarray(got_loss, np.float64), want_loss, rtol=loss_rtol, atol=loss_rtol, equal_nan=True)
    worst = 0.0
    if got_grad is not None:
        got = np.asarray(got_grad, np.float64)
        scale = max(float(np.nanmax(np.abs(want_grad), initial=0.0)), 1e-30)
        err = np.abs(got - want_grad) - grad_rel * np.abs(want_grad)
        worst = float(np.nanmax(err, initial=0.0)) / scale
        ok = ok and worst <= grad_rel and np.array_equal(np.isnan(got), np.isnan(want_grad))
    log(f"  {'ok  ' if ok else 'FAIL'} {name}" + ("" if got_grad is None else f"  (grad error {worst:.2e} of max)"))
    if not ok:
        failures.append(name)


def run_checks(arrays: Arrays, sizes: dict, log) -> list[str]:
    """Every dtype and option against the float64 reference; returns the failed case names."""
    import ml_dtypes

    import nbxent as nx
    from nbxent import _cuda
    from tests import reference as ref

    failures: list[str] = []
    rng = np.random.default_rng(0)
    dtypes = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
    option_sets = {
        "mean": {},
        "sum+smoothing+weight+ignore": {"reduction": "sum", "label_smoothing": 0.2, "weight": True},
        "none+z_loss+softcap+rows": {"reduction": "none", "z_loss": 1e-3, "softcap": 5.0, "grad_output": "rows"},
        "mean+everything": {
            "label_smoothing": 0.1,
            "weight": True,
            "z_loss": 1e-2,
            "softcap": 8.0,
            "grad_output": 0.5,
            "ignore_index": 3,
        },
    }

    def case(shape, dtype, opts, label):
        n_cols = shape[-1]
        logits = (rng.standard_normal(shape) * 3).astype(dtype)
        targets = rng.integers(0, n_cols, size=shape[:-1])
        targets.reshape(-1)[:: max(1, targets.size // 3)] = opts.get("ignore_index", -100)
        kw = {k: v for k, v in opts.items() if k not in ("weight", "grad_output")}
        ref_kw = dict(kw)
        if opts.get("weight"):
            w = rng.uniform(0.2, 2.0, n_cols)
            kw["weight"], ref_kw["weight"] = arrays.put(w.astype(np.float32)), w.astype(np.float32)
        go = opts.get("grad_output", 1.0)
        if isinstance(go, str):
            go = rng.uniform(-2, 2, shape[:-1]).astype(np.float32)
        d_logits, d_targets = arrays.put(logits), arrays.put(targets)
        d_go = arrays.put(go) if isinstance(go, np.ndarray) else go
        loss, grad = nx.cross_entropy_with_grad(d_logits, d_targets, grad_output=d_go, **kw)
        want_loss, want_grad = ref.cross_entropy(logits.astype(np.float64), targets, grad_output=go, **ref_kw)
        _compare(label, arrays.get(loss), arrays.get(grad), want_loss, want_grad, dtype, failures, log)
        loss_only = nx.cross_entropy(d_logits, d_targets, **kw)
        _compare(label + " (loss only)", arrays.get(loss_only), None, want_loss, None, dtype, failures, log)

    log("correctness against the float64 reference:")
    blocks = _cuda.BLOCKS_PER_SM
    for dtype in dtypes:
        for name, opts in option_sets.items():
            case(sizes["check_shape"], dtype, opts, f"{np.dtype(dtype).name:8} rows  {name}")
            case(sizes["split_shape"], dtype, opts, f"{np.dtype(dtype).name:8} split {name}")
        # Normalizations, and a row-strided view ([:, :-1]) written in place.
        x = (rng.standard_normal((4, 7, sizes["check_shape"][1] + 1)) * 3).astype(dtype)
        d_x = arrays.put(x)
        x64 = x.astype(np.float64)
        name = f"{np.dtype(dtype).name:8}"
        lse = arrays.get(nx.logsumexp(d_x)).astype(np.float64)
        _compare(f"{name} logsumexp", lse, None, ref.logsumexp(x64), None, dtype, failures, log)
        for func, want in ((nx.softmax, ref.softmax(x64)), (nx.log_softmax, ref.log_softmax(x64))):
            got = arrays.get(func(d_x)).astype(np.float64)  # rounded to the logits' dtype
            _compare(f"{name} {func.__name__}", 0.0, got, 0.0, want, dtype, failures, log)
        targets = rng.integers(0, x.shape[-1], size=(4, 6))
        view = d_x[:, :-1]
        loss, _ = nx.cross_entropy_with_grad(view, arrays.put(targets), reduction="sum", out=view)
        want_loss, want_grad = ref.cross_entropy(x64[:, :-1], targets, reduction="sum")
        got = arrays.get(d_x)
        _compare(f"{np.dtype(dtype).name:8} strided view in place", arrays.get(loss), got[:, :-1], want_loss,
                 want_grad, dtype, failures, log)  # fmt: skip
        if not np.array_equal(got[:, -1].view(np.uint8), x[:, -1].view(np.uint8)):
            failures.append(f"{np.dtype(dtype).name} strided view in place: wrote outside the view")
    _cuda.BLOCKS_PER_SM = blocks
    for n_rows, n_cols in sizes["large_vocab"]:
        for dtype in (np.float32, ml_dtypes.bfloat16):
            case((n_rows, n_cols), dtype, option_sets["mean+everything"], f"{np.dtype(dtype).name:8} {n_rows}x{n_cols}")
    failures += check_64bit_indexing(arrays, sizes, log)
    return failures


def check_64bit_indexing(arrays: Arrays, sizes: dict, log) -> list[str]:
    """More than 2**31 logits (bfloat16, in place): loss of every row and the gradient of
    rows around element 2**31 and at the end, against the reference for those rows."""
    import ml_dtypes

    import nbxent as nx
    from tests import reference as ref

    n_rows, n_cols = sizes["big"]
    log(f"64-bit indexing: {n_rows} x {n_cols} bfloat16 = {n_rows * n_cols / 2**31:.2f} * 2**31 logits")
    logits = arrays.random_logits((n_rows, n_cols), ml_dtypes.bfloat16, seed=1)
    targets = np.random.default_rng(2).integers(0, n_cols, size=n_rows)
    rows = sorted({0, min(n_rows - 1, (2**31) // n_cols), min(n_rows - 1, (2**31) // n_cols + 1), n_rows - 1})
    sample = np.stack([arrays.get(logits[r]) for r in rows])
    losses = arrays.get(nx.cross_entropy(logits, arrays.put(targets), reduction="none"))
    mean, _ = nx.cross_entropy_with_grad(logits, arrays.put(targets), out=logits)
    grads = np.stack([arrays.get(logits[r]) for r in rows]).astype(np.float64)
    want_loss, want_grad = ref.cross_entropy(sample.astype(np.float64), targets[rows], reduction="none")
    failures: list[str] = []
    _compare("per-row loss of sampled rows", losses[rows], grads * n_rows, want_loss, want_grad, ml_dtypes.bfloat16,
             failures, log)  # fmt: skip
    mean_ok = np.isclose(float(arrays.get(mean)), float(np.mean(losses)), rtol=1e-4)
    log(f"  {'ok  ' if mean_ok else 'FAIL'} mean over all rows (device reduction vs host mean of per-row losses)")
    if not mean_ok:
        failures.append("64-bit mean")
    del logits
    return failures


# ----------------------------------------------------------------------------------------
# 2-3. Timings
# ----------------------------------------------------------------------------------------
cuda = None  # numba.cuda, imported by _read_kernel: nothing CUDA happens at import


def _read_words(words, out):
    """A read-only pass: every thread XORs 64-bit words, four independent loads in flight per
    step (grid-stride); nothing is written unless the XOR hits one unlikely value, which
    keeps the loads from being optimized away."""
    n, step = words.size, cuda.gridsize(1)
    k = cuda.grid(1)
    a0 = a1 = a2 = a3 = np.uint64(0)
    while k + 3 * step < n:
        a0 ^= words[k]
        a1 ^= words[k + step]
        a2 ^= words[k + 2 * step]
        a3 ^= words[k + 3 * step]
        k += 4 * step
    while k < n:
        a0 ^= words[k]
        k += step
    if a0 ^ a1 ^ a2 ^ a3 == np.uint64(0x9E3779B97F4A7C15):
        out[0] = a0


def _read_kernel():
    global cuda
    from numba import cuda

    return cuda.jit("void(uint64[::1], uint64[::1])")(_read_words)


def _word_view(arrays: Arrays, x):
    """The logits' memory as a Numba uint64 array (for the read-only pass)."""
    from numba import cuda

    if arrays.torch is not None:
        flat = x.reshape(-1).view(arrays.torch.uint8).view(arrays.torch.int64)
        return cuda.as_cuda_array(flat).view(np.uint64)
    return x.reshape(-1).view(np.uint8).view(np.uint64)


def run_benchmarks(arrays: Arrays, sizes: dict, log) -> list[dict]:
    """The timing table: for each dtype and V, forward and forward+backward in place."""
    import ml_dtypes

    log("\n dtype      V        N      op                     ms      GB/s   %copy   %read   torch ms  speed-up")
    results = []
    for dtype in (ml_dtypes.bfloat16, np.float32):
        for n_cols in sizes["bench_vocab"]:
            results += bench_case(arrays, np.dtype(dtype), n_cols, sizes, log)
            arrays.synchronize()
    return results


def bench_case(arrays: Arrays, dtype: np.dtype, n_cols: int, sizes: dict, log) -> list[dict]:
    """One row pair of the table, with its copy and read-only baselines on the same bytes."""
    import nbxent as nx

    reps = sizes["repeats"]
    n_rows = max(1, sizes["bench_bytes"] // (n_cols * dtype.itemsize))
    nbytes = n_rows * n_cols * dtype.itemsize
    x = arrays.random_logits((n_rows, n_cols), dtype, seed=n_cols)
    targets = arrays.put(np.random.default_rng(3).integers(0, n_cols, size=n_rows))
    pristine = arrays.empty((n_rows, n_cols), dtype)
    arrays.copy(pristine, x)
    copy_ms = arrays.measure_ms(lambda: arrays.copy(pristine, x), reps)
    read_words, sink = _read_kernel(), cuda.device_array(1, np.uint64)
    words = _word_view(arrays, x)
    n_sm = 1 if arrays.simulator else cuda.get_current_device().MULTIPROCESSOR_COUNT
    block = 32 if arrays.simulator else 1024
    read_ms = arrays.measure_ms(lambda: read_words[4 * n_sm, block](words, sink), reps)
    if arrays.torch is not None:  # PyTorch's max-reduction over the same bytes: the faster counts
        read_ms = min(read_ms, arrays.measure_ms(lambda: arrays.torch.amax(x), reps))
    copy_gbps, read_gbps = 2 * nbytes / copy_ms / 1e6, nbytes / read_ms / 1e6
    # validate=False: the kernels alone (validate=True adds a check kernel and a 8-byte read
    # back per call; its cost is in the latency table).
    fwd_ms = arrays.measure_ms(lambda: nx.cross_entropy(x, targets, validate=False), reps)
    inplace_ms = arrays.measure_ms(lambda: nx.cross_entropy_with_grad(x, targets, out=x, validate=False), reps)
    arrays.copy(x, pristine)
    torch_ms = torch_fwd_bwd_ms(arrays, x, targets, reps)
    rows = []
    for op, ms, moved in (("forward", fwd_ms, nbytes), ("forward+backward inpl", inplace_ms, 2 * nbytes)):
        gbps = moved / ms / 1e6
        row = {
            "dtype": dtype.name,
            "V": n_cols,
            "N": n_rows,
            "op": op,
            "ms": ms,
            "GB/s": gbps,
            "copy GB/s": copy_gbps,
            "read GB/s": read_gbps,
            "% of copy": 100 * gbps / copy_gbps,
            "% of read": 100 * gbps / read_gbps if op == "forward" else None,
            "torch fwd+bwd ms": torch_ms if op != "forward" else None,
            "speed-up vs torch": torch_ms / ms if torch_ms and op != "forward" else None,
        }
        rows.append(row)
        log(
            f" {row['dtype']:9} {n_cols:<8} {n_rows:<6} {op:21} {ms:8.3f} {gbps:8.0f} {row['% of copy']:6.1f}"
            f"  {_fmt(row['% of read'], '6.1f')}   {_fmt(row['torch fwd+bwd ms'], '8.3f')}"
            f"  {_fmt(row['speed-up vs torch'], '6.2f')}"
        )
    log(f" {'':26} copy {copy_ms:8.3f} ms {copy_gbps:6.0f} GB/s; read-only {read_ms:8.3f} ms {read_gbps:6.0f} GB/s")
    return rows


def _fmt(value, spec: str) -> str:
    return "   n/a" if value is None else format(value, spec)


def torch_fwd_bwd_ms(arrays: Arrays, x, targets, reps: int) -> float | None:
    """PyTorch's eager ``F.cross_entropy`` forward and backward on a copy of the logits."""
    if arrays.torch is None:
        return None
    torch = arrays.torch
    leaf = x.detach().clone().requires_grad_()

    def fwd_bwd():
        leaf.grad = None
        torch.nn.functional.cross_entropy(leaf, targets).backward()

    try:
        return arrays.measure_ms(fwd_bwd, reps)
    except torch.cuda.OutOfMemoryError:
        return None


def run_latency(arrays: Arrays, sizes: dict, log) -> dict:
    """Host wall-clock per call for a small batch, against an empty kernel launch."""
    import ml_dtypes
    from numba import cuda

    import nbxent as nx

    @cuda.jit("void()")
    def empty_kernel():
        pass

    n_rows, n_cols = sizes["latency_shape"]
    x = arrays.random_logits((n_rows, n_cols), ml_dtypes.bfloat16, seed=4)
    t = arrays.put(np.random.default_rng(5).integers(0, n_cols, size=n_rows))
    calls = {
        "empty Numba kernel launch": lambda: empty_kernel[1, 1](),
        "nbxent forward": lambda: nx.cross_entropy(x, t, validate=False),
        "nbxent forward+backward in place": lambda: nx.cross_entropy_with_grad(x, t, out=x, validate=False),
        "nbxent forward+backward, validate=True": lambda: nx.cross_entropy_with_grad(x, t, out=x),
    }
    if arrays.torch is not None:
        leaf = x.detach().clone().requires_grad_()

        def torch_call():
            leaf.grad = None
            arrays.torch.nn.functional.cross_entropy(leaf, t).backward()

        calls["torch F.cross_entropy forward+backward"] = torch_call
    log(f"\nlatency, {n_rows} x {n_cols} bfloat16 (host wall-clock per call, synchronized every 50 calls):")
    out = {}
    for name, fn in calls.items():
        for _ in range(5):
            fn()
        arrays.synchronize()
        per_call = []
        for _ in range(4 if sizes is TINY else 20):
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            arrays.synchronize()
            per_call.append((time.perf_counter() - t0) / 50 * 1e6)
        out[name] = statistics.median(per_call)
        log(f"  {name:42} {out[name]:9.1f} us")
    return out


def kernel_resources(log) -> dict:
    """Registers and local (spill) memory per thread of every kernel compiled in this run."""
    from nbxent import _backend_cuda

    out = {}
    log("\ncompiled kernels (registers / local bytes per thread):")
    for key, kernel in _backend_cuda._COMPILED.items():
        try:
            regs = kernel.get_regs_per_thread()
            local = kernel.get_local_mem_per_thread()
        except Exception:  # the simulator has none of this
            continue
        regs = next(iter(regs.values())) if isinstance(regs, dict) else regs
        local = next(iter(local.values())) if isinstance(local, dict) else local
        out[str(key)] = {"registers": regs, "local bytes": local}
        log(f"  {key!s:60} {regs:4} {local:6}")
    return out


SWEEP_FULL = [(t, u, b, True) for t in (256, 512, 1024) for u in (2, 4, 8) for b in (1, 2, 4) if t * b <= 2048]
# (THREADS, UNROLL, BLOCKS_PER_SM, PREFETCH): the best geometries of the first H200 runs, with
# and without prefetching the next step's words.
SWEEP_TUNE = [(t, u, b, p) for t, u, b in ((256, 4, 4), (512, 4, 2), (512, 4, 1)) for p in (True, False)]


def run_sweep(arrays: Arrays, log, deadline: float, configs=SWEEP_FULL) -> list[dict]:
    """Forward, and forward+backward in place, at V = 128256 in bfloat16 and float32, for
    launch geometries ``(THREADS, UNROLL, BLOCKS_PER_SM)``; stops at ``deadline`` (a
    ``time.perf_counter`` value). Leaves the tunables as it found them."""
    import ml_dtypes

    import nbxent as nx
    from nbxent import _cuda

    saved = (_cuda.THREADS, _cuda.UNROLL, _cuda.BLOCKS_PER_SM, _cuda.PREFETCH)
    n_cols = 128256
    rows = []
    log("\nsweep, V = 128256, 2 GiB of logits (THREADS, UNROLL, BLOCKS_PER_SM; GB/s as in the table):")
    log(" dtype      THREADS UNROLL BLOCKS PREFETCH   fwd ms  fwd GB/s  inpl ms inpl GB/s")
    try:
        for dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)):
            n_rows = (2 << 30) // (n_cols * dtype.itemsize)
            x = arrays.random_logits((n_rows, n_cols), dtype, seed=6)
            t = arrays.put(np.random.default_rng(7).integers(0, n_cols, size=n_rows))
            nbytes = n_rows * n_cols * dtype.itemsize
            for threads, unroll, blocks, prefetch in configs:
                if time.perf_counter() > deadline:
                    log("  (deadline reached: sweep stopped)")
                    return rows
                _cuda.THREADS, _cuda.UNROLL, _cuda.BLOCKS_PER_SM, _cuda.PREFETCH = threads, unroll, blocks, prefetch
                try:
                    fwd = arrays.measure_ms(lambda: nx.cross_entropy(x, t, validate=False), 7)  # noqa: B023
                    inpl = arrays.measure_ms(lambda: nx.cross_entropy_with_grad(x, t, out=x, validate=False), 7)  # noqa: B023
                except Exception as e:  # a geometry that does not compile or launch
                    log(f" {dtype.name:9} {threads:7} {unroll:6} {blocks:6} {prefetch!s:8}  failed: {e}")
                    continue
                rows.append({"dtype": dtype.name, "THREADS": threads, "UNROLL": unroll, "BLOCKS_PER_SM": blocks,
                             "PREFETCH": prefetch,
                             "forward ms": fwd, "inplace ms": inpl,
                             "forward GB/s": nbytes / fwd / 1e6, "inplace GB/s": 2 * nbytes / inpl / 1e6})  # fmt: skip
                log(
                    f" {dtype.name:9} {threads:7} {unroll:6} {blocks:6} {prefetch!s:8}"
                    f" {fwd:8.3f} {nbytes / fwd / 1e6:9.0f} {inpl:8.3f} {2 * nbytes / inpl / 1e6:9.0f}"
                )
    finally:
        _cuda.THREADS, _cuda.UNROLL, _cuda.BLOCKS_PER_SM, _cuda.PREFETCH = saved
    return rows


def best_config(rows: list[dict]) -> tuple[int, int, int, bool] | None:
    """The geometry with the best geometric mean of the four bandwidths (bfloat16 and
    float32, forward and in place) among those measured for both dtypes."""
    by_config: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["THREADS"], r["UNROLL"], r["BLOCKS_PER_SM"], r["PREFETCH"])
        by_config.setdefault(key, []).extend([r["forward GB/s"], r["inplace GB/s"]])
    scored = {k: math.prod(v) ** (1 / len(v)) for k, v in by_config.items() if len(v) == 4}
    return max(scored, key=scored.get) if scored else None


def profile_small_call(arrays: Arrays, sizes: dict, log) -> str:
    """Where the host time of a small forward call goes: cProfile of 200 calls."""
    import cProfile
    import io
    import pstats

    import ml_dtypes

    import nbxent as nx

    n_rows, n_cols = sizes["latency_shape"]
    x = arrays.random_logits((n_rows, n_cols), ml_dtypes.bfloat16, seed=8)
    t = arrays.put(np.random.default_rng(9).integers(0, n_cols, size=n_rows))
    for _ in range(5):
        nx.cross_entropy(x, t, validate=False)
    arrays.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        nx.cross_entropy(x, t, validate=False)
    prof.disable()
    arrays.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    log("\nhost profile of 200 small forward calls (tottime):")
    log(buf.getvalue()[-6000:])
    return buf.getvalue()


def environment(arrays: Arrays) -> dict:
    import numba
    from numba import cuda

    info = {"python": platform.python_version(), "numba": numba.__version__, "arrays": arrays.name}
    try:
        import numba_cuda

        info["numba-cuda"] = numba_cuda.__version__
    except (ImportError, AttributeError):
        pass
    if arrays.torch is not None:
        info["torch"] = arrays.torch.__version__
    if not arrays.simulator:
        dev = cuda.get_current_device()
        info.update(
            device=dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
            compute_capability=".".join(map(str, dev.compute_capability)),
            sm_count=dev.MULTIPROCESSOR_COUNT,
        )
    else:
        info["device"] = "CUDA simulator (timings meaningless)"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (for the CUDA simulator)")
    parser.add_argument("--skip-checks", action="store_true", help="timings only")
    parser.add_argument("--skip-timings", action="store_true", help="checks only")
    parser.add_argument("--sweep", action="store_true", help="also sweep THREADS, UNROLL, BLOCKS_PER_SM")
    parser.add_argument("--tune", action="store_true", help="sweep a few geometries, time the table with the best")
    parser.add_argument("--profile", action="store_true", help="cProfile the host side of a small call")
    parser.add_argument("--tune-only", action="store_true", help="with --tune: print the best geometry, no table")
    parser.add_argument("--tunables", type=_geometry, help="THREADS,UNROLL,BLOCKS_PER_SM,PREFETCH(0/1) to run with")
    parser.add_argument("--name", default="gpu_check", help="file stem of the reports written under $OUT")
    parser.add_argument("--seconds", type=float, default=math.inf, help="stop the sweep after this many seconds")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # nbxent from this checkout, and tests.reference

    from nbxent import _cuda

    simulator = _cuda.SIMULATOR
    sizes = TINY if args.tiny else FULL
    if args.tiny:  # small blocks, so that the simulator takes every path quickly
        _cuda.THREADS, _cuda.UNROLL, _cuda.MIN_GROUP, _cuda.SPLIT_CHUNK = 16, 2, 4, 40
    if simulator:
        from nbxent import api

        # The simulator's arrays lack __cuda_array_interface__; Numba marks its device arrays
        # (real and simulated) with __cuda_ndarray__, which api.is_gpu_array may not check.
        gpu_array = api.is_gpu_array
        api.is_gpu_array = lambda a: bool(getattr(a, "__cuda_ndarray__", False)) or gpu_array(a)
        _cuda.BLOCKS_PER_SM = 2
        import warnings

        warnings.simplefilter("ignore", RuntimeWarning)
        sys.setswitchinterval(5e-4)
        from tests.cudasim import one_shared_array_per_block  # the simulator's race (docs/gpu.md)

        one_shared_array_per_block()
    if args.tunables:
        _cuda.THREADS, _cuda.UNROLL, _cuda.BLOCKS_PER_SM, _cuda.PREFETCH = args.tunables
    arrays = Arrays(simulator)

    lines: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.perf_counter()
    report: dict = {"environment": environment(arrays), "tunables": _tunables(_cuda)}
    out_dir = os.environ.get("OUT")

    def save() -> None:  # after each step, so that a run stopped at a time limit keeps what it did
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / f"{args.name}.txt").write_text("\n".join(lines) + "\n")
            (Path(out_dir) / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=str))

    log(json.dumps(report["environment"]))
    failures: list[str] = []
    if not args.skip_checks:
        failures = run_checks(arrays, sizes, log)
        report["failures"] = failures
        log(f"\n{len(failures)} check(s) failed" + (": " + ", ".join(failures) if failures else ""))
        save()
    if not args.skip_timings:
        if args.tune and not args.tiny:
            report["tune"] = run_sweep(arrays, log, started + args.seconds, SWEEP_TUNE)
            best = best_config(report["tune"])
            if best is not None:
                _cuda.THREADS, _cuda.UNROLL, _cuda.BLOCKS_PER_SM, _cuda.PREFETCH = best
            report["tunables"] = _tunables(_cuda)
            log(f"\ntunables for the table: {report['tunables']}")
            if best is not None:
                log("best: " + ",".join(str(int(v)) for v in best))
            save()
    if not args.skip_timings and not args.tune_only:
        report["timings"] = run_benchmarks(arrays, sizes, log)
        save()
        report["latency_us"] = run_latency(arrays, sizes, log)
        save()
        if args.profile:
            report["profile"] = profile_small_call(arrays, sizes, log)
            save()
        if args.sweep and not args.tiny:
            report["sweep"] = run_sweep(arrays, log, started + args.seconds)
    report["kernels"] = kernel_resources(log)
    report["seconds"] = time.perf_counter() - started
    log(f"\ndone in {report['seconds']:.0f} s")
    save()
    return 1 if failures else 0


def _geometry(text: str) -> tuple[int, int, int, bool]:
    """``--tunables``: four comma-separated integers, the last 0 or 1."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts) or parts[3].strip() not in ("0", "1"):
        raise argparse.ArgumentTypeError(
            f"expected THREADS,UNROLL,BLOCKS_PER_SM,PREFETCH(0/1), e.g. 256,4,4,0; got {text!r}"
        )
    threads, unroll, blocks, prefetch = (int(p) for p in parts)
    return threads, unroll, blocks, bool(prefetch)


def _tunables(module) -> dict:
    names = ("THREADS", "UNROLL", "MIN_GROUP", "BLOCKS_PER_SM", "SPLIT_CHUNK", "PREFETCH")
    return {name: getattr(module, name) for name in names}


if __name__ == "__main__":
    sys.exit(main())
