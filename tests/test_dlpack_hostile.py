"""A hostile or buggy DLPack producer (issue 10, items 3, 4 and 9).

* Every field of an imported DLTensor is checked before the bindings read through it
  (ndim before shape, shape and strides, dtype code, bits and lanes, data + byte_offset,
  device): a bad one is a ValueError (TypeError for the dtype) naming the argument --
  never an over-read, a crash or a SystemError. Shape arrays that end at an unreadable
  guard page turn any over-read into SIGSEGV; those cases run in a child process so a
  regression fails one test instead of killing the run.
* An error raised for one argument survives the release of the arguments imported before
  it, even when their deleters run Python code (as a ctypes deleter always does), and each
  tensor is given back exactly once.
* Protocol failures name the argument they concern (q, state.kv, ...), also when found
  by the Python layer's first look at an array (``_C.dlpack_info``).
"""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ExchangeProducer, RawProducer, requires_guard_pages, requires_torch, torch

import based
from based import _C
from based import reference as ref

TESTS = os.path.dirname(os.path.abspath(__file__))


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
            np.zeros(B, np.int64), np.zeros((B, T, H, Dv)), 0.5, True, 1e-6, 0, None]


def _window_args(q=None, k=None):
    B, T, H, D, W = 1, 2, 1, 4, 3
    return [q if q is not None else _q((B, T, H, D)), k if k is not None else _q((B, T, H, D)), _q((B, T, H, D)),
            np.zeros((B, H, W, D)), np.zeros((B, H, W, D)), np.zeros(B, np.int64), np.zeros((B, T, H, D)), W, 0.5,
            None]


# ---------------------------------------------------------------------------------------
# Item 3: every field bounded and validated before it is used
# ---------------------------------------------------------------------------------------


def _outcomes_in_child(cases: str) -> dict:
    """Runs ``cases`` (source defining a list ``cases`` of (label, call)) in a child Python
    with numpy, based, _C and RawProducer imported, and returns {label: outcome}, where the
    outcome is the call's repr or "ExceptionType: message". For calls that crashed the
    interpreter before the checks existed: a regression fails the test, not the run."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, {tests!r})
        import numpy as np
        import based
        from based import _C
        from conftest import ExchangeProducer, RawProducer
    """).format(tests=TESTS) + textwrap.dedent(cases) + textwrap.dedent("""
        for label, call in cases:
            try:
                r = call()
                print(label, "->", repr(r), flush=True)
            except Exception as e:
                print(label, "->", type(e).__name__ + ":", e, flush=True)
    """)
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"the child died (rc {r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}"
    return dict(line.split(" -> ", 1) for line in r.stdout.splitlines())


@requires_guard_pages
def test_huge_ndim_or_null_shape_at_a_guard_page_is_refused_before_any_read():
    """The shape (and strides) arrays hold 2 entries and end at a PROT_NONE page; the
    tensor claims more dimensions, or has no shape array at all. Before the fix the
    bindings read shape[0..ndim) first: SIGSEGV (a heap over-read under ASan)."""
    got = _outcomes_in_child("""
        x = np.ones((2, 3))
        cases = [
            ("control", lambda: _C.dlpack_info(RawProducer(x, guard=True))),
            ("info-1000", lambda: _C.dlpack_info(RawProducer(x, guard=True, ndim=1000), "q")),
            ("info-max", lambda: _C.dlpack_info(RawProducer(x, guard=True, ndim=2**31 - 1), "q")),
            ("info-17", lambda: _C.dlpack_info(RawProducer(x, guard=True, ndim=17), "q")),
            ("info-null", lambda: _C.dlpack_info(RawProducer(x, shape="null"), "q")),
            ("api-1000", lambda: based.taylor_feature_map(RawProducer(x, guard=True, ndim=1000))),
            ("op-1000", lambda: _C.taylor_feature_map(RawProducer(x, guard=True, ndim=1000),
                                                      np.zeros((2, 10)), 1.0, None)),
            ("op-null", lambda: _C.taylor_feature_map(np.ones((2, 3)), RawProducer(np.zeros((2, 10)),
                                                      shape="null"), 1.0, None)),
        ]
    """)
    assert got["control"] == "((2, 3), 'float64', (1, 0), False)"   # the guard itself is not in the way
    for label, n in [("info-1000", 1000), ("info-max", 2**31 - 1), ("info-17", 17)]:
        assert got[label] == f"ValueError: q: DLTensor.ndim is {n}; based takes 0 to 16 dimensions", got
    assert got["info-null"] == "ValueError: q: DLTensor.shape is NULL for ndim 2", got
    assert got["api-1000"] == "ValueError: x: DLTensor.ndim is 1000; based takes 0 to 16 dimensions", got
    assert got["op-1000"] == "ValueError: x: DLTensor.ndim is 1000; based takes 0 to 16 dimensions", got
    assert got["op-null"] == "ValueError: out: DLTensor.shape is NULL for ndim 2", got


def test_negative_ndim_is_a_value_error_naming_the_argument():
    p = RawProducer(_x(), ndim=-1)
    with pytest.raises(ValueError, match=r"^x: DLTensor.ndim is -1; based takes 0 to 16 dimensions$"):
        based.taylor_feature_map(p)                     # was SystemError (PyTuple_New(-1))
    with pytest.raises(ValueError, match=r"^array: DLTensor.ndim is -1"):
        _C.dlpack_info(p)
    assert _freed(p)


@pytest.mark.parametrize("shape,message", [
    ((2, -3), r"^x: dimension 1 has negative size -3$"),
    ((2**40, 2**40), r"^x: element count overflows 64-bit indexing \(dimension 1 of size 1099511627776\)$"),
])
def test_bad_sizes_are_refused_by_the_import(shape, message):
    p = RawProducer(_x(), shape=shape)
    with pytest.raises(ValueError, match=message):
        _C.dlpack_info(p, "x")
    with pytest.raises(ValueError, match=message):
        based.taylor_feature_map(p)
    assert _freed(p)


@pytest.mark.parametrize("strides,message", [
    ((1, 2**62), r"^x: strides address memory beyond 64-bit indexing \(axis 1, stride 4611686018427387904\)$"),
    ((2**61, 1), r"^x: byte extent overflows 64-bit indexing$"),
])
def test_strides_beyond_64_bit_indexing_are_refused(strides, message):
    p = RawProducer(_x(), strides=strides)
    with pytest.raises(ValueError, match=message):
        _C.dlpack_info(p, "x")
    assert _freed(p)


def test_data_plus_byte_offset_must_not_wrap_around_the_address_space():
    """data = address - 2**63 (mod 2**64), byte_offset = 2**63: the sum wraps around."""
    x = _x()
    p = RawProducer(x, byte_offset=2**63)
    with pytest.raises(ValueError, match=r"^x: data \+ byte_offset .* wraps around the address space$"):
        based.taylor_feature_map(p)
    with pytest.raises(ValueError, match=r"^x: data \+ byte_offset"):
        _C.taylor_feature_map(p, np.zeros((2, 10)), 1.0, None)
    assert _freed(p)


def test_extent_must_not_wrap_around_the_address_space():
    """A start address near the top of the address space whose last elements lie past it:
    before the fix the op read (and wrote) there (SIGSEGV)."""
    got = _outcomes_in_child("""
        cases = [
            ("info", lambda: _C.dlpack_info(RawProducer(np.ones((2, 3)), data=2**64 - 16), "x")),
            ("read", lambda: _C.taylor_feature_map(RawProducer(np.ones((2, 3)), data=2**64 - 16),
                                                   np.zeros((2, 10)), 1.0, None)),
            ("write", lambda: _C.taylor_feature_map(np.ones((2, 3)), RawProducer(np.zeros((2, 10)),
                                                    data=2**64 - 64), 1.0, None)),
        ]
    """)
    want = "ValueError: {}: its elements span {} bytes from data + byte_offset = 0x{:x}, which wraps around " \
           "the address space"
    assert got["info"] == want.format("x", 48, 2**64 - 16), got
    assert got["read"] == want.format("x", 48, 2**64 - 16), got
    assert got["write"] == want.format("out", 160, 2**64 - 64), got


def test_null_data_for_a_non_empty_tensor_is_refused():
    p = RawProducer(_x(), data=0)
    with pytest.raises(ValueError, match=r"^x: data pointer is NULL for a non-empty tensor$"):
        _C.dlpack_info(p, "x")
    assert _freed(p)
    # NULL data is fine when there are no elements
    e = RawProducer(np.zeros((0, 3)), data=0)
    assert _C.dlpack_info(e, "x")[0] == (0, 3)


@pytest.mark.parametrize("declared,actual,message", [
    ((1, 0), (2, 0), r"^x: __dlpack__\(\) exported a tensor on DLPack device \(2, 0\), but "
                     r"__dlpack_device__\(\) said \(1, 0\)$"),
    ((1, 0), (1, 3), r"^x: __dlpack__\(\) exported a tensor on DLPack device \(1, 3\)"),
    ((1, -1), (1, -1), r"^x.__dlpack_device__\(\) returned device id -1; DLPack device ids are 0 to 2147483647$"),
    ((1, 2**31), (1, 0), r"^x.__dlpack_device__\(\) returned device id 2147483648;"),
])
def test_the_tensor_device_is_checked(declared, actual, message):
    p = RawProducer(_x(), device=declared, tensor_device=actual)
    with pytest.raises(ValueError, match=message):
        _C.dlpack_info(p, "x")
    with pytest.raises(ValueError, match=message):
        based.taylor_feature_map(p)
    assert _freed(p)


@pytest.mark.parametrize("code,bits,lanes,message", [
    (99, 32, 1, r"^x has DLPack dtype code 99, which DLPack 1.3 does not define \(codes 0 to 17\)$"),
    (2, 32, 4, r"^x has DLPack dtype float32 with 4 lanes; based takes one element per lane \(lanes = 1\)$"),
    (2, 32, 0, r"^x has DLPack dtype float32 with 0 lanes;"),
    (2, 0, 1, r"^x has a DLPack dtype of 0 bits \(code 2\)$"),
])
def test_malformed_or_vector_dtypes_are_type_errors_naming_the_argument(code, bits, lanes, message):
    p = RawProducer(np.ones((2, 3), np.float32), code=code, bits=bits, lanes=lanes)
    with pytest.raises(TypeError, match=message):
        _C.dlpack_info(p, "x")
    with pytest.raises(TypeError, match=message):
        based.taylor_feature_map(p)
    with pytest.raises(TypeError, match=message):
        _C.taylor_feature_map(p, np.zeros((2, 10), np.float32), 1.0, None)
    assert _freed(p)


def test_valid_but_unsupported_dtypes_still_reach_the_ops_check():
    """int32, float8 and complex are well-formed DLPack: the import describes them and the
    op refuses them with its list of dtypes (as before)."""
    p = RawProducer(np.ones((2, 3), np.int32))
    assert _C.dlpack_info(p, "x")[1] == "int32"
    with pytest.raises(TypeError, match=r"x must have dtype one of .*, got int32"):
        based.taylor_feature_map(p)
    assert _freed(p)


def test_the_exchange_api_fast_path_is_taken_for_a_valid_tensor():
    """The control for the fast-path tests below: a valid host tensor comes through the C
    exchange table, not __dlpack__, and is given back once."""
    x = _x()
    p = ExchangeProducer(x)
    assert _C.dlpack_info(p, "x") == ((2, 3), "float64", (1, 0), False)
    out = np.zeros((2, 10))
    assert _C.taylor_feature_map(p, out, 1.0, None) is None
    np.testing.assert_allclose(out, ref.taylor_feature_map(x, 1.0), rtol=1e-12)
    assert p.exchanged == p.exported == 2 and _freed(p)
    f = ExchangeProducer(x, exchange_fails=True)      # a failing table: __dlpack__ instead
    assert _C.dlpack_info(f, "x")[0] == (2, 3) and f.exchanged == 0 and f.exported == 1 and _freed(f)


@requires_guard_pages
def test_the_exchange_api_fast_path_checks_every_field():
    """A tensor handed over through the C exchange table (torch's fast path) is checked like
    a capsule's: before the fix the fast path took it unchecked, and dlpack_info read
    shape[0..1000) into the guard page, or the op read from and wrote to addresses past
    the top of the address space (SIGSEGV). Refused, it is given back at once and
    __dlpack__ is asked instead, whose refusal names the argument."""
    got = _outcomes_in_child("""
        import gc
        x = np.ones((2, 3))
        made = []
        def producer(a, **kw):
            made.append(ExchangeProducer(a, **kw))
            return made[-1]
        cases = [
            ("info-1000", lambda: _C.dlpack_info(producer(x, guard=True, ndim=1000), "q")),
            ("info-neg", lambda: _C.dlpack_info(producer(x, ndim=-1), "q")),
            ("info-lanes", lambda: _C.dlpack_info(producer(x, lanes=4), "q")),
            ("api-1000", lambda: based.taylor_feature_map(producer(x, guard=True, ndim=1000))),
            ("read", lambda: _C.taylor_feature_map(producer(x, data=2**64 - 16), np.zeros((2, 10)), 1.0, None)),
            ("write", lambda: _C.taylor_feature_map(x, producer(np.zeros((2, 10)), data=2**64 - 64), 1.0, None)),
            ("counts", lambda: (gc.collect(), [(p.exchanged, p.exported, p.deleted) for p in made])[1]),
        ]
    """)
    ndim = "ValueError: {}: DLTensor.ndim is {}; based takes 0 to 16 dimensions"
    assert got["info-1000"] == ndim.format("q", 1000), got
    assert got["info-neg"] == ndim.format("q", -1), got
    assert got["info-lanes"] == "TypeError: q has DLPack dtype float64 with 4 lanes; based takes one element per " \
                               "lane (lanes = 1)", got
    assert got["api-1000"] == ndim.format("x", 1000), got
    wraps = "ValueError: {}: its elements span {} bytes from data + byte_offset = 0x{:x}, which wraps around " \
            "the address space"
    assert got["read"] == wraps.format("x", 48, 2**64 - 16), got
    assert got["write"] == wraps.format("out", 160, 2**64 - 64), got
    # each: one tensor through the table, refused and deleted; one capsule, refused and freed
    assert got["counts"] == repr([(1, 2, 2)] * 6), got


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
        call, exc, msg = (lambda: _C.taylor_feature_map(first, [1.0, 2.0], 1.0, None), TypeError,
                          r"^out must be an array")
    elif case == "readonly-out":
        ro = RawProducer(np.zeros((2, 10)), readonly=True, on_delete=on_delete)
        others.append(ro)
        call, exc, msg = lambda: _C.taylor_feature_map(first, ro, 1.0, None), ValueError, r"^out is read-only"
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
        call, exc, msg = (lambda: _C.state_gather(first, src, [0, 1], None), TypeError,
                          r"^batch_indices must be an array")
    for _ in range(3):
        with pytest.raises(exc, match=msg):
            call()
    assert first.exported == 3 and _freed(first, *others)


def test_a_deleter_that_calls_based_does_not_replace_the_error_message():
    """The C core's message lives in a per-thread buffer: a deleter that calls a based op
    which fails (and catches it) overwrote it before the error was raised."""
    def clobber():
        try:
            _C.taylor_feature_map(np.ones((2, 3), np.int64), np.zeros((2, 10)), 1.0, None)
        except TypeError as e:
            assert str(e).startswith("x must have dtype")

    p = RawProducer(np.ones((2, 3)), on_delete=clobber)
    with pytest.raises(ValueError, match=r"^out must have shape"):
        _C.taylor_feature_map(p, np.zeros((2, 9)), 1.0, None)
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
    assert _C.taylor_feature_map(RawProducer(x, c_deleter=nomem), out, 1.0, None) is None
    np.testing.assert_allclose(out, ref.taylor_feature_map(x, 1.0), rtol=1e-12)
    assert seen == [MemoryError]
    with pytest.raises(TypeError, match="^out must be an array"):
        _C.taylor_feature_map(RawProducer(x, c_deleter=nomem), [1.0], 1.0, None)
    assert seen == [MemoryError, MemoryError]


def test_a_capsule_destructor_running_python_keeps_the_refusal():
    """A refused capsule goes back unrenamed: its destructor (Python code here) frees it and
    the refusal (TypeError naming the argument) stands."""
    p = RawProducer(np.ones((2, 3)), major=2, on_delete=_python_work)
    with pytest.raises(TypeError, match=r"^x was exported with DLPack 2.0"):
        _C.taylor_feature_map(p, np.zeros((2, 10)), 1.0, None)
    assert _freed(p)


@requires_torch
def test_exchange_api_fast_path_releases_once_under_a_pending_error():
    if not hasattr(torch.Tensor, "__dlpack_c_exchange_api__"):
        pytest.skip("this torch has no DLPack C exchange API")
    x = torch.ones(2, 3, dtype=torch.float64)
    before = x._use_count() if hasattr(x, "_use_count") else None
    for _ in range(100):
        with pytest.raises(TypeError, match="^out must be an array"):
            _C.taylor_feature_map(x, [1.0], 1.0, None)
        with pytest.raises(ValueError, match="^out must have shape"):
            _C.taylor_feature_map(x, torch.zeros(2, 9, dtype=torch.float64), 1.0, None)
    if before is not None:
        assert x._use_count() == before


@pytest.mark.parametrize("on_delete", [None, _python_work], ids=["counting-deleter", "deleter-calls-based"])
def test_exchange_api_tensor_released_once_under_a_later_arguments_error(on_delete):
    """The earlier argument came through the C exchange table and its deleter is Python
    code: the later argument's error survives its release (before the fix: SystemError)."""
    p = ExchangeProducer(np.ones((2, 3)), on_delete=on_delete)
    for _ in range(3):
        with pytest.raises(TypeError, match=r"^out must be an array"):
            _C.taylor_feature_map(p, [1.0, 2.0], 1.0, None)
        with pytest.raises(ValueError, match=r"^out must have shape"):
            _C.taylor_feature_map(p, np.zeros((2, 9)), 1.0, None)
    assert p.exchanged == p.exported == 6 and _freed(p)


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


def _state_with(part, producer):
    """A state (or cache) one of whose tensors is ``producer``: what a state built from
    another library's arrays holds (the constructor is internal; the public ones allocate)."""
    if part in ("kv", "ksum", "tokens"):
        tensors = {"kv": np.zeros((1, 1, 6, 3)), "ksum": np.zeros((1, 1, 6)), "tokens": np.zeros(1, np.int64)}
        cls, settings = based.LinearAttentionState, {"scale": 0.5}
    else:
        tensors = {"k": np.zeros((1, 1, 3, 4)), "v": np.zeros((1, 1, 3, 4)), "tokens": np.zeros(1, np.int64)}
        cls, settings = based.SlidingWindowCache, {"window": 3, "scale": 0.5}
    tensors[part] = producer
    return cls(tensors, settings)


@pytest.mark.parametrize("part,name", [("kv", "state.kv"), ("k", "cache.k")])
@pytest.mark.parametrize("method", ["repr", "device", "reset", "save", "clone"])
def test_state_methods_name_the_part_in_dlpack_errors(part, name, method, tmp_path):
    """The Python layer's own looks at a state's tensors (dtype, device, read-only flag)
    name the part, as the ops do: before, these said "array" (or "state")."""
    shape = (1, 1, 6, 3) if part == "kv" else (1, 1, 3, 4)
    state = _state_with(part, RawProducer(np.zeros(shape), major=2))
    call = {"repr": lambda: repr(state), "device": lambda: state.device, "reset": state.reset,
            "save": lambda: state.save(tmp_path / "s.npz"), "clone": state.clone}[method]
    with pytest.raises(TypeError, match=rf"^{name} was exported with DLPack 2.0; based reads major version 1$"):
        call()


@pytest.mark.parametrize("part,name", [("kv", "state.kv"), ("ksum", "state.ksum"), ("v", "cache.v"),
                                       ("tokens", "state.tokens")])
@pytest.mark.parametrize("method", ["reset", "save", "clone", "index_select", "copy_", "copy_-other"])
def test_state_methods_name_every_part_in_dlpack_errors(part, name, method, tmp_path):
    """Also a part other than the first, which only the C state helpers (whose own names
    are dst and src) would otherwise import."""
    shapes = {"kv": (1, 1, 6, 3), "ksum": (1, 1, 6), "v": (1, 1, 3, 4), "tokens": (1,)}
    dtype = np.int64 if part == "tokens" else np.float64
    state = _state_with(part, RawProducer(np.zeros(shapes[part], dtype), major=2))
    healthy = _state_with(part, np.zeros(shapes[part], dtype))
    call = {"reset": state.reset, "save": lambda: state.save(tmp_path / "s.npz"), "clone": state.clone,
            "index_select": lambda: state.index_select([0]), "copy_": lambda: state.copy_(healthy),
            "copy_-other": lambda: healthy.copy_(state)}[method]
    if method == "copy_-other":
        name = "other's " + name
    with pytest.raises(TypeError, match=rf"^{name} was exported with DLPack 2.0; based reads major version 1$"):
        call()


def test_to_expanded_names_the_part():
    state = _state_with("kv", RawProducer(np.zeros((1, 1, 6, 3)), lanes=2))
    with pytest.raises(TypeError, match=r"^state.kv has DLPack dtype float64 with 2 lanes"):
        state.to_expanded()


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
        _C.taylor_feature_map(np.ones((2, 3)), NoDevice(), 1.0, None)


def test_dlpack_info_takes_the_name_and_checks_it():
    with pytest.raises(TypeError, match=r"dlpack_info\(\) takes 1 or 2 positional arguments, got 3"):
        _C.dlpack_info(np.ones(2), "x", "y")
    with pytest.raises(TypeError, match=r"name must be a str, got int"):
        _C.dlpack_info(np.ones(2), 3)
    assert _C.dlpack_info(np.ones(2), "x") == ((2,), "float64", (1, 0), False)
