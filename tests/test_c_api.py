"""The C API (csrc/based.h) compiled and run from plain C, without Python (SPEC 5)."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import based

ROOT = Path(__file__).resolve().parent.parent


def find_nvcc():
    """nvcc as setup.py looks for it (BASED_NVCC, CUDA_HOME, CUDA_PATH, PATH), or None."""
    candidates = [os.environ.get("BASED_NVCC")]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuda_include_dirs(nvcc):
    """The include directories nvcc passes to the host compiler (where cuda_runtime.h lives)."""
    run = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True)
    for line in (run.stdout + run.stderr).splitlines():
        if "INCLUDES=" in line:
            flags = shlex.split(line.split("INCLUDES=", 1)[1])
            return [f[2:] for f in flags if f.startswith("-I")]
    return []


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


@pytest.mark.skipif(shutil.which("c++") is None or find_nvcc() is None, reason="needs a C++ compiler and the CUDA headers")
def test_cuda_layout_kernels_on_host(tmp_path):
    """kernels/state.cu and kernels/feature_map.cu built with the host C++ compiler
    (BASED_KERNELS_ON_HOST: each launch runs its element loops on the CPU, the CUDA runtime is
    stood in for) against plain loops: index math, staging between devices, streams -- no GPU."""
    includes = [f"-I{d}" for d in cuda_include_dirs(find_nvcc())]
    flags = ["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-DBASED_KERNELS_ON_HOST",
             "-include", str(ROOT / "tests" / "c" / "cuda_host_shim.h"), *includes, f"-I{ROOT / 'csrc'}",
             f"-I{ROOT / 'kernels'}"]
    objects = []
    for name in ("state", "feature_map"):
        obj = tmp_path / f"{name}.o"
        build = subprocess.run(["c++", *flags, "-x", "c++", "-c", str(ROOT / "kernels" / f"{name}.cu"), "-o",
                                str(obj)], capture_output=True, text=True)
        assert build.returncode == 0, build.stderr
        objects.append(str(obj))
    exe = tmp_path / "test_cuda_on_host"
    build = subprocess.run(["c++", *flags, str(ROOT / "tests" / "c" / "test_cuda_on_host.cpp"), *objects, "-o",
                            str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "all checks passed" in run.stdout


@pytest.mark.skipif(not based.cuda_available() or find_nvcc() is None or shutil.which("cc") is None,
                    reason="needs a CUDA build of based, a GPU, nvcc and a C compiler")
def test_c_api_program_on_cuda(tmp_path):
    """tests/c/test_c_api_cuda.c: the C API with device pointers and a stream, from plain C,
    against the same calls on host tensors. Built as setup.py builds the extension (kernels/
    with nvcc, csrc/ with -DBASED_WITH_CUDA), for this machine's GPU only (-arch=native)."""
    nvcc = find_nvcc()
    kernels = sorted((ROOT / "kernels").glob("*.cu"))
    procs = []  # the .cu files compile in parallel
    for src in kernels:
        obj = tmp_path / f"cu_{src.stem}.o"
        procs.append((src, obj, subprocess.Popen(
            [nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "-arch=native", "-I", str(ROOT / "csrc"),
             "-I", str(ROOT / "kernels")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    objects = []
    for src in sorted((ROOT / "csrc").glob("*.c")):
        obj = tmp_path / f"c_{src.stem}.o"
        build = subprocess.run(["cc", "-std=c11", "-O2", "-Wno-unknown-pragmas", "-DBASED_WITH_CUDA",
                                f"-I{ROOT / 'csrc'}", "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        assert build.returncode == 0, build.stderr
        objects.append(str(obj))
    test_obj = tmp_path / "test_c_api_cuda.o"
    includes = [f"-I{d}" for d in cuda_include_dirs(nvcc)]
    build = subprocess.run(["cc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", *includes, f"-I{ROOT / 'csrc'}",
                            "-c", str(ROOT / "tests" / "c" / "test_c_api_cuda.c"), "-o", str(test_obj)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    for src, obj, proc in procs:
        out, _ = proc.communicate()
        assert proc.returncode == 0, f"{src.name}:\n{out}"
        objects.append(str(obj))
    exe = tmp_path / "test_c_api_cuda"
    link = subprocess.run([nvcc, str(test_obj), *objects, "-o", str(exe), "-lm"], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
