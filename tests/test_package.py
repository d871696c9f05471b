"""The package imports anywhere (with or without a GPU or driver) and its CLI answers."""

import json
import subprocess
import sys

import based


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_import_and_cuda_probe_in_a_fresh_process():
    r = run("-c", "import based; print(based.__version__, based.cuda_available())")
    assert r.returncode == 0, r.stderr
    version, cuda = r.stdout.split()
    assert version == based.__version__ and cuda in ("True", "False")


def test_build_info():
    info = based.build_info()
    assert info["version"] == based.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["cuda_devices"] >= 0
    if not info["cuda"]:
        assert not based.cuda_available()
        assert info["cuda_archs"] == ""
    # SPEC 1: Dk in 1..32, D in 1..256; the Python layer states the C core's limits, not its own
    assert info["limits"] == {"max_ndim": 16, "max_feature_dim": 32, "max_chunk_size": 1024, "max_head_dim": 256,
                              "max_feature_map_dim": 3037000498}
    assert based.linear_attention.MAX_FEATURE_DIM == 32 and based.sliding_window.MAX_HEAD_DIM == 256


def test_cli_help_and_info():
    r = run("-m", "based", "--help")
    assert r.returncode == 0 and "info" in r.stdout
    r = run("-m", "based", "info")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == based.__version__


def test_build_info_names_the_cpu_kernels():
    kernels = based.build_info()["cpu_kernels"]
    assert kernels["linear_attention"] in ("avx2+fma", "generic")
    assert kernels["sliding_window"] in ("avx512", "avx2", "generic")


def test_unknown_cpu_isa_is_refused_and_generic_is_honoured():
    import os

    env = {**os.environ, "BASED_CPU_ISA": "avx9000"}
    r = subprocess.run([sys.executable, "-c", "import based"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "BASED_CPU_ISA='avx9000' is not understood" in r.stderr
    env["BASED_CPU_ISA"] = "generic"
    show = "import based; k = based.build_info()['cpu_kernels']; print(k['linear_attention'], k['sliding_window'])"
    r = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["generic", "generic"], r.stderr
    env["BASED_CPU_ISA"] = "avx2"
    r = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[1] in ("avx2", "generic"), r.stderr


def test_cli_survives_a_closed_pipe():
    import os

    r = subprocess.run(f"{sys.executable} -m based demo --max-new-tokens 300 | head -c 10", shell=True,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr
