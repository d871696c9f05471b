"""Build of based's extension module, based._C.

The C core (csrc/*.c) and the CPython bindings (csrc/python/*.c) are always built:
C11, -O3, OpenMP when the compiler has it. When nvcc is found, kernels/*.cu are
compiled and linked into the same extension with the static CUDA runtime, so the
module imports on machines without a GPU or driver. Nothing is downloaded.

Environment knobs:
  BASED_CUDA=0|1        0: never build CUDA; 1: require nvcc (error if missing);
                        unset: build CUDA when nvcc is found.
  BASED_CUDA_ARCHS      ';'-separated compute capabilities, default "80;86;89;90"
                        (A100, RTX 30xx/A10, RTX 40xx/L4, H100/H200); PTX is embedded
                        for the newest so later GPUs can JIT it.
  BASED_NVCC            path to nvcc (default: $CUDA_HOME/bin/nvcc, then PATH).
  BASED_WERROR=1        treat compiler warnings as errors (CI sets it).
  BASED_BUILD_JOBS      nvcc processes at once (default: the number of cores).
  BASED_NATIVE=1        add -march=native (faster, not portable: local builds only).
"""

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;86;89;90"


def env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 0 or 1, got {value!r}")


def find_nvcc():
    candidates = [os.environ.get("BASED_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_cudart_static(nvcc):
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    homes.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    try:  # nvcc may be a wrapper script; ask it where its toolkit lives
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        for line in out.splitlines():
            if "_TOP_=" in line:
                homes.append(line.split("_TOP_=", 1)[1].strip())
    except OSError:
        pass
    homes.append("/usr/local/cuda")
    for home in homes:
        if not home:
            continue
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            lib = Path(home) / sub / "libcudart_static.a"
            if lib.exists():
                return str(lib), str(Path(home) / "include")
    return None, None


def cuda_archs():
    raw = os.environ.get("BASED_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.rstrip("a").isdigit():
            raise SystemExit(f"BASED_CUDA_ARCHS: {a!r} is not a compute capability like 90")
    return archs


class BuildExt(build_ext):
    def build_extensions(self):
        werror = env_flag("BASED_WERROR")
        ext = self.extensions[0]
        cflags = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fvisibility=hidden"]
        if werror:
            cflags.append("-Werror")
        if env_flag("BASED_NATIVE"):
            cflags.append("-march=native")
        if self._has_openmp():
            cflags.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        else:
            cflags.append("-Wno-unknown-pragmas")
            print("based: the C compiler has no OpenMP; CPU kernels will run on one thread", file=sys.stderr)

        want_cuda = env_flag("BASED_CUDA")
        nvcc = find_nvcc() if want_cuda is not False else None
        if want_cuda and nvcc is None:
            raise SystemExit("BASED_CUDA=1 but no nvcc was found (set BASED_NVCC or CUDA_HOME)")
        if nvcc:
            archs = cuda_archs()
            cudart, cuda_include = find_cudart_static(nvcc)
            if cudart is None:
                raise SystemExit(f"nvcc found at {nvcc} but libcudart_static.a was not; set CUDA_HOME")
            ext.extra_objects.extend(self._compile_cuda(nvcc, archs, werror))
            ext.extra_objects.append(cudart)
            # the kernels' host code is C++ compiled by nvcc: its launch stubs use guarded
            # function-local statics (__cxa_guard_*) and unwinding (__gxx_personality_v0),
            # which live in libstdc++; the extension is linked by the C compiler, so name it
            ext.libraries.extend(["stdc++", "rt", "pthread", "dl"])
            ext.define_macros.append(("BASED_WITH_CUDA", "1"))
            ext.define_macros.append(("BASED_CUDA_ARCHS", '"' + ";".join(archs) + '"'))
            print(f"based: building CUDA kernels with {nvcc} for sm_{', sm_'.join(archs)}", file=sys.stderr)
        else:
            print("based: no nvcc (or BASED_CUDA=0): building the CPU-only extension", file=sys.stderr)
        ext.extra_compile_args.extend(cflags)
        super().build_extensions()

    def _has_openmp(self):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "omp.c"
            src.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            try:
                objs = self.compiler.compile([str(src)], output_dir=tmp, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objs, "omp", output_dir=tmp, extra_postargs=["-fopenmp"])
                return True
            except Exception:
                return False

    def _compile_cuda(self, nvcc, archs, werror):
        sources = sorted((ROOT / "kernels").glob("*.cu"))
        out_dir = Path(self.build_temp) / "kernels"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        newest = max(archs, key=lambda a: int(a.rstrip("a")))
        gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
        host = "-fPIC,-Wall,-Wextra,-fvisibility=hidden" + (",-Werror" if werror else "")
        commands, objects = [], []
        for src in sources:
            obj = out_dir / (src.stem + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", host,
                   "-I", str(ROOT / "csrc"), "-I", str(ROOT / "kernels"), *gencode]
            if werror:
                cmd += ["-Werror", "all-warnings"]
            commands.append(cmd)
            objects.append(str(obj))
        # one nvcc per source file, as many at once as there are cores (BASED_BUILD_JOBS)
        jobs = int(os.environ.get("BASED_BUILD_JOBS", "0")) or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for cmd, result in zip(commands, pool.map(lambda c: subprocess.run(c, capture_output=True, text=True),
                                                      commands)):
                print("based: " + " ".join(cmd), file=sys.stderr)
                sys.stderr.write(result.stdout + result.stderr)
                if result.returncode != 0:
                    raise SystemExit(f"based: nvcc failed on {cmd[2]} (exit {result.returncode})")
        return objects


sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c"))
sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "python").glob("*.c"))

setup(
    ext_modules=[
        Extension(
            "based._C",
            sources=sources,
            include_dirs=["csrc"],
            depends=[str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.h")]
            + [str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*")],
            extra_compile_args=[],
            extra_link_args=[],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
