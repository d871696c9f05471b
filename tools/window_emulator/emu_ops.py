"""based.sliding_window_prefill/decode routed to the emulated CUDA kernels (libemu.so, path in
BASED_WINDOW_EMU_LIB) for CPU torch tensors, except calls whose q carries `_ref` (the CPU
reference calls of the patched test file, see bridge.py), which go to based's CPU path."""
import ctypes
import os

import torch

import based

lib = ctypes.CDLL(os.environ["BASED_WINDOW_EMU_LIB"])


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("strides", ctypes.c_int64 * 4), ("dtype", ctypes.c_int),
                ("itemsize", ctypes.c_int32)]


class Device(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("id", ctypes.c_int32)]


class Args(ctypes.Structure):
    _fields_ = [("phase", ctypes.c_int), ("device", Device), ("q", Tensor), ("out", Tensor), ("k", Tensor),
                ("v", Tensor), ("k_cache", Tensor), ("v_cache", Tensor), ("tokens", Tensor), ("batch", ctypes.c_int64),
                ("seqlen", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("window", ctypes.c_int64), ("scale", ctypes.c_double)]


DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int64: 4}
orig_prefill, orig_decode = based.sliding_window_prefill, based.sliding_window_decode
calls = {"emu": 0, "ref": 0}


def _t(x, decode=False):
    t = Tensor()
    t.data = x.data_ptr() if x.numel() else 0
    st = list(x.stride())
    if decode:
        st = [st[0], 0, st[1], st[2]]
    st += [0] * (4 - len(st))
    for i in range(4):
        t.strides[i] = st[i]
    t.dtype = DT[x.dtype]
    t.itemsize = x.element_size()
    return t


def _call(fn, q, k, v, cache, out, decode):
    assert q.device.type == "cpu"
    a = Args()
    a.phase = 1 if decode else 0
    a.device = Device(1, 0)
    a.q, a.k, a.v, a.out = (_t(x, decode) for x in (q, k, v, out))
    a.k_cache, a.v_cache, a.tokens = _t(cache.k), _t(cache.v), _t(cache.tokens)
    a.batch = q.shape[0]
    a.seqlen = 1 if decode else q.shape[1]
    a.heads, a.kv_heads, a.head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    a.window, a.scale = cache.window, cache.scale
    st = fn(ctypes.byref(a), None)
    assert st == 0, st
    calls["emu"] += 1


def prefill(q, k, v, *, window=None, scale=None, cache=None, out=None):
    if getattr(q, "_ref", False):
        calls["ref"] += 1
        return orig_prefill(q, k, v, window=window, scale=scale, cache=cache, out=out)
    B, T, H, D = q.shape
    if cache is None:
        cache = based.SlidingWindowCache.zeros(B, k.shape[2], window, D, dtype=str(k.dtype)[6:], scale=scale, like=q)
    else:
        assert window is None or window == cache.window
    if out is None:
        out = torch.empty(B, T, H, D, dtype=v.dtype)
    _call(lib.based_cuda_sliding_window_prefill, q, k, v, cache, out, False)
    return out, cache


def decode(q, k, v, cache, *, out=None):
    if getattr(q, "_ref", False):
        calls["ref"] += 1
        return orig_decode(q, k, v, cache, out=out)
    if out is None:
        out = torch.empty(q.shape, dtype=v.dtype)
    _call(lib.based_cuda_sliding_window_decode, q, k, v, cache, out, True)
    return out


based.sliding_window_prefill = prefill
based.sliding_window_decode = decode
