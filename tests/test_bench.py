"""``nbxent bench``, the main job, at toy sizes: every row is there and well formed, and the
floors it times do what they claim. (Speed is measured by running it, never asserted here.)"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from nbxent import bench, cli
from tests.seeds import fresh_rng

ml_dtypes = pytest.importorskip("ml_dtypes")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bench_prints_every_row(dtype, capsys):
    assert cli.main(["bench", "--shapes", "64x1000", "3x2049", "--dtype", dtype, "--repeats", "2",
                     "--no-torch", "--no-first-call"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    ops = ["copy (floor)", "np.copyto (1 thread)", "read (floor)", "exp loop in L1 (compute floor)", "forward",
           "forward+backward", "forward+backward in place"]  # fmt: skip
    if bench.HAS_STREAM_COPY:
        ops.insert(2, "copy, streaming stores")
    if dtype == "float32":  # the NumPy peer computes in the logits' dtype: float types only
        ops.append("NumPy forward+backward")
    for shape in ("64×1000", "3×2049"):
        rows = [line for line in out.splitlines() if line.startswith(f"| {shape} | {dtype} |")]
        assert [row.split(" | ")[2] for row in rows] == ops
        for row in rows:
            ms, gbps, multiple = (float(v) for v in row.split(" | ")[3:6])
            # (a toy shape's multiple can print as 0.00 when a preempted floor took 100x longer)
            assert ms > 0 and gbps > 0 and multiple >= 0
    floors = re.findall(r"\| (?:copy|read) \(floor\) \| [^|]+ \| [^|]+ \| ([0-9.]+) \|", out)
    assert floors == ["1.00"] * 4


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(3, 1), (5, 700), (4, 2048), (3, 5000)])
def test_exp_floor_sums_one_exp_an_entry(dtype, shape):
    """The compute floor does the work it stands for: each row's sink is the sum of exp(x - m)
    over n_cols entries, the first row's first block repeated along the row."""
    rng = fresh_rng()
    x = (rng.standard_normal(shape) * 3).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    sink = np.full(shape[0], np.nan)
    bench.exp_floor_call(x, sink)()
    block = x[0, :2048].astype(np.float64)
    e = np.exp(block - block.max())
    reps, rest = divmod(shape[1], block.size)
    want = reps * e.sum() + e[:rest].sum()
    rtol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(sink, want, rtol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.float64])
def test_parallel_copy_copies_every_row(dtype):
    rng = fresh_rng()
    src = rng.integers(0, 60000, size=(37, 1001)).astype(dtype)
    dst = np.full_like(src, 7)
    bench.parallel_copy(src, dst)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.skipif(not bench.HAS_STREAM_COPY, reason="streaming stores are x86 code")
@pytest.mark.parametrize("n_cols", [0, 1, 31, 32, 33, 95, 1001, 4096])
@pytest.mark.parametrize("offset", [0, 1, 15, 31])
def test_stream_copy_copies_every_row_at_any_alignment(n_cols, offset):
    """Whole lines go by streaming stores, the partial lines at each end by plain ones: rows
    that start anywhere in a line, shorter than a line, or one line long come out exact."""
    rng = fresh_rng()
    n_rows = 7
    src = rng.integers(0, 65536, size=n_rows * n_cols + 64).astype(np.uint16)
    raw = np.full(n_rows * n_cols + 64, 7, np.uint16)
    start = (-raw.ctypes.data % 64) // 2 + offset  # dst starts `offset` words into a line
    dst = raw[start : start + n_rows * n_cols].reshape(n_rows, n_cols)
    src2d = src[3 : 3 + n_rows * n_cols].reshape(n_rows, n_cols)
    bench.parallel_stream_copy(src2d, dst)
    np.testing.assert_array_equal(dst, src2d)
    np.testing.assert_array_equal(raw[:start], 7)  # nothing written outside dst
    np.testing.assert_array_equal(raw[start + n_rows * n_cols :], 7)


@pytest.mark.skipif(not bench.HAS_STREAM_COPY, reason="streaming stores are x86 code")
def test_stream_copy_of_a_view_at_an_odd_address_is_plain_and_exact():
    raw = np.zeros(3 * 100 * 2 + 1, np.uint8)
    dst = raw[1:].view(np.uint16).reshape(3, 100)  # misaligned: no entry starts a line
    src = fresh_rng().integers(0, 65536, size=(3, 100)).astype(np.uint16)
    bench.parallel_stream_copy(src, dst)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("copy", ["parallel_copy", "parallel_stream_copy"])
def test_copies_refuse_arrays_of_different_shapes(copy):
    if copy == "parallel_stream_copy" and not bench.HAS_STREAM_COPY:
        pytest.skip("streaming stores are x86 code")
    src = np.zeros((3, 100), np.uint16)
    with pytest.raises(ValueError, match="same shape"):
        getattr(bench, copy)(src, np.zeros((3, 99), np.uint16))


def test_bench_names_the_cpu(capsys):
    import llvmlite.binding as ll

    assert cli.main(["bench", "--shapes", "4x100", "--repeats", "1", "--no-torch", "--no-numpy",
                     "--no-first-call"]) == 0  # fmt: skip
    cpu_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu: ")]
    assert len(cpu_lines) == 1
    assert f"LLVM target {ll.get_host_cpu_name()}" in cpu_lines[0]
    wide = dict(ll.get_host_cpu_features())
    assert f", {cli._vector_isa(wide)}" in cpu_lines[0]
    assert (", AVX-512," in cpu_lines[0] or cpu_lines[0].endswith(", AVX-512")) == bool(wide.get("avx512f"))


def test_cpuinfo_fields_are_the_first_processors():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC 9R14\n\nprocessor\t: 1\nmodel\t\t: 99\nmodel name\t: other\n")  # fmt: skip
    fields = cli._cpuinfo_fields("\n" + text)
    assert fields["model name"] == "AMD EPYC 9R14"
    assert (fields["cpu family"], fields["model"]) == ("25", "17")
    assert cli._cpuinfo_fields("") == {}


@pytest.mark.parametrize(
    ("features", "isa"),
    [
        ({"avx512f": True, "avx2": True}, "AVX-512"),
        ({"avx512f": False, "avx2": True, "avx": True}, "AVX2 (no AVX-512)"),
        ({"avx": True}, "AVX"),
        ({"neon": True}, "NEON"),
        ({"sve": True, "neon": True}, "SVE"),
        ({}, "no vector ISA LLVM names"),
    ],
)
def test_vector_isa_names_the_widest(features, isa):
    assert cli._vector_isa(features) == isa


def test_l2_size_and_the_claim_rule():
    from nbxent import _cpu

    l2 = _cpu.l2_cache_bytes()
    assert l2 is None or l2 >= 1 << 14
    sizes = {"512K": 512 << 10, "1M": 1 << 20, "2048k": 2 << 20, "1048576": 1 << 20, " 1M\n": 1 << 20}
    for text, size in sizes.items():
        assert _cpu.cache_size_bytes(text) == size, text
    for text in ("", "K", "1.5M", "-1K", "big"):
        assert _cpu.cache_size_bytes(text) is None, text
    # 1 MB of L2: rows up to 2**17 entries claimed, as measured on that host
    assert _cpu.claims_output(1 << 17, 1 << 20) and not _cpu.claims_output((1 << 17) + 1, 1 << 20)
    assert not _cpu.claims_output(256000, 1 << 20)
    # 512 KB: never (slower at every row length measured)
    assert not _cpu.claims_output(32000, 512 << 10)
    assert _cpu.claims_output(200000, 2 << 20) and not _cpu.claims_output(300000, 2 << 20)


def test_cpu_description_survives_unknown_features(monkeypatch):
    import llvmlite.binding as ll

    def refuse():
        raise RuntimeError("failed to get host cpu features")

    monkeypatch.setattr(ll, "get_host_cpu_features", refuse)
    line = cli.cpu_description()
    assert "vector ISA unknown" in line and f"LLVM target {ll.get_host_cpu_name()}" in line


def test_info_runs_in_a_fresh_process():
    """``nbxent info`` as a user runs it first: no kernel has started Numba's threading layer yet."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "nbxent.cli", "info"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fields = dict(line.split(None, 1) for line in done.stdout.splitlines() if line.strip())
    assert fields["threading"].startswith("layer ") and fields["threading"].split()[1] in ("omp", "tbb", "workqueue")
    assert re.fullmatch(r"\d+ of \d+", fields["threads"])


def test_first_call_probe_times_nbxent_and_numbas_floor():
    """The first-call figures come from real fresh processes: a cold one that compiles (seconds),
    warm ones that load its cache, and Numba alone loading a trivial function."""
    first = bench.first_call_seconds(warm_runs=1)
    assert 0 < first.warm < first.cold and 0 < first.numba_floor < first.cold
    if importlib.util.find_spec("scipy") is None:
        assert first.warm_no_scipy is None and first.numba_floor_no_scipy is None
    else:  # hidden, SciPy is not imported: both probes skip its 0.2-0.3 s (asserted only loosely)
        assert 0 < first.warm_no_scipy < first.cold and 0 < first.numba_floor_no_scipy < first.cold


def test_hidden_scipy_cannot_be_imported():
    """The first-call probe's way of hiding SciPy does what it says."""
    import subprocess
    import sys

    script = bench.HIDE_SCIPY + "import scipy.linalg.cython_blas"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


@pytest.mark.parametrize("no_scipy", [(None, None), (0.45, 0.41)], ids=["scipy absent", "scipy hidden"])
def test_bench_prints_the_first_call_line(no_scipy, monkeypatch, capsys):
    """The first-call line carries every figure the probe returns (the probe itself is
    tested above; here it is replaced by known figures so that the line can be checked)."""
    first = bench.FirstCall(9.5, 0.81, 0.74, *no_scipy)
    monkeypatch.setattr(bench, "first_call_seconds", lambda runs: first)
    assert cli.main(["bench", "--shapes", "4x100", "--repeats", "1", "--no-torch", "--no-numpy"]) == 0
    line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("first call")]
    assert len(line) == 1
    assert "cold 9.50 s, warm 0.81 s (median of 5)" in line[0] and "floor under it" in line[0] and "0.74 s" in line[0]
    if no_scipy[0] is None:
        assert "SciPy" not in line[0]
    else:
        assert "with SciPy hidden" in line[0] and "warm 0.45 s, floor 0.41 s" in line[0]


def test_bench_refuses_more_threads_than_numba_has(capsys):
    import numba

    too_many = numba.config.NUMBA_NUM_THREADS + 1
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--threads", str(too_many), "--no-torch", "--no-numpy", "--no-first-call"])
    assert stop.value.code == 2  # argparse's usage error, not a traceback from numba.set_num_threads
    assert f"{too_many} is more than Numba's" in capsys.readouterr().err
