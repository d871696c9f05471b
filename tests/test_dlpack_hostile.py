"""A hostile or buggy DLPack producer (issue 10, item 9).

* Protocol failures name the argument they concern (q, state.kv, ...), also when found
  by the Python layer's first look at an array (``_C.dlpack_info``).
"""

import gc

import numpy as np
import pytest
from conftest import RawProducer

import based
from based import _C


def _x():
    return np.random.default_rng(0).standard_normal((2, 3))


def _freed(*producers):
    gc.collect()
    return all(p.deleted == p.exported for p in producers)


def _q(shape):
    return np.random.default_rng(1).standard_normal(shape)


def _linear_args(q=None, k=None, kv=None):
    B, T, H, Dk, Dv = 1, 2, 1, 2, 3
    F = 1 + Dk + Dk * (Dk + 1) // 2
    return [q if q is not None else _q((B, T, H, Dk)), k if k is not None else _q((B, T, H, Dk)),
            _q((B, T, H, Dv)), kv if kv is not None else np.zeros((B, H, F, Dv)), np.zeros((B, H, F)),
            np.zeros(B, np.int64), np.zeros((B, T, H, Dv)), 0.5, True, 1e-6, 0]


# ---------------------------------------------------------------------------------------
# Item 9: protocol failures name the argument
# ---------------------------------------------------------------------------------------


def test_newer_major_version_names_the_argument_at_every_entry():
    x = _x()
    with pytest.raises(TypeError, match=r"^x was exported with DLPack 2.0; based reads major version 1$"):
        based.taylor_feature_map(RawProducer(x, major=2))
    args = _linear_args(q=RawProducer(_q((1, 2, 1, 2)), major=2))
    with pytest.raises(TypeError, match=r"^q was exported with DLPack 2.0"):
        based.linear_attention_prefill(*args[:3])
    with pytest.raises(TypeError, match=r"^q was exported with DLPack 2.0"):
        _C.linear_attention_prefill(*args)
    args = _linear_args(kv=RawProducer(np.zeros((1, 1, 6, 3)), major=2))
    with pytest.raises(TypeError, match=r"^state.kv was exported with DLPack 2.0"):
        _C.linear_attention_prefill(*args)
    with pytest.raises(TypeError, match=r"^kv was exported with DLPack 2.0"):
        based.LinearAttentionState.from_expanded(RawProducer(np.zeros((1, 1, 7, 3)), major=2),
                                                 np.zeros((1, 1, 7)))
    with pytest.raises(TypeError, match=r"^state.kv was exported with DLPack 2.0"):
        _C.dlpack_info(RawProducer(x, major=2), "state.kv")


def test_unsupported_device_names_the_argument():
    p = RawProducer(_x(), device=(4, 0))
    with pytest.raises(ValueError, match=r"^x is on DLPack device type 4 \(id 0\); based takes CPU and CUDA"):
        based.taylor_feature_map(p)


def test_missing_dlpack_device_names_the_argument():
    class NoDevice:
        def __dlpack__(self, **kw):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match=r"^x has __dlpack__ but no __dlpack_device__"):
        based.taylor_feature_map(NoDevice())
    with pytest.raises(TypeError, match=r"^out has __dlpack__ but no __dlpack_device__"):
        _C.taylor_feature_map(np.ones((2, 3)), NoDevice(), 1.0)


def test_dlpack_info_takes_the_name_and_checks_it():
    with pytest.raises(TypeError, match=r"dlpack_info\(\) takes 1 or 2 positional arguments, got 3"):
        _C.dlpack_info(np.ones(2), "x", "y")
    with pytest.raises(TypeError, match=r"name must be a str, got int"):
        _C.dlpack_info(np.ones(2), 3)
    assert _C.dlpack_info(np.ones(2), "x") == ((2,), "float64", (1, 0), False)
