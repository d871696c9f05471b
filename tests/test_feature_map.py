"""taylor_feature_map against the float64 NumPy reference (SPEC 1.1), over shapes,
dtypes, strides and array libraries, plus the kernel identity phi(q).phi(k) = 1+s+s^2/2."""

import math

import numpy as np
import pytest
from conftest import EPS, HAS_TORCH, make_array, poison, requires_torch, rounded, to_numpy64, torch

import based
from based import reference as ref

SHAPES = [(16,), (1, 1), (3, 5, 4), (2, 3, 7, 16), (5, 32), (2, 0, 8), (0, 3)]
DTYPES = ["float32", "float64", "float16", "bfloat16"]


def tolerance(dtype):
    """|out - ref| <= rtol*|ref| + atol. The kernel computes in float32 (float64 for
    float64): each feature is at most a product of two inputs and a constant, so a few
    compute-ulps of error, then one rounding to the output dtype (half an output-ulp).
    float16 loses relative precision below 2**-14 (subnormals): atol of one subnormal ulp."""
    compute = "float64" if dtype == "float64" else "float32"
    return EPS[dtype] + 8 * EPS[compute], (2.0**-24 if dtype == "float16" else 0.0)


def check(out, x64, dtype, scale=None):
    want = ref.taylor_feature_map(x64, scale)
    got = to_numpy64(out)
    assert got.shape == want.shape
    rtol, atol = tolerance(dtype)
    err = np.abs(got - want)
    bound = rtol * np.abs(want) + atol
    assert np.all(err <= bound), f"max err {err.max()} (bound {bound[err.argmax()] if err.size else 0})"


def libs_for(dtype):
    libs = ["numpy"] if dtype != "bfloat16" else []
    return libs + (["torch"] if HAS_TORCH else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_matches_reference(shape, dtype):
    rng = np.random.default_rng(0)
    data = rng.standard_normal(shape) * 2
    for lib in libs_for(dtype):
        x = make_array(lib, data, dtype)
        out = based.taylor_feature_map(x)
        assert type(out) is type(x)
        dk = shape[-1]
        assert out.shape == tuple(shape[:-1]) + (1 + dk + dk * (dk + 1) // 2,)
        check(out, rounded(data, dtype), dtype)


@pytest.mark.parametrize("scale", [0.25, 1.0, 3.5])
def test_scale(scale):
    x = np.random.default_rng(1).standard_normal((4, 6))
    check(based.taylor_feature_map(x, scale=scale), x, "float64", scale)


def test_kernel_identity():
    """phi(q) . phi(k) == 1 + s + s^2/2 (the reason the map exists)."""
    rng = np.random.default_rng(2)
    for dk in (1, 2, 7, 16, 32):
        q, k = rng.standard_normal((2, 50, dk))
        for scale in (None, 0.3):
            dot = np.sum(based.taylor_feature_map(q, scale=scale) * based.taylor_feature_map(k, scale=scale), -1)
            np.testing.assert_allclose(dot, ref.taylor_kernel(q, k, scale), rtol=1e-12)


def test_feature_order():
    """The compact order of SPEC 1.1, written out for Dk = 3."""
    x = np.array([2.0, 3.0, 5.0])
    s = 0.5
    r = math.sqrt(2)
    want = [1, math.sqrt(s) * 2, math.sqrt(s) * 3, math.sqrt(s) * 5,
            s / r * 4, s * 6, s * 10, s / r * 9, s * 15, s / r * 25]
    np.testing.assert_allclose(based.taylor_feature_map(x, scale=s), want, rtol=1e-15)
    assert based.feature_dim(16) == 153 and based.feature_dim(1) == 3


def test_strided_numpy_inputs():
    """Transposed, step-sliced, negative-stride and broadcast (stride 0) inputs, no copies."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 8, 10))
    views = {
        "transposed": base.transpose(2, 0, 1),
        "sliced": base[1::2, ::3, 1:9:2],
        "negative": base[::-1, :, ::-2],
        "broadcast": np.broadcast_to(base[:1], (4, 8, 10)),
    }
    for name, v in views.items():
        assert not v.flags.c_contiguous, name
        check(based.taylor_feature_map(v), v, "float64")


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_torch_inputs_and_out(dtype):
    """(B, H, T, D) passed as x.transpose(1, 2) works without a copy; out= may be strided."""
    data = np.random.default_rng(4).standard_normal((2, 4, 9, 6))
    x = make_array("torch", data, dtype).transpose(1, 2)   # (2, 9, 4, 6) view
    big = torch.empty((2, 9, 4, 2 * 28), dtype=getattr(torch, dtype))
    out = poison(big)[..., ::2]
    res = based.taylor_feature_map(x, out=out)
    assert res is out and res.data_ptr() == big.data_ptr()
    check(out, rounded(data, dtype).transpose(0, 2, 1, 3), dtype)
    assert torch.isnan(big[..., 1::2]).all(), "wrote outside the out view"


def test_out_numpy_is_written_in_place():
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    out = poison(np.empty((3, 15), np.float32))
    res = based.taylor_feature_map(x, out=out)
    assert res is out
    check(out, x.astype(np.float64), "float32")


def test_nonfinite_inputs_stay_local():
    """NaN/Inf propagate into the features of their own row and nowhere else (SPEC 4)."""
    x = np.ones((3, 4))
    x[1, 2] = np.nan
    x[2, 0] = np.inf
    phi = based.taylor_feature_map(x)
    assert np.all(np.isfinite(phi[0]))
    assert np.isnan(phi[1]).any() and np.isfinite(phi[1, 0])
    assert np.isinf(phi[2]).any()
