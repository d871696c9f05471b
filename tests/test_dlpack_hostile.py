"""A hostile or buggy DLPack producer (issue 10, items 4 and 9).

* An error raised for one argument survives the release of the arguments imported before
  it, even when their deleters run Python code (as a ctypes deleter always does), and each
  tensor is given back exactly once.
* Protocol failures name the argument they concern (q, state.kv, ...), also when found
  by the Python layer's first look at an array (``_C.dlpack_info``).
"""

import gc
import sys

import numpy as np
import pytest
from conftest import RawProducer, requires_torch, torch

import based
from based import _C
from based import reference as ref


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


def _window_args(q=None, k=None):
    B, T, H, D, W = 1, 2, 1, 4, 3
    return [q if q is not None else _q((B, T, H, D)), k if k is not None else _q((B, T, H, D)), _q((B, T, H, D)),
            np.zeros((B, H, W, D)), np.zeros((B, H, W, D)), np.zeros(B, np.int64), np.zeros((B, T, H, D)), W, 0.5]


# ---------------------------------------------------------------------------------------
# Item 4: the pending error survives every release; each tensor is released once
# ---------------------------------------------------------------------------------------


def _python_work():
    """What a deleter written in Python may do: allocate, format, call into based."""
    _C.dlpack_info(np.zeros(3))
    return repr({"a": [1.5, 2]})


@pytest.mark.parametrize("on_delete", [None, _python_work], ids=["counting-deleter", "deleter-calls-based"])
@pytest.mark.parametrize("case", ["list-as-out", "readonly-out", "list-as-k", "window-list-as-k", "gather-list"])
def test_error_in_a_later_argument_survives_releasing_the_earlier_ones(case, on_delete):
    """Before the fix: the earlier capsule's (Python) deleter ran with the error pending,
    lost it, and the user got SystemError ('returned NULL without setting an exception')."""
    first = RawProducer(np.ones((2, 3)), on_delete=on_delete)
    others = []
    if case == "list-as-out":
        call, exc, msg = lambda: _C.taylor_feature_map(first, [1.0, 2.0], 1.0), TypeError, r"^out must be an array"
    elif case == "readonly-out":
        ro = RawProducer(np.zeros((2, 10)), readonly=True, on_delete=on_delete)
        others.append(ro)
        call, exc, msg = lambda: _C.taylor_feature_map(first, ro, 1.0), ValueError, r"^out is read-only"
    elif case == "list-as-k":
        first = RawProducer(_q((1, 2, 1, 2)), on_delete=on_delete)
        args = _linear_args(q=first, k=[[1.0]])
        call, exc, msg = lambda: _C.linear_attention_prefill(*args), TypeError, r"^k must be an array"
    elif case == "window-list-as-k":
        first = RawProducer(_q((1, 2, 1, 4)), on_delete=on_delete)
        args = _window_args(q=first, k=[[1.0]])
        call, exc, msg = lambda: _C.sliding_window_prefill(*args), TypeError, r"^k must be an array"
    else:
        first = RawProducer(np.zeros((2, 3)), on_delete=on_delete)
        src = RawProducer(np.zeros((2, 3)), on_delete=on_delete)
        others.append(src)
        call, exc, msg = lambda: _C.state_gather(first, src, [0, 1]), TypeError, r"^batch_indices must be an array"
    for _ in range(3):
        with pytest.raises(exc, match=msg):
            call()
    assert first.exported == 3 and _freed(first, *others)


def test_a_deleter_that_calls_based_does_not_replace_the_error_message():
    """The C core's message lives in a per-thread buffer: a deleter that calls a based op
    which fails (and catches it) overwrote it before the error was raised."""
    def clobber():
        try:
            _C.taylor_feature_map(np.ones((2, 3), np.int64), np.zeros((2, 10)), 1.0)
        except TypeError as e:
            assert str(e).startswith("x must have dtype")

    p = RawProducer(np.ones((2, 3)), on_delete=clobber)
    with pytest.raises(ValueError, match=r"^out must have shape"):
        _C.taylor_feature_map(p, np.zeros((2, 9)), 1.0)
    assert _freed(p)


def test_a_deleter_that_leaves_an_exception_set_is_reported_as_unraisable(monkeypatch):
    """A C deleter that sets an exception and returns (here PyErr_NoMemory, called through the
    deleter's void(void *) pointer: the extra argument is ignored by the x86-64 and AArch64
    calling conventions). DLPack deleters cannot fail, so it goes to sys.unraisablehook and
    the call's own result or error stands."""
    import ctypes
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    nomem = ctypes.cast(ctypes.pythonapi.PyErr_NoMemory, ctypes.c_void_p).value
    x = np.ones((2, 3))
    out = np.zeros((2, 10))
    assert _C.taylor_feature_map(RawProducer(x, c_deleter=nomem), out, 1.0) is None
    np.testing.assert_allclose(out, ref.taylor_feature_map(x, 1.0), rtol=1e-12)
    assert seen == [MemoryError]
    with pytest.raises(TypeError, match="^out must be an array"):
        _C.taylor_feature_map(RawProducer(x, c_deleter=nomem), [1.0], 1.0)
    assert seen == [MemoryError, MemoryError]


def test_a_capsule_destructor_running_python_keeps_the_refusal():
    """A refused capsule goes back unrenamed: its destructor (Python code here) frees it and
    the refusal (TypeError naming the argument) stands."""
    p = RawProducer(np.ones((2, 3)), major=2, on_delete=_python_work)
    with pytest.raises(TypeError, match=r"^x was exported with DLPack 2.0"):
        _C.taylor_feature_map(p, np.zeros((2, 10)), 1.0)
    assert _freed(p)


@requires_torch
def test_exchange_api_fast_path_releases_once_under_a_pending_error():
    if not hasattr(torch.Tensor, "__dlpack_c_exchange_api__"):
        pytest.skip("this torch has no DLPack C exchange API")
    x = torch.ones(2, 3, dtype=torch.float64)
    before = x._use_count() if hasattr(x, "_use_count") else None
    for _ in range(100):
        with pytest.raises(TypeError, match="^out must be an array"):
            _C.taylor_feature_map(x, [1.0], 1.0)
        with pytest.raises(ValueError, match="^out must have shape"):
            _C.taylor_feature_map(x, torch.zeros(2, 9, dtype=torch.float64), 1.0)
    if before is not None:
        assert x._use_count() == before


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
