"""Helpers shared by the linear-attention tests: inputs in any library/dtype/layout, runs of
the fast kernel and its C reference twin, and the error bound every comparison uses.

The error bound (why the tolerances are what they are). The kernels accumulate in a
compute precision u_c (float64 when the inputs or the state are float64, else float32).
Every quantity is a sum of products: num_t = sum_u K(q_t, k_u) v_u, taken partly through
the feature map (phi(q) . kv, whose terms can cancel) and partly directly. A sum of n
terms computed in precision u has error <= n * u * sum |terms| (Higham, gamma_n).
Replacing every input by its absolute value turns sum |terms| into a closed form:
|phi(q)| . |phi(k)| = 1 + a + a^2/2 with a = scale * |q| . |k|, so ``num_abs`` and
``den_abs`` below are the reference run on |q|, |k|, |v| (and |state|). The longest chain
of additions is n = F + 2C + T/C + Dk (features, the in-chunk triangle and the
normaliser, chunk-by-chunk state sums, q . k). Then

    |o - o_ref| <= n u_c (num_abs + |o_ref| den_abs) / den  +  eps_out |o_ref|   (normalised)
    |o - o_ref| <= n u_c num_abs + eps_out |o_ref|                                (numerator only)

with eps_out the output dtype's machine epsilon (one rounding, half an ulp, doubled for
slack) and one float16 subnormal ulp of absolute slack. The bound is rarely tight, but it
is small: n u_c is ~2e-5 for float32 at Dk = 16, so dropping any term of the kernel (an
O(1) change) fails it; the tests were checked to fail that way.
"""

from __future__ import annotations

import math

import numpy as np
from conftest import EPS, HAS_TORCH, to_numpy64, torch

from based import _C
from based import reference as ref

DTYPES = ["float32", "float64", "float16", "bfloat16"]
SHORT = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}
DEFAULT_CHUNK = 64


def feature_count(dk: int) -> int:
    return 1 + dk + dk * (dk + 1) // 2


def compute_dtype(dtype: str, state_dtype: str = "float32") -> str:
    """The kernels' compute dtype for inputs of dtype and a state of state_dtype."""
    return "float64" if "float64" in (dtype, state_dtype) else "float32"


def to_lib(data: np.ndarray, dtype: str, lib: str, layout: str = "bthd"):
    """float64 (B, T, H, D) or (B, H, D) data as a lib array of dtype. layout 'bhtd' stores a
    4-D array head-first and hands back the (B, T, H, D) transposed view (no copy)."""
    if layout == "bhtd":
        arr = to_lib(np.ascontiguousarray(data.transpose(0, 2, 1, 3)), dtype, lib)
        return arr.transpose(1, 2) if lib == "torch" else arr.transpose(0, 2, 1, 3)
    if lib == "numpy":
        assert dtype != "bfloat16", "numpy has no bfloat16"
        return np.ascontiguousarray(data.astype(dtype))
    return torch.from_numpy(np.array(data, dtype=np.float64)).to(getattr(torch, dtype))   # a copy, never an alias


def empty_like_lib(shape, dtype: str, lib: str):
    if lib == "numpy":
        return np.full(shape, np.nan, dtype=dtype)
    return torch.full(shape, float("nan"), dtype=getattr(torch, dtype))


def state_arrays(b, h, dk, dv, dtype: str, lib: str, kv0=None, ksum0=None, tokens0=0):
    """(kv, ksum, tokens) arrays of lib, filled from float64 data (zeros if None)."""
    f = feature_count(dk)
    kv0 = np.zeros((b, h, f, dv)) if kv0 is None else kv0
    ksum0 = np.zeros((b, h, f)) if ksum0 is None else ksum0
    tokens = np.full((b,), tokens0, np.int64)
    if lib == "torch":
        tokens = torch.from_numpy(tokens)
    return to_lib(kv0, dtype, lib), to_lib(ksum0, dtype, lib), tokens


def call(fn, q, k, v, kv, ksum, tokens, out, *, scale, normalize=True, eps=1e-6, chunk=0):
    """fn is one of _C.linear_attention_{prefill,decode}[_ref]; decode takes no chunk."""
    if fn in (_C.linear_attention_prefill, _C.linear_attention_prefill_ref):
        fn(q, k, v, kv, ksum, tokens, out, scale, normalize, eps, chunk, None)
    else:
        fn(q, k, v, kv, ksum, tokens, out, scale, normalize, eps, None)


def output_bound(q64, k64, v64, out_dtype, *, scale, normalize, eps=1e-6, kv0=None, ksum0=None,
                 chunk=DEFAULT_CHUNK, compute=None):
    """Elementwise bound on |o - o_ref| for prefill inputs (B, T, H, d) (see the module doc).
    Returns (o_ref, bound)."""
    compute = compute or compute_dtype(out_dtype)
    b, t, h, dk = q64.shape
    o_ref = ref.linear_attention_quadratic(q64, k64, v64, scale=scale, normalize=normalize, eps=eps, kv=kv0,
                                           ksum=ksum0)
    absq, absk, absv = np.abs(q64), np.abs(k64), np.abs(v64)
    kv_abs = None if kv0 is None else np.abs(kv0)
    ks_abs = None if ksum0 is None else np.abs(ksum0)
    num_abs = ref.linear_attention_quadratic(absq, absk, absv, scale=scale, normalize=False, kv=kv_abs, ksum=ks_abs)
    c = min(chunk, max(t, 1))
    n = feature_count(dk) + 2 * c + math.ceil(t / c) + dk
    u = EPS[compute]
    if normalize:
        ones = np.ones(v64.shape[:-1] + (1,))
        den_abs = ref.linear_attention_quadratic(absq, absk, ones, scale=scale, normalize=False,
                                                 kv=None if ks_abs is None else ks_abs[..., None], ksum=ks_abs)
        den = ref.linear_attention_quadratic(q64, k64, ones, scale=scale, normalize=False,
                                             kv=None if ksum0 is None else ksum0[..., None], ksum=ksum0)
        bound = n * u * (num_abs + np.abs(o_ref) * den_abs) / (den + eps)
    else:
        bound = n * u * num_abs
    bound = bound + EPS[out_dtype] * np.abs(o_ref) + (2.0**-24 if out_dtype == "float16" else 0.0)
    return o_ref, bound


def state_bound(k64, v64, state_dtype, compute, *, scale, kv0=None, ksum0=None, chunk=DEFAULT_CHUNK):
    """(kv_ref, ksum_ref, kv_bound, ksum_bound) for the state after folding (k, v) in."""
    b, t, h, dk = k64.shape
    kv_ref, ks_ref = ref.linear_attention_state(k64, v64, scale=scale, kv=kv0, ksum=ksum0)
    kv_abs, ks_abs = ref.linear_attention_state(np.abs(k64), np.abs(v64), scale=scale,
                                                kv=None if kv0 is None else np.abs(kv0),
                                                ksum=None if ksum0 is None else np.abs(ksum0))
    c = min(chunk, max(t, 1))
    n = 2 * c + math.ceil(t / c) + 2
    u = EPS[compute]
    sub = 2.0**-24 if state_dtype == "float16" else 0.0     # one float16 subnormal ulp
    return (kv_ref, ks_ref, n * u * kv_abs + EPS[state_dtype] * np.abs(kv_ref) + sub,
            n * u * ks_abs + EPS[state_dtype] * np.abs(ks_ref) + sub)


def assert_within(got, want, bound, what):
    got = to_numpy64(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    bad = ~(err <= bound)                      # NaN in got counts as bad
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(bound, 1e-300), 0)), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} of {err.size} elements outside the bound; worst at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}, bound {bound[i]!r}")


def libs_available(dtype: str, lib: str) -> bool:
    if lib == "torch" or dtype == "bfloat16":
        return HAS_TORCH
    return True

