"""Array-library plumbing: describe any DLPack array and allocate results in the caller's
own array type (torch in -> torch out, numpy in -> numpy out), on the caller's device.

based never imports torch itself: a torch tensor can only reach us if torch is already
imported, so ``sys.modules`` is enough to recognise one.
"""

from __future__ import annotations

import math
import operator
import sys
from typing import Any, NamedTuple

import numpy as np

from . import _C

FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
DLPACK_CPU, DLPACK_CUDA, DLPACK_CUDA_HOST = 1, 2, 3
INDEX_MAX = 2**63 - 1        # the C core indexes with int64: no count, size or offset may exceed this
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8}


class ArrayInfo(NamedTuple):
    shape: tuple
    dtype: str          # "float32", ..., or the library's own name for an unsupported dtype
    device: tuple       # DLPack (device_type, device_id)


def _torch():
    return sys.modules.get("torch")


def is_torch(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def torch_dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def info(x: Any, name: str) -> ArrayInfo:
    """Shape, dtype name and DLPack device of x, without copying it.

    Raises TypeError (naming ``name``) when x is not a DLPack array.
    """
    if is_torch(x):
        dev = x.device
        if dev.type == "cuda":
            device = (DLPACK_CUDA, dev.index if dev.index is not None else 0)
        elif dev.type == "cpu":
            device = (DLPACK_CPU, 0)
        else:
            raise ValueError(f"{name} is on device {dev.type!r}; based takes cpu and cuda tensors")
        return ArrayInfo(tuple(x.shape), torch_dtype_name(x.dtype), device)
    if isinstance(x, np.ndarray):
        return ArrayInfo(x.shape, x.dtype.name, (DLPACK_CPU, 0))
    if not hasattr(x, "__dlpack__"):
        raise TypeError(
            f"{name} must be an array implementing the DLPack protocol (__dlpack__ and "
            f"__dlpack_device__), such as a torch.Tensor or numpy.ndarray; got {type(x).__name__}"
        )
    shape, dtype, device, _readonly = _C.dlpack_info(x, name)
    return ArrayInfo(shape, dtype, device)


def require_float(i: ArrayInfo, name: str) -> None:
    if i.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype one of {', '.join(FLOAT_DTYPES)}, got {i.dtype}")


def float_input(x: Any, name: str, layout: str) -> ArrayInfo:
    """ArrayInfo of an op's input after the checks the Python layer makes before it
    allocates: not requiring grad, a float dtype, and as many dims as ``layout`` (e.g.
    "(B, T, H, D)") names. Exact sizes are the C core's to check."""
    require_no_grad(x, name)
    i = info(x, name)
    require_float(i, name)
    if len(i.shape) != layout.count(",") + 1:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(i.shape)}")
    return i


def readonly(x: Any, name: str) -> bool:
    """True if x must not be written: a numpy array with ``flags.writeable`` False, or any
    other array exported with DLPack's read-only flag. (torch tensors have no such flag.)
    DLPack errors name ``name``."""
    if is_torch(x):
        return False
    if isinstance(x, np.ndarray):
        return not x.flags.writeable
    return bool(_C.dlpack_info(x, name)[3])


def require_indexable(what: str, dims: str, shape: tuple, dtype: str) -> None:
    """Refuse, before anything is allocated, an array whose size in bytes would not fit the
    C core's 64-bit indexing (SPEC 4). ``what`` and ``dims`` name the array and its axes in
    the message, e.g. ``"the state's kv"``, ``"(batch, heads, F, value_dim)"``."""
    count = math.prod(int(n) for n in shape)      # Python ints: exact, never wraps
    if count * ITEMSIZE.get(dtype, 8) > INDEX_MAX:
        raise ValueError(f"{what} {dims} = {tuple(int(n) for n in shape)} would hold {count} {dtype} elements, "
                         f"which overflows 64-bit indexing (at most {INDEX_MAX} bytes); nothing was allocated")


def require_no_grad(x: Any, name: str) -> None:
    if is_torch(x) and x.requires_grad:
        raise TypeError(
            f"{name} requires grad, but based kernels have no backward pass yet; pass {name}.detach() "
            "(torch.no_grad() does not clear a tensor's requires_grad)"
        )


def _as_library(like: Any, buf: Any) -> Any:
    """View a based.Buffer as like's array type (zero-copy), or return the Buffer."""
    if like is None or isinstance(like, _C.Buffer):
        return buf
    if is_torch(like):
        return _torch().from_dlpack(buf)
    if isinstance(like, np.ndarray):
        # numpy has no bfloat16: such arrays stay based.Buffer (torch.from_dlpack views them)
        return buf if buf.dtype == "bfloat16" else np.from_dlpack(buf)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(like, cupy.ndarray):
        return cupy.from_dlpack(buf)
    namespace = getattr(like, "__array_namespace__", None)
    if namespace is not None:
        try:
            return namespace().from_dlpack(buf)
        except Exception:  # a library that cannot import it: hand back our own buffer
            return buf
    return buf


def _torch_device(like, device):
    if device is None:
        return like.device
    return device_name(device) if isinstance(device, tuple) else device


def _alloc(like: Any, shape: tuple, dtype: str, device, fill_zero: bool) -> Any:
    if is_torch(like):
        torch = _torch()
        make = torch.zeros if fill_zero else torch.empty
        return make(shape, dtype=getattr(torch, dtype), device=_torch_device(like, device))
    dev = parse_device(device) if device is not None else (
        info(like, "like").device if like is not None else (DLPACK_CPU, 0))
    if isinstance(like, np.ndarray) and dtype != "bfloat16" and dev[0] == DLPACK_CPU:
        return (np.zeros if fill_zero else np.empty)(shape, dtype=dtype)
    return _as_library(like, _C.zeros(tuple(shape), dtype, *dev))


def empty(like: Any, shape: tuple, dtype: str, device=None) -> Any:
    """An uninitialised array of like's type (torch, numpy, else via DLPack) on `device`
    (a DLPack (type, id) tuple, a string like 'cuda:0', or None for like's device)."""
    return _alloc(like, shape, dtype, device, False)


def zeros(like: Any, shape: tuple, dtype: str, device=None) -> Any:
    """A zero-filled array like `empty`; like=None gives a based.Buffer, and so does a
    bfloat16 array asked for with a numpy like (numpy has no bfloat16)."""
    return _alloc(like, shape, dtype, device, True)


def parse_device(device) -> tuple:
    """'cpu', 'cuda', 'cuda:1', a torch.device or a DLPack (type, id) tuple -> (type, id)."""
    if isinstance(device, tuple) and len(device) == 2:
        if any(isinstance(n, bool) or not hasattr(n, "__index__") for n in device):
            raise TypeError(f"device must be 'cpu', 'cuda', 'cuda:N' or a DLPack (type, id) pair of ints, "
                            f"got {device!r}")
        return (operator.index(device[0]), operator.index(device[1]))
    text = str(device)
    if text == "cpu":
        return (DLPACK_CPU, 0)
    if text == "cuda":
        return (DLPACK_CUDA, 0)
    if text.startswith("cuda:") and text[5:].isdigit():
        return (DLPACK_CUDA, int(text[5:]))
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def device_name(device: tuple) -> str:
    if device[0] in (DLPACK_CPU, DLPACK_CUDA_HOST):
        return "cpu"
    if device[0] == DLPACK_CUDA:
        return f"cuda:{device[1]}"
    return f"dlpack device {device}"


def default_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)


def stream_handle(stream, x) -> int | None:
    """The CUDA stream a call on x's device runs on, as the integer DLPack passes
    (``cudaStream_t``; 1 is the legacy default stream, 2 the per-thread default), or None
    for a host call.

    ``stream`` given: an int handle, or an object with ``.cuda_stream`` (torch.cuda.Stream)
    or ``.ptr`` (cupy.cuda.Stream). Else x's library's current stream: torch's
    ``torch.cuda.current_stream(x.device)`` for torch CUDA tensors (the capture stream while
    a CUDA graph is being captured), CuPy's ``get_current_stream()`` for CuPy arrays, and
    the legacy default stream for other CUDA arrays. Handle 0 (the NULL stream) is passed
    as 1, its unambiguous DLPack name. Raises TypeError for anything else.
    """
    if stream is not None:
        if isinstance(stream, bool):
            raise TypeError("stream must be a CUDA stream (an int handle, torch.cuda.Stream or cupy Stream), got bool")
        if isinstance(stream, int):
            handle = stream
        elif hasattr(stream, "cuda_stream"):
            handle = int(stream.cuda_stream)
        elif hasattr(stream, "ptr"):
            handle = int(stream.ptr)
        else:
            raise TypeError(f"stream must be a CUDA stream (an int handle, torch.cuda.Stream or cupy Stream), "
                            f"got {type(stream).__name__}")
        if handle < 0:
            raise ValueError(f"stream must be a non-negative handle, got {handle}")
        return handle or 1
    if is_torch(x):
        if not x.is_cuda:
            return None
        return _torch().cuda.current_stream(x.device).cuda_stream or 1
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy.cuda.get_current_stream().ptr or 1
    return None
