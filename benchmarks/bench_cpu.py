"""CPU benchmarks: nbxent against its peers, its memory use, and its bandwidth.

Every timed case is one point of the grid ``shape x dtype x options x op`` from ``_common``
(``op`` is "forward" = ``cross_entropy``, "forward+backward" = ``cross_entropy_with_grad``,
"forward+backward in place" = the same with ``out=logits``), for nbxent and for each peer:

- ``Nbxent.time_nbxent``: nbxent's CPU kernels;
- ``NumpyReference.time_numpy_reference``: plain vectorized NumPy in float32 (below);
- ``Torch.time_torch``: PyTorch's ``F.cross_entropy`` (+ autograd), skipped when PyTorch is
  not installed, and for "in place", which PyTorch has no way to do.

``PeakMemory.peakmem_nbxent`` shows that the in-place gradient allocates nothing of size N x V;
``Bandwidth.track_*`` report GB/s and the fraction of the copy floor, with one more op,
"forward+backward into out": the gradient into a preallocated ``out`` (the issue's fused
target; "forward+backward" allocates a new gradient every call, whose page faults it times);
``CopyFloors.track_*`` set that floor beside a copy with streaming stores; ``ComputeFloor``
sets the exp loop's time beside a read of the logits (the loss alone's two floors);
``FirstCall.timeraw_first_call`` times a fresh process's import and first call; ``FewRows`` times
calls with fewer rows than threads on one thread and on all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

import nbxent as nx

from . import _common
from ._common import BANDWIDTH_DTYPES, DTYPES, OPS, OPTIONS, SHAPES

GRID = [SHAPES, DTYPES, OPTIONS, OPS]
GRID_NAMES = ["shape", "dtype", "options", "op"]


def _is_small(shape: str) -> bool:
    n_rows, n_cols = _common.parse_shape(shape)
    return n_rows * n_cols <= 1 << 20


def _repeat_for(shape: str, large: tuple) -> tuple:
    """asv's ``repeat`` (min samples, max samples, max seconds) for one round: many cheap
    samples for launch-bound shapes, a few for the large ones."""
    return (10, 200, 1.0) if _is_small(shape) else large


INTO_OUT = "forward+backward into out"
"""``Bandwidth``'s op for ``cross_entropy_with_grad`` into a preallocated ``out``."""


def nbxent_call(op: str, logits: np.ndarray, targets: np.ndarray, kwargs: dict):
    """A no-argument callable that runs the nbxent function named by ``op`` (an ``OPS`` entry, or
    INTO_OUT, whose ``out`` is allocated here once)."""
    if op == INTO_OUT:
        out = np.empty_like(logits)
        return functools.partial(nx.cross_entropy_with_grad, logits, targets, out=out, **kwargs)
    if op == "forward":
        return functools.partial(nx.cross_entropy, logits, targets, **kwargs)
    if op == "forward+backward":
        return functools.partial(nx.cross_entropy_with_grad, logits, targets, **kwargs)
    if op == "forward+backward in place":
        return functools.partial(nx.cross_entropy_with_grad, logits, targets, out=logits, **kwargs)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


class _InPlaceInputs:
    """Gives each timed call fresh logits when ``op`` writes the gradient over them.

    asv re-runs ``setup`` before every timed call; for "in place" it refills a working copy
    from the cached pristine logits (untimed), so every call starts from real logits rather
    than from the previous call's gradient.
    """

    def _logits_for(self, op: str, pristine: np.ndarray) -> np.ndarray:
        if op != "forward+backward in place":
            return pristine
        work = getattr(self, "_work", None)
        if work is None or work.shape != pristine.shape or work.dtype != pristine.dtype:
            work = self._work = np.empty_like(pristine)
        return work

    def _refill(self, op: str, logits: np.ndarray, pristine: np.ndarray) -> None:
        if op == "forward+backward in place":
            np.copyto(logits, pristine)


class Nbxent(_InPlaceInputs):
    """nbxent's CPU kernels over the whole grid."""

    params = GRID
    param_names = GRID_NAMES
    timeout = 300
    warmup_time = 0  # setup's warm-up call takes its place

    def setup(self, shape, dtype, options, op):
        pristine = _common.cached_logits(shape, dtype)
        logits = self._logits_for(op, pristine)
        targets = _common.make_targets(shape)
        self.call = nbxent_call(op, logits, targets, _common.options(options, pristine.shape[1]))
        _common.warm_up_once((shape, dtype, options, op), self.call)
        self._refill(op, logits, pristine)
        self.repeat = _repeat_for(shape, (3, 5, 10.0))

    def time_nbxent(self, shape, dtype, options, op):
        self.call()


# ---------------------------------------------------------------------------------------------
# Peers


def numpy_cross_entropy(
    logits, targets, *, grad=False, out=None, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """Mean cross-entropy with PyTorch's semantics (plus ``z_loss`` and ``softcap``), and its
    gradient when ``grad``, in plain vectorized NumPy float32. A speed baseline, not an oracle
    (the tests have their own float64 reference); no ``ignore_index``.

    With ``y`` the (soft-capped) logits, ``p = softmax(y)``, ``lse = logsumexp(y)``, ``w_t`` the
    target's weight, ``W = sum(w_t)`` over rows and ``eps`` the smoothing, a row's loss is
    ``(1 - eps) w_t (lse - y_t) + eps/V sum_c w_c (lse - y_c) + z w_t lse**2``, divided by
    ``W``; its gradient with respect to ``y`` is
    ``(p ((1 - eps) w_t + eps/V sum(w) + 2 z w_t lse) - (1 - eps) w_t onehot(t) - eps/V w) / W``,
    times ``1 - (y/c)**2`` with respect to the raw logits when soft-capped.
    """
    n_rows, n_cols = logits.shape
    rows = np.arange(n_rows)
    y = logits.astype(np.float32)  # a copy, also for float32: the logits are never modified here
    if softcap is not None:
        np.divide(y, softcap, out=y)
        np.tanh(y, out=y)
        np.multiply(y, softcap, out=y)
    row_max = y.max(axis=1)
    e = np.subtract(y, row_max[:, None])
    np.exp(e, out=e)
    total = e.sum(axis=1)
    lse = row_max + np.log(total)
    w_t = np.ones(n_rows, np.float32) if weight is None else weight[targets]
    w_sum = np.float32(n_cols) if weight is None else weight.sum(dtype=np.float32)
    big_w = w_t.sum(dtype=np.float64)
    loss_rows = (1 - label_smoothing) * w_t * (lse - y[rows, targets])
    if label_smoothing:
        w_y = y.sum(axis=1) if weight is None else y @ weight
        loss_rows += label_smoothing / n_cols * (w_sum * lse - w_y)
    if z_loss:
        loss_rows += z_loss * w_t * lse**2
    loss = np.float32(loss_rows.sum(dtype=np.float64) / big_w)
    if not grad:
        return loss
    coef = ((1 - label_smoothing) * w_t + label_smoothing / n_cols * w_sum + 2 * z_loss * w_t * lse) / total
    g = np.multiply(e, (coef / big_w).astype(np.float32)[:, None], out=e)
    g[rows, targets] -= ((1 - label_smoothing) * w_t / big_w).astype(np.float32)
    if label_smoothing:
        g -= np.float32(label_smoothing / n_cols / big_w) * (1 if weight is None else weight)
    if softcap is not None:
        np.square(y / np.float32(softcap), out=y)
        np.subtract(1, y, out=y)
        g *= y
    if out is None:
        return loss, g.astype(logits.dtype, copy=False)
    np.copyto(out, g, casting="unsafe")
    return loss, out


class NumpyReference(_InPlaceInputs):
    """The NumPy baseline over the whole grid ("in place" writes the gradient into the logits,
    after NumPy's temporaries). Nothing to compile: no warm-up call."""

    params = GRID
    param_names = GRID_NAMES
    timeout = 300
    rounds = 1
    warmup_time = 0

    def setup(self, shape, dtype, options, op):
        pristine = _common.cached_logits(shape, dtype)
        logits = self._logits_for(op, pristine)
        targets = _common.make_targets(shape)
        kwargs = _common.options(options, pristine.shape[1])
        if op != "forward":
            kwargs["grad"] = True
        if op == "forward+backward in place":
            kwargs["out"] = logits
        self.call = functools.partial(numpy_cross_entropy, logits, targets, **kwargs)
        self._refill(op, logits, pristine)
        self.repeat = _repeat_for(shape, (1, 3, 10.0))

    def time_numpy_reference(self, shape, dtype, options, op):
        self.call()


def torch_cross_entropy(torch, logits, targets, *, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """PyTorch's mean ``F.cross_entropy``, with ``softcap`` and ``z_loss`` composed from
    ``torch.tanh`` and ``torch.logsumexp`` as a PyTorch user would write them."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
    if z_loss:
        lse_sq = torch.logsumexp(logits.float(), dim=-1) ** 2
        if weight is None:
            loss = loss + z_loss * lse_sq.mean()
        else:
            w_t = weight[targets].float()
            loss = loss + z_loss * (w_t * lse_sq).sum() / w_t.sum()
    return loss


def torch_call(torch, op: str, x, targets, kwargs: dict) -> Callable[[], object]:
    """PyTorch's side of ``op``: the forward, or forward+backward into ``x``'s gradient (on a
    detached leaf, its gradient cleared each call). PyTorch has no in-place gradient."""
    if op == "forward":
        return functools.partial(torch_cross_entropy, torch, x, targets, **kwargs)
    leaf = x.detach().requires_grad_()

    def forward_backward():
        leaf.grad = None
        torch_cross_entropy(torch, leaf, targets, **kwargs).backward()

    return forward_backward


class Torch:
    """PyTorch on the CPU with Numba's thread count, skipped when it is not installed. It has
    no in-place gradient, so "forward+backward in place" is skipped too."""

    params = GRID
    param_names = GRID_NAMES
    timeout = 300
    rounds = 1
    warmup_time = 0  # setup's warm-up call takes its place

    def setup(self, shape, dtype, options, op):
        if op == "forward+backward in place":
            raise NotImplementedError("PyTorch computes no gradient in place")
        torch = _common.import_torch()
        pristine = _common.cached_logits(shape, dtype)
        x = _common.to_torch(pristine, torch)
        targets = torch.from_numpy(_common.make_targets(shape))
        kwargs = _common.options(options, pristine.shape[1])
        if "weight" in kwargs:
            kwargs["weight"] = torch.from_numpy(kwargs["weight"]).to(x.dtype)
        self.call = torch_call(torch, op, x, targets, kwargs)
        _common.warm_up_once((shape, dtype, options, op), self.call)
        self.repeat = _repeat_for(shape, (1, 3, 10.0))

    def time_torch(self, shape, dtype, options, op):
        self.call()


# ---------------------------------------------------------------------------------------------
# Memory and bandwidth


class PeakMemory:
    """Peak resident memory of a process that makes the inputs and runs one call.

    asv's ``peakmem_`` is the whole process's maximum RSS: the interpreter and libraries, the
    logits (N x V x itemsize), then whatever the call allocates. Read it against "forward",
    which allocates nothing of size N x V: "forward+backward" is about one N x V array above
    it (the new gradient), "forward+backward in place" about level with it. The launch-bound
    shape shows only the baseline.
    """

    params = [SHAPES, DTYPES, OPS]
    param_names = ["shape", "dtype", "op"]
    timeout = 300

    def setup(self, shape, dtype, op):
        self.logits = _common.make_logits(shape, dtype)  # the only N x V array before the call
        self.targets = _common.make_targets(shape)
        # Compile on two rows: the kernels' types do not depend on the size, and a full-size
        # warm-up of "forward+backward" would itself leave its N x V peak behind.
        small = self.logits[:2].copy()
        _common.warm_up_once((dtype, op), nbxent_call(op, small, self.targets[:2], {}))
        self.call = nbxent_call(op, self.logits, self.targets, {})

    def peakmem_nbxent(self, shape, dtype, op):
        self.call()


class Bandwidth(_InPlaceInputs):
    """nbxent's achieved memory bandwidth, and how close it comes to the copy floor.

    Bytes counted: "forward" reads the logits once (N x V x itemsize); "forward+backward in
    place" reads them and writes the gradient over them (twice that), as does "forward+backward
    into out", which writes it to a preallocated array (the bytes of the copy). The floor is a
    parallel copy of the same logits on Numba's threads (``_common.copy_floor``), timed in
    turns with the call in the same setup (reading and writing N x V x itemsize). The fraction
    is nbxent's bytes per second over the copy's; 1 means as fast as a copy, and "forward" can
    exceed it since a pure read avoids the copy's write traffic.

    ``track_time_over_floor`` is issue 5's measure, as ``nbxent bench`` prints it: the call's
    time over its own floor's, a parallel read of the logits (``_common.read_floor``, timed in
    the same turns) for "forward" and the copy for the others (targets: 1.5 at most).
    """

    params = [SHAPES, BANDWIDTH_DTYPES, ["forward", INTO_OUT, "forward+backward in place"]]
    param_names = ["shape", "dtype", "op"]
    timeout = 300

    def setup(self, shape, dtype, op):
        pristine = _common.cached_logits(shape, dtype)
        logits = self._logits_for(op, pristine)
        call = nbxent_call(op, logits, _common.make_targets(shape), {})
        call()  # warm-up: compiles, and faults in every page (of ``out`` too)
        repeats = 51 if _is_small(shape) else 9
        floors = [_common.copy_floor(pristine)]
        if op == "forward":
            floors.append(_common.read_floor(pristine))
        seconds, copy_seconds, *read_seconds = _common.turns_median_seconds(
            [call, *floors], repeats, before=lambda: self._refill(op, logits, pristine)
        )
        moved = pristine.nbytes * (1 if op == "forward" else 2)
        self.gbps = moved / seconds / 1e9
        self.copy_gbps = 2 * pristine.nbytes / copy_seconds / 1e9
        self.over_floor = seconds / (read_seconds[0] if read_seconds else copy_seconds)

    def track_gbps(self, shape, dtype, op):
        return self.gbps

    track_gbps.unit = "GB/s"

    def track_fraction_of_copy_floor(self, shape, dtype, op):
        return self.gbps / self.copy_gbps

    track_fraction_of_copy_floor.unit = "x copy GB/s"

    def track_time_over_floor(self, shape, dtype, op):
        return self.over_floor

    track_time_over_floor.unit = "x floor time"


class CopyFloors:
    """The copy floor that ``Bandwidth`` divides by, beside a copy of the same bytes with
    streaming stores (x86 only; skipped elsewhere).

    A plain store first reads the cache line it writes (so the floor's copy moves three bytes
    for every byte copied); a streaming store of a whole line does not (two). Their ratio is
    how much of the floor that read is; nbxent's kernels use plain stores (docs/cpu.md).
    """

    params = [SHAPES, DTYPES]
    param_names = ["shape", "dtype"]
    timeout = 300

    def setup(self, shape, dtype):
        from nbxent.bench import HAS_STREAM_COPY, parallel_stream_copy

        if not HAS_STREAM_COPY:
            raise NotImplementedError("streaming stores are x86 code")  # asv: skipped
        pristine = _common.cached_logits(shape, dtype)
        src = pristine.view(np.uint16)  # any dtype, copied as 16-bit words
        dst = np.empty_like(src)
        stream = functools.partial(parallel_stream_copy, src, dst)
        stream()  # compiles, and faults in ``dst``
        repeats = 51 if _is_small(shape) else 9
        seconds, copy_seconds = _common.paired_median_seconds(stream, _common.copy_floor(pristine), repeats)
        self.gbps = 2 * pristine.nbytes / seconds / 1e9
        self.copy_gbps = 2 * pristine.nbytes / copy_seconds / 1e9

    def track_streaming_copy_gbps(self, shape, dtype):
        return self.gbps

    track_streaming_copy_gbps.unit = "GB/s"

    def track_streaming_over_copy_floor(self, shape, dtype):
        return self.gbps / self.copy_gbps

    track_streaming_over_copy_floor.unit = "x copy GB/s"


class ComputeFloor:
    """The loss alone's arithmetic without its memory traffic: the kernels' own exp loop run as
    many times as the logits have entries, over one block that stays in L1
    (``nbxent.bench.exp_floor_call``), timed in turns with a parallel read of the logits
    (``_common.read_floor``). Where ``track_over_read_floor`` is above 1, the host's cores,
    not its memory, bound the loss alone. ``ns_per_logit`` (the wall time over the entries,
    all threads together) follows the exp's code from commit to commit (docs/cpu.md).
    """

    params = [SHAPES, BANDWIDTH_DTYPES]
    param_names = ["shape", "dtype"]
    timeout = 300

    def setup(self, shape, dtype):
        from nbxent.bench import exp_floor_call

        pristine = _common.cached_logits(shape, dtype)
        call = exp_floor_call(pristine, np.empty(pristine.shape[0], np.float64))
        call()  # compiles
        repeats = 51 if _is_small(shape) else 9
        seconds, read_seconds = _common.paired_median_seconds(call, _common.read_floor(pristine), repeats)
        self.ns_per_logit = seconds / pristine.size * 1e9
        self.over_read = seconds / read_seconds

    def track_ns_per_logit(self, shape, dtype):
        return self.ns_per_logit

    track_ns_per_logit.unit = "ns"

    def track_over_read_floor(self, shape, dtype):
        return self.over_read

    track_over_read_floor.unit = "x read time"


class FirstCall:
    """A fresh process's import of nbxent and its first call (a fused float32 call on 4x1000
    logits) with the compile cache warm: issue 5's target is 0.5 s. Beside it, Numba's own
    first call, its import and one trivial cached function (``nbxent.bench``'s
    ``NUMBA_FLOOR_MODULE``), which loads the same target context: the floor under nbxent's
    figure. Where SciPy is installed Numba imports it on that first call; "scipy hidden" makes
    that import fail, as where it is not installed (``nbxent bench`` prints the same four).

    Each sample is a new interpreter (asv's ``timeraw_``) that has imported NumPy untimed; the
    timed part starts at ``import nbxent`` (``import numba``). ``setup`` makes one such call
    first, so that no sample compiles.
    """

    params = [["nbxent", "numba alone"], ["scipy as installed", "scipy hidden"]]
    param_names = ["what", "scipy"]
    number = 1
    repeat = (3, 9, 60.0)
    warmup_time = 0
    timeout = 300

    def setup(self, what, scipy):
        import subprocess
        import sys
        import tempfile

        from nbxent.bench import HIDE_SCIPY, NUMBA_FLOOR_MODULE

        self._dir = tempfile.TemporaryDirectory()
        with open(f"{self._dir.name}/nbxent_numba_floor.py", "w") as f:
            f.write(NUMBA_FLOOR_MODULE)
        self._setup = f"import sys\nsys.path.insert(0, {self._dir.name!r})\nimport numpy as np\n"
        if scipy == "scipy hidden":
            self._setup = HIDE_SCIPY + self._setup
        if what == "nbxent":
            self._stmt = (
                "import nbxent\nnbxent.cross_entropy_with_grad(np.zeros((4, 1000), np.float32), np.zeros(4, np.int64))"
            )
        else:
            self._stmt = "import numba\nimport nbxent_numba_floor\nnbxent_numba_floor.first(np.zeros(4))"
        subprocess.run([sys.executable, "-c", self._setup + self._stmt], check=True)  # fills the cache

    def teardown(self, what, scipy):
        self._dir.cleanup()

    def timeraw_first_call(self, what, scipy):
        return self._stmt, self._setup


class FewRows:
    """Calls with fewer rows than threads, on one thread and on all: since commit f9dea21 each
    row's vocabulary is split among the threads (``nbxent._cpu_split``), with the same bits as
    one thread a row, so "all" over "1" is what the split gains. The 4x10 rows are the fixed
    cost of a call (the checks and the dispatch), which no thread count changes."""

    params = [
        ["1x140000"] if _common.QUICK else ["4x10", "1x256000", "1x1024000"],
        ["forward", INTO_OUT],
        ["1", "all"],
    ]
    param_names = ["shape", "op", "threads"]
    warmup_time = 0

    def setup(self, shape, op, threads):
        import numba

        self._threads = numba.get_num_threads()
        numba.set_num_threads(1 if threads == "1" else self._threads)
        logits = _common.cached_logits(shape, "float32")
        self.call = nbxent_call(op, logits, _common.make_targets(shape), {})
        _common.warm_up_once((shape, op, threads, "few rows"), self.call)
        self.repeat = (10, 200, 1.0)

    def teardown(self, shape, op, threads):
        import numba

        numba.set_num_threads(self._threads)

    def time_few_rows(self, shape, op, threads):
        self.call()


class ShortRows:
    """Many rows of few logits (classification, V = 10 or 100; 24, the widest rows the tiny
    kernels put in SIMD lanes; 512, the widest the short kernels take), nbxent beside PyTorch
    on the same threads. When this was added, such a row cost about 150 ns besides its logits and
    PyTorch was 1.9-4.3x faster at V = 10; since the short-row kernels (``_cpu_short``,
    docs/cpu.md item 7) the two are close. "torch" over "nbxent" tracks the gap. "torch" is
    skipped where PyTorch is not installed."""

    params = [
        ["64x10"] if _common.QUICK else ["4096x10", "65536x10", "32768x24", "8192x100", "8192x512"],
        ["forward", INTO_OUT],
        ["nbxent", "torch"],
    ]
    param_names = ["shape", "op", "library"]
    warmup_time = 0

    def setup(self, shape, op, library):
        logits = _common.cached_logits(shape, "float32")
        targets = _common.make_targets(shape)
        if library == "nbxent":
            self.call = nbxent_call(op, logits, targets, {})
        else:
            torch = _common.import_torch()
            self.call = torch_call(torch, op, _common.to_torch(logits, torch), torch.from_numpy(targets), {})
        _common.warm_up_once((shape, op, library, "short rows"), self.call)
        self.repeat = (10, 50, 1.0)

    def time_short_rows(self, shape, op, library):
        self.call()
