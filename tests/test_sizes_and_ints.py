"""Sizes and integers (issue 10): sizes that overflow 64-bit indexing are refused by name
before anything is allocated, ``window`` is validated, and integers mean integers (no
floats, strings or bools where a count is expected)."""

import numpy as np
import pytest
from conftest import requires_torch, torch

import based

INDEX_MAX = 2**63 - 1


# ---------------------------------------------------------------------------------------
# 5. Size checks come before allocation
# ---------------------------------------------------------------------------------------


def broadcast(lib, shape):
    """A zero-stride view of one zero: any shape for the price of one element."""
    if lib == "torch":
        return torch.zeros((1,) * len(shape)).expand(*shape)
    return np.broadcast_to(np.zeros((1,) * len(shape), np.float32), shape)


LIBS = ["numpy", pytest.param("torch", marks=requires_torch)]


@pytest.mark.parametrize("lib", LIBS)
def test_linear_prefill_state_overflow_is_named_before_allocation(lib):
    # q, k, v (B, T, H, 16) are cheap views of 2**61 bytes; the new state (B, H, 153, 16) would
    # have 2**55 * 2448 elements
    b, h = 2**35, 2**20
    q = broadcast(lib, (b, 1, h, 16))
    with pytest.raises(ValueError, match=r"state's kv \(batch, heads, F, value_dim\) = \(34359738368, 1048576, 153, "
                                         r"16\) .*overflows 64-bit indexing"):
        based.linear_attention_prefill(q, q, q)


@pytest.mark.parametrize("lib", LIBS)
def test_state_zeros_overflow_is_named(lib):
    like = broadcast(lib, (1,))
    with pytest.raises(ValueError, match=r"\(batch, heads, F, value_dim\) = \(1099511627776, 1048576, 153, 64\)"):
        based.LinearAttentionState.zeros(2**40, 2**20, 16, 64, like=like)
    with pytest.raises(ValueError, match=r"tokens \(batch,\) = \(4611686018427387904,\)"):
        based.LinearAttentionState.zeros(2**62, 0, 16, 64, like=like)
    with pytest.raises(ValueError, match=r"\(batch, kv_heads, window, head_dim\) = \(1, 1, 4611686018427387904, 64\)"):
        based.SlidingWindowCache.zeros(1, 1, 2**62, 64, dtype="float32", like=like)


@pytest.mark.parametrize("lib", LIBS)
def test_window_prefill_cache_overflow_is_named(lib):
    q = broadcast(lib, (1, 64, 1, 16))
    with pytest.raises(ValueError, match=r"cache's k and v \(batch, kv_heads, window, head_dim\) = "
                                         r"\(1, 1, 4611686018427387904, 16\) .*overflows 64-bit indexing"):
        based.sliding_window_prefill(q, q, q, window=2**62)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("window", [2**63, 2**64 + 1, -(2**63)])
def test_window_beyond_int64_is_a_value_error_naming_it(lib, window):
    q = broadcast(lib, (1, 64, 1, 16))
    with pytest.raises(ValueError, match=rf"window must be between 1 and {INDEX_MAX}, got {window}"):
        based.sliding_window_prefill(q, q, q, window=window)
    _, cache = based.sliding_window_prefill(q, q, q, window=4)
    with pytest.raises(ValueError, match=rf"window must be between 1 and {INDEX_MAX}, got {window}"):
        based.sliding_window_prefill(q, q, q, window=window, cache=cache)
    with pytest.raises(ValueError, match=rf"window must be between 1 and {INDEX_MAX}, got {window}"):
        based.SlidingWindowCache.zeros(1, 1, window, 16, dtype="float32")


@requires_torch
def test_feature_map_output_overflow_is_named():
    x = torch.zeros(1, 1).expand(2**58, 16)           # (2**58, 153) float32 features would overflow
    with pytest.raises(ValueError, match=r"out \(\.\.\., F\) = \(288230376151711744, 153\) .*overflows 64-bit"):
        based.taylor_feature_map(x)


# ---------------------------------------------------------------------------------------
# 7. Integers mean integers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,exc,message", [
    (2**32, ValueError, r"head_dim must be between 1 and 3037000498, got 4294967296"),
    (0, ValueError, r"head_dim must be between 1 and 3037000498, got 0"),
    (4.0, TypeError, r"head_dim must be an int, got float"),
    (True, TypeError, r"head_dim must be an int, got bool"),
    (np.True_, TypeError, r"head_dim must be an int, got bool"),
    ("16", TypeError, r"head_dim must be an int, got str"),
])
def test_feature_dim_takes_integers_only(value, exc, message):
    with pytest.raises(exc, match=message):
        based.feature_dim(value)


def test_feature_dim_accepts_integer_scalars():
    assert based.feature_dim(16) == based.feature_dim(np.int64(16)) == based.feature_dim(np.uint8(16)) == 153
    assert based.feature_dim(3037000498) == 1 + 3037000498 + 3037000498 * 3037000499 // 2


@pytest.mark.parametrize("scale", [True, False, np.True_])
def test_feature_map_scale_is_not_a_bool(scale):
    with pytest.raises(TypeError, match="scale must be a number, got bool"):
        based.taylor_feature_map(np.ones((2, 3), np.float32), scale=scale)


@requires_torch
def test_a_torch_bool_is_not_an_int_nor_a_scale():
    with pytest.raises(TypeError, match="batch must be an int, got bool"):
        based.LinearAttentionState.zeros(torch.tensor(True), 1, 4, 4)
    with pytest.raises(TypeError, match="scale must be a number, got bool"):
        based.taylor_feature_map(np.ones((2, 3), np.float32), scale=torch.tensor(True))


def test_eps_is_not_a_bool():
    q = np.ones((1, 2, 1, 3), np.float32)
    with pytest.raises(TypeError, match="eps must be a number, got bool"):
        based.linear_attention_prefill(q, q, q, eps=True)


@pytest.mark.parametrize("shape,exc,message", [
    ((1.5,), TypeError, r"shape\[0\] must be an int, got float"),
    (("2",), TypeError, r"shape\[0\] must be an int, got str"),
    (("a",), TypeError, r"shape\[0\] must be an int, got str"),
    ((2, True), TypeError, r"shape\[1\] must be an int, got bool"),
    ((2, -1), ValueError, r"shape\[1\] must be >= 0, got -1"),
    ("23", TypeError, r"shape must be a sequence of ints, got str"),
    (None, TypeError, r"shape must be a sequence of ints, got NoneType"),
])
def test_zeros_shape_is_integers(shape, exc, message):
    with pytest.raises(exc, match=message):
        based.zeros(shape)


def test_zeros_shape_accepts_integer_scalars():
    assert based.zeros((np.int64(2), 3)).shape == (2, 3)
    assert based.zeros(4).shape == (4,)                # an int is a 1-D shape, as in numpy
    assert based.zeros(()).shape == ()
