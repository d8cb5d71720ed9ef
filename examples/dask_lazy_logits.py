"""Cross-entropy over logits that never exist in full, on a multi-process Dask cluster.

A language model's output layer gives ``logits = hidden @ weight.T``. Here both factors are
Dask arrays, so each (rows x vocabulary) block of logits is computed by a worker when it is
needed and dropped once nbxent has read it; the full logits are several times larger than
all the workers' memory together. The script computes, lazily:

- the mean cross-entropy loss (``nbxent.dask.cross_entropy_with_grad``), and
- the gradient with respect to ``hidden`` (``grad_logits @ weight``), reduced to its norm,

then reports the wall time and the peak resident memory of each worker process (its kernel
high-water mark, ``VmHWM``, reset just before the computation), and compares with the
in-memory path (NumPy logits, ``nbxent.cross_entropy_with_grad`` in place) at a size that
fits in one process.

Run from the repository root (needs ``pip install 'nbxent[dask]'``)::

    python examples/dask_lazy_logits.py                  # 4 GiB of logits, 2 workers x 600 MB
    python examples/dask_lazy_logits.py --rows 4096      # a quick run
"""

from __future__ import annotations

import argparse
import os
import time

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

import nbxent as nx
import nbxent.dask as nxd

MIB = 2**20


def reset_peak_memory() -> None:
    """Reset this process's resident-memory high-water mark (Linux: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory() -> int:
    """This process's resident-memory high-water mark since the last reset, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def current_memory() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def problem(rows: int, vocab: int, hidden: int, row_chunk: int, vocab_chunk: int, seed: int = 0):
    """Lazy ``hidden`` (rows x d), ``weight`` (vocab x d), their logits and random targets."""
    rng = da.random.default_rng(seed)
    h = rng.standard_normal((rows, hidden), chunks=(row_chunk, hidden), dtype=np.float32)
    w = rng.standard_normal((vocab, hidden), chunks=(vocab_chunk, hidden), dtype=np.float32)
    w = w * np.float32(2.0 / np.sqrt(hidden))  # logits with a standard deviation of about 2
    targets = rng.integers(0, vocab, rows, chunks=row_chunk)
    return h, w, h @ w.T, targets


def lazy_objective(h, w, logits, targets):
    """The loss and the norm of d loss / d hidden, as lazy Dask scalars."""
    loss, grad_logits = nxd.cross_entropy_with_grad(logits, targets)
    grad_hidden = grad_logits @ w  # (rows x d): sums over the vocabulary blocks
    return loss, da.sqrt((grad_hidden.astype(np.float64) ** 2).sum())


def run_on_cluster(client: Client, lazy) -> tuple[tuple, float, dict]:
    """Compute ``lazy`` on the cluster: (results, seconds, per-worker peak RSS in bytes)."""
    client.run(reset_peak_memory)
    start = time.perf_counter()
    results = client.compute(list(lazy), sync=True)
    seconds = time.perf_counter() - start
    return tuple(float(r) for r in results), seconds, client.run(peak_memory)


def run_in_memory(h: np.ndarray, w: np.ndarray, targets: np.ndarray) -> tuple[tuple, float, int]:
    """The same objective with NumPy arrays: (results, seconds, this process's peak RSS)."""
    reset_peak_memory()
    start = time.perf_counter()
    logits = h @ w.T
    loss, grad_logits = nx.cross_entropy_with_grad(logits, targets, out=logits)  # in place: no second N x V
    grad_hidden = grad_logits @ w
    norm = float(np.sqrt(np.sum(grad_hidden.astype(np.float64) ** 2)))
    seconds = time.perf_counter() - start
    return (float(loss), norm), seconds, peak_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384, help="rows of logits (tokens)")
    parser.add_argument("--vocab", type=int, default=65536, help="vocabulary size V")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size d")
    parser.add_argument("--row-chunk", type=int, default=512)
    parser.add_argument("--vocab-chunk", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="600MB", help="per worker (Dask's memory_limit)")
    parser.add_argument("--compare-rows", type=int, default=4096, help="rows for the in-memory comparison")
    args = parser.parse_args()

    big = problem(args.rows, args.vocab, args.hidden, args.row_chunk, args.vocab_chunk)
    small = problem(args.compare_rows, args.vocab, args.hidden, args.row_chunk, args.vocab_chunk)
    logits_gib = big[2].nbytes / 2**30
    print(
        f"logits {big[2].shape} float32 = {logits_gib:.2f} GiB in {big[2].npartitions} lazy blocks of "
        f"{args.row_chunk}x{args.vocab_chunk}; {args.workers} workers x {args.memory_limit}, 1 thread each"
    )
    # One thread per worker process, and Numba and BLAS single-threaded inside it: the
    # processes share the machine's cores without oversubscribing them.
    env = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=args.memory_limit,
            dashboard_address=None,
            env=env,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: nxd.cross_entropy(da.zeros((2, 4), chunks=(1, 2)), np.zeros(2, int)).compute())  # warm up
        idle = client.run(current_memory)
        print(f"worker memory before: {', '.join(f'{v / MIB:.0f}' for v in idle.values())} MiB")

        (loss, norm), seconds, peaks = run_on_cluster(client, lazy_objective(*big))
        print(f"dask, {logits_gib:.2f} GiB of logits: loss {loss:.6f}, |dL/dh| {norm:.6e}, {seconds:.2f} s")
        print(
            f"  peak worker memory: {', '.join(f'{v / MIB:.0f}' for v in peaks.values())} MiB; together "
            f"{sum(peaks.values()) / 2**30:.2f} GiB for {logits_gib:.2f} GiB of logits"
        )

        (s_loss, s_norm), s_seconds, s_peaks = run_on_cluster(client, lazy_objective(*small))
        small_gib = small[2].nbytes / 2**30
        print(f"dask, {small_gib:.2f} GiB of logits: loss {s_loss:.6f}, |dL/dh| {s_norm:.6e}, {s_seconds:.2f} s")
        print(f"  peak worker memory: {', '.join(f'{v / MIB:.0f}' for v in s_peaks.values())} MiB")
        h, w, _, targets = small
        h, w, targets = dask.compute(h, w, targets, scheduler="threads")

    before = current_memory()
    (m_loss, m_norm), m_seconds, m_peak = run_in_memory(h, w, targets)
    print(
        f"in memory, {small_gib:.2f} GiB of logits ({os.cpu_count()} threads): loss {m_loss:.6f}, "
        f"|dL/dh| {m_norm:.6e}, {m_seconds:.2f} s"
    )
    print(f"  peak process memory: {m_peak / MIB:.0f} MiB ({before / MIB:.0f} MiB before)")
    rel = max(abs(s_loss - m_loss) / abs(m_loss), abs(s_norm - m_norm) / abs(m_norm))
    print(f"dask vs in memory at {small_gib:.2f} GiB: largest relative difference {rel:.1e}")
    if rel > 1e-5:
        raise SystemExit("dask and in-memory results differ by more than 1e-5")


if __name__ == "__main__":
    main()
