"""The command line: ``nbxent bench`` (the main job) and ``nbxent info``."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata


def _shape(text: str) -> tuple[int, int]:
    try:
        n_rows, n_cols = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not of the form NxV, e.g. 2048x32000") from None
    if n_rows < 1 or n_cols < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} needs N >= 1 and V >= 1")
    return n_rows, n_cols


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cuda_status() -> str:
    """Whether a CUDA GPU is usable, in words (imports numba.cuda only here)."""
    try:
        from numba import cuda
    except ImportError as e:
        return f"no (numba-cuda not importable: {e}; pip install 'nbxent[cuda]')"
    try:
        if cuda.is_available():
            return f"yes ({cuda.get_current_device().name})"
        return "no (no CUDA driver or GPU found)"
    except Exception as e:  # a broken driver or toolkit reports here
        return f"no ({e})"


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of a Linux ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _vector_isa(features: dict[str, bool]) -> str:
    """The widest vector instruction set in LLVM's host features, as the kernels can use it."""
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2 (no AVX-512)"), ("avx", "AVX"), ("sve", "SVE"),
                       ("neon", "NEON"), ("sse2", "SSE2")):  # fmt: skip
        if features.get(flag):
            return name
    return "no vector ISA LLVM names"


def cpu_description() -> str:
    """The CPU the kernels run on, in one line: its model (with the x86 family and model
    numbers on Linux, which tell generations apart where a virtual machine's name does not),
    the core LLVM compiles for, the widest vector instruction set, and the L2 cache of one
    core. ``nbxent bench`` prints it above its table, so that a figure says which machine
    gave it (a cloud VM of one name can land on hosts of different generations)."""
    import llvmlite.binding as ll

    parts = []
    try:
        with open("/proc/cpuinfo") as f:
            fields = _cpuinfo_fields(f.read())
    except OSError:
        fields = {}
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (x86 family {fields['cpu family']} model {fields['model']})"
    parts.append(name)
    parts.append(f"LLVM target {ll.get_host_cpu_name()}")
    try:  # llvmlite raises where it cannot read the host's features
        features = dict(ll.get_host_cpu_features())
    except RuntimeError:
        features = {}
    parts.append(_vector_isa(features) if features else "vector ISA unknown")
    from ._cpu import l2_cache_bytes

    l2 = l2_cache_bytes()
    if l2:
        parts.append(f"L2 {l2 >> 20} MB per core" if l2 % (1 << 20) == 0 else f"L2 {l2 >> 10} KB per core")
    return ", ".join(parts)


def info() -> str:
    import numba
    import numpy as np

    import nbxent

    threads = numba.get_num_threads()  # starts the threading layer, which threading_layer() needs
    lines = [
        f"nbxent          {nbxent.__version__}",
        f"python          {platform.python_version()} ({sys.executable})",
        f"platform        {platform.platform()}",
        f"cpu             {cpu_description()}",
        f"numpy           {np.__version__}",
        f"numba           {numba.__version__} (llvmlite {_version('llvmlite')})",
        f"numba-cuda      {_version('numba-cuda')}",
        f"ml_dtypes       {_version('ml_dtypes')}",
        f"torch           {_version('torch')}",
        f"threading layer {numba.threading_layer()}",
        f"threads         {threads} of {numba.config.NUMBA_NUM_THREADS}",
        f"CUDA usable     {cuda_status()}",
    ]
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> str:
    import numba

    from . import bench as b

    if args.threads:
        numba.set_num_threads(args.threads)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = b.run(
        args.shapes or b.DEFAULT_SHAPES,
        args.dtype,
        args.repeats,
        with_torch=not args.no_torch,
        with_numpy=not args.no_numpy,
        progress=progress,
    )
    out = [
        f"nbxent bench: {numba.get_num_threads()} threads, median of {args.repeats}; × floor is the time over "
        "one copy of the logits (forward: one read)",
        f"cpu: {cpu_description()}",
        "",
        b.format_table(rows),
    ]
    if not args.no_first_call:
        progress("first call in a fresh process (cold compile, then warm cache)")
        runs = 5
        first = b.first_call_seconds(runs)
        line = (
            f"first call in a new process (import + fused float32 call): cold {first.cold:.2f} s, warm "
            f"{first.warm:.2f} s (median of {runs}); Numba's own floor under it (import + a trivial cached "
            f"function) {first.numba_floor:.2f} s"
        )
        if first.warm_no_scipy is not None:
            line += (
                f". SciPy is installed, and Numba imports it on its first call; with SciPy hidden, as "
                f"where it is not installed: warm {first.warm_no_scipy:.2f} s, floor {first.numba_floor_no_scipy:.2f} s"
            )
        out += ["", line]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbxent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_bench = sub.add_parser("bench", help="time nbxent against the memory floor, NumPy and PyTorch")
    p_bench.add_argument(
        "--shapes", type=_shape, nargs="+", help="NxV shapes (default: 2048x32000 512x128256 256x256000)"
    )
    p_bench.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p_bench.add_argument("--threads", type=_positive, help="Numba (and PyTorch) threads (default: all)")
    p_bench.add_argument("--repeats", type=_positive, default=7, help="timed calls per figure (median)")
    p_bench.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    p_bench.add_argument("--no-numpy", action="store_true", help="skip the NumPy peer")
    p_bench.add_argument("--no-first-call", action="store_true", help="skip the cold/warm first-call probe")
    sub.add_parser("info", help="versions, threading layer, threads, CUDA")
    args = parser.parse_args(argv)
    if args.command == "bench" and args.threads:
        import numba

        if args.threads > (most := numba.config.NUMBA_NUM_THREADS):
            p_bench.error(f"argument --threads: {args.threads} is more than Numba's {most} threads on this machine")
    if args.command == "info":
        print(info())
    else:
        print(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
