"""CUDA integration: zero-copy with torch and CuPy, stream ordering, no synchronisation,
CUDA-graph capture of a multi-layer decode step, devices (SPEC 2 and 3).

Every test needs a CUDA build of based, torch.cuda and a GPU (``requires_cuda``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import based
from conftest import HAS_TORCH, requires_cuda

if HAS_TORCH:
    import torch

pytestmark = requires_cuda


def _qkv(B, T, H, dk, dv, dtype=None, seed=0):
    dtype = dtype or torch.float32
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, dk, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, T, H, dk, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, T, H, dv, device="cuda", generator=g).to(dtype)
    return q, k, v


def test_outputs_and_state_are_the_callers_memory():
    q, k, v = _qkv(2, 16, 2, 16, 64)
    out = torch.empty_like(v)
    o, state = based.linear_attention_prefill(q, k, v, out=out)
    assert o is out and o.data_ptr() == out.data_ptr()
    kv_ptr = state.kv.data_ptr()
    based.linear_attention_decode(q[:, 0], k[:, 0], v[:, 0], state)
    assert state.kv.data_ptr() == kv_ptr and state.kv.is_cuda
    _, cache = based.sliding_window_prefill(q, k, v[..., :16], window=8)
    assert cache.k.is_cuda and cache.k.stride(-1) == 1  # the ring is row-major on a GPU


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed")
def test_cupy_in_cupy_out_on_its_current_stream():
    import cupy

    rng = np.random.default_rng(0)
    q, k = (cupy.asarray(rng.standard_normal((1, 40, 2, 16)).astype(np.float32)) for _ in range(2))
    v = cupy.asarray(rng.standard_normal((1, 40, 2, 32)).astype(np.float32))
    with cupy.cuda.Stream(non_blocking=True) as s:
        o, state = based.linear_attention_prefill(q, k, v)
        assert isinstance(o, cupy.ndarray) and isinstance(state.kv, cupy.ndarray)
        s.synchronize()
    ref, _ = based.linear_attention_prefill(cupy.asnumpy(q), cupy.asnumpy(k), cupy.asnumpy(v))
    np.testing.assert_allclose(cupy.asnumpy(o), ref, rtol=1e-4, atol=1e-5)


def test_runs_on_the_current_torch_stream_without_syncing():
    """A slow producer kernel on a side stream, then based on that stream: based's output must
    see the producer's data (stream order), and the call must return before the GPU is done."""
    side = torch.cuda.Stream()
    q, k, v = _qkv(4, 512, 8, 16, 64, torch.bfloat16)
    based.linear_attention_prefill(q, k, v)   # the kernels' modules load (lazily) outside the timed part
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device="cuda")
        torch.cuda._sleep(50_000_000)          # ~tens of ms of GPU time on this stream
        v2 = v * 2                              # produced on the side stream, after the sleep
        o, _ = based.linear_attention_prefill(q, k, v2)
        done = torch.cuda.Event()
        done.record()
        assert not done.query(), "based synchronised the stream (the call waited for the sleep)"
    torch.cuda.synchronize()
    ref, _ = based.linear_attention_prefill(q, k, v * 2)
    torch.testing.assert_close(o, ref, rtol=0, atol=0)
    del big


def test_stream_keyword_for_other_arrays():
    s = torch.cuda.Stream()
    q, k, v = _qkv(1, 8, 2, 16, 16)
    o, _ = based.linear_attention_prefill(q, k, v, stream=s)
    s.synchronize()
    ref, _ = based.linear_attention_prefill(q, k, v, stream=s.cuda_stream)
    torch.cuda.synchronize()
    torch.testing.assert_close(o, ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="stream"):
        based.linear_attention_prefill(q, k, v, stream="fast")


def _model(L, B, H, dk, dv, W, D, dtype):
    """L layers of (linear attention, sliding window) states and static step buffers."""
    layers = []
    for i in range(L):
        st = based.LinearAttentionState.zeros(B, H, dk, dv, like=torch.empty(0, device="cuda"))
        cache = based.SlidingWindowCache.zeros(B, H, W, D, dtype=str(dtype).removeprefix("torch."),
                                               like=torch.empty(0, device="cuda"))
        layers.append((st, cache, torch.empty(B, H, dv, device="cuda", dtype=dtype),
                       torch.empty(B, H, D, device="cuda", dtype=dtype)))
    return layers


def _step(layers, x_lin, x_win):
    """One decode step through every layer; returns the last layer's outputs."""
    q, k, v = x_lin
    qw, kw, vw = x_win
    for st, cache, out_l, out_w in layers:
        based.linear_attention_decode(q, k, v, st, out=out_l)
        based.sliding_window_decode(qw, kw, vw, cache, out=out_w)
        v = out_l * 0.5 + v * 0.5      # feed outputs forward, as a model's layers do
        vw = out_w * 0.5 + vw * 0.5
    return out_l, out_w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_of_a_multilayer_decode_step_replays_correctly(dtype):
    dtype = getattr(torch, dtype)
    L, B, H, dk, dv, W, D, steps = 3, 4, 4, 16, 64, 8, 32, 12
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [(torch.randn(B, H, dk, device="cuda", generator=g).to(dtype),
           torch.randn(B, H, dk, device="cuda", generator=g).to(dtype),
           torch.randn(B, H, dv, device="cuda", generator=g).to(dtype),
           torch.randn(B, H, D, device="cuda", generator=g).to(dtype),
           torch.randn(B, H, D, device="cuda", generator=g).to(dtype),
           torch.randn(B, H, D, device="cuda", generator=g).to(dtype)) for _ in range(steps)]
    eager = _model(L, B, H, dk, dv, W, D, dtype)
    want = []
    for x in xs:
        ol, ow = _step(eager, x[:3], x[3:])
        want.append((ol.clone(), ow.clone()))

    graphed = _model(L, B, H, dk, dv, W, D, dtype)
    static = [torch.empty_like(t) for t in xs[0]]
    # warm up on a side stream (the states advance: reset them before capture)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _step(graphed, static[:3], static[3:])
    torch.cuda.current_stream().wait_stream(side)
    for st, cache, _, _ in graphed:
        st.reset()
        cache.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_l, out_w = _step(graphed, static[:3], static[3:])
    for st, cache, _, _ in graphed:   # capture does not run kernels, but be explicit
        st.reset()
        cache.reset()
    for x, (wl, ww) in zip(xs, want):
        for s, t in zip(static, x):
            s.copy_(t)
        graph.replay()
        torch.testing.assert_close(out_l, wl, rtol=0, atol=0)
        torch.testing.assert_close(out_w, ww, rtol=0, atol=0)
    assert graphed[0][0].tokens.tolist() == [steps] * B
    assert graphed[0][1].tokens.tolist() == [steps] * B


@pytest.mark.skipif(not HAS_TORCH or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    q, k, v = (x.to("cuda:1") for x in _qkv(1, 8, 2, 16, 16))
    o, state = based.linear_attention_prefill(q, k, v)
    assert o.device.index == 1 and state.kv.device.index == 1
    ref, _ = based.linear_attention_prefill(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(o.cpu(), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cuda:0"):
        based.linear_attention_prefill(q, k.to("cuda:0"), v)


def test_demo_runs_on_the_gpu():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "based", "demo", "--device", "cuda", "--max-new-tokens", "20",
                          "--prompt", "ROMEO:"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stdout + run.stderr
