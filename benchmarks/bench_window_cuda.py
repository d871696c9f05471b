"""Sliding-window attention on CUDA against the GPU's own limits, measured in the same run.

    python benchmarks/bench_window_cuda.py            # the targets below (~20 s on an H200)
    python benchmarks/bench_window_cuda.py --quick    # small sizes, a smoke test

Decode (one token per sequence, cache full and wrapped): a step must read the whole key and
value ring once, so its floor is a device-to-device copy of the ring's bytes (torch's copy_,
same run). The step is timed inside a CUDA graph of `--steps` decode calls (GPU time, without
Python's per-call overhead); its two launches (attention + counter advance) are both counted.
Cases: W=64, D=64, H=Hkv=16, B=256 in bfloat16 and float32 (target: >= 80% of the copy's
speed), and B=1 (latency).

Prefill (bfloat16, H=16, D=64, W=64, B=16, T=8192): the IO floor is reading q, k, v and
writing out once at the copy's bandwidth (target: <= 0.33 ms, >= 70% of the floor). Timed with
CUDA events over repeated calls.

Every case is checked against a PyTorch restatement before it is timed.
"""

from __future__ import annotations

import argparse

import torch

import based


def gpu_ms(fn, iters: int, warmup: int = 3) -> float:
    """Milliseconds of GPU time per call of fn (CUDA events around `iters` back-to-back calls)."""
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / iters)
    return best


def copy_ms(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return gpu_ms(lambda: dst.copy_(src), iters=20)


def band_attention(q, k, v, window, offset=0):
    """o = softmax(q k^T / sqrt(D), band) v in float32, q at positions offset.., keys from 0."""
    B, T, H, D = q.shape
    g = H // k.shape[2]
    kk = k.float().repeat_interleave(g, 2).transpose(1, 2)
    vv = v.float().repeat_interleave(g, 2).transpose(1, 2)
    s = torch.matmul(q.float().transpose(1, 2), kk.transpose(2, 3)) * D**-0.5
    qp = torch.arange(offset, offset + T, device=q.device)[:, None]
    kp = torch.arange(k.shape[1], device=q.device)[None, :]
    s = s.masked_fill(~((kp <= qp) & (kp > qp - window)), float("-inf"))
    return torch.matmul(torch.softmax(s, -1), vv).transpose(1, 2)


def bench_decode(B, H, Hkv, D, W, dtype, steps):
    td = getattr(torch, dtype)
    T0 = 3 * W + 5  # the ring is full and has wrapped
    q, k, v = (torch.randn(B, T0 + 1, h, D, device="cuda", dtype=td) for h in (H, Hkv, Hkv))
    _, cache = based.sliding_window_prefill(q[:, :T0], k[:, :T0], v[:, :T0], window=W)
    out = based.sliding_window_decode(q[:, T0], k[:, T0], v[:, T0], cache)
    want = band_attention(q[:, T0:], k, v, W, offset=T0)[:, 0]
    err = (out.float() - want).abs().max().item()
    assert err < (2e-2 if dtype != "float32" else 1e-4), f"decode differs from the reference by {err}"
    sq, sk, sv = q[:, T0].clone(), k[:, T0].clone(), v[:, T0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            based.sliding_window_decode(sq, sk, sv, cache, out=out)
    ms = gpu_ms(graph.replay, iters=3) / steps
    ring = 2 * cache.k.numel() * cache.k.element_size()
    cms = copy_ms(ring)
    print(f"decode {dtype:8s} B={B:<4d} H={H} Hkv={Hkv} D={D} W={W}: {ms * 1e3:8.2f} us  "
          f"ring {ring / 2**20:7.2f} MiB  copy {cms * 1e3:8.2f} us  -> {100 * cms / ms:5.1f}% of the copy's speed")


def bench_prefill(B, T, H, Hkv, D, W, dtype):
    td = getattr(torch, dtype)
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=td) for h in (H, Hkv, Hkv))
    out = torch.empty_like(q)
    sl = slice(0, min(T, 512))
    o, _ = based.sliding_window_prefill(q[:, sl], k[:, sl], v[:, sl], window=W)
    err = (o.float() - band_attention(q[:, sl], k[:, sl], v[:, sl], W)).abs().max().item()
    assert err < (2e-2 if dtype != "float32" else 1e-4), f"prefill differs from the reference by {err}"
    ms = gpu_ms(lambda: based.sliding_window_prefill(q, k, v, window=W, out=out), iters=10)
    io = sum(x.numel() * x.element_size() for x in (q, k, v, out))
    floor = copy_ms(io // 2)  # a copy of io/2 bytes reads io/2 and writes io/2
    print(f"prefill {dtype:8s} B={B} T={T} H={H} Hkv={Hkv} D={D} W={W}: {ms:7.3f} ms  "
          f"IO floor {floor:7.3f} ms ({io / 2**20:.0f} MiB at the copy's bandwidth) -> {100 * floor / ms:5.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per CUDA graph (default 20)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "| based", based.build_info().get("version", ""))
    if args.quick:
        bench_decode(8, 4, 4, 64, 64, "bfloat16", args.steps)
        bench_prefill(2, 1024, 4, 4, 64, 64, "bfloat16")
        return
    for dtype in ("bfloat16", "float32"):
        bench_decode(256, 16, 16, 64, 64, dtype, args.steps)
    bench_decode(1, 16, 16, 64, 64, "bfloat16", args.steps)
    bench_prefill(16, 8192, 16, 16, 64, 64, "bfloat16")
    bench_prefill(16, 8192, 16, 16, 64, 65, "bfloat16")
    bench_prefill(4, 8192, 16, 16, 64, 64, "float32")


if __name__ == "__main__":
    main()
