"""Every error path of the foundation (SPEC 4): the right exception type, a message that
names the argument, the expected and the given, and nothing written on failure."""

import numpy as np
import pytest
from conftest import requires_torch, torch

import based
from based import _C


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)


def untouched(out):
    """A sentinel-filled out buffer and a check that it kept every byte."""
    out[...] = 7.0
    return lambda: np.all(out == 7.0)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        ({"out": np.zeros((3, 15), np.float64)}, TypeError, r"out must have the dtype of x \(float32\), got float64"),
        ({"out": np.zeros((3, 14), np.float32)}, ValueError, r"out must have shape \(d0=3, F=15\), got \(3, 14\)"),
        ({"out": np.zeros((2, 15), np.float32)}, ValueError, r"out must have shape \(d0=3, F=15\), got \(2, 15\)"),
        ({"out": np.zeros((3, 1, 15), np.float32)}, ValueError, r"out must have 2 dimensions .* got 3 dimensions"),
        ({"scale": -1.0}, ValueError, r"scale must be a finite number > 0, got -1"),
        ({"scale": 0.0}, ValueError, r"scale must be a finite number > 0, got 0"),
        ({"scale": float("nan")}, ValueError, r"scale must be a finite number > 0, got nan"),
        ({"scale": float("inf")}, ValueError, r"scale must be a finite number > 0, got inf"),
        ({"scale": "big"}, TypeError, r"scale must be a number, got str"),
    ],
    ids=["out-dtype", "out-last-dim", "out-lead-dim", "out-ndim", "scale-negative", "scale-zero", "scale-nan",
         "scale-inf", "scale-type"],
)
def test_feature_map_errors_leave_out_untouched(x, kwargs, exc, message):
    out = kwargs.get("out", np.empty((3, 15), np.float32))
    kwargs = {**kwargs, "out": out}
    ok = untouched(out)
    with pytest.raises(exc, match=message):
        based.taylor_feature_map(x, **kwargs)
    assert ok()


def test_out_overlapping_x_or_itself(x):
    buf = np.zeros(200, np.float32)
    xin = buf[:12].reshape(3, 4)
    xin[...] = x
    with pytest.raises(ValueError, match="out shares memory with x"):
        based.taylor_feature_map(xin, out=buf[5:50].reshape(3, 15))
    assert np.all(buf[12:] == 0)
    overlapping = np.lib.stride_tricks.as_strided(np.zeros(20, np.float32), (3, 15), (4, 4))
    with pytest.raises(ValueError, match="out has overlapping memory"):
        based._C.taylor_feature_map(x, overlapping, 0.5)


def test_bad_shapes_of_x():
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., Dk\) with Dk >= 1, got \(3, 0\)"):
        based.taylor_feature_map(np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., Dk\) with Dk >= 1, got \(\)"):
        based.taylor_feature_map(np.zeros((), np.float32))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        based._C.taylor_feature_map(np.zeros((), np.float32), np.zeros((), np.float32), 1.0)


def test_bad_dtypes_of_x():
    for dt in (np.int32, np.int64, np.bool_, np.complex64):
        with pytest.raises(TypeError, match=f"x must have dtype one of float32, float64, float16, bfloat16, got "
                                            f"{np.dtype(dt).name}"):
            based.taylor_feature_map(np.zeros((2, 3), dt))


def test_fastcall_argument_errors():
    with pytest.raises(TypeError, match=r"taylor_feature_map\(\) takes 3 positional arguments, got 2"):
        based._C.taylor_feature_map(np.zeros(3), np.zeros(10))


def test_state_helper_errors():
    t = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="batch index 3 is out of range for batch size 3"):
        _C.state_zero(t, np.array([0, 3]))
    assert np.all(t == 1)                          # nothing zeroed: checked before writing
    with pytest.raises(TypeError, match="batch_indices must have dtype int64, got float32"):
        _C.state_zero(t, np.array([0.0], np.float32))
    with pytest.raises(ValueError, match=r"batch_indices must be 1-D"):
        _C.state_zero(t, np.zeros((1, 1), np.int64))
    with pytest.raises(ValueError, match=r"copy_: src has shape \(3, 5\), which does not match dst \(3, 4\)"):
        _C.state_copy(t, np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match=r"src must have the dtype of dst \(float32\), got int64"):
        _C.state_copy(t, np.zeros((3, 4), np.int64))
    with pytest.raises(TypeError, match=r"src must have the dtype of dst \(float32\), got float64"):
        _C.state_gather(t, np.zeros((3, 4)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="index_select: 2 batch indices given for a destination of batch size 3"):
        _C.state_gather(t, t.copy(), np.array([0, 1]))
    assert np.all(t == 1)


def test_state_helpers_work():
    t = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    orig = t.copy()
    _C.state_zero(t, np.array([1, -1]))
    assert np.all(t[[1, 3]] == 0) and np.all(t[[0, 2]] == orig[[0, 2]])
    src = orig.transpose(0, 2, 1).copy().transpose(0, 2, 1)   # same values, other strides
    _C.state_copy(t, src)
    np.testing.assert_array_equal(t, orig)
    _C.state_gather(t, t, np.array([3, 3, 0, 1]))              # in place, with repeats
    np.testing.assert_array_equal(t, orig[[3, 3, 0, 1]])
    small = np.zeros((2, 3, 2), np.float32)
    _C.state_gather(small, orig, np.array([2, 0]))
    np.testing.assert_array_equal(small, orig[[2, 0]])
    _C.state_zero(t, None)
    assert not t.any()
    half = np.empty((4, 3, 2), np.float16)
    _C.state_copy(half, orig)                                  # float32 -> float16, rounded
    np.testing.assert_array_equal(half, orig.astype(np.float16))


@requires_torch
def test_state_helpers_bfloat16_and_int64():
    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    _C.state_gather(t, t, np.array([2, 1, 0]))
    assert t[0, 0].item() == 8.0
    n = torch.arange(3)
    _C.state_zero(n, np.array([1]))
    assert n.tolist() == [0, 0, 2]


def test_bad_buffer_requests():
    with pytest.raises(TypeError, match="dtype must be one of"):
        based.zeros((2,), "int8")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        based.zeros((2,), device="tpu")
    with pytest.raises(ValueError, match=r"shape\[0\] must be >= 0, got -1"):
        based.zeros((-1, 2))
    with pytest.raises(ValueError, match="overflows"):
        based.zeros((2**40, 2**40))
    if not based.build_info()["cuda"]:
        with pytest.raises(NotImplementedError, match="built without CUDA"):
            based.zeros((2,), device="cuda")
