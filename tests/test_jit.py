"""The scalar helpers every CPU kernel inlines, against NumPy: exp and tanh to a stated number
of ulp over their whole domain, and the 16-bit conversions bit for bit."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from nbxent import _jit
from tests.seeds import fresh_rng

ml_dtypes = pytest.importorskip("ml_dtypes")


def _elementwise(helper, out_dtype):
    @numba.njit
    def apply(x):
        out = np.empty(x.size, out_dtype)
        for i in range(x.size):
            out[i] = helper(x[i])
        return out

    return apply


exp_f32 = _elementwise(_jit.exp_f32, np.float32)
exp16_f32 = _elementwise(_jit.exp16_f32, np.float32)
tanh_f32 = _elementwise(_jit.tanh_f32, np.float32)
bf16_to_f32 = _elementwise(_jit.bf16_to_f32, np.float32)
f16_to_f32 = _elementwise(_jit.f16_to_f32, np.float32)
f32_to_bf16 = _elementwise(_jit.f32_to_bf16, np.uint16)
f32_to_f16 = _elementwise(_jit.f32_to_f16, np.uint16)
f32_to_bf16_not_nan = _elementwise(_jit.f32_to_bf16_not_nan, np.uint16)


def ulp_error(got, x, fn):
    want = fn(x.astype(np.float64))
    return np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)


def ulp_error_64(got, x, fn):
    """``ulp_error`` for float64 results: against ``fn`` in long double (80-bit on x86: 11 bits
    to spare), or in float64 where long double is no wider; returns ``(error, wide)``."""
    wide = np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant
    want = fn(x.astype(np.longdouble)) if wide else fn(x)
    return np.abs(got.astype(want.dtype) - want) / np.spacing(np.abs(want).astype(np.float64)).astype(want.dtype), wide


def every_float32_between(lo, hi, step):
    """Every ``step``-th float32 in [lo, hi] by bit pattern: a dense sweep of all binades."""
    a, b = np.array([lo, hi], np.float32).view(np.int32)
    if lo < 0 <= hi:  # the negative half runs backwards in bits
        neg = np.arange(np.float32(-0.0).view(np.int32), a + 1, step, dtype=np.int64)
        pos = np.arange(0, b + 1, step, dtype=np.int64)
        return np.concatenate([neg, pos]).astype(np.int32).view(np.float32)
    lo_bits, hi_bits = min(a, b), max(a, b)
    return np.arange(lo_bits, hi_bits + 1, step, dtype=np.int64).astype(np.int32).view(np.float32)


# (exp, max ulp over its whole domain, max ulp for x <= 0 where the kernels call it, mean ulp):
# the exact one every float kernel uses, and the shorter one of the 16-bit kernels' pass.
EXPS = {"exp_f32": (exp_f32, 1.32, 1.32, 0.07), "exp16_f32": (exp16_f32, 5.5, 5.0, 0.12)}


@pytest.mark.parametrize("name", list(EXPS))
class TestExp:
    def test_within_its_bound_over_its_domain(self, name):
        fn, bound, bound_nonpos, mean = EXPS[name]
        x = every_float32_between(-86.9, 88.7, 97)  # about 22 million arguments
        err = ulp_error(fn(x), x, np.exp)
        assert err.max() <= bound, x[np.argmax(err)]
        assert err[x <= 0].max() <= bound_nonpos
        assert err.mean() < mean

    def test_random_arguments_where_the_kernels_call_it(self, name):
        fn, _, bound_nonpos, _ = EXPS[name]
        rng = fresh_rng()
        x = -np.abs(rng.standard_normal(1_000_000) * 10).astype(np.float32)  # x - max <= 0
        assert ulp_error(fn(x), x, np.exp).max() <= bound_nonpos

    def test_special_values(self, name):
        fn = EXPS[name][0]
        x = np.array([-np.inf, np.nan, 0.0, -0.0, -87.5, -1e30, 88.72], np.float32)
        got = fn(x)
        assert got[0] == 0.0  # masked logits get probability exactly 0
        assert np.isnan(got[1])
        assert got[2] == 1.0 and got[3] == 1.0
        assert got[4] == 0.0 and got[5] == 0.0  # below 2**-125: flushed to 0
        top = np.float32(np.exp(np.float64(np.float32(88.72))))  # near the top: 3.39e38
        if name == "exp_f32":  # the correctly rounded value there
            assert got[6] == top
        else:
            assert ulp_error(got[6:], x[6:], np.exp)[0] <= EXPS[name][1]

    def test_flushes_only_below_2_to_the_minus_125(self, name):
        fn, _, bound_nonpos, _ = EXPS[name]
        x = every_float32_between(-87.5, -86.0, 1)
        got = fn(x)
        assert np.all(got[x < -87.0] == 0)  # exp < 2**-125.5
        kept = x > -86.97  # exp > 2**-125.48
        assert ulp_error(got[kept], x[kept], np.exp).max() <= bound_nonpos


exp_f64 = _elementwise(_jit.exp_f64, np.float64)


class TestExpFloat64:
    """``exp_f64`` against NumPy's exp in long double (``ulp_error_64``)."""

    @staticmethod
    def ulp_error_64(x):
        return ulp_error_64(exp_f64(x), x, np.exp)

    def test_within_1_ulp_over_its_domain(self):
        rng = fresh_rng()
        x = np.concatenate(
            [
                rng.uniform(-708.0, 709.0, 2_000_000),
                -np.abs(rng.standard_normal(1_000_000) * 10),  # x - max <= 0, where the kernels call it
                np.linspace(-708.0, 709.0, 1_000_001),
                rng.uniform(-0.35, 0.35, 500_000),  # the polynomial alone (n = 0)
            ]
        )
        err, wide = self.ulp_error_64(x)
        assert err.max() <= (1.0 if wide else 1.5), x[np.argmax(err)]
        assert err.mean() < 0.3

    def test_special_values_and_the_flush(self):
        x = np.array([-np.inf, np.nan, 0.0, -0.0, -708.5, -1e300, -708.1, -708.0, 709.0, 710.0])
        got = exp_f64(x)
        assert got[0] == 0.0  # masked logits get probability exactly 0
        assert np.isnan(got[1])
        assert got[2] == 1.0 and got[3] == 1.0
        assert got[4] == 0.0 and got[5] == 0.0 and got[6] == 0.0  # below 2**-1021.5: flushed
        assert got[7] > 0 and self.ulp_error_64(x[7:8])[0][0] <= 1.0  # exp(-708) = 3.3e-308 kept
        assert np.isfinite(got[8]) and self.ulp_error_64(x[8:9])[0][0] <= 1.0
        assert got[9] == np.inf


tanh_f64 = _elementwise(_jit.tanh_f64, np.float64)


def test_tanh_f64_within_2_ulp_and_saturating():
    rng = fresh_rng()
    x = np.concatenate(
        [
            rng.uniform(-25.0, 25.0, 1_000_000),
            np.linspace(-3.0, 3.0, 1_000_001),  # both sides of the switch at 0.625
            rng.uniform(-1e-3, 1e-3, 100_000),
            np.geomspace(1e-300, 1.0, 100_000),
        ]
    )
    err, wide = ulp_error_64(tanh_f64(x), x, np.tanh)
    assert err.max() <= (2.0 if wide else 2.5), x[np.argmax(err)]
    ends = tanh_f64(np.array([20.0, -20.0, np.inf, -np.inf, 1e300, 0.0]))
    np.testing.assert_array_equal(ends, [1, -1, 1, -1, 1, 0])
    assert np.isnan(tanh_f64(np.array([np.nan]))[0])


def test_tanh_within_5_ulp_and_saturating():
    x = every_float32_between(-10.0, 10.0, 211)
    x = x[np.abs(x) > 1e-30]
    err = ulp_error(tanh_f32(x), x, np.tanh)
    assert err.max() <= 5, x[np.argmax(err)]
    ends = tanh_f32(np.array([9.0, -9.0, np.inf, -np.inf, 1e30], np.float32))
    np.testing.assert_array_equal(ends, [1, -1, 1, -1, 1])
    assert np.isnan(tanh_f32(np.array([np.nan], np.float32))[0])


class TestSixteenBitConversions:
    """Every one of the 65536 bit patterns one way; a dense float32 sweep the other way."""

    all_bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)

    def test_bfloat16_to_float32_exhaustive(self):
        want = self.all_bits.view(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(bf16_to_f32(self.all_bits).view(np.uint32), want.view(np.uint32))

    def test_float16_to_float32_exhaustive(self):
        want = self.all_bits.view(np.float16).astype(np.float32)
        got = f16_to_f32(self.all_bits)
        nan = np.isnan(want)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
        assert np.all(np.isnan(got[nan]))
        # sign and payload survive as NumPy keeps them, a signalling NaN made quiet (the
        # hardware conversion's rule); nothing nbxent returns carries an input's payload
        quiet = np.uint32(1 << 22)
        np.testing.assert_array_equal(got[nan].view(np.uint32), want[nan].view(np.uint32) | quiet)

    @pytest.mark.parametrize("name", ["bfloat16", "float16"])
    def test_float32_to_16_bit_rounds_to_nearest_even(self, name):
        dtype = ml_dtypes.bfloat16 if name == "bfloat16" else np.float16
        narrow = f32_to_bf16 if name == "bfloat16" else f32_to_f16
        rng = fresh_rng()
        # every float32 near every 16-bit value (ties included), and random bit patterns
        wide = self.all_bits.view(dtype).astype(np.float32).view(np.uint32).astype(np.int64)
        near = (wide[:, None] + np.arange(-3, 4)).reshape(-1)
        ties = wide + (1 << (15 if name == "bfloat16" else 12))
        bits = np.concatenate([near, ties, rng.integers(0, 2**32, 2_000_000)]) & 0xFFFFFFFF
        x = bits.astype(np.uint32).view(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            want = x.astype(dtype)
        got = narrow(x).view(dtype)
        nan = np.isnan(want.astype(np.float32))
        np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
        assert np.all(np.isnan(got[nan].astype(np.float32)))  # quiet NaN, never inf
        if name == "bfloat16":  # the sweep's version for values that cannot be NaN
            np.testing.assert_array_equal(f32_to_bf16_not_nan(x[~nan]), want[~nan].view(np.uint16))

    @pytest.mark.parametrize("name", ["bfloat16", "float16"])
    def test_max_over_16_bit_bits(self, name):
        """``max_bits16`` against NumPy's max of the values: every bit pattern, and random
        blocks of every length up to 70 (the vector loop's remainders) with infinities."""
        dtype = ml_dtypes.bfloat16 if name == "bfloat16" else np.float16
        rng = fresh_rng()
        values = self.all_bits.view(dtype).astype(np.float32)
        not_nan = self.all_bits[~np.isnan(values)]
        blocks = [not_nan, not_nan[::-1], rng.permutation(not_nan)]
        blocks += [rng.choice(not_nan, n) for n in range(1, 71) for _ in range(5)]
        blocks += [np.full(9, np.float32(-np.inf)).astype(dtype).view(np.uint16)]
        for block in blocks:
            want = block.view(dtype).astype(np.float32).max()
            got = np.uint16(_jit.max_bits16(block)).reshape(1).view(dtype).astype(np.float32)[0]
            assert got == want, (block, got, want)
