"""SlidingWindowCache (SPEC 3): creation, zero-copy views, settings, and batch management
(reset, copy_, clone, index_select, save/load) -- each checked by continuing the sequences
and comparing with what an untouched cache would have produced."""

import math

import numpy as np
import pytest
from conftest import HAS_TORCH, requires_torch, to_numpy64, torch

import based
from based import reference as ref

B, HKV, H, W, D = 3, 2, 4, 5, 8


def inputs(seed, batch=B, seqlen=9, dtype="float32"):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, seqlen, H, D)).astype(dtype),
            rng.standard_normal((batch, seqlen, HKV, D)).astype(dtype),
            rng.standard_normal((batch, seqlen, HKV, D)).astype(dtype))


def step(seed, batch=B, dtype="float32"):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, H, D)).astype(dtype), rng.standard_normal((batch, HKV, D)).astype(dtype),
            rng.standard_normal((batch, HKV, D)).astype(dtype))


def filled(seqlen=9, dtype="float32"):
    _, cache = based.sliding_window_prefill(*inputs(0, seqlen=seqlen, dtype=dtype), window=W)
    return cache


def test_zeros_shapes_and_settings():
    like = np.empty(0, np.float32)
    c = based.SlidingWindowCache.zeros(B, HKV, W, D, like=like)
    assert isinstance(c.k, np.ndarray) and c.k.shape == c.v.shape == (B, HKV, W, D)
    assert c.k.dtype == np.float32 and c.dtype == np.float32                     # like's dtype
    assert c.tokens.dtype == np.int64 and c.tokens.tolist() == [0] * B
    assert (c.batch, c.kv_heads, c.window, c.head_dim, c.device) == (B, HKV, W, D, "cpu")
    assert c.scale == 1 / math.sqrt(D)                                     # SPEC 1.2 default
    assert c.nbytes == 2 * B * HKV * W * D * 4 + 8 * B
    assert not c.k.any() and not c.v.any()
    c64 = based.SlidingWindowCache.zeros(1, 1, 3, 4, dtype="float64", scale=0.5, like=like)
    assert c64.k.dtype == np.float64 and c64.scale == 0.5
    assert "SlidingWindowCache(k=(3, 2, 5, 8)" in repr(c) and "window=5" in repr(c)


def test_zeros_without_like_gives_based_buffers():
    c = based.SlidingWindowCache.zeros(2, 1, 4, 3, dtype=np.float16)
    assert isinstance(c.k, based.Buffer) and c.k.dtype == "float16" and c.tokens.dtype == "int64"
    o, same = based.sliding_window_prefill(*(np.ones(s, np.float16) for s in ((2, 3, 1, 3),) * 3), cache=c)
    assert same is c and np.from_dlpack(c.tokens).tolist() == [3, 3]
    np.testing.assert_array_equal(o, np.ones((2, 3, 1, 3), np.float16))


@requires_torch
def test_zeros_like_torch():
    q = torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16)
    c = based.SlidingWindowCache.zeros(2, 2, 6, 8, like=q)
    assert isinstance(c.k, torch.Tensor) and c.k.dtype == torch.bfloat16 and c.tokens.dtype == torch.int64
    c32 = based.SlidingWindowCache.zeros(2, 2, 6, 8, dtype=torch.float32, like=q)
    assert c32.k.dtype == torch.float32


@pytest.mark.parametrize(
    "args,kwargs,exc,message",
    [
        ((B, HKV, W, D), {}, TypeError, "needs a dtype"),
        ((B, HKV, W, D), {"dtype": "int32"}, TypeError, "dtype must be one of float32, float64, float16, bfloat16, "
                                                         "got int32"),
        ((B, 0, W, D), {"dtype": "float32"}, ValueError, "kv_heads must be >= 1, got 0"),
        ((B, HKV, 0, D), {"dtype": "float32"}, ValueError, r"window must be between 1 and 9223372036854775807, got 0"),
        ((B, HKV, 2.5, D), {"dtype": "float32"}, TypeError, "window must be an int, got float"),
        ((B, HKV, W, 257), {"dtype": "float32"}, ValueError, "head_dim must be between 1 and 256, got 257"),
        ((-1, HKV, W, D), {"dtype": "float32"}, ValueError, "batch must be >= 0, got -1"),
        ((B, HKV, W, D), {"dtype": "float32", "scale": 0.0}, ValueError, "scale must be a finite number > 0"),
        ((B, HKV, W, D), {"dtype": "float32", "device": "tpu"}, ValueError, "device must be"),
    ],
    ids=["no-dtype", "int-dtype", "kv-heads-0", "window-0", "window-float", "head-dim-257", "batch-negative",
         "scale-zero", "device"],
)
def test_zeros_rejects(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        based.SlidingWindowCache.zeros(*args, **kwargs)


def test_views_are_zero_copy_and_updated_in_place():
    q, k, v = inputs(1)
    cache = based.SlidingWindowCache.zeros(B, HKV, W, D, like=q)
    kview = cache.k
    _, same = based.sliding_window_prefill(q, k, v, cache=cache)
    assert same is cache and cache.k is kview
    np.testing.assert_array_equal(kview[:, :, 8 % W], k[:, 8])        # written through the view we hold
    # a write through the view is what the next call reads: zero every cached value, and
    # the next query sees only its own value among nonzero ones
    cache.v[...] = 0
    q1, k1, v1 = step(2)
    o = based.sliding_window_decode(q1, k1, v1, cache)
    s = np.einsum("bhd,bhwd->bhw", q1, np.repeat(cache.k, 2, axis=1)) / math.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    slot = 9 % W
    np.testing.assert_allclose(o, (p[..., slot] / p.sum(-1))[..., None] * np.repeat(v1, 2, axis=1), rtol=1e-5)


def continue_both(a, b, seed=3):
    """Decode the same tokens into two caches; their outputs must be identical."""
    q, k, v = step(seed, batch=a.batch)
    return based.sliding_window_decode(q, k, v, a), based.sliding_window_decode(q, k, v, b)


def test_reset_some_then_all():
    cache = filled()
    cache.reset([0, -1])
    assert cache.tokens.tolist() == [0, 9, 0]
    assert not cache.k[[0, 2]].any() and cache.k[1].any()
    fresh = filled()
    q, k, v = step(4)
    o = based.sliding_window_decode(q, k, v, cache)
    o_fresh = based.sliding_window_decode(q, k, v, fresh)
    np.testing.assert_array_equal(o[1], o_fresh[1])                   # untouched sequence continues
    np.testing.assert_array_equal(o[[0, 2]], np.repeat(v[[0, 2]], 2, axis=1))  # restarted: only itself
    cache.reset()
    assert cache.tokens.tolist() == [0, 0, 0] and not cache.k.any() and not cache.v.any()


def test_reset_bad_index_resets_nothing():
    cache = filled()
    before = [cache.k.copy(), cache.v.copy(), cache.tokens.copy()]
    with pytest.raises(ValueError, match="batch index 3 is out of range for batch size 3"):
        cache.reset([1, 3])
    for a, b in zip(before, (cache.k, cache.v, cache.tokens)):
        np.testing.assert_array_equal(a, b)


def test_copy_and_clone():
    cache = filled()
    other = based.SlidingWindowCache.zeros(B, HKV, W, D, like=cache.k)
    assert other.copy_(cache) is other
    np.testing.assert_array_equal(other.tokens, cache.tokens)
    twin = cache.clone()
    assert twin.k is not cache.k and not np.shares_memory(twin.k, cache.k)
    assert (twin.window, twin.scale, twin.tokens.tolist()) == (cache.window, cache.scale, [9] * B)
    o1, o2 = continue_both(cache, twin)
    np.testing.assert_array_equal(o1, o2)
    o1, o3 = continue_both(cache, other)                               # same history as cache had
    twin.k[...] = 7                                                    # independent memory
    assert not (cache.k == 7).all()


def test_copy_rejects_other_settings_and_types():
    cache = filled()
    with pytest.raises(ValueError, match=r"copy_: window differs \(5 here, 6 in other\)"):
        cache.copy_(based.SlidingWindowCache.zeros(B, HKV, 6, D, like=cache.k))
    with pytest.raises(ValueError, match="copy_: scale differs"):
        cache.copy_(based.SlidingWindowCache.zeros(B, HKV, W, D, scale=1.0, like=cache.k))
    with pytest.raises(ValueError, match=r"copy_: k has shape \(2, 2, 5, 8\) in other"):
        cache.copy_(based.SlidingWindowCache.zeros(2, HKV, W, D, like=cache.k))
    with pytest.raises(TypeError, match="copy_: expected a SlidingWindowCache"):
        cache.copy_(object())
    assert cache.tokens.tolist() == [9] * B


def test_copy_converts_float_dtypes():
    cache = filled()
    half = based.SlidingWindowCache.zeros(B, HKV, W, D, dtype="float16", like=cache.k)
    half.copy_(cache)
    np.testing.assert_array_equal(half.k, cache.k.astype(np.float16))
    assert half.tokens.tolist() == [9] * B


def test_index_select_reorders_beams():
    cache = filled()
    order = [2, 2, 0]
    picked = cache.index_select(order)
    assert picked.batch == 3 and picked.window == W
    q, k, v = step(5)
    o = based.sliding_window_decode(q, k, v, picked)
    for i, src in enumerate(order):                                    # sequence by sequence
        one = filled().index_select([src])
        np.testing.assert_array_equal(o[i], based.sliding_window_decode(q[i:i + 1], k[i:i + 1], v[i:i + 1], one)[0])
    cache.copy_(cache.index_select([1, 0, 2]))                         # in-place reorder idiom
    np.testing.assert_array_equal(cache.k[0], filled().k[1])


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_save_load_round_trip(tmp_path, dtype):
    cache = filled(seqlen=7, dtype=dtype)
    cache.reset([1])
    path = tmp_path / "cache.npz"
    cache.save(path)
    back = based.SlidingWindowCache.load(path, like=np.empty(0))
    assert (back.window, back.scale, back.k.dtype) == (cache.window, cache.scale, cache.k.dtype)
    for name in ("k", "v", "tokens"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cache, name))
    o1, o2 = continue_both(back, cache.clone()) if dtype == "float32" else (None, None)
    if o1 is not None:
        np.testing.assert_array_equal(o1, o2)
    plain = based.SlidingWindowCache.load(path)          # no like=: numpy arrays, as saved
    assert all(isinstance(t, np.ndarray) for t in (plain.k, plain.v, plain.tokens))


def test_bfloat16_cache_like_numpy_is_buffers():
    """numpy has no bfloat16: the ring buffers become based.Buffer objects (torch.from_dlpack
    views them), as for LinearAttentionState."""
    c = based.SlidingWindowCache.zeros(2, 1, 4, 8, dtype="bfloat16", like=np.zeros(1, np.float32))
    assert isinstance(c.k, based.Buffer) and isinstance(c.v, based.Buffer) and c.k.dtype == "bfloat16"
    assert c.batch == 2 and c.nbytes == 2 * (2 * 1 * 4 * 8 * 2) + 2 * 8


@requires_torch
def test_save_load_bfloat16_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, n, 4, generator=g).to(torch.bfloat16) for n in (2, 1, 1))
    _, cache = based.sliding_window_prefill(q, k, v, window=4)
    cache.save(tmp_path / "c.npz")
    back = based.SlidingWindowCache.load(tmp_path / "c.npz", like=q)
    assert back.k.dtype == torch.bfloat16 and torch.equal(back.k, cache.k) and torch.equal(back.tokens, cache.tokens)


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", k=np.zeros(3))
    with pytest.raises(ValueError, match="not a based state file"):
        based.SlidingWindowCache.load(tmp_path / "x.npz")


def test_cache_holds_exactly_the_last_window_positions():
    """The ring convention of based.h: position p in slot p % W, the last min(tokens, W) valid."""
    q, k, v = inputs(6, seqlen=3)
    _, cache = based.sliding_window_prefill(q, k, v, window=W)
    for t in range(3, 12):
        q1, k1, v1 = step(100 + t)
        based.sliding_window_decode(q1, k1, v1, cache)
        np.testing.assert_array_equal(cache.k[:, :, t % W], k1)
        np.testing.assert_array_equal(cache.v[:, :, t % W], v1)
    assert cache.tokens.tolist() == [12] * B


def test_nbytes_of_torch_cache_is_window_sized():
    if not HAS_TORCH:
        pytest.skip("needs torch")
    c = based.SlidingWindowCache.zeros(4, 2, 65, 64, dtype="bfloat16", like=torch.empty(0))
    assert c.nbytes == 2 * 4 * 2 * 65 * 64 * 2 + 4 * 8
    assert to_numpy64(c.k).shape == (4, 2, 65, 64)


def test_reference_mask_is_the_flash_attention_band():
    """window W is flash-attention window_size=(W-1, 0): W keys, the query's own included."""
    m = ref.sliding_window_mask(5, 5, 3)
    assert m.sum(axis=1).tolist() == [1, 2, 3, 3, 3]
    assert m[4].tolist() == [False, False, True, True, True]
    assert ref.sliding_window_mask(2, 6, 3, offset=4).tolist() == [[False, False, True, True, True, False],
                                                                   [False, False, False, True, True, True]]


@pytest.mark.parametrize("method", ["clone", "index_select"])
def test_clone_and_index_select_keep_every_tensor_type(method):
    c = based.SlidingWindowCache.zeros(2, 1, 4, 8, dtype="bfloat16", like=np.zeros(1, np.float32))
    d = c.clone() if method == "clone" else c.index_select([1, 0])
    assert type(d.k) is type(c.k) and type(d.tokens) is type(c.tokens) is np.ndarray
    d.tokens[0] = 5
