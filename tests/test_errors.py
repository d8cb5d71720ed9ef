"""Every bad input raises a clear exception before any kernel runs, and leaves the inputs alone."""

from __future__ import annotations

import re

import numpy as np
import pytest

import nbxent as nx
from tests.seeds import fresh_rng

V = 10


@pytest.fixture
def case():
    rng = fresh_rng()
    return rng.standard_normal((4, V)).astype(np.float32), np.array([1, 2, 3, 4])


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


ALL_LOSSES = [nx.cross_entropy, nx.cross_entropy_with_grad, nx.cross_entropy_backward]


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_target_out_of_range_names_position_and_value(fn, case):
    logits, _ = case
    targets = np.array([[1, 2], [10, -1]])
    with pytest.raises(ValueError, match=re.escape("targets[1, 0] = 10 is outside [0, 10); use ignore_index")):
        fn(logits.reshape(2, 2, V), targets)
    raises(ValueError, re.escape("targets[3] = -1 is outside"), fn, logits, np.array([0, 1, 2, -1]))
    raises(ValueError, re.escape("targets[0] = 18446744073709551615"), fn, logits, np.full(4, 2**64 - 1, np.uint64))


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_bad_options(fn, case):
    logits, targets = case
    raises(
        ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'avg'", fn, logits, targets, reduction="avg"
    )
    raises(ValueError, r"label_smoothing must be in \[0, 1\]", fn, logits, targets, label_smoothing=1.5)
    raises(ValueError, r"label_smoothing must be in \[0, 1\]", fn, logits, targets, label_smoothing=-0.1)
    raises(ValueError, "label_smoothing must be finite", fn, logits, targets, label_smoothing=float("nan"))
    raises(ValueError, "z_loss must be >= 0", fn, logits, targets, z_loss=-1e-4)
    raises(ValueError, "softcap must be a positive number", fn, logits, targets, softcap=0.0)
    raises(ValueError, "softcap must be a positive number", fn, logits, targets, softcap=-3)
    raises(ValueError, "softcap must be finite", fn, logits, targets, softcap=float("inf"))
    raises(TypeError, "softcap must be a real number", fn, logits, targets, softcap="30")
    raises(TypeError, "ignore_index must be an integer", fn, logits, targets, ignore_index=1.5)
    raises(TypeError, "ignore_index must be an integer", fn, logits, targets, ignore_index=True)
    raises(ValueError, "ignore_index must fit in int64", fn, logits, targets, ignore_index=2**70)


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_remembered_options_are_checked_by_type_and_value(fn, case):
    """Validated options are remembered (``_checks.check_options``): a good value of one type
    does not let a bad one of another through (``True == 1``, ``1.0 == 1``), and options that
    cannot be remembered (arrays) get the same errors as without it."""
    logits, targets = case
    fn(logits, targets, ignore_index=1, label_smoothing=0.0)
    raises(TypeError, "ignore_index must be an integer, got bool", fn, logits, targets, ignore_index=True)
    raises(TypeError, "ignore_index must be an integer, got float", fn, logits, targets, ignore_index=1.0)
    fn(logits, targets, label_smoothing=np.float32(0.25))
    raises(
        TypeError,
        "label_smoothing must be a real number, got ndarray",
        fn,
        logits,
        targets,
        label_smoothing=np.array(0.25),
    )
    raises(TypeError, "softcap must be a real number, got list", fn, logits, targets, softcap=[3.0])
    raises(ValueError, r"label_smoothing must be in \[0, 1\]", fn, logits, targets, label_smoothing=1.5)
    raises(
        ValueError, r"label_smoothing must be in \[0, 1\]", fn, logits, targets, label_smoothing=1.5
    )  # not remembered


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_bad_arrays(fn, case):
    logits, targets = case
    raises(TypeError, "logits must be float16, bfloat16, float32 or float64, got int64", fn, targets[:, None], targets)
    raises(TypeError, "logits must be .* got complex64", fn, logits.astype(np.complex64), targets)
    raises(TypeError, "targets must have an integer dtype, got float32", fn, logits, targets.astype(np.float32))
    raises(TypeError, "targets must have an integer dtype, got bool", fn, logits, targets > 2)
    raises(ValueError, "at least one axis", fn, np.float32(1.0), np.int64(0))
    raises(ValueError, "empty vocabulary axis", fn, np.zeros((4, 0), np.float32), targets)
    raises(
        ValueError,
        r"targets have shape \(3,\) but logits of shape \(4, 10\) need targets of shape \(4,\)",
        fn,
        logits,
        targets[:3],
    )
    raises(ValueError, r"need targets of shape \(4,\)", fn, logits, targets[None])
    raises(
        ValueError,
        r"weight has shape \(9,\); it needs one entry per class, shape \(10,\)",
        fn,
        logits,
        targets,
        weight=np.ones(9),
    )
    raises(ValueError, r"weight has shape \(1, 10\)", fn, logits, targets, weight=np.ones((1, V)))
    raises(TypeError, "weight must hold real numbers", fn, logits, targets, weight=np.array(["a"] * V))
    for kind in ("f2", "f4", "f8"):  # Numba refused '>f4' with a typing error and misread '>f2' bits
        swapped = logits.astype(">" + kind)
        raises(TypeError, f"logits has dtype '>{kind}': big-endian float.*astype", fn, swapped, targets)


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_byte_swapped_small_arrays_are_read_by_value(fn, case):
    """Targets, class weights and grad_output are converted before any kernel reads them, so
    their byte order does not matter; only the logits and ``out`` must be native."""
    logits, targets = case
    weight = fresh_rng().random(V)
    options = {"weight": weight, "reduction": "none"}
    swapped = {"weight": weight.astype(">f8"), "reduction": "none"}
    if fn is nx.cross_entropy_backward:
        go = fresh_rng().random(4).astype(np.float32)
        options["grad_output"], swapped["grad_output"] = go, go.astype(">f4")
    expected = fn(logits, targets, **options)
    got = fn(logits, targets.astype(">i8"), **swapped)
    pairs = zip(expected, got, strict=True) if isinstance(expected, tuple) else [(expected, got)]
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fn", [nx.cross_entropy_with_grad, nx.cross_entropy_backward])
def test_bad_out_and_grad_output(fn, case):
    logits, targets = case
    raises(
        ValueError,
        r"out has shape \(4, 9\) but must have the logits' shape \(4, 10\)",
        fn,
        logits,
        targets,
        out=np.empty((4, 9), np.float32),
    )
    raises(
        TypeError,
        "out has dtype float64 but must have the logits' dtype float32",
        fn,
        logits,
        targets,
        out=np.empty((4, V)),
    )
    raises(TypeError, "out must be a NumPy array", fn, logits, targets, out=[[0.0] * V] * 4)
    raises(
        TypeError,
        "out has dtype '>f4': big-endian float32.*np.empty_like",
        fn,
        logits,
        targets,
        out=logits.astype(">f4"),
    )
    readonly = np.empty_like(logits)
    readonly.flags.writeable = False
    raises(ValueError, "out is read-only", fn, logits, targets, out=readonly)
    big = np.zeros((5, V), np.float32)
    raises(ValueError, "out overlaps logits without being logits itself", fn, big[:4], targets, out=big[1:])
    raises(ValueError, "grad_output must be a scalar for reduction='mean'", fn, logits, targets, grad_output=np.ones(4))
    raises(
        ValueError,
        r"grad_output has shape \(3,\); for reduction='none'",
        fn,
        logits,
        targets,
        grad_output=np.ones(3),
        reduction="none",
    )
    raises(TypeError, "grad_output must hold real numbers", fn, logits, targets, grad_output="1")


def test_out_without_a_gradient_is_refused(case):
    logits, targets = case
    with pytest.raises(TypeError):
        nx.cross_entropy(logits, targets, out=logits)  # not a parameter of the loss-only function


def test_stream_is_for_gpu_arrays_only(case):
    logits, targets = case
    raises(ValueError, "stream= applies to GPU arrays only", nx.cross_entropy, logits, targets, stream=0)
    raises(ValueError, "stream= applies to GPU arrays only", nx.softmax, logits, stream=0)


@pytest.mark.parametrize("fn", [nx.softmax, nx.log_softmax, nx.logsumexp])
def test_normalizations_reject_bad_logits(fn):
    raises(TypeError, "logits must be float16, bfloat16, float32 or float64", fn, np.arange(6).reshape(2, 3))
    raises(ValueError, "at least one axis", fn, np.float64(2.0))
    raises(ValueError, "empty vocabulary axis", fn, np.zeros((2, 0)))
    raises(TypeError, "logits has dtype '>f8': big-endian float64", fn, np.zeros((2, 3), ">f8"))


@pytest.mark.parametrize("fn", [nx.softmax, nx.log_softmax])
def test_normalizations_reject_bad_out(fn):
    x = np.zeros((2, 3), np.float32)
    raises(ValueError, "out has shape", fn, x, out=np.zeros((3, 2), np.float32))
    raises(TypeError, "out has dtype float16", fn, x, out=np.zeros((2, 3), np.float16))
    raises(TypeError, "out has dtype '>f4': big-endian", fn, x, out=np.zeros((2, 3), ">f4"))


def test_failed_calls_leave_inputs_untouched(case):
    logits, targets = case
    before = logits.copy()
    with pytest.raises(ValueError):
        nx.cross_entropy_with_grad(logits, np.array([0, 1, 2, 99]), out=logits)
    np.testing.assert_array_equal(logits, before)
