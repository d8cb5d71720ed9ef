"""Fused linear cross-entropy against the loss of the materialized logits.

Two independent judges, both in float64 on the same (rounded) inputs:

- the NumPy reference of ``tests/reference.py`` on ``hidden @ weight.T + bias``, carried to
  ``hidden``, ``weight`` and ``bias`` by the chain rule written out plainly (always runs);
- PyTorch's ``F.cross_entropy`` of the same expression and its autograd (skipped without torch).

The scratch through which grad_weight is accumulated is patched to a few rows for the whole
module, so the blocked accumulation runs with blocks that do not divide V.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nbxent as nx
from nbxent import linear
from nbxent.linear import linear_cross_entropy, linear_cross_entropy_with_grad
from tests import reference as ref
from tests.seeds import fresh_rng

N_HIDDEN, N_CLASSES = 6, 37
LEAD = (3, 5)  # 15 rows, as a 3-D hidden: chunk sizes 2 and 4 do not divide them
OPTION_SETS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "class_weight": {"class_weight": "random"},
    "class_weight+smooth": {"class_weight": "random", "label_smoothing": 0.25},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "ignore a class id": {"ignore_index": 2},
    "everything": {"class_weight": "random", "label_smoothing": 0.05, "z_loss": 1e-2, "softcap": 5.0},
}
TOL = {np.float64: 1e-10, np.float32: 1e-4}  # float32: the target, 1e-4 relative
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIMULATED:  # the child process of test_gpu_path_under_the_cuda_simulator
    from tests.cudasim import one_shared_array_per_block

    one_shared_array_per_block()


@pytest.fixture(autouse=True)
def small_scratch(monkeypatch):
    """grad_weight accumulates through blocks of 7 rows (float64) or 14 (float32) of V = 37."""
    monkeypatch.setattr(linear, "SCRATCH_BYTES", 7 * N_HIDDEN * 8)


def make_problem(rng, lead, dtype, *, n_hidden=N_HIDDEN, n_classes=N_CLASSES, bias=True, ignore_index=-100):
    """Hidden states, a head, a bias and targets with a few rows ignored, rounded to dtype."""
    hidden = rng.standard_normal((*lead, n_hidden)).astype(dtype)
    weight = (rng.standard_normal((n_classes, n_hidden)) / np.sqrt(n_hidden) * 2).astype(dtype)
    b = rng.standard_normal(n_classes).astype(dtype) if bias else None
    targets = rng.integers(0, n_classes, size=lead)
    flat = targets.reshape(-1)
    if flat.size > 2:
        flat[rng.choice(flat.size, size=2, replace=False)] = ignore_index
    return hidden, weight, b, targets


def resolve(options, rng):
    opts = dict(options)
    if opts.get("class_weight") == "random":
        opts["class_weight"] = rng.uniform(0.2, 2.0, N_CLASSES)
    return opts


def reference_logit_grad(hidden, weight, targets, *, bias=None, grad_output=1.0, class_weight=None, **opts):
    """(loss, gradient of the (N, V) logits, hidden as (N, H), weight) in float64, from the
    reference of ``tests/reference.py`` on ``logits = hidden @ weight.T + bias``."""
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    logits = h @ w.T
    if bias is not None:
        logits = logits + np.asarray(bias, dtype=np.float64)
    loss, grad_logits = ref.cross_entropy(logits, targets, weight=class_weight, grad_output=grad_output, **opts)
    return loss, grad_logits.reshape(-1, w.shape[0]), h.reshape(-1, w.shape[1]), w


def reference(hidden, weight, targets, **opts):
    """(loss, grad_hidden, grad_weight, grad_bias) in float64: the chain rule through
    ``logits = hidden @ weight.T + bias``, written out."""
    loss, g, h, w = reference_logit_grad(hidden, weight, targets, **opts)
    return loss, (g @ w).reshape(np.shape(hidden)), g.T @ h, g.sum(axis=0)


def term_sizes(hidden, weight, targets, *, bias=None, grad_output=1.0, class_weight=None, **opts):
    """The sizes of the terms each gradient entry sums: rounding error is relative to them, not
    to a sum that may cancel to 0.

    An entry of the logits' gradient is a sum of terms no larger than
    ``|scale_i| * max(w) * (2 + 2 z |lse_i|) * (p_ij + [j == t_i] + 1 / V)`` (the formula in
    ``_cpu.xent_row``); the chain rule then sums those over ``|W|``, ``|h|`` or the rows.
    """
    h = np.asarray(hidden, dtype=np.float64).reshape(-1, np.shape(weight)[1])
    w = np.asarray(weight, dtype=np.float64)
    logits = h @ w.T + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))
    xc = ref.capped(logits, opts.get("softcap"))
    t = np.asarray(targets).reshape(-1)
    kept = t != opts.get("ignore_index", -100)
    cw = np.ones(w.shape[0]) if class_weight is None else np.asarray(class_weight, dtype=np.float64)
    scale = np.abs(np.broadcast_to(np.asarray(grad_output, dtype=np.float64), np.shape(targets))).reshape(-1)
    if opts.get("reduction", "mean") == "mean":
        scale = scale / max(np.sum(cw[np.where(kept, t, 0)] * kept), 1e-300)
    row = np.where(kept, scale * cw.max() * (2 + 2 * opts.get("z_loss", 0.0) * np.abs(ref.logsumexp(xc))), 0.0)
    onehot = np.zeros_like(logits)
    onehot[np.flatnonzero(kept), t[kept]] = 1.0
    g = row[:, None] * (ref.softmax(xc) + onehot + 1.0 / w.shape[0])
    return finite_max(g @ np.abs(w)), finite_max(g.T @ np.abs(h)), finite_max(g.sum(axis=0))


def torch_reference(hidden, weight, targets, *, bias=None, grad_output=1.0, class_weight=None, **opts):
    """The same four results from PyTorch autograd in float64. PyTorch has no z-loss: it is
    added per row as ``z * w_t * lse**2`` and reduced like the cross-entropy itself."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    reduction = opts.get("reduction", "mean")
    ignore_index = opts.get("ignore_index", -100)
    z_loss, softcap = opts.get("z_loss", 0.0), opts.get("softcap")
    h = torch.tensor(np.asarray(hidden, dtype=np.float64), requires_grad=True)
    w = torch.tensor(np.asarray(weight, dtype=np.float64), requires_grad=True)
    b = None if bias is None else torch.tensor(np.asarray(bias, dtype=np.float64), requires_grad=True)
    logits = h.reshape(-1, w.shape[1]) @ w.T
    if b is not None:
        logits = logits + b
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    t = torch.tensor(np.asarray(targets, dtype=np.int64).reshape(-1))
    cw = None if class_weight is None else torch.tensor(np.asarray(class_weight, dtype=np.float64))
    kwargs = {"weight": cw, "ignore_index": ignore_index, "label_smoothing": opts.get("label_smoothing", 0.0)}
    if z_loss == 0.0:
        loss = F.cross_entropy(logits, t, reduction=reduction, **kwargs)
    else:
        rows = F.cross_entropy(logits, t, reduction="none", **kwargs)
        kept = (t != ignore_index).to(torch.float64)
        w_t = kept if cw is None else cw[torch.where(t == ignore_index, 0, t)] * kept
        rows = rows + z_loss * w_t * torch.logsumexp(logits, dim=-1) ** 2
        loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / w_t.sum()}[reduction]
    if reduction == "none":
        loss = loss.reshape(np.shape(targets))
    loss.backward(torch.tensor(np.broadcast_to(grad_output, loss.shape), dtype=torch.float64))
    grad_bias = None if b is None else b.grad.numpy()
    return loss.detach().numpy(), h.grad.numpy(), w.grad.numpy(), grad_bias


def assert_close(actual, expected, tol, size=None):
    """Equal to ``tol`` relative to ``size`` (by default the largest entry of ``expected``),
    and NaN exactly where ``expected`` is NaN. Values below the smallest normal number of
    ``actual``'s dtype may have underflowed to 0, and count as equal to it."""
    expected = np.asarray(expected, dtype=np.float64)
    size = finite_max(expected) if size is None else size
    actual = np.asarray(actual)
    underflow = np.finfo(actual.dtype).smallest_normal if actual.dtype.kind == "f" else 0.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * size + underflow)


def finite_max(x) -> float:
    """The largest magnitude among the finite entries of ``x`` (0 when there are none)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    return float(np.max(x[np.isfinite(x)], initial=0.0))


def check(judge, hidden, weight, targets, *, bias=None, chunk_size=None, grad_output=1.0, **opts):
    """Compare loss and every gradient (and the loss-only function) with ``judge``."""
    tol = TOL[hidden.dtype.type]
    results = linear_cross_entropy_with_grad(
        hidden, weight, targets, bias=bias, chunk_size=chunk_size, grad_output=grad_output, **opts
    )
    assert len(results) == (3 if bias is None else 4)
    loss, grad_hidden, grad_weight = results[:3]
    want = judge(hidden, weight, targets, bias=bias, grad_output=grad_output, **opts)
    assert_close(loss, want[0], tol)
    assert np.asarray(loss).dtype == hidden.dtype
    assert np.shape(loss) == (np.shape(targets) if opts.get("reduction") == "none" else ())
    sizes = term_sizes(hidden, weight, targets, bias=bias, grad_output=grad_output, **opts)
    for got, expected, like, size in zip(results[1:], want[1:], (hidden, weight, bias), sizes, strict=False):
        assert got.shape == like.shape and got.dtype == like.dtype
        assert_close(got, expected, tol, size)
    loss_only = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size, **opts)
    assert_close(loss_only, loss, 1e-6 if hidden.dtype == np.float32 else 1e-13)
    return results


JUDGES = {"numpy": reference, "torch": torch_reference}


@pytest.mark.parametrize("judge", JUDGES.values(), ids=JUDGES.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 15, 100])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_matches_materialized_logits(judge, dtype, chunk_size, with_bias, reduction, options):
    rng = fresh_rng()
    opts = resolve(options, rng)
    hidden, weight, bias, targets = make_problem(
        rng, LEAD, dtype, bias=with_bias, ignore_index=opts.get("ignore_index", -100)
    )
    grad_output = rng.uniform(0.5, 2.0, LEAD) if reduction == "none" else 1.7
    check(
        judge,
        hidden,
        weight,
        targets,
        bias=bias,
        chunk_size=chunk_size,
        grad_output=grad_output,
        reduction=reduction,
        **opts,
    )


@pytest.mark.parametrize("judge", JUDGES.values(), ids=JUDGES.keys())
@pytest.mark.parametrize("grad_output", [2.5, np.float32(0.5), "per row"])
def test_grad_output_scalar_or_per_row_for_none(judge, grad_output):
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, LEAD, np.float64)
    go = rng.standard_normal(LEAD) if isinstance(grad_output, str) else grad_output
    check(judge, hidden, weight, targets, bias=bias, chunk_size=4, grad_output=go, reduction="none")
    if not isinstance(grad_output, str):
        check(judge, hidden, weight, targets, bias=bias, chunk_size=4, grad_output=go, reduction="mean")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_default_chunks_from_the_memory_budget(monkeypatch, dtype):
    """With the budget at 3 rows of logits, the default chunking runs 5 chunks of 15 rows."""
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, LEAD, dtype)
    monkeypatch.setattr(linear, "CHUNK_BYTES", 3 * N_CLASSES * np.dtype(dtype).itemsize)
    check(reference, hidden, weight, targets, bias=bias, label_smoothing=0.1, class_weight=rng.uniform(0.5, 2, 37))


@pytest.mark.parametrize("lead", [(), (1,), (40,), (2, 3, 4)], ids=str)
def test_any_number_of_leading_axes(lead):
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, lead, np.float64)
    for reduction in ("mean", "none"):
        check(reference, hidden, weight, targets, bias=bias, chunk_size=3, reduction=reduction)


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(lead, reduction):
    """No rows: 'mean' is NaN (0/0, like PyTorch), 'sum' is 0, and every gradient is zero."""
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, lead, np.float32)
    loss, grad_hidden, grad_weight, grad_bias = check(
        reference, hidden, weight, targets, bias=bias, reduction=reduction
    )
    if reduction == "mean":
        assert np.isnan(loss)
    assert grad_hidden.shape == hidden.shape
    assert not grad_weight.any() and not grad_bias.any()


@pytest.mark.parametrize("judge", JUDGES.values(), ids=JUDGES.keys())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(judge, reduction):
    """The mean over no rows is NaN, but no NaN reaches the gradients: they are all zero."""
    rng = fresh_rng()
    hidden, weight, bias, _ = make_problem(rng, LEAD, np.float32)
    targets = np.full(LEAD, -100)
    loss, *grads = check(judge, hidden, weight, targets, bias=bias, chunk_size=4, reduction=reduction)
    assert np.isnan(loss) if reduction == "mean" else not np.any(loss)
    assert not any(g.any() for g in grads)


def test_equals_cross_entropy_of_the_product():
    """The same numbers as the public cross_entropy of the materialized logits, bit for bit
    in the loss rows when the chunk is the whole batch (one matrix product, one kernel call)."""
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, (64,), np.float32, n_classes=300)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0, "reduction": "none"}
    logits = hidden @ weight.T + bias
    np.testing.assert_array_equal(
        linear_cross_entropy(hidden, weight, targets, bias=bias, **opts), nx.cross_entropy(logits, targets, **opts)
    )
    # and the reduced loss too: the same fixed-order sum of those rows (float64 and more than
    # 128 rows, where NumPy's sum, which this path once used, orders them differently)
    for _ in range(20):  # a last-bit difference shows in about 1 draw of 10
        hidden64, weight64, bias64, targets64 = make_problem(rng, (1000,), np.float64, n_classes=37)
        logits64 = hidden64 @ weight64.T + bias64
        for reduction in ("sum", "mean"):
            want = nx.cross_entropy(logits64, targets64, reduction=reduction)
            got = linear_cross_entropy(hidden64, weight64, targets64, bias=bias64, chunk_size=1000, reduction=reduction)
            assert got == want and got.dtype == want.dtype
    loss, grad_logits = nx.cross_entropy_with_grad(logits, targets, label_smoothing=0.1)
    got = linear_cross_entropy_with_grad(hidden, weight, targets, bias=bias, chunk_size=7, label_smoothing=0.1)
    assert_close(got[0], loss, 1e-6)
    assert_close(got[2], grad_logits.T @ hidden, 1e-5)


def test_inputs_are_left_untouched():
    rng = fresh_rng()
    arrays = make_problem(rng, LEAD, np.float32)
    before = [a.copy() for a in arrays]
    linear_cross_entropy_with_grad(*arrays[:2], arrays[3], bias=arrays[2], chunk_size=4)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_inputs():
    """A next-token shift of hidden (a row-strided view) and a transposed (H, V) head."""
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, (3, 9), np.float64)
    head_t = np.ascontiguousarray(weight.T)  # stored as (H, V), passed as its (V, H) transpose
    check(reference, hidden[:, :-1], head_t.T, targets[:, 1:], bias=bias, chunk_size=5)
    check(reference, hidden[:, ::2], weight[::-1], targets[:, ::2], chunk_size=5)


def test_unvalidated_bad_target_gives_a_nan_row():
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, (5,), np.float32)
    targets[1] = N_CLASSES + 5
    loss = linear_cross_entropy(hidden, weight, targets, reduction="none", validate=False, chunk_size=2)
    assert np.isnan(loss[1]) and np.isfinite(np.delete(loss, 1)).all()


def test_never_holds_the_full_logits():
    """NumPy reports its allocations to tracemalloc: the chunked call's peak is one chunk of
    logits, the scratch and the gradients; the materialized call's is at least all logits."""
    rng = fresh_rng()
    n_rows, n_hidden, n_classes, chunk = 512, 8, 2000, 16
    hidden, weight, bias, targets = make_problem(rng, (n_rows,), np.float64, n_hidden=n_hidden, n_classes=n_classes)
    item = 8
    full_logits = n_rows * n_classes * item
    budget = (chunk * n_classes + n_rows * n_hidden + 2 * n_classes * n_hidden + 2 * n_classes) * item
    linear_cross_entropy_with_grad(hidden, weight, targets, bias=bias, chunk_size=chunk)  # warm-up

    def peak(fn):
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    chunked = peak(lambda: linear_cross_entropy_with_grad(hidden, weight, targets, bias=bias, chunk_size=chunk))
    materialized = peak(lambda: nx.cross_entropy_with_grad(hidden @ weight.T + bias, targets))
    assert chunked < budget + 64 * 1024 < full_logits / 4
    assert materialized >= full_logits


# ---------------------------------------------------------------------------------------------
# Properties


@st.composite
def problems(draw):
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=7))
    n_hidden = draw(st.integers(1, 6))
    n_classes = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    hidden = draw(hnp.arrays(dtype, (*lead, n_hidden), elements=st.floats(-4, 4, width=32)))
    weight = draw(hnp.arrays(dtype, (n_classes, n_hidden), elements=st.floats(-2, 2, width=32)))
    bias = draw(st.none() | hnp.arrays(dtype, (n_classes,), elements=st.floats(-3, 3, width=32)))
    ignore_index = draw(st.sampled_from([-100, 0, n_classes - 1]))
    targets = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, n_classes - 1) | st.just(ignore_index)))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    options = {
        "reduction": reduction,
        "ignore_index": ignore_index,
        "label_smoothing": draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1)),
        "z_loss": draw(st.sampled_from([0.0, 1e-3])),
        "softcap": draw(st.none() | st.floats(0.5, 50)),
        "chunk_size": draw(st.none() | st.integers(1, 9)),
        "bias": bias,
    }
    if draw(st.booleans()):  # positive weights: a zero weight sum makes 'mean' 0/0 by design
        options["class_weight"] = draw(hnp.arrays(np.float64, (n_classes,), elements=st.floats(0.1, 3.0)))
    # per-row factors representable in float32 (the kernels scale in the logits' precision)
    factors = st.just(0.0) | st.floats(1e-3, 2) | st.floats(-2, -1e-3)
    per_row = hnp.arrays(np.float64, lead, elements=factors)
    options["grad_output"] = draw(st.floats(0.1, 3.0) | per_row) if reduction == "none" else draw(st.floats(0.1, 3))
    return hidden, weight, targets, options


@settings(max_examples=150, deadline=None)
@given(problems())
def test_property_matches_reference(problem):
    hidden, weight, targets, options = problem
    want = reference(hidden, weight, targets, **{k: v for k, v in options.items() if k != "chunk_size"})
    results = linear_cross_entropy_with_grad(hidden, weight, targets, **options)
    tol = TOL[hidden.dtype.type]
    # a loss near 0 is compared to 1e-4 of the loss's natural size, that of its lse terms
    np.testing.assert_allclose(results[0], want[0], rtol=tol, atol=tol * (1 + finite_max(want[0])))
    sizes = term_sizes(hidden, weight, targets, **{k: v for k, v in options.items() if k != "chunk_size"})
    for got, expected, size in zip(results[1:], want[1:], sizes, strict=False):
        assert_close(got, expected, tol, size)


@settings(max_examples=50, deadline=None)
@given(problems(), st.integers(1, 9))
def test_property_chunking_does_not_change_the_loss_rows(problem, chunk_size):
    """Each row's loss depends only on its own logits, so any chunking gives the same rows up
    to the matrix product's rounding."""
    hidden, weight, targets, options = problem
    options = {k: v for k, v in options.items() if k not in ("grad_output", "chunk_size")} | {"reduction": "none"}
    a = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, **options)
    b = linear_cross_entropy(hidden, weight, targets, chunk_size=None, **options)
    assert_close(a, b, 1e-5 if hidden.dtype == np.float32 else 1e-12)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each raises before any work, naming what is wrong and how to fix it.


@pytest.fixture
def good():
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, (4,), np.float32)
    return hidden, weight, targets, bias


BOTH = [linear_cross_entropy, linear_cross_entropy_with_grad]


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("fn", BOTH)
def test_bad_hidden_weight_bias(fn, good):
    h, w, t, b = good
    raises(
        TypeError,
        r"hidden must be float32 or float64 \(NumPy has no 16-bit matrix product\), got float16; "
        r"convert with hidden.astype\(np.float32\)",
        fn,
        h.astype(np.float16),
        w.astype(np.float16),
        t,
    )
    raises(TypeError, "hidden must be float32 or float64, got int64", fn, h.astype(np.int64), w, t)
    raises(
        TypeError,
        r"weight has dtype float64 but hidden has float32; they must match: convert with "
        r"weight.astype\(np.float32\)",
        fn,
        h,
        w.astype(np.float64),
        t,
    )
    raises(TypeError, "bias has dtype float64 but hidden has float32", fn, h, w, t, bias=b.astype(np.float64))
    raises(TypeError, "hidden has dtype '>f4': big-endian float32", fn, h.astype(">f4"), w, t, bias=b)
    raises(TypeError, "weight has dtype '>f4': big-endian float32", fn, h, w.astype(">f4"), t, bias=b)
    raises(TypeError, "bias has dtype '>f4': big-endian float32", fn, h, w, t, bias=b.astype(">f4"))
    raises(ValueError, "hidden must have at least one axis", fn, np.float32(1.0), w, t)
    raises(
        ValueError,
        re.escape(f"weight has shape ({N_HIDDEN}, {N_CLASSES}) but must be (V, {N_HIDDEN})"),
        fn,
        h,
        np.ascontiguousarray(w.T),
        t,
    )
    raises(ValueError, re.escape("weight has shape (37,) but must be (V, 6)"), fn, h, w[:, 0], t)
    raises(ValueError, "weight has no rows; the vocabulary must have at least one class", fn, h, w[:0], t)
    raises(
        ValueError,
        re.escape("bias has shape (36,); it needs one entry per class, shape (37,)"),
        fn,
        h,
        w,
        t,
        bias=b[1:],
    )


@pytest.mark.parametrize("fn", BOTH)
def test_bad_targets(fn, good):
    h, w, t, _ = good
    raises(TypeError, "targets must have an integer dtype, got float64", fn, h, w, t.astype(np.float64))
    raises(
        ValueError,
        re.escape("targets have shape (3,) but logits of shape (4, 37) need targets of shape (4,)"),
        fn,
        h,
        w,
        t[:3],
    )
    bad = t.copy()
    bad[2] = 37
    raises(
        ValueError,
        re.escape("targets[2] = 37 is outside [0, 37); use ignore_index (now -100) for padding"),
        fn,
        h,
        w,
        bad,
    )
    raises(
        ValueError, re.escape("targets[1, 0] = -1 is outside"), fn, h.reshape(2, 2, -1), w, np.array([[0, 1], [-1, 2]])
    )


@pytest.mark.parametrize("fn", BOTH)
def test_bad_options(fn, good):
    h, w, t, _ = good
    raises(ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'avg'", fn, h, w, t, reduction="avg")
    raises(TypeError, "ignore_index must be an integer, got float", fn, h, w, t, ignore_index=1.5)
    raises(ValueError, "label_smoothing must be in", fn, h, w, t, label_smoothing=1.5)
    raises(ValueError, "z_loss must be >= 0", fn, h, w, t, z_loss=-1.0)
    raises(ValueError, "softcap must be a positive number", fn, h, w, t, softcap=0.0)
    raises(ValueError, "chunk_size must be at least 1 row", fn, h, w, t, chunk_size=0)
    raises(TypeError, "chunk_size must be an integer number of rows", fn, h, w, t, chunk_size=2.5)
    raises(TypeError, "chunk_size must be an integer number of rows", fn, h, w, t, chunk_size=True)
    raises(ValueError, "stream= applies to GPU arrays only", fn, h, w, t, stream=object())


@pytest.mark.parametrize("fn", BOTH)
def test_bad_class_weight_is_named_class_weight(fn, good):
    h, w, t, _ = good
    raises(
        ValueError,
        re.escape("class_weight has shape (36,); it needs one entry per class, shape (37,)"),
        fn,
        h,
        w,
        t,
        class_weight=np.ones(36),
    )
    raises(
        TypeError,
        "class_weight must hold real numbers, got complex128",
        fn,
        h,
        w,
        t,
        class_weight=np.ones(37, dtype=complex),
    )


def test_bad_grad_output(good):
    h, w, t, _ = good
    fn = linear_cross_entropy_with_grad
    raises(ValueError, "grad_output must be a scalar for reduction='mean'", fn, h, w, t, grad_output=np.ones(4))
    raises(
        ValueError,
        re.escape(
            "grad_output has shape (3,); for reduction='none' it must be a scalar or have the targets' shape (4,)"
        ),
        fn,
        h,
        w,
        t,
        grad_output=np.ones(3),
        reduction="none",
    )
    raises(
        TypeError, "grad_output must hold real numbers", fn, h, w, t, grad_output=np.ones(4, complex), reduction="none"
    )


class FakeGpuArray:
    """Just enough of a CUDA array for the device dispatch to see one."""

    def __init__(self, a):
        self.shape, self.dtype = a.shape, a.dtype

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}


@pytest.mark.parametrize("fn", BOTH)
def test_arrays_from_two_devices(fn, good):
    h, w, t, b = good
    raises(TypeError, "hidden is a NumPy .CPU. array but another argument is a GPU array", fn, h, FakeGpuArray(w), t)
    raises(TypeError, "another argument is a GPU array", fn, h, w, t, bias=FakeGpuArray(b))


def test_gpu_hidden_without_cupy(good):
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed: the GPU path is tested on a GPU")
    h, w, t, _ = good
    raises(RuntimeError, "through CuPy, which is not available", linear_cross_entropy, FakeGpuArray(h), w, t)


def test_failed_calls_leave_inputs_untouched(good):
    h, w, t, b = good
    before = [a.copy() for a in (h, w, t, b)]
    bad = t.copy()
    bad[3] = 99
    with pytest.raises(ValueError):
        linear_cross_entropy_with_grad(h, w, bad, bias=b)
    for a, c in zip((h, w, t, b), before, strict=True):
        np.testing.assert_array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# The GPU path under the Numba CUDA simulator. NUMBA_ENABLE_CUDASIM=1 must be set before
# numba.cuda is first imported, so these tests run in a fresh process that
# test_gpu_path_under_the_cuda_simulator starts. There, NumPy stands in for CuPy (the chunk
# buffer and its matrix products) and the fused kernel of each chunk is the CUDA backend's,
# run on simulated device copies of the chunk.

needs_simulator = pytest.mark.skipif(
    not SIMULATED, reason="runs in a NUMBA_ENABLE_CUDASIM=1 subprocess: see test_gpu_path_under_the_cuda_simulator"
)


def test_gpu_path_under_the_cuda_simulator():
    pytest.importorskip("numba.cuda")
    if SIMULATED:
        pytest.skip("already in the simulator process")
    n_tests = sum(1 for _ in _simulated_cases()) + 1
    repo = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "simulated_gpu"]
    done = subprocess.run(
        command, cwd=repo, env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}, capture_output=True, text=True, timeout=900
    )
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert re.search(rf"\b{n_tests} passed", done.stdout) and "skipped" not in done.stdout, report


class SimulatedGpu:
    """A backend whose ``xent`` runs the CUDA backend's on simulated device copies of NumPy
    arrays, and writes the gradient back into the NumPy chunk (the in-place contract)."""

    @staticmethod
    def xent(logits, targets, weight, opts, *, grad, grad_output, out, validate, stream):
        from numba import cuda

        from nbxent import _backend_cuda

        device_logits = cuda.to_device(logits)
        device_weight = None if weight is None else cuda.to_device(weight)
        device_go = cuda.to_device(grad_output) if np.ndim(grad_output) else grad_output
        loss, _ = _backend_cuda.xent(
            device_logits,
            cuda.to_device(targets),
            device_weight,
            opts,
            grad=grad,
            grad_output=device_go,
            out=device_logits if out is not None else None,
            validate=validate,
            stream=stream,
        )
        if out is not None:
            out[...] = device_logits.copy_to_host()
        return loss.copy_to_host(), out


@pytest.fixture
def simulated_gpu(monkeypatch):
    """Route the linear functions to ``SimulatedGpu`` with small launch tunables (16 threads a
    block, 2 "SMs"), so that even 37 classes take several row groups and blocks."""
    from nbxent import _cuda

    for name, value in {"THREADS": 16, "UNROLL": 2, "MIN_GROUP": 4, "BLOCKS_PER_SM": 1, "SIM_SM_COUNT": 2}.items():
        monkeypatch.setattr(_cuda, name, value)
    device = linear.Device(np, SimulatedGpu, np.asarray, contextlib.nullcontext())
    monkeypatch.setattr(linear, "_device", lambda hidden, others, stream: device)


def _simulated_cases():
    for (name, options), reduction in zip(OPTION_SETS.items(), ["mean", "sum", "none"] * 3, strict=False):
        yield pytest.param(options, reduction, id=f"{name}-{reduction}")


@needs_simulator
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # simulated threads warn on IEEE inf - inf
@pytest.mark.parametrize("options,reduction", _simulated_cases())
def test_simulated_gpu_matches_reference(simulated_gpu, options, reduction):
    rng = fresh_rng()
    opts = resolve(options, rng)
    hidden, weight, bias, targets = make_problem(
        rng, (6,), np.float32, n_hidden=5, bias=reduction != "sum", ignore_index=opts.get("ignore_index", -100)
    )
    grad_output = rng.uniform(0.5, 2.0, 6) if reduction == "none" else 1.7
    check(
        reference,
        hidden,
        weight,
        targets,
        bias=bias,
        chunk_size=4,
        grad_output=grad_output,
        reduction=reduction,
        **opts,
    )


@needs_simulator
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_simulated_gpu_float64_every_option(simulated_gpu):
    rng = fresh_rng()
    hidden, weight, bias, targets = make_problem(rng, (2, 3), np.float64, n_hidden=5)
    opts = resolve(OPTION_SETS["everything"], rng)
    check(reference, hidden, weight, targets, bias=bias, chunk_size=4, reduction="mean", **opts)
