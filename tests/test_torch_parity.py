"""Parity with PyTorch's F.cross_entropy and its autograd gradient (skipped without torch).

PyTorch runs in float64 on the same (rounded) inputs, so the comparison measures nbxent's
own float32 error, not the difference of two float32 roundings.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import nbxent as nx
from tests import reference
from tests.seeds import fresh_rng

torch = pytest.importorskip("torch")
F = torch.nn.functional
ml_dtypes = pytest.importorskip("ml_dtypes")


def torch_cross_entropy(logits, targets, *, reduction, ignore_index, label_smoothing, weight, grad_output):
    x = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    v = x.shape[-1]
    loss = F.cross_entropy(
        x.reshape(-1, v),
        torch.tensor(np.asarray(targets, dtype=np.int64).reshape(-1)),
        weight=None if weight is None else torch.tensor(weight, dtype=torch.float64),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if reduction == "none":
        loss = loss.reshape(np.shape(targets))
    loss.backward(torch.tensor(np.broadcast_to(grad_output, loss.shape), dtype=torch.float64))
    return loss.detach().numpy(), x.grad.numpy()


CASES = list(
    itertools.product(
        ["mean", "sum", "none"],
        [0.0, 0.1, 1.0],  # label smoothing
        [False, True],  # class weights
        [-100, 0],  # ignore_index: padding, or a valid class id
    )
)


@pytest.mark.parametrize("reduction,smoothing,weighted,ignore_index", CASES)
@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name
)
def test_matches_torch(reduction, smoothing, weighted, ignore_index, dtype):
    rng = fresh_rng()
    shape = (3, 5, 211)
    logits = (rng.standard_normal(shape) * 3).astype(dtype)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    targets[0, :2] = ignore_index
    weight = rng.uniform(0.1, 2.0, shape[-1]) if weighted else None
    grad_output = rng.uniform(0.5, 2.0, shape[:-1]) if reduction == "none" else 1.7
    opts = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing, weight=weight)
    want_loss, want_grad = torch_cross_entropy(logits.astype(np.float64), targets, grad_output=grad_output, **opts)
    loss, grad = nx.cross_entropy_with_grad(logits, targets, grad_output=grad_output, **opts)
    exact = dtype == np.float64
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12 if exact else 1e-5, atol=1e-12 if exact else 1e-6)
    grad_tol = {np.float64: 1e-12, np.float32: 1e-6}.get(dtype, 1e-2)
    np.testing.assert_allclose(grad.astype(np.float64), want_grad, atol=grad_tol * np.abs(want_grad).max())


@pytest.mark.parametrize("bad_weight", [np.nan, np.inf])
@pytest.mark.parametrize(
    "shape",
    [(9, 7), (9, 300), (9, 3000), (1, 140000)],  # tiny, short, block kernels, one row split over threads
)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_a_weight_no_kept_row_targets_is_never_read(bad_weight, shape, dtype):
    """Without smoothing PyTorch reads the weights of the kept rows' targets alone: a NaN or inf
    weight of a class that only ignored rows hold, or that no row holds (as ``1 / counts``
    gives a class never seen), changes nothing. On the CPU the mean's divisor once read class
    0's weight for every ignored row, times 0, and every kernel's gradient sweep took
    ``0 * w_j``: NaN, a NaN column, or all NaN."""
    rng = fresh_rng()
    n_rows, n_cols = shape
    logits = rng.standard_normal(shape).astype(dtype)
    for reduction, softcap, ignore_index in [("mean", None, -100), ("sum", 30.0, 3), ("none", None, 3)]:
        targets = rng.integers(4, n_cols, size=n_rows)
        if n_rows > 1:
            targets[[1, 5]] = ignore_index
        weight = rng.uniform(0.5, 1.5, n_cols)
        weight[[0, 3]] = bad_weight
        opts = dict(reduction=reduction, ignore_index=ignore_index, weight=weight, softcap=softcap)
        want_loss, want_grad = reference.cross_entropy(logits, targets, **opts)
        if softcap is None:  # the reference itself, against PyTorch
            torch_loss, torch_grad = torch_cross_entropy(
                logits, targets, grad_output=1.0, label_smoothing=0.0, **{k: opts[k] for k in opts if k != "softcap"}
            )
            np.testing.assert_allclose(want_loss, torch_loss, rtol=1e-12)
            np.testing.assert_allclose(want_grad, torch_grad, rtol=1e-10, atol=1e-14)
        assert np.isfinite(want_loss).all() and np.isfinite(want_grad).all()
        loss, grad = nx.cross_entropy_with_grad(logits, targets, **opts)
        tol = 1e-5 if dtype == np.float32 else 1e-2
        np.testing.assert_allclose(loss, want_loss, rtol=tol)
        np.testing.assert_allclose(grad.astype(np.float64), want_grad, atol=tol * np.abs(want_grad).max())
        np.testing.assert_allclose(nx.cross_entropy(logits, targets, **opts), want_loss, rtol=tol)


def test_matches_torch_on_special_values():
    rng = fresh_rng()
    logits = rng.standard_normal((5, 64)).astype(np.float32) * 3
    logits[0, :10] = -np.inf  # masked vocabulary
    logits[1] += 1e4
    logits[2] -= 1e4
    logits[3, 5] = np.nan
    targets = np.array([20, 1, 2, 3, 4])
    for smoothing in (0.0, 0.2):
        opts = dict(reduction="none", ignore_index=-100, label_smoothing=smoothing, weight=None)
        want_loss, want_grad = torch_cross_entropy(logits, targets, grad_output=1.0, **opts)
        loss, grad = nx.cross_entropy_with_grad(logits, targets, **opts)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)  # NaN where torch has NaN, inf where inf
        np.testing.assert_allclose(grad, want_grad, atol=1e-6)


def test_softmax_family_matches_torch():
    rng = fresh_rng()
    x = rng.standard_normal((4, 7, 300)).astype(np.float32) * 5
    x[0, 0, :3] = -np.inf
    t = torch.tensor(x.astype(np.float64))
    np.testing.assert_allclose(nx.logsumexp(x), torch.logsumexp(t, -1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(nx.softmax(x), torch.softmax(t, -1).numpy(), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(nx.log_softmax(x), torch.log_softmax(t, -1).numpy(), rtol=1e-6, atol=1e-5)
    full = np.full((2, 3), -np.inf, np.float32)
    np.testing.assert_array_equal(nx.logsumexp(full), torch.logsumexp(torch.tensor(full), -1).numpy())
