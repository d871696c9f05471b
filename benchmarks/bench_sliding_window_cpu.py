"""Sliding-window attention on the CPU: based against PyTorch, and against the machine's own
limits, measured in the same run.

    python benchmarks/bench_sliding_window_cpu.py               # the full run (~3 minutes), all cores
    python benchmarks/bench_sliding_window_cpu.py --threads 1   # one core
    python benchmarks/bench_sliding_window_cpu.py --quick       # small sizes, a few seconds
    python benchmarks/bench_sliding_window_cpu.py --peak-only   # only the one-thread FMA-peak section (~1 minute)

Prefill: based.sliding_window_prefill against torch.nn.functional.scaled_dot_product_attention
with a boolean band mask (the exact same function, SPEC 1.2): what a PyTorch user has on the
CPU, O(T^2) (it scores every key and masks most of them), where based does O(T * W). Useful
work is 4 D flops per (query, key) pair in the band (scores and weighted values); the
percentage is of the float32 FMA peak measured in the same run (benchmarks/native.c).

Prefill against the FMA peak, one thread: based at W=64, D=64, T=2048 and 8192 (float32) as a
percentage of what a large float32 torch.matmul (N x N x N, FMA-bound: MKL's GEMM) reaches on
the same core in the same run, and of benchmarks/native.c's FMA chains (the instruction
throughput, which no GEMM quite reaches). One thread for both, whatever --threads says: on a
shared machine one core is easier to hold than two. The rounds alternate the reference and the
cases, and the table gives the best and the median of the rounds.

Decode (one token, cache full and wrapped): based.sliding_window_decode against a window-sized
ring buffer in torch (write the new key and value into slot t % W, then SDPA of one query over
all W slots, no mask: the cache is full), the best plain-PyTorch decode step, already O(W).
The floor is the time to stream the k and v caches once (read and write every byte in place,
x = x * 1 + 0 compiled for this CPU; the faster of 1 and all threads), measured in the same
run: a decode step must read every cached key and value.
Decode latency at B=1 is split into the Python layer (argument checks, out allocation), the
binding (DLPack import of the seven tensors) and the C call itself (timed through ctypes).

Every case is checked against the PyTorch baseline before it is timed. Times are the best of
`rounds` rounds, each timing every contender in turn (common.timeit_each): on a machine shared
with other jobs the best is the least disturbed.
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (bench_args, fma_peak_gflops, machine_summary, markdown_table,  # noqa: E402
                    merge_best, stream_seconds, timeit, timeit_each)

ARGS = bench_args("Sliding-window attention on the CPU: based vs PyTorch.",
                  "small sizes, for a smoke test",
                  lambda p: p.add_argument("--peak-only", action="store_true",
                                           help="only the one-thread prefill against the FMA peak"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import based  # noqa: E402
from based import _C  # noqa: E402

TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}   # based vs SDPA: float32 / bfloat16 rounding of the output


def band_mask(t, window):
    i = torch.arange(t)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def prefill_flops(b, t, h, d, w):
    """Useful multiply-adds x 2 of the windowed attention (scores and weighted values):
    query p attends min(p + 1, w) keys."""
    keys = sum(min(p + 1, w) for p in range(t))
    return 4 * b * h * d * keys


def bench_prefill(cases, args):
    rows = []
    for (b, t, h, hkv, d, w, dtype) in cases:
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
        err = (out.float() - theirs().transpose(1, 2).float()).abs().max().item()
        assert err < TOLERANCE[dtype], f"based and SDPA disagree by {err}"
        r = {}
        for _ in range(args.rounds):
            merge_best(r, timeit_each({"based": ours}, repeat=3, min_time=0.2))
        # SDPA is O(T^2): seconds per call at T=8192, so one sample per round
        r_sdpa = min(timeit(theirs, repeat=1, min_time=0.0, warmup=1)["min"] for _ in range(args.rounds))
        rows.append(((b, t, h, hkv, d, w, dtype), r["based"]["min"], r_sdpa, prefill_flops(b, t, h, d, w)))

    def render(peak):
        table = []
        for case, tb, ts, flops in rows:
            gflops = flops / tb / 1e9
            table.append([*case, tb * 1e3, gflops, 100 * gflops / peak, ts * 1e3, f"{ts / tb:.1f}x"])
        return markdown_table(["B", "T", "H", "Hkv", "D", "W", "dtype", "based ms", "GFLOP/s", "% of FMA peak",
                               "SDPA+mask ms", "x vs SDPA"], table)

    return render


def bench_prefill_vs_peak(args):
    """One thread: window prefill (W=64, D=64, float32) against a large torch.matmul and the
    FMA-chain peak, alternating in every round. Returns the Markdown table and a summary line."""
    old_based, old_torch = based.get_num_threads(), torch.get_num_threads()
    based.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(2)
        n = 1024 if args.quick else 2048
        a, b_, c = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g), torch.empty(n, n)
        matmul_flops = 2 * n**3
        cases = [(1, 2048, 16, 64, 64)] + ([] if args.quick else [(1, 8192, 16, 64, 64)])
        fns = {"matmul": lambda: torch.matmul(a, b_, out=c)}
        flops = {"matmul": matmul_flops}
        for (b, t, h, d, w) in cases:
            q, k, v = (torch.randn(b, h, t, d, generator=g).transpose(1, 2) for _ in range(3))
            out = torch.empty(b, t, h, d)
            fns[(b, t, h, d, w)] = (lambda q=q, k=k, v=v, w=w, out=out:
                                    based.sliding_window_prefill(q, k, v, window=w, out=out))
            flops[(b, t, h, d, w)] = prefill_flops(b, t, h, d, w)
        rates = {name: [] for name in fns}                     # GFLOP/s per round
        chains = []
        rounds = max(args.rounds, 2 if args.quick else 5)
        for _ in range(rounds):
            chains.append(fma_peak_gflops(1, repeat=2))
            for name, r in timeit_each(fns, repeat=3, min_time=0.2).items():
                rates[name].append(flops[name] / r["min"] / 1e9)
        mm_best, mm_median = max(rates["matmul"]), statistics.median(rates["matmul"])
        chain = max(chains)
        rows = []
        for case in cases:
            best, median = max(rates[case]), statistics.median(rates[case])
            per_round = [x / y for x, y in zip(rates[case], rates["matmul"])]
            rows.append([*case, "float32", flops[case] / best / 1e6, best, f"{100 * best / mm_best:.1f}",
                         f"{100 * statistics.median(per_round):.1f}", f"{100 * best / chain:.1f}"])
        table = markdown_table(["B", "T", "H", "D", "W", "dtype", "based ms", "GFLOP/s",
                                "% of matmul (best/best)", "% of matmul (median of rounds)",
                                "% of FMA chains"], rows)
        line = (f"One thread, {rounds} rounds. torch.matmul {n}x{n}x{n} float32: best {mm_best:.1f}, median "
                f"{mm_median:.1f} GFLOP/s; FMA chains (benchmarks/native.c): best {chain:.1f} GFLOP/s; "
                f"matmul reaches {100 * mm_best / chain:.0f}% of the chains.")
        return table, line
    finally:
        based.set_num_threads(old_based)
        torch.set_num_threads(old_torch)


def decode_setup(b, h, d, w, dtype):
    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(b, h, d, generator=g).to(dt) for _ in range(3))
    prompt = [torch.randn(b, 2 * w, h, d, generator=g).to(dt) for _ in range(3)]
    _, cache = based.sliding_window_prefill(*prompt, window=w)      # a full cache, wrapped
    return q, k, v, cache, torch.empty(b, h, d, dtype=dt)


def bench_decode(cases, args, threads):
    rows = []
    for (b, h, d, w, dtype) in cases:
        q, k, v, cache, out = decode_setup(b, h, d, w, dtype)
        kc = cache.k.clone()                                          # torch's ring buffer, same contents
        vc = cache.v.clone()
        step = [2 * w]

        def ours():
            based.sliding_window_decode(q, k, v, cache, out=out)

        def theirs():
            slot = step[0] % w
            kc[:, :, slot] = k
            vc[:, :, slot] = v
            step[0] += 1
            return F.scaled_dot_product_attention(q[:, :, None], kc, vc)[:, :, 0]

        ours()
        err = (out.float() - theirs().float()).abs().max().item()
        assert err < TOLERANCE[dtype], f"based and SDPA disagree by {err}"
        cache_bytes = 2 * b * h * w * d * out.element_size()         # the whole cache, k and v
        r, stream = {}, math.inf
        for _ in range(args.rounds):
            merge_best(r, timeit_each({"based": ours, "torch": theirs}, repeat=5 if args.quick else 9))
            stream = min([stream] + [stream_seconds(cache_bytes, n) for n in sorted({1, threads})])
        tb, tt = r["based"]["min"], r["torch"]["min"]
        rows.append([b, h, d, w, dtype, cache_bytes / 2**20, tb * 1e6, stream * 1e6, f"{tb / stream:.2f}",
                     cache_bytes / tb / 1e9, tt * 1e6, f"{tt / tb:.1f}x"])
    return markdown_table(["B", "H", "D", "W", "dtype", "cache MiB", "based us", "stream cache once us",
                           "based / stream", "GB/s (cache read)", "torch ring+SDPA us", "x vs torch"], rows)


# ---------------------------------------------------------------------------------------
# B=1 decode latency, layer by layer: the C entry point is timed through ctypes with the
# DLTensors built once, so that neither Python nor the DLPack import is in its time
# ---------------------------------------------------------------------------------------


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32), ("dtype", _DType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("window", ctypes.c_int64), ("scale", ctypes.c_double), ("stream", ctypes.c_void_p)]


_DL_CODES = {torch.float32: (2, 32), torch.bfloat16: (4, 16), torch.float16: (2, 16), torch.int64: (0, 64)}


def _dl(t, keep):
    """A DLTensor (kDLCPU) describing torch tensor t; t and the arrays go into keep."""
    shape = (ctypes.c_int64 * t.dim())(*t.shape)
    strides = (ctypes.c_int64 * t.dim())(*t.stride())
    keep += [t, shape, strides]
    code, bits = _DL_CODES[t.dtype]
    return _DLTensor(t.data_ptr(), _Device(1, 0), t.dim(), _DType(code, bits, 1), shape, strides, 0)


def bench_decode_layers(args, h=16, d=64, w=65, dtype="float32"):
    q, k, v, cache, out = decode_setup(1, h, d, w, dtype)
    keep = []
    tensors = [_dl(x, keep) for x in (q, k, v, cache.k, cache.v, cache.tokens, out)]
    params = _Params(w, cache.scale, None)
    c_decode = ctypes.CDLL(_C.__file__).based_sliding_window_decode
    c_decode.restype = ctypes.c_int
    c_args = [ctypes.byref(x) for x in tensors] + [ctypes.byref(params)]
    fns = {
        "python": lambda: based.sliding_window_decode(q, k, v, cache, out=out),
        "binding": lambda: _C.sliding_window_decode(q, k, v, cache.k, cache.v, cache.tokens, out, w, cache.scale, None),
        "c": lambda: c_decode(*c_args),
    }
    assert fns["c"]() == 0
    r = {}
    for _ in range(args.rounds):
        merge_best(r, timeit_each(fns, repeat=5 if args.quick else 9))
    tp, tbind, tc = (r[n]["min"] * 1e6 for n in ("python", "binding", "c"))
    rows = [["based.sliding_window_decode (all)", tp, "100%"],
            ["  Python layer (checks, out=)", tp - tbind, f"{100 * (tp - tbind) / tp:.0f}%"],
            ["  binding (DLPack import of 7 tensors, GIL release)", tbind - tc, f"{100 * (tbind - tc) / tp:.0f}%"],
            ["  C call (checks, kernel; timed through ctypes)", tc, f"{100 * tc / tp:.0f}%"]]
    return markdown_table([f"B=1, H={h}, D={d}, W={w}, {dtype}", "us", "share"], rows)


def main():
    args = ARGS
    threads = based.get_num_threads()
    torch.set_num_threads(threads)
    print(f"# Sliding-window attention (CPU)\n\nMachine: {machine_summary(threads)}\n")
    peak_table, peak_line = bench_prefill_vs_peak(args)
    print("## Prefill against the FMA peak, one thread (W=64, D=64)\n")
    print(peak_line + "\n")
    print(peak_table + "\n")
    if args.peak_only:
        print(f"Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`")
        return
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
        decode = [(b, 16, 64, 65, "float32") for b in (1, 16, 64)] + [(16, 16, 64, 65, "bfloat16"),
                                                                       (16, 16, 64, 1024, "float32")]
    # The peak is measured before, between and after the runs, and the best is used: on a
    # shared machine a disturbed measurement only lowers it, which would flatter the ratios.
    peaks = [fma_peak_gflops(threads)]
    prefill_table = bench_prefill(prefill, args)
    peaks.append(fma_peak_gflops(threads))
    decode_table = bench_decode(decode, args, threads)
    layers_table = bench_decode_layers(args)
    peaks.append(fma_peak_gflops(threads))
    peak = max(peaks)
    print(f"FMA peak, float32, {threads} threads, measured {len(peaks)} times: "
          f"{', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s; percentages use the best, {peak:.0f}. "
          f"Times: best of {args.rounds} rounds.\n")
    print("## Prefill (ms; x vs SDPA = SDPA time / based time)\n")
    print(prefill_table(peak))
    print("\n## Decode, one token, cache full and wrapped (us; based / stream = based time / time to stream the "
          "k and v caches once)\n")
    print(decode_table)
    print("\n## Decode latency at B=1, layer by layer\n")
    print(layers_table)
    print(f"\nCommand: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`")


if __name__ == "__main__":
    main()
