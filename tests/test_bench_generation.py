"""benchmarks/bench_generation.py --quick runs every section on the CPU (tiny shapes, eager
steps) without an error, its decode check passes, and the JSON and plots it writes hold what
the notebook and the README read. The GPU run itself is the lead's (see the script's docstring)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_generation.py")


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, SCRIPT, "--device", "cpu", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)


def test_quick_run_writes_every_section(tmp_path):
    out, plots = tmp_path / "gen.json", tmp_path / "plots"
    r = run("--quick", "--out", str(out), "--plots", str(plots))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["errors"] == {}, res["errors"]
    assert res["meta"]["quick"] and res["meta"]["device"] == "cpu"
    assert res["check"]["passed"] and res["check"]["float32"]["eager_vs_model_step"] <= 1e-4
    gen = res["generation"]
    for key in ("based-1.3b", "based-torch-1.3b", "transformer-1.3b"):
        assert gen[key]["tok_per_ms"] > 0, key
    b = gen["based-1.3b"]
    assert b["floor_bytes"]["total"] == sum(v for k, v in b["floor_bytes"].items() if k != "total")
    assert set(b["breakdown_ms"]) == {"gemm_only", "mixer_only", "gemm_and_mixer"}
    assert b["vs_transformer"] > 0 and b["vs_based_torch"] > 0
    assert [row["batch"] for row in res["batch_sweep"]["transformer-1.3b"]] == [1, 2]
    assert all("tok_per_ms" in row for rows in res["batch_sweep"].values() for row in rows)
    for key in ("based-1.3b", "transformer-1.3b"):
        assert all("tok_per_ms" in row for row in res["prefill"][key])
    s = res["state_bytes"]["1.3b"]
    # the analytic count and new_cache(1).nbytes differ only by the token counters (int64 per layer)
    assert s["based_measured_bytes"] - s["based_bytes"] == 8 * 4
    assert sorted(os.listdir(plots)) == ["generation_throughput.png", "prefill_memory.png", "prefill_time.png",
                                         "state_memory.png"]
    assert "| based-1.3b | 4 |" in r.stdout


def test_check_mode_and_section_errors(tmp_path):
    out = tmp_path / "check.json"
    r = run("--quick", "--check", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(json.loads(out.read_text())) == {"meta", "errors", "check"}
    r = run("--quick", "--sections", "nonsense")
    assert r.returncode == 2 and "unknown sections ['nonsense']" in r.stderr
