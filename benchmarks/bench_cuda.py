"""CUDA benchmark of based's kernels against same-run baselines (issues 11 and 12).

Decode (memory-bound: its yardstick is a device-to-device copy of the same bytes):
  * linear_attention_decode, H=16, Dk=16, Dv=64, fp32 state, B in 1..256: time per step
    (CUDA events; B=1 also under CUDA-graph replay), effective GB/s of the state read and
    written once, % of the copy bandwidth; a plain-PyTorch CUDA-graph einsum decode of the
    paper's 273-row state for calibration.
  * sliding_window_decode, W=64, D=64, H=Hkv=16, bf16 and fp32: the ring read once.
Prefill (bf16, H=16, Dk=16, Dv=64): linear_attention_prefill with normaliser and fp32 final
state, beside torch.nn.functional.scaled_dot_product_attention (flash, causal, d=64) and, for
the window, torch.compile(flex_attention) with a sliding-window block mask; achieved TFLOP/s
by the chunked algorithm's FLOP count and GB/s of the inputs read and outputs written once.

Timing: triton.testing.do_bench (CUDA events, warm-up, L2 flushed before every call, median)
where Triton is present, else CUDA events around repeated calls with an L2-sized flush.
Writes benchmarks/results/cuda.json and benchmarks/plots/prefill_vs_seqlen.png, prints
Markdown tables for RESULTS.md.

    python benchmarks/bench_cuda.py            # the full set (a few minutes on an H200)
    python benchmarks/bench_cuda.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch

import based

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import git_commit  # noqa: E402
RESULTS = HERE / "results"
PLOTS = HERE / "plots"

H, DK, DV = 16, 16, 64
F = 1 + DK + DK * (DK + 1) // 2


_flush = None


def bench(fn, *, rep_ms: float = 200.0) -> float:
    """Median milliseconds per call of fn, L2 flushed before each call."""
    try:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    except ImportError:
        pass
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(20):
        _flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def bench_graph(fn, *, steps: int = 100) -> float:
    """Milliseconds per call of fn replayed from a CUDA graph of `steps` calls (no flush:
    a decode loop's state stays where the previous step left it)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(steps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / steps)
    return best


def copy_ms(nbytes: int) -> float:
    """A device-to-device copy of nbytes (reads nbytes, writes nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def section(results: dict, name: str, fn):
    print(f"\n== {name}", flush=True)
    try:
        results[name] = fn()
    except Exception as exc:  # one failing section must not cost the others
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------

def linear_decode(quick: bool) -> list:
    rows = []
    for B in ([1, 64] if quick else [1, 8, 64, 256]):
        g = torch.Generator(device="cuda").manual_seed(B)
        q, k = (torch.randn(B, H, DK, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(B, H, DV, device="cuda", generator=g, dtype=torch.bfloat16)
        state = based.LinearAttentionState.zeros(B, H, DK, DV, like=q)
        state.kv.normal_()
        state.ksum.uniform_(1, 2)
        out = torch.empty(B, H, DV, device="cuda", dtype=torch.bfloat16)
        step = lambda: based.linear_attention_decode(q, k, v, state, out=out)  # noqa: E731
        ms = bench(step)
        ms_graph = bench_graph(step)
        state_bytes = state.kv.numel() * 4 + state.ksum.numel() * 4
        cp = copy_ms(state_bytes)
        # plain PyTorch: the paper's 273-row fp32 state, einsum decode under a CUDA graph
        kv273 = torch.randn(B, H, 1 + DK + DK * DK, DV, device="cuda")
        ks273 = torch.rand(B, H, 1 + DK + DK * DK, device="cuda") + 1
        qf, kf, vf = q.float(), k.float(), v.float()

        def phi273(x):
            x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2) / math.sqrt(DK)
            return torch.cat([torch.ones_like(x[..., :1]), x / DK ** 0.25, x2], -1)

        def torch_step():
            pq, pk = phi273(qf), phi273(kf)
            kv273.add_(pk.unsqueeze(-1) * vf.unsqueeze(-2))
            ks273.add_(pk)
            num = torch.einsum("bhf,bhfd->bhd", pq, kv273)
            return num / (torch.einsum("bhf,bhf->bh", pq, ks273).unsqueeze(-1) + 1e-6)

        torch_graph = bench_graph(torch_step, steps=20)
        row = {"B": B, "state_MiB": state_bytes / 2**20, "based_ms": ms, "based_graph_ms": ms_graph,
               "copy_ms": cp, "GB_s": 2 * state_bytes / ms / 1e6, "copy_GB_s": 2 * state_bytes / cp / 1e6,
               "pct_of_copy": 100 * cp / ms, "pct_of_copy_graph": 100 * cp / ms_graph, "torch273_graph_ms": torch_graph}
        rows.append(row)
        print(row, flush=True)
    return rows


def window_decode(quick: bool) -> list:
    rows = []
    W, D = 64, 64
    for dtype in (torch.bfloat16, torch.float32):
        for B in ([1, 256] if quick else [1, 16, 64, 256]):
            q = torch.randn(B, H, D, device="cuda", dtype=dtype)
            k, v = (torch.randn(B, H, D, device="cuda", dtype=dtype) for _ in range(2))
            kp, vp = (torch.randn(B, 3 * W, H, D, device="cuda", dtype=dtype) for _ in range(2))
            _, cache = based.sliding_window_prefill(torch.randn(B, 3 * W, H, D, device="cuda", dtype=dtype), kp, vp,
                                                    window=W)
            out = torch.empty_like(q)
            step = lambda: based.sliding_window_decode(q, k, v, cache, out=out)  # noqa: E731
            ms = bench(step)
            ms_graph = bench_graph(step)
            cache_bytes = cache.k.numel() * cache.k.element_size() * 2
            cp = copy_ms(cache_bytes)
            moved = cache_bytes + 2 * B * H * D * q.element_size() * 2  # the ring read, q/k/v in, o out
            row = {"B": B, "dtype": str(dtype).removeprefix("torch."), "W": W, "D": D, "based_ms": ms,
                   "based_graph_ms": ms_graph, "GB_s": moved / ms / 1e6, "copy_GB_s": 2 * cache_bytes / cp / 1e6,
                   "pct_of_copy_bw": 100 * (moved / ms) / (2 * cache_bytes / cp),
                   "GB_s_graph": moved / ms_graph / 1e6,
                   "pct_of_copy_bw_graph": 100 * (moved / ms_graph) / (2 * cache_bytes / cp)}
            rows.append(row)
            print(row, flush=True)
    return rows


# ---------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------

PREFILL_SHAPES = [(16, 1024), (16, 2048), (16, 4096), (16, 8192), (1, 8192), (4, 8192), (64, 2048)]
CHUNK = 64


def linear_prefill_flops(B, T):
    """The chunked algorithm's useful FLOPs: per token and head, 2 C (Dk + Dv) for the
    intra-chunk block (Q K^T and A V over a C-token chunk) and 4 F Dv for the inter-chunk
    product and the state update (C = 64, F = 153)."""
    return B * T * H * (2 * CHUNK * (DK + DV) + 4 * F * DV)


def linear_prefill(quick: bool) -> list:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    rows = []
    shapes = PREFILL_SHAPES[:2] + [(1, 8192)] if quick else PREFILL_SHAPES
    for B, T in shapes:
        g = torch.Generator(device="cuda").manual_seed(T)
        q, k = (0.5 * torch.randn(B, T, H, DK, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(B, T, H, DV, device="cuda", generator=g, dtype=torch.bfloat16)
        out = torch.empty_like(v)
        state = based.LinearAttentionState.zeros(B, H, DK, DV, like=q)

        def run():
            state.tokens.zero_()  # keep the counters bounded; the kernels do not read them
            based.linear_attention_prefill(q, k, v, state, out=out)

        ms = bench(run)
        row = {"B": B, "T": T, "based_ms": ms, "TFLOP_s": linear_prefill_flops(B, T) / ms / 1e9,
               "GB_s": (q.numel() * 2 * 2 + v.numel() * 2 * 2 + state.kv.numel() * 4 * 2) / ms / 1e6}
        for variant, env in (("based_ms_blocks1", "1"),):
            os.environ["BASED_CUDA_PREFILL_BLOCKS"] = env
            try:
                row[variant] = bench(run)
            finally:
                del os.environ["BASED_CUDA_PREFILL_BLOCKS"]
        qh = torch.randn(B, H, T, 64, device="cuda", dtype=torch.bfloat16)
        kh, vh = torch.randn_like(qh), torch.randn_like(qh)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                row["sdpa_flash_ms"] = bench(lambda: sdpa(qh, kh, vh, is_causal=True))
        except Exception as exc:  # noqa: BLE001
            row["sdpa_flash_ms"] = None
            row["sdpa_error"] = str(exc)[:200]
        rows.append(row)
        print(row, flush=True)
    return rows


def window_prefill(quick: bool) -> list:
    rows = []
    W, D = 64, 64
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception:  # noqa: BLE001
        flex = None
    for B, T in ([(1, 8192)] if quick else [(16, 1024), (16, 8192), (1, 8192), (4, 8192)]):
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        out = torch.empty_like(q)
        cache = based.SlidingWindowCache.zeros(B, H, W, D, dtype="bfloat16", like=q)

        def run():
            cache.tokens.zero_()
            based.sliding_window_prefill(q, k, v, cache=cache, out=out)

        ms = bench(run)
        io_bytes = 4 * q.numel() * 2
        row = {"B": B, "T": T, "W": W, "based_ms": ms, "GB_s": io_bytes / ms / 1e6,
               "io_floor_ms": io_bytes / 4.3e9}
        if flex is not None:
            try:
                def window_mask(b, h, qi, ki):
                    return (qi >= ki) & (qi - ki < W)

                bm = create_block_mask(window_mask, None, None, T, T, device="cuda")
                qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
                row["flex_ms"] = bench(lambda: flex(qh, kh, vh, block_mask=bm))
            except Exception as exc:  # noqa: BLE001
                row["flex_error"] = str(exc)[:200]
        rows.append(row)
        print(row, flush=True)
    return rows


def plot(results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results.get("linear_prefill", []) if isinstance(r, dict) and r.get("B") == 16]
    if not rows:
        return
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [r["T"] for r in rows]
    ax.plot(ts, [r["based_ms"] for r in rows], "o-", label="based linear_attention_prefill (+ksum, fp32 state)")
    if all(r.get("sdpa_flash_ms") for r in rows):
        ax.plot(ts, [r["sdpa_flash_ms"] for r in rows], "s--", label="SDPA flash, causal, d=64")
    wrows = [r for r in results.get("window_prefill", []) if isinstance(r, dict) and r.get("B") == 16]
    if wrows:
        ax.plot([r["T"] for r in wrows], [r["based_ms"] for r in wrows], "^-", label="based sliding_window_prefill W=64")
        if all(r.get("flex_ms") for r in wrows):
            ax.plot([r["T"] for r in wrows], [r["flex_ms"] for r in wrows], "v--", label="flex_attention W=64")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (B=16, H=16, bf16)")
    ax.set_ylabel("ms")
    ax.set_title(f"Prefill on {torch.cuda.get_device_name()}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOTS / "prefill_vs_seqlen.png", dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--only", default="", help="comma-separated sections to run")
    args = parser.parse_args()
    if not based.cuda_available():
        print("bench_cuda: needs a CUDA build of based and a GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "commit": git_commit(), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    sections = {"linear_decode": linear_decode, "window_decode": window_decode, "linear_prefill": linear_prefill,
                "window_prefill": window_prefill}
    only = [s for s in args.only.split(",") if s]
    for name, fn in sections.items():
        if not only or name in only:
            section(results, name, lambda fn=fn: fn(args.quick))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cuda.json").write_text(json.dumps(results, indent=1))
    plot(results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
