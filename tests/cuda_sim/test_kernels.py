"""The CUDA backend under the Numba CUDA simulator, against the float64 reference.

Runs only with ``NUMBA_ENABLE_CUDASIM=1`` (``tests/test_cuda_sim.py`` starts such a process).
The tunables are patched small (16 threads per block, 2 words per step, 2 "SMs") so that
tiny inputs already take every path: several rows per block, a persistent grid striding
over row groups, rows split over several blocks, rows that start and end inside a 64-bit
word, and gradients stored word-wise and element-wise. Each case runs on both the
one-block-per-row-group path ("rows") and the split-row path ("split").
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
from numba import cuda

import nbxent as nx
from nbxent import _backend_cuda, _checks, _cuda, api
from tests import reference as ref
from tests.seeds import fresh_rng

ml_dtypes = pytest.importorskip("ml_dtypes")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ON_DEVICE = os.environ.get("NBXENT_CUDA_TESTS") == "device"  # a real GPU (see conftest.py)
assert _cuda.SIMULATOR or ON_DEVICE, "these tests need NUMBA_ENABLE_CUDASIM=1 before numba.cuda is imported"

# NumPy scalars in the simulated threads warn on inf - inf, 0 * inf, ...: IEEE behaviour the
# kernels rely on, not errors.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
PATHS = ["rows", "split"]


@pytest.fixture(autouse=True)
def small_tunables(monkeypatch):
    monkeypatch.setattr(_cuda, "THREADS", 16)
    monkeypatch.setattr(_cuda, "UNROLL", 2)
    monkeypatch.setattr(_cuda, "MIN_GROUP", 4)
    monkeypatch.setattr(_cuda, "BLOCKS_PER_SM", 1)
    monkeypatch.setattr(_cuda, "SPLIT_CHUNK", 40)
    monkeypatch.setattr(_cuda, "SIM_SM_COUNT", 2)
    if ON_DEVICE:  # the same launch geometry as the simulator's: 2 "SMs"
        monkeypatch.setattr(_backend_cuda, "_sm_count", lambda: 2)
    # The simulator's arrays have no __cuda_array_interface__; Numba marks its device
    # arrays (real and simulated) with __cuda_ndarray__.
    real = api.is_gpu_array
    monkeypatch.setattr(api, "is_gpu_array", lambda a: bool(getattr(a, "__cuda_ndarray__", False)) or real(a))


@pytest.fixture
def path(request, monkeypatch):
    """'rows': grid of 2 blocks, no split. 'split': 16 blocks wanted, so few rows get split."""
    if request.param == "split":
        monkeypatch.setattr(_cuda, "BLOCKS_PER_SM", 8)
    return request.param


@pytest.fixture
def rng():
    return fresh_rng()  # its seed is shown when a test fails


def to_device(a):
    """A Numba device copy. bfloat16 travels as its bits: numba-cuda's host copies go through
    the buffer protocol, which has no bfloat16 ("cannot include dtype 'E'" on a real GPU)."""
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return cuda.to_device(a.view(np.uint16)).view(a.dtype)
    return cuda.to_device(a)


def host(a):
    if a.dtype == ml_dtypes.bfloat16:
        return np.asarray(a.view(np.uint16).copy_to_host()).view(a.dtype)
    return np.asarray(a.copy_to_host())


def tolerances(dtype):
    """(loss rtol, gradient atol as a fraction of the largest |gradient|)."""
    name = np.dtype(dtype).name
    if name == "float64":
        return 1e-11, 1e-11
    if name == "float32":
        return 2e-5, 2e-5
    return 2e-5, 2.0 ** -(7 if name == "bfloat16" else 10)  # one rounding of the output


def make_case(rng, shape, dtype, scale=3.0, n_ignored=1):
    logits = (rng.standard_normal(shape) * scale).astype(dtype)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    flat = targets.reshape(-1)
    if flat.size > 1:
        flat[rng.choice(flat.size, size=min(n_ignored, flat.size - 1), replace=False)] = -100
    return logits, targets


def assert_matches(loss, grad, logits, targets, grad_output=1.0, **opts):
    loss_rtol, grad_rel = tolerances(logits.dtype)
    want_loss, want_grad = ref.cross_entropy(logits.astype(np.float64), targets, grad_output=grad_output, **opts)
    np.testing.assert_allclose(np.asarray(loss, np.float64), want_loss, rtol=loss_rtol, atol=loss_rtol)
    if grad is not None:
        assert grad.dtype == logits.dtype and grad.shape == logits.shape
        atol = grad_rel * max(np.abs(want_grad).max(initial=0.0), 1e-30)
        np.testing.assert_allclose(grad.astype(np.float64), want_grad, rtol=grad_rel, atol=atol)


OPTIONS = {
    "plain": {"reduction": "mean"},
    "smooth+weight+ignore": {"reduction": "sum", "label_smoothing": 0.2, "weight": "random"},
    "z_loss+softcap": {"reduction": "none", "z_loss": 1e-3, "softcap": 4.0, "grad_output": "rows"},
    "everything": {
        "reduction": "mean",
        "label_smoothing": 0.1,
        "weight": "random",
        "z_loss": 1e-2,
        "softcap": 6.0,
        "ignore_index": 3,
        "grad_output": 0.5,
    },
}


def resolve(options, rng, shape):
    opts = dict(options)
    if opts.get("weight") == "random":
        opts["weight"] = rng.uniform(0.2, 2.0, shape[-1])
    if opts.get("grad_output") == "rows":
        opts["grad_output"] = rng.uniform(-2.0, 2.0, shape[:-1])
    return opts


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_loss_and_grad_match_reference(rng, path, dtype, case):
    # A prime V: rows start inside 64-bit words for every dtype narrower than 8 bytes.
    logits, targets = make_case(rng, (5, 293), dtype)
    opts = resolve(OPTIONS[case], rng, logits.shape)
    if opts.get("ignore_index") == 3:
        targets[targets == -100] = 3
    device_opts = dict(opts)
    for key in ("weight", "grad_output"):  # device arrays for some, host arrays for others
        if isinstance(opts.get(key), np.ndarray) and case != "smooth+weight+ignore":
            device_opts[key] = to_device(opts[key])
    grad_output = device_opts.pop("grad_output", 1.0)
    loss, grad = nx.cross_entropy_with_grad(
        to_device(logits), to_device(targets), grad_output=grad_output, **device_opts
    )
    assert_matches(host(loss), host(grad), logits, targets, **opts)
    loss_only = nx.cross_entropy(to_device(logits), to_device(targets), **device_opts)
    assert_matches(host(loss_only), None, logits, targets, **opts)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_prefetch_variant_matches_reference(rng, path, dtype, monkeypatch):
    """PREFETCH (off by default) loads each step's words during the step before, in both
    passes; the results must not change."""
    monkeypatch.setattr(_cuda, "PREFETCH", True)
    for case in ("plain", "everything"):
        test_loss_and_grad_match_reference(rng, path, dtype, case)
    base, _ = make_case(rng, (2, 3, 151), dtype)  # in place over a row-strided view
    targets = rng.integers(0, 151, size=(2, 2))
    d_base = to_device(base)
    view = d_base[:, :-1]
    loss, _ = nx.cross_entropy_with_grad(view, to_device(targets), reduction="sum", out=view)
    assert_matches(host(loss), host(d_base)[:, :-1], base[:, :-1], targets, reduction="sum")


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_normalizations_match_reference(rng, path, dtype):
    logits = (rng.standard_normal((4, 131)) * 4).astype(dtype)
    logits[1, 7] = -np.inf  # masked vocabulary entry
    x = logits.astype(np.float64)
    rtol, out_rtol = tolerances(dtype)
    np.testing.assert_allclose(host(nx.logsumexp(to_device(logits))), ref.logsumexp(x), rtol=rtol)
    for func, want in ((nx.softmax, ref.softmax(x)), (nx.log_softmax, ref.log_softmax(x))):
        got = host(func(to_device(logits))).astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=out_rtol, atol=out_rtol * np.abs(want[np.isfinite(want)]).max())


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_special_rows_follow_the_cpu(path):
    """-inf, +inf and NaN logits, an all -inf row, a target at -inf: the NaN and inf pattern
    of the CPU backend; and a large common offset (1e4), where float32 keeps full accuracy
    because probabilities are taken as exp((x - max) - log s)."""
    logits = fresh_rng().standard_normal((8, 97)).astype(np.float32)
    logits[0, :50] = -np.inf
    logits[1, :] = -np.inf
    logits[2, 5] = np.inf
    logits[3, 9] = np.nan
    logits[4] += 1e4
    logits[5, 2] = -np.inf
    logits[6, 5] = np.inf  # +inf and NaN: lse NaN (until the seventeenth session, +inf)
    logits[6, 90] = np.nan
    logits[7, :] = -np.inf  # -inf and NaN only: lse NaN
    logits[7, 3] = np.nan
    targets = np.array([60, 3, 1, 0, 8, 2, 1, 4])  # row 5's target is a -inf logit: loss +inf
    x = logits.astype(np.float64)
    for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-4}):
        cpu = nx.cross_entropy_with_grad(logits, targets, reduction="none", **opts)
        gpu = nx.cross_entropy_with_grad(to_device(logits), to_device(targets), reduction="none", **opts)
        want = ref.cross_entropy(x, targets, reduction="none", **opts)
        for g, c, w in zip(gpu, cpu, want, strict=True):
            g = host(g)
            np.testing.assert_array_equal(np.isnan(g), np.isnan(c))
            np.testing.assert_array_equal(np.isposinf(g), np.isposinf(c))
            finite = np.isfinite(c)
            np.testing.assert_allclose(g[finite], w[finite], rtol=2e-5, atol=2e-6)
    for func, want in ((nx.logsumexp, ref.logsumexp(x)), (nx.softmax, ref.softmax(x)), (nx.log_softmax, None)):
        got, cpu = host(func(to_device(logits))), func(logits)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(cpu))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(cpu))
        want = ref.log_softmax(x) if want is None else want
        finite = np.isfinite(cpu)
        np.testing.assert_allclose(got[finite], want[finite], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_strided_views_and_in_place(rng, path):
    """``logits[:, :-1]`` of a (B, T, V) array with odd V (rows misaligned, gradient into a
    fresh array stored element-wise), then the same view overwritten in place."""
    base, _ = make_case(rng, (2, 4, 151), ml_dtypes.bfloat16)
    targets = rng.integers(0, 151, size=(2, 3))
    d_base = to_device(base)
    view = d_base[:, :-1]
    loss, grad = nx.cross_entropy_with_grad(view, to_device(targets), reduction="sum")
    assert_matches(host(loss), host(grad), base[:, :-1], targets, reduction="sum")
    loss2, grad2 = nx.cross_entropy_with_grad(view, to_device(targets), reduction="sum", out=view)
    assert host(loss2) == host(loss)
    np.testing.assert_array_equal(host(d_base)[:, :-1].view(np.uint16), host(grad).view(np.uint16))
    np.testing.assert_array_equal(host(d_base)[:, -1].view(np.uint16), base[:, -1].view(np.uint16))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_in_place_and_given_out(rng, dtype):
    logits, targets = make_case(rng, (13, 5), dtype)  # V=5: 4 rows per block, 4 row groups
    d_logits = to_device(logits)
    out = cuda.device_array(logits.shape, logits.dtype)
    _, grad = nx.cross_entropy_with_grad(d_logits, to_device(targets), out=out)
    assert grad is out
    _, want = ref.cross_entropy(logits.astype(np.float64), targets)
    np.testing.assert_allclose(host(out).astype(np.float64), want, rtol=tolerances(dtype)[1], atol=1e-6)
    nx.cross_entropy_with_grad(d_logits, to_device(targets), out=d_logits)
    np.testing.assert_array_equal(host(d_logits).view(np.uint8), host(out).view(np.uint8))


def test_small_vocabularies(rng):
    for n_cols in (1, 2, 3, 7):
        logits, targets = make_case(rng, (9, n_cols), np.float32)
        loss, grad = nx.cross_entropy_with_grad(to_device(logits), to_device(targets), reduction="none")
        assert_matches(host(loss), host(grad), logits, targets, reduction="none")


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_a_weight_no_kept_row_targets_is_never_read(rng, path):
    """As on the CPU (tests/test_torch_parity.py): without smoothing, an inf or NaN weight of a
    class that only ignored rows hold, or none, stays out of the loss and the gradient (the
    gradient sweep once took ``0 * w_j``, a NaN column)."""
    logits, _ = make_case(rng, (5, 300), np.float32)
    targets = rng.integers(4, 300, 5)
    targets[2] = 3
    weight = rng.uniform(0.5, 1.5, 300)
    weight[[0, 3]] = [np.inf, np.nan]
    for reduction in ("mean", "sum"):
        opts = dict(weight=weight, ignore_index=3, reduction=reduction)
        loss, grad = nx.cross_entropy_with_grad(to_device(logits), to_device(targets), **opts)
        assert np.isfinite(host(grad)).all()
        assert_matches(host(loss), host(grad), logits, targets, **opts)


def test_empty_and_all_ignored_batches():
    logits = np.zeros((0, 6), np.float32)
    targets = np.zeros(0, np.int64)
    for reduction, want in (("mean", np.nan), ("sum", 0.0)):
        loss, grad = nx.cross_entropy_with_grad(to_device(logits), to_device(targets), reduction=reduction)
        np.testing.assert_equal(host(loss), np.float32(want))
        assert host(grad).shape == (0, 6)
    assert host(nx.cross_entropy(to_device(logits), to_device(targets), reduction="none")).shape == (0,)
    logits = fresh_rng().standard_normal((3, 6)).astype(np.float32)
    ignored = to_device(np.full(3, -100))
    loss, grad = nx.cross_entropy_with_grad(to_device(logits), ignored, weight=np.ones(6))
    assert np.isnan(host(loss))
    assert not host(grad).any()


def test_one_dimensional_logits_and_int32_targets(rng):
    logits = rng.standard_normal(11).astype(np.float64)
    loss, grad = nx.cross_entropy_with_grad(to_device(logits), to_device(np.array(4, np.int32)))
    assert_matches(host(loss), host(grad), logits, np.array(4))
    logits3, targets3 = make_case(rng, (2, 3, 17), np.float32)
    loss = nx.cross_entropy(to_device(logits3), to_device(targets3.astype(np.int32)), reduction="none")
    assert host(loss).shape == (2, 3)
    assert_matches(host(loss), None, logits3, targets3, reduction="none")


def test_device_scalar_grad_output_for_mean(rng):
    logits, targets = make_case(rng, (4, 30), np.float32)
    go = to_device(np.array(3.0, np.float32))
    _, grad = nx.cross_entropy_with_grad(to_device(logits), to_device(targets), grad_output=go)
    _, want = ref.cross_entropy(logits.astype(np.float64), targets, grad_output=3.0)
    np.testing.assert_allclose(host(grad), want, rtol=2e-5, atol=1e-7)


def test_bad_targets(rng):
    logits, _ = make_case(rng, (2, 3, 10), np.float32)
    targets = rng.integers(0, 10, size=(2, 3))
    targets[1, 2] = 10
    with pytest.raises(ValueError) as cpu_error:
        nx.cross_entropy(logits, targets)
    d_logits = to_device(logits)
    with pytest.raises(ValueError) as gpu_error:
        nx.cross_entropy_with_grad(d_logits, to_device(targets), out=d_logits)
    assert (
        str(gpu_error.value)
        == str(cpu_error.value)
        == ("targets[1, 2] = 10 is outside [0, 10); use ignore_index (now -100) for padding")
    )
    np.testing.assert_array_equal(host(d_logits), logits)  # checked before anything is written
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 10"):  # host targets: checked on the host
        nx.cross_entropy(d_logits, targets)
    # Unvalidated: the bad row is NaN, the others are right, nothing is read out of bounds.
    loss, grad = nx.cross_entropy_with_grad(d_logits, to_device(targets), reduction="none", validate=False)
    loss, grad = host(loss), host(grad)
    assert np.isnan(loss[1, 2]) and np.isnan(grad[1, 2]).all()
    keep = np.ones((2, 3), bool)
    keep[1, 2] = False
    fixed = np.where(keep, targets, -100)
    assert_matches(loss[keep], None, logits[keep], fixed[keep], reduction="none")
    _, want = ref.cross_entropy(logits.astype(np.float64), fixed, reduction="none")
    np.testing.assert_allclose(grad[keep], want[keep], rtol=2e-5, atol=1e-7)
    mean = nx.cross_entropy(d_logits, to_device(targets), validate=False)
    assert np.isnan(host(mean))


def test_host_device_mixing_errors(rng):
    logits, targets = make_case(rng, (3, 8), np.float32)
    d_logits = to_device(logits)
    with pytest.raises(TypeError, match="out is a host array"):
        nx.cross_entropy_with_grad(d_logits, targets, out=np.empty_like(logits))
    overlapping = cuda.device_array((4, 8), np.float32)
    with pytest.raises(ValueError, match="out overlaps logits"):
        nx.cross_entropy_with_grad(overlapping[:3], targets, out=overlapping[1:])
    with pytest.raises(TypeError, match="out has dtype float64"):
        nx.cross_entropy_with_grad(d_logits, targets, out=cuda.device_array((3, 8), np.float64))
    with pytest.raises(ValueError, match="out= is where the gradient goes"):  # as on the CPU backend
        opts = _checks.check_options("mean", -100, 0.0, 0.0, None)
        _backend_cuda.xent(
            d_logits, targets, None, opts, grad=False, grad_output=1.0, out=d_logits, validate=True, stream=None
        )
    with pytest.raises(ValueError, match="weight has shape"):
        nx.cross_entropy(d_logits, targets, weight=to_device(np.ones(7)))
    with pytest.raises(ValueError, match="grad_output must be a scalar"):
        nx.cross_entropy_with_grad(d_logits, targets, grad_output=to_device(np.ones(3)))
    with pytest.raises(TypeError, match="stream must be"):
        nx.cross_entropy(d_logits, targets, stream="default")
    with pytest.raises(TypeError, match="targets must have an integer dtype"):
        nx.cross_entropy(d_logits, to_device(targets.astype(np.float32)))
    with pytest.raises(TypeError, match="logits has dtype '>f4': big-endian float32"):
        nx.cross_entropy(to_device(logits.astype(">f4")), targets)
    swapped = nx.cross_entropy(d_logits, to_device(targets.astype(">i8")), weight=to_device(np.ones(8, ">f8")))
    assert host(swapped) == host(nx.cross_entropy(d_logits, targets, weight=to_device(np.ones(8))))  # read by value
    assert np.isfinite(host(nx.cross_entropy(d_logits, targets, stream=cuda.stream())))


def test_runs_are_bitwise_reproducible(rng):
    logits, targets = make_case(rng, (7, 300), np.float32)
    results = [nx.cross_entropy_with_grad(to_device(logits), to_device(targets), label_smoothing=0.1) for _ in range(2)]
    (l1, g1), (l2, g2) = ((host(a), host(b)) for a, b in results)
    assert l1.tobytes() == l2.tobytes() and g1.tobytes() == g2.tobytes()


def test_every_layout_is_described_exactly():
    """``row_layout`` gives each row's first element for views of every kind, and None
    (a contiguous copy is made) only when three leading strides cannot be merged."""
    base = np.arange(2 * 5 * 3 * 7, dtype=np.float32).reshape(2, 5, 3, 7)
    views = [base, base[:, :-1], base[:, ::2], base[1], base[:, 2:4, 1], base[..., :4], base[:1, :1, :1], base[0, 0, 0]]
    for view in views:
        start = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // 4
        arr = _backend_cuda._Array(view, start, view.shape, view.strides, view.dtype, "numba", None)
        layout = _backend_cuda.row_layout(arr)
        if layout is None:
            assert view.shape == (2, 3, 3, 7)  # base[:, ::2]
            continue
        n1, s0, s1, span = layout
        rows = view.reshape(-1, view.shape[-1])
        first = [start + (i // n1) * s0 + (i % n1) * s1 for i in range(rows.shape[0])]
        got = np.stack([base.reshape(-1)[f : f + view.shape[-1]] for f in first])
        np.testing.assert_array_equal(got, rows)
        assert max(first) + view.shape[-1] == start + span


@settings(max_examples=12, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]),
    n_rows=st.integers(1, 5),
    n_cols=st.integers(1, 70),
    offset=st.integers(0, 7),
    gap=st.integers(0, 5),
    split=st.booleans(),
    seed=st.integers(0, 2**63),
)
def test_any_alignment_and_row_stride(dtype, n_rows, n_cols, offset, gap, split, seed):
    """Rows starting at any element offset and any row stride, in place and not."""
    _cuda.BLOCKS_PER_SM = 8 if split else 1  # the autouse fixture restores it
    rng = np.random.default_rng(seed)  # drawn by hypothesis: a failure replays exactly
    buf = (rng.standard_normal(offset + n_rows * (n_cols + gap) + 1) * 3).astype(dtype)
    view = buf[offset : offset + n_rows * (n_cols + gap)].reshape(n_rows, n_cols + gap)[:, :n_cols]
    targets = rng.integers(0, n_cols, size=n_rows)
    d_buf = to_device(buf)
    d_view = d_buf[offset : offset + n_rows * (n_cols + gap)].reshape(n_rows, n_cols + gap)[:, :n_cols]
    loss, grad = nx.cross_entropy_with_grad(d_view, to_device(targets), reduction="none")
    assert_matches(host(loss), host(grad), view, targets, reduction="none")
    nx.cross_entropy_with_grad(d_view, to_device(targets), reduction="none", out=d_view)
    after = host(d_buf)
    got = after[offset : offset + n_rows * (n_cols + gap)].reshape(n_rows, n_cols + gap)
    np.testing.assert_array_equal(got[:, :n_cols].astype(np.float64), host(grad).astype(np.float64))
    untouched = np.ones(buf.size, bool)
    untouched[offset : offset + n_rows * (n_cols + gap)] = ~np.pad(
        np.ones((n_rows, n_cols), bool), ((0, 0), (0, gap))
    ).reshape(-1)
    np.testing.assert_array_equal(after[untouched].astype(np.float64), buf[untouched].astype(np.float64))


def test_dlpack_capsules_are_read_exactly():
    """The DLPack reader (used for CUDA producers without ``__cuda_array_interface__``, such
    as JAX), checked on CPU capsules: address, shape, byte strides, dtype, device type."""
    base = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    for view in (base, base[1:, 2:7], base[::2]):
        arr, device_type = _backend_cuda.dlpack_array(view.__dlpack__())
        assert device_type == 1  # kDLCPU
        assert arr.ptr == view.__array_interface__["data"][0]
        assert (arr.shape, arr.strides, arr.dtype) == (view.shape, view.strides, view.dtype)
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, 6, dtype=torch.bfloat16)[:, 1:]
    arr, _ = _backend_cuda.dlpack_array(t.__dlpack__())
    assert arr.dtype == np.dtype(ml_dtypes.bfloat16) and arr.ptr == t.data_ptr()
    assert arr.shape == (4, 5) and arr.strides == (12, 2)
    assert _backend_cuda.as_array(t) is None  # a CPU tensor is host data


@pytest.mark.skipif(ON_DEVICE, reason="checks the simulator's shared memory (see conftest.py)")
def test_shared_array_is_one_per_block():
    """Every thread of a simulated block that asks for the shared array of one call site gets
    the same array, however the threads interleave (numba-cuda 0.30.4's own look-up gave two
    arrays in about 1 of 7 trials at this switch interval; conftest.py makes it atomic). A
    second call site and a second launch still get arrays of their own."""
    from numba.cuda.simulator import kernelapi

    def ask(shared):
        first = shared.array((4, 16), np.float32)
        second = shared.array((3,), np.float64)  # the simulator tells call sites by line
        return first, second

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # a thread switch about every bytecode or two
    try:
        for _ in range(100):
            shared = kernelapi.FakeCUDAShared(0)
            start = threading.Barrier(32)
            got = []

            def thread(shared=shared, start=start, got=got):
                start.wait()
                got.append(ask(shared))

            threads = [threading.Thread(target=thread) for _ in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len({id(a) for a, _ in got}) == 1 and len({id(b) for _, b in got}) == 1
            first, second = got[0]
            assert first is not second and first.shape == (4, 16) and second.dtype == np.float64
    finally:
        sys.setswitchinterval(interval)
    assert ask(kernelapi.FakeCUDAShared(0))[0] is not first  # a new launch, new arrays
