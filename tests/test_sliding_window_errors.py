"""Every way to call sliding-window attention wrongly (SPEC 4): the right exception, a message
naming the argument, the expected and the given -- and out and the cache keep every bit."""

import numpy as np
import pytest
from conftest import RawProducer, requires_torch, torch

import based
from based import _C

B, T, H, HKV, D, W = 2, 6, 4, 2, 8, 5


def f32(*shape):
    return np.zeros(shape, np.float32)


class Call:
    """Valid prefill arguments around a cache that already holds 3 positions; a case breaks one."""

    def __init__(self):
        rng = np.random.default_rng(0)
        f32 = np.float32
        self.q = rng.standard_normal((B, T, H, D)).astype(f32)
        self.k = rng.standard_normal((B, T, HKV, D)).astype(f32)
        self.v = rng.standard_normal((B, T, HKV, D)).astype(f32)
        _, self.cache = based.sliding_window_prefill(self.q[:, :3], self.k[:, :3], self.v[:, :3], window=W)
        self.kwargs = {"cache": self.cache, "out": np.full((B, T, H, D), 7.0, f32)}

    def written(self):
        """Every array the call could write: out, the cache passed, and the fixture's cache."""
        caches = {id(c): c for c in (self.cache, self.kwargs.get("cache")) if isinstance(c, based.SlidingWindowCache)}
        arrays = [a for c in caches.values() for a in (c.k, c.v, c.tokens)]
        out = self.kwargs.get("out")
        return arrays + ([out] if isinstance(out, np.ndarray) else [])


def cache_like(dtype=np.float32, batch=B, kv_heads=HKV, window=W, head_dim=D):
    c = based.SlidingWindowCache.zeros(batch, kv_heads, window, head_dim, like=np.empty(0, dtype))
    c.k[...] = 3.0                                                   # contents to keep
    return c


def read_only_out(c):
    out = np.zeros((B, T, H, D), np.float32)
    out.flags.writeable = False
    c.kwargs["out"] = out


def big_head_dim(c):
    c.q, c.k, c.v = (np.zeros(x.shape[:3] + (300,), np.float32) for x in (c.q, c.k, c.v))
    c.kwargs["out"] = np.zeros((B, T, H, 300), np.float32)


def out_inside_the_cache(c):
    big = f32(2 * B * T * H * D)
    k = big[100:100 + B * HKV * W * D].reshape(B, HKV, W, D)
    c.kwargs["cache"] = based.SlidingWindowCache({"k": k, "v": np.zeros_like(k), "tokens": np.zeros(B, np.int64)},
                                                 {"window": W, "scale": c.cache.scale})
    c.kwargs["out"] = big[:B * T * H * D].reshape(B, T, H, D)


def set_(name, make):
    def change(c):
        value = make(c) if callable(make) else make
        if name in ("q", "k", "v"):
            setattr(c, name, value)
        else:
            c.kwargs[name] = value
    return change


CASES = {
    "q-int": (set_("q", np.zeros((B, T, H, D), np.int32)), TypeError,
              r"q must have dtype one of float32, float64, float16, bfloat16, got int32"),
    "q-list": (set_("q", [[1.0]]), TypeError, r"q must be an array implementing the DLPack protocol"),
    "k-dtype": (set_("k", np.zeros((B, T, HKV, D))), TypeError, r"k must have the dtype of q \(float32\), got float64"),
    "v-dtype": (set_("v", np.zeros((B, T, HKV, D), np.float16)), TypeError,
                r"v must have the dtype of q \(float32\), got float16"),
    "out-dtype": (set_("out", np.zeros((B, T, H, D))), TypeError,
                  r"out must have the dtype of v \(float32\), got float64"),
    "cache-dtype": (set_("cache", lambda c: cache_like(np.float16)), TypeError,
                    r"the cache holds float16 keys and values, but q, k and v are float32; .*dtype='float32'"),
    "q-ndim": (set_("q", f32(B, H, D)), ValueError, r"q must have shape \(B, T, H, D\), got \(2, 4, 8\)"),
    "k-seqlen": (set_("k", f32(B, T - 1, HKV, D)), ValueError,
                 r"k must have shape \(B=2, T=6, Hkv, D=8\), got \(2, 5, 2, 8\)"),
    "k-head-dim": (set_("k", f32(B, T, HKV, D + 1)), ValueError,
                   r"k must have shape \(B=2, T=6, Hkv, D=8\), got \(2, 6, 2, 9\)"),
    "v-kv-heads": (set_("v", f32(B, T, 1, D)), ValueError,
                   r"v must have shape \(B=2, T=6, Hkv=2, D=8\), got \(2, 6, 1, 8\)"),
    "gqa-groups": (lambda c: (set_("k", f32(B, T, 3, D))(c), set_("v", f32(B, T, 3, D))(c)), ValueError,
                   r"q has H=4 heads, which is not a multiple of the Hkv=3 heads of k"),
    "head-dim-300": (big_head_dim, ValueError, r"q must have a head dim D between 1 and 256, got D=300"),
    "out-shape": (set_("out", f32(B, T, H, D + 1)), ValueError,
                  r"out must have shape \(B=2, T=6, H=4, D=8\), got \(2, 6, 4, 9\)"),
    "cache-batch": (set_("cache", lambda c: cache_like(batch=3)), ValueError,
                    r"the cache was built for batch = 3, but k and v have batch = 2"),
    "cache-kv-heads": (set_("cache", lambda c: cache_like(kv_heads=1)), ValueError,
                       r"the cache was built for kv heads \(Hkv\) = 1, but k and v have kv heads \(Hkv\) = 2"),
    "cache-head-dim": (set_("cache", lambda c: cache_like(head_dim=4)), ValueError,
                       r"the cache was built for head dim \(D\) = 4, but k and v have head dim \(D\) = 8"),
    "cache-type": (set_("cache", {"k": 1}), TypeError, r"cache must be a based.SlidingWindowCache, got dict"),
    "window-differs": (set_("window", 6), ValueError, r"window=6 disagrees with the cache's window 5"),
    "scale-differs": (set_("scale", 1.0), ValueError, r"scale=1.0 disagrees with the cache's scale 0.35"),
    "window-float": (set_("window", 5.0), TypeError, r"window must be an int, got float"),
    "window-zero": (set_("window", 0), ValueError, r"window must be between 1 and 9223372036854775807, got 0"),
    "scale-nan": (set_("scale", float("nan")), ValueError, r"scale must be a finite number > 0, got nan"),
    "out-is-q": (set_("out", lambda c: c.q), ValueError, r"out shares memory with q"),
    "out-overlaps-itself": (set_("out", np.lib.stride_tricks.as_strided(f32(64), (B, T, H, D), (0, 0, 32, 4))),
                            ValueError, r"out has overlapping memory \(stride 0 along axis 0"),
    "out-overlaps-cache": (out_inside_the_cache, ValueError, r"out shares memory with k_cache"),
    "out-read-only": (read_only_out, ValueError, r"out is read-only"),
    "devices-differ": (set_("q", RawProducer(f32(B, T, H, D), device=(2, 0))), ValueError,
                       r"all tensors of one call must be on one device"),
}


@pytest.mark.parametrize("case", CASES)
def test_prefill_errors_leave_out_and_cache_untouched(case):
    change, exc, message = CASES[case]
    c = Call()
    change(c)
    watched = c.written()
    before = [bytes(np.ascontiguousarray(a)) for a in watched]
    with pytest.raises(exc, match=message):
        based.sliding_window_prefill(c.q, c.k, c.v, **c.kwargs)
    assert [bytes(np.ascontiguousarray(a)) for a in watched] == before


def test_window_is_required_without_a_cache():
    c = Call()
    with pytest.raises(ValueError, match="window is required when no cache is given"):
        based.sliding_window_prefill(c.q, c.k, c.v)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0, got -1"):
        based.sliding_window_prefill(c.q, c.k, c.v, window=3, scale=-1)
    with pytest.raises(TypeError, match="window must be an int, got bool"):
        based.sliding_window_prefill(c.q, c.k, c.v, window=True)


DECODE_CASES = {
    "q-ndim": (lambda q, k, v, o: (q[:, None], k, v, o), ValueError,
               r"q must have shape \(B, H, D\), got \(2, 1, 4, 8\)"),
    "k-kv-heads": (lambda q, k, v, o: (q, k[:, :1], v, o), ValueError,
                   r"v must have shape \(B=2, Hkv=1, D=8\), got \(2, 2, 8\)"),
    "gqa-groups": (lambda q, k, v, o: (q[:, :3], k, v, o[:, :3]), ValueError,
                   r"q has H=3 heads, which is not a multiple of the Hkv=2 heads of k"),
    "k-dtype": (lambda q, k, v, o: (q, k.astype(np.float64), v, o), TypeError,
                r"k must have the dtype of q \(float32\), got float64"),
    "cache-dtype": (lambda q, k, v, o: (q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                        o.astype(np.float64)), TypeError,
                    r"the cache holds float32 keys and values, but q, k and v are float64"),
    "out-shape": (lambda q, k, v, o: (q, k, v, o[:1]), ValueError,
                  r"out must have shape \(B=2, H=4, D=8\), got \(1, 4, 8\)"),
    "batch": (lambda q, k, v, o: (q[:1], k[:1], v[:1], o[:1]), ValueError,
              r"the cache was built for batch = 2, but k and v have batch = 1"),
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_errors_leave_out_and_cache_untouched(case):
    change, exc, message = DECODE_CASES[case]
    c = Call()
    q, k, v, out = change(c.q[:, 0], c.k[:, 0], c.v[:, 0], np.full((B, H, D), 7.0, np.float32))
    watched = [out, c.cache.k, c.cache.v, c.cache.tokens]
    before = [bytes(np.ascontiguousarray(a)) for a in watched]
    with pytest.raises(exc, match=message):
        based.sliding_window_decode(q, k, v, c.cache, out=out)
    assert [bytes(np.ascontiguousarray(a)) for a in watched] == before


def test_decode_needs_a_cache():
    c = Call()
    with pytest.raises(TypeError, match="cache must be a based.SlidingWindowCache, got NoneType"):
        based.sliding_window_decode(c.q[:, 0], c.k[:, 0], c.v[:, 0], None)


@requires_torch
def test_inputs_that_require_grad():
    q = torch.zeros(B, T, H, D, requires_grad=True)
    with pytest.raises(TypeError, match=r"q requires grad.*q.detach\(\)"):
        based.sliding_window_prefill(q, q.detach()[:, :, :HKV], q.detach()[:, :, :HKV], window=W)


def raw_args(c):
    """Arguments of the C binding, from the fixture (cache tensors as numpy arrays; no stream)."""
    return [c.q, c.k, c.v, c.cache.k, c.cache.v, c.cache.tokens, c.kwargs["out"], W, c.cache.scale, None]


@pytest.mark.parametrize("op", ["sliding_window_prefill", "sliding_window_prefill_ref"])
@pytest.mark.parametrize(
    "index,value,exc,message",
    [
        (5, np.zeros(B, np.float32), TypeError, r"tokens must have dtype int64, got float32"),
        (5, np.array([3, -2]), ValueError, r"tokens\[1\] must be >= 0, got -2"),
        (5, np.array([3, 2**62 - 5]), ValueError,
         r"tokens\[1\] = 4611686018427387899; positions must stay below 2\^62, and adding T=6 would pass that"),
        (5, np.zeros((B, 1), np.int64), ValueError, r"tokens must have 1 dimensions \(B=2,\)"),
        (7, 7, ValueError, r"k_cache must have shape \(B=2, Hkv=2, W=7, D=8\), got \(2, 2, 5, 8\)"),
        (7, 0, ValueError, r"window must be >= 1, got 0"),
        (7, True, TypeError, r"window must be an int, got bool"),
        (8, 0.0, ValueError, r"scale must be a finite number > 0, got 0"),
        (8, "x", TypeError, r"scale must be a number, got str"),
        (4, lambda c, args: args[3], ValueError, r"k_cache shares memory with v_cache"),
        (3, lambda c, args: np.lib.stride_tricks.as_strided(f32(64), (B, HKV, W, D), (0, 4, 4, 4)), ValueError,
         r"k_cache has overlapping memory"),
        (5, lambda c, args: c.k.reshape(-1).view(np.int64)[:B], ValueError, r"tokens shares memory with k"),
    ],
    ids=["tokens-dtype", "tokens-negative", "tokens-overflow", "tokens-shape", "window-vs-cache", "window-zero",
         "window-bool", "scale-zero", "scale-type", "caches-share", "cache-self-overlap", "tokens-in-k"],
)
def test_c_binding_errors(op, index, value, exc, message):
    """What only the C layer can be handed: raw cache tensors, tokens and settings (the fast
    kernel and its twin share one check, so both answer alike)."""
    c = Call()
    args = raw_args(c)
    if callable(value):
        value = value(c, args)
    args[index] = value
    watched = [a for a in args[3:7] if isinstance(a, np.ndarray)]
    before = [bytes(np.ascontiguousarray(a)) for a in watched]
    with pytest.raises(exc, match=message):
        getattr(_C, op)(*args)
    assert [bytes(np.ascontiguousarray(a)) for a in watched] == before


def test_c_binding_argument_count():
    with pytest.raises(TypeError, match=r"sliding_window_decode\(\) takes 10 positional arguments, got 2"):
        _C.sliding_window_decode(1, 2)


def test_head_dim_zero_and_no_kv_heads():
    c = Call()
    args = raw_args(c)
    args[0] = f32(B, T, H, 0)
    with pytest.raises(ValueError, match=r"q must have a head dim D between 1 and 256, got D=0"):
        _C.sliding_window_prefill(*args)
    args = raw_args(c)
    args[1], args[2] = f32(B, T, 0, D), f32(B, T, 0, D)
    with pytest.raises(ValueError, match=r"not a multiple of the Hkv=0 heads of k"):
        _C.sliding_window_prefill(*args)


def test_scale_written_as_a_power_matches_the_cache():
    """``D ** -0.5`` and ``1 / sqrt(D)`` differ in the last bit for many D: a call that passes
    the former to a cache built with the latter is the same setting, not a mismatch."""
    import math

    for d in (2, 3, 6, 7, 8, 12, 32, 48):
        assert d ** -0.5 == pytest.approx(1 / math.sqrt(d), rel=1e-15)
        q = np.zeros((1, 2, 1, d), np.float32)
        _, cache = based.sliding_window_prefill(q, q, q, window=4)
        based.sliding_window_prefill(q, q, q, cache=cache, scale=d ** -0.5)


@requires_torch
def test_out_and_cache_that_require_grad_are_refused():
    q = torch.zeros(1, 3, 2, 4)
    out = torch.zeros(1, 3, 2, 4, requires_grad=True)
    with pytest.raises(TypeError, match="out requires grad"):
        based.sliding_window_prefill(q, q, q, window=2, out=out)
    _, cache = based.sliding_window_prefill(q, q, q, window=2)
    cache.v.requires_grad_()
    with pytest.raises(TypeError, match=r"SlidingWindowCache.v requires grad"):
        based.sliding_window_decode(q[:, 0], q[:, 0], q[:, 0], cache)
