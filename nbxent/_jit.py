"""The one place where jit flags are set, and the scalar helpers every CPU kernel inlines.

Numba 0.68 does not vectorize ``math.exp`` or ``math.tanh`` (Intel SVML support is gone),
so the kernels use the polynomial versions below: plain arithmetic and bit casts that LLVM
turns into SIMD code, 5-7x faster than a scalar ``math.exp`` loop for float32 and 4-6x for
float64.

Fast-math flags are an explicit set: ``nnan`` and ``ninf`` are left out because the kernels
must keep ``-inf`` (masked vocabulary) and NaN (a broken row) meaningful.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.codegen import CPUCodeLibrary
from numba.extending import intrinsic, overload

# Fast-math flags, in two sets. Neither has ``nnan``/``ninf`` (``-inf`` masks vocabulary,
# NaN marks a broken row) nor ``arcp`` (it lets LLVM turn ``e * (1 / s)`` back into ``e / s``
# in some loop versions and not others, so in-place and out-of-place calls would differ in
# the last bit).
#
# FASTMATH_REDUCE adds ``reassoc``, which lets LLVM split a row sum over SIMD lanes (the
# order is fixed at compile time, so results still do not depend on threads). It is used
# only for the reduction sweeps: anywhere else ``reassoc`` rewrites ``log_s + (m - x_t)``
# into ``(m + log_s) - x_t`` and loses 3 digits at a 1e4 offset, and folds the exact
# add-then-subtract rounding step of ``exp_f32``.
FASTMATH_REDUCE = {"nsz", "contract", "afn", "reassoc"}
FASTMATH = {"nsz", "afn"}

# Compiled kernels are cached next to the package (or in NUMBA_CACHE_DIR), so a new
# process's first call loads machine code instead of compiling for seconds. Numba checks
# only the file of each cached function: after editing this module, delete
# nbxent/__pycache__/*.nbi and *.nbc, or set NBXENT_NO_CACHE=1.
CACHE = os.environ.get("NBXENT_NO_CACHE", "") == ""

_OPTIONS = {"cache": CACHE, "error_model": "numpy"}  # "numpy": no ZeroDivisionError branch in
#                                                      float division, which blocks SIMD


# Every compiled function runs its own copies of the helpers it calls, in every process.
# Numba links a copy of each callee (``row_stats``, ``block_exp_sum``, ...) into the caller's
# module as a weak (``linkonce_odr``) symbol and optimizes the whole module again, while the
# callee's own library sits in the JIT under the same name. A process that compiled a kernel
# therefore bound its calls to the callee compiled on its own (a strong symbol, there first),
# and a process that loaded the kernel from the cache ran the kernel's linked copy; where a
# sum carries ``reassoc`` the two copies can order it differently, so the first process after
# an install and every later one gave losses a last bit apart (docs/cpu.md, "Compiled and
# cached kernels give the same bits"). So, once the callees are linked in, the weak copies are
# renamed with a tag of their library (a hash of the names it exports: function and
# signature), leaving a call nothing else to bind to; and the module handed on for linking
# into callers gets the plain names back, so that callers merge the copies as before. The
# machine code is that of a kernel loaded from the cache: same copies, same linkage, so the
# same inlining. Only libraries holding this package's code are touched (Numba mangles its
# names ``_ZN6nbxent...``).
_OWN_CODE = "_ZN6nbxent"


def _rename_linked_copies(library) -> None:
    """Give the weak copies linked into ``library``'s module names of its own."""
    defined = [f for f in library._final_module.functions if not f.is_declaration]
    copies = [f for f in defined if f.linkage == llvm.Linkage.linkonce_odr]
    if not copies or not any(f.name.startswith(_OWN_CODE) for f in defined):
        return
    exported = sorted(f.name for f in defined if f.linkage == llvm.Linkage.external)
    library.nbxent_copy_tag = "." + hashlib.sha1("\n".join(exported).encode()).hexdigest()[:16]
    for f in copies:
        f.name += library.nbxent_copy_tag


def _plain_names_for_linking(library, module) -> None:
    """Undo ``_rename_linked_copies`` in the copy of the module that callers link in."""
    tag = getattr(library, "nbxent_copy_tag", "")
    if tag and module is not library._final_module:  # never the module already in the JIT
        for f in module.functions:
            if f.name.endswith(tag):
                f.name = f.name[: -len(tag)]


def _own_copies_of_helpers() -> None:
    optimize = getattr(CPUCodeLibrary, "_optimize_final_module", None)
    for_linking = getattr(CPUCodeLibrary, "_get_module_for_linking", None)
    if optimize is None or for_linking is None:  # another Numba: tests/test_compile_cache.py tells
        return
    if getattr(optimize, "nbxent_renames_copies", False):  # this module imported twice
        return

    @functools.wraps(optimize)
    def optimize_final_module(self):
        _rename_linked_copies(self)
        optimize(self)

    @functools.wraps(for_linking)
    def get_module_for_linking(self):
        made = getattr(self, "_shared_module", None) is None
        module = for_linking(self)
        if made:
            _plain_names_for_linking(self, module)
        return module

    optimize_final_module.nbxent_renames_copies = True
    CPUCodeLibrary._optimize_final_module = optimize_final_module
    CPUCodeLibrary._get_module_for_linking = get_module_for_linking


_own_copies_of_helpers()

# Small helpers, left to LLVM to inline; each keeps its own (exact) flags there.
jit_helper = functools.partial(numba.njit, fastmath=FASTMATH, **_OPTIONS)
# Polynomials (exp, tanh) and the 16-bit gradient sweep: ``contract`` fuses each multiply-add
# into one FMA, which halves their instruction count and rounds once instead of twice.
jit_poly = functools.partial(numba.njit, fastmath=FASTMATH | {"contract"}, **_OPTIONS)
# Sweeps inlined by Numba itself (taking the caller's flags), so that a call passing the same
# array twice compiles to a loop over one pointer (see ``_cpu.write_normalized``).
jit_inline = functools.partial(numba.njit, inline="always", fastmath=FASTMATH, **_OPTIONS)
# Row functions, and the reduction sweeps.
jit_serial = functools.partial(numba.njit, fastmath=FASTMATH, nogil=True, **_OPTIONS)
jit_reduce = functools.partial(numba.njit, fastmath=FASTMATH_REDUCE, nogil=True, **_OPTIONS)
# Parallel kernels over rows; they release the GIL so Python threads can call them at once.
jit_kernel = functools.partial(numba.njit, parallel=True, fastmath=FASTMATH, nogil=True, **_OPTIONS)


def overload_helper(func):
    """``@overload`` with the helpers' options: a type-dispatched jit helper."""
    return overload(func, jit_options={"fastmath": FASTMATH, **_OPTIONS})


_F32 = np.float32
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32_IR = ir.FloatType()
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693359375)
_LN2_LO = _F32(-2.12194440e-4)
# 1.5 * 2**23 + 126: adding it rounds to an integer (float32's spacing is 1 in [2**23, 2**24))
# and leaves that integer plus 126, the exponent bias of 2**(n-1), in the low mantissa bits
# (see exp_f32). The bias costs nothing here; added to the bits after, it was one more vector
# instruction and one more constant in the exp loop, whose 16 registers are full: the loss
# alone 1.10-1.16x faster for bfloat16, float32 within noise, the same bits (docs/cpu.md).
# 126 is even, so a tie rounds to the same n as without it.
_ROUND_MAGIC_126 = _F32(12582912.0 + 126.0)
_EXP_LO = _F32(-87.5)  # at and below about -86.98, exp(x) < 2**-125: flushed to 0 (see exp_f32)
# exp(r) = 1 + r + r**2 P(r) on |r| <= ln2/2, P of degree 4: the minimax fit of relative error
# (a linear program on 4001 points), coefficients rounded to float32 and doubled (see exp_f32).
# At most 1.3 ulp of float32 in exp_f32's Horner order (Cephes' degree-5 P: 1.7 ulp, one FMA more).
_EXP_P = tuple(
    _F32(2 * c) for c in (0.5, 0.166666641831398, 0.04165995121002197, 0.008357353508472443, 0.0014470001915469766)
)


# The integer type of each float's bits, and back.
_BITS_OF = {types.float32: types.int32, types.float64: types.int64}
_FLOAT_OF = {types.int32: types.float32, types.uint32: types.float32, types.int64: types.float64}


@intrinsic
def float_bits(typingctx, x):
    """The bits of a float32 (float64) as an int32 (int64): an LLVM bitcast, free and
    vectorizable."""
    if x not in _BITS_OF:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(sig.return_type))

    return _BITS_OF[x](x), codegen


@intrinsic
def float_from_bits(typingctx, x):
    """The float32 whose bits are the given int32 or uint32; the float64 of an int64."""
    if x not in _FLOAT_OF:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(sig.return_type))

    return _FLOAT_OF[x](x), codegen


@jit_poly
def exp_f32(x):
    """exp(x) for float32 x <= 88.7, within 1.3 ulp, vectorizable; exp(-inf) = 0 exactly, NaN
    stays NaN. Larger x are outside its domain (up to 89 it gives inf, beyond that garbage).

    The kernels call it on ``x - max <= 0`` for every logit, so its length is the forward
    pass's compute time: 13 vector instructions an entry, 9 of them FMAs. Leaving out the
    clamp at the top, which that domain never needs, made it 15% faster.

    1. Split x = n*ln2 + r with n = round(x / ln2) and |r| <= ln2/2: the FMA rounds
       ``x*log2e + 1.5*2**23 + 126`` once, which leaves n + 126 in the low mantissa bits of
       ``t`` (``_ROUND_MAGIC_126``); ln2 in two parts (Cody-Waite) makes r exact.
    2. exp(r) = 1 + r (1 + r P(r)) (degree 6 minimax), evaluated doubled, as 2 exp(r).
    3. Multiply by 2**(n-1), built in the exponent bits: n - 1 + 127 = n + 126 fits the
       exponent field for every n in [-126, 128], so one factor covers the whole range up
       to overflow (n = 129 makes the factor inf). Below about -86.98 (n = -126) the
       factor's exponent field is 0, the factor is 0.0, and so is the result: exp(x) <
       2**-125 is flushed without a branch, -inf included (clamped to -87.5 first). NaN
       passes the clamp and stays NaN.
    """
    xc = _EXP_LO if x < _EXP_LO else x
    t = xc * _LOG2E + _ROUND_MAGIC_126
    n = t - _ROUND_MAGIC_126
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    c0, c1, c2, c3, c4 = _EXP_P
    p = c4 * r + c3
    p = p * r + c2
    p = p * r + c1
    p = p * r + c0
    p = p * r + _F32(2.0)
    y = p * r + _F32(2.0)  # 2 + r (2 + r P) = 2 exp(r): no r**2, and 1.3 ulp instead of 1.7
    # bits(t) = bits(1.5 * 2**23) + n + 126, and bits(1.5 * 2**23) ends in 9 zero bits:
    # shifted left by 23, only n + 126 is left.
    scale = float_from_bits(np.int32(float_bits(t) << 23))
    return y * scale


# exp16_f32's P, of degree 3 (exp of degree 5): the same linear-program fit as _EXP_P.
_EXP16_P = tuple(_F32(c) for c in (0.999984622001648, 0.3333418071269989, 0.08378094434738159, 0.01662948541343212))
_LN2 = _F32(0.6931471805599453)


@jit_poly
def exp16_f32(x):
    """``exp_f32`` with two FMAs fewer, for the stored exps of 16-bit logits: within 5 ulp of
    float32 for x <= 0 (5.5 up to 88.7), with the same domain, flush and special values.

    The two FMAs are one Cody-Waite step (``r = x - n ln2`` with ln2 rounded to float32:
    n * 1.9e-9 of error, n <= 126) and one polynomial degree (a degree-5 fit: 0.9 ulp). A
    16-bit gradient keeps 8 (bfloat16) or 11 (float16) bits, a rounding step of 2^-8 or
    2^-11 against this exp's 6e-7 at most: on 256x32000 bfloat16 logits 0.002-0.003% of
    gradient entries came out one step from the correctly rounded value, against
    0.0005-0.0024% with ``exp_f32``, and the float32 loss had the same error (2.3e-8 median,
    under 9e-8). The 16-bit pass is bound by arithmetic (docs/cpu.md): its loss alone and
    in-place calls got 1.05-1.09x faster, out of place 0.99-1.09x (two threads, A/B).
    """
    xc = _EXP_LO if x < _EXP_LO else x
    t = xc * _LOG2E + _ROUND_MAGIC_126
    n = t - _ROUND_MAGIC_126
    r = xc - n * _LN2
    c0, c1, c2, c3 = _EXP16_P
    p = c3 * r + c2
    p = p * r + c1
    p = p * r + c0
    p = p * r + _F32(2.0)
    y = p * r + _F32(2.0)
    scale = float_from_bits(np.int32(float_bits(t) << 23))
    return y * scale


# exp_f64: the float64 twin of exp_f32. ln2 in two parts (fdlibm's: the high part has 32
# significant bits, so n * _LN2_HI_64 is exact for every n here); 1.5 * 2**52 + 1022 rounds
# to an integer and leaves n + 1022, the exponent field of 2**(n-1), in the low bits (1022 is
# even: the same ties). Q(r) = 2 (exp(r) - 1 - r) / r**2 on |r| <= ln2/2 to degree 9: a
# Chebyshev fit in 50-digit arithmetic (mpmath.chebyfit, interval widened by 1e-6), whose
# error 2.1e-16 in Q is 1.8e-17 of exp(r), a sixth of an ulp.
_LOG2E_64 = 1.4426950408889634
_LN2_HI_64 = 6.93147180369123816490e-01
_LN2_LO_64 = 1.90821492927058770002e-10
_ROUND_MAGIC_1022 = 6755399441055744.0 + 1022.0
_EXP_LO_64 = -708.5  # below about -708.05 (n = -1022), exp(x) < 2**-1021.5: flushed to 0 (see exp_f64)
_EXP_Q_64 = (
    1.0000000000000002,
    0.33333333333333337,
    0.08333333333324833,
    0.01666666666666013,
    0.002777777783439378,
    0.0003968253972608135,
    4.960304264420918e-05,
    5.511453696021385e-06,
    5.524015201126276e-07,
    5.020075185837185e-08,
)


@jit_poly
def exp_f64(x):
    """exp(x) for float64 x <= 709, vectorizable (4 lanes with AVX2): ``exp_f32``'s method in
    double precision, within 1 ulp (tests/test_jit.py), exp(-inf) = 0 exactly, NaN stays NaN,
    and exp(x) < 2**-1021.5 (x below about -708.05) flushed to 0.

    Numba compiles ``math.exp`` to a scalar libm call an entry: float64 rows, NumPy's default
    dtype, took 9 ns an entry on a Zen 3 core, 19x a read of the logits for the loss alone.
    Here: a clamp, 14 FMAs, a subtraction, a shift and a multiply for 4 entries.

    1. n = round(x / ln2) by one FMA against ``_ROUND_MAGIC_1022``, which leaves n + 1022 in
       the low bits of ``t``; r = x - n ln2 in two FMAs.
    2. 2 exp(r) = 2 + r (2 + r Q(r)), Q of degree 9 (``_EXP_Q_64``).
    3. Times 2**(n-1), built in the exponent bits by one shift: for n = -1022 (x below about
       -708.05; clamped at -708.5 first, -inf included) its exponent field is 0, and so is
       the result.
    """
    xc = _EXP_LO_64 if x < _EXP_LO_64 else x
    t = xc * _LOG2E_64 + _ROUND_MAGIC_1022
    n = t - _ROUND_MAGIC_1022
    r = xc - n * _LN2_HI_64
    r = r - n * _LN2_LO_64
    q0, q1, q2, q3, q4, q5, q6, q7, q8, q9 = _EXP_Q_64
    p = q9 * r + q8
    p = p * r + q7
    p = p * r + q6
    p = p * r + q5
    p = p * r + q4
    p = p * r + q3
    p = p * r + q2
    p = p * r + q1
    p = p * r + q0
    p = p * r + 2.0
    y = p * r + 2.0
    # bits(t) = bits(1.5 * 2**52) + n + 1022, and bits(1.5 * 2**52) ends in 48 zero bits:
    # shifted left by 52, only n + 1022 is left, in the exponent field.
    return y * float_from_bits(float_bits(t) << 52)


@jit_poly
def tanh_f32(x):
    """tanh(x) for float32 x, vectorizable: a 13/6 rational minimax fit (as in Eigen).

    Accurate to a few ulp; |x| >= 9 gives exactly +-1 (as float32 tanh does), NaN stays NaN.
    """
    lim = _F32(7.90531110763549805)
    xc = -lim if x < -lim else x
    xc = lim if xc > lim else xc
    x2 = xc * xc
    p = _F32(-2.76076847742355e-16)
    p = p * x2 + _F32(2.00018790482477e-13)
    p = p * x2 + _F32(-8.60467152213735e-11)
    p = p * x2 + _F32(5.12229709037114e-08)
    p = p * x2 + _F32(1.48572235717979e-05)
    p = p * x2 + _F32(6.37261928875436e-04)
    p = p * x2 + _F32(4.89352455891786e-03)
    q = _F32(1.19825839466702e-06)
    q = q * x2 + _F32(1.18534705686654e-04)
    q = q * x2 + _F32(2.26843463243900e-03)
    q = q * x2 + _F32(4.89352518554385e-03)
    t = xc * p / q
    # Selects, not `and`/`or`, so that LLVM if-converts and vectorizes the loop.
    t = xc if abs(xc) < _F32(0.0004) else t
    t = _F32(1.0) if x >= _F32(9.0) else t
    return _F32(-1.0) if x <= _F32(-9.0) else t


# tanh_f64: Cephes' tanh for double (S. L. Moshier): below |x| = 0.625 x + x**3 P(x**2) / Q(x**2)
# with P of degree 2 and Q (monic) of degree 3, above it 1 - 2 / (exp(2|x|) + 1), with exp_f64.
_TANH_P_64 = (-9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3)
_TANH_Q_64 = (1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3)


@jit_poly
def tanh_f64(x):
    """tanh(x) for float64 x, vectorizable: both of Cephes' branches computed and one selected
    (a rational in x below |x| = 0.625, ``exp_f64`` above). Within a few ulp (tests/test_jit.py);
    +-1 from |x| = 20 on, NaN stays NaN. ``math.tanh`` is a scalar libm call an entry."""
    z = abs(x)
    s = x * x
    p0, p1, p2 = _TANH_P_64
    q0, q1, q2 = _TANH_Q_64
    p = (p0 * s + p1) * s + p2
    q = ((s + q0) * s + q1) * s + q2
    small = x + x * s * (p / q)
    zc = 20.0 if z > 20.0 else z  # tanh(20) rounds to 1; a NaN passes and stays NaN
    big = 1.0 - 2.0 / (exp_f64(2.0 * zc) + 1.0)
    big = -big if x < 0.0 else big
    return small if z < 0.625 else big


def fast_exp(x):
    """exp in the accumulation type: the polynomials ``exp_f32`` and ``exp_f64`` (``x <= 88.7``
    and ``x <= 709``: the kernels pass ``x - max``, at most ``EXP_CLAMP``)."""
    return math.exp(x)


def fast_exp16(x):
    """``fast_exp`` for the stored exps of 16-bit logits: ``exp16_f32``. Float64 rows compile
    the 16-bit branches without running them; they get math.exp."""
    return math.exp(x)


def fast_tanh(x):
    """tanh in the accumulation type: ``tanh_f32`` and ``tanh_f64``."""
    return math.tanh(x)


@overload_helper(fast_exp)
def _fast_exp_impl(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: exp_f64(x)


@overload_helper(fast_exp16)
def _fast_exp16_impl(x):
    if x == types.float32:
        return lambda x: exp16_f32(x)
    return lambda x: math.exp(x)


@overload_helper(fast_tanh)
def _fast_tanh_impl(x):
    if x == types.float32:
        return lambda x: tanh_f32(x)
    return lambda x: tanh_f64(x)


# 16-bit storage formats. NumPy's float16 and ml_dtypes' bfloat16 arrays are viewed as
# uint16 before they reach Numba (which has no CPU float16), and converted here with integer
# bit operations that vectorize. They are written as LLVM IR: Numba widens every integer
# operation to 64 bits, which halves the SIMD lanes (the bfloat16 narrowing ran 2x slower).


def _u32(n):
    return ir.Constant(_I32, n & 0xFFFFFFFF)


def _f32_of(b, bits):
    return b.bitcast(bits, _F32_IR)


@intrinsic
def bf16_to_f32(typingctx, h):
    """bfloat16 bits (uint16) -> float32: bfloat16 is the top half of a float32."""
    if h != types.uint16:
        return None

    def codegen(context, b, sig, args):
        return _f32_of(b, b.shl(b.zext(args[0], _I32), _u32(16)))

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_bf16(typingctx, x):
    """float32 -> bfloat16 bits (uint16), rounding to nearest even; NaN stays a quiet NaN."""
    if x != types.float32:
        return None

    def codegen(context, b, sig, args):
        u = b.bitcast(args[0], _I32)
        top = b.lshr(u, _u32(16))
        odd = b.and_(top, _u32(1))
        rounded = b.lshr(b.add(b.add(u, _u32(0x7FFF)), odd), _u32(16))
        quiet_nan = b.or_(top, _u32(0x40))
        is_nan = b.fcmp_unordered("uno", args[0], args[0])
        return b.trunc(b.select(is_nan, quiet_nan, rounded), _I16)

    return types.uint16(types.float32), codegen


@intrinsic
def f32_to_bf16_not_nan(typingctx, x):
    """``f32_to_bf16`` for a value known not to be NaN: the same bits for every other float32
    (infinities included), three vector operations fewer. The 16-bit gradient sweep uses it
    for rows whose factors and sum are finite, where no entry can be NaN."""
    if x != types.float32:
        return None

    def codegen(context, b, sig, args):
        u = b.bitcast(args[0], _I32)
        odd = b.and_(b.lshr(u, _u32(16)), _u32(1))
        return b.trunc(b.lshr(b.add(b.add(u, _u32(0x7FFF)), odd), _u32(16)), _I16)

    return types.uint16(types.float32), codegen


@intrinsic
def f16_to_f32(typingctx, h):
    """IEEE half bits (uint16) -> float32, exact for every half value: LLVM's ``fpext``
    (one ``vcvtph2ps`` on x86 with F16C; a signalling NaN comes back quiet, its payload
    kept). The integer version it replaced cost 1.4x as much per entry."""
    if h != types.uint16:
        return None

    def codegen(context, b, sig, args):
        return b.fpext(b.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_f16(typingctx, x):
    """float32 -> IEEE half bits (uint16), rounding to nearest even: LLVM's ``fptrunc``
    (one ``vcvtps2ph`` on x86 with F16C; a library call where the CPU has no conversion).
    Branch-free integer rounding, which it replaced, cost 2.5x as much per entry."""
    if x != types.float32:
        return None

    def codegen(context, b, sig, args):
        return b.bitcast(b.fptrunc(args[0], ir.HalfType()), _I16)

    return types.uint16(types.float32), codegen


# Streaming stores, for ``nbxent bench``'s second copy floor; the kernels store plainly: in
# their gradient sweep streaming stores were slower on this project's VM (docs/cpu.md).
@intrinsic
def stream_line16(typingctx, dst, j, src, k):
    """``dst[j:j + 32] = src[k:k + 32]`` (uint16 arrays) by one non-temporal 64-byte store,
    which writes the cache line without reading it first; ``dst[j]`` must start a 64-byte
    line. Follow the stores with ``store_fence`` before anything else reads ``dst``."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype == types.uint16):
        return None

    def codegen(context, builder, sig, args):
        dty, _, sty, _ = sig.args
        d = context.make_array(dty)(context, builder, args[0])
        s = context.make_array(sty)(context, builder, args[2])
        dp = cgutils.get_item_pointer(context, builder, dty, d, [args[1]], wraparound=False)
        sp = cgutils.get_item_pointer(context, builder, sty, s, [args[3]], wraparound=False)
        line = ir.VectorType(_I16, 32)
        v = builder.load(builder.bitcast(sp, line.as_pointer()), align=2)
        st = builder.store(v, builder.bitcast(dp, line.as_pointer()), align=64)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))
        return context.get_dummy_value()

    return types.none(dst, j, src, k), codegen


@intrinsic
def store_fence(typingctx):
    """x86 ``sfence``: the non-temporal stores before it are visible before any store after it."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


# Format codes of 16-bit logits (``half`` arguments): IEEE half and bfloat16.
HALF_F16, HALF_BF16 = 1, 2


def widen(v, half):
    """A 16-bit value's bits (uint16, format ``half``) as float32; a float passes through.

    Kernels that take either float rows or 16-bit rows call it on every entry; for float rows
    it compiles to nothing, and with a constant ``half`` to one conversion."""
    return v


@overload_helper(widen)
def _widen_impl(v, half):
    if v == types.uint16:
        return lambda v, half: bf16_to_f32(v) if half == HALF_BF16 else f16_to_f32(v)
    return lambda v, half: v


@intrinsic
def half_sort_key(typingctx, h):
    """An int16 that orders 16-bit float bits (either format) as their values order, NaN aside:
    ``sort_key`` in 16-bit lanes, twice as many to a vector as after widening."""
    if h != types.uint16:
        return None

    def codegen(context, b, sig, args):
        sign = b.ashr(args[0], ir.Constant(_I16, 15))
        return b.xor(args[0], b.and_(sign, ir.Constant(_I16, 0x7FFF)))

    return types.int16(types.uint16), codegen


@jit_helper
def max_bits16(src):
    """The bits of the largest entry of 16-bit float bits (either format); like ``row_max``, a
    NaN may or may not win. An integer max over the bits, as they are loaded."""
    m = np.int16(-32768)
    for j in range(src.size):
        k = half_sort_key(src[j])
        m = k if k > m else m
    return np.uint16(half_sort_key(np.uint16(m)))  # the map is its own inverse


def row_max(x):
    """Largest entry of a 1-D float array; NaN may or may not win (the callers' sums see it)."""
    return np.max(x)


# LLVM vectorizes a float max reduction only without NaNs; mapping the float bits to
# integers that sort the same way gives an integer max, which vectorizes (10x here).
@jit_helper
def sort_key(v):
    """An int32 that orders float32 values as they order (sign-magnitude to two's complement)."""
    b = float_bits(v)
    return np.int32(b ^ ((b >> 31) & np.int32(0x7FFFFFFF)))


@jit_helper
def from_sort_key(k):
    """The float32 whose ``sort_key`` is ``k`` (the map is its own inverse)."""
    return float_from_bits(np.int32(k ^ ((k >> 31) & np.int32(0x7FFFFFFF))))


LOWEST_KEY = np.int32(-2147483648)


@overload_helper(row_max)
def _row_max_impl(x):
    if x.dtype == types.float32:

        def impl(x):
            m = LOWEST_KEY
            for j in range(x.size):
                k = sort_key(x[j])
                m = k if k > m else m
            return from_sort_key(m)

        return impl

    def impl(x):
        m = -np.inf
        for j in range(x.size):
            m = x[j] if x[j] > m else m
        return m

    return impl


def as_dtype_of(x, value):
    """``value`` cast to the dtype of array ``x``.

    Numba promotes ``float32 op int`` and ``float32 op 0.0`` to float64, which silently turns
    the float32 kernels into slow float64 code: every constant and count is cast with this.
    """
    return x.dtype.type(value)


@overload_helper(as_dtype_of)
def _as_dtype_of_impl(x, value):
    if x.dtype == types.float32:
        return lambda x, value: np.float32(value)
    return lambda x, value: np.float64(value)


@jit_helper
def exact_sub(a, b):
    """``a - b`` compiled without ``reassoc``: inside a ``jit_reduce`` sum it stays one rounded
    difference instead of being reordered into ``(sum + a) - b``."""
    return a - b
