"""based.nn.functional (the training paths) against the float64 NumPy references of SPEC 1.1
and 1.2, and rotary embeddings against an independent complex-number formula."""

import math

import numpy as np
import pytest
from conftest import EPS, rounded, to_numpy64

torch = pytest.importorskip("torch")
from based import reference as ref  # noqa: E402
from based.nn import functional as fn  # noqa: E402

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def randn(rng, shape, dtype, scale=1.0):
    data = rng.standard_normal(shape) * scale
    return torch.from_numpy(data).to(TORCH_DTYPES[dtype]), rounded(data, dtype)


def weighted_mean_tolerance(dtype, terms):
    """Bound on |out - ref| / max|v| for an output that is a (normalised) weighted mean of v.

    The function computes in float64 for float64 inputs, else float32: each weight is a
    dot product of Dk (or D) terms plus a few operations, and the mean sums up to T
    weighted values, so the relative error of the result is at most ~ (terms) compute-ulps;
    we allow 4x that. Outputs in a narrower dtype add half an ulp of that dtype each.
    """
    compute = "float64" if dtype == "float64" else "float32"
    return 4 * terms * EPS[compute] + (EPS[dtype] if dtype == "bfloat16" else 0.0)


# (B, T, H, Dk, Dv): T=1, T below and above typical chunk sizes, Dv not a power of two
LINEAR_SHAPES = [(1, 1, 1, 16, 64), (2, 7, 3, 16, 112), (1, 33, 2, 4, 5), (3, 64, 1, 16, 24), (1, 100, 2, 8, 112)]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "B{}_T{}_H{}_Dk{}_Dv{}".format(*s))
def test_linear_attention_matches_reference(shape, dtype):
    b, t, h, dk, dv = shape
    rng = np.random.default_rng(t * 31 + dk)
    q, q64 = randn(rng, (b, t, h, dk), dtype, 1.5)
    k, k64 = randn(rng, (b, t, h, dk), dtype, 1.5)
    v, v64 = randn(rng, (b, t, h, dv), dtype)
    got = fn.linear_attention(q, k, v)
    assert got.shape == (b, t, h, dv) and got.dtype == v.dtype
    want = ref.linear_attention_quadratic(q64, k64, v64)
    err = np.abs(to_numpy64(got) - want).max() / np.abs(v64).max()
    assert err <= weighted_mean_tolerance(dtype, dk + t), err


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_linear_attention_unnormalised_and_scale(scale):
    rng = np.random.default_rng(5)
    q, q64 = randn(rng, (2, 20, 2, 16), "float64")
    k, k64 = randn(rng, (2, 20, 2, 16), "float64")
    v, v64 = randn(rng, (2, 20, 2, 9), "float64")
    got = fn.linear_attention(q, k, v, scale=scale, normalize=False)
    want = ref.linear_attention_quadratic(q64, k64, v64, scale=scale, normalize=False)
    # float64 throughout: the sum of T=20 positive-weighted terms, a few ulps of its magnitude
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=64 * EPS["float64"] * np.abs(want).max())


def test_linear_attention_is_the_spec_kernel_at_t_equals_1():
    """One token: o = K v / (K + eps) with K = 1 + s + s^2/2, written out by hand."""
    q = torch.tensor([[[[2.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[4.0]]]], dtype=torch.float64)
    s = 2.0 / math.sqrt(2)
    kern = 1 + s + s * s / 2
    assert fn.linear_attention(q, k, v, eps=0.5).item() == pytest.approx(kern * 4 / (kern + 0.5), rel=1e-15)


def test_linear_attention_autocast_still_computes_in_float32():
    rng = np.random.default_rng(6)
    q, _ = randn(rng, (1, 40, 2, 16), "float32", 2.0)
    k, _ = randn(rng, (1, 40, 2, 16), "float32", 2.0)
    v, _ = randn(rng, (1, 40, 2, 8), "float32")
    plain = fn.linear_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fn.linear_attention(q, k, v)
    assert auto.dtype == torch.float32
    assert torch.equal(plain, auto)


# (B, T, H, Hkv, D, window)
WINDOW_CASES = [
    (1, 1, 1, 1, 8, 1),          # T = 1
    (2, 9, 2, 2, 16, 1),         # window 1: each token attends only itself
    (1, 17, 4, 2, 16, 4),        # GQA, T not a multiple of the window
    (2, 12, 4, 1, 112, 65),      # window larger than T: full causal attention; D = 112
    (1, 40, 6, 3, 64, 16),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "B{}_T{}_H{}_Hkv{}_D{}_w{}".format(*c))
def test_sliding_window_matches_reference(case, dtype):
    b, t, h, hkv, d, window = case
    rng = np.random.default_rng(t + window)
    q, q64 = randn(rng, (b, t, h, d), dtype, 2.0)
    k, k64 = randn(rng, (b, t, hkv, d), dtype)
    v, v64 = randn(rng, (b, t, hkv, d), dtype)
    got = fn.sliding_window_attention(q, k, v, window=window)
    assert got.shape == (b, t, h, d)
    want = ref.sliding_window_attention(q64, k64, v64, window)
    err = np.abs(to_numpy64(got) - want).max() / np.abs(v64).max()
    assert err <= weighted_mean_tolerance(dtype, d + window), err


def test_sliding_window_window_1_returns_v():
    rng = np.random.default_rng(7)
    q, _ = randn(rng, (1, 6, 2, 4), "float64")
    k, _ = randn(rng, (1, 6, 2, 4), "float64")
    v, _ = randn(rng, (1, 6, 2, 4), "float64")
    torch.testing.assert_close(fn.sliding_window_attention(q, k, v, window=1), v, rtol=1e-15, atol=1e-15)


def test_sliding_window_errors():
    x = torch.zeros(1, 3, 3, 4)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        fn.sliding_window_attention(x, x, x, window=0)
    with pytest.raises(ValueError, match=r"kv heads \(2\) must divide query heads \(3\)"):
        fn.sliding_window_attention(x, x[:, :, :2], x[:, :, :2], window=2)


def test_window_mask():
    m = fn.window_mask(5, 2)
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
                        dtype=torch.bool)
    assert torch.equal(m, want)


@pytest.mark.parametrize("d", [2, 8, 112])
def test_rotary_is_a_complex_rotation(d):
    """Pair (i, i + D/2) as the complex number x_i + 1j x_{i+D/2}, times exp(1j p base^(-2i/D))."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal((2, 5, 3, d))
    start = np.array([0, 1000])
    got = fn.apply_rotary(torch.from_numpy(x), fn.rotary_positions(torch.from_numpy(start), 5), 500.0).numpy()
    pos = start[:, None] + np.arange(5)                                    # (B, T)
    freq = 500.0 ** (-2.0 * np.arange(d // 2) / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * pos[:, :, None, None] * freq)
    want = np.concatenate([z.real, z.imag], axis=-1)
    # float64: the angle p * freq (p <= 1004) and its cos/sin, a few ulps of p relative
    np.testing.assert_allclose(got, want, rtol=0, atol=1e4 * EPS["float64"] * np.abs(x).max())


def test_rotary_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(3)
    q = torch.from_numpy(rng.standard_normal((1, 1, 1, 16)))
    k = torch.from_numpy(rng.standard_normal((1, 1, 1, 16)))

    def score(m, n):
        return float((fn.apply_rotary(q, fn.rotary_positions(m, 1)) * fn.apply_rotary(k, fn.rotary_positions(n, 1))).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-12)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
