"""Sliding-window attention on the CPU: based against PyTorch, measured in the same run.

Prefill baseline: torch.nn.functional.scaled_dot_product_attention with a boolean band
mask (the exact same function, SPEC 1.2). It is what a PyTorch user has on the CPU, and it
is O(T^2): it scores every key and masks most of them, where based does O(T * W).
Decode baseline: a window-sized ring buffer in torch (write the new key and value into
slot t % W, then SDPA of one query over all W slots, no mask: the cache is full), i.e.
the best plain-PyTorch decode step, already O(W).

Every case is checked against the baseline before it is timed. A time is the fastest of
`repeat` samples, each the mean over >= 0.2 s of calls, after a warm-up: on a machine shared
with other jobs the fastest sample is the least disturbed one (a median can land on samples
where another process held a core and stalled a 2-thread region). torch and based run with
the same number of threads, the same statistic, in the same process.

Run:  python benchmarks/bench_window_cpu.py            (about 2 minutes on 2 cores)
      python benchmarks/bench_window_cpu.py --quick    (smaller sizes, a few seconds)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F

import based


def timed(fn, repeat, min_seconds=0.2):
    """Seconds per call of fn: the fastest of `repeat` samples (after a warm-up call), each
    the mean over enough calls to last min_seconds (so short calls are not timer noise)."""
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-7)
    inner = max(1, int(min_seconds / once))
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner)
    return min(samples)


def band_mask(t, window):
    i = torch.arange(t)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def prefill_flops(b, t, h, d, w):
    """Useful multiply-adds x 2 of the windowed attention (scores and weighted values):
    query p attends min(p + 1, w) keys."""
    keys = sum(min(p + 1, w) for p in range(t))
    return 4 * b * h * d * keys


def bench_prefill(b, t, h, hkv, d, w, dtype, repeat):
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    # (B, H, T, D) storage, passed to based as the (B, T, H, D) view x.transpose(1, 2):
    # the layout SDPA wants, and a strided input for based (no copy either way)
    q = torch.randn(b, h, t, d, generator=g).to(dt)
    k = torch.randn(b, hkv, t, d, generator=g).to(dt)
    v = torch.randn(b, hkv, t, d, generator=g).to(dt)
    mask = band_mask(t, w)
    out = torch.empty(b, t, h, d, dtype=dt)

    def ours():
        based.sliding_window_prefill(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window=w, out=out)

    def theirs():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hkv != h)

    ours()
    want = theirs().transpose(1, 2).float()
    err = (out.float() - want).abs().max().item()
    assert err < {"float32": 1e-4, "bfloat16": 5e-2}[dtype], f"based and SDPA disagree by {err}"
    t_ours = timed(ours, repeat)
    t_theirs = timed(theirs, max(1, repeat // 2), min_seconds=0.0)   # O(T^2): seconds per call at T=8192
    return t_ours, t_theirs, prefill_flops(b, t, h, d, w)


def bench_decode(b, h, d, w, dtype, repeat):
    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(b, h, d, generator=g).to(dt) for _ in range(3))
    prompt = [torch.randn(b, 2 * w, h, d, generator=g).to(dt) for _ in range(3)]
    _, cache = based.sliding_window_prefill(*prompt, window=w)      # a full cache, wrapped
    kc = cache.k.clone()                                             # torch's ring buffer, same contents
    vc = cache.v.clone()
    step = [2 * w]
    out = torch.empty(b, h, d, dtype=dt)

    def ours():
        based.sliding_window_decode(q, k, v, cache, out=out)

    def theirs():
        slot = step[0] % w
        kc[:, :, slot] = k
        vc[:, :, slot] = v
        step[0] += 1
        return F.scaled_dot_product_attention(q[:, :, None], kc, vc)[:, :, 0]

    ours()
    want = theirs()
    err = (out.float() - want.float()).abs().max().item()
    assert err < {"float32": 1e-4, "bfloat16": 5e-2}[dtype], f"based and SDPA disagree by {err}"
    t_ours = timed(ours, repeat)
    t_theirs = timed(theirs, repeat)
    bytes_read = 2 * b * h * w * d * out.element_size()              # the whole cache, k and v
    return t_ours, t_theirs, bytes_read


def environment():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = based.build_info()
    return (f"based {based.__version__} @ {commit} (OpenMP {info['openmp']}, {info['max_threads']} threads), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {cpu}, {os.cpu_count()} CPUs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(based.build_info()["max_threads"])
    print(environment())

    if args.quick:
        prefill = [(1, 512, 4, 4, 64, 65, "float32")]
        decode = [(4, 4, 64, 65, "float32")]
    else:
        prefill = [
            # paper settings: head dim 64, window 65 (flash window_size=(64, 0)), 16 heads
            (1, 512, 16, 16, 64, 65, "float32"),
            (1, 2048, 16, 16, 64, 65, "float32"),
            (1, 8192, 16, 16, 64, 65, "float32"),
            (4, 2048, 16, 16, 64, 65, "float32"),
            (1, 2048, 16, 16, 64, 65, "bfloat16"),
            (1, 2048, 16, 16, 64, 129, "float32"),       # config window 256 -> (128, 0)
            (1, 2048, 16, 4, 128, 129, "float32"),       # GQA, head dim 128
            (1, 2048, 16, 16, 64, 1024, "float32"),      # a wide window
        ]
        decode = [(b, 16, 64, 65, dt) for b in (1, 16, 64) for dt in ("float32",)] + [(16, 16, 64, 65, "bfloat16")]

    print("\n### Prefill (ms; ratio = SDPA time / based time)\n")
    print("| B | T | H | Hkv | D | W | dtype | based ms | based GFLOP/s | SDPA+mask ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in prefill:
        t_ours, t_theirs, flops = bench_prefill(*case, repeat=args.repeat)
        print("| " + " | ".join(map(str, case)) + f" | {t_ours * 1e3:.2f} | {flops / t_ours / 1e9:.1f} | "
              f"{t_theirs * 1e3:.2f} | {t_theirs / t_ours:.1f}x |", flush=True)

    print("\n### Decode, one token (us; ratio = torch ring-buffer time / based time)\n")
    print("| B | H | D | W | dtype | based us | based GB/s (cache read) | torch ring+SDPA us | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in decode:
        t_ours, t_theirs, nbytes = bench_decode(*case, repeat=args.repeat)
        print("| " + " | ".join(map(str, case)) + f" | {t_ours * 1e6:.1f} | {nbytes / t_ours / 1e9:.1f} | "
              f"{t_theirs * 1e6:.1f} | {t_theirs / t_ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
