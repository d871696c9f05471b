"""Every error path of the foundation (SPEC 4): the right exception type, a message that
names the argument, the expected and the given, and nothing written on failure."""

import numpy as np
import pytest
from conftest import RawProducer, requires_torch, torch

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
        based._C.taylor_feature_map(x, overlapping, 0.5, None)


def test_bad_shapes_of_x():
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., Dk\) with Dk >= 1, got \(3, 0\)"):
        based.taylor_feature_map(np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., Dk\) with Dk >= 1, got \(\)"):
        based.taylor_feature_map(np.zeros((), np.float32))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        based._C.taylor_feature_map(np.zeros((), np.float32), np.zeros((), np.float32), 1.0, None)


def test_bad_dtypes_of_x():
    for dt in (np.int32, np.int64, np.bool_, np.complex64):
        with pytest.raises(TypeError, match=f"x must have dtype one of float32, float64, float16, bfloat16, got "
                                            f"{np.dtype(dt).name}"):
            based.taylor_feature_map(np.zeros((2, 3), dt))


def test_fastcall_argument_errors():
    with pytest.raises(TypeError, match=r"taylor_feature_map\(\) takes 4 positional arguments, got 2"):
        based._C.taylor_feature_map(np.zeros(3), np.zeros(10))


def test_state_helper_errors():
    t = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="batch index 3 is out of range for batch size 3"):
        _C.state_zero(t, np.array([0, 3]), None)
    assert np.all(t == 1)                          # nothing zeroed: checked before writing
    with pytest.raises(TypeError, match="batch_indices must have dtype int64, got float32"):
        _C.state_zero(t, np.array([0.0], np.float32), None)
    with pytest.raises(ValueError, match=r"batch_indices must be 1-D"):
        _C.state_zero(t, np.zeros((1, 1), np.int64), None)
    with pytest.raises(ValueError, match=r"copy_: src has shape \(3, 5\), which does not match dst \(3, 4\)"):
        _C.state_copy(t, np.zeros((3, 5), np.float32), None)
    with pytest.raises(TypeError, match=r"src must have the dtype of dst \(float32\), got int64"):
        _C.state_copy(t, np.zeros((3, 4), np.int64), None)
    with pytest.raises(TypeError, match=r"src must have the dtype of dst \(float32\), got float64"):
        _C.state_gather(t, np.zeros((3, 4)), np.array([0, 1, 2]), None)
    with pytest.raises(ValueError, match="index_select: 2 batch indices given for a destination of batch size 3"):
        _C.state_gather(t, t.copy(), np.array([0, 1]), None)
    assert np.all(t == 1)


def test_state_helpers_work():
    t = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    orig = t.copy()
    _C.state_zero(t, np.array([1, -1]), None)
    assert np.all(t[[1, 3]] == 0) and np.all(t[[0, 2]] == orig[[0, 2]])
    src = orig.transpose(0, 2, 1).copy().transpose(0, 2, 1)   # same values, other strides
    _C.state_copy(t, src, None)
    np.testing.assert_array_equal(t, orig)
    _C.state_gather(t, t, np.array([3, 3, 0, 1]), None)        # in place, with repeats
    np.testing.assert_array_equal(t, orig[[3, 3, 0, 1]])
    small = np.zeros((2, 3, 2), np.float32)
    _C.state_gather(small, orig, np.array([2, 0]), None)
    np.testing.assert_array_equal(small, orig[[2, 0]])
    _C.state_zero(t, None, None)
    assert not t.any()
    half = np.empty((4, 3, 2), np.float16)
    _C.state_copy(half, orig, None)                            # float32 -> float16, rounded
    np.testing.assert_array_equal(half, orig.astype(np.float16))


@requires_torch
def test_state_helpers_bfloat16_and_int64():
    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    _C.state_gather(t, t, np.array([2, 1, 0]), None)
    assert t[0, 0].item() == 8.0
    n = torch.arange(3)
    _C.state_zero(n, np.array([1]), None)
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


# ---------------------------------------------------------------------------------------
# The device rule (SPEC 4) on CUDA tensors, checked on any machine: host memory labelled
# CUDA (DLPack device type 2) goes through every check of the C core, which reads neither
# it nor its token counters; what follows a passed check depends on the build.
# ---------------------------------------------------------------------------------------


def on_cuda(a, **kw):
    return RawProducer(a, device=(2, 0), **kw)


def cuda_calls(tokens0=0):
    """Every op, all tensors host memory labelled cuda:0: (name, call, written arrays). The
    token counters hold tokens0, which the CPU would refuse when negative."""
    rng = np.random.default_rng(3)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    b, t, h, dk, dv, w = 2, 3, 2, 4, 5, 4
    f = 1 + dk + dk * (dk + 1) // 2
    q, k, v, out = f32(b, t, h, dk), f32(b, t, h, dk), f32(b, t, h, dv), f32(b, t, h, dv)
    kv, ksum, tokens = f32(b, h, f, dv), f32(b, h, f), np.full(b, tokens0, np.int64)
    kv_e, ksum_e = f32(b, h, 1 + dk + dk * dk, dv), f32(b, h, 1 + dk + dk * dk)
    kc, vc, x, phi = f32(b, h, w, dk), f32(b, h, w, dk), f32(3, dk), f32(3, f)
    wq, wv, wo = f32(b, t, h, dk), f32(b, t, h, dk), f32(b, t, h, dk)
    c = on_cuda

    def lin(fn, sl, *extra):
        return lambda: fn(c(q[sl]), c(k[sl]), c(v[sl]), c(kv), c(ksum), c(tokens), c(out[sl]), 0.5, True, 1e-6, *extra,
                          None)

    def win(fn, sl):
        return lambda: fn(c(wq[sl]), c(k[sl]), c(wv[sl]), c(kc), c(vc), c(tokens), c(wo[sl]), w, 0.5, None)

    every = (q, k, v, out, kv, ksum, tokens, kv_e, ksum_e, kc, vc, x, phi, wq, wv, wo)
    return every, [
        ("taylor_feature_map", lambda: _C.taylor_feature_map(c(x), c(phi), 0.5, None)),
        ("linear_attention_prefill", lin(_C.linear_attention_prefill, np.s_[:], 0)),
        ("linear_attention_decode", lin(_C.linear_attention_decode, np.s_[:, 0])),
        ("linear_state_to_expanded", lambda: _C.linear_state_to_expanded(c(kv), c(ksum), c(kv_e), c(ksum_e), None)),
        ("linear_state_from_expanded", lambda: _C.linear_state_from_expanded(c(kv_e), c(ksum_e), c(kv), c(ksum), None)),
        ("sliding_window_prefill", win(_C.sliding_window_prefill, np.s_[:])),
        ("sliding_window_decode", win(_C.sliding_window_decode, np.s_[:, 0])),
        ("reset", lambda: _C.state_zero(c(kv), np.array([1]), None)),
        ("copy_", lambda: _C.state_copy(c(kv), kv_e[:, :, :f].copy(), None)),
        ("index_select", lambda: _C.state_gather(c(kv), c(kv_e[:, :, :f].copy()), np.array([1, 0]), None)),
    ]


@pytest.mark.skipif(based.cuda_available(), reason="host memory labelled CUDA must not reach a GPU kernel")
def test_cuda_tensors_pass_the_checks_then_fail_cleanly_without_a_gpu():
    """Token counters of -3 would fail a CPU call: on CUDA the checks leave them to the kernels
    (no device sync). A build without nvcc names itself; a CUDA build on a machine without a
    GPU fails in its CUDA function. Either way nothing is written."""
    arrays, calls = cuda_calls(tokens0=-3)
    before = [a.tobytes() for a in arrays]
    for name, call in calls:
        if based.build_info()["cuda"]:
            with pytest.raises((NotImplementedError, RuntimeError), match=name.rstrip("_") + "|CUDA|cuda"):
                call()
        else:
            with pytest.raises(NotImplementedError, match=rf"this build of based has no CUDA kernel for {name} "
                                                          r"\(it was built without nvcc\)"):
                call()
    assert [a.tobytes() for a in arrays] == before


def test_cuda_reference_twins_refuse_cuda_tensors():
    q, k, v = (np.zeros((1, 2, 1, 4), np.float32) for _ in range(3))
    kv, ksum, tok, out = np.zeros((1, 1, 15, 4), np.float32), np.zeros((1, 1, 15), np.float32), np.zeros(1, np.int64), \
        np.full((1, 2, 1, 4), 7, np.float32)
    c = on_cuda
    with pytest.raises(NotImplementedError, match=r"linear_attention_prefill_ref: q is on cuda:0; the reference twins "
                                                  r"run on the CPU, so pass CPU tensors"):
        _C.linear_attention_prefill_ref(c(q), c(k), c(v), c(kv), c(ksum), c(tok), c(out), 0.5, True, 1e-6, 0, None)
    kc = np.zeros((1, 1, 3, 4), np.float32)
    with pytest.raises(NotImplementedError, match=r"sliding_window_decode_ref: q is on cuda:0; the reference twins"):
        _C.sliding_window_decode_ref(c(q[:, 0]), c(k[:, 0]), c(v[:, 0]), c(kc), c(kc.copy()), c(tok), c(out[:, 0]), 3,
                                     0.5, None)
    assert np.all(out == 7)


def test_cuda_refuses_float64_with_one_message_in_every_build():
    x, phi = np.zeros((3, 4)), np.full((3, 15), 7.0)
    with pytest.raises(TypeError, match=r"^taylor_feature_map: x is float64 on cuda:0; the CUDA kernels compute in "
                                        r"float32, float16 and bfloat16$"):
        _C.taylor_feature_map(on_cuda(x), on_cuda(phi), 0.5, None)
    q, v, out = np.zeros((2, 3, 1, 4)), np.zeros((2, 3, 1, 4)), np.full((2, 3, 1, 4), 7.0)
    kv, ksum, tok = np.zeros((2, 1, 15, 4), np.float32), np.zeros((2, 1, 15), np.float32), np.zeros(2, np.int64)
    c = on_cuda
    with pytest.raises(TypeError, match=r"^linear_attention_prefill: q is float64 on cuda:0; the CUDA kernels"):
        _C.linear_attention_prefill(c(q), c(q), c(v), c(kv), c(ksum), c(tok), c(out), 0.5, True, 1e-6, 0, None)
    with pytest.raises(TypeError, match=r"^linear_attention_decode: state.kv is float64 on cuda:0"):
        _C.linear_attention_decode(c(q[:, 0].astype(np.float32)), c(q[:, 0].astype(np.float32)),
                                   c(v[:, 0].astype(np.float32)), c(kv.astype(np.float64)), c(ksum.astype(np.float64)),
                                   c(tok), c(out[:, 0].astype(np.float32)), 0.5, True, 1e-6, None)
    assert np.all(phi == 7) and np.all(out == 7)


def test_cuda_needs_unit_stride_along_rows():
    x, phi = np.zeros((3, 8), np.float32)[:, ::2], np.full((3, 15), 7.0, np.float32)
    with pytest.raises(ValueError, match=r"^taylor_feature_map: on CUDA, x must have unit stride along its last dim "
                                         r"\(of size 4\), got stride 2; pass \.contiguous\(\)$"):
        _C.taylor_feature_map(on_cuda(x), on_cuda(phi), 0.5, None)
    q = np.zeros((2, 1, 4), np.float32)
    kc = np.zeros((2, 1, 3, 8), np.float32)[..., ::2]
    out, tok = np.full((2, 1, 4), 7.0, np.float32), np.zeros(2, np.int64)
    c = on_cuda
    with pytest.raises(ValueError, match=r"^sliding_window_decode: on CUDA, k_cache must have unit stride along its "
                                         r"last dim \(of size 4\), got stride 2; pass \.contiguous\(\)$"):
        _C.sliding_window_decode(c(q), c(q), c(q), c(kc), c(kc.copy()), c(tok), c(out), 3, 0.5, None)
    # the CPU kernels take any strides
    _C.taylor_feature_map(np.zeros((3, 8), np.float32)[:, ::2], phi, 0.5, None)
    assert np.all(out == 7)
