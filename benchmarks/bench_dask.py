"""Dask benchmarks: ``nbxent.dask`` on the threaded scheduler against the in-memory functions.

- ``DaskThreads.time_nbxent_dask``: graph build and compute of ``nbxent.dask`` on NumPy logits
  wrapped by ``da.from_array``, chunked along rows only or along rows and the vocabulary;
- ``InMemory.time_nbxent``: the same call of ``nbxent`` on the same logits (the baseline);
- ``LazyLogitsMemory.peakmem_objective``: peak memory when the logits are made per block from
  ``hidden @ weight.T`` (Dask) against making them whole (NumPy). Not timed: on the threaded
  scheduler OpenBLAS starts its own threads inside Dask's, which times BLAS, not nbxent (the
  example times the same objective on a cluster with single-threaded workers).

A multi-process cluster is left to ``examples/dask_lazy_logits.py``: starting one per
benchmark would dominate the timings. Everything is skipped when Dask is not installed.
"""

from __future__ import annotations

import functools

import numpy as np

import nbxent as nx

from . import _common

SHAPE = "64x4000" if _common.QUICK else "2048x32000"
# Row chunks x vocabulary chunks, as fractions of N and V (the vocabulary split unevenly).
CHUNKINGS = ["rows", "rows x vocab"]
OPS = ["forward", "forward+backward"]
# hidden size and (rows, vocabulary) of the lazily made logits, and their block shape.
LAZY = (64, "256x8000", (64, 2000)) if _common.QUICK else (256, "4096x65536", (512, 8192))


def _import_dask():
    """``(dask, dask.array, nbxent.dask)``; NotImplementedError (asv: skipped) without Dask."""
    try:
        import dask
        import dask.array as da

        import nbxent.dask as nxd
    except ImportError as e:
        raise NotImplementedError("Dask is not installed: pip install 'nbxent[dask]'") from e
    return dask, da, nxd


def chunks_for(chunking: str, n_rows: int, n_cols: int) -> tuple:
    """Block shape of a ``CHUNKINGS`` entry: 8 row blocks; the vocabulary whole or in 5 blocks."""
    row_chunk = max(1, n_rows // 8)
    if chunking == "rows":
        return (row_chunk, n_cols)
    if chunking == "rows x vocab":
        return (row_chunk, max(1, n_cols // 5 + 1))  # 5 blocks, the last one shorter
    raise ValueError(f"unknown chunking {chunking!r}; expected one of {CHUNKINGS}")


def _compute_all(dask, results) -> None:
    dask.compute(*results, scheduler="threads")


class DaskThreads:
    """``nbxent.dask`` on the threaded scheduler; the time includes building the graph."""

    params = [CHUNKINGS, OPS]
    param_names = ["chunking", "op"]
    timeout = 300
    warmup_time = 0  # setup's warm-up call takes its place

    def setup(self, chunking, op):
        dask, da, nxd = _import_dask()
        logits = _common.cached_logits(SHAPE, "float32")
        targets = _common.make_targets(SHAPE)
        dlogits = da.from_array(logits, chunks=chunks_for(chunking, *logits.shape))
        fn = nxd.cross_entropy if op == "forward" else nxd.cross_entropy_with_grad

        def call():
            out = fn(dlogits, targets)
            _compute_all(dask, out if isinstance(out, tuple) else (out,))

        self.call = call
        _common.warm_up_once(("dask", chunking, op), call)

    def time_nbxent_dask(self, chunking, op):
        self.call()


class InMemory:
    """``nbxent`` on the same NumPy logits as ``DaskThreads``: the baseline."""

    params = [OPS]
    param_names = ["op"]
    timeout = 300
    warmup_time = 0

    def setup(self, op):
        logits = _common.cached_logits(SHAPE, "float32")
        targets = _common.make_targets(SHAPE)
        fn = nx.cross_entropy if op == "forward" else nx.cross_entropy_with_grad
        self.call = functools.partial(fn, logits, targets)
        _common.warm_up_once(("in memory", op), self.call)

    def time_nbxent(self, op):
        self.call()


class LazyLogitsMemory:
    """Loss and gradient norm of ``logits = hidden @ weight.T``: made block by block and dropped
    once read (Dask, threaded scheduler), or made whole (NumPy). asv's ``peakmem_`` is the
    process's peak RSS, inputs included: ``hidden`` and ``weight`` are small, the whole
    logits (N x V float32) are not."""

    params = [["dask blocks", "numpy whole"]]
    param_names = ["logits"]
    timeout = 600
    warmup_time = 0

    def setup(self, logits):
        d, shape, blocks = LAZY
        n_rows, n_cols = _common.parse_shape(shape)
        rng = np.random.default_rng(_common.SEED)
        hidden = rng.standard_normal((n_rows, d), dtype=np.float32)
        weight = rng.standard_normal((n_cols, d), dtype=np.float32) * np.float32(2 / np.sqrt(d))
        targets = _common.make_targets(shape)
        if logits == "numpy whole":
            self.call = functools.partial(_numpy_objective, hidden, weight, targets)
            _common.warm_up_once(("numpy whole", shape), lambda: _numpy_objective(hidden[:2], weight, targets[:2]))
            return
        dask, da, nxd = _import_dask()
        h = da.from_array(hidden, chunks=(blocks[0], d))
        w = da.from_array(weight, chunks=(blocks[1], d))

        def call():
            loss, grad = nxd.cross_entropy_with_grad(h @ w.T, targets)
            _compute_all(dask, (loss, da.linalg.norm(grad @ w)))

        self.call = call
        small = functools.partial(nxd.cross_entropy_with_grad, h[:2] @ w.T, targets[:2])
        _common.warm_up_once(("dask blocks", shape), lambda: _compute_all(dask, small()))

    def peakmem_objective(self, logits):
        self.call()


def _numpy_objective(hidden, weight, targets):
    logits = hidden @ weight.T
    loss, grad = nx.cross_entropy_with_grad(logits, targets, out=logits)
    return loss, np.linalg.norm(grad @ weight)
