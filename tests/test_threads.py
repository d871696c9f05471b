"""Threads of the CPU ops: based.set_num_threads / get_num_threads, the default (OpenMP's
count, which torch.set_num_threads sets too, capped at the CPUs of the process), and the
per-thread minimum of work below which a call stays on the calling thread (csrc/internal.h,
based_threads_for). Thread counts are read in fresh processes, where the OpenMP settings
are what the test gives, and parallel regions are seen by the OS threads they create."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import based
from conftest import requires_torch

REPO = str(Path(__file__).resolve().parent.parent)
LINUX = sys.platform.startswith("linux")


def _run(script: str, env: dict | None = None, args: tuple = ()) -> str:
    """Runs script in a fresh interpreter with based importable; OMP_* and BASED_PARALLEL_*
    variables come only from env. Returns stdout; fails the test on a non-zero exit."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "BASED_PARALLEL_"))}
    base["PYTHONPATH"] = REPO + os.pathsep + base.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script, *args], env={**base, **(env or {})}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture
def restore_threads():
    yield
    based.set_num_threads(0)


def test_set_num_threads_sets_the_count_and_zero_restores_the_default(restore_threads):
    default = based.get_num_threads()
    assert default >= 1
    for n in (1, 3, 7):
        based.set_num_threads(n)
        assert based.get_num_threads() == n
        assert based.build_info()["num_threads"] == n
    based.set_num_threads(0)
    assert based.get_num_threads() == default


@pytest.mark.parametrize("n, error, words", [
    (-1, ValueError, "n must be between 0 and 2147483647, got -1"),
    (2**31, ValueError, "got 2147483648"),
    (True, TypeError, "n must be an int, got bool"),
    (1.0, TypeError, "n must be an int, got float"),
    ("2", TypeError, "n must be an int, got str"),
])
def test_set_num_threads_refuses_bad_counts_and_changes_nothing(restore_threads, n, error, words):
    based.set_num_threads(2)
    with pytest.raises(error, match=words):
        based.set_num_threads(n)
    assert based.get_num_threads() == 2


def test_set_num_threads_takes_integer_scalars_of_numpy_and_torch(restore_threads):
    """Counts are read with operator.index: numpy (and torch) integer scalars are ints, numpy
    and torch bools are not."""
    import numpy as np

    based.set_num_threads(np.int64(3))
    assert based.get_num_threads() == 3
    based.set_num_threads(np.uint8(2))
    assert based.get_num_threads() == 2
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        based.set_num_threads(np.bool_(True))
    with pytest.raises(TypeError, match="n must be an int, got ndarray"):
        based.set_num_threads(np.array([4]))
    assert based.get_num_threads() == 2


@requires_torch
def test_set_num_threads_takes_torch_integer_scalars(restore_threads):
    import torch

    based.set_num_threads(torch.tensor(3))
    assert based.get_num_threads() == 3
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        based.set_num_threads(torch.tensor(True))
    assert based.get_num_threads() == 3


def test_the_c_entry_point_refuses_a_negative_count(restore_threads):
    with pytest.raises(ValueError, match="n must be >= 1 .or 0 for the default., got -3"):
        based._C.set_num_threads(-3)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs os.sched_getaffinity")
def test_default_is_omp_num_threads_capped_at_the_cpus_of_the_process():
    cpus = len(os.sched_getaffinity(0))
    script = "import based; print(based.get_num_threads())"
    assert int(_run(script, {"OMP_NUM_THREADS": "1"})) == 1
    assert int(_run(script, {"OMP_NUM_THREADS": "1000"})) == min(1000, cpus)
    assert int(_run(script)) == cpus
    # the cap is the CPUs the process may run on now, not those of the machine
    pinned = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " + script
    assert int(_run(pinned, {"OMP_NUM_THREADS": "4"})) == 1
    # an explicit count is taken as given
    assert int(_run("import based; based.set_num_threads(5); print(based.get_num_threads())")) == 5


_FOLLOWS_TORCH = """
import sys
first, second = sys.argv[1:3]
mods = {name: __import__(name) for name in (first, second)}
torch, based = mods["torch"], mods["based"]
runtimes = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line or "libomp" in line})
torch.set_num_threads(1)
print(len(runtimes), based.get_num_threads())
based.set_num_threads(2)
print(torch.get_num_threads(), based.get_num_threads())
"""


@requires_torch
@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
@pytest.mark.parametrize("order", [("torch", "based"), ("based", "torch")])
def test_default_follows_torch_set_num_threads(order):
    """torch and based map one OpenMP runtime whichever is imported first (torch's wheel
    ships a libgomp.so.1 of the same soname), so torch.set_num_threads(1) also makes based's
    default 1; based.set_num_threads leaves torch's count alone."""
    first, second = _run(_FOLLOWS_TORCH, args=order).split("\n")[:2]
    runtimes, ours = map(int, first.split())
    assert runtimes == 1, "torch and based loaded two OpenMP runtimes"
    assert ours == 1
    assert second.split() == ["1", "2"]


# Counts the OS threads of the process around CPU ops: OpenMP creates its worker threads at
# the first parallel region with more than one thread and keeps them, so a call that starts
# none leaves the count as it was. Sizes are those of the bundled demo model (4 heads of 64,
# window 128, Dk 16) at a 58-token prompt.
_COUNT_THREADS = r"""
import os, sys
import numpy as np
import based

def threads():
    return len(os.listdir("/proc/self/task"))

rng = np.random.default_rng(0)
x = lambda *s: rng.standard_normal(s).astype(np.float32)
B, H, W, D, T = 1, 4, 128, 64, 58
based.set_num_threads(1)   # the caches and states are filled on one thread
_, cache = based.sliding_window_prefill(x(B, W, H, D), x(B, W, H, D), x(B, W, H, D), window=W)
_, state = based.linear_attention_prefill(x(B, 1, H, 16), x(B, 1, H, 16), x(B, 1, H, 64))
_, big_cache = based.sliding_window_prefill(x(4, W, H, D), x(4, W, H, D), x(4, W, H, D), window=W)
based.set_num_threads(2)   # 2 whatever the CPUs of the machine: the test is the work rule
before = threads()
# a window decode step over a full cache of 4 x 128 x 64 x 4 B x 2 = 256 KiB
based.sliding_window_decode(x(B, H, D), x(B, H, D), x(B, H, D), cache)
# a 58-token window prefill: 58 * 59 / 2 keys of 4 x 2 x 64 multiply-adds, < 2^20 (by the keys
# each query has, not W per query)
based.sliding_window_prefill(x(B, T, H, D), x(B, T, H, D), x(B, T, H, D), window=W)
# a linear-attention decode step on 4 x 153 x 64 float32 state (157 KB)
based.linear_attention_decode(x(B, H, 16), x(B, H, 16), x(B, H, 64), state)
small = threads()
# 4 sequences: a 1 MiB cache, 512 KiB per thread
based.sliding_window_decode(x(4, H, D), x(4, H, D), x(4, H, D), big_cache)
print(before, small, threads())
"""


@pytest.mark.skipif(not LINUX or not based.build_info()["openmp"], reason="reads /proc/self/task; needs OpenMP")
def test_small_calls_run_on_the_calling_thread():
    """The demo's decode steps and a short window prefill start no OpenMP thread (each thread
    would get less than the minimum of work), a decode step over 1 MiB of cache starts one,
    and BASED_PARALLEL_ANY_SIZE=1 (for tests) starts threads for the small calls too."""
    before, small, big = map(int, _run(_COUNT_THREADS).split())
    assert small == before, f"small calls started {small - before} threads"
    assert big == before + 1
    before, small, big = map(int, _run(_COUNT_THREADS, {"BASED_PARALLEL_ANY_SIZE": "1"}).split())
    assert small == before + 1


@requires_torch
def test_demo_threads_option():
    r = subprocess.run([sys.executable, "-m", "based", "demo", "--max-new-tokens", "3", "--threads", "1"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 0, r.stderr
    assert "CPU threads      PyTorch 1, based 1 " in r.stdout
    r = subprocess.run([sys.executable, "-m", "based", "demo", "--threads", "-1"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 2 and "--threads must be >= 1 (or 0 for the default)" in r.stderr


