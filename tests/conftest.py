"""Shared fixtures and helpers for the based test suite.

* ``torch`` / ``cuda`` availability flags: tests needing them skip cleanly.
* ``RawProducer``: a DLPack producer built from raw fields with ctypes, with a counting
  deleter, to reach the edge cases real libraries never emit (NULL strides,
  byte_offset, a newer major version, odd dtypes) and the fields a hostile or buggy one
  may send (a huge or negative ndim, shape arrays that end at an unreadable guard page,
  a device that contradicts __dlpack_device__, deleters that run Python code).
  ``ExchangeProducer`` hands the same tensors over through the DLPack C exchange table
  (torch's fast path).
* ``poison``: fill an output with NaN before a kernel call so an element the kernel
  forgets to write fails the comparison.
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import sys

import numpy as np
import pytest

import based

if not hasattr(based, "_C"):  # pragma: no cover - a source tree without the built extension
    raise RuntimeError("based._C is missing: install the package (pip install .) before running the tests")

HAS_TORCH = importlib.util.find_spec("torch") is not None
if HAS_TORCH:
    import torch

    HAS_TORCH_CUDA = torch.cuda.is_available()
else:  # pragma: no cover
    torch = None
    HAS_TORCH_CUDA = False

requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
requires_cuda = pytest.mark.skipif(
    not (HAS_TORCH_CUDA and based.cuda_available()), reason="needs a CUDA build of based, torch.cuda and a GPU"
)

# Machine epsilon of each compute dtype; tolerances below are stated in these units.
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def assert_within_policy(out, ref64, ref_low, name: str = "out", factor: float = 2.0, floor: float = 0.0):
    """The CUDA tests' tolerance policy (flash-attention's): the largest error of ``out``
    against the float64 reference ``ref64`` must be at most ``factor`` times the largest
    error of ``ref_low`` -- the same computation done in the input precision (float32 math
    for float32 inputs, bf16/fp16 math for bf16/fp16 inputs) -- plus ``floor`` (for outputs
    that are exact in both, e.g. all-zero rows; state it in units of EPS where used).
    NaN anywhere in ``out`` where ``ref64`` is finite fails."""
    o, r, lo = to_numpy64(out), to_numpy64(ref64), to_numpy64(ref_low)
    assert o.shape == r.shape == lo.shape, (o.shape, r.shape, lo.shape)
    finite = np.isfinite(r)
    assert np.isfinite(o[finite]).all(), f"{name}: non-finite values where the reference is finite"
    err = float(np.max(np.abs(o - r), initial=0.0, where=finite))
    base = float(np.max(np.abs(lo - r), initial=0.0, where=finite))
    assert err <= factor * base + floor, (
        f"{name}: max error {err:.3e} against float64 exceeds {factor} x {base:.3e} (the input-precision "
        f"computation's error) + {floor:.1e}")


def poison(a):
    """Fill a float array (numpy or torch) with NaN in place and return it."""
    if isinstance(a, np.ndarray):
        a[...] = np.nan
    else:
        a.fill_(float("nan"))
    return a


def to_numpy64(a) -> np.ndarray:
    """Any array (numpy, torch incl. bf16, based.Buffer) as a float64 numpy copy."""
    if HAS_TORCH and isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    if isinstance(a, based.Buffer):
        if a.dtype == "bfloat16":
            assert HAS_TORCH, "reading a bfloat16 Buffer needs torch"
            return torch.from_dlpack(a).to(torch.float64).numpy()
        a = np.from_dlpack(a)
    return np.asarray(a, dtype=np.float64)


def make_array(lib: str, data: np.ndarray, dtype: str):
    """float64 numpy data as a `lib` ('numpy' or 'torch') array of `dtype`."""
    if lib == "numpy":
        assert dtype != "bfloat16"
        return np.ascontiguousarray(data.astype(dtype))
    return torch.from_numpy(np.ascontiguousarray(data)).to(getattr(torch, dtype))


def rounded(data: np.ndarray, dtype: str) -> np.ndarray:
    """data rounded to `dtype` and back to float64: the input the kernel actually sees."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(data)).to(torch.bfloat16).to(torch.float64).numpy()
    return data.astype(dtype).astype(np.float64)


# ---------------------------------------------------------------------------------------
# A raw DLPack producer (ctypes)
# ---------------------------------------------------------------------------------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


DELETER_V = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", DELETER_V),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER_V)]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

# The destructor receives the dying capsule as a raw pointer: wrapping it in a
# py_object would resurrect it (refcount 0 -> 1 -> 0) and recurse.
_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_PyCapsule_IsValid = ctypes.pythonapi.PyCapsule_IsValid
_PyCapsule_IsValid.restype = ctypes.c_int
_PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

_NAMES = {True: b"dltensor_versioned", False: b"dltensor"}


# Unreadable memory right after an array: reading one element too many faults.
PAGE = mmap.PAGESIZE
_PROT_NONE = 0  # <sys/mman.h>; the mmap module exports PROT_READ/WRITE/EXEC only
if sys.platform != "win32":
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mprotect.restype = ctypes.c_int
    _libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
else:  # pragma: no cover
    _libc = None

requires_guard_pages = pytest.mark.skipif(_libc is None, reason="guard pages need mmap/mprotect (POSIX)")


def guarded_int64s(values):
    """A ctypes int64 array holding ``values`` whose last element ends exactly at a page
    boundary, followed by a page mapped PROT_NONE: a consumer that reads even one element
    past the end gets SIGSEGV instead of silently reading garbage. The mapping lives as long
    as the returned array."""
    values = list(values)
    assert 8 * len(values) <= PAGE
    mm = mmap.mmap(-1, 2 * PAGE)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor                                          # release the buffer export
    if _libc.mprotect(base + PAGE, PAGE, _PROT_NONE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "mprotect failed")
    arr = (ctypes.c_int64 * len(values)).from_address(base + PAGE - 8 * len(values))
    arr[:] = values
    arr._mapping = mm                                   # keeps the pages mapped
    return arr


class RawProducer:
    """Exports one numpy array's memory through a hand-built capsule.

    Arguments let a test break one rule at a time: ``strides=None`` exports NULL
    strides, ``byte_offset`` moves data back by that many bytes (modulo 2**64), ``major``
    sets the version, ``code``/``bits``/``lanes`` the dtype, ``readonly`` the flag.
    Hostile fields: ``ndim`` claims another number of dimensions than the shape array
    holds, ``shape`` replaces the exported shape values (``"null"``: a NULL shape
    pointer; the ``shape`` attribute stays the array's, as array libraries have it),
    ``guard=True`` puts the shape and strides arrays right before an unreadable page
    (``guarded_int64s``), ``data`` replaces the data address, ``tensor_device`` writes
    another device into the DLTensor than ``device`` (what ``__dlpack_device__`` says).
    Every capsule's deleter increments ``self.deleted`` and then calls ``on_delete()``
    (Python code run from inside the deleter) if given; ``c_deleter`` (an address)
    replaces the deleter with a C function, uncounted. The capsule destructor calls the
    deleter only if no consumer took the capsule (renamed it to ``used_...``).
    """

    def __init__(self, array, *, versioned=True, strides="auto", byte_offset=0, major=1, code=None, bits=None,
                 lanes=1, readonly=False, device=(1, 0), accepts_max_version=True, ndim=None, shape=None,
                 guard=False, data=None, tensor_device=None, on_delete=None, c_deleter=None):
        self.array = array
        self.versioned = versioned
        self.strides = strides
        self.byte_offset = byte_offset
        self.major = major
        self.code = code
        self.bits = bits
        self.lanes = lanes
        self.readonly = readonly
        self.device = device
        self.accepts_max_version = accepts_max_version
        self.ndim = ndim
        self.shape_field = shape
        self.guard = guard
        self.data = data
        self.tensor_device = tensor_device
        self.on_delete = on_delete
        self.deleted = 0
        self.exported = 0
        self._keep = []

        def deleter(_ptr):
            self.deleted += 1
            if self.on_delete is not None:
                self.on_delete()

        self._deleter = DELETER_V(deleter) if c_deleter is None else DELETER_V(c_deleter)

        def destructor(capsule):
            name = _NAMES[self.versioned]
            if _PyCapsule_IsValid(capsule, name):
                self._deleter(_PyCapsule_GetPointer(capsule, name))

        self._destructor = _CAPSULE_DESTRUCTOR(destructor)

    @property
    def shape(self):
        """The array's shape, as array libraries have it (the exported one may differ)."""
        return tuple(self.array.shape)

    def __dlpack_device__(self):
        return self.device

    def _int64s(self, values):
        if self.guard:
            return guarded_int64s(values)
        return (ctypes.c_int64 * max(len(values), 1))(*values)

    def _managed(self):
        """A new DLManagedTensor[Versioned] with this producer's fields (kept alive by self)."""
        a = self.array
        t = DLTensor()
        t.data = self.data if self.data is not None else (a.ctypes.data - self.byte_offset) % 2**64
        t.byte_offset = self.byte_offset
        t.device = DLDevice(*(self.tensor_device if self.tensor_device is not None else self.device))
        t.ndim = a.ndim if self.ndim is None else self.ndim
        kind = {"f": 2, "i": 0, "u": 1, "c": 5, "b": 6}[a.dtype.kind]
        t.dtype = DLDataType(self.code if self.code is not None else kind,
                             self.bits if self.bits is not None else a.dtype.itemsize * 8, self.lanes)
        if isinstance(self.shape_field, str) and self.shape_field == "null":
            t.shape = None
        else:
            shape = self._int64s(a.shape if self.shape_field is None else self.shape_field)
            t.shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
            self._keep.append(shape)
        if self.strides is None:
            t.strides = None
        else:
            st = [s // a.itemsize for s in a.strides] if self.strides == "auto" else list(self.strides)
            strides = self._int64s(st)
            t.strides = ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64))
            self._keep.append(strides)
        if self.versioned:
            m = DLManagedTensorVersioned()
            m.version = DLPackVersion(self.major, 0)
            m.flags = 1 if self.readonly else 0
            m.dl_tensor = t
        else:
            m = DLManagedTensor()
            m.dl_tensor = t
        m.manager_ctx = None
        m.deleter = self._deleter
        self._keep.append(m)
        self.exported += 1
        return m

    def _capsule(self):
        return _PyCapsule_New(ctypes.addressof(self._managed()), _NAMES[self.versioned],
                              ctypes.cast(self._destructor, ctypes.c_void_p))

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if max_version is not None and not self.accepts_max_version:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        return self._capsule()


class LegacyOnlyProducer(RawProducer):
    """A producer from before DLPack 1.0: __dlpack__ has no max_version keyword."""

    def __init__(self, array, **kw):
        super().__init__(array, versioned=False, **kw)

    def __dlpack__(self, stream=None):  # noqa: D401 - old signature on purpose
        return self._capsule()


# The DLPack 1.3 C exchange table (csrc/dlpack.h): what torch publishes as
# ``torch.Tensor.__dlpack_c_exchange_api__``; based's import calls
# managed_tensor_from_py_object_no_sync instead of __dlpack__ for host memory.
_FROM_PY_OBJECT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.POINTER(ctypes.c_void_p))


class DLPackExchangeAPI(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("prev_api", ctypes.c_void_p),
        ("managed_tensor_allocator", ctypes.c_void_p),
        ("managed_tensor_from_py_object_no_sync", _FROM_PY_OBJECT),
        ("managed_tensor_to_py_object_no_sync", ctypes.c_void_p),
        ("dltensor_from_py_object_no_sync", ctypes.c_void_p),
        ("current_work_stream", ctypes.c_void_p),
    ]


def _exchange_from_py_object(obj, out):
    """managed_tensor_from_py_object_no_sync: an owning versioned tensor, built from obj's
    fields like its capsules are. -1 (no exception: ctypes cannot leave one set) when obj
    says ``exchange_fails``."""
    if obj.exchange_fails:
        return -1
    m = obj._managed()
    obj.exchanged += 1
    out[0] = ctypes.addressof(m)
    return 0


_EXCHANGE_FROM_PY_OBJECT = _FROM_PY_OBJECT(_exchange_from_py_object)
_EXCHANGE_NAME = b"dlpack_exchange_api"   # a capsule keeps a pointer to its name, not a copy
_EXCHANGE_TABLE = DLPackExchangeAPI(version=DLPackVersion(1, 3), prev_api=None,
                                    managed_tensor_from_py_object_no_sync=_EXCHANGE_FROM_PY_OBJECT)


class ExchangeProducer(RawProducer):
    """A RawProducer whose type also publishes the DLPack C exchange table, as torch does:
    based takes host tensors through ``managed_tensor_from_py_object_no_sync`` (counted in
    ``exchanged``; ``exported`` counts every tensor made, capsules included) and falls back
    to ``__dlpack__`` for one it refuses. The hostile fields and deleters are RawProducer's;
    ``exchange_fails=True`` makes the table's function fail."""

    __dlpack_c_exchange_api__ = _PyCapsule_New(ctypes.addressof(_EXCHANGE_TABLE), _EXCHANGE_NAME, None)

    def __init__(self, array, *, exchange_fails=False, **kw):
        super().__init__(array, versioned=True, **kw)
        self.exchange_fails = exchange_fails
        self.exchanged = 0
