"""Fused linear cross-entropy against the materialized path: time and peak memory.

Both paths compute the loss of ``hidden @ weight.T`` and the gradients with respect to
``hidden`` and ``weight`` (float32, plain options):

- "chunked": ``nbxent.linear.linear_cross_entropy_with_grad`` with its default chunks (logits
  of 64 MiB at a time);
- "materialized": the full N x V logits by one matrix product, ``nx.cross_entropy_with_grad``
  with ``out=logits`` (the gradient written over them), then ``grad @ weight`` and
  ``grad.T @ hidden``: the least memory a caller holding all logits can use.

The issue's shape is N = 8192 rows, H = 512, V = 32000 (full logits 1000 MiB); the small one
is 1024 x 256 x 8000. ``peakmem_`` is the whole process's maximum RSS (interpreter, Numba,
the inputs, then the call): compare the two paths at one shape. With ``NBXENT_ASV_QUICK=1``
the shapes shrink to a tiny one, for CI.
"""

from __future__ import annotations

import functools

import numpy as np

import nbxent as nx
from nbxent.linear import linear_cross_entropy_with_grad

from . import _common

SHAPES = ["64x16x500"] if _common.QUICK else ["1024x256x8000", "8192x512x32000"]
"""Problem sizes as ``"NxHxV"``: rows, hidden size, vocabulary."""


def parse_problem(shape: str) -> tuple[int, int, int]:
    """``"8192x512x32000"`` -> ``(8192, 512, 32000)``."""
    n_rows, n_hidden, n_classes = (int(part) for part in shape.split("x"))
    return n_rows, n_hidden, n_classes


@functools.lru_cache(maxsize=1)
def problem(shape: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded float32 ``(hidden, weight, targets)``, built once per process: hidden states
    of unit variance and a head scaled so that the logits have a standard deviation near 1."""
    n_rows, n_hidden, n_classes = parse_problem(shape)
    rng = np.random.default_rng(_common.SEED)
    hidden = rng.standard_normal((n_rows, n_hidden), dtype=np.float32)
    weight = rng.standard_normal((n_classes, n_hidden), dtype=np.float32) / np.float32(np.sqrt(n_hidden))
    targets = rng.integers(0, n_classes, n_rows)
    return hidden, weight, targets


def materialized_with_grad(hidden: np.ndarray, weight: np.ndarray, targets: np.ndarray):
    """``(loss, grad_hidden, grad_weight)`` through the full N x V logits."""
    logits = np.matmul(hidden, weight.T)
    loss, grad = nx.cross_entropy_with_grad(logits, targets, out=logits)
    return loss, grad @ weight, grad.T @ hidden


class _Paths:
    """Inputs, and a warm-up of both paths on two rows of them (compiling the kernels and
    starting the thread pools, without leaving a full-size peak behind)."""

    params = [SHAPES]
    param_names = ["shape"]
    timeout = 900

    def setup(self, shape):
        self.hidden, self.weight, self.targets = problem(shape)
        head = (self.hidden[:2], self.weight, self.targets[:2])
        _common.warm_up_once(("linear", shape), lambda: linear_cross_entropy_with_grad(*head))
        _common.warm_up_once(("materialized", shape), lambda: materialized_with_grad(*head))


class Time(_Paths):
    """Seconds per call, both paths; the issue asks for chunked within 1.15x of materialized."""

    number = 1
    repeat = (1, 3, 120.0)
    warmup_time = 0  # setup's warm-up takes its place

    def time_chunked(self, shape):
        linear_cross_entropy_with_grad(self.hidden, self.weight, self.targets)

    def time_materialized(self, shape):
        materialized_with_grad(self.hidden, self.weight, self.targets)


class PeakMemory(_Paths):
    """Peak RSS of a process holding the inputs and running one call. At 8192x512x32000 the
    materialized path's peak is about 1000 MiB (the logits) above the chunked path's."""

    def peakmem_chunked(self, shape):
        linear_cross_entropy_with_grad(self.hidden, self.weight, self.targets)

    def peakmem_materialized(self, shape):
        materialized_with_grad(self.hidden, self.weight, self.targets)
