"""The C API (csrc/based.h) compiled and run from plain C, without Python (SPEC 5)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_c_api_program(tmp_path):
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.c"))
    exe = tmp_path / "test_c_api"
    cmd = ["cc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-fopenmp", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "c" / "test_c_api.c"), *sources, "-lm", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "all checks passed" in run.stdout
