"""The C API (csrc/based.h) compiled and run from plain C, without Python (SPEC 5)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "no-openmp"])
def test_c_api_program(tmp_path, openmp):
    """Builds warning-free with and without OpenMP (setup.py drops -fopenmp, and adds
    -Wno-unknown-pragmas, where the compiler has no OpenMP) and passes either way."""
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.c"))
    exe = tmp_path / "test_c_api"
    omp = ["-fopenmp"] if openmp else ["-Wno-unknown-pragmas"]
    cmd = ["cc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", *omp, f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "c" / "test_c_api.c"), *sources, "-lm", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "all checks passed" in run.stdout


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_cuda_dispatch_program(tmp_path):
    """tests/c/test_cuda_dispatch.c: the C core built as for a CUDA build (-DBASED_WITH_CUDA),
    with a stand-in for kernels/ that records each call -- the seam, on any machine (no nvcc,
    no GPU): which CUDA function each op reaches, with which checked arguments and stream,
    and which calls the shared checks refuse first."""
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.c"))
    exe = tmp_path / "test_cuda_dispatch"
    cmd = ["cc", "-std=c11", "-O0", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-DBASED_WITH_CUDA",
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'kernels'}", str(ROOT / "tests" / "c" / "test_cuda_dispatch.c"),
           *sources, "-lm", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr}"
    assert "all checks passed" in run.stdout
