"""Shared helpers for the CPU benchmarks: timing, machine baselines measured in the same
run (FMA peak, in-place memory stream), machine description and Markdown tables.

Timing on a shared machine is noisy: ``timeit`` reports the minimum and the median of
several repeats (the minimum is the least disturbed run); compare ratios measured in the
same run rather than absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent


def bench_args(description: str, quick_help: str, extra: Callable | None = None) -> argparse.Namespace:
    """The options every CPU benchmark takes (--quick, --rounds, --threads), plus those that
    extra(parser) adds. Call it before importing torch or based: --threads is applied through
    OMP_NUM_THREADS, which OpenMP reads once, when it loads."""
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat every measurement this many times, keep the best (default 3)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for based (OpenMP) and torch; default all cores (set before OpenMP loads)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    return args


def timeit(fn: Callable[[], object], *, repeat: int = 7, min_time: float = 0.05, warmup: int = 1) -> dict:
    """Seconds per call of fn: {'min', 'median', 'calls'}. Each of ``repeat`` samples runs fn
    enough times to last >= min_time, so short calls are timed in batches."""
    for _ in range(warmup):
        fn()
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time or calls >= 1 << 20:
            break
        calls *= 2 if dt < min_time / 8 else max(2, int(min_time / max(dt, 1e-9)) + 1)
    samples = [dt / calls]
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return {"min": min(samples), "median": statistics.median(samples), "calls": calls}


def timeit_each(fns: dict, *, repeat: int = 7, min_time: float = 0.05) -> dict:
    """timeit for several functions, one after the other: {name: {'min', 'median', 'calls'}}.
    Each function gets its own block of samples rather than being interleaved with the
    others: two libraries with their own OpenMP pools (based's and torch's) would otherwise
    have one pool's idle threads spinning on the cores while the other runs. Repeat whole
    rounds (merge_best) to spread the noise of a shared machine over the contenders."""
    out = {}
    for name, fn in fns.items():
        time.sleep(0.05)              # let the previous contender's idle threads stop spinning
        out[name] = timeit(fn, repeat=repeat, min_time=min_time)
    return out


def merge_best(acc: dict, new: dict) -> dict:
    """Folds one round of timeit_each results into acc: the best 'min' over rounds
    (noise from elsewhere only ever slows a run down) and the median of the rounds' medians."""
    for name, r in new.items():
        if name not in acc:
            acc[name] = {"min": r["min"], "medians": [r["median"]], "calls": r["calls"]}
        else:
            acc[name]["min"] = min(acc[name]["min"], r["min"])
            acc[name]["medians"].append(r["median"])
        acc[name]["median"] = statistics.median(acc[name]["medians"])
    return acc


# ---------------------------------------------------------------------------------------
# Machine baselines (benchmarks/native.c, compiled here at run time)
# ---------------------------------------------------------------------------------------

_NATIVE = None


def native():
    """The ctypes library of benchmarks/native.c, built once per process with cc."""
    global _NATIVE
    if _NATIVE is not None:
        return _NATIVE
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("the machine baselines need a C compiler (cc)")
    out = Path(tempfile.mkdtemp(prefix="based-bench-")) / "native.so"
    base = [cc, "-O3", "-fopenmp", "-shared", "-fPIC", str(HERE / "native.c"), "-o", str(out)]
    # the stream baseline should be as fast as this machine allows: build it for this CPU
    if subprocess.run(base[:2] + ["-march=native"] + base[2:], capture_output=True).returncode != 0:
        subprocess.run(base, check=True)
    lib = ctypes.CDLL(str(out))
    lib.bench_fma_peak.restype = ctypes.c_double
    lib.bench_fma_peak.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.bench_fma_is_avx2.restype = ctypes.c_int
    lib.bench_stream.restype = ctypes.c_double
    lib.bench_stream.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    _NATIVE = lib
    return lib


def fma_peak_gflops(threads: int, repeat: int = 5) -> float:
    """Measured float32 FMA peak of `threads` cores in GFLOP/s (best of `repeat`)."""
    lib = native()
    return max(lib.bench_fma_peak(threads, 20_000_000) for _ in range(repeat))


def stream_seconds(nbytes: int, threads: int, repeat: int = 7) -> float:
    """Seconds to read and write nbytes once in place (x = x * 1 + 0 over float32), best of
    `repeat` runs of several passes each, on `threads` threads."""
    n = max(nbytes // 4, 1)
    x = np.ones(n, np.float32)
    lib = native()
    reps = max(1, int(2e8 // max(nbytes, 1)))
    lib.bench_stream(x.ctypes.data, n, threads, 1)                  # warm (page in, caches)
    return min(lib.bench_stream(x.ctypes.data, n, threads, reps) for _ in range(repeat))


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def git_commit(tree: Path = HERE.parent) -> str:
    """The commit a benchmark measures: $BASED_COMMIT when set (for a copy of the tree whose
    git history is stale or missing, as on the borrowed GPU machine), else the short hash of
    HEAD in ``tree``, marked "(uncommitted changes)" when tracked files differ from it;
    "unknown" without git."""
    if os.environ.get("BASED_COMMIT"):
        return os.environ["BASED_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + (" (uncommitted changes)" if head and dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary(threads: int) -> str:
    import based

    info = based.build_info()
    parts = [f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads} threads used",
             f"based {info['version']} (OpenMP {info['openmp']})", f"Python {sys.version.split()[0]}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    try:
        parts.append(f"load average {os.getloadavg()[0]:.2f}")
    except OSError:
        pass
    return "; ".join(parts)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
