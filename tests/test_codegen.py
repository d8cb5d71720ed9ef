"""What LLVM made of the CPU kernels' hot loops, where a slow form once cost real time."""

from __future__ import annotations

import platform
import re

import numba
import numpy as np
import pytest


def fresh(dispatcher):
    """A copy of a jitted function that compiles here instead of loading Numba's cache, whose
    code cannot be inspected; the same options otherwise."""
    options = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("cache", "nopython")}
    return numba.njit(**options)(dispatcher.py_func)


# An AVX/AVX2 masked store (``vmaskmovps %ymm, %ymm, (mem)``): microcoded on AMD Zen, 0.55 ns
# an entry where a plain vector store is a fraction of that.
MASKED_STORE = re.compile(r"\bv(p?)maskmov\w*\s+%[xy]mm\d+,\s*%[xy]mm\d+,\s*-?\w*\(")


def tiny_group_asm(module) -> str:
    """The compiled code of ``module.tiny_group`` (``_cpu_short``'s or a copy's) for float32 rows."""
    group = fresh(module.tiny_group)
    f32 = np.float32
    rows, cols = 64, 10
    tt = np.zeros(rows * cols, f32)
    e = np.zeros(rows * cols, f32)
    targets = np.zeros(rows, np.int64)
    empty = np.empty(0, f32)
    loss, lse = np.empty(rows, f32), np.empty(rows, f32)
    lanes = np.empty(5 * rows, f32)
    args = (tt, e, rows, cols, targets, 0, -100, empty, f32(cols), f32(0), f32(0), f32(0), empty, loss, lse)
    group(*args, np.empty(cols, f32), lanes)
    return group.inspect_asm(group.signatures[0])


def test_tiny_groups_store_whole_vectors():
    """The tiny kernels' running max once compiled, in place (``m[r] = v if v > m[r] else
    m[r]``), to masked stores of the lanes that changed; it now runs through the exp buffer
    (``_cpu_short.tiny_sums``). Checked where LLVM targets x86 (elsewhere the pattern cannot
    match); an AVX-512 target uses its own mask registers, which this does not look for."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the pattern is x86 code")
    from nbxent import _cpu_short

    asm = tiny_group_asm(_cpu_short)
    assert re.search(r"%[yz]mm", asm)  # vector code: the check looks at the real loops
    found = MASKED_STORE.search(asm)
    assert found is None, f"a masked store in tiny_group: {found.group(0)}"
