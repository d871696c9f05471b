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


def test_cli_help_and_info():
    r = run("-m", "based", "--help")
    assert r.returncode == 0 and "info" in r.stdout
    r = run("-m", "based", "info")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == based.__version__
