"""DLPack conformance, both ways (shared/notes/dlpack.md):

consumer: any __dlpack__ object, versioned first with a legacy fallback, read-only flag
honoured, byte_offset/NULL/zero/negative strides, capsules consumed exactly once and the
producer's memory alive for the whole call;
producer: based.Buffer viewed zero-copy by numpy and torch, surviving its producer, its
deleter safe from any thread; no leaks over 10^5 round trips.
"""

import gc
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest
from conftest import (LegacyOnlyProducer, RawProducer, poison, requires_cuda, requires_torch, to_numpy64,
                      torch)

import based
from based import _C
from based import reference as ref

# ---------------------------------------------------------------------------------------
# Consumer: zero-copy in and out
# ---------------------------------------------------------------------------------------


def test_numpy_out_same_pointer_and_writes_visible():
    x = np.random.default_rng(0).standard_normal((4, 3))
    out = np.zeros((4, 10))
    ptr = out.ctypes.data
    res = based.taylor_feature_map(x, out=out)
    assert res is out and res.ctypes.data == ptr
    np.testing.assert_allclose(out, ref.taylor_feature_map(x), rtol=1e-12)


@requires_torch
def test_torch_out_same_pointer_and_writes_visible():
    x = torch.randn(4, 3)
    out = torch.zeros(4, 10)
    ptr = out.data_ptr()
    res = based.taylor_feature_map(x, out=out)
    assert res is out and res.data_ptr() == ptr
    np.testing.assert_allclose(out.numpy(), ref.taylor_feature_map(x.numpy()), rtol=1e-6)


@requires_torch
def test_torch_bfloat16_through_dlpack():
    x = torch.randn(5, 4).to(torch.bfloat16)
    y = based.taylor_feature_map(x)
    assert y.dtype == torch.bfloat16
    np.testing.assert_allclose(to_numpy64(y), ref.taylor_feature_map(to_numpy64(x)), rtol=2**-7, atol=0)


@requires_torch
def test_torch_requires_grad_is_refused_clearly():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(TypeError, match=r"x requires grad.*detach\(\)"):
        based.taylor_feature_map(x)


def test_zero_size_inputs():
    for shape in [(0, 4), (3, 0, 4)]:
        y = based.taylor_feature_map(np.zeros(shape, np.float32))
        assert y.shape == shape[:-1] + (15,)
    assert based.zeros((0, 5)).shape == (0, 5)
    assert np.from_dlpack(based.zeros((0, 5))).shape == (0, 5)


def test_readonly_input_is_fine_readonly_out_is_refused():
    x = np.random.default_rng(1).standard_normal((2, 3))
    x.flags.writeable = False
    y = based.taylor_feature_map(x)                     # reading a read-only array is fine
    out = np.full((2, 10), 7.0)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        based.taylor_feature_map(x, out=out)
    assert np.all(out == 7.0)
    np.testing.assert_allclose(y, ref.taylor_feature_map(x), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Consumer: raw capsules (edge cases real libraries rarely emit)
# ---------------------------------------------------------------------------------------


def test_consumes_versioned_capsule_exactly_once():
    x = np.random.default_rng(2).standard_normal((3, 4))
    p = RawProducer(x)
    y = based.taylor_feature_map(p)
    assert p.exported >= 1 and p.deleted == p.exported   # every capsule taken is freed once
    np.testing.assert_allclose(y if isinstance(y, np.ndarray) else np.from_dlpack(y),
                               ref.taylor_feature_map(x), rtol=1e-12)


def test_legacy_producer_without_max_version():
    x = np.random.default_rng(3).standard_normal((2, 5))
    p = LegacyOnlyProducer(x)
    y = np.from_dlpack(based.taylor_feature_map(p))
    assert p.exported >= 1 and p.deleted == p.exported
    np.testing.assert_allclose(y, ref.taylor_feature_map(x), rtol=1e-12)


def test_null_strides_mean_row_major():
    x = np.random.default_rng(4).standard_normal((3, 4))
    y = np.from_dlpack(based.taylor_feature_map(RawProducer(x, strides=None)))
    np.testing.assert_allclose(y, ref.taylor_feature_map(x), rtol=1e-12)


def test_byte_offset_is_added():
    x = np.random.default_rng(5).standard_normal((3, 4))
    p = RawProducer(x, byte_offset=64)
    y = np.from_dlpack(based.taylor_feature_map(p))
    np.testing.assert_allclose(y, ref.taylor_feature_map(x), rtol=1e-12)


def test_zero_and_negative_strides():
    row = np.random.default_rng(6).standard_normal((1, 4))
    bcast = np.broadcast_to(row, (5, 4))
    y = np.from_dlpack(based.taylor_feature_map(RawProducer(bcast, strides=(0, 1))))
    np.testing.assert_allclose(y, ref.taylor_feature_map(bcast), rtol=1e-12)
    x = np.random.default_rng(7).standard_normal((3, 4))
    rev = x[::-1, ::-1]
    y = np.from_dlpack(based.taylor_feature_map(RawProducer(rev)))
    np.testing.assert_allclose(y, ref.taylor_feature_map(rev), rtol=1e-12)


def test_newer_major_version_refused_and_freed_by_producer():
    x = np.ones((2, 2))
    p = RawProducer(x, major=2)
    with pytest.raises(TypeError, match="DLPack 2.0"):
        based.taylor_feature_map(p)
    gc.collect()
    assert p.exported == 1 and p.deleted == 1   # unrenamed capsule freed by its own destructor


@pytest.mark.parametrize("code,bits,lanes,what", [(0, 32, 1, "int32"), (10, 8, 1, "float8"),
                                                   (5, 64, 1, "complex64")])
def test_unsupported_dtypes_named(code, bits, lanes, what):
    """Well-formed DLPack dtypes based has no kernels for (vector dtypes, lanes != 1, are
    refused by the import itself: test_dlpack_hostile.py)."""
    x = np.ones((2, 4), dtype=np.float32)
    p = RawProducer(x, code=code, bits=bits, lanes=lanes)
    with pytest.raises(TypeError, match=f"x must have dtype one of .*, got {what}"):
        based.taylor_feature_map(p)
    # the C core names code and bits itself when reached directly
    with pytest.raises(TypeError, match=r"x has an unsupported dtype \("):
        based._C.taylor_feature_map(p, np.zeros((2, 15), np.float32), 1.0, None)
    gc.collect()
    assert p.deleted == p.exported


def test_readonly_flag_from_raw_capsule():
    out = np.zeros((2, 10))
    p = RawProducer(out, readonly=True)
    with pytest.raises(ValueError, match="out is read-only"):
        based.taylor_feature_map(np.ones((2, 3)), out=p)
    assert p.deleted == 1 and np.all(out == 0)


def test_used_capsule_is_refused():
    class Replay:
        def __init__(self):
            self.cap = based.zeros((2, 3)).__dlpack__(max_version=(1, 0))

        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, **kw):
            return self.cap

    r = Replay()
    out = np.zeros((2, 10), np.float32)
    based._C.taylor_feature_map(r, out, 1.0, None)     # first use consumes the capsule
    with pytest.raises(TypeError, match="already consumed"):
        based._C.taylor_feature_map(r, out, 1.0, None)


def test_not_an_array():
    for bad in ([1.0, 2.0], None, "x", 3.0):
        with pytest.raises(TypeError, match="x must be an array implementing the DLPack protocol"):
            based.taylor_feature_map(bad)


class StreamRecorder(RawProducer):
    """A RawProducer that records the stream each __dlpack__ call asks it to export for."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.streams = []

    def __dlpack__(self, *, stream=None, **kw):
        self.streams.append(stream)
        return super().__dlpack__(stream=stream, **kw)


def test_the_op_stream_reaches_cuda_producers_only():
    """Every op binding takes a trailing stream, handed to the __dlpack__ of CUDA producers (the
    DLPack handshake: they order their pending work before it) and to the C call."""
    x, out = (StreamRecorder(np.zeros(s), device=(2, 0)) for s in ((3, 4), (3, 15)))
    with pytest.raises(TypeError, match=r"x is float64 on cuda:0"):  # refused in the checks, before any kernel
        based._C.taylor_feature_map(x, out, 0.5, 7)
    assert x.streams == [7] and out.streams == [7]
    hx, hout = StreamRecorder(np.ones((3, 4), np.float32)), StreamRecorder(np.zeros((3, 15), np.float32))
    based._C.taylor_feature_map(hx, hout, 0.5, 2)      # CPU tensors: exported without one, run on the CPU
    assert hx.streams == [None] and hout.streams == [None] and np.all(hout.array[:, 0] == 1)


@pytest.mark.parametrize("stream, exc, message", [
    ("0", TypeError, r"stream must be None or an int \(a cudaStream_t as DLPack passes it: 1 for the legacy default "
                     r"stream, 2 for the per-thread default stream\), got str"),
    (True, TypeError, r"stream must be None or an int .*got bool"),
    (-1, ValueError, r"stream must be None or a cudaStream_t handle, an int from 0 to 2\*\*64 - 1, got -1"),
    (-2**70, ValueError, r"stream must be None or a cudaStream_t handle, an int from 0 to 2\*\*64 - 1, got -1180"),
    (2**70, ValueError, r"stream must be None or a cudaStream_t handle, an int from 0 to 2\*\*64 - 1, got 1180"),
])
def test_the_op_stream_is_checked(stream, exc, message):
    out = np.full((3, 15), 7.0, np.float32)
    with pytest.raises(exc, match=message):
        based._C.taylor_feature_map(np.zeros((3, 4), np.float32), out, 0.5, stream)
    with pytest.raises(exc, match=message):
        based._C.state_zero(out, None, stream)
    assert np.all(out == 7)


def test_producer_memory_alive_for_the_whole_call():
    """The consumer keeps the managed tensor (and so the memory) until the call ends:
    a producer whose only reference is the call's argument still works."""
    y = based.taylor_feature_map(RawProducer(np.random.default_rng(8).standard_normal((64, 16))))
    assert np.from_dlpack(y).shape == (64, 153)


# ---------------------------------------------------------------------------------------
# Producer: based.Buffer
# ---------------------------------------------------------------------------------------


def test_buffer_numpy_zero_copy_and_writes_both_ways():
    buf = based.zeros((3, 4), "float32")
    a = np.from_dlpack(buf)
    b = np.from_dlpack(buf)
    assert a.ctypes.data == buf.data_ptr == b.ctypes.data
    assert a.flags.writeable                          # versioned export: writable in numpy
    a[1, 2] = 5.0
    assert b[1, 2] == 5.0
    assert buf.data_ptr % 256 == 0


def test_buffer_reads_as_numpy_through_asarray():
    """numpy.asarray(buf) views the memory (no 0-d object array); dtype= converts; tolist() reads."""
    buf = based.zeros((2, 3), "float32")
    a = np.asarray(buf)
    assert a.dtype == np.float32 and a.shape == (2, 3) and a.ctypes.data == buf.data_ptr
    a[1, 2] = 7.0
    assert np.asarray(buf)[1, 2] == 7.0
    assert buf.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 7.0]]
    c = np.asarray(buf, dtype=np.float64)
    assert c.dtype == np.float64 and c[1, 2] == 7.0 and c.ctypes.data != buf.data_ptr
    copied = np.array(buf)                            # np.array copies by default
    copied[0, 0] = 1.0
    assert np.asarray(buf)[0, 0] == 0.0
    with pytest.raises(ValueError):                   # a conversion cannot be zero-copy
        np.asarray(buf, dtype=np.float64, copy=False)
    tokens = based.LinearAttentionState.zeros(2, 1, 4, 3).tokens   # no like=: Buffers
    assert isinstance(tokens, based.Buffer) and tokens.tolist() == [0, 0]
    with pytest.raises(TypeError, match="bfloat16.*torch.from_dlpack"):
        np.asarray(based.zeros((2,), "bfloat16"))


def test_zeros_takes_numpy_and_torch_dtypes():
    assert based.zeros((2,), np.float64).dtype == "float64"
    assert based.zeros((2,), np.dtype("int64")).dtype == "int64"
    torch = pytest.importorskip("torch")
    assert based.zeros((2,), torch.bfloat16).dtype == "bfloat16"
    with pytest.raises(TypeError, match="dtype"):
        based.zeros((2,), "int8")


def test_cuda_allocation_without_a_device_is_a_clear_error():
    if based.cuda_available():
        pytest.skip("a CUDA device is usable here")
    if based.build_info()["cuda"]:
        with pytest.raises(ValueError, match=r"device cuda:0: this machine has no usable CUDA device"):
            based.zeros((2, 2), "float32", device="cuda")
        with pytest.raises(ValueError, match=r"no usable CUDA device"):
            based.LinearAttentionState.zeros(1, 1, 4, 3, device="cuda")
    else:
        with pytest.raises(NotImplementedError, match="built without CUDA"):
            based.zeros((2, 2), "float32", device="cuda")


@requires_torch
def test_buffer_torch_zero_copy_and_writes_both_ways():
    buf = based.zeros((2, 5), "bfloat16")
    t = torch.from_dlpack(buf)
    assert t.dtype == torch.bfloat16 and t.data_ptr() == buf.data_ptr
    t[0, 1] = 3.0
    assert torch.from_dlpack(buf)[0, 1].item() == 3.0
    # writes through the Buffer (as an out= target) are visible in torch
    buf2 = based.zeros((2, 10), "float32")
    view = torch.from_dlpack(buf2)
    based.taylor_feature_map(np.ones((2, 3), np.float32), out=buf2)
    assert view[0, 0].item() == 1.0


@requires_torch
def test_export_outlives_the_buffer():
    before = _C.live_buffers()
    buf = based.zeros((1000,), "float64")
    np.from_dlpack(buf)[:] = np.arange(1000.0)
    t = torch.from_dlpack(buf)
    del buf
    gc.collect()
    assert _C.live_buffers() == before + 1            # the export holds the storage
    assert t[999].item() == 999.0
    del t
    gc.collect()
    assert _C.live_buffers() == before


@requires_torch
def test_deleter_from_another_thread_without_gil():
    before = _C.live_buffers()
    tensors = [torch.from_dlpack(based.zeros((100,))) for _ in range(50)]

    def drop():
        tensors.clear()                                 # torch frees storages in this thread

    th = threading.Thread(target=drop)
    th.start()
    th.join()
    gc.collect()
    assert _C.live_buffers() == before


def test_unconsumed_capsule_frees_and_refcount_stable():
    buf = based.zeros((4,))
    before = (_C.live_buffers(), sys.getrefcount(buf))
    for _ in range(100):
        cap = buf.__dlpack__(max_version=(1, 0))
        del cap
        cap = buf.__dlpack__()
        del cap
    gc.collect()
    assert (_C.live_buffers(), sys.getrefcount(buf)) == before


def test_capsule_dropped_while_exception_unwinds():
    def boom():
        cap = based.zeros((3,)).__dlpack__()  # noqa: F841 - dies during unwinding
        raise KeyError("original")

    with pytest.raises(KeyError, match="original"):
        boom()


def test_dunder_dlpack_protocol():
    buf = based.zeros((2, 3))
    assert buf.__dlpack_device__() == (1, 0)
    with pytest.raises(TypeError):
        buf.__dlpack__(1)
    with pytest.raises(TypeError):
        buf.__dlpack__(unknown=1)
    with pytest.raises(TypeError):
        buf.__dlpack__(max_version=(1,))
    with pytest.raises(TypeError):
        buf.__dlpack__(stream="x")
    with pytest.raises(BufferError):
        buf.__dlpack__(stream=5)                    # a CPU buffer takes no stream
    with pytest.raises(BufferError):
        buf.__dlpack__(dl_device=(2, 0))
    buf.__dlpack__(stream=-1, dl_device=(1, 0), copy=False)
    a = np.from_dlpack(buf, copy=True)              # a real copy, not a view
    a[0, 0] = 1.0
    assert np.from_dlpack(buf)[0, 0] == 0.0
    assert "based.Buffer(shape=(2, 3), dtype=float32, device=cpu)" == repr(buf)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_no_leak_over_1e5_round_trips(lib):
    """10^5 times: export a Buffer to the library and import the result back into an op.
    based's live storages return to baseline, refcounts are stable, and traced Python
    memory does not grow."""
    if lib == "torch" and torch is None:
        pytest.skip("PyTorch is not installed")
    from_dlpack = np.from_dlpack if lib == "numpy" else torch.from_dlpack
    x = np.ones((2, 2), np.float32) if lib == "numpy" else torch.ones(2, 2)
    out = based.zeros((2, 6))
    gc.collect()
    live, refs = _C.live_buffers(), (sys.getrefcount(x), sys.getrefcount(out))
    tracemalloc.start()
    for i in range(100_000):
        if i == 1000:
            gc.collect()
            start, _ = tracemalloc.get_traced_memory()
        view = from_dlpack(out)                          # export
        based.taylor_feature_map(x, out=view)            # import (x and view) + call
        del view
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert _C.live_buffers() == live
    assert (sys.getrefcount(x), sys.getrefcount(out)) == refs
    assert end - start < 256 * 1024, f"traced memory grew by {end - start} bytes"


def test_shutdown_with_live_export():
    """An export still alive at interpreter exit must not crash the exit."""
    code = textwrap.dedent("""
        import numpy as np, based
        KEEP = np.from_dlpack(based.zeros((10,)))
        CAP = based.zeros((3,)).__dlpack__()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Fatal" not in r.stderr


# ---------------------------------------------------------------------------------------
# CUDA (on a GPU machine only)
# ---------------------------------------------------------------------------------------


@requires_cuda
def test_cuda_buffer_zero_copy_with_torch():
    buf = based.zeros((4, 8), "float32", device="cuda")
    t = torch.from_dlpack(buf)
    assert t.is_cuda and t.data_ptr() == buf.data_ptr
    t.fill_(2.0)
    torch.cuda.synchronize()
    assert torch.from_dlpack(buf).sum().item() == 64.0
    info = _C.dlpack_info(torch.zeros(3, device="cuda"))
    assert info[2][0] == 2


# ---------------------------------------------------------------------------------------
# Other array libraries (where installed: the GPU machine has CuPy and JAX)
# ---------------------------------------------------------------------------------------


def test_jax_cpu_in_and_out():
    jax = pytest.importorskip("jax")
    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jax.numpy.asarray(np.random.default_rng(9).standard_normal((3, 4)), dtype="float32"), cpu)
    y = based.taylor_feature_map(x)                   # jax in -> jax out (via based.Buffer, zero-copy)
    assert isinstance(y, jax.Array)
    np.testing.assert_allclose(np.asarray(y), ref.taylor_feature_map(np.asarray(x)), rtol=1e-6)
    buf = based.zeros((4, 16))
    view = jax.dlpack.from_dlpack(buf)              # legacy capsule path, 256-byte aligned: no copy
    assert view.unsafe_buffer_pointer() == buf.data_ptr


@requires_cuda
def test_cupy_zero_copy_both_ways():
    cupy = pytest.importorskip("cupy")
    buf = based.zeros((5, 3), "float32", device="cuda")
    c = cupy.from_dlpack(buf)
    assert c.data.ptr == buf.data_ptr
    info = _C.dlpack_info(c)
    assert info[0] == (5, 3) and info[2][0] == 2


@requires_torch
def test_torch_exchange_api_fast_path_is_zero_copy_and_counted():
    """torch publishes the DLPack 1.3 C exchange table: based borrows through it (no Python
    __dlpack__ call), still zero-copy, strided, and without leaking the managed tensors."""
    if not hasattr(torch.Tensor, "__dlpack_c_exchange_api__"):
        pytest.skip("this torch has no DLPack C exchange API")
    called = []
    orig = torch.Tensor.__dlpack__

    def spy(self, *a, **kw):
        called.append(1)
        return orig(self, *a, **kw)

    x = torch.randn(6, 4, dtype=torch.float64)[::2]            # strided view
    out = torch.zeros(3, 15, dtype=torch.float64)
    ptr = out.data_ptr()
    torch.Tensor.__dlpack__ = spy
    try:
        based._C.taylor_feature_map(x, out, 0.5, None)
    finally:
        torch.Tensor.__dlpack__ = orig
    assert not called and out.data_ptr() == ptr
    np.testing.assert_allclose(out.numpy(), ref.taylor_feature_map(x.numpy(), 0.5), rtol=1e-12)
    if hasattr(x, "_use_count"):                                 # C++ references to x's TensorImpl
        before = x._use_count()
        for _ in range(1000):
            based._C.taylor_feature_map(x, out, 0.5, None)
        assert x._use_count() == before                           # every managed tensor was deleted


@requires_torch
def test_torch_subclass_overriding_dlpack_is_respected():
    """The exchange-table fast path must not bypass a subclass's own __dlpack__."""
    class Guarded(torch.Tensor):
        def __dlpack__(self, *args, **kwargs):
            raise BufferError("this tensor may not be exported")

    class Plain(torch.Tensor):
        pass

    with pytest.raises(TypeError, match="this tensor may not be exported"):
        based._C.taylor_feature_map(torch.randn(2, 3).as_subclass(Guarded), torch.zeros(2, 10), 0.5, None)
    out = torch.zeros(2, 10)
    based._C.taylor_feature_map(torch.ones(2, 3).as_subclass(Plain), out, 0.5, None)
    assert out[0, 0].item() == 1.0


def test_state_copy_between_differently_strided_views_of_one_buffer_is_refused():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    with pytest.raises(ValueError, match="dst and src share memory"):
        _C.state_copy(x, x.transpose(0, 2, 1), None)
    assert np.array_equal(x, np.arange(16, dtype=np.float32).reshape(1, 4, 4))
    _C.state_copy(x, x, None)                               # the very same tensor: a no-op


def test_int64_arguments_name_int64_when_given_another_dtype():
    with pytest.raises(TypeError, match=r"int64 for token counts and batch indices"):
        _C.state_zero(np.zeros((2, 3), np.float32), np.array([0], np.int32), None)


@pytest.mark.skipif(not based.cuda_available(), reason="needs a CUDA build of based and a GPU")
def test_cuda_buffers_name_the_devices_there_and_refuse_numpy():
    with pytest.raises(ValueError, match=r"device cuda:99: this machine has \d+ CUDA device"):
        based.zeros((2, 2), "float32", device="cuda:99")
    buf = based.zeros((2, 2), "float32", device="cuda")
    with pytest.raises(TypeError, match="lives on cuda:0; NumPy reads host memory only"):
        np.asarray(buf)
