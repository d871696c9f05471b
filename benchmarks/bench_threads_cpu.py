"""The demo's speed with and without a concurrent CPU load, for each way of setting threads,
all measured in one run.

    python benchmarks/bench_threads_cpu.py                      # ~5 minutes on 2 cores
    python benchmarks/bench_threads_cpu.py --quick              # one round, 40 tokens
    python benchmarks/bench_threads_cpu.py --compare /path/to/other/checkout   # a second build too

Each measurement is one run of ``python -m based demo --temperature 0`` (greedy, so every run
does the same work) in a fresh process, under one thread setting:

* default: nothing set (based and torch use one thread per CPU; based's small calls fewer);
* ``--threads 1``: the demo calls torch.set_num_threads(1) and based.set_num_threads(1);
* ``OMP_NUM_THREADS=1``: one thread for every OpenMP user in the process, set before it starts;
* ``OMP_WAIT_POLICY=passive``: threads as by default, but idle OpenMP threads sleep at once
  instead of spinning (GNU OpenMP spins for milliseconds by default).

The load is N processes started by this script, each a Python busy loop (one CPU-bound
thread), running from before the first demo run of a load level to after its last; load 0
is the quiet machine. Every (setting, load) pair is run `rounds` times, settings interleaved
within a round; the table gives the median decode tokens/s (min-max) and the median prefill
time of the 58-byte prompt, as the demo prints them, and the demo process's CPU time over
its wall time (above 1 when a second thread works or spins).

``--compare DIR`` also runs the settings through the build in DIR (a checkout with based/_C
built in place, e.g. main before a change): its rows are measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, git_commit, markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

SETTINGS = {
    "default": ({}, []),
    "--threads 1": ({}, ["--threads", "1"]),
    "OMP_NUM_THREADS=1": ({"OMP_NUM_THREADS": "1"}, []),
    "OMP_WAIT_POLICY=passive": ({"OMP_WAIT_POLICY": "passive"}, []),
}

DECODE = re.compile(r"^decode\s+([\d,]+) tokens/s", re.M)
PREFILL = re.compile(r"^prefill\s+.*\((\d+) tokens in ([\d.]+) ms\)", re.M)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=150, help="bytes to generate per demo run (default 150)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each (setting, load) pair (default 3)")
    p.add_argument("--loads", default="0,cpus,2cpus",
                   help="comma-separated numbers of busy-loop processes; 'cpus' is the CPU count, '2cpus' twice "
                        "it (default 0,cpus,2cpus)")
    p.add_argument("--compare", metavar="DIR", default=None,
                   help="also run the build of based in this checkout (its --threads may be missing)")
    p.add_argument("--compare-label", default=None, help="the name of the --compare build in the table "
                   "(default: its folder and git commit)")
    p.add_argument("--quick", action="store_true", help="one round of 40 tokens, loads 0 and 2cpus")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.rounds, args.loads = 40, 1, "0,2cpus"
    return args


def load_levels(spec: str) -> list[int]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    out = []
    for item in spec.split(","):
        item = item.strip()
        out.append(cpus * int(item[:-4] or 1) if item.endswith("cpus") else int(item))
    return out


def clean_env() -> dict:
    """The environment without the OpenMP and based thread settings of the caller."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "BASED_PARALLEL_"))}


def run_demo(build: Path, env_extra: dict, argv: list[str], tokens: int) -> dict:
    env = {**clean_env(), **env_extra, "PYTHONPATH": str(build)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "based", "demo", "--max-new-tokens", str(tokens), "--temperature", "0",
                        *argv], env=env, capture_output=True, text=True, timeout=1200, cwd=str(build))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"demo failed ({build}, {env_extra}, {argv}):\n{r.stderr[-2000:]}")
    decode, prefill = DECODE.search(r.stdout), PREFILL.search(r.stdout)
    if decode is None or prefill is None:
        raise RuntimeError(f"cannot read the demo's report:\n{r.stdout[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"tok_s": float(decode.group(1).replace(",", "")), "prefill_ms": float(prefill.group(2)),
            "cpu_per_wall": cpu / wall}


def supports_threads_option(build: Path) -> bool:
    r = subprocess.run([sys.executable, "-m", "based", "demo", "--help"], capture_output=True, text=True,
                       env={**clean_env(), "PYTHONPATH": str(build)}, cwd=str(build))
    return "--threads" in r.stdout


def main():
    args = parse_args()
    builds = {f"this checkout @ {git_commit(REPO)}": REPO}
    if args.compare:
        other = Path(args.compare).resolve()
        builds[args.compare_label or f"{other.name} @ {git_commit(other)}"] = other
    runs = []  # (build, setting, load)
    for name, path in builds.items():
        threads_ok = supports_threads_option(path)
        runs += [(name, s) for s in SETTINGS if threads_ok or "--threads" not in SETTINGS[s][1]]
    results: dict = {}
    loadavg = {}
    for load in load_levels(args.loads):
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            time.sleep(1.0 if load else 0.0)
            for _ in range(args.rounds):
                for name, setting in runs:
                    env_extra, argv = SETTINGS[setting]
                    r = run_demo(builds[name], env_extra, argv, args.tokens)
                    results.setdefault((name, setting, load), []).append(r)
                    print(f"  {name:40s} {setting:26s} load {load}: {r['tok_s']:7.0f} tokens/s, "
                          f"prefill {r['prefill_ms']:7.1f} ms, CPU/wall {r['cpu_per_wall']:.2f}", file=sys.stderr)
            loadavg[load] = os.getloadavg()[0]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()

    rows = []
    for (name, setting, load), rs in results.items():
        tok = [r["tok_s"] for r in rs]
        quiet = results.get((name, setting, 0))
        rel = f"{statistics.median(tok) / statistics.median(r['tok_s'] for r in quiet):.2f}" if quiet else "-"
        rows.append([name, setting, load, f"{statistics.median(tok):,.0f} ({min(tok):,.0f}-{max(tok):,.0f})", rel,
                     statistics.median(r["prefill_ms"] for r in rs),
                     f"{statistics.median(r['cpu_per_wall'] for r in rs):.2f}"])
    rows.sort(key=lambda r: (list(builds).index(r[0]), r[2], list(SETTINGS).index(r[1])))
    print(f"# The demo under a CPU load ({args.tokens} bytes, greedy)\n")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; Python {sys.version.split()[0]}; "
          f"load average at the end of each load level: "
          + ", ".join(f"{n} procs: {a:.1f}" for n, a in loadavg.items()) + "\n")
    print(markdown_table(["build", "setting", "busy procs", "decode tokens/s, median (min-max)", "vs quiet",
                          "prefill ms", "demo CPU / wall"], rows))
    print(f"\nMedians of {args.rounds} runs per cell. Command: "
          f"`{' '.join([os.path.basename(sys.executable)] + sys.argv)}`; {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
