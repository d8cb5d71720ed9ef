"""nbxent.dask against the in-memory functions: every option, reduction and dtype, chunkings
that split rows and the vocabulary (unevenly, one row per block, one block), the threaded
scheduler and a real multi-process ``dask.distributed`` cluster, and every bad input."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
ml_dtypes = pytest.importorskip("ml_dtypes")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nbxent as nx  # noqa: E402
import nbxent.dask as nxd  # noqa: E402
from tests import reference as ref  # noqa: E402
from tests.seeds import fresh_rng  # noqa: E402

N, V = 23, 37
# Row chunks x vocabulary chunks; "one vocab block" cases must match the in-memory path bitwise.
CHUNKINGS = {
    "one block": ((N,), (V,)),
    "rows": ((5, 5, 5, 8), (V,)),
    "one row per block": ((1,) * N, (V,)),
    "uneven vocab": ((N,), (1, 15, 21)),
    "rows x vocab": ((7, 16), (10, 10, 10, 7)),
    "one row x vocab": ((1,) * N, (12, 25)),
    "many vocab blocks": ((11, 12), (5, 5, 5, 5, 5, 5, 7)),  # with split_every=2: combine runs
}
DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
OPTION_SETS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smooth": {"label_smoothing": 0.1},
    "weight": {"weight": "random"},
    "weight+smooth": {"weight": "random", "label_smoothing": 0.25, "reduction": "sum"},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 3.0, "reduction": "none"},
    "ignore a class id": {"ignore_index": 0, "label_smoothing": 0.1},
    "everything": {"weight": "random", "label_smoothing": 0.05, "z_loss": 1e-2, "softcap": 5.0},
}


def one_vocab_block(logits) -> bool:
    return len(logits.chunks[-1]) == 1


def tolerances(dtype):
    """(loss rtol, grad atol relative to the largest gradient entry) against the in-memory path."""
    name = np.dtype(dtype).name
    if name == "float64":
        return 1e-12, 1e-12
    if name == "float32":
        return 1e-5, 1e-5
    # A 16-bit gradient entry may round to the neighbouring 16-bit value.
    return 1e-5, 2.0 ** -(8 if name == "bfloat16" else 11)


def make_case(rng, dtype=np.float32, shape=(N, V), scale=3.0):
    logits = (rng.standard_normal(shape) * scale).astype(dtype)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    targets.reshape(-1)[::7] = -100
    return logits, targets


def resolve(options, rng, n_classes=V):
    opts = dict(options)
    if opts.get("weight") == "random":
        opts["weight"] = rng.uniform(0.2, 2.0, n_classes)
    return opts


def assert_matches(dask_result, memory_result, dtype, exact: bool, grad=False):
    """Dask result (computed) against the in-memory one: when ``exact``, bitwise for arrays, and
    for a reduced loss within a few ulp (Dask sums the row losses of each block, then the
    block sums; NumPy sums all rows pairwise)."""
    dask_result = np.asarray(dask_result)
    memory_result = np.asarray(memory_result)
    assert dask_result.dtype == memory_result.dtype
    assert dask_result.shape == memory_result.shape
    if exact and dask_result.ndim:
        np.testing.assert_array_equal(dask_result, memory_result)
        return
    if exact:
        np.testing.assert_allclose(dask_result, memory_result, rtol=4 * np.finfo(dask_result.dtype).eps)
        return
    loss_rtol, grad_atol = tolerances(dtype)
    if grad:
        a, b = dask_result.astype(np.float64), memory_result.astype(np.float64)
        np.testing.assert_allclose(a, b, rtol=0, atol=grad_atol * np.nanmax(np.abs(b)))
    else:  # absolute too, as test_core's check: a loss near 0 is log s + (m - x_t), each rounded
        np.testing.assert_allclose(dask_result, memory_result, rtol=loss_rtol, atol=loss_rtol)


def compare(
    logits,
    targets,
    dlogits,
    dtargets=None,
    grad_output=1.0,
    dgrad_output=None,
    scheduler="threads",
    split_every=None,
    **opts,
):
    """Loss and gradient of nbxent.dask against nbxent, loss-only and fused paths."""
    dtargets = targets if dtargets is None else dtargets
    dgrad_output = grad_output if dgrad_output is None else dgrad_output
    # One vocabulary block runs the in-memory kernel on each row block: the same values, except
    # for sums over rows (the reduced loss; the 'mean' divisor with weights), which Dask adds
    # block by block.
    weighted_mean = opts.get("weight") is not None and opts.get("reduction", "mean") == "mean"
    exact = one_vocab_block(dlogits) and not weighted_mean
    loss, grad = nx.cross_entropy_with_grad(logits, targets, grad_output=grad_output, **opts)
    d_loss_only = nxd.cross_entropy(dlogits, dtargets, split_every=split_every, **opts)
    d_loss, d_grad = nxd.cross_entropy_with_grad(
        dlogits, dtargets, grad_output=dgrad_output, split_every=split_every, **opts
    )
    assert isinstance(d_loss, da.Array) and isinstance(d_grad, da.Array)
    assert d_grad.chunks == dlogits.chunks
    d_loss_only, d_loss, d_grad = dask.compute(d_loss_only, d_loss, d_grad, scheduler=scheduler)
    assert_matches(d_loss_only, loss, logits.dtype, exact)
    assert_matches(d_loss, loss, logits.dtype, exact)
    assert_matches(d_grad, grad, logits.dtype, exact, grad=True)


# ---------------------------------------------------------------------------------------------
# Values, threaded scheduler


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_options_and_chunkings(chunking, option_set):
    rng = np.random.default_rng([list(CHUNKINGS).index(chunking), list(OPTION_SETS).index(option_set)])
    logits, targets = make_case(rng)
    opts = resolve(OPTION_SETS[option_set], rng)
    targets[targets == -100] = opts.get("ignore_index", -100)
    dlogits = da.from_array(logits, chunks=CHUNKINGS[chunking])
    compare(logits, targets, dlogits, split_every=2, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("chunking", ["rows", "rows x vocab"])
def test_dtypes(dtype, chunking):
    rng = np.random.default_rng(5)
    logits, targets = make_case(rng, dtype)
    dlogits = da.from_array(logits, chunks=CHUNKINGS[chunking])
    compare(logits, targets, dlogits, label_smoothing=0.1, softcap=4.0, weight=rng.uniform(0.5, 1.5, V))
    lse = nxd.logsumexp(dlogits).compute()
    assert_matches(lse, nx.logsumexp(logits), dtype, one_vocab_block(dlogits))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_against_reference(reduction):
    """The multi-block path against the plain float64 reference, not only the in-memory path."""
    rng = np.random.default_rng(18)
    logits, targets = make_case(rng, np.float64)
    opts = resolve(OPTION_SETS["everything"], rng)
    dlogits = da.from_array(logits, chunks=CHUNKINGS["many vocab blocks"])
    loss, grad = dask.compute(*nxd.cross_entropy_with_grad(dlogits, targets, reduction=reduction, **opts))
    ref_loss, ref_grad = ref.cross_entropy(logits, targets, reduction=reduction, **opts)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-13)


def test_merge_tree_has_combine_steps():
    """With more vocabulary blocks than ``split_every``, the merge is a tree, not one step."""
    rng = np.random.default_rng(6)
    logits, targets = make_case(rng)
    dlogits = da.from_array(logits, chunks=CHUNKINGS["many vocab blocks"])
    loss = nxd.cross_entropy(dlogits, targets, reduction="none", split_every=2)
    layers = dict(loss.dask.layers)
    assert any(name.startswith("nbxent-merge-stats-partial") for name in layers)
    np.testing.assert_allclose(loss.compute(), nx.cross_entropy(logits, targets, reduction="none"), rtol=1e-5)


@given(
    n_rows=st.integers(1, 12),
    row_splits=st.lists(st.integers(1, 11), max_size=3),
    col_splits=st.lists(st.integers(1, 18), max_size=4),
    split_every=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
    smoothing=st.sampled_from([0.0, 0.3]),
)
@settings(max_examples=25, deadline=None)
def test_any_chunking(n_rows, row_splits, col_splits, split_every, seed, smoothing):
    """Random chunk boundaries along both axes give the in-memory values."""
    n_cols = 19

    def chunks(n, splits):
        cuts = sorted({c for c in splits if 0 < c < n})
        return tuple(np.diff([0, *cuts, n]).tolist())

    rng = np.random.default_rng(seed)
    logits, targets = make_case(rng, np.float32, (n_rows, n_cols), scale=5.0)
    dlogits = da.from_array(logits, chunks=(chunks(n_rows, row_splits), chunks(n_cols, col_splits)))
    weight = rng.uniform(0.5, 2.0, n_cols)
    compare(
        logits,
        targets,
        dlogits,
        scheduler="sync",
        weight=weight,
        label_smoothing=smoothing,
        split_every=split_every,
        reduction="sum",
    )


def test_leading_axes_and_dask_inputs():
    """(B, T, V) logits; Dask targets chunked unlike the logits; Dask weight and grad_output."""
    rng = np.random.default_rng(7)
    logits, targets = make_case(rng, np.float32, (4, 6, V))
    weight = rng.uniform(0.5, 1.5, V)
    grad_output = rng.standard_normal((4, 6))
    dlogits = da.from_array(logits, chunks=(2, 3, 10))
    compare(
        logits,
        targets,
        dlogits,
        dtargets=da.from_array(targets, chunks=(1, 5)),
        grad_output=grad_output,
        dgrad_output=da.from_array(grad_output, chunks=(3, 2)),
        reduction="none",
        weight=da.from_array(weight, chunks=8),
        label_smoothing=0.1,
    )
    lse = nxd.logsumexp(dlogits)
    assert lse.shape == (4, 6)
    np.testing.assert_allclose(lse.compute(), nx.logsumexp(logits), rtol=1e-6)


@pytest.mark.parametrize("chunking", ["rows", "rows x vocab"])
def test_block_layouts(chunking):
    """Blocks that are column slices (read in place) or column-major (copied) give the same."""
    rng = np.random.default_rng(16)
    logits, targets = make_case(rng)
    for layout in (logits, np.asfortranarray(logits), np.ascontiguousarray(logits.T).T):
        compare(logits, targets, da.from_array(layout, chunks=CHUNKINGS[chunking]), label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lazy_scalar_grad_output(reduction):
    rng = np.random.default_rng(8)
    logits, targets = make_case(rng)
    dlogits = da.from_array(logits, chunks=CHUNKINGS["rows x vocab"])
    compare(logits, targets, dlogits, grad_output=2.5, dgrad_output=da.from_array(np.float64(2.5)), reduction=reduction)


def test_one_dimensional_logits():
    logits = np.array([1.0, 2.0, 0.5], dtype=np.float32)
    dlogits = da.from_array(logits, chunks=2)
    compare(logits, np.array(1), dlogits, label_smoothing=0.2)
    assert nxd.logsumexp(dlogits).shape == ()


def test_infinite_logits():
    """A vocabulary block of all -inf (a masked range) drops out of the merge; an all -inf row
    has lse -inf and a +inf entry lse +inf, as in memory."""
    rng = np.random.default_rng(9)
    logits, targets = make_case(rng, np.float32, (4, 12))
    targets[:] = 1
    logits[:, 6:] = -np.inf
    logits[2] = -np.inf
    logits[3, 8] = np.inf
    dlogits = da.from_array(logits, chunks=(2, 6))
    lse = nxd.logsumexp(dlogits).compute()
    memory_lse = nx.logsumexp(logits)
    np.testing.assert_array_equal(lse[2:], memory_lse[2:])  # the infinite ones exactly
    np.testing.assert_allclose(lse[:2], memory_lse[:2], rtol=4 * np.finfo(np.float32).eps)  # to rounding
    loss = nxd.cross_entropy(dlogits, targets, reduction="none").compute()
    memory = nx.cross_entropy(logits, targets, reduction="none")
    assert np.isfinite(loss[:2]).all()
    np.testing.assert_allclose(loss, memory, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_a_nan_anywhere_in_a_row_makes_it_nan(dtype):
    """A row holding a NaN has lse, loss and gradient NaN, as in memory (and in PyTorch),
    wherever the NaN lies: beside +inf in its vocabulary block or in another, or among -inf.
    The NaNs lie past the first 64 logits of their block, which a block's reference max
    looks at (``_cpu.REF_SAMPLE``): there a block's (max, sum) do not show them. Until the
    seventeenth session the rows with +inf got the lse +inf."""
    rng = fresh_rng()
    logits, targets = make_case(rng, np.float32, (8, 200))
    targets[:] = 1
    logits[0, [150, 90]] = np.inf, np.nan  # +inf and NaN in different blocks
    logits[1, [150, 190]] = np.inf, np.nan  # in the same block
    logits[2, [20, 190]] = np.inf, np.nan  # +inf in the first block's sample, NaN in the other
    logits[3, 100:] = -np.inf  # NaN among -inf, the row's max in the other block
    logits[3, 170] = np.nan
    logits[4] = -np.inf  # NaN and -inf only
    logits[4, 190] = np.nan
    logits[5, 90] = np.nan  # NaN beside finite logits
    logits[6, 4] = np.nan  # an ignored row: loss and gradient 0
    targets[6] = -100
    logits = logits.astype(dtype)
    dlogits = da.from_array(logits, chunks=(2, 100))
    lse = nxd.logsumexp(dlogits).compute()
    memory_lse = nx.logsumexp(logits)
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(memory_lse))
    assert np.isnan(lse[:7]).all() and np.isfinite(lse[7])
    # the finite row is summed in another order (two vocabulary blocks merged; in memory the
    # short-row kernel, and for bfloat16 another exp): equal to rounding, not to the bit
    np.testing.assert_allclose(lse[7], memory_lse[7], rtol=4 * np.finfo(np.float32).eps)
    loss, grad = dask.compute(*nxd.cross_entropy_with_grad(dlogits, targets, reduction="none"))
    memory_loss, memory_grad = nx.cross_entropy_with_grad(logits, targets, reduction="none")
    assert np.isnan(loss[:6]).all() and loss[6] == 0 and np.isfinite(loss[7])
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(memory_loss))
    np.testing.assert_array_equal(np.isnan(grad.astype(np.float32)), np.isnan(memory_grad.astype(np.float32)))
    assert np.isnan(grad[:6].astype(np.float32)).all() and (grad[6] == 0).all()
    loss_only = nxd.cross_entropy(dlogits, targets, reduction="none").compute()
    np.testing.assert_array_equal(np.isnan(loss_only), np.isnan(memory_loss))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_blocks_rising_far_above_the_first(dtype):
    """Rows whose later columns rise by 31-200 above the first ones (``rows_around_the_clamp``:
    each vocabulary block's reference max may lie up to ``_cpu.EXP_CLAMP`` below its max) in
    vocabulary blocks that cut across the kernels' 2048-logit blocks: merged as in memory,
    and the float64 path against the reference."""
    from tests.test_core import rows_around_the_clamp

    rng = np.random.default_rng(23)
    logits, _, _ = rows_around_the_clamp(rng)
    logits = logits.astype(dtype)
    n = logits.shape[1]
    targets = np.array([0, n - 1, 2500, 4099, n - 1, n - 2])
    dlogits = da.from_array(logits, chunks=(2, 3000))
    compare(logits, targets, dlogits, reduction="none", label_smoothing=0.1)
    if dtype == np.float64:
        loss, grad = dask.compute(*nxd.cross_entropy_with_grad(dlogits, targets, reduction="none"))
        ref_loss, ref_grad = ref.cross_entropy(logits, targets, reduction="none")
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("offset", [1e4, -1e5])
def test_large_common_offset(offset):
    """A common offset does not cancel digits in the merge or the gradient."""
    rng = np.random.default_rng(17)
    logits, targets = make_case(rng)
    logits += np.float32(offset)
    for chunking in ("rows", "rows x vocab", "one row x vocab"):
        dlogits = da.from_array(logits, chunks=CHUNKINGS[chunking])
        compare(logits, targets, dlogits, label_smoothing=0.1, z_loss=1e-9, reduction="none")


@pytest.mark.parametrize("chunking", ["rows", "rows x vocab"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_weight_no_kept_row_targets_is_never_read(chunking, reduction):
    """As in memory (tests/test_torch_parity.py): without smoothing, an inf or NaN weight of a
    class that only ignored rows hold, or none, stays out of the loss and the gradient."""
    rng = fresh_rng()
    logits = rng.standard_normal((N, V)).astype(np.float32)
    targets = rng.integers(4, V, N)
    targets[::3] = 3
    weight = rng.uniform(0.5, 1.5, V)
    weight[[0, 3]] = [np.inf, np.nan]
    opts = dict(weight=weight, ignore_index=3, reduction=reduction)
    want_loss, want_grad = ref.cross_entropy(logits, targets, **opts)
    assert np.isfinite(want_loss) and np.isfinite(want_grad).all()
    dlogits = da.from_array(logits, chunks=CHUNKINGS[chunking])
    loss, grad = dask.compute(*nxd.cross_entropy_with_grad(dlogits, targets, **opts))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6 * np.abs(want_grad).max())


@pytest.mark.parametrize("chunking", ["rows", "rows x vocab"])
def test_infinite_results_raise_no_numpy_warning(chunking):
    """As in memory (tests/test_core.py; warnings are errors here): NaN and inf come silently,
    from losses of +inf and -inf summed, a sum beyond float32, and grad_output or weights
    beyond float32."""
    chunks = CHUNKINGS[chunking]
    x = np.zeros((N, V), np.float32)
    t = np.full(N, 2)
    t[1] = 1
    x[0, 2] = x[1, 1] = -np.inf  # the targets masked: losses of inf, and -inf by a weight of -1
    w = np.ones(V)
    w[1] = -1.0
    for reduction in ("sum", "mean"):
        assert np.isnan(
            dask.compute(nxd.cross_entropy(da.from_array(x, chunks=chunks), t, weight=w, reduction=reduction))[0]
        )
    big = np.zeros((N, V), np.float32)
    big[:, 0], big[:, 1] = 2e38, -1e38  # each row's loss 3e38
    (total,) = dask.compute(nxd.cross_entropy(da.from_array(big, chunks=chunks), np.ones(N, np.int64), reduction="sum"))
    assert total == np.inf
    ok = fresh_rng().standard_normal((N, V)).astype(np.float32)
    _, grad = dask.compute(
        *nxd.cross_entropy_with_grad(da.from_array(ok, chunks=chunks), t, grad_output=1e300, reduction="sum")
    )
    np.testing.assert_array_equal(grad, nx.cross_entropy_backward(ok, t, np.inf, reduction="sum"))
    w = np.ones(V)
    w[3] = 1e300
    (loss,) = dask.compute(
        nxd.cross_entropy(da.from_array(ok, chunks=chunks), np.full(N, 3), weight=w, reduction="none")
    )
    assert np.all(loss == np.inf)


@pytest.mark.parametrize("chunking", ["rows", "rows x vocab"])
def test_all_ignored_mean_is_nan(chunking):
    logits = np.zeros((N, V), dtype=np.float32)
    targets = np.full(N, -100)
    dlogits = da.from_array(logits, chunks=CHUNKINGS[chunking])
    loss, grad = dask.compute(*nxd.cross_entropy_with_grad(dlogits, targets))
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("chunking", ["rows", "rows x vocab"])
def test_unvalidated_bad_target_gives_nan_row(chunking):
    rng = np.random.default_rng(10)
    logits, targets = make_case(rng)
    targets[3] = V + 5
    targets[4] = -7
    dlogits = da.from_array(logits, chunks=CHUNKINGS[chunking])
    compare(logits, targets, dlogits, validate=False, reduction="none")
    loss = nxd.cross_entropy(dlogits, targets, validate=False, reduction="none").compute()
    assert np.isnan(loss[[3, 4]]).all() and np.isfinite(np.delete(loss, [3, 4])).all()


@pytest.mark.parametrize("chunking", ["rows", "rows x vocab"])
def test_unvalidated_huge_uint64_target_gives_nan_row(chunking):
    """Unvalidated uint64 targets beyond int64 give NaN rows, as in memory (clipped to int64:
    out of range), and leave the other rows alone."""
    rng = fresh_rng()
    logits, targets = make_case(rng)
    targets = np.where(targets < 0, 1, targets).astype(np.uint64)  # no ignored rows: -100 would wrap
    targets[2] = 2**64 - 1
    targets[5] = 2**63 + 3  # just beyond int64
    dlogits = da.from_array(logits, chunks=CHUNKINGS[chunking])
    compare(logits, targets, dlogits, validate=False, reduction="none")
    loss = nxd.cross_entropy(dlogits, targets, validate=False, reduction="none").compute()
    assert np.isnan(loss[[2, 5]]).all() and np.isfinite(np.delete(loss, [2, 5])).all()


def test_graph_is_lazy():
    """Building the graph reads no logits and no Dask targets; compute reads each logits block
    once for the loss."""
    reads = []

    def produce(block, block_info=None):
        reads.append(block_info[0]["chunk-location"])
        return block

    rng = np.random.default_rng(11)
    logits, targets = make_case(rng)
    dlogits = da.from_array(logits, chunks=CHUNKINGS["rows x vocab"]).map_blocks(produce, meta=logits[:0, :0])
    loss = nxd.cross_entropy(dlogits, da.from_array(targets, chunks=5), label_smoothing=0.1)
    lse = nxd.logsumexp(dlogits)
    loss2, grad = nxd.cross_entropy_with_grad(dlogits, targets)
    assert reads == []
    loss.compute(scheduler="sync")
    assert sorted(reads) == sorted({(i, j) for i in range(2) for j in range(4)})
    assert lse.shape == (N,) and grad.shape == (N, V)


# ---------------------------------------------------------------------------------------------
# Bad input: the in-memory function's error, at graph build time.


def _bad_inputs():
    logits = np.zeros((4, 5), np.float32)
    targets = np.array([0, 1, 2, 3])
    cases = {
        "integer logits": (np.zeros((4, 5), np.int32), targets, {}),
        "0-d logits": (np.zeros((), np.float32), np.array(0), {}),
        "empty vocabulary": (np.zeros((4, 0), np.float32), targets, {}),
        "float targets": (logits, targets.astype(np.float32), {}),
        "big-endian logits": (logits.astype(">f4"), targets, {}),
        "targets shape": (logits, np.array([0, 1, 2]), {}),
        "reduction": (logits, targets, {"reduction": "avg"}),
        "ignore_index type": (logits, targets, {"ignore_index": 1.5}),
        "label_smoothing range": (logits, targets, {"label_smoothing": 1.5}),
        "z_loss sign": (logits, targets, {"z_loss": -1.0}),
        "softcap zero": (logits, targets, {"softcap": 0.0}),
        "weight shape": (logits, targets, {"weight": np.ones(4)}),
        "weight dtype": (logits, targets, {"weight": np.ones(5, dtype=complex)}),
        "target too large": (logits, np.array([0, 1, 5, 3]), {}),
        "target negative": (logits, np.array([0, -1, 2, 3]), {}),
        "grad_output shape": (logits, targets, {"grad_output": np.ones(4)}),
        "grad_output shape none": (logits, targets, {"grad_output": np.ones(3), "reduction": "none"}),
        "grad_output dtype": (logits, targets, {"grad_output": np.array("a")}),
    }
    return cases


BAD = _bad_inputs()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_same_error_at_build(case):
    logits, targets, kwargs = BAD[case]
    dlogits = da.from_array(logits, chunks=tuple(max(1, (n + 1) // 2) for n in logits.shape))
    with pytest.raises((TypeError, ValueError)) as memory:
        nx.cross_entropy_with_grad(logits, targets, **kwargs)
    with pytest.raises(memory.type) as lazy:
        nxd.cross_entropy_with_grad(dlogits, targets, **kwargs)  # raises before any compute
    assert str(lazy.value) == str(memory.value)
    if "grad_output" not in kwargs:
        with pytest.raises(memory.type, match=f"^{_escaped(memory.value)}$"):
            nxd.cross_entropy(dlogits, targets, **kwargs)


def _escaped(error) -> str:
    return re.escape(str(error))


@pytest.mark.parametrize("case", ["integer logits", "0-d logits", "empty vocabulary", "big-endian logits"])
def test_bad_logits_logsumexp(case):
    logits = BAD[case][0]
    with pytest.raises((TypeError, ValueError)) as memory:
        nx.logsumexp(logits)
    with pytest.raises(memory.type, match=f"^{_escaped(memory.value)}$"):
        nxd.logsumexp(da.from_array(logits))


def test_unknown_chunk_sizes():
    x = da.zeros((6, 4), chunks=3)
    unknown = x[x[:, 0] >= 0]
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        nxd.cross_entropy(unknown, np.zeros(6, int))


@pytest.mark.parametrize("chunking", ["rows", "rows x vocab"])
def test_dask_target_out_of_range_raises_at_compute(chunking):
    """Dask targets are checked lazily, with the in-memory message and the global position."""
    rng = np.random.default_rng(12)
    logits, targets = make_case(rng, np.float32, (4, 6, V))
    targets[2, 4] = V
    with pytest.raises(ValueError) as memory:
        nx.cross_entropy(logits, targets)
    assert "targets[2, 4]" in str(memory.value)
    dlogits = da.from_array(logits, chunks=(1, 3, 10) if chunking == "rows x vocab" else (1, 3, V))
    loss, grad = nxd.cross_entropy_with_grad(dlogits, da.from_array(targets, chunks=(1, 2)))
    for result in (loss, grad):
        with pytest.raises(ValueError, match=f"^{_escaped(memory.value)}$"):
            result.compute()


# ---------------------------------------------------------------------------------------------
# A real multi-process cluster


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    # One task at a time per worker; nbxent.dask runs each block's kernel on the task's
    # thread, so the workers need no Numba thread pool.
    env = {"NUMBA_NUM_THREADS": "1"}
    # dashboard_address=":0": any free port. With None the scheduler still serves HTTP on 8787,
    # and two test workers starting clusters at once collided there ("Port 8787 is already in
    # use": a warning, an error here).
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0", env=env
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as c,
    ):
        yield c


def test_cluster_has_two_worker_processes(client):
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()


@pytest.mark.parametrize("chunking", ["rows", "uneven vocab", "one row x vocab", "many vocab blocks"])
def test_distributed_matches_in_memory(client, chunking):
    from distributed import get_task_stream

    rng = np.random.default_rng(13)
    logits, targets = make_case(rng)
    opts = resolve(OPTION_SETS["everything"], rng)
    dlogits = da.from_array(logits, chunks=CHUNKINGS[chunking])
    memory = nx.cross_entropy_with_grad(logits, targets, **opts)
    with get_task_stream(client) as tasks:
        d_loss, d_grad = nxd.cross_entropy_with_grad(dlogits, da.from_array(targets, chunks=4), split_every=2, **opts)
        d_loss, d_grad = client.compute([d_loss, d_grad], sync=True)
    exact = one_vocab_block(dlogits)
    assert_matches(d_loss, memory[0], np.float32, exact)
    assert_matches(d_grad, memory[1], np.float32, exact, grad=True)
    assert len({t["worker"] for t in tasks.data}) == 2  # both processes did work


def test_distributed_logsumexp_and_bfloat16(client):
    rng = np.random.default_rng(14)
    logits, targets = make_case(rng, ml_dtypes.bfloat16)
    dlogits = da.from_array(logits, chunks=CHUNKINGS["rows x vocab"])
    lazy = [nxd.logsumexp(dlogits), nxd.cross_entropy(dlogits, targets, reduction="sum")]
    lse, loss = client.compute(lazy, sync=True)
    np.testing.assert_allclose(lse, nx.logsumexp(logits), rtol=1e-6)
    np.testing.assert_allclose(loss, nx.cross_entropy(logits, targets, reduction="sum"), rtol=1e-5)


def test_distributed_bad_target_raises(client):
    rng = np.random.default_rng(15)
    logits, targets = make_case(rng)
    targets[17] = -3
    with pytest.raises(ValueError) as memory:
        nx.cross_entropy(logits, targets)
    loss = nxd.cross_entropy(da.from_array(logits, chunks=(5, 10)), da.from_array(targets, chunks=5))
    with pytest.raises(ValueError, match=f"^{_escaped(memory.value)}$"):
        client.compute(loss, sync=True)
