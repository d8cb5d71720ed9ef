"""Property tests: hypothesis draws shapes, values and options; the float64 reference decides."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nbxent as nx
from tests import reference as ref


@st.composite
def problems(draw):
    n_rows = draw(st.integers(0, 6))
    n_classes = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    elements = st.floats(-50, 50, width=32)
    logits = draw(hnp.arrays(dtype, (n_rows, n_classes), elements=elements))
    ignore_index = draw(st.sampled_from([-100, 0, n_classes - 1]))
    targets = draw(hnp.arrays(np.int64, (n_rows,), elements=st.integers(0, n_classes - 1) | st.just(ignore_index)))
    options = {
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "ignore_index": ignore_index,
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0, 1)),
        "z_loss": draw(st.sampled_from([0.0, 1e-4])),
        "softcap": draw(st.none() | st.floats(0.5, 50)),
    }
    if draw(st.booleans()):
        # float32 logits take float32 weights: keep them clear of float32 underflow
        weights = st.just(0.0) | st.floats(1e-3, 3.0)
        options["weight"] = draw(hnp.arrays(np.float64, (n_classes,), elements=weights))
    return logits, targets, options


@settings(max_examples=150, deadline=None)
@given(problems())
def test_loss_and_gradient_match_reference(problem):
    logits, targets, options = problem
    want_loss, want_grad = ref.cross_entropy(logits, targets, **options)
    loss, grad = nx.cross_entropy_with_grad(logits, targets, **options)
    exact = logits.dtype == np.float64
    tol = 1e-10 if exact else 2e-5
    loss_size = np.max(np.abs(np.nan_to_num(want_loss)), initial=0)
    grad_size = np.max(np.abs(np.nan_to_num(want_grad)), initial=0)
    # A 'mean' over a zero weight sum divides by 0: the result is +-inf or NaN by the sign of
    # each numerator, and a float32 numerator may underflow to 0 where the float64 one does
    # not (label_smoothing=1e-311); nbxent only promises non-finite there.
    if options["reduction"] == "mean" and not np.isfinite(want_loss):
        assert not np.isfinite(loss)
    else:
        np.testing.assert_allclose(loss, want_loss, rtol=tol, atol=tol * (1 + loss_size))
    finite = np.isfinite(want_grad)
    assert not np.any(np.isfinite(grad[~finite]))
    np.testing.assert_allclose(grad[finite], want_grad[finite], rtol=0, atol=tol * max(1.0, grad_size))


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40),
        elements=st.floats(-1e4, 1e4, width=32),
    )
)
def test_softmax_is_a_distribution_and_consistent_with_logsumexp(x):
    p = nx.softmax(x)
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=-1), 1, rtol=1e-5)
    lse = nx.logsumexp(x)
    np.testing.assert_allclose(lse, ref.logsumexp(x), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(nx.log_softmax(x), x - lse[..., None], rtol=1e-5, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.floats(-1e5, 1e5))
def test_loss_is_shift_invariant(n_classes, shift):
    rng = np.random.default_rng(n_classes)
    x = rng.standard_normal((3, n_classes))
    t = rng.integers(0, n_classes, 3)
    np.testing.assert_allclose(nx.cross_entropy(x + shift, t), nx.cross_entropy(x, t), rtol=1e-8, atol=1e-8)


@st.composite
def weights_no_kept_row_reads(draw):
    """Weighted problems without smoothing where every class no kept row targets may have any
    weight (inf, -inf, NaN, negative, 0, beyond float32) and masked logits (-inf) lie anywhere
    but on the targets: PyTorch reads the kept rows' target weights alone."""
    n_rows = draw(st.integers(1, 6))
    n_classes = draw(st.integers(2, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    logits = draw(hnp.arrays(dtype, (n_rows, n_classes), elements=st.floats(-30, 30, width=32)))
    ignore_index = draw(st.sampled_from([-100, 0]))
    targets = draw(hnp.arrays(np.int64, (n_rows,), elements=st.integers(0, n_classes - 1) | st.just(ignore_index)))
    kept = set(targets[targets != ignore_index].tolist())
    any_weight = st.sampled_from([np.inf, -np.inf, np.nan, -1.0, 0.0, 1e300]) | st.floats(0.1, 3.0)
    weight = np.array([draw(st.floats(0.1, 3.0) if j in kept else any_weight) for j in range(n_classes)])
    masked = draw(hnp.arrays(np.bool_, (n_rows, n_classes)))
    masked[np.arange(n_rows), np.clip(targets, 0, None)] = False
    logits[masked] = -np.inf
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return logits, targets, {"reduction": reduction, "ignore_index": ignore_index, "weight": weight}


@settings(max_examples=100, deadline=None)
@given(weights_no_kept_row_reads())
def test_weights_no_kept_row_targets_are_never_read(problem):
    logits, targets, options = problem
    want_loss, want_grad = ref.cross_entropy(logits, targets, **options)
    loss, grad = nx.cross_entropy_with_grad(logits, targets, **options)  # (warnings are errors here)
    tol = 1e-10 if logits.dtype == np.float64 else 2e-5
    if options["reduction"] == "mean" and not (targets != options["ignore_index"]).any():
        assert np.isnan(loss) and not grad.any()  # a mean over nothing
        return
    assert np.isfinite(want_loss).all() and np.isfinite(want_grad).all()
    np.testing.assert_allclose(loss, want_loss, rtol=tol, atol=tol * (1 + np.abs(want_loss).max()))
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=tol * max(1.0, np.abs(want_grad).max()))
