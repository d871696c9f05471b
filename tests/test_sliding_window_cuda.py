"""Sliding-window attention on CUDA against the CPU path of based (SPEC 1.2, 4).

Every test needs a CUDA build of based, torch.cuda and a GPU (``requires_cuda``) and skips
otherwise. Inputs are drawn on the host in float64, rounded to the test dtype and moved to
the GPU; the CPU runs on copies of the very same bits (inputs and cache state before the
call), so the cache contents and token counters must agree bit for bit, and outputs are
judged by the tolerance policy.

Tolerance policy (flash-attention's, ``conftest.assert_within_policy``): the CUDA output's
largest error against a float64 reference (the CPU path on float64 copies) must be at most
twice that of the same computation in the input precision -- for float32 the CPU kernel's
float32 result, for float16/bfloat16 a PyTorch restatement on the GPU whose matrix products
and softmax take and give that dtype (scores, weights and outputs rounded to it, as the
tensor-core kernel rounds its weights) -- plus a floor of one unit in the last place at the
output's scale (the output's own rounding, which no computation avoids, where both errors
are that small).
"""

from __future__ import annotations

import pytest
from conftest import EPS, HAS_TORCH, assert_within_policy, poison, requires_cuda

import based
from based import reference as ref

if HAS_TORCH:
    import torch

pytestmark = requires_cuda

DTYPES = ["float32", "float16", "bfloat16"]


def _td(name):
    return getattr(torch, name)


def _name(t):
    return str(t.dtype).removeprefix("torch.")


def _randn(gen, shape, dtype, spread=1.0):
    return (spread * torch.randn(*shape, generator=gen, dtype=torch.float64)).to("cuda", _td(dtype))


def _inputs(B, T, H, Hkv, D, dtype, seed, spread=1.5):
    """q (B, T, H, D), k and v (B, T, Hkv, D) on the GPU; scores of a few units."""
    g = torch.Generator().manual_seed(seed)
    return _randn(g, (B, T, H, D), dtype, spread), _randn(g, (B, T, Hkv, D), dtype, spread), _randn(g, (B, T, Hkv, D),
                                                                                                  dtype)


def _row_major_cache(B, Hkv, W, D, dtype, scale=None):
    """A CUDA cache whose key ring is row-major (the kernels' other key layout; SlidingWindowCache.zeros
    makes it slot-contiguous)."""
    z = dict(device="cuda", dtype=_td(dtype))
    return based.SlidingWindowCache({"k": torch.zeros(B, Hkv, W, D, **z), "v": torch.zeros(B, Hkv, W, D, **z),
                                     "tokens": torch.zeros(B, dtype=torch.int64, device="cuda")},
                                    {"window": W, "scale": D**-0.5 if scale is None else scale})


def _snapshot(cache, dtype=None, rows=None):
    """A CPU SlidingWindowCache with cache's keys, values and counters (of sequences `rows`),
    converted to dtype (default: the cache's own, bit for bit)."""
    rows = slice(None) if rows is None else rows
    k, v, n = cache.k[rows].cpu(), cache.v[rows].cpu(), cache.tokens[rows].cpu()
    dtype = dtype or _name(k)
    c = based.SlidingWindowCache.zeros(k.shape[0], cache.kv_heads, cache.window, cache.head_dim, dtype=dtype,
                                       scale=cache.scale, like=torch.empty(0))
    c.k.copy_(k.to(_td(dtype)))
    c.v.copy_(v.to(_td(dtype)))
    c.tokens.copy_(n)
    return c


def _cpu(x, dtype):
    return x.detach().cpu().to(_td(dtype))


def _cpu_prefill(q, k, v, window, snap, dtype):
    """based's CPU prefill on copies of q, k, v and of the snapshot, all in dtype: (out, cache)."""
    cache = None if snap is None else _snapshot(snap, dtype)
    return based.sliding_window_prefill(_cpu(q, dtype), _cpu(k, dtype), _cpu(v, dtype), window=window, cache=cache)


def _low_attention(q, keys, values, kpos, qpos, window, scale):
    """softmax(scale q k^T) v over the band, in q's dtype on q's device. q: (T, H, D); keys,
    values: (S, Hkv, D) at positions kpos (S,); queries at positions qpos (T,)."""
    group = q.shape[1] // keys.shape[1]
    kk = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # (H, S, D)
    vv = values.repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.matmul(q.transpose(0, 1), kk.transpose(1, 2)) * scale  # (H, T, S), rounded to the dtype
    band = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)
    p = torch.softmax(s.masked_fill(~band, float("-inf")), dim=-1)
    return torch.matmul(p, vv).transpose(0, 1)


def _low_prefill(q, k, v, window, snap, scale):
    """The input-precision computation of a prefill (or of a decode step, T = 1) given the cache
    state before it: the history the ring holds, then the call's own keys."""
    B, T = q.shape[:2]
    outs = []
    for b in range(B):
        n0 = 0 if snap is None else int(snap.tokens[b])
        lo = max(0, n0 - window + 1)
        hpos = torch.arange(lo, n0)
        if snap is None or n0 == 0:
            hk = k.new_zeros((0, *k.shape[2:]))
            hv = hk
        else:
            slots = hpos % window
            hk = snap.k[b][:, slots].transpose(0, 1).to("cuda", q.dtype)
            hv = snap.v[b][:, slots].transpose(0, 1).to("cuda", q.dtype)
        keys, values = torch.cat([hk, k[b]]), torch.cat([hv, v[b]])
        kpos = torch.cat([hpos, torch.arange(n0, n0 + T)]).to("cuda")
        qpos = torch.arange(n0, n0 + T, device="cuda")
        outs.append(_low_attention(q[b], keys, values, kpos, qpos, window, scale))
    return torch.stack(outs)


def _floor(ref64, dtype):
    """One unit in the last place at the output's scale: the output's own rounding to its
    dtype, which no computation avoids (it matters where both errors are that small)."""
    return EPS[dtype] * float(abs(ref64).max()) if ref64.numel() else 0.0


def _check(out, q, k, v, window, snap, scale, name="out"):
    """A CUDA prefill's output against the CPU path given the cache state before the call
    (snap: a CPU snapshot, or None for an empty cache). Returns the CPU's cache after the
    call in the input dtype, for the bit-for-bit comparison of the caches."""
    dtype = _name(q)
    ref64, _ = _cpu_prefill(q, k, v, window, snap, "float64")
    same, cache = _cpu_prefill(q, k, v, window, snap, dtype)
    low = same if dtype == "float32" else _low_prefill(q, k, v, window, snap, scale)
    assert_within_policy(out, ref64, low, name, floor=_floor(ref64, dtype))
    return cache


def _bits(t):
    """A float tensor's bytes (NaN payloads included), comparable with torch.equal."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def _assert_same_cache(got, want, what="cache"):
    """Keys, values (as bits) and counters of a CUDA cache equal those of a CPU cache."""
    for name in ("k", "v"):
        same = torch.equal(_bits(getattr(got, name)), _bits(getattr(want, name)))
        assert same, f"{what}: {name} differs from the CPU's"
    assert torch.equal(got.tokens.cpu(), want.tokens), f"{what}: tokens {got.tokens.tolist()} != {want.tokens.tolist()}"


def _out_like(q):
    return poison(torch.empty_like(q))


def _prefill(q, k, v, window=None, cache=None):
    """CUDA prefill into a NaN-poisoned out (every element must be written)."""
    out = _out_like(q)
    o, cache = based.sliding_window_prefill(q, k, v, window=window, cache=cache, out=out)
    assert o is out
    return out, cache


def _decode(q, k, v, cache):
    out = _out_like(q)
    assert based.sliding_window_decode(q, k, v, cache, out=out) is out
    return out


# ---------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------

# (B, T, H, Hkv, D, W): T against W and the 64-position tiles, head dims (not a power of two,
# not a multiple of 16, the 256 maximum, below 32), GQA groups 1, 4, 6, window 1 and W > T.
PREFILL_CASES = {
    "T1": (1, 1, 4, 4, 64, 64),
    "T5-W7-D16-gqa4": (3, 5, 8, 2, 16, 7),
    "T64-W64": (1, 64, 4, 4, 64, 64),
    "T65-W65-gqa6": (3, 65, 6, 1, 64, 65),
    "T200-D100-W64": (1, 200, 8, 2, 100, 64),
    "T200-D112-W300": (3, 200, 4, 4, 112, 300),
    "T1000-W64": (1, 1000, 4, 4, 64, 64),
    "T1000-D128-W65-gqa4": (1, 1000, 8, 2, 128, 65),
    "T65-D256-W7-gqa6": (3, 65, 6, 1, 256, 7),
    "T200-W1-D16": (1, 200, 4, 4, 16, 1),
    "T1000-W300-gqa6": (3, 1000, 6, 1, 64, 300),
    "T5-D256-W300": (1, 5, 4, 4, 256, 300),
    "T64-D128-W1-gqa4": (3, 64, 8, 2, 128, 1),
    "T65-D7-W5": (3, 65, 4, 2, 7, 5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_cpu(case, dtype):
    B, T, H, Hkv, D, W = PREFILL_CASES[case]
    q, k, v = _inputs(B, T, H, Hkv, D, dtype, seed=list(PREFILL_CASES).index(case))
    out, cache = _prefill(q, k, v, window=W)
    want_cache = _check(out, q, k, v, W, None, D**-0.5, case)
    _assert_same_cache(cache, want_cache, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W, D, cuts", [(7, 64, [37, 91]), (64, 64, [64, 65]), (65, 100, [1, 130]),
                                        (300, 112, [250, 10, 40]), (1, 64, [3, 4])])
@pytest.mark.parametrize("layout", ["ring", "row-major"])
def test_continued_and_chunked_prefill(dtype, W, D, cuts, layout):
    """A prompt in pieces: each piece attends to the cached keys of the earlier ones (the first
    key tiles come from the ring), each output and the cache after each call match the CPU,
    and together the pieces give what one prefill of the whole prompt gives."""
    B, H, Hkv = 2, 4, 2
    T = sum(cuts)
    q, k, v = _inputs(B, T, H, Hkv, D, dtype, seed=W + D)
    if layout == "ring":
        cache = based.SlidingWindowCache.zeros(B, Hkv, W, D, dtype=dtype, like=q)
    else:
        cache = _row_major_cache(B, Hkv, W, D, dtype)
    outs, t0 = [], 0
    for n in cuts:
        sl = slice(t0, t0 + n)
        snap = _snapshot(cache)
        out, _ = _prefill(q[:, sl], k[:, sl], v[:, sl], cache=cache)
        want = _check(out, q[:, sl], k[:, sl], v[:, sl], W, snap, cache.scale, f"piece at {t0}")
        _assert_same_cache(cache, want, f"after the piece at {t0}")
        outs.append(out)
        t0 += n
    whole, whole_cache = _prefill(q, k, v, window=W)
    _check(torch.cat(outs, dim=1), q, k, v, W, None, D**-0.5, "pieces together")
    _check(whole, q, k, v, W, None, D**-0.5, "one prefill")
    for name in ("k", "v", "tokens"):
        assert torch.equal(getattr(cache, name).cpu(), getattr(whole_cache, name).cpu()), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_and_out(dtype):
    """(B, H, T, D) tensors passed as transpose(1, 2), and every other time step of a longer
    tensor, give the CPU's results; out may be strided too."""
    B, T, H, Hkv, D, W = 2, 150, 4, 2, 64, 64
    g = torch.Generator().manual_seed(5)
    q = _randn(g, (B, H, T, D), dtype, 1.5).transpose(1, 2)
    k = _randn(g, (B, 2 * T, Hkv, D), dtype, 1.5)[:, ::2]
    v = _randn(g, (B, Hkv, T, D), dtype).transpose(1, 2)
    out = poison(torch.empty(B, H, T, D, device="cuda", dtype=_td(dtype))).transpose(1, 2)
    o, cache = based.sliding_window_prefill(q, k, v, window=W, out=out)
    assert o is out
    want = _check(out, q, k, v, W, None, D**-0.5, "strided")
    _assert_same_cache(cache, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_around_the_wrap(dtype):
    """Sequences whose counters sit just before, at and after multiples of W (and one still
    filling its ring), with a cache holding arbitrary history: prefill then decode steps across
    the wrap match the CPU, outputs and cache bits."""
    B, H, Hkv, D, W = 4, 4, 2, 64, 16
    g = torch.Generator().manual_seed(6)
    cache = based.SlidingWindowCache.zeros(B, Hkv, W, D, dtype=dtype, like=torch.empty(0, device="cuda"))
    cache.k.copy_(_randn(g, (B, Hkv, W, D), dtype, 1.5))
    cache.v.copy_(_randn(g, (B, Hkv, W, D), dtype))
    cache.tokens.copy_(torch.tensor([3 * W - 2, 5 * W, 2 * W + 1, W - 3], device="cuda"))
    q, k, v = _inputs(B, 5, H, Hkv, D, dtype, seed=7)
    snap = _snapshot(cache)
    out, _ = _prefill(q, k, v, cache=cache)
    _assert_same_cache(cache, _check(out, q, k, v, W, snap, cache.scale, "prefill"), "prefill")
    q, k, v = _inputs(B, 4, H, Hkv, D, dtype, seed=8)
    for t in range(4):
        snap = _snapshot(cache)
        out = _decode(q[:, t], k[:, t], v[:, t], cache)
        want = _check(out[:, None], q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], W, snap, cache.scale, f"decode {t}")
        _assert_same_cache(cache, want, f"decode {t}")


# ---------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, Hkv, D, W", [(4, 4, 64, 64), (8, 2, 112, 7), (6, 1, 100, 65), (4, 4, 256, 1),
                                          (16, 1, 32, 300), (12, 1, 16, 130)])
@pytest.mark.parametrize("layout", ["ring", "row-major"])
def test_decode_after_prefill_matches_one_prefill(dtype, H, Hkv, D, W, layout):
    """Prefill 20 positions, then decode through the ring's fill and wrap: each step's output is
    the corresponding row of one prefill over the whole sequence, and the cache and counters
    after every step equal the CPU's."""
    B, T0, T = 3, 20, 90 if W < 90 else 40
    q, k, v = _inputs(B, T, H, Hkv, D, dtype, seed=H * D + W)
    if layout == "ring":
        cache = based.SlidingWindowCache.zeros(B, Hkv, W, D, dtype=dtype, like=q)
    else:
        cache = _row_major_cache(B, Hkv, W, D, dtype)
    _prefill(q[:, :T0], k[:, :T0], v[:, :T0], cache=cache)
    cpu = _snapshot(cache)
    steps = []
    for t in range(T0, T):
        steps.append(_decode(q[:, t], k[:, t], v[:, t], cache))
        based.sliding_window_decode(_cpu(q[:, t], dtype), _cpu(k[:, t], dtype), _cpu(v[:, t], dtype), cpu)
    _assert_same_cache(cache, cpu, "after the decode steps")
    got = torch.stack(steps, dim=1)
    ref64, _ = _cpu_prefill(q, k, v, W, None, "float64")
    if dtype == "float32":
        low, _ = _cpu_prefill(q, k, v, W, None, "float32")
    else:
        low = _low_prefill(q, k, v, W, None, D**-0.5)
    ref64, low = ref64[:, T0:], low[:, T0:]
    assert_within_policy(got, ref64, low, "decode", floor=_floor(ref64, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_is_graph_capturable(dtype):
    """A decode step with out= and an existing cache captured in a CUDA graph: each replay reads
    the static inputs, advances the cache and matches the CPU's decode."""
    B, H, Hkv, D, W, T0 = 2, 4, 2, 64, 16, 10
    q, k, v = _inputs(B, T0 + 8, H, Hkv, D, dtype, seed=9)
    _, cache = _prefill(q[:, :T0], k[:, :T0], v[:, :T0], window=W)
    _, scratch = _prefill(q[:, :T0], k[:, :T0], v[:, :T0], window=W)
    sq, sk, sv = q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()
    out = torch.empty_like(sq)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on another cache
        based.sliding_window_decode(sq, sk, sv, scratch, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        based.sliding_window_decode(sq, sk, sv, cache, out=out)
    assert cache.tokens.tolist() == [T0] * B  # captured, not run
    cpu = _snapshot(cache)
    for t in range(T0, T0 + 8):
        snap = _snapshot(cache)
        sq.copy_(q[:, t])
        sk.copy_(k[:, t])
        sv.copy_(v[:, t])
        graph.replay()
        want = _check(out[:, None], q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], W, snap, cache.scale, f"replay {t}")
        based.sliding_window_decode(_cpu(q[:, t], dtype), _cpu(k[:, t], dtype), _cpu(v[:, t], dtype), cpu)
        _assert_same_cache(cache, want, f"replay {t}")
        _assert_same_cache(cache, cpu, f"replay {t}")


@pytest.fixture(params=["register", "smem"])
def decode_kernel(request, monkeypatch):
    """Each window decode kernel in turn: "register" leaves BASED_CUDA_WINDOW_DECODE unset (the
    register kernel takes the shapes it can), "smem" forces the shared-memory kernel."""
    if request.param == "smem":
        monkeypatch.setenv("BASED_CUDA_WINDOW_DECODE", "smem")
    return request.param


def _decode_steps_match_cpu(dtype, B, H, Hkv, D, W, steps):
    """Prefill 50 positions, reset every third sequence (so it fills the ring again while the
    others wrap it), then decode `steps` tokens: each step's output and cache match the CPU
    given the cache before the step."""
    T0 = 50
    q, k, v = _inputs(B, T0 + steps, H, Hkv, D, dtype, seed=B + D)
    _, cache = _prefill(q[:, :T0], k[:, :T0], v[:, :T0], window=W)
    cache.reset(list(range(0, B, 3)))
    for t in range(T0, T0 + steps):
        snap = _snapshot(cache)
        out = _decode(q[:, t], k[:, t], v[:, t], cache)
        want = _check(out[:, None], q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], W, snap, cache.scale, f"step {t}")
        _assert_same_cache(cache, want, f"step {t}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, Hkv, D, W, steps", [(160, 16, 8, 64, 70, 30), (300, 16, 2, 256, 8, 12),
                                                    (2200, 2, 2, 16, 8, 4)])
def test_decode_many_items_per_block(dtype, B, H, Hkv, D, W, steps, monkeypatch):
    """The shared-memory kernel (forced: the last shape would take the register kernel in
    float32) over more (sequence, kv head) blocks than the GPU holds at once, sequences at
    different points sharing each launch; D = 256 with 8 query heads per kv head is its largest
    shared-memory plan. Every step matches the CPU, the cache bit for bit."""
    monkeypatch.setenv("BASED_CUDA_WINDOW_DECODE", "smem")
    _decode_steps_match_cpu(dtype, B, H, Hkv, D, W, steps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, D, W, steps", [(64, 16, 64, 64, 70), (16, 4, 128, 33, 40), (16, 8, 32, 7, 12),
                                               (8, 3, 64, 1, 3), (4, 2, 16, 64, 70)])
def test_decode_one_head_per_kv_head(dtype, B, H, D, W, steps, decode_kernel):
    """H = Hkv and W <= 64 with whole 16-byte rows: the register kernel takes these calls
    (rows of 64, 128 or 256 bytes), BASED_CUDA_WINDOW_DECODE=smem forces the shared-memory
    kernel; both match the CPU at every step through the ring's fill and wrap, with some
    sequences reset mid-way. D = 16 in float16/bfloat16 (32-byte rows) and D = 128 in float32
    (512-byte rows) stay on the shared-memory kernel either way."""
    _decode_steps_match_cpu(dtype, B, H, H, D, W, steps)


def _decode_kernel_names(q, k, v, cache):
    """The names of the CUDA kernels one decode call launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        based.sliding_window_decode(q, k, v, cache)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "kernel" in e.name]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_kernel_choice(dtype, monkeypatch):
    """The register kernel runs where the README says it does (H = Hkv, W <= 64, rows of 64,
    128 or 256 bytes), the shared-memory kernel elsewhere (GQA, W > 64, other row sizes) and
    everywhere under BASED_CUDA_WINDOW_DECODE=smem: so the tests that name a kernel test it."""
    def names(H, Hkv, D, W):
        q, k, v = _inputs(2, 4, H, Hkv, D, dtype, seed=5)
        _, cache = _prefill(q, k, v, window=W)
        got = _decode_kernel_names(q[:, 0], k[:, 0], v[:, 0], cache)
        fast = [n for n in got if "decode_fast_kernel" in n]
        smem = [n for n in got if "decode_kernel" in n and "decode_fast_kernel" not in n]
        assert len(fast) + len(smem) == 1, got
        return "register" if fast else "smem"

    row64 = 16 if dtype == "float32" else 32  # D with 64-byte rows
    assert names(4, 4, 64, 64) == "register"
    assert names(4, 4, row64, 7) == "register"
    assert names(4, 2, 64, 64) == "smem"   # GQA
    assert names(4, 4, 64, 65) == "smem"   # W > 64
    assert names(4, 4, 100, 64) == "smem"  # 200- or 400-byte rows
    monkeypatch.setenv("BASED_CUDA_WINDOW_DECODE", "smem")
    assert names(4, 4, 64, 64) == "smem"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_never_reads_stale_slots(dtype, decode_kernel):
    """While the ring fills, the slots past the valid ones hold whatever was there (here NaN
    and Inf, as in a cache built from torch.empty or rewound): they are never read, so the
    outputs are finite and match the CPU's, on both kernels."""
    B, H, D, W, T0 = 3, 4, 64, 8, 3
    q, k, v = _inputs(B, T0 + 3, H, H, D, dtype, seed=21)
    cache = based.SlidingWindowCache.zeros(B, H, W, D, dtype=dtype, like=q)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("inf"))
    _prefill(q[:, :T0], k[:, :T0], v[:, :T0], cache=cache)
    for t in range(T0, T0 + 3):
        snap = _snapshot(cache)
        out = _decode(q[:, t], k[:, t], v[:, t], cache)
        assert torch.isfinite(out).all(), f"step {t}: a stale slot reached the outputs"
        want = _check(out[:, None], q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], W, snap, cache.scale, f"step {t}")
        _assert_same_cache(cache, want, f"step {t}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_nonfinite_inputs_stay_local(dtype, decode_kernel):
    """Decode: an Inf value in the cache (kv head 1) and a NaN in the new key (kv head 2) reach
    exactly those heads' outputs, as on the CPU; the other heads stay finite (SPEC 4)."""
    B, T, H, D, W = 2, 10, 4, 64, 8
    q, k, v = _inputs(B, T + 1, H, H, D, dtype, seed=23)
    v[:, T - 2, 1, 3] = float("inf")
    k[:, T, 2, 5] = float("nan")
    _, cache = _prefill(q[:, :T], k[:, :T], v[:, :T], window=W)
    cpu = _snapshot(cache)
    out = _decode(q[:, T], k[:, T], v[:, T], cache)
    o_cpu = based.sliding_window_decode(_cpu(q[:, T], dtype), _cpu(k[:, T], dtype), _cpu(v[:, T], dtype), cpu)
    bad, bad_cpu = (~torch.isfinite(out.cpu())).any(-1), (~torch.isfinite(o_cpu)).any(-1)  # (B, H)
    assert torch.equal(bad, bad_cpu), f"non-finite heads {bad.tolist()} differ from the CPU's {bad_cpu.tolist()}"
    assert bad[:, 1].all() and bad[:, 2].all() and not bad[:, 0].any() and not bad[:, 3].any()
    _assert_same_cache(cache, cpu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_counters_past_2_32(dtype, decode_kernel):
    """Counters at and past 2^32 (the kernels' slot n % W leaves its 32-bit path): the same
    outputs and cache as the CPU given the same cache."""
    B, H, D, W = 3, 4, 64, 7
    q, k, v = _inputs(B, W + 2, H, H, D, dtype, seed=22)
    _, cache = _prefill(q[:, :W], k[:, :W], v[:, :W], window=W)
    cache.tokens.copy_(torch.tensor([2**32 - 1, 2**32, 3 * 2**32 + 5], device="cuda"))
    for t in range(W, W + 2):
        snap = _snapshot(cache)
        out = _decode(q[:, t], k[:, t], v[:, t], cache)
        want = _check(out[:, None], q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], W, snap, cache.scale, f"step {t}")
        _assert_same_cache(cache, want, f"step {t}")


# ---------------------------------------------------------------------------------------
# contract: invalid counters, memory bounds, non-finite inputs, empty calls
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("Hkv", [2, 4])
def test_invalid_counter_gives_nan_and_leaves_its_cache(dtype, phase, Hkv):
    """A counter the CPU would refuse (negative, or one that the call's positions would carry
    past 2^62) cannot be checked on the host without a sync: the kernels write NaN to that
    sequence's outputs and leave its cache slots and counter as they were; the valid sequence
    proceeds as on the CPU."""
    B, T, H, D, W = 3, 6, 4, 64, 8  # Hkv = 4: the register decode kernel
    q, k, v = _inputs(B, 2 * T, H, Hkv, D, dtype, seed=10)
    _, cache = _prefill(q[:, :T], k[:, :T], v[:, :T], window=W)
    if phase == "prefill":
        counters, good = [-1, T, 2**62 - T + 1], 1
        qs, ks, vs = q[:, T:], k[:, T:], v[:, T:]
    else:
        counters, good = [2**62, -(2**40), T], 2
        qs, ks, vs = q[:, T:T + 1], k[:, T:T + 1], v[:, T:T + 1]
    cache.tokens.copy_(torch.tensor(counters, device="cuda"))
    before = _snapshot(cache)
    # out starts finite (not the NaN poison of the other tests), so the NaNs must be written
    if phase == "prefill":
        out = torch.full_like(qs, 7.0)
        based.sliding_window_prefill(qs, ks, vs, cache=cache, out=out)
    else:
        out = torch.full_like(qs[:, 0], 7.0)
        based.sliding_window_decode(qs[:, 0], ks[:, 0], vs[:, 0], cache, out=out)
        out = out[:, None]
    after = _snapshot(cache)
    for b in range(B):
        if b == good:
            continue
        assert torch.isnan(out[b]).all(), f"sequence {b} (counter {counters[b]}): outputs must be NaN"
        for name in ("k", "v"):
            assert torch.equal(_bits(getattr(after, name)[b]), _bits(getattr(before, name)[b])), f"sequence {b}: {name}"
        assert int(after.tokens[b]) == counters[b]
    rows = slice(good, good + 1)
    want = _check(out[rows], qs[rows], ks[rows], vs[rows], W, _snapshot(before, rows=rows), cache.scale, "valid")
    _assert_same_cache(_snapshot(after, rows=rows), want, "valid sequence")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["ring", "row-major"])
@pytest.mark.parametrize("H, Hkv, D", [(4, 2, 100), (4, 4, 64)])  # (4, 4, 64): the register decode kernel
def test_writes_stay_inside_out_and_cache(dtype, layout, H, Hkv, D):
    """out and the cache carved out of larger poisoned buffers: prefill and decode write every
    element of out and nothing around out or the cache."""
    B, T, W, M = 2, 70, 64, 1000
    td = _td(dtype)
    q, k, v = _inputs(B, T + 1, H, Hkv, D, dtype, seed=11)

    def carve(shape, fill):
        n = 1
        for s in shape:
            n *= s
        big = torch.full((n + 2 * M,), fill, dtype=td, device="cuda")
        return big, big[M:M + n].view(shape)

    kbig, kview = carve((B, Hkv, D, W), 7.0)
    vbig, vview = carve((B, Hkv, W, D), 7.0)
    kview = kview.transpose(2, 3) if layout == "ring" else kview.view(B, Hkv, W, D)
    kview.zero_()
    vview.zero_()
    tokens = torch.zeros(B, dtype=torch.int64, device="cuda")
    cache = based.SlidingWindowCache({"k": kview, "v": vview, "tokens": tokens}, {"window": W, "scale": D**-0.5})
    obig, out = carve((B, T, H, D), float("nan"))
    if layout == "ring":
        # the CPU's slot-contiguous key ring is refused on CUDA (the kernels read whole key
        # rows): a clear error, and nothing written
        with pytest.raises(ValueError, match="k_cache must have unit stride"):
            based.sliding_window_prefill(q[:, :T], k[:, :T], v[:, :T], cache=cache, out=out)
        assert torch.isnan(obig).all() and (kview == 0).all() and (tokens == 0).all()
        return
    o, _ = based.sliding_window_prefill(q[:, :T], k[:, :T], v[:, :T], cache=cache, out=out)
    assert o is out
    dbig, dout = carve((B, H, D), float("nan"))
    based.sliding_window_decode(q[:, T], k[:, T], v[:, T], cache, out=dout)
    buffers = (("k cache", kbig, 7.0), ("v cache", vbig, 7.0), ("out", obig, None), ("decode out", dbig, None))
    for name, big, fill in buffers:
        for margin in (big[:M], big[-M:]):
            if fill is None:
                assert torch.isnan(margin).all(), f"{name}: written outside"
            else:
                assert (margin == fill).all(), f"{name}: written outside"
    assert not torch.isnan(out).any() and not torch.isnan(dout).any()
    want = _check(out, q[:, :T], k[:, :T], v[:, :T], W, None, D**-0.5, "prefill")
    based.sliding_window_decode(_cpu(q[:, T], dtype), _cpu(k[:, T], dtype), _cpu(v[:, T], dtype), want)
    _assert_same_cache(cache, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_inputs_stay_local(dtype):
    """A NaN key and an Inf value (one in the input, one in the cache) reach exactly the
    outputs whose window holds them, on the heads that read their kv head (SPEC 4): the
    same outputs as on the CPU are non-finite, the others are finite."""
    B, T, H, Hkv, D, W = 1, 40, 4, 2, 64, 5
    q, k, v = _inputs(B, 2 * T, H, Hkv, D, dtype, seed=12)
    k[0, 3, 1, 2] = float("nan")
    v[0, 10, 0, 0] = float("inf")
    v[0, T - 2, 1, 5] = float("-inf")  # read from the cache by the second call
    cpu, cache = None, None
    for sl in (slice(0, T), slice(T, 2 * T)):
        out, cache = _prefill(q[:, sl], k[:, sl], v[:, sl], window=W, cache=cache)
        o_cpu, cpu = based.sliding_window_prefill(_cpu(q[:, sl], dtype), _cpu(k[:, sl], dtype), _cpu(v[:, sl], dtype),
                                                  window=W, cache=cpu)
        bad, bad_cpu = (~torch.isfinite(out.cpu())).any(-1), (~torch.isfinite(o_cpu)).any(-1)  # (B, T, H)
        assert torch.equal(bad, bad_cpu), f"non-finite outputs differ from the CPU's at {sl}"
        assert bad.any() and not bad.all()
    _assert_same_cache(cache, cpu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_calls(dtype):
    """B == 0 and T == 0 change nothing; H == 0 (no query heads) still stores the keys and
    values and counts the tokens, as on the CPU."""
    B, T, Hkv, D, W = 2, 6, 2, 16, 4
    _, k, v = _inputs(B, T, 2, Hkv, D, dtype, seed=13)
    q0 = torch.empty(B, T, 0, D, device="cuda", dtype=_td(dtype))
    out, cache = based.sliding_window_prefill(q0, k, v, window=W)
    assert out.shape == (B, T, 0, D)
    _, cpu = based.sliding_window_prefill(_cpu(q0, dtype), _cpu(k, dtype), _cpu(v, dtype), window=W)
    _assert_same_cache(cache, cpu, "H == 0")
    based.sliding_window_decode(q0[:, 0], k[:, 0], v[:, 0], cache)
    based.sliding_window_decode(_cpu(q0[:, 0], dtype), _cpu(k[:, 0], dtype), _cpu(v[:, 0], dtype), cpu)
    _assert_same_cache(cache, cpu, "H == 0 decode")
    before = _snapshot(cache)
    q, k, v = _inputs(B, 0, 4, Hkv, D, dtype, seed=14)
    out, _ = based.sliding_window_prefill(q, k, v, cache=cache)
    assert out.shape == (B, 0, 4, D)
    _assert_same_cache(cache, before, "T == 0")
    q, k, v = _inputs(0, 5, 4, Hkv, D, dtype, seed=15)
    out, empty = based.sliding_window_prefill(q, k, v, window=W)
    assert out.shape == (0, 5, 4, D) and empty.tokens.shape == (0,)


def test_offsets_past_2_31_elements():
    """q and out of more than 2^31 elements (64-bit offsets): the last rows, which lie past
    element 2^31, are right, and the cache holds the last W keys."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    H, Hkv, D, W, R = 16, 1, 64, 64, 64
    T = 2**31 // (H * D) + 2 * R
    g = torch.Generator(device="cuda").manual_seed(16)
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    out, cache = based.sliding_window_prefill(q, k, v, window=W)
    assert (T - R) * H * D > 2**31
    qt, kt, vt = q[:, T - R:], k[:, T - R - (W - 1):], v[:, T - R - (W - 1):]
    ref64 = torch.from_numpy(ref.sliding_window_attention(qt.double().cpu().numpy(), kt.double().cpu().numpy(),
                                                          vt.double().cpu().numpy(), W, offset=W - 1))
    kpos = torch.arange(T - R - (W - 1), T, device="cuda")
    low = _low_attention(qt[0], kt[0], vt[0], kpos, kpos[W - 1:], W, D**-0.5)[None]
    assert_within_policy(out[:, T - R:], ref64, low, "last rows", floor=_floor(ref64, "bfloat16"))
    slots = torch.arange(T - W, T, device="cuda") % W
    assert torch.equal(cache.k[0, :, slots].transpose(0, 1), k[0, T - W:])
    assert torch.equal(cache.v[0, :, slots].transpose(0, 1), v[0, T - W:])
    assert cache.tokens.tolist() == [T]
