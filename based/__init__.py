"""based: BASED attention kernels (Arora et al., ICML 2024) for PyTorch, NumPy, CuPy and JAX.

BASED mixes two cheap attentions: 2nd-order Taylor linear attention (global, fixed-size
recurrent state) and sliding-window softmax attention (exact, local). This package runs
their prefill and decode through a C core (and CUDA kernels where built), taking and
returning any DLPack array without copies. SPEC.md is the contract.
"""

import os as _os

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"based's compiled extension (based._C) is missing from {_os.path.dirname(__file__)}. If that is a "
        "source checkout, build it in place with `pip install -e .` (or import based from another "
        "directory after `pip install .`)."
    ) from exc
from . import _args, _arrays
from ._arrays import parse_device as _parse_device
from .feature_map import feature_dim, taylor_feature_map
from .linear_attention import LinearAttentionState, linear_attention_decode, linear_attention_prefill
from .sliding_window import SlidingWindowCache, sliding_window_decode, sliding_window_prefill

__version__ = _C.__version__

if _os.environ.get("BASED_CPU_ISA", "") not in ("", "generic", "avx2"):
    raise ImportError(f"BASED_CPU_ISA={_os.environ['BASED_CPU_ISA']!r} is not understood: the values are "
                      "'generic' (the portable CPU kernels) and 'avx2' (no AVX-512 kernels); unset it to let "
                      "based pick the fastest")

Buffer = _C.Buffer


def cuda_available() -> bool:
    """True if CUDA ops can run: the extension was built with nvcc and a CUDA device is usable.

    Never raises; False on machines without a GPU or driver.
    """
    return bool(_C.build_info()["cuda"]) and _C.cuda_device_count() > 0


def build_info() -> dict:
    """How this extension was built and what it runs on this machine.

    Keys: ``version``; ``cuda`` (compiled with nvcc: the CUDA runtime and based.Buffer on GPUs;
    the attention ops have no CUDA kernels yet), ``cuda_archs``, ``cuda_devices`` (GPUs usable
    now); ``openmp``, ``num_threads`` (threads the CPU ops may use now: ``get_num_threads()``;
    ``max_threads`` is its former name, the same value); ``cpu_kernels``: the CPU kernels each op runs, chosen at run
    time from the CPU -- ``{'linear_attention': 'avx2+fma' | 'generic', 'sliding_window':
    'avx512' | 'avx2' | 'generic'}``; ``BASED_CPU_ISA=generic`` forces the portable ones,
    ``BASED_CPU_ISA=avx2`` rules out AVX-512; ``limits``: the C core's limits (``max_ndim``,
    ``max_feature_dim`` Dk, ``max_chunk_size``, ``max_head_dim`` D, ``max_feature_map_dim`` the Dk of
    ``feature_dim``).
    """
    info = dict(_C.build_info())
    info["num_threads"] = info["max_threads"]
    info["limits"] = _C.limits()
    info["cuda_devices"] = _C.cuda_device_count()
    info["cpu_kernels"] = {"linear_attention": _C.linear_kernel_isa(), "sliding_window": _C.window_kernel_isa()}
    return info


def set_num_threads(n: int) -> None:
    """Sets how many threads based's CPU ops may use, for the whole process; ``0`` restores the default.

    Args:
        n: a count of threads (OpenMP worker threads, the calling one included): an int >= 1,
            or 0 for the default (see ``get_num_threads``). numpy and torch integer scalars are
            taken (``operator.index``); bools are not counts.

    The count is an upper bound: an op runs on fewer threads when its work is small, so that
    each thread gets at least 256 KiB of state or cache to read (decode steps, cache updates)
    or about a million (2**20) multiply-adds (prefills); a decode step of a small model runs
    on the calling thread. PyTorch's own thread count is not changed: call
    ``torch.set_num_threads`` for that (by default based follows it, see ``get_num_threads``).
    Safe to call from any thread, also while ops run (a running op keeps the count it started
    with). CUDA ops are not affected.

    Raises:
        TypeError: ``n`` is not an int (a bool, a float, a str, ...); the message names ``n``.
        ValueError: ``n`` < 0 or ``n`` >= 2**31; the message names ``n`` and the value.
        Nothing is changed when it raises.
    """
    _C.set_num_threads(_args.as_int(n, "n", 0, 2**31 - 1))


def get_num_threads() -> int:
    """The number of threads a CPU op started now on this thread may use (an int >= 1).

    The count given to ``set_num_threads``, else the default: OpenMP's thread count for the
    calling thread (``OMP_NUM_THREADS``, else one per CPU), capped at the CPUs this process may
    run on (its affinity mask), as threads beyond the cores only wait for each other. The
    default cooperates with PyTorch: torch and based load one OpenMP runtime per process
    (PyTorch's wheel ships ``libgomp.so.1``, the soname based links), so
    ``torch.set_num_threads(n)`` sets based's default to ``n`` too, and the two never run two
    thread pools against each other. 1 when based was built without OpenMP. An op may use fewer
    (see ``set_num_threads``). Never raises.
    """
    return _C.get_num_threads()


def zeros(shape, dtype: str = "float32", device="cpu") -> Buffer:
    """A zero-filled ``based.Buffer``: memory owned by based, viewable without a copy.

    Args:
        shape: sequence of non-negative ints (Python, numpy or torch integers; a bare int n
            means ``(n,)``, as in numpy). Floats, strings and bools are refused.
        dtype: 'float32', 'float64', 'float16', 'bfloat16' or 'int64' (or the numpy/torch dtype).
        device: 'cpu', 'cuda' or 'cuda:N' (CUDA needs a CUDA build and a GPU).

    Returns:
        A ``based.Buffer``; ``numpy.from_dlpack``, ``torch.from_dlpack``,
        ``cupy.from_dlpack`` and ``jax.dlpack.from_dlpack`` view it zero-copy, and those
        views keep the memory alive after the Buffer is gone. Host memory is 256-byte aligned;
        CUDA memory is zero-filled and the device synchronised before this returns (an
        allocation-time cost, never paid by the ops).

    Raises:
        TypeError: unknown dtype, a shape entry that is not an int. ValueError: a negative
        dimension, a size beyond 64-bit indexing, or a device that is not there (e.g.
        'cuda' on a machine without a GPU or driver). NotImplementedError: a CUDA device in a
        build without CUDA. MemoryError.
    """
    dtype = _args.as_dtype(dtype, allowed=_arrays.FLOAT_DTYPES + ("int64",))
    return _C.zeros(_args.as_shape(shape), dtype, *_parse_device(device))


__all__ = [
    "__version__",
    "Buffer",
    "build_info",
    "cuda_available",
    "get_num_threads",
    "set_num_threads",
    "feature_dim",
    "taylor_feature_map",
    "zeros",
    "LinearAttentionState",
    "linear_attention_prefill",
    "linear_attention_decode",
    "SlidingWindowCache",
    "sliding_window_prefill",
    "sliding_window_decode",
]
