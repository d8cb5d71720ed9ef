"""The CPU cross-entropy against the float64 reference: every dtype, option, reduction and odd shape."""

from __future__ import annotations

import itertools
import math
import threading

import numba
import numpy as np
import pytest

import nbxent as nx
from tests import reference as ref
from tests.seeds import fresh_rng

ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
OPTION_SETS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "weight": {"weight": "random"},
    "weight+smooth": {"weight": "random", "label_smoothing": 0.25},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 3.0},
    "everything": {"weight": "random", "label_smoothing": 0.05, "z_loss": 1e-2, "softcap": 5.0},
}


def tolerances(dtype):
    """(loss rtol, grad atol relative to the largest gradient entry) for a logits dtype."""
    name = np.dtype(dtype).name
    if name == "float64":
        return 1e-12, 1e-12
    if name == "float32":  # float32 sums over up to a million entries
        return 1e-5, 1e-5
    # 16-bit gradients are rounded once to the storage format.
    return 1e-5, 2.0 ** -(8 if name == "bfloat16" else 11)


def make_case(rng, shape, dtype, n_ignored=1, scale=3.0):
    """Random logits (rounded to dtype) and targets with some rows ignored."""
    logits = (rng.standard_normal(shape) * scale).astype(dtype)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    flat = targets.reshape(-1)
    if flat.size > 1:
        flat[rng.choice(flat.size, size=min(n_ignored, flat.size - 1), replace=False)] = -100
    return logits, targets


def resolve(options, rng, n_classes):
    opts = dict(options)
    if opts.get("weight") == "random":
        opts["weight"] = rng.uniform(0.2, 2.0, n_classes)
    return opts


def check(logits, targets, rng=None, grad_output=1.0, **opts):
    """Compare loss and gradient (fused and loss-only paths) with the reference."""
    loss_rtol, grad_atol = tolerances(logits.dtype)
    want_loss, want_grad = ref.cross_entropy(logits.astype(np.float64), targets, grad_output=grad_output, **opts)
    loss = nx.cross_entropy(logits, targets, **opts)
    loss2, grad = nx.cross_entropy_with_grad(logits, targets, grad_output=grad_output, **opts)
    acc = np.float64 if logits.dtype == np.float64 else np.float32
    assert np.asarray(loss).dtype == acc
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    np.testing.assert_allclose(loss, want_loss, rtol=loss_rtol, atol=loss_rtol)
    # The loss-only kernel sums block by block, the fused one over the whole row: equal to
    # rounding, which grows like the square root of the row length (float32 sums of 1e6).
    growth = max(1.0, np.sqrt(logits.shape[-1] / 65536))
    np.testing.assert_allclose(loss, loss2, rtol=(4e-7 if loss2.dtype == np.float32 else 1e-15) * growth)
    # Entries are differences of terms as large as grad_output * w_t / (weight sum): float32
    # cancellation is relative to that size, not to the (possibly tiny) difference.
    w = np.ones(1) if opts.get("weight") is None else np.asarray(opts["weight"])
    kept = np.asarray(targets).reshape(-1) != opts.get("ignore_index", -100)
    total = np.sum(w[np.asarray(targets).reshape(-1)[kept]]) if w.size > 1 else kept.sum()
    term = np.max(np.abs(grad_output)) * np.max(np.abs(w)) / (total if opts.get("reduction", "mean") == "mean" else 1)
    scale = max(np.max(np.abs(want_grad), initial=0.0), np.nan_to_num(term), 1e-30)
    np.testing.assert_allclose(grad.astype(np.float64), want_grad, rtol=0, atol=grad_atol * scale)
    return loss, grad


def assert_same_loss(got, want, msg=""):
    """The loss-only and fused kernels give the same values (NaN where NaN), every dtype: they
    sum each row in the same loops, and every process runs the same machine code, compiled in
    it or loaded from the cache (``tests/test_compile_cache.py``)."""
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=msg)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_matches_reference(dtype, reduction, options):
    rng = fresh_rng()
    logits, targets = make_case(rng, (13, 257), dtype, n_ignored=3)
    check(logits, targets, reduction=reduction, **resolve(options, rng, 257))


@pytest.mark.parametrize("n_classes", [1, 2, 3, 31, 1000, 7919, 65537])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=lambda d: np.dtype(d).name)
def test_odd_vocabulary_sizes(n_classes, dtype):
    rng = fresh_rng()
    logits, targets = make_case(rng, (5, n_classes), dtype)
    check(logits, targets, label_smoothing=0.1, z_loss=1e-4)
    check(logits, targets, softcap=2.0, reduction="none")


def test_huge_vocabulary():
    rng = fresh_rng()
    logits, targets = make_case(rng, (3, 1_000_003), np.float32, n_ignored=0)
    check(logits, targets, label_smoothing=0.1)


def test_three_dimensional_and_grad_output_per_row():
    rng = fresh_rng()
    logits, targets = make_case(rng, (2, 5, 11), np.float32, n_ignored=2)
    go = rng.standard_normal((2, 5))
    loss, _ = check(logits, targets, reduction="none", grad_output=go, weight=rng.uniform(0.5, 1.5, 11))
    assert loss.shape == (2, 5)
    check(logits, targets, reduction="mean", grad_output=2.5)
    check(logits, targets, reduction="none", grad_output=np.float32(0.5))


def test_one_dimensional_logits_are_one_row():
    rng = fresh_rng()
    logits = rng.standard_normal(17).astype(np.float32)
    loss, grad = check(logits, np.array(4), reduction="none")
    assert np.shape(loss) == () and grad.shape == (17,)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
def test_row_strided_view_is_not_copied_and_is_correct(dtype):
    """The usual next-token shift: logits[:, :-1] of a (B, T, V) array."""
    rng = fresh_rng()
    full = (rng.standard_normal((3, 9, 50)) * 2).astype(dtype)
    view = full[:, :-1]
    targets = rng.integers(0, 50, size=(3, 8))
    assert not view.flags.c_contiguous
    check(view, targets, label_smoothing=0.1)
    before = full.copy()
    nx.cross_entropy_with_grad(view, targets, out=view)  # in place through the view
    np.testing.assert_array_equal(full[:, -1], before[:, -1])  # the rows outside the view are untouched


def test_other_layouts_fall_back_to_a_copy():
    rng = fresh_rng()
    base = rng.standard_normal((40, 6)).astype(np.float32)
    targets = rng.integers(0, 40, size=6)
    check(base.T, targets)  # vocabulary axis strided
    check(base[::-1][:7].T[::-1].copy()[:, ::-1], rng.integers(0, 7, size=6))  # negative strides
    out = np.empty((40, 6), np.float32).T  # an out the kernels cannot address directly
    _, grad = nx.cross_entropy_with_grad(base.T, targets, out=out)
    assert grad is out
    np.testing.assert_allclose(out, ref.cross_entropy(base.T, targets)[1], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_in_place_gradient_equals_out_of_place(dtype):
    rng = fresh_rng()
    logits, targets = make_case(rng, (6, 301), dtype, n_ignored=2)
    opts = {"label_smoothing": 0.1, "softcap": 4.0, "z_loss": 1e-3, "weight": rng.uniform(0.5, 2, 301)}
    loss, grad = nx.cross_entropy_with_grad(logits, targets, **opts)
    original = logits.copy()
    loss2, grad2 = nx.cross_entropy_with_grad(logits, targets, out=logits, **opts)
    assert grad2 is logits
    np.testing.assert_array_equal(loss, loss2)
    np.testing.assert_array_equal(grad.view(np.uint8), logits.view(np.uint8))
    assert not np.array_equal(original.view(np.uint8), logits.view(np.uint8))


@pytest.mark.parametrize(
    ("dtype", "claim"),
    [(np.float32, None), (np.float64, None)]
    + [(d, c) for d in (np.float16, ml_dtypes.bfloat16) for c in (True, False)],
    ids=lambda v: np.dtype(v).name if isinstance(v, type) else {True: "claim", False: "no-claim", None: ""}[v],
)
def test_out_of_place_gradient_over_blocks_equals_in_place(dtype, claim, monkeypatch):
    """Rows of several blocks through the pass that stores exps (soft-capped ones too, times
    the cap's derivative): a leading masked block, blocks summed again (capped at 30 too), an
    ignored row. Every entry of an ``out`` full of NaN is written, with the bits of the
    in-place gradient, and both match the reference. 16-bit, out of place, both ways of the
    host-dependent choice run: the pass zeroing each block of ``out`` ahead of the sweep
    (the claim) or not (``_cpu.claims_output``)."""
    from nbxent import _cpu

    if claim is not None:
        monkeypatch.setattr(_cpu, "claims_output", lambda n_cols, l2=None: claim)

    rng = fresh_rng()
    n = 2 * _cpu.STATS_BLOCK + 37
    logits, targets = make_case(rng, (5, n), dtype, n_ignored=1, scale=2.0)
    x = logits.astype(np.float32)
    x[1, : _cpu.STATS_BLOCK] = -np.inf  # masked leading block
    x[2, _cpu.STATS_BLOCK + 5] = x[2].max() + 2 * _cpu.EXP_CLAMP  # its block is summed again
    x[3, : _cpu.STATS_BLOCK] -= 50  # capped at 30: -27.6 and below, then a rise to 29.9
    x[3, _cpu.STATS_BLOCK + 9] = 70
    logits = x.astype(dtype)
    targets[targets >= 0] = rng.integers(_cpu.STATS_BLOCK, n, size=np.sum(targets >= 0))
    weight = rng.uniform(0.5, 2, n)
    for opts in (
        {},
        {"label_smoothing": 0.1, "weight": weight},
        {"softcap": 30.0},
        {"softcap": 30.0, "z_loss": 1e-3, "weight": weight},
        {"softcap": 30.0, "label_smoothing": 0.1},
    ):
        out = np.full_like(logits, np.nan)
        loss, grad = nx.cross_entropy_with_grad(logits, targets, out=out, **opts)
        assert grad is out
        in_place = logits.copy()
        loss2, _ = nx.cross_entropy_with_grad(in_place, targets, out=in_place, **opts)
        np.testing.assert_array_equal(loss, loss2)
        np.testing.assert_array_equal(out.view(np.uint8), in_place.view(np.uint8))
        check(logits, targets, **opts)


def test_inputs_are_never_modified():
    rng = fresh_rng()
    logits, targets = make_case(rng, (4, 33), np.float32)
    weight = rng.uniform(size=33)
    copies = [a.copy() for a in (logits, targets, weight)]
    nx.cross_entropy_with_grad(logits, targets, weight=weight, label_smoothing=0.2)
    nx.cross_entropy(logits, targets, weight=weight)
    nx.softmax(logits)
    nx.log_softmax(logits)
    nx.logsumexp(logits)
    for a, b in zip((logits, targets, weight), copies, strict=True):
        np.testing.assert_array_equal(a, b)


def test_backward_equals_the_fused_gradient():
    rng = fresh_rng()
    logits, targets = make_case(rng, (5, 40), np.float32)
    _, grad = nx.cross_entropy_with_grad(logits, targets, grad_output=3.0, label_smoothing=0.1)
    np.testing.assert_array_equal(nx.cross_entropy_backward(logits, targets, 3.0, label_smoothing=0.1), grad)


class TestCorners:
    def test_empty_batch(self):
        logits = np.zeros((0, 10), np.float32)
        targets = np.zeros(0, np.int64)
        assert np.isnan(nx.cross_entropy(logits, targets))
        assert nx.cross_entropy(logits, targets, reduction="sum") == 0
        assert nx.cross_entropy(logits, targets, reduction="none").shape == (0,)
        loss, grad = nx.cross_entropy_with_grad(logits, targets)
        assert np.isnan(loss) and grad.shape == (0, 10)
        assert nx.logsumexp(logits).shape == (0,)

    def test_all_rows_ignored(self):
        rng = fresh_rng()
        logits = rng.standard_normal((4, 9)).astype(np.float32)
        targets = np.full(4, 3)
        loss, grad = nx.cross_entropy_with_grad(logits, targets, ignore_index=3)
        assert np.isnan(loss)
        assert np.all(grad == 0)
        assert nx.cross_entropy(logits, targets, ignore_index=3, reduction="sum") == 0

    def test_ignore_index_may_be_a_class_id(self):
        rng = fresh_rng()
        logits, _ = make_case(rng, (8, 5), np.float32)
        targets = np.array([0, 1, 2, 0, 4, 0, 3, 0])
        check(logits, targets, ignore_index=0, weight=rng.uniform(0.5, 2, 5), label_smoothing=0.1)

    @pytest.mark.parametrize("offset", [1e4, -1e4, 1e5])
    def test_large_common_offset(self, offset):
        rng = fresh_rng()
        logits = (rng.standard_normal((4, 100)) + offset).astype(np.float32)
        targets = rng.integers(0, 100, 4)
        loss, grad = nx.cross_entropy_with_grad(logits, targets, label_smoothing=0.1, reduction="none")
        want_loss, want_grad = ref.cross_entropy(logits, targets, label_smoothing=0.1, reduction="none")
        # float32 rounding of the inputs is exact in the reference; the loss may differ by the
        # rounding of lse at this magnitude only.
        np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=abs(offset) * 2e-7 * 4)
        np.testing.assert_allclose(grad, want_grad, atol=1e-5)

    def test_extreme_logits(self):
        logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], np.float32)
        targets = np.array([1, 2])
        loss, grad = check(logits, targets, reduction="none")
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))

    def test_minus_inf_entries_are_masked_vocabulary(self):
        rng = fresh_rng()
        logits = rng.standard_normal((3, 20)).astype(np.float32)
        logits[:, 5:9] = -np.inf
        targets = np.array([0, 10, 19])
        loss, grad = check(logits, targets, reduction="none")
        assert np.all(np.isfinite(loss))
        assert np.all(grad[:, 5:9] == 0)
        loss = nx.cross_entropy(logits, np.array([6, 0, 0]), reduction="none")
        assert loss[0] == np.inf and np.all(np.isfinite(loss[1:]))
        # with smoothing, a masked entry's log-probability -inf enters the loss, as in PyTorch
        assert np.isinf(nx.cross_entropy(logits, targets, label_smoothing=0.1))

    def test_nan_poisons_its_row_only(self):
        rng = fresh_rng()
        for dtype in DTYPES:
            logits = rng.standard_normal((3, 50)).astype(dtype)
            logits[1, 7] = np.nan
            loss, grad = nx.cross_entropy_with_grad(logits, np.array([1, 2, 3]), reduction="none")
            assert np.isnan(loss[1]) and np.all(np.isnan(grad[1].astype(np.float32)))
            assert np.all(np.isfinite(loss[[0, 2]])) and np.all(np.isfinite(grad[[0, 2]].astype(np.float32)))

    @pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
    def test_non_finite_grad_output_gives_what_float32_gives(self, dtype):
        """A 16-bit gradient is narrowed without a NaN test where no entry can be NaN; an
        infinite or NaN grad_output (and a masked entry, where inf * 0 is NaN) must still
        give the NaNs and infinities that the float32 computation gives."""
        rng = fresh_rng()
        logits = rng.standard_normal((4, 3000)).astype(dtype)
        logits[:, 5] = -np.inf
        targets = np.array([0, 1, 2, 2999])
        payload_nan = np.array(0x7FFFFFFF, np.uint32).view(np.float32)  # rounding would carry it to -0
        for grad_output in ([np.inf, -np.inf, np.nan, 1.0], [1.0, payload_nan, 1e38, np.inf]):
            g_out = np.array(grad_output, np.float32)
            wide = logits.astype(np.float32)
            _, want = nx.cross_entropy_with_grad(wide, targets, grad_output=g_out, reduction="none")
            _, got = nx.cross_entropy_with_grad(logits, targets, grad_output=g_out, reduction="none")
            got = got.astype(np.float32)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            with np.errstate(over="ignore"):  # 1e38 is inf in float16
                want_inf = np.isinf(want.astype(dtype).astype(np.float32))
            np.testing.assert_array_equal(np.isinf(got), want_inf)

    def test_all_minus_inf_row(self):
        logits = np.full((2, 4), -np.inf, np.float32)
        logits[0] = 0
        loss = nx.cross_entropy(logits, np.array([0, 0]), reduction="none")
        assert np.isfinite(loss[0]) and np.isnan(loss[1])
        np.testing.assert_array_equal(nx.logsumexp(logits), [np.log(np.float32(4)), -np.inf])

    @pytest.mark.parametrize(
        "options", [{}, {"label_smoothing": 0.1}, {"weight": "random", "label_smoothing": 0.2}, {"softcap": 4.0}]
    )
    def test_statistics_across_blocks(self, options):
        """The loss-only kernel reads a row in blocks of 2048 (``_cpu.STATS_BLOCK``), raising
        its running max block by block: rising rows, masked leading blocks and special values
        in a late block must give what one whole-row max would."""
        from nbxent._cpu import STATS_BLOCK

        rng = fresh_rng()
        n = 3 * STATS_BLOCK + 7
        rows = np.tile((rng.standard_normal(n) * 3).astype(np.float32), (4, 1))
        rows[0] = np.sort(rows[0])  # the max rises in every block
        rows[1, : 2 * STATS_BLOCK + 5] = -np.inf  # the first live block is the third
        rows[2, -3] = 50.0  # one dominant logit in the last, short block
        rows[3, : STATS_BLOCK + 1] = -np.inf
        rows[3, -1] = 1e4
        targets = np.array([n - 1, n - 2, 5, n - 1])
        opts = resolve(options, rng, n)
        want, _ = ref.cross_entropy(rows, targets, reduction="none", **opts)
        got = nx.cross_entropy(rows, targets, reduction="none", **opts)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(nx.logsumexp(rows), ref.logsumexp(rows), rtol=1e-6)
        special = rows[:2].copy()
        special[0, -5] = np.nan
        special[1, -5] = np.inf
        got = nx.cross_entropy(special, targets[:2], reduction="none", **opts)
        with np.errstate(invalid="ignore"):
            want, _ = ref.cross_entropy(special, targets[:2], reduction="none", **opts)
        assert np.isnan(got[0])  # NaN in a late block; +inf after finite blocks is NaN (inf - inf)
        assert np.isnan(got[1]) == ("softcap" not in opts)  # unless soft-capping saturates it
        np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)
        lse = nx.logsumexp(special)
        assert np.isnan(lse[0]) and lse[1] == np.inf
        masked = np.full((1, n), -np.inf, np.float32)
        got = nx.cross_entropy(masked, np.array([0]), **opts)  # NaN, or log(n) when capped
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(got, ref.cross_entropy(masked, np.array([0]), **opts)[0], rtol=1e-6)
        assert nx.logsumexp(masked)[0] == -np.inf

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
    @pytest.mark.parametrize("options", [{}, {"weight": "random", "label_smoothing": 0.2}])
    def test_gradient_across_blocks(self, dtype, options):
        """The fused kernel stores exp(x - m_k) with m_k the running max of block k and scales
        block k by exp(m_k - m) at the end: targets and maxima in every block, fused and in
        place, against the reference; 16-bit rows are widened block by block."""
        from nbxent._cpu import STATS_BLOCK

        rng = fresh_rng()
        n = 3 * STATS_BLOCK + 7
        base = (rng.standard_normal(n) * 3).astype(dtype)
        rows = np.tile(base, (5, 1))
        rows[0] = np.sort(base)  # the max rises in every block
        rows[1, : 2 * STATS_BLOCK + 5] = -np.inf  # masked leading blocks
        rows[2, 3] = 12  # the max in the first block
        rows[3, -2] = 12  # the max in the last, short block
        rows[4] = np.sort(base)[::-1]  # falling: every block after the first has m_k = m
        targets = np.array([3, n - 2, 2 * STATS_BLOCK + 1, STATS_BLOCK - 1, n - 1])
        opts = resolve(options, rng, n)
        loss, grad = check(rows, targets, rng, reduction="sum", **opts)
        work = rows.copy()
        loss2, grad2 = nx.cross_entropy_with_grad(work, targets, reduction="sum", out=work, **opts)
        assert_same_loss(loss2, loss)
        np.testing.assert_array_equal(grad2.view(np.uint8), grad.view(np.uint8))
        if not opts:  # masked entries: probability exactly 0 (smoothing adds -eps w_j / V)
            assert np.all(grad[1, : 2 * STATS_BLOCK + 5].astype(np.float32) == 0)
        special = rows[:2].copy()
        special[0, -5] = np.nan
        special[1, -5] = np.inf
        loss, grad = nx.cross_entropy_with_grad(special, targets[:2], reduction="none", **opts)
        assert np.isnan(loss).all() and np.isnan(grad.astype(np.float32)).all()

    def test_softcap_saturates_infinite_logits(self):
        logits = np.array([[np.inf, 0.0, -np.inf]], np.float32)
        loss, grad = nx.cross_entropy_with_grad(logits, np.array([1]), softcap=2.0, reduction="none")
        want, want_grad = ref.cross_entropy(logits, np.array([1]), softcap=2.0, reduction="none")
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, atol=1e-6)

    def test_unchecked_bad_target_gives_nan_row(self):
        logits = np.zeros((3, 4), np.float32)
        targets = np.array([1, 99, -5])
        loss, grad = nx.cross_entropy_with_grad(logits, targets, reduction="none", validate=False)
        assert loss[0] == pytest.approx(np.log(4)) and np.isnan(loss[1]) and np.isnan(loss[2])
        assert np.all(np.isnan(grad[1:])) and np.all(np.isfinite(grad[0]))

    def test_mean_divides_by_the_kept_rows(self):
        """'mean' divides by the targets that are not ignore_index, validated or not (the range
        check counts them: ``_cpu.scan_targets``), calls of other dtypes and shapes between."""
        from nbxent import _cpu

        rng = fresh_rng()
        for _ in range(20):
            n, v = int(rng.integers(1, 40)), int(rng.integers(1, 50))
            targets = rng.integers(0, v, n)
            targets[rng.random(n) < 0.3] = -100
            dtype = rng.choice([np.float32, np.float64])
            logits = rng.standard_normal((n, v)).astype(dtype)
            kept = int(np.count_nonzero(targets != -100))
            rows = nx.cross_entropy(logits, targets, reduction="none").astype(np.float64)
            for validate in (True, False):
                mean = nx.cross_entropy(logits, targets, validate=validate)
                if kept:
                    assert mean == pytest.approx(rows.sum() / kept, rel=1e-6)
                else:
                    assert np.isnan(mean)
            weight = rng.uniform(0.5, 2.0, v)  # the divisor is then the kept rows' weight sum
            kept_weight = weight[targets[targets != -100]].sum()
            for validate in (True, False):
                mean = nx.cross_entropy(logits, targets, weight=weight, validate=validate)
                if kept:
                    want = nx.cross_entropy(logits, targets, weight=weight, reduction="sum") / kept_weight
                    assert mean == pytest.approx(want, rel=1e-6)
                else:
                    assert np.isnan(mean)
            bad = targets.copy()
            at = int(rng.integers(n))
            bad[at] = v + 3 if at % 2 else -1  # out of range, unchecked: a NaN row that counts
            assert np.isnan(nx.cross_entropy(logits, bad, validate=False))
            assert _cpu.scan_targets(bad, v, -100) == (at, kept + (targets[at] == -100))
            assert _cpu.scan_targets(targets, v, -100) == (-1, kept)

    def test_targets_of_any_integer_dtype(self):
        rng = fresh_rng()
        logits = rng.standard_normal((6, 200)).astype(np.float32)
        targets = rng.integers(0, 200, 6)
        want = nx.cross_entropy(logits, targets)
        for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64):
            assert nx.cross_entropy(logits, targets.astype(dtype)) == want


def test_seed_example():
    """A model that gives "cat" probability 0.7 has loss -ln 0.7 = 0.357; 0.9 gives 0.105."""
    vocab = ["the", "cat", "sat"]
    cat = vocab.index("cat")
    for p_cat, expected in [(0.7, 0.357), (0.9, 0.105)]:
        probs = np.array([(1 - p_cat) / 2, p_cat, (1 - p_cat) / 2], np.float32)
        loss = nx.cross_entropy(np.log(probs)[None], np.array([cat]))
        assert round(float(loss), 3) == expected
        np.testing.assert_allclose(loss, -np.log(p_cat), rtol=1e-6)


class TestNormalizations:
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
    def test_softmax_log_softmax_logsumexp(self, dtype):
        rng = fresh_rng()
        x = (rng.standard_normal((3, 4, 129)) * 4).astype(dtype)
        x[0, 0, :5] = -np.inf
        x64 = x.astype(np.float64)
        rtol = 1e-12 if dtype == np.float64 else 2e-6
        out_tol = {np.float64: 1e-12, np.float32: 2e-6}.get(dtype, 2.0**-7)
        lse = nx.logsumexp(x)
        assert lse.shape == (3, 4) and lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
        np.testing.assert_allclose(lse, ref.logsumexp(x64), rtol=rtol)
        sm = nx.softmax(x)
        assert sm.dtype == x.dtype
        np.testing.assert_allclose(sm.astype(np.float64), ref.softmax(x64), atol=out_tol)
        lsm = nx.log_softmax(x)
        np.testing.assert_allclose(lsm.astype(np.float64), ref.log_softmax(x64), rtol=out_tol, atol=out_tol * 10)

    def test_out_and_in_place(self):
        rng = fresh_rng()
        x = rng.standard_normal((5, 31)).astype(np.float32)
        want = nx.softmax(x)
        out = np.empty_like(x)
        assert nx.softmax(x, out=out) is out
        np.testing.assert_array_equal(out, want)
        assert nx.softmax(x, out=x) is x
        np.testing.assert_array_equal(x, want)

    def test_stable_for_huge_logits(self):
        x = np.array([[1e4, 1e4 - 1, -1e4]], np.float32)
        np.testing.assert_allclose(nx.logsumexp(x), [1e4 + np.log1p(np.exp(-1))], rtol=1e-7)
        np.testing.assert_allclose(nx.softmax(x).sum(), 1, rtol=1e-6)


def test_bitwise_identical_across_thread_counts_and_runs():
    rng = fresh_rng()
    logits, targets = make_case(rng, (37, 1003), np.float32, n_ignored=4)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "weight": rng.uniform(0.5, 2, 1003)}
    results = []
    original = numba.get_num_threads()
    try:
        for threads in sorted({1, original}):
            numba.set_num_threads(threads)
            for _ in range(2):
                loss, grad = nx.cross_entropy_with_grad(logits, targets, **opts)
                results.append((loss.tobytes(), grad.tobytes()))
    finally:
        numba.set_num_threads(original)
    assert all(r == results[0] for r in results)


def assert_same_bits(got, want, msg=""):
    """Bitwise equal."""
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=msg)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_rows_split_along_the_vocabulary_give_the_same_bits(dtype, monkeypatch):
    """Calls with fewer rows than threads split each row's blocks among threads
    (``_cpu_split``): loss alone, fused out of place, in place (split for 16-bit logits, not
    for float ones), logsumexp, softmax and log-softmax (in place too; 16-bit ones through
    a float32 scratch) give the bits of one thread a row, for any number of parts (more parts
    than blocks included), every option, and the rows that fall back to one thread (a
    reference max raised, masked leading blocks, NaN, +inf)."""
    from nbxent import _backend_cpu
    from nbxent._cpu import EXP_CLAMP, STATS_BLOCK

    rng = fresh_rng()
    rows, _, _ = rows_around_the_clamp(rng)  # rows 1-5 are summed again: one thread each
    n = rows.shape[1]
    plain = (rng.standard_normal((40, n)) * 3).astype(np.float32)  # many rows: the order of a sum shows
    plain[1, : STATS_BLOCK + 3] = -np.inf  # no reference max in the first block
    plain[2, 3] = plain[2].max() + EXP_CLAMP - 1  # the first block's max after its first logits
    plain[3, -2] = np.nan
    plain[4, -2] = np.inf
    x = np.concatenate([rows, plain]).astype(dtype)
    t = rng.integers(0, n, x.shape[0])
    t[0] = -100  # ignored
    t[6] = STATS_BLOCK  # the first entry of a block
    option_sets = [
        {},
        {"label_smoothing": 0.1},
        {"softcap": 20.0},
        {"softcap": 20.0, "label_smoothing": 0.1},
        {"weight": rng.uniform(0.2, 2.0, n), "label_smoothing": 0.2, "z_loss": 1e-3},
    ]

    def results(opts):
        out = [nx.cross_entropy(x, t, reduction="none", **opts)]
        out += nx.cross_entropy_with_grad(x, t, reduction="none", grad_output=rng.uniform(0.5, 2, t.size), **opts)
        work = x.copy()
        out += nx.cross_entropy_with_grad(work, t, reduction="none", out=work, **opts)
        return out

    def normalized():
        out = [nx.logsumexp(x), nx.softmax(x), nx.log_softmax(x)]
        for f in (nx.softmax, nx.log_softmax):
            work = x.copy()
            out.append(f(work, out=work))
        return out

    for opts in option_sets:
        seed = rng.integers(2**32)
        monkeypatch.setattr(_backend_cpu, "split_parts", lambda n_rows, n_cols: 1)
        rng = np.random.default_rng(seed)  # the same grad_output
        one_thread = results(opts) + normalized()
        split = {}
        for parts in (2, 3, 64):
            monkeypatch.setattr(_backend_cpu, "split_parts", lambda n_rows, n_cols, parts=parts: parts)
            rng = np.random.default_rng(seed)
            with np.errstate(invalid="ignore"):
                split[parts] = results(opts) + normalized()
        for parts, got in split.items():
            for k, (a, b) in enumerate(zip(got, split[2], strict=True)):
                np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), f"{opts} parts={parts} result {k}")
            for k, (a, b) in enumerate(zip(got, one_thread, strict=True)):
                assert_same_bits(a, b, f"{opts} parts={parts} result {k} against one thread")
        check(x[[0, 5, 6]], t[[0, 5, 6]], reduction="none", **opts)  # split, against the reference


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n_cols", [2049, 4096, 4099, 10007])
def test_split_rows_of_odd_lengths(dtype, n_cols, monkeypatch):
    """The split at row lengths around the block size (a last block of one logit, exactly two
    blocks, a prime length), fresh random rows, targets in the first and last blocks, in 2 and
    5 parts (more parts than blocks): the bits of one thread a row, and the reference."""
    from nbxent import _backend_cpu

    rng = fresh_rng()
    x = (rng.standard_normal((3, n_cols)) * rng.choice([1.0, 4.0, 20.0])).astype(dtype)
    t = np.array([0, n_cols - 1, rng.integers(n_cols)])
    opts = {"label_smoothing": 0.05, "weight": rng.uniform(0.5, 2.0, n_cols)}

    def calls():
        out = [nx.cross_entropy(x, t, reduction="none"), *nx.cross_entropy_with_grad(x, t, reduction="none", **opts)]
        work = x.copy()
        out += nx.cross_entropy_with_grad(work, t, reduction="none", out=work)
        return [*out, nx.logsumexp(x), nx.softmax(x)]

    monkeypatch.setattr(_backend_cpu, "split_parts", lambda n_rows, n_cols: 1)
    want = calls()
    for parts in (2, 5):
        monkeypatch.setattr(_backend_cpu, "split_parts", lambda n_rows, n_cols, parts=parts: parts)
        got = calls()
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same_bits(a, b, f"V={n_cols} parts={parts} result {k}")
    check(x, t, reduction="none", **opts)


@pytest.mark.parametrize(
    ("n_rows", "n_cols", "threads", "parts"),
    [
        (1, 256000, 2, 8),
        (1, 256000, 1, 1),
        (2, 256000, 2, 1),
        (3, 128256, 16, 22),
        (1, 2048, 8, 1),
        (1, 4097, 64, 1),
        (1, 70000, 64, 1),
        (1, 140000, 64, 69),
    ],
)
def test_split_parts(n_rows, n_cols, threads, parts, monkeypatch):
    """Rows are split where they are fewer than threads and longer than one block, in about
    4 parts a thread, at most one a block; small calls are not split."""
    from nbxent import _backend_cpu

    monkeypatch.setattr(_backend_cpu.numba, "get_num_threads", lambda: threads)
    assert _backend_cpu.split_parts(n_rows, n_cols) == parts


def test_concurrent_calls_from_python_threads():
    rng = fresh_rng()
    cases = [make_case(rng, (16, 2000 + i), np.float32) for i in range(6)]
    expected = [nx.cross_entropy_with_grad(x, t) for x, t in cases]
    errors = []

    def work(k):
        try:
            for _ in range(5):
                for (x, t), (loss, grad) in zip(cases, expected, strict=True):
                    got_loss, got_grad = nx.cross_entropy_with_grad(x, t)
                    assert got_loss == loss and np.array_equal(got_grad, grad)
        except Exception as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


FORKED = r"""
import multiprocessing as mp, sys
import numpy as np, numba
import nbxent as nx
try:
    import dask, dask.array as da, nbxent.dask as nxd
except ImportError:
    dask = None
rng = np.random.default_rng(int(sys.argv[1]))
cases = [  # rows over the threads, one row split among them, short rows
    (rng.standard_normal((64, 3000)).astype(np.float32), rng.integers(0, 3000, 64)),
    (rng.standard_normal((1, 300000)).astype(np.float32), rng.integers(0, 300000, 1)),
    (rng.standard_normal((4096, 10)).astype(np.float32), rng.integers(0, 10, 4096)),
]

def run(_=None):
    out = [nx.cross_entropy_with_grad(x, t, label_smoothing=0.1) for x, t in cases]
    out.append(nx.logsumexp(cases[1][0]))
    if dask is not None:  # the block kernels, launched one thread a block
        x, t = cases[0]
        with dask.config.set(scheduler="synchronous"):
            out.append(dask.compute(*nxd.cross_entropy_with_grad(da.from_array(x, chunks=(32, 1024)), t)))
    return out

def flat(results):
    for r in results:
        yield from (flat(r) if isinstance(r, tuple) else [np.asarray(r)])

if __name__ == "__main__":
    numba.set_num_threads(2)
    want = list(flat(run()))  # starts the thread pool
    print("layer", numba.threading_layer(), flush=True)
    with mp.get_context("fork").Pool(2) as pool:
        for got in pool.map(run, range(2)):
            got = list(flat(got))
            assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    print("same bits in forked children", flush=True)
"""


def test_forked_children_of_a_running_pool(tmp_path):
    """A multiprocessing Pool forked after nbxent ran on threads: Numba's GNU OpenMP layer
    terminated each worker on its first parallel launch and the Pool hung. Such children now
    run every kernel on their own thread (``_backend_cpu._POOL_LOST``), with the parent's bits;
    a hang fails at the timeout."""
    import subprocess
    import sys

    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    seed = str(fresh_rng().integers(2**32))
    done = subprocess.run([sys.executable, str(script), seed], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "same bits in forked children" in done.stdout
    assert "Terminating" not in done.stderr


# Every option combination at once, on small shapes.
@pytest.mark.parametrize(
    "reduction,smoothing,weighted,z,cap",
    list(itertools.product(REDUCTIONS, [0.0, 0.3, 1.0], [False, True], [0.0, 0.01], [None, 1.5])),
)
def test_option_grid(reduction, smoothing, weighted, z, cap):
    rng = fresh_rng()
    logits, targets = make_case(rng, (7, 23), np.float32, n_ignored=2)
    weight = rng.uniform(0.1, 3, 23) if weighted else None
    check(logits, targets, reduction=reduction, label_smoothing=smoothing, weight=weight, z_loss=z, softcap=cap)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_read_only_logits(dtype):
    rng = fresh_rng()
    logits, targets = make_case(rng, (5, 70), dtype)
    logits.flags.writeable = False
    check(logits, targets, label_smoothing=0.1)
    assert np.isfinite(nx.logsumexp(logits)).all()
    np.testing.assert_allclose(nx.softmax(logits).astype(np.float64).sum(-1), 1, rtol=1e-2)
    assert nx.log_softmax(logits).shape == logits.shape


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_scratch_ring_changes_no_bit(dtype, monkeypatch):
    """The 16-bit kernels' float32 scratch row moves through a ring (``_cpu.SCRATCH_RING_BYTES``)
    for speed; every window is rewritten before use, so the results are the same bits as with
    one scratch row, in place or not, serial or over threads."""
    from nbxent import _cpu

    rng = fresh_rng()
    x = (rng.standard_normal((67, 3001)) * 4).astype(dtype)
    x[3, :2000] = -np.inf  # a row whose first blocks are masked
    t = rng.integers(0, x.shape[1], size=67)
    t[5] = -100
    results = []
    for ring_bytes in (0, 3 * 3001 * 4, _cpu.SCRATCH_RING_BYTES):
        monkeypatch.setattr(_cpu, "SCRATCH_RING_BYTES", ring_bytes)
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            with_threads = numba.get_num_threads()
            numba.set_num_threads(threads)
            try:
                loss, grad = nx.cross_entropy_with_grad(x, t, reduction="none", label_smoothing=0.1)
                xi = x.copy()
                loss_i, _ = nx.cross_entropy_with_grad(xi, t, reduction="none", out=xi)
            finally:
                numba.set_num_threads(with_threads)
            results.append((loss.tobytes(), grad.tobytes(), loss_i.tobytes(), xi.tobytes()))
    assert all(r == results[0] for r in results)
    want_loss, _ = ref.cross_entropy(x.astype(np.float64), t, reduction="none", label_smoothing=0.1)
    np.testing.assert_allclose(np.frombuffer(results[0][0], np.float32), want_loss, rtol=1e-5, atol=1e-5)


def rows_around_the_clamp(rng):
    """Rows of 3 blocks and a bit that rise above the reference max their first block gives
    (the max of its first REF_SAMPLE logits): later blocks to just below and just above
    EXP_CLAMP (one entry), near it in a whole block (no entry clamped, the sum reaches
    e^EXP_CLAMP), and by 60 and 200 (earlier blocks' probabilities e^-60, which float32 holds,
    and below its range); the last row rises past EXP_CLAMP within its first block. Returns
    the rows, the reference max each row's first block must be stored against, and the one
    each row's statistics must end with."""
    from nbxent._cpu import EXP_CLAMP, REF_SAMPLE, STATS_BLOCK

    n = 3 * STATS_BLOCK + 11
    base = rng.standard_normal(n).astype(np.float32)
    top = float(base[:REF_SAMPLE].max())
    rows = np.tile(base, (6, 1))
    rows[0, STATS_BLOCK + 5] = top + EXP_CLAMP - 1
    rows[1, STATS_BLOCK + 5] = top + EXP_CLAMP + 1
    rows[2, STATS_BLOCK : 2 * STATS_BLOCK] = top + EXP_CLAMP - 7 + base[STATS_BLOCK : 2 * STATS_BLOCK] / 10
    rows[3, 2 * STATS_BLOCK + 3] = top + 60
    rows[4, -1] = top + 200
    rows[5, REF_SAMPLE + 7] = top + EXP_CLAMP + 1
    first_m = [top] * 5 + [rows[5].max()]
    ref_max = [top] + [rows[r].max() for r in range(1, 6)]  # rows[0] is never summed again
    return rows, np.array(first_m, np.float32), np.array(ref_max, np.float32)


def test_reference_max_is_raised_only_where_a_block_sum_reaches_the_clamp():
    """White box: blocks are summed against the max of the first block's first REF_SAMPLE
    logits with each exponent clamped at EXP_CLAMP, and only a block whose sum reaches
    e^EXP_CLAMP is summed again against its own max (``_cpu.row_stats``); the fused pass
    stores each block against the max it was summed with, and agrees with the loss alone."""
    from nbxent import _cpu

    rows, first_m, ref_max = rows_around_the_clamp(fresh_rng())
    none = np.empty(0, np.float32)
    for r, row in enumerate(rows):
        m, s, _ = _cpu.row_stats(row, np.float32(0), none, False, _cpu.padded_ebuf(row))
        assert m == ref_max[r], r
        block_m = np.empty(-(-row.size // _cpu.STATS_BLOCK), np.float32)
        g = np.empty_like(row)
        m2, s2, _ = _cpu.row_stats_store(
            row, g, False, none, False, np.float32(0), _cpu.padded_ebuf(row), block_m, None, 0, True
        )
        assert (m2, s2) == (m, s), r
        assert block_m[0] == first_m[r] and block_m[-1] == m, r
        x64 = row.astype(np.float64)
        lse = np.log(np.sum(np.exp(x64 - x64.max()))) + x64.max()
        np.testing.assert_allclose(m + np.log(s), lse, rtol=1e-6)
        p = g * np.exp(np.repeat(block_m, _cpu.STATS_BLOCK)[: row.size].astype(np.float64) - m) / s
        np.testing.assert_allclose(p, np.exp(x64 - lse), rtol=1e-5, atol=1e-37)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "options", [{}, {"weight": "random", "label_smoothing": 0.2, "z_loss": 1e-3}, {"softcap": 40.0}]
)
def test_blocks_summed_against_a_lower_reference_max(dtype, options):
    """Rows whose blocks rise above the reference max of their first block
    (``rows_around_the_clamp``) against the reference; loss alone, fused and in place give
    the same bits. Without options, the first block's probabilities in the row that rises by
    60 (e^-60 and below) and in the one that rises within its first block (e^-33) to relative
    precision, where the dtype holds them."""
    from nbxent._cpu import STATS_BLOCK

    rng = fresh_rng()
    rows, _, _ = rows_around_the_clamp(rng)
    rows = rows.astype(dtype)
    n = rows.shape[1]
    targets = np.array([0, n - 1, STATS_BLOCK + 9, 2 * STATS_BLOCK + 3, n - 1, n - 2])
    opts = resolve(options, rng, n)
    loss, grad = check(rows, targets, rng, reduction="none", **opts)
    assert_same_loss(nx.cross_entropy(rows, targets, reduction="none", **opts), loss)
    work = rows.copy()
    loss2, grad2 = nx.cross_entropy_with_grad(work, targets, reduction="none", out=work, **opts)
    assert_same_loss(loss2, loss)
    np.testing.assert_array_equal(grad2.view(np.uint8), grad.view(np.uint8))
    rtol = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2.0**-8}.get(np.dtype(dtype).name)
    if rtol is not None and not opts:
        _, want = ref.cross_entropy(rows.astype(np.float64), targets, reduction="none")
        first = slice(0, STATS_BLOCK)
        for r in (3, 5):
            assert np.all(want[r, first] > 1e-36)
            np.testing.assert_allclose(grad[r, first].astype(np.float64), want[r, first], rtol=rtol, err_msg=r)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_loss_alone_equals_the_fused_loss_bit_for_bit(dtype):
    """The loss-only call and the fused call sum each row in the same loops, so their losses
    are the same bits: odd lengths (vector remainders), masked leading blocks, smoothing,
    soft-capping with and without smoothing."""
    from nbxent._cpu import STATS_BLOCK

    rng = fresh_rng()
    for n in (1, 7, 100, STATS_BLOCK - 1, STATS_BLOCK + 1, 3 * STATS_BLOCK + 5):
        for options in ({}, {"label_smoothing": 0.1}, {"softcap": 20.0}, {"softcap": 20.0, "label_smoothing": 0.1}):
            x = (rng.standard_normal((6, n)) * rng.choice([1.0, 3.0, 30.0])).astype(dtype)
            x[1, : n // 2] = -np.inf
            x[2, : max(1, n - 3)] = -np.inf
            t = rng.integers(0, n, 6)
            t[1:3] = n - 1
            alone = nx.cross_entropy(x, t, reduction="none", **options)
            fused, _ = nx.cross_entropy_with_grad(x, t, reduction="none", **options)
            assert_same_loss(alone, fused, f"V={n} {options}")


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothing"])
def test_block_sums_do_not_depend_on_where_the_arrays_lie(smooth, fmt):
    """The fused pass's block (exp stored into ``g``, sums returned) gives the same bits wherever
    ``g`` lies relative to ``x``. Small arrays allocated one after another often lie side by
    side; a loop that stored into ``g`` while summing was vectorized behind a run-time distance
    check whose scalar fallback summed in another order (5217 of 20000 such calls differed;
    concurrent Dask blocks gave rows a few ulp apart). Float blocks store into ``g`` only where
    it is far from ``x`` (``_cpu.far_apart``), else into the padded ``ebuf``; 16-bit blocks are
    widened in the store loop, into a float32 ``g`` that is never their memory."""
    from nbxent import _cpu

    rng = fresh_rng()
    rows = (rng.standard_normal((23, 37)) * 3).astype(np.float32)
    half = {"float32": 0, "float16": _cpu.HALF_F16, "bfloat16": _cpu.HALF_BF16}[fmt]
    if half:
        rows = rows.astype(np.float16 if fmt == "float16" else ml_dtypes.bfloat16).view(np.uint16)
    w = rng.uniform(0.5, 2.0, 37).astype(np.float32)
    m = np.float32(5.0)

    def block(r):
        x = rows[r].copy()
        g = np.empty(37, np.float32)  # allocated right after x more often than not
        if half:
            s, sm = _cpu.block_store16(x, g, m, w, smooth, half, np.float32(0))
        else:
            s, sm = _cpu.block_store(x, g, m, w, smooth, np.float32(0), _cpu.padded_ebuf(g))
        return s, sm, g

    want = [block(r) for r in range(23)]
    for i in range(3000):
        s, sm, g = block(i % 23)
        ws, wsm, wg = want[i % 23]
        assert s == ws and sm == wsm and np.array_equal(g, wg), f"call {i}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothing"])
def test_capped_block_sums_do_not_depend_on_where_the_arrays_lie(smooth, dtype):
    """Soft-capped float blocks sum the exps in the loop that stores the products (with
    smoothing: the capped logits, and the smoothing sum too): into ``g`` where it lies far
    from ``x`` (``_cpu.far_apart``), else into the padded ``ebuf``, copied to ``g`` after.
    Whatever the layout (``g`` right after ``x``, far from it, ``x`` itself, or none for the
    loss alone), the sums and what is stored have the same bits: LLVM's overlap check, which
    would run the scalar loop (another order of the sums), never fails."""
    from nbxent import _cpu

    rng = fresh_rng()
    n = 37
    rows = (rng.standard_normal((23, n)) * 30).astype(dtype)
    m, cap = dtype(5.0), dtype(30.0)
    w = rng.uniform(0.5, 2.0, n).astype(dtype)
    far = np.empty(1 << 16, dtype)
    side_by_side = np.empty(2 * n, dtype)  # g right after x: 37 entries apart
    assert not _cpu.far_apart(side_by_side[:n], side_by_side[n:])
    assert _cpu.far_apart(side_by_side[:n], far[-n:]) and _cpu.far_apart(side_by_side[:n], _cpu.padded_ebuf(far))

    def block(r, where):
        x = side_by_side[:n]
        x[:] = rows[r]
        g = {"after": side_by_side[n:], "far": far[-n:], "same": x, "none": far[:0]}[where]
        s, sm = _cpu.block_store(x, g, m, w, smooth, cap, _cpu.padded_ebuf(far))
        return s, sm, g.copy()

    want = [block(r, "far") for r in range(23)]
    for i in range(400):
        where = ("after", "same", "none", "far")[i % 4]
        s, sm, g = block(i % 23, where)
        ws, wsm, wg = want[i % 23]
        assert s == ws and sm == wsm, f"call {i}, g {where}"
        if where != "none":
            assert np.array_equal(g, wg), f"call {i}, g {where}"


# ---------------------------------------------------------------------------------------------
# Short rows (``_cpu_short``): rows of at most SHORT_COLS logits, and the tiny kernels that put
# rows of at most TINY_COLS in SIMD lanes, in groups of TINY_GROUP rows.


def short_lengths():
    from nbxent import _cpu_short

    tiny, short = _cpu_short.TINY_COLS, _cpu_short.SHORT_COLS
    return [1, 2, 10, tiny, tiny + 1, 97, short, short + 1]


def with_specials(rng, logits):
    """Rows of special values in a batch of at least 8 rows: masked entries, a row of all
    ``-inf``, a NaN, a ``+inf``, a large common offset each way."""
    x = logits.astype(np.float64)
    v = x.shape[-1]
    x[0, rng.integers(0, v, max(1, v // 3))] = -np.inf
    x[0, 0] = 0.5  # one entry left
    x[1] = -np.inf
    x[2, rng.integers(0, v)] = np.nan
    x[3, rng.integers(0, v)] = np.inf
    x[4] += 1e4
    x[5] -= 1e4
    return x.astype(logits.dtype)


@pytest.mark.parametrize("n_cols", short_lengths())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_short_rows_match_reference(options, dtype, n_cols):
    """More rows than a tiny group holds, and a last group short of full, against the float64
    reference, with every option set."""
    rng = fresh_rng()
    logits, targets = make_case(rng, (2 * 64 + 7, n_cols), dtype, n_ignored=5)
    check(logits, targets, reduction="none", **resolve(options, rng, n_cols))
    check(logits, targets, reduction="mean", grad_output=2.0, **resolve(options, rng, n_cols))


@pytest.mark.parametrize("n_cols", short_lengths())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_short_kernels_agree_with_the_block_kernels(dtype, n_cols, monkeypatch):
    """Special values (masked entries, all ``-inf``, NaN, ``+inf``, 1e4 offsets, ignored rows and
    unchecked bad targets) come out of the short kernels as out of the block kernels of longer
    rows: the same NaNs and infinities, the same numbers to rounding (16-bit: the block
    kernels take a shorter exp, 5 ulp)."""
    from nbxent import _cpu_short

    rng = fresh_rng()
    logits, targets = make_case(rng, (70, n_cols), dtype, n_ignored=4)
    logits = with_specials(rng, logits)
    targets[6] = n_cols + 3  # unchecked: a NaN row
    for opts in (
        {},
        {"label_smoothing": 0.1, "weight": "random", "z_loss": 1e-3},
        {"softcap": 5.0},
        OPTION_SETS["everything"],
    ):
        opts = resolve(opts, rng, n_cols)
        results = []
        for short, tiny in ((_cpu_short.SHORT_COLS, _cpu_short.TINY_COLS), (0, 0)):
            monkeypatch.setattr(_cpu_short, "SHORT_COLS", short)
            monkeypatch.setattr(_cpu_short, "TINY_COLS", tiny)
            loss, grad = nx.cross_entropy_with_grad(logits, targets, reduction="none", validate=False, **opts)
            results.append((loss.astype(np.float64), grad.astype(np.float64)))
        (got_loss, got_grad), (want_loss, want_grad) = results
        msg = f"V={n_cols} {sorted(opts)}"
        rtol = {8: 1e-13, 4: 1e-5}.get(np.dtype(dtype).itemsize, 2.0**-7 if dtype != np.float16 else 2.0**-10)
        for got, want in ((got_loss, want_loss), (got_grad, want_grad)):
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=msg)
            np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=msg)
            np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=msg)
            fin = np.isfinite(want)
            atol = rtol * np.max(np.abs(want[fin]), initial=0.0)
            np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=atol, err_msg=msg)


@pytest.mark.parametrize("n_cols", short_lengths())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_short_rows_give_the_same_bits_every_way(dtype, n_cols):
    """A short row's loss and gradient are the same bits alone or fused, in place or not, on
    one thread or all, and wherever the row falls in the batch (which tiny group, which lane,
    a last group short of full)."""
    rng = fresh_rng()
    logits, targets = make_case(rng, (3 * 64 + 5, n_cols), dtype, n_ignored=3)
    logits = with_specials(rng, logits)
    for opts in ({}, resolve(OPTION_SETS["everything"], rng, n_cols), {"softcap": 2.0, "label_smoothing": 0.2}):
        msg = f"V={n_cols} {sorted(opts)}"
        alone = nx.cross_entropy(logits, targets, reduction="none", **opts)
        fused, grad = nx.cross_entropy_with_grad(logits, targets, reduction="none", **opts)
        assert_same_loss(alone, fused, msg)
        x = logits.copy()
        in_place, _ = nx.cross_entropy_with_grad(x, targets, reduction="none", out=x, **opts)
        np.testing.assert_array_equal(in_place.view(np.uint8), fused.view(np.uint8), err_msg=msg)
        np.testing.assert_array_equal(x.view(np.uint8), grad.view(np.uint8), err_msg=msg)
        shift = int(rng.integers(1, 64))
        part, part_grad = nx.cross_entropy_with_grad(logits[shift:], targets[shift:], reduction="none", **opts)
        assert_same_bits(part, fused[shift:], msg)
        assert_same_bits(part_grad, grad[shift:], msg)
        one, one_grad = nx.cross_entropy_with_grad(logits[7:8], targets[7:8], reduction="none", **opts)
        assert_same_bits(one, fused[7:8], msg)
        assert_same_bits(one_grad, grad[7:8], msg)
        original = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            serial, serial_grad = nx.cross_entropy_with_grad(logits, targets, reduction="none", **opts)
        finally:
            numba.set_num_threads(original)
        np.testing.assert_array_equal(serial.view(np.uint8), fused.view(np.uint8), err_msg=msg)
        np.testing.assert_array_equal(serial_grad.view(np.uint8), grad.view(np.uint8), err_msg=msg)


NORMALIZATIONS = {"logsumexp": nx.logsumexp, "softmax": nx.softmax, "log_softmax": nx.log_softmax}


@pytest.mark.parametrize("n_cols", short_lengths())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_short_rows_normalized(dtype, n_cols, monkeypatch):
    """``logsumexp``, softmax and log-softmax of short rows: the float64 reference on finite
    rows; on special values the block kernels' NaNs and infinities (an all ``-inf`` row has lse
    ``-inf``, a ``+inf`` one ``+inf``, their softmax NaN) and their numbers to rounding; the
    same bits in place and out, on one thread or all, wherever a row falls in the batch."""
    from nbxent import _cpu_short

    rng = fresh_rng()
    x = (rng.standard_normal((2 * 64 + 7, n_cols)) * 4).astype(dtype)
    x64 = x.astype(np.float64)
    rtol = {8: 1e-12, 4: 2e-6}.get(np.dtype(dtype).itemsize, 2.0**-7 if dtype != np.float16 else 2.0**-10)
    lse_tol = 1e-12 if dtype == np.float64 else 2e-6  # absolute too: an lse near 0 is m + log s
    np.testing.assert_allclose(nx.logsumexp(x), ref.logsumexp(x64), rtol=lse_tol, atol=lse_tol)
    np.testing.assert_allclose(nx.softmax(x).astype(np.float64), ref.softmax(x64), atol=rtol)
    np.testing.assert_allclose(nx.log_softmax(x).astype(np.float64), ref.log_softmax(x64), rtol=rtol, atol=rtol * 10)
    x = with_specials(rng, x)
    for name, fn in NORMALIZATIONS.items():
        msg = f"{name} V={n_cols}"
        got = fn(x)
        with monkeypatch.context() as patch:
            patch.setattr(_cpu_short, "SHORT_COLS", 0)
            patch.setattr(_cpu_short, "TINY_COLS", 0)
            want = fn(x)
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        np.testing.assert_array_equal(np.isnan(got64), np.isnan(want64), err_msg=msg)
        np.testing.assert_array_equal(np.isinf(got64), np.isinf(want64), err_msg=msg)
        fin = np.isfinite(want64)
        np.testing.assert_allclose(got64[fin], want64[fin], rtol=rtol, atol=rtol * 10, err_msg=msg)
        shift = int(rng.integers(1, 64))
        assert_same_bits(fn(x[shift:]), got[shift:], msg)
        assert_same_bits(fn(x[7:8]), got[7:8], msg)
        original = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            assert_same_bits(fn(x), got, msg)
        finally:
            numba.set_num_threads(original)
        if name != "logsumexp":
            y = x.copy()
            assert fn(y, out=y) is y
            np.testing.assert_array_equal(y.view(np.uint8), got.view(np.uint8), err_msg=msg)
    lse = nx.logsumexp(x)
    assert lse[1] == -np.inf and lse[3] == np.inf and np.isnan(lse[2])
    assert np.all(np.isnan(nx.softmax(x)[1].astype(np.float32)))


@pytest.mark.parametrize("n_cols", [3000, 32000])
def test_confident_rows_keep_their_small_loss(n_cols):
    """A target logit far above the rest (a confident prediction) leaves a loss near 0, the
    difference of log s and x_t - m when the reference max m comes from logits before the
    target (``_cpu.row_stats``). The float32 loss stays within 3e-6 of the float64 one (the
    seventeenth session measured at most 1.7e-6 over 64 such rows, where PyTorch's float32
    ``cross_entropy`` was off by up to 5.5e-5 at V = 32000: its sum of exps, 1 and many
    terms below 1e-8, drops them in the accumulator lane that holds the 1). Loss alone and
    fused, split over threads or not."""
    rng = fresh_rng()
    n_rows = 16
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    t = rng.integers(100, n_cols, n_rows)
    x[np.arange(n_rows), t] = rng.uniform(14.0, 22.0, n_rows)  # losses 1e-5 to 0.05
    want = ref.cross_entropy(x.astype(np.float64), t, reduction="none")[0]
    for rows in (slice(None), slice(0, 1)):  # one row: split over threads
        got = [nx.cross_entropy(x[rows], t[rows], reduction="none")]
        got.append(nx.cross_entropy_with_grad(x[rows], t[rows], reduction="none")[0])
        for loss in got:
            err = np.abs(loss.astype(np.float64) - want[rows])
            assert err.max() < 3e-6, (err.max(), want[rows][np.argmax(err)])


@pytest.mark.parametrize("n_cols", [1, 5, 45, 4005])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_logsumexp_of_special_rows_is_torchs(dtype, n_cols):
    """``torch.logsumexp``: NaN for a row holding a NaN (beside ``+inf`` or masked entries too),
    ``+inf`` for a row holding ``+inf``, ``-inf`` for a row of all ``-inf``; for every kernel
    (tiny, short, block rows). Until the sixteenth session a float64 row [NaN] (or NaN and
    ``-inf`` alone) got ``-inf``: its max skipped the NaN, and an infinite max was the lse."""
    x = np.zeros((5, n_cols), np.float64)
    x[0, 0] = np.nan
    x[1, -1] = np.inf
    x[2] = -np.inf
    x[3] = -np.inf
    x[3, -1] = np.nan
    x[4, -1] = np.nan
    x[4, 0] = np.inf
    want = [np.nan, np.inf, -np.inf, np.nan, np.nan] if n_cols > 1 else [np.nan, np.inf, -np.inf, np.nan, np.inf]
    np.testing.assert_array_equal(nx.logsumexp(x.astype(dtype)), want)


@pytest.mark.parametrize("n_cols", [3, 3000])  # a tiny-row kernel and the block kernels
def test_infinite_results_raise_no_numpy_warning(n_cols):
    """NaN and inf results come silently, as PyTorch gives them (warnings are errors here):
    row losses of +inf and -inf summed, a sum beyond float32, grad_output and weights beyond
    float32, weights of inf and -inf in the mean's divisor. NumPy's sum and casts warned."""
    x = np.zeros((4, n_cols), np.float32)
    x[0, 2] = x[1, 1] = -np.inf  # each row's target masked: a loss of +inf
    t = np.array([2, 1, 2, 1])
    w = np.ones(n_cols)
    w[1] = -1.0  # row 1's loss -inf
    assert np.isnan(nx.cross_entropy(x, t, weight=w, reduction="sum"))
    big = np.zeros((4, n_cols), np.float32)
    big[:, 0], big[:, 1] = 2e38, -1e38  # each row's loss 3e38, their sum beyond float32
    assert nx.cross_entropy(big, np.ones(4, np.int64), reduction="sum") == np.inf
    ok = fresh_rng().standard_normal((4, n_cols)).astype(np.float32)
    t = np.array([2, 1, 2, 1])
    for go in (1e300, -1e300):  # grad_output beyond float32: its infinity
        g = nx.cross_entropy_backward(ok, t, go, reduction="sum")
        np.testing.assert_array_equal(g, nx.cross_entropy_backward(ok, t, np.copysign(np.inf, go), reduction="sum"))
    g = nx.cross_entropy_backward(ok, t, np.full(4, 1e300), reduction="none")
    np.testing.assert_array_equal(g, nx.cross_entropy_backward(ok, t, np.full(4, np.inf), reduction="none"))
    w = np.ones(n_cols)
    w[2] = 1e300  # a weight beyond float32: its infinity
    inf_w = w.copy()
    inf_w[2] = np.inf
    np.testing.assert_array_equal(
        nx.cross_entropy(ok, t, weight=w, reduction="none"), nx.cross_entropy(ok, t, weight=inf_w, reduction="none")
    )
    w[[1, 2]] = [-np.inf, np.inf]  # the mean's divisor inf - inf
    assert np.isnan(nx.cross_entropy(ok, t, weight=w))


def test_pairwise_total_is_an_accurate_fixed_order_sum():
    """The reduced loss's sum: within pairwise summation's error of the exact sum, at every
    length around its block and level boundaries, and 0 for nothing."""
    from nbxent._cpu import pairwise_total

    rng = fresh_rng()
    assert pairwise_total(np.zeros(0, np.float32)) == 0.0
    for n in [1, 7, 8, 9, 127, 128, 129, 255, 256, 257, 383, 1000, 4097, 100_003]:
        for dtype in (np.float32, np.float64):
            a = (rng.standard_normal(n) * 10 ** rng.uniform(-3, 3, n)).astype(dtype)
            exact = math.fsum(a.astype(np.float64))
            bound = 4 * math.log2(n + 1) * np.finfo(np.float64).eps * np.abs(a.astype(np.float64)).sum()
            assert abs(pairwise_total(a) - exact) <= bound
            assert pairwise_total(a) == pairwise_total(a.copy())
