"""Sliding-window attention (SPEC 1.2): the fast kernel and its plain-loop C twin against the
float64 NumPy reference with an explicit band mask, over shapes, dtypes, GQA groups, head dims
and strides; prefill continued by decode and by more prefill chunks, across the step where the
ring cache fills and wraps; window 1; hypothesis property tests."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import EPS, HAS_TORCH, make_array, poison, requires_torch, rounded, to_numpy64, torch
from hypothesis import given, settings
from hypothesis import strategies as st

import based
from based import _C
from based import reference as ref

DTYPES = ["float32", "float64", "float16", "bfloat16"]
IMPLS = {"fast": (_C.sliding_window_prefill, _C.sliding_window_decode),
         "ref": (_C.sliding_window_prefill_ref, _C.sliding_window_decode_ref)}


def lib_for(dtype):
    return "torch" if dtype == "bfloat16" else "numpy"


def make_inputs(rng, shape_q, shape_kv, dtype, lib=None, spread=1.5):
    """q, k, v as arrays of `dtype` plus the float64 values the kernel actually sees."""
    lib = lib or lib_for(dtype)
    data = [spread * rng.standard_normal(shape_q), spread * rng.standard_normal(shape_kv),
            rng.standard_normal(shape_kv)]
    return [make_array(lib, d, dtype) for d in data], [rounded(d, dtype) for d in data]


def tolerance(q64, k64, v64, scale, dtype, window, want):
    """Elementwise bound on |o - ref|, from the standard first-order error analysis of the
    kernel's arithmetic in eps_c = EPS[compute] (float32, or float64 for float64 inputs):
      * a score s = scale * q.k (D products, q pre-scaled) is off by <= (D + 2) eps_c smax, with
        smax = scale * max over query/key pairs of sum_i |q_i k_i| (computed from the data);
      * so each softmax weight p_u = exp(s_u - m) / l is off by a relative 2 (D + 2) eps_c smax,
        plus (W + 4) eps_c for exp, the rescaling and the sum l of at most W terms;
      * o = sum_u p_u v_u adds W eps_c max|v| for its own sum;
    giving max|v| eps_c (2 (D + 2) smax + 2 W + 8), plus rounding o to the output dtype: half an
    ulp, taken as EPS[dtype] |ref| (twice that, to be safe), and one float16 subnormal ulp."""
    compute = "float64" if dtype == "float64" else "float32"
    d = q64.shape[-1]
    if q64.size == 0 or k64.size == 0:
        return 0.0
    smax = scale * np.einsum("bthd,bshd->bhts", np.abs(q64), np.repeat(np.abs(k64), q64.shape[2] // k64.shape[2],
                                                                     axis=2)).max()
    vmax = np.abs(v64).max()
    atol = vmax * EPS[compute] * (2 * (d + 2) * smax + 2 * window + 8)
    return EPS[dtype] * np.abs(want) + atol + (2.0**-24 if dtype == "float16" else 0.0)


def assert_close(got, want, bound, what=""):
    got = to_numpy64(got)
    assert got.shape == want.shape, what
    err = np.abs(got - want)
    ok = err <= bound
    assert np.all(ok), f"{what}: max err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}, " \
                       f"bound there {np.broadcast_to(bound, err.shape)[~ok].min():.3g}"


def new_cache(k, batch, kv_heads, window, head_dim, scale=None):
    return based.SlidingWindowCache.zeros(batch, kv_heads, window, head_dim, scale=scale, like=k)


def prefill(impl, q, k, v, cache, out=None):
    if out is None:
        out = poison(based._arrays.empty(v, tuple(q.shape), based._state._dtype_name(v, "v")))
    IMPLS[impl][0](q, k, v, cache.k, cache.v, cache.tokens, out, cache.window, cache.scale, None)
    return out


def decode(impl, q, k, v, cache):
    out = poison(based._arrays.empty(v, tuple(q.shape), based._state._dtype_name(v, "v")))
    IMPLS[impl][1](q, k, v, cache.k, cache.v, cache.tokens, out, cache.window, cache.scale, None)
    return out


def bits(a):
    """The exact bytes of an array (numpy or torch, any dtype), for bit-identity checks."""
    if HAS_TORCH and isinstance(a, torch.Tensor):
        return a.detach().contiguous().view(torch.uint8).numpy().tobytes() if a.numel() else b""
    return np.ascontiguousarray(a).tobytes()


# (B, T, H, Hkv, D, W): every case is quick; together they cover T against W, GQA groups,
# head dims (odd, not a multiple of the 16-wide register blocks, the 256 maximum), windows
# spanning several 64-key softmax blocks and 256-key chunks, and the adaptive query block
# (G * D large makes a work item hold fewer queries).
CASES = {
    "T<W": (2, 5, 4, 2, 16, 8),
    "T=W": (2, 8, 4, 2, 16, 8),
    "T=W+1": (2, 9, 4, 2, 16, 8),
    "T>>W": (1, 300, 2, 1, 32, 7),
    "T=1": (3, 1, 2, 2, 8, 4),
    "W=1": (2, 10, 2, 1, 8, 1),
    "gqa1": (1, 40, 4, 4, 16, 12),
    "gqa2": (1, 40, 4, 2, 16, 12),
    "gqa4": (1, 40, 8, 2, 16, 12),
    "D1": (2, 20, 2, 1, 1, 5),
    "D7": (2, 20, 3, 1, 7, 6),
    "D64-W65": (1, 90, 2, 2, 64, 65),
    "D100": (1, 30, 2, 1, 100, 9),
    "D256": (1, 20, 2, 2, 256, 10),
    "W150-blocks": (1, 200, 2, 1, 16, 150),
    "W300-chunks": (1, 600, 1, 1, 8, 300),
    "G16-D256": (1, 60, 16, 1, 256, 20),
    "T=0": (2, 0, 2, 1, 8, 4),
    "B=0": (0, 5, 2, 1, 8, 4),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_prefill_matches_reference(case, dtype, impl):
    B, T, H, Hkv, D, W = CASES[case]
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs torch")
    rng = np.random.default_rng(list(CASES).index(case))
    (q, k, v), (q64, k64, v64) = make_inputs(rng, (B, T, H, D), (B, T, Hkv, D), dtype)
    cache = new_cache(k, B, Hkv, W, D)
    out = prefill(impl, q, k, v, cache)
    want = ref.sliding_window_attention(q64, k64, v64, W)
    assert_close(out, want, tolerance(q64, k64, v64, D**-0.5, dtype, W, want), case)
    # the cache holds the last min(T, W) keys and values, position p in slot p % W, bit for bit
    assert to_numpy64(cache.tokens).tolist() == [T] * B
    ck, cv = to_numpy64(cache.k), to_numpy64(cache.v)
    for p in range(max(0, T - W), T):
        np.testing.assert_array_equal(ck[:, :, p % W], k64[:, p])
        np.testing.assert_array_equal(cv[:, :, p % W], v64[:, p])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_matches_reference_twin(dtype):
    """The fast kernel against the plain-loop C twin directly, on one mid-sized case."""
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs torch")
    B, T, H, Hkv, D, W = 2, 130, 6, 2, 40, 33
    rng = np.random.default_rng(7)
    (q, k, v), (q64, k64, v64) = make_inputs(rng, (B, T, H, D), (B, T, Hkv, D), dtype)
    fast = to_numpy64(prefill("fast", q, k, v, new_cache(k, B, Hkv, W, D)))
    twin = to_numpy64(prefill("ref", q, k, v, new_cache(k, B, Hkv, W, D)))
    want = ref.sliding_window_attention(q64, k64, v64, W)
    # both are within `tolerance` of the float64 truth, so within twice it of each other
    assert_close(fast, twin, 2 * tolerance(q64, k64, v64, D**-0.5, dtype, W, want), "fast vs twin")


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_one_returns_the_tokens_own_value(dtype):
    """window=1: each query attends only its own key, so o == v exactly (softmax weight 1)."""
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs torch")
    rng = np.random.default_rng(3)
    (q, k, v), _ = make_inputs(rng, (2, 11, 4, 5), (2, 11, 2, 5), dtype, spread=30.0)
    for impl in IMPLS:
        out, cache = based.sliding_window_prefill(q, k, v, window=1) if impl == "fast" else \
            (prefill("ref", q, k, v, new_cache(k, 2, 2, 1, 5)), None)
        expected = np.repeat(to_numpy64(v), 2, axis=2)
        np.testing.assert_array_equal(to_numpy64(out), expected)
        if cache is not None:
            o1 = based.sliding_window_decode(q[:, 0], k[:, 0], v[:, 0], cache)
            np.testing.assert_array_equal(to_numpy64(o1), expected[:, 0])


def test_first_query_without_cache_returns_its_value():
    """Position 0 has one key (itself) whatever the window: o_0 == v_0 exactly."""
    rng = np.random.default_rng(4)
    (q, k, v), _ = make_inputs(rng, (3, 6, 2, 9), (3, 6, 1, 9), "float32")
    out, _ = based.sliding_window_prefill(q, k, v, window=50)
    np.testing.assert_array_equal(out[:, 0], np.repeat(v[:, 0], 2, axis=1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_then_decode_through_fill_and_wrap(dtype, impl):
    """prefill(T1) then decode token by token equals prefill(T) -- output by output -- through the
    step where the cache first fills (tokens W-1 -> W) and the steps where it wraps (W -> W+1, ...).
    The fast kernel is bit-identical across the two paths (its arithmetic per query depends only on
    the query's own window); the twin is held to the reference tolerance."""
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs torch")
    B, H, Hkv, D, W, T = 2, 4, 2, 12, 6, 20
    rng = np.random.default_rng(5)
    (q, k, v), (q64, k64, v64) = make_inputs(rng, (B, T, H, D), (B, T, Hkv, D), dtype)
    full = prefill(impl, q, k, v, new_cache(k, B, Hkv, W, D))
    want = ref.sliding_window_attention(q64, k64, v64, W)
    bound = tolerance(q64, k64, v64, D**-0.5, dtype, W, want)
    for t1 in (0, 1, W - 1, W, W + 1):
        cache = new_cache(k, B, Hkv, W, D)
        first = prefill(impl, q[:, :t1], k[:, :t1], v[:, :t1], cache)
        outs = [to_numpy64(first)]
        for t in range(t1, T):
            outs.append(to_numpy64(decode(impl, q[:, t], k[:, t], v[:, t], cache))[:, None])
            assert to_numpy64(cache.tokens).tolist() == [t + 1] * B
        got = np.concatenate(outs, axis=1)
        if impl == "fast":
            np.testing.assert_array_equal(got, to_numpy64(full), err_msg=f"t1={t1}")
        assert_close(got, want, bound, f"t1={t1}")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_chunked_prefill_across_the_wrap(dtype):
    """prefill in chunks (boundaries before, at and across multiples of W; empty chunks too) equals
    one prefill, bit for bit, and leaves the same cache."""
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs torch")
    B, H, Hkv, D, W, T = 2, 2, 1, 16, 7, 40
    rng = np.random.default_rng(6)
    (q, k, v), (q64, k64, v64) = make_inputs(rng, (B, T, H, D), (B, T, Hkv, D), dtype)
    one_cache = new_cache(k, B, Hkv, W, D)
    one = prefill("fast", q, k, v, one_cache)
    for cuts in ([3, 7, 7, 12, 20, 33], [6, 8, 14, 15], [0, 1, 2, 39], [13]):
        cache = new_cache(k, B, Hkv, W, D)
        edges = [0, *cuts, T]
        parts = [to_numpy64(prefill("fast", q[:, a:b], k[:, a:b], v[:, a:b], cache)) for a, b in zip(edges, edges[1:])]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), to_numpy64(one), err_msg=str(cuts))
        for name in ("k", "v", "tokens"):
            assert bits(getattr(cache, name)) == bits(getattr(one_cache, name)), (cuts, name)
    want = ref.sliding_window_attention(q64, k64, v64, W)
    assert_close(one, want, tolerance(q64, k64, v64, D**-0.5, dtype, W, want))


def test_cached_history_is_attended_across_the_boundary():
    """The second chunk's first queries read keys of the first chunk from the ring cache only:
    overwrite the first chunk's inputs after the first call and the second call is unchanged."""
    B, H, D, W, T1, T2 = 1, 2, 8, 5, 9, 6
    rng = np.random.default_rng(8)
    (q, k, v), (q64, k64, v64) = make_inputs(rng, (B, T1 + T2, H, D), (B, T1 + T2, H, D), "float64")
    k1, v1 = k[:, :T1].copy(), v[:, :T1].copy()
    o1, cache = based.sliding_window_prefill(q[:, :T1], k1, v1, window=W)
    k1[...] = np.nan
    v1[...] = np.nan
    o2, same = based.sliding_window_prefill(q[:, T1:], k[:, T1:], v[:, T1:], cache=cache)
    assert same is cache
    want = ref.sliding_window_attention(q64, k64, v64, W)
    np.testing.assert_allclose(np.concatenate([o1, o2], axis=1), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ref.sliding_window_attention(q64[:, T1:], k64, v64, W, offset=T1), want[:, T1:],
                               rtol=1e-13, atol=1e-13)


def test_sequences_at_different_positions():
    """After reset of one sequence, the batch continues with per-sequence token counts: the reset
    sequence restarts at position 0, the other carries on with its history."""
    B, H, D, W = 2, 2, 8, 4
    rng = np.random.default_rng(9)
    (q, k, v), (q64, k64, v64) = make_inputs(rng, (B, 12, H, D), (B, 12, H, D), "float64")
    _, cache = based.sliding_window_prefill(q[:, :7], k[:, :7], v[:, :7], window=W)
    cache.reset([1])
    assert cache.tokens.tolist() == [7, 0]
    o, _ = based.sliding_window_prefill(q[:, 7:], k[:, 7:], v[:, 7:], cache=cache)
    want0 = ref.sliding_window_attention(q64[:1], k64[:1], v64[:1], W)[:, 7:]
    want1 = ref.sliding_window_attention(q64[1:, 7:], k64[1:, 7:], v64[1:, 7:], W)
    np.testing.assert_allclose(o, np.concatenate([want0, want1]), rtol=1e-13, atol=1e-13)
    assert cache.tokens.tolist() == [12, 5]
    o = based.sliding_window_decode(q[:, 0], k[:, 0], v[:, 0], cache)
    for b, n in enumerate((12, 5)):
        hist = np.concatenate([k64[b:b + 1, 12 - n:12], k64[b:b + 1, :1]], axis=1)
        vh = np.concatenate([v64[b:b + 1, 12 - n:12], v64[b:b + 1, :1]], axis=1)
        want = ref.sliding_window_attention(q64[b:b + 1, :1], hist, vh, W, offset=n)
        np.testing.assert_allclose(o[b:b + 1], want[:, 0], rtol=1e-13, atol=1e-13)


def test_strided_numpy_inputs_out_and_cache():
    """Transposed, negative-stride and broadcast (stride 0) inputs; a strided out; cache
    tensors that are strided views (through the C binding): no copies, same results."""
    B, T, H, D, W = 2, 15, 4, 6, 5
    rng = np.random.default_rng(10)
    q = rng.standard_normal((B, H, T, D)).transpose(0, 2, 1, 3)        # (B, T, H, D) view
    k = rng.standard_normal((B, T, 2, 2 * D))[..., ::-2]              # negative stride
    v = np.broadcast_to(rng.standard_normal((B, T, 1, D)), (B, T, 2, D))  # stride 0 along Hkv
    want = ref.sliding_window_attention(q, k, v, W)
    big = poison(np.empty((B, T, H, 3 * D)))
    out = big[..., 1::3]
    kc = np.zeros((B, W, 2, D)).transpose(0, 2, 1, 3)
    vc = np.zeros((B, 2, W, 2 * D))[..., ::2]
    tokens = np.zeros(2 * B, np.int64)[::2]
    _C.sliding_window_prefill(q, k, v, kc, vc, tokens, out, W, D**-0.5, None)
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-13)
    assert np.isnan(big[..., 0::3]).all() and np.isnan(big[..., 2::3]).all(), "wrote outside the out view"
    assert tokens.tolist() == [T, T]
    o1 = poison(np.empty((B, H, D)))
    _C.sliding_window_decode(q[:, 0], k[:, 0], v[:, 0], kc, vc, tokens, o1, W, D**-0.5, None)
    hist = np.concatenate([k[:, T - W + 1:], k[:, :1]], axis=1)
    vh = np.concatenate([v[:, T - W + 1:], v[:, :1]], axis=1)
    np.testing.assert_allclose(o1, ref.sliding_window_attention(q[:, :1], hist, vh, W, offset=W - 1)[:, 0],
                               rtol=1e-13, atol=1e-13)


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_transposed_layout(dtype):
    """(B, H, T, D) tensors passed as x.transpose(1, 2) work without a copy; torch in, torch out."""
    B, T, H, Hkv, D, W = 2, 33, 4, 2, 24, 10
    rng = np.random.default_rng(11)
    data = [rng.standard_normal((B, n, T, D)) for n in (H, Hkv, Hkv)]
    q, k, v = (make_array("torch", d, dtype).transpose(1, 2) for d in data)
    q64, k64, v64 = (rounded(d, dtype).transpose(0, 2, 1, 3) for d in data)
    out, cache = based.sliding_window_prefill(q, k, v, window=W)
    assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, dtype) and out.shape == (B, T, H, D)
    assert isinstance(cache.k, torch.Tensor) and cache.k.dtype == k.dtype and cache.tokens.dtype == torch.int64
    want = ref.sliding_window_attention(q64, k64, v64, W)
    assert_close(out, want, tolerance(q64, k64, v64, D**-0.5, dtype, W, want))
    o1 = based.sliding_window_decode(q[:, 0], k[:, 0], v[:, 0], cache)
    assert isinstance(o1, torch.Tensor) and o1.shape == (B, H, D)


def test_scale():
    rng = np.random.default_rng(12)
    (q, k, v), _ = make_inputs(rng, (1, 20, 2, 8), (1, 20, 2, 8), "float64")
    for scale in (0.05, 1.0, 3.0):
        out, cache = based.sliding_window_prefill(q, k, v, window=6, scale=scale)
        assert cache.scale == scale
        np.testing.assert_allclose(out, ref.sliding_window_attention(q, k, v, 6, scale), rtol=1e-12, atol=1e-13)


def test_softmax_is_stable_for_large_scores():
    """Scores in the thousands: the running max keeps exp finite; the result is the argmax value
    (fp32 and fp64 agree with the reference)."""
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((1, 50, 1, 4)) for _ in range(3))
    q *= 300.0
    k *= 300.0
    want = ref.sliding_window_attention(q, k, v, 9)
    assert np.isfinite(want).all()
    for dtype in ("float32", "float64"):
        out, _ = based.sliding_window_prefill(q.astype(dtype), k.astype(dtype), v.astype(dtype), window=9)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, want, atol=1e-3 if dtype == "float32" else 1e-12)


def test_nonfinite_inputs_stay_local():
    """A NaN key at position 3 reaches the queries whose window holds position 3 (3 .. 3+W-1) of
    the heads that read its kv head, and nothing else (SPEC 4)."""
    B, T, H, D, W = 1, 20, 4, 8, 5
    rng = np.random.default_rng(14)
    q, k, v = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, T, 2, D)), rng.standard_normal((B, T, 2, D))
    k[0, 3, 1, 2] = np.nan
    v[0, 10, 0, 0] = np.inf
    out, _ = based.sliding_window_prefill(q, k, v, window=W)
    bad = ~np.isfinite(out[0])                           # (T, H)
    expect = np.zeros((T, H), bool)
    expect[3:3 + W, 2:] = True                           # heads 2, 3 read kv head 1
    expect[10:10 + W, :2] = True                         # heads 0, 1 read kv head 0 (inf * weight)
    np.testing.assert_array_equal(bad.any(axis=-1), expect)


def test_thread_count_does_not_change_bits(tmp_path):
    """One thread (a fresh process with OMP_NUM_THREADS=1) gives the same bits as many."""
    rng = np.random.default_rng(15)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 300, 4, 32), (2, 300, 2, 32), (2, 300, 2, 32)))
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v)
    script = ("import numpy as np, based, sys; z = np.load(sys.argv[1]); "
              "o, _ = based.sliding_window_prefill(z['q'], z['k'], z['v'], window=70); np.save(sys.argv[2], o)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.npz"), str(tmp_path / "o.npy")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out, _ = based.sliding_window_prefill(q, k, v, window=70)
    assert np.load(tmp_path / "o.npy").tobytes() == out.tobytes()


_ISA_SCRIPT = r"""
import sys
import numpy as np
import based
z = np.load(sys.argv[1])
res = {}
for dtype in ("float32", "float64", "float16"):
    q, k, v = (z[n].astype(dtype) for n in "qkv")
    o, cache = based.sliding_window_prefill(q[:, :-1], k[:, :-1], v[:, :-1], window=70)
    o1 = based.sliding_window_decode(q[:, -1], k[:, -1], v[:, -1], cache)
    res[dtype] = o
    res[dtype + "_decode"] = o1
np.savez(sys.argv[2], **res)
"""


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_cpu_kernel_variant_gives_the_same_bits(tmp_path, isa):
    """BASED_CPU_ISA caps the kernels picked at run time (AVX-512, AVX2, baseline x86-64):
    each variant computes the same arithmetic in the same order, so prefill and decode
    outputs agree bit for bit with the default pick (head_dim 33: a partial vector)."""
    rng = np.random.default_rng(16)
    shapes = ((2, 301, 4, 33), (2, 301, 2, 33), (2, 301, 2, 33))
    q, k, v = (rng.standard_normal(s) for s in shapes)
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v)
    env = {**os.environ, "BASED_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "isa.npz")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "default.npz")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    capped, default = np.load(tmp_path / "isa.npz"), np.load(tmp_path / "default.npz")
    assert sorted(capped.files) == sorted(default.files)
    for name in default.files:
        assert np.isfinite(default[name].astype(np.float64)).all(), name
        assert capped[name].tobytes() == default[name].tobytes(), f"{name}: {isa} differs from the default kernels"


_FUSED_CASES = [(dtype, h, m, head_dim, window) for dtype, h, m in [("float32", 12, 20), ("float64", 27, 50)]
                for head_dim, window in [(2, 2), (40, 32)]]


def check_scores_are_fused(dtype, h, m, head_dim, window):
    """Every kernel sums a score in fused multiply-adds, s = fma(q'_i, k_i, s) for i = 0, 1, ...
    (sliding_window.c), in prefill and in decode, on every instruction set. Query 1 sees key 0
    with score 2^-4 and key 1 with 1 * c + 2^m (1 + 2^-h)^2, c = -2^m (1 + 2^(1-h)): exactly
    2^(m-2h) = 2^-4 when fused, but 0 when the product is rounded first (its last bit, 2^(m-2h),
    is below the precision of the compute type). Equal scores give weights of exactly 1 each,
    so out = (v_0 + v_1) / 2 = 0.5 exactly; unfused it would be 1 / (1 + e^(1/16)) = 0.484.
    head_dim 40 with window 32 pads with zeros and takes the decode's vector paths."""
    one = np.array(1 + 2.0**-h, dtype)
    q = np.zeros((1, 2, 1, head_dim), dtype)
    k = np.zeros((1, 2, 1, head_dim), dtype)
    v = np.zeros((1, 2, 1, head_dim), dtype)
    q[0, :, 0, :2] = [1, 2.0**m * one]
    k[0, 0, 0, :2] = [2.0**-4, 0]
    k[0, 1, 0, :2] = [-(2.0**m) * (1 + 2.0 ** (1 - h)), one]
    v[0, 1] = 1
    assert np.array(2.0**m * one * one, dtype) + k[0, 1, 0, 0] == 0  # rounded first, the score would be 0
    want = np.full(head_dim, 0.5, dtype)
    o, _ = based.sliding_window_prefill(q, k, v, window=window, scale=1.0)
    assert o[0, 1, 0].tobytes() == want.tobytes(), f"prefill gave {o[0, 1, 0, :2]}"
    _, cache = based.sliding_window_prefill(q[:, :1], k[:, :1], v[:, :1], window=window, scale=1.0)
    o1 = based.sliding_window_decode(q[:, 1], k[:, 1], v[:, 1], cache)
    assert o1[0, 0].tobytes() == want.tobytes(), f"decode gave {o1[0, 0, :2]}"


@pytest.mark.parametrize("dtype, h, m, head_dim, window", _FUSED_CASES)
def test_scores_are_sums_of_fused_multiply_adds(dtype, h, m, head_dim, window):
    """check_scores_are_fused with the kernels picked for this CPU."""
    check_scores_are_fused(dtype, h, m, head_dim, window)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_cpu_kernel_variant_fuses_the_scores(isa):
    """The same with BASED_CPU_ISA capping the kernels (a fresh process: the pick is read once):
    the baseline kernels fuse through the C library's fmaf/fma, the AVX2 ones with the FMA
    instruction, so that they match the AVX-512 ones bit for bit (sliding_window.c)."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import based; "
              "from test_sliding_window import _FUSED_CASES, check_scores_are_fused; "
              "[check_scores_are_fused(*case) for case in _FUSED_CASES]; "
              "print(based.build_info()['cpu_kernels']['sliding_window'])")
    r = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "BASED_CPU_ISA": isa})
    assert r.returncode == 0, r.stdout + r.stderr
    ran = r.stdout.split()[-1]
    assert ran == isa or (isa == "avx2" and ran == "generic"), ran  # avx2 where the CPU has it


def test_memory_stays_fixed_over_a_long_decode():
    B, H, D, W = 2, 2, 4, 3
    rng = np.random.default_rng(16)
    cache = based.SlidingWindowCache.zeros(B, H, W, D, dtype="float64", like=np.empty(0))
    k_obj, nbytes = cache.k, cache.nbytes
    ks, vs = [], []
    for t in range(50):
        q, k, v = (rng.standard_normal((B, H, D)) for _ in range(3))
        ks.append(k)
        vs.append(v)
        o = based.sliding_window_decode(q, k, v, cache)
    assert cache.k is k_obj and cache.nbytes == nbytes and cache.tokens.tolist() == [50, 50]
    want = ref.sliding_window_attention(q[:, None], np.stack(ks, 1), np.stack(vs, 1), W, offset=49)[:, 0]
    np.testing.assert_allclose(o, want, rtol=1e-13, atol=1e-13)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(1, 40), window=st.integers(1, 80), seqlen=st.integers(0, 120),
    cuts=st.lists(st.integers(0, 120), max_size=3), n_decode=st.integers(0, 5),
    dtype=st.sampled_from(["float32", "float64", "float16"]), seed=st.integers(0, 2**32 - 1),
)
def test_property_chunks_and_decode_match_reference(batch, kv_heads, group, head_dim, window, seqlen, cuts,
                                                    n_decode, dtype, seed):
    """Any shape, any split of the prompt into prefill chunks, then some decode steps: outputs
    within tolerance of the float64 reference, bit-identical to one prefill over everything."""
    heads = kv_heads * group
    total = seqlen + n_decode
    rng = np.random.default_rng(seed)
    (q, k, v), (q64, k64, v64) = make_inputs(rng, (batch, total, heads, head_dim),
                                             (batch, total, kv_heads, head_dim), dtype)
    cache = new_cache(k, batch, kv_heads, window, head_dim)
    edges = [0, *sorted(c for c in cuts if c <= seqlen), seqlen]
    parts = [prefill("fast", q[:, a:b], k[:, a:b], v[:, a:b], cache) for a, b in zip(edges, edges[1:])]
    parts += [decode("fast", q[:, t], k[:, t], v[:, t], cache)[:, None] for t in range(seqlen, total)]
    got = np.concatenate(parts, axis=1)
    want = ref.sliding_window_attention(q64, k64, v64, window)
    assert_close(got, want, tolerance(q64, k64, v64, head_dim**-0.5, dtype, window, want))
    whole = prefill("fast", q, k, v, new_cache(k, batch, kv_heads, window, head_dim))
    assert got.tobytes() == whole.tobytes()
    assert cache.tokens.tolist() == [total] * batch


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cache_layouts_agree_bit_for_bit(dtype):
    """A SlidingWindowCache keeps k slot-contiguous (read without a transpose); a row-major
    k cache (any strides are accepted) goes the general way. Continued prefill and decode read
    the cache: both layouts must give the same bits."""
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs torch")
    B, H, Hkv, D, W = 2, 4, 2, 24, 37
    rng = np.random.default_rng(17)
    (q, k, v), _ = make_inputs(rng, (B, 100, H, D), (B, 100, Hkv, D), dtype, lib="torch" if HAS_TORCH else "numpy")
    ring = new_cache(k, B, Hkv, W, D)
    slot_stride = ring.k.stride()[2] if HAS_TORCH else ring.k.strides[2] // ring.k.itemsize
    assert slot_stride == 1
    zeros = based._arrays.zeros
    row_major = based.SlidingWindowCache(
        {"k": zeros(k, (B, Hkv, W, D), dtype), "v": zeros(k, (B, Hkv, W, D), dtype), "tokens": zeros(k, (B,), "int64")},
        {"window": W, "scale": ring.scale})
    outs = {}
    for name, cache in (("ring", ring), ("row-major", row_major)):
        parts = [prefill("fast", q[:, :50], k[:, :50], v[:, :50], cache),
                 prefill("fast", q[:, 50:90], k[:, 50:90], v[:, 50:90], cache)]
        parts += [decode("fast", q[:, t], k[:, t], v[:, t], cache)[:, None] for t in range(90, 100)]
        outs[name] = b"".join(bits(p) for p in parts)
    assert outs["ring"] == outs["row-major"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_half_precision_value_loads_exactly(dtype):
    """window=1 returns v exactly, so feeding all 65536 bit patterns as values checks the
    kernel's inline float16/bfloat16 -> float32 conversion (shared by key and value loads)
    on every input, subnormals, infinities and NaNs included."""
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs torch")
    patterns = np.arange(2**16, dtype=np.uint16)
    if dtype == "float16":
        v = patterns.view(np.float16).reshape(1, -1, 1, 1)
        q = np.zeros_like(v)
        out, _ = based.sliding_window_prefill(q, q, v, window=1)
        got, want = out.astype(np.float64), v.astype(np.float64)
    else:
        v = torch.from_numpy(patterns.view(np.int16)).view(torch.bfloat16).reshape(1, -1, 1, 1)
        q = torch.zeros_like(v)
        out, _ = based.sliding_window_prefill(q, q, v, window=1)
        got, want = out.double().numpy(), v.double().numpy()
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan], want[~nan])


def test_float16_subnormal_keys():
    """Keys that are float16 subnormals m * 2**-24 still separate under a large scale:
    position 1 of each sequence attends keys [0, k_b] with q = 1, scale 2**20, so its
    output is sigmoid(k_b * 2**20) = sigmoid(m / 16) (values 0 and 1)."""
    m = np.concatenate([np.arange(1, 1024), -np.arange(1, 1024)])
    k = np.zeros((m.size, 2, 1, 1), np.float16)
    k[:, 1, 0, 0] = m * 2.0**-24                                       # exact: every one is a subnormal
    v = np.zeros_like(k)
    v[:, 1] = 1
    q = np.ones_like(k)
    out, _ = based.sliding_window_prefill(q, k, v, window=2, scale=2.0**20)
    want = 1 / (1 + np.exp(-m / 16))
    np.testing.assert_allclose(out[:, 1, 0, 0].astype(np.float64), want, rtol=2 * EPS["float16"], atol=2.0**-24)


def test_positions_up_to_the_limit():
    """Sequences may sit anywhere below 2**62 positions: a cache whose tokens are near the limit
    (as after a very long stream) still attends exactly the last W positions held in its ring."""
    rng = np.random.default_rng(18)
    B, H, D, W, T = 1, 2, 8, 5, 4
    start = 2**62 - T
    q, k, v = (rng.standard_normal((B, T, H, D)) for _ in range(3))
    hist_k, hist_v = rng.standard_normal((B, H, W, D)), rng.standard_normal((B, H, W, D))
    cache = based.SlidingWindowCache.zeros(B, H, W, D, dtype="float64", like=q)
    for u in range(start - W, start):                                # the ring as the history left it
        cache.k[:, :, u % W] = hist_k[:, :, u - (start - W)]
        cache.v[:, :, u % W] = hist_v[:, :, u - (start - W)]
    cache.tokens[:] = start
    out, _ = based.sliding_window_prefill(q, k, v, cache=cache)
    keys = np.concatenate([hist_k.transpose(0, 2, 1, 3), k], axis=1)  # positions start-W .. start+T-1
    vals = np.concatenate([hist_v.transpose(0, 2, 1, 3), v], axis=1)
    np.testing.assert_allclose(out, ref.sliding_window_attention(q, keys, vals, W, offset=W), rtol=1e-13, atol=1e-13)
    assert cache.tokens.tolist() == [2**62]
