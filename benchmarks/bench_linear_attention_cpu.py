"""Taylor linear attention on the CPU: based against PyTorch-CPU forms and the NumPy
reference, measured in one run, plus the machine's own limits measured alongside.

    python benchmarks/bench_linear_attention_cpu.py               # the full run (~3 minutes), all cores
    python benchmarks/bench_linear_attention_cpu.py --threads 1   # one core (steadier on a shared machine)
    python benchmarks/bench_linear_attention_cpu.py --quick       # fewer repeats, no float64 reference

Prefill (B=1, T=2048, H=16, Dk=16, Dv=64, float32 unless stated):
  * based.linear_attention_prefill (chunked, C core) and its plain-loop C twin (*_ref)
  * PyTorch "quadratic": the masked T x T einsum, as in HazyResearch/based's default mode
  * PyTorch "chunked": the same chunked algorithm in vectorised torch ops (per-chunk
    1 + s + s^2/2 inside, phi(q) against an exclusive cumsum of per-chunk states across),
    with the compact feature map (153) and with the paper code's expanded one (273)
  * NumPy float64 reference (based.reference.linear_attention_quadratic)
Decode (one token per sequence, B in {1, 8, 64}, H=16, Dk=16, Dv=64, float32 state):
  * based.linear_attention_decode, and PyTorch's einsum step on the same compact state
  * the time to read and write the state's bytes once in place (the floor for decode):
    the faster of 1 and all threads, x = x * 1 + 0 compiled for this CPU (native.c)

FLOP model (both phases): 4 F (Dv + 1) flops per token and head, F = 1 + Dk + Dk(Dk+1)/2:
reading the state with phi(q) (numerator and normaliser) and folding phi(k) v into it, as
the recurrent form does. The chunked kernel also spends ~(C/2) (2 Dk + 2 Dv) per token on
the in-chunk triangle; that is not counted, so GFLOP/s here are useful work, not issued work.
The FMA peak is measured in the same run (benchmarks/native.c: 12 independent AVX2 FMA
chains per thread, all threads).

It prints measurements and ratios only; the project's targets, and how the numbers compare
with them, are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (bench_args, fma_peak_gflops, machine_summary, markdown_table,  # noqa: E402
                    merge_best, stream_seconds, timeit, timeit_each)

ARGS = bench_args("Taylor linear attention on the CPU: based vs PyTorch and NumPy.",
                  "fewer repeats; skip the slow NumPy reference")

import numpy as np  # noqa: E402

import based  # noqa: E402
from based import _C  # noqa: E402
from based import reference  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


def feature_count(dk: int) -> int:
    return 1 + dk + dk * (dk + 1) // 2


def model_flops(b: int, t: int, h: int, dk: int, dv: int) -> float:
    return 4.0 * feature_count(dk) * (dv + 1) * b * t * h


# ---------------------------------------------------------------------------------------
# PyTorch forms, written the way researchers write them today
# ---------------------------------------------------------------------------------------


def torch_phi(x, scale, expanded):
    """Taylor features of x (..., Dk): compact (upper triangle) or the paper code's 273 rows."""
    dk = x.shape[-1]
    ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype)
    if expanded:
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
        return torch.cat([ones, math.sqrt(scale) * x, scale / math.sqrt(2) * outer], -1)
    i, j = torch.triu_indices(dk, dk)
    w = torch.where(i == j, scale / math.sqrt(2), scale).to(x.dtype)
    return torch.cat([ones, math.sqrt(scale) * x, w * x[..., i] * x[..., j]], -1)


def torch_quadratic(q, k, v, scale, eps=1e-6):
    """(B, T, H, D) -> (B, T, H, Dv): tril(1 + s + s^2/2) over the whole T x T matrix."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    s = torch.einsum("bhtd,bhsd->bhts", q, k) * scale
    a = torch.tril(1 + s + 0.5 * s * s)
    o = (a @ v) / (a.sum(-1, keepdim=True) + eps)
    return o.transpose(1, 2)


def torch_chunked(q, k, v, scale, eps=1e-6, chunk=64, expanded=False):
    """(B, T, H, D) -> (B, T, H, Dv): per-chunk quadratic inside, feature-map state across.
    T must be a multiple of chunk here (the benchmark's T is)."""
    b, t, h, dk = q.shape
    n = t // chunk
    q, k, v = (x.transpose(1, 2).reshape(b, h, n, chunk, x.shape[-1]) for x in (q, k, v))
    s = torch.einsum("bhncd,bhned->bhnce", q, k) * scale
    a = torch.tril(1 + s + 0.5 * s * s)
    num = a @ v
    den = a.sum(-1)
    phi_q, phi_k = torch_phi(q, scale, expanded), torch_phi(k, scale, expanded)
    kv = torch.einsum("bhncf,bhncv->bhnfv", phi_k, v)
    ks = phi_k.sum(-2)
    kv = torch.cumsum(kv, 2) - kv                       # state before each chunk
    ks = torch.cumsum(ks, 2) - ks
    num = num + phi_q @ kv
    den = den + torch.einsum("bhncf,bhnf->bhnc", phi_q, ks)
    o = num / (den[..., None] + eps)
    return o.reshape(b, h, t, -1).transpose(1, 2)


def torch_decode_step(q, k, v, kv, ks, scale, eps=1e-6):
    """(B, H, D) one token; kv (B, H, F, Dv), ks (B, H, F) updated in place."""
    phi_q, phi_k = torch_phi(q, scale, False), torch_phi(k, scale, False)
    kv.add_(phi_k[..., :, None] * v[..., None, :])
    ks.add_(phi_k)
    num = torch.einsum("bhf,bhfv->bhv", phi_q, kv)
    den = (phi_q * ks).sum(-1, keepdim=True)
    return num / (den + eps)


# ---------------------------------------------------------------------------------------


def bench_prefill(args):
    b, t, h, dk, dv = 1, 2048, 16, 16, 64
    scale = dk**-0.5
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((b, t, h, dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
    f = feature_count(dk)
    flops = model_flops(b, t, h, dk, dv)
    out = np.empty_like(v)

    def based_prefill():
        state = based.LinearAttentionState.zeros(b, h, dk, dv, like=q)
        based.linear_attention_prefill(q, k, v, state, out=out)

    fast = {"based prefill (float32)": based_prefill}
    if torch is not None:
        qb, kb, vb = (torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v))
        qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))
        fast["based prefill (bfloat16 in/out, float32 state)"] = lambda: based.linear_attention_prefill(qb, kb, vb)
        fast["torch quadratic (masked T x T einsum)"] = lambda: torch_quadratic(qt, kt, vt, scale)
        fast["torch chunked, compact phi (153)"] = lambda: torch_chunked(qt, kt, vt, scale)
        fast["torch chunked, expanded phi (273)"] = lambda: torch_chunked(qt, kt, vt, scale, expanded=True)
        with torch.inference_mode():
            o_t = torch_chunked(qt, kt, vt, scale).numpy()
        o_b, _ = based.linear_attention_prefill(q, k, v)
        assert np.abs(o_t - o_b).max() < 1e-3, "torch and based disagree"

    def twin():
        kv, ks, tok = np.zeros((b, h, f, dv), np.float32), np.zeros((b, h, f), np.float32), np.zeros(b, np.int64)
        _C.linear_attention_prefill_ref(q, k, v, kv, ks, tok, out, scale, True, 1e-6, 0, None)

    results = {}
    for _ in range(args.rounds):
        with (torch.inference_mode() if torch is not None else _nothing()):
            merge_best(results, timeit_each(fast, repeat=3 if args.quick else 7))
    slow = {"based C reference twin (plain loops, float64)": twin}
    if not args.quick:
        slow["NumPy float64 reference (quadratic)"] = lambda: reference.linear_attention_quadratic(q, k, v, scale=scale)
    results.update({n: timeit(fn, repeat=1, min_time=0) for n, fn in slow.items()})

    def render(peak):
        rows = [[n, r["min"] * 1e3, r["median"] * 1e3, b * t / r["min"], flops / r["min"] / 1e9,
                 100 * flops / r["min"] / 1e9 / peak] for n, r in results.items()]
        lines = [markdown_table(["B=1, T=2048, H=16, Dk=16, Dv=64", "min ms", "median ms", "tokens/s", "GFLOP/s",
                                 "% of FMA peak"], rows), ""]
        based_t = results["based prefill (float32)"]["min"]
        torch_t = [r["min"] for n, r in results.items() if n.startswith("torch")]
        if torch_t:
            lines.append(f"based float32 vs the best PyTorch-CPU form: **{min(torch_t) / based_t:.1f}x** faster")
        lines.append(f"based float32 prefill: **{100 * flops / based_t / 1e9 / peak:.0f}%** of the measured FMA "
                     f"peak ({peak:.0f} GFLOP/s) in useful flops")
        return "\n".join(lines)

    return render


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bench_prefill_sweep(args):
    h, dk, dv = 16, 16, 64
    rows = []
    rng = np.random.default_rng(1)
    for b, t in ((1, 512), (1, 8192), (4, 2048)):
        q, k = (rng.standard_normal((b, t, h, dk)).astype(np.float32) for _ in range(2))
        v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
        out = np.empty_like(v)
        fns = {"based": lambda: based.linear_attention_prefill(q, k, v, out=out)}
        if torch is not None:
            qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))
            fns["torch"] = lambda: torch_chunked(qt, kt, vt, dk**-0.5)
        r = {}
        for _ in range(args.rounds):
            with (torch.inference_mode() if torch is not None else _nothing()):
                merge_best(r, timeit_each(fns, repeat=3 if args.quick else 5))
        rows.append((b, t, r))

    def render(peak):
        table = []
        for b, t, r in rows:
            flops, tb = model_flops(b, t, h, dk, dv), r["based"]["min"]
            row = [f"B={b}, T={t}", tb * 1e3, b * t / tb, flops / tb / 1e9, 100 * flops / tb / 1e9 / peak]
            if "torch" in r:
                row.append(r["torch"]["min"] / tb)
            table.append(row)
        return markdown_table(["H=16, Dk=16, Dv=64, float32", "based ms", "tokens/s", "GFLOP/s", "% of FMA peak",
                               "x vs torch chunked"][: len(table[0])], table)

    return render


def bench_decode(args, threads):
    h, dk, dv = 16, 16, 64
    f = feature_count(dk)
    scale = dk**-0.5
    rows = []
    rng = np.random.default_rng(2)
    for b in (1, 8, 64):
        state = based.LinearAttentionState.zeros(b, h, dk, dv, like=np.zeros(1))
        q, k = (rng.standard_normal((b, h, dk)).astype(np.float32) for _ in range(2))
        v = rng.standard_normal((b, h, dv)).astype(np.float32)
        out = np.empty_like(v)
        state_bytes = (b * h * f * dv + b * h * f) * 4
        fns = {"based": lambda: based.linear_attention_decode(q, k, v, state, out=out)}
        if torch is not None:
            kv_t, ks_t = torch.zeros((b, h, f, dv)), torch.zeros((b, h, f))
            qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))
            fns["torch"] = lambda: torch_decode_step(qt, kt, vt, kv_t, ks_t, scale)
        r, stream = {}, math.inf
        for _ in range(args.rounds):
            with (torch.inference_mode() if torch is not None else _nothing()):
                merge_best(r, timeit_each(fns, repeat=5 if args.quick else 9))
            stream = min([stream] + [stream_seconds(state_bytes, n) for n in sorted({1, threads})])
        flops = model_flops(b, 1, h, dk, dv)
        tb = r["based"]["min"]
        row = [b, state_bytes / 2**20, tb * 1e6, stream * 1e6, tb / stream, 2 * state_bytes / tb / 1e9,
               flops / tb / 1e9, b / tb]
        if torch is not None:
            row += [r["torch"]["min"] * 1e6, r["torch"]["min"] / tb]
        rows.append(row)
    headers = ["B (H=16, F=153, Dv=64)", "state MiB", "based us/step", "stream state once us",
               "based / stream", "GB/s moved", "GFLOP/s", "tokens/s", "torch us/step", "x vs torch"]
    return markdown_table(headers[: len(rows[0])], rows)


def main():
    args = ARGS
    threads = based.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    print(f"# Linear attention (CPU)\n\nMachine: {machine_summary(threads)}; based kernels: "
          f"{_C.linear_kernel_isa()}\n")
    # The peak is measured before, between and after the runs, and the best is used: on a
    # shared machine a disturbed measurement only lowers it, which would flatter the ratios.
    peaks = [fma_peak_gflops(threads)]
    prefill = bench_prefill(args)
    peaks.append(fma_peak_gflops(threads))
    sweep = bench_prefill_sweep(args)
    decode = bench_decode(args, threads)
    peaks.append(fma_peak_gflops(threads))
    peak = max(peaks)
    print(f"FMA peak, float32, {threads} threads, measured {len(peaks)} times: "
          f"{', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s; percentages use the best, {peak:.0f}. "
          f"Times: best of {args.rounds} rounds (each round times every contender in turn); 'median' is the "
          f"median over rounds of each round's median.\n")
    print("## Prefill\n")
    print(prefill(peak))
    print("\n## Prefill, other sizes\n")
    print(sweep(peak))
    print("\n## Decode (one step, float32 state)\n")
    print(decode)
    print(f"\nCommand: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`")


if __name__ == "__main__":
    main()
