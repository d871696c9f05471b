"""Taylor linear attention on CUDA against the CPU path and float64 references (SPEC 1.1).

Every test here needs a CUDA build of based, torch.cuda and a GPU (``requires_cuda``); they
skip otherwise. Inputs are drawn on the host in float64, rounded to the test dtype, and the
same bits go to both devices.

Tolerance policy (flash-attention's, ``conftest.assert_within_policy``): the CUDA output's
largest error against a float64 reference must be at most twice that of the same computation
done in the input precision -- for float32 inputs the CPU kernel (float32 arithmetic), for
float16/bfloat16 a PyTorch restatement of the chunked algorithm whose matrix products take
operands in that dtype (as the tensor-core kernel does) -- plus a floor of a few units in the
last place of the output's scale (outputs near zero, where both errors are rounding noise).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import based
from conftest import EPS, HAS_TORCH, assert_within_policy, requires_cuda

if HAS_TORCH:
    import torch

pytestmark = requires_cuda

DTYPES = ["float32", "float16", "bfloat16"]


def _tdtype(name):
    return getattr(torch, name)


def _inputs(B, T, H, dk, dv, dtype, seed, scale_qk=1.0, device="cuda"):
    g = np.random.default_rng(seed)
    q = torch.from_numpy(g.standard_normal((B, T, H, dk)) * scale_qk)
    k = torch.from_numpy(g.standard_normal((B, T, H, dk)) * scale_qk)
    v = torch.from_numpy(g.standard_normal((B, T, H, dv)))
    return tuple(x.to(_tdtype(dtype)).to(device) for x in (q, k, v))


def _cpu64(x):
    return x.detach().to("cpu", torch.float64)


def _reference64(q, k, v, state=None, normalize=True, eps=1e-6):
    """float64 CPU prefill of the exact inputs (and of a copy of the initial state)."""
    s64 = None
    if state is not None:
        s64 = based.LinearAttentionState.zeros(state.batch, state.heads, state.feature_dim, state.value_dim,
                                               dtype="float64", scale=state.scale, like=_cpu64(q))
        s64.kv.copy_(_cpu64(state.kv))
        s64.ksum.copy_(_cpu64(state.ksum))
    o, s64 = based.linear_attention_prefill(_cpu64(q), _cpu64(k), _cpu64(v), s64, normalize=normalize, eps=eps)
    return o, s64


def _phi_torch(x, scale):
    """Compact Taylor features of x (..., Dk) in x's dtype and device (SPEC 1.1 order)."""
    dk = x.shape[-1]
    iu = torch.triu_indices(dk, dk, device=x.device)
    quad = x[..., iu[0]] * x[..., iu[1]]
    coef = torch.where(iu[0] == iu[1], scale / math.sqrt(2), scale).to(x.dtype)
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    return torch.cat([ones, math.sqrt(scale) * x, quad * coef], dim=-1)


def _chunked_low(q, k, v, scale, normalize=True, eps=1e-6, kv0=None, ksum0=None, chunk=64):
    """The chunked algorithm with every matrix product's operands in the input dtype and
    float32 accumulation (torch's GPU matmul), the state carried in float32: the
    input-precision twin of the tensor-core kernel."""
    dt = q.dtype
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, d)
    F = 1 + dk + dk * (dk + 1) // 2
    kv = torch.zeros(B, H, F, dv, dtype=torch.float32, device=q.device) if kv0 is None else kv0.float().clone()
    ks = torch.zeros(B, H, F, dtype=torch.float32, device=q.device) if ksum0 is None else ksum0.float().clone()
    out = torch.empty(B, H, T, dv, dtype=torch.float32, device=q.device)
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        qc, kc, vc = qh[:, :, c0:c1], kh[:, :, c0:c1], vh[:, :, c0:c1]
        s = torch.matmul(qc, kc.transpose(-1, -2)).float() * scale
        a = 1 + s + 0.5 * s * s
        n = c1 - c0
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        a = torch.where(mask, a, torch.zeros((), device=q.device)).to(dt)
        pq, pk = _phi_torch(qc, scale), _phi_torch(kc, scale)
        num = torch.matmul(a, vc).float() + torch.matmul(pq, kv.to(dt)).float()
        den = a.float().sum(-1) + torch.matmul(pq.float(), ks.unsqueeze(-1)).squeeze(-1)
        out[:, :, c0:c1] = num / (den + eps).unsqueeze(-1) if normalize else num
        kv += torch.matmul(pk.transpose(-1, -2), vc).float()
        ks += pk.float().sum(-2)
    return out.to(dt).transpose(1, 2)


def _low(q, k, v, scale, normalize=True, eps=1e-6, state=None):
    """The input-precision computation of the tolerance policy."""
    if q.dtype == torch.float32:  # the CPU kernel computes in float32
        s = None
        if state is not None:
            s = based.LinearAttentionState.zeros(state.batch, state.heads, state.feature_dim, state.value_dim,
                                                 scale=state.scale, like=q.cpu())
            s.kv.copy_(state.kv.cpu().float())
            s.ksum.copy_(state.ksum.cpu().float())
        o, _ = based.linear_attention_prefill(q.cpu(), k.cpu(), v.cpu(), s, normalize=normalize, eps=eps)
        return o
    kv0 = None if state is None else state.kv
    ks0 = None if state is None else state.ksum
    return _chunked_low(q, k, v, scale, normalize, eps, kv0, ks0)


def _floor(ref, dtype):
    """A few units in the last place of the output's scale (see the module docstring)."""
    return 4 * EPS[dtype] * float(ref.abs().max())


def _check(out, q, k, v, scale, dtype, normalize=True, eps=1e-6, state=None, name="out"):
    ref, _ = _reference64(q, k, v, state, normalize, eps)
    low = _low(q, k, v, scale, normalize, eps, state)
    assert_within_policy(out, ref, low, name, floor=_floor(ref, dtype))


@pytest.fixture(params=["auto", "simt"])
def prefill_kernel(request, monkeypatch):
    """Each prefill test runs on the kernel based picks and on the SIMT kernel forced."""
    if request.param == "simt":
        monkeypatch.setenv("BASED_CUDA_PREFILL", "simt")
    else:
        monkeypatch.delenv("BASED_CUDA_PREFILL", raising=False)
    return request.param


# --------------------------------------------------------------------------------------
# prefill
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,dk,dv", [
    (1, 1, 1, 16, 64), (2, 5, 3, 16, 64), (1, 64, 2, 16, 64), (3, 65, 2, 16, 7), (2, 200, 4, 16, 100),
    (1, 1000, 2, 16, 112), (2, 129, 2, 8, 256), (1, 77, 2, 1, 64), (2, 100, 2, 32, 48), (1, 300, 2, 17, 33),
])
def test_prefill_matches_reference(prefill_kernel, dtype, B, T, H, dk, dv):
    q, k, v = _inputs(B, T, H, dk, dv, dtype, seed=T * 31 + dk)
    out = torch.full((B, T, H, dv), float("nan"), dtype=_tdtype(dtype), device="cuda")
    o, state = based.linear_attention_prefill(q, k, v, out=out)
    assert o is out and o.device.type == "cuda" and state.kv.device.type == "cuda"
    _check(o, q, k, v, 1 / math.sqrt(dk), dtype)
    ref, s64 = _reference64(q, k, v)
    # the final state: float32 sums of the same terms; their scale grows with T
    for name in ("kv", "ksum"):
        got, want = _cpu64(getattr(state, name)), getattr(s64, name)
        # float32: T terms summed in float32 in another order (a few hundred ulps at T = 1000);
        # 16-bit inputs: phi(k) rounded to the input dtype on the tensor-core path
        tol = 256 * EPS["float32"] * float(want.abs().max()) if dtype == "float32" else \
            8 * EPS[dtype] * float(want.abs().max())
        assert float((got - want).abs().max()) <= tol, name
    assert state.tokens.tolist() == [T] * B


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("B,T,H", [(1, 4096, 2), (1, 1100, 1), (2, 2048, 3)])
def test_prefill_split_sequence(dtype, B, T, H, monkeypatch):
    """Few (b, h) against the SM count: the tensor-core path splits the sequence into
    segments (state per segment, scan, outputs); results as for one pass."""
    monkeypatch.delenv("BASED_CUDA_PREFILL", raising=False)
    q, k, v = _inputs(B, T, H, 16, 64, dtype, seed=T + H, scale_qk=0.5)
    o, state = based.linear_attention_prefill(q, k, v)
    _check(o, q, k, v, 0.25, dtype)
    _, s64 = _reference64(q, k, v)
    got, want = _cpu64(state.kv), s64.kv
    assert float((got - want).abs().max()) <= 8 * EPS[dtype] * float(want.abs().max())
    assert state.tokens.tolist() == [T] * B


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("normalize", [True, False])
def test_prefill_continues_a_state(prefill_kernel, dtype, state_dtype, normalize):
    B, H, dk, dv = 2, 3, 16, 64
    q, k, v = _inputs(B, 150, H, dk, dv, dtype, seed=7)
    state = based.LinearAttentionState.zeros(B, H, dk, dv, dtype=state_dtype, like=q)
    based.linear_attention_prefill(q[:, :90], k[:, :90], v[:, :90], state, normalize=normalize)
    assert state.tokens.tolist() == [90, 90]
    cont = state.clone()
    o, _ = based.linear_attention_prefill(q[:, 90:], k[:, 90:], v[:, 90:], state, normalize=normalize)
    _check(o, q[:, 90:], k[:, 90:], v[:, 90:], 0.25, dtype, normalize=normalize, state=cont)
    assert state.tokens.tolist() == [150, 150]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_strided_inputs(prefill_kernel, dtype):
    """(B, H, T, D) tensors passed as .transpose(1, 2), a step along T, a head slice: no copy."""
    B, T, H, dk, dv = 2, 130, 4, 16, 64
    q, k, v = _inputs(B, 2 * T, 2 * H, dk, dv, dtype, seed=3)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)[:, ::2, :H]   # (B, T, H, dk), head-first storage
    ks = k[:, ::2, 1::2]
    vs = v[:, ::2, :H]
    o, _ = based.linear_attention_prefill(qs, ks, vs)
    _check(o, qs, ks, vs, 0.25, dtype)
    out = torch.full((B, H, T, dv), float("nan"), dtype=_tdtype(dtype), device="cuda").transpose(1, 2)
    o2, _ = based.linear_attention_prefill(qs, ks, vs, out=out)
    assert o2 is out
    torch.testing.assert_close(o2, o, rtol=0, atol=0)


def test_prefill_chunked_calls_equal_one_call(prefill_kernel):
    """T split over several calls through the state == one call (float32: same sums in
    another order; within float32 rounding of the output scale)."""
    q, k, v = _inputs(1, 500, 2, 16, 64, "float32", seed=11)
    o1, s1 = based.linear_attention_prefill(q, k, v)
    state, parts = None, []
    for a, b in ((0, 1), (1, 64), (64, 200), (200, 500)):
        o, state = based.linear_attention_prefill(q[:, a:b], k[:, a:b], v[:, a:b], state)
        parts.append(o)
    torch.testing.assert_close(torch.cat(parts, 1), o1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.kv, s1.kv, rtol=1e-4, atol=1e-3)


def test_prefill_writes_only_out_and_state():
    """Outputs, state and counters inside larger poisoned buffers: the margins stay NaN/-7."""
    B, T, H, dk, dv = 2, 70, 2, 16, 64
    q, k, v = _inputs(B, T, H, dk, dv, "bfloat16", seed=5)
    big = torch.full((B + 2, T + 2, H + 2, dv + 8), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = big[1:B + 1, 1:T + 1, 1:H + 1, 4:dv + 4]
    F = based.feature_dim(dk)
    kvbig = torch.full((B, H, F + 2, dv + 4), -7.0, device="cuda")
    state = based.LinearAttentionState.zeros(B, H, dk, dv, like=q)
    state._t["kv"] = kvbig[:, :, 1:F + 1, 2:dv + 2]
    state.kv.zero_()
    based.linear_attention_prefill(q, k, v, state, out=out)
    assert not torch.isnan(out).any()
    inner = torch.zeros_like(big, dtype=torch.bool)
    inner[1:B + 1, 1:T + 1, 1:H + 1, 4:dv + 4] = True
    assert torch.isnan(big[~inner]).all()
    kin = torch.zeros_like(kvbig, dtype=torch.bool)
    kin[:, :, 1:F + 1, 2:dv + 2] = True
    assert (kvbig[~kin] == -7.0).all()


def test_prefill_nonfinite_stays_in_its_sequence():
    q, k, v = _inputs(2, 80, 2, 16, 64, "bfloat16", seed=9)
    v[1, 10, 0, 3] = float("nan")
    o, state = based.linear_attention_prefill(q, k, v)
    assert torch.isfinite(o[0]).all() and torch.isfinite(state.kv[0]).all()
    assert torch.isfinite(o[1, :10]).all() and torch.isnan(o[1, 10:, 0]).any()


def test_prefill_beyond_2_31_elements():
    """out has more than 2^31 elements: rows past that offset are written where they belong.
    q = k = 0 makes every weight 1, so o_t = mean of v_0..v_t = c (v constant per head)."""
    B, T, H, dv = 1, (1 << 31) // (16 * 64) + 64, 16, 64
    z = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16, device="cuda").expand(B, T, H, 16)
    c = torch.arange(1, H + 1, dtype=torch.bfloat16, device="cuda").view(1, 1, H, 1).repeat(1, 1, 1, dv)
    c = c.expand(B, T, H, dv)  # zero strides along B and T, unit stride along Dv
    out = torch.empty(B, T, H, dv, dtype=torch.bfloat16, device="cuda")
    assert out.numel() > 2**31
    based.linear_attention_prefill(z, z, c, out=out, eps=0.0)
    tail = out[0, -70:].float()
    want = torch.arange(1, H + 1, dtype=torch.float32, device="cuda").view(1, H, 1).expand_as(tail)
    torch.testing.assert_close(tail, want, rtol=2 * EPS["bfloat16"], atol=0)


# --------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------

def _decode_pair(B, H, dk, dv, dtype, state_dtype, steps, seed, normalize=True):
    """Prefill 30 tokens then decode `steps` tokens on CUDA and on the CPU, same bits."""
    q, k, v = _inputs(B, 30 + steps, H, dk, dv, dtype, seed=seed)
    sg = based.LinearAttentionState.zeros(B, H, dk, dv, dtype=state_dtype, like=q)
    based.linear_attention_prefill(q[:, :30], k[:, :30], v[:, :30], sg)
    sc = based.LinearAttentionState.zeros(B, H, dk, dv, dtype=state_dtype, like=q.cpu())
    sc.kv.copy_(sg.kv.cpu())
    sc.ksum.copy_(sg.ksum.cpu())
    sc.tokens.copy_(sg.tokens.cpu())
    outs_g, outs_c = [], []
    for t in range(30, 30 + steps):
        outs_g.append(based.linear_attention_decode(q[:, t], k[:, t], v[:, t], sg, normalize=normalize))
        outs_c.append(based.linear_attention_decode(q[:, t].cpu(), k[:, t].cpu(), v[:, t].cpu(), sc,
                                                    normalize=normalize))
    return torch.stack(outs_g, 1), torch.stack(outs_c, 1), sg, sc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dk,dv", [(16, 64), (16, 112), (16, 100), (1, 7), (32, 256), (8, 1)])
def test_decode_matches_cpu(dtype, state_dtype, dk, dv):
    """Decode rounds the state to its dtype once per token on both devices, from the same
    arithmetic in float32 in another order: outputs and state agree to a few float32 ulps of
    their scale, or one ulp of a 16-bit state (a rounding boundary can fall either way)."""
    og, oc, sg, sc = _decode_pair(3, 2, dk, dv, dtype, state_dtype, steps=5, seed=dk * 100 + dv)
    # a few ulps of the coarser of the input and state dtypes, plus float32 sums of F
    # terms in another order (sqrt(F) ulps, F <= 561)
    out_tol = max(EPS[dtype], EPS[state_dtype]) * 4 + 32 * EPS["float32"]
    torch.testing.assert_close(og.cpu().double(), oc.double(), rtol=out_tol, atol=out_tol)
    for name in ("kv", "ksum"):
        want = getattr(sc, name).double()
        tol = 2 * EPS[state_dtype] * float(want.abs().max()) + 8 * EPS["float32"] * float(want.abs().max())
        assert float((getattr(sg, name).cpu().double() - want).abs().max()) <= tol, name
    assert sg.tokens.tolist() == sc.tokens.tolist() == [35, 35, 35]


@pytest.mark.parametrize("normalize", [True, False])
def test_decode_after_prefill_equals_one_prefill(normalize):
    B, T, H, dk, dv = 2, 96, 4, 16, 64
    q, k, v = _inputs(B, T, H, dk, dv, "float32", seed=21)
    o_full, s_full = based.linear_attention_prefill(q, k, v, normalize=normalize)
    o_pre, state = based.linear_attention_prefill(q[:, :80], k[:, :80], v[:, :80], normalize=normalize)
    steps = [based.linear_attention_decode(q[:, t], k[:, t], v[:, t], state, normalize=normalize)
             for t in range(80, T)]
    torch.testing.assert_close(torch.stack(steps, 1), o_full[:, 80:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.kv, s_full.kv, rtol=1e-4, atol=1e-3)
    assert state.tokens.tolist() == [T, T]


def test_decode_unaligned_state_rows():
    """A state whose rows are not 16-byte aligned (odd row stride) takes the scalar path."""
    B, H, dk, dv = 2, 2, 16, 64
    F = based.feature_dim(dk)
    q, k, v = _inputs(B, 1, H, dk, dv, "float32", seed=2)
    sg = based.LinearAttentionState.zeros(B, H, dk, dv, like=q)
    wide = torch.randn(B, H, F, dv + 1, device="cuda")
    sg._t["kv"] = wide[..., 1:]          # row stride dv + 1, base off by 4 bytes
    sc = based.LinearAttentionState.zeros(B, H, dk, dv, like=q.cpu())
    sc.kv.copy_(sg.kv.cpu())
    og = based.linear_attention_decode(q[:, 0], k[:, 0], v[:, 0], sg)
    oc = based.linear_attention_decode(q[:, 0].cpu(), k[:, 0].cpu(), v[:, 0].cpu(), sc)
    torch.testing.assert_close(og.cpu(), oc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sg.kv.cpu(), sc.kv, rtol=1e-6, atol=1e-6)


def test_decode_out_and_no_allocation():
    """With out= and an existing state nothing is allocated (torch's allocator stats)."""
    B, H, dk, dv = 4, 8, 16, 64
    q, k, v = _inputs(B, 1, H, dk, dv, "bfloat16", seed=4)
    state = based.LinearAttentionState.zeros(B, H, dk, dv, like=q)
    out = torch.empty(B, H, dv, dtype=torch.bfloat16, device="cuda")
    based.linear_attention_decode(q[:, 0], k[:, 0], v[:, 0], state, out=out)  # warm-up
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(3):
        r = based.linear_attention_decode(q[:, 0], k[:, 0], v[:, 0], state, out=out)
        assert r is out
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


# --------------------------------------------------------------------------------------
# errors (SPEC 4): refused before anything is written
# --------------------------------------------------------------------------------------

def test_cuda_errors_leave_everything_unchanged():
    B, H, dk, dv = 2, 2, 16, 64
    q, k, v = _inputs(B, 4, H, dk, dv, "float32", seed=1)
    state = based.LinearAttentionState.zeros(B, H, dk, dv, like=q)
    based.linear_attention_prefill(q, k, v, state)
    before = (state.kv.clone(), state.ksum.clone(), state.tokens.clone())
    out = torch.full((B, 4, H, dv), 3.0, device="cuda")
    with pytest.raises(ValueError, match="cpu"):
        based.linear_attention_prefill(q.cpu(), k, v, state, out=out)
    with pytest.raises(TypeError, match="float64"):
        based.linear_attention_prefill(q.double(), k.double(), v.double(), state, out=out.double())
    wide = torch.randn(B, 4, H, 2 * dk, device="cuda")
    with pytest.raises(ValueError, match="unit stride"):
        based.linear_attention_prefill(wide[..., ::2], k, v, state, out=out)
    with pytest.raises(ValueError, match="unit stride"):
        based.linear_attention_decode(q[:, 0], k[:, 0], torch.randn(B, H, 2 * dv, device="cuda")[..., ::2], state)
    assert (out == 3.0).all()
    for a, b in zip(before, (state.kv, state.ksum, state.tokens)):
        assert torch.equal(a, b)


def test_build_info_reports_the_prefill_kernels():
    info = based.build_info()
    assert info["cuda"] and info["cuda_devices"] >= 1
    assert os.environ.get("BASED_CUDA_PREFILL") in (None, "", "simt", "mma_sync")
