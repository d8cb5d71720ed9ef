"""Every CUDA kernel variant compiles to PTX for sm_80 (A100) and sm_90 (H100/H200), no GPU
needed, and the PTX has the properties the speed design relies on; when ptxas is at hand,
the sm_90 PTX is assembled too, to check registers and spills.

Runs with the real ``numba.cuda`` (not the simulator) and NVVM from the CUDA toolkit wheels
that ``numba-cuda[cu12]`` installs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX needs the real numba.cuda, not the simulator", allow_module_level=True)
cuda = pytest.importorskip("numba.cuda")

from nbxent import _cuda  # noqa: E402

CCS = [(8, 0), (9, 0)]
FORMATS = {"float16": _cuda.FMT_F16, "bfloat16": _cuda.FMT_BF16, "float32": _cuda.FMT_F32, "float64": _cuda.FMT_F64}
JOBS = {"loss": _cuda.JOB_LOSS, "grad": _cuda.JOB_GRAD}


def variants():
    """(id, func, sig, fmt, job) of every kernel the backend can launch."""
    threads, unroll = _cuda.THREADS, _cuda.UNROLL
    for fmt_name, fmt in FORMATS.items():
        for tgt in (32, 64):
            for job_name, job in JOBS.items():
                for name in ("rows", "chunks"):
                    func, sig = _cuda.kernel_sources(fmt, job, tgt, threads, unroll, _cuda.PREFETCH)[name]
                    yield f"{name}-{fmt_name}-{job_name}-int{tgt}", func, sig, fmt, job
            func, sig = _cuda.kernel_sources(fmt, _cuda.JOB_LOSS, tgt, threads, unroll, _cuda.PREFETCH)["chunk_stats"]
            yield f"chunk_stats-{fmt_name}-int{tgt}", func, sig, fmt, _cuda.JOB_LOSS
        for name, (func, sig) in _cuda.kernel_sources(fmt, _cuda.JOB_NORM, 64, threads, unroll, _cuda.PREFETCH).items():
            yield f"{name}-{fmt_name}-normalize", func, sig, fmt, _cuda.JOB_NORM
    for tgt in (32, 64):
        for acc in (32, 64):
            func, sig = _cuda.reduce_source(tgt, acc, threads)
            yield f"reduce-int{tgt}-float{acc}", func, sig, None, None


VARIANTS = list(variants())


def find_ptxas() -> str | None:
    """ptxas from the toolkit wheel that provides NVVM (numba-cuda[cu12]), else on PATH."""
    from numba.cuda.cuda_paths import get_cuda_paths

    nvvm = Path(get_cuda_paths()["nvvm"].info or "")
    for parent in nvvm.parents:
        candidate = parent / "bin" / "ptxas"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("ptxas")


F64_ARITHMETIC = re.compile(r"^\s*(add|sub|mul|div|fma|min|max|neg|abs|setp\.\w+)(\.\w+)*\.f64\b", re.MULTILINE)


@pytest.fixture(params=CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def cc(request, monkeypatch):
    # Device functions are compiled for the current device's compute capability, which
    # needs a GPU; without one, say it is the one being compiled for.
    import numba.cuda.dispatcher

    monkeypatch.setattr(
        numba.cuda.dispatcher, "get_current_device", lambda: SimpleNamespace(compute_capability=request.param)
    )
    return request.param


@pytest.mark.parametrize(("func", "sig", "fmt", "job"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_kernel_compiles_to_ptx(func, sig, fmt, job, cc, tmp_path):
    blocks = 1 if fmt is None else _cuda.BLOCKS_PER_SM
    ptx, _ = cuda.compile_ptx(func, sig, cc=cc, **_cuda.jit_options(_cuda.THREADS, blocks))
    if cc == (9, 0):
        assemble(ptx, cc, _cuda.THREADS, blocks, tmp_path)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ptx.count(".entry") == 1
    # The launch bounds reached ptxas: it fits registers to the intended occupancy.
    assert f".maxntid {_cuda.THREADS}, 1, 1" in ptx and f".minnctapersm {blocks}" in ptx
    # The per-thread word and value buffers are unrolled into registers.
    assert not re.search(r"\b(ld|st)\.local\b", ptx)
    if fmt is None:  # reduce_rows: float64 sums by design
        return
    writes = job in (_cuda.JOB_GRAD, _cuda.JOB_NORM) and func.__name__ != "chunk_stats"
    if func.__name__ != "chunks" or writes:  # the loss-only combine reads no logits
        assert re.search(r"\bld\.global(?:\.\w+)*\.(?:u|b|f)64\b", ptx), "logits are read as 64-bit words"
    if fmt != _cuda.FMT_F64:
        # float32 arithmetic throughout (float64 only in argument conversions).
        assert not F64_ARITHMETIC.search(ptx), F64_ARITHMETIC.search(ptx).group(0)
        if _cuda._HAS_EXP2:
            assert "ex2.approx" in ptx
    if writes:
        assert re.search(r"\bst\.global\.cs\.b64\b", ptx), "whole gradient words are streaming stores"
        assert re.search(r"\bld\.global\.cs\.b64\b", ptx), "the second pass marks its loads last-use"


# Spill bytes (stores, loads: as ptxas -v counts them) allowed when a kernel's launch bounds
# cap it at 64 registers: 4 blocks of 256 threads per SM, the defaults, a geometry measured
# faster on an H200 than 1 block of 512 without spills. The fused kernels spill up to 128 B
# stored / 292 B loaded with ptxas 12.9 (numba-cuda reported 8-72 bytes of local memory per
# thread on the H200); the bound catches growth. At 128 registers nothing may spill.
SPILL_LIMIT_64 = 320


def assemble(ptx: str, cc, threads: int, blocks: int, tmp_path) -> None:
    """ptxas (the assembler a GPU driver runs) fits the kernel in the registers its launch
    bounds allow, spilling at most ``SPILL_LIMIT_64`` bytes when that is 64 or fewer."""
    ptxas = find_ptxas()
    if ptxas is None:
        return  # it comes with the nvidia-cuda-nvcc-cu12 wheel that provides NVVM
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    arch = f"-arch=sm_{cc[0]}{cc[1]}"
    result = subprocess.run([ptxas, "-v", arch, str(source), "-o", os.devnull], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", result.stderr)]
    cap = min(255, 65536 // (threads * blocks))
    assert spills and max(spills) <= (SPILL_LIMIT_64 if cap <= 64 else 0), result.stderr
    assert registers and max(registers) <= cap, result.stderr


class _WarningKernel:
    """Stands in for a Dispatcher: configuring it warns as numba-cuda's does for small grids."""

    def __init__(self):
        self.launched = []

    def __getitem__(self, config):
        from numba.cuda import dispatcher

        grid = config[0]
        if grid < 128:  # numba-cuda's own message, built by its own launch configuration
            dispatcher._LaunchConfiguration(self, (grid, 1, 1), (config[1], 1, 1), 0, 0)
        return lambda *args: self.launched.append((grid, args))


@pytest.mark.parametrize("grid", [1, 7, 127, 128, 4096])
def test_launch_does_not_pass_the_low_occupancy_warning_on(grid, recwarn):
    """One-block and few-block launches are deliberate; numba-cuda's warning about them is
    kept from the caller (pytest turns warnings into errors here)."""
    from nbxent import _backend_cuda

    kernel = _WarningKernel()
    _backend_cuda._launch(kernel, grid, 0, (1, 2))
    assert kernel.launched == [(grid, (1, 2))]
    assert not [w for w in recwarn if "under-utilization" in str(w.message)]


def test_numba_cuda_still_warns_with_the_text_we_match():
    """If numba-cuda reworded its warning, the filter in ``_launch`` would silently stop
    matching: this fails first."""
    import warnings

    from numba.cuda import dispatcher

    from nbxent import _backend_cuda

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dispatcher._LaunchConfiguration(_WarningKernel(), (1, 1, 1), (32, 1, 1), 0, 0)
    assert any(re.match(_backend_cuda._FEW_BLOCKS_WARNING, str(w.message)) for w in caught)
