"""The Taylor feature map of BASED (paper Sec. 4.1, Eq. 4; SPEC 1.1)."""

from __future__ import annotations

from . import _args, _arrays, _C

# largest Dk for which the C core computes F in int64 (Dk * (Dk + 1) must fit)
MAX_FEATURE_DIM_INT64 = _C.limits()["max_feature_map_dim"]


def feature_dim(head_dim: int) -> int:
    """Number of Taylor features F = 1 + Dk + Dk(Dk+1)/2 for feature dim Dk (153 for Dk=16).

    Args:
        head_dim: Dk, an int (Python, numpy or torch integer; not a float or bool).

    Raises:
        TypeError: head_dim is not an int. ValueError: head_dim outside
        1..3037000498 (beyond, F would overflow the C core's int64).
    """
    dk = _args.as_int(head_dim, "head_dim", 1, MAX_FEATURE_DIM_INT64)
    return int(_C.feature_dim(dk))


def taylor_feature_map(x, *, scale=None, out=None, stream=None):
    """2nd-order Taylor feature map phi(x), compact (symmetric) order.

    ``phi(q) . phi(k) = 1 + s + s**2 / 2`` with ``s = scale * (q . k)``: the kernel of
    BASED's linear attention, a 2nd-order Taylor expansion of ``exp(s)`` (Arora et al.,
    ICML 2024, Sec. 4.1, Eq. 4). Feature order (SPEC 1.1)::

        phi[0]         = 1
        phi[1 + i]     = sqrt(scale) * x[i]                  for i in 0..Dk-1
        then for i in 0..Dk-1, for j in i..Dk-1 (upper triangle, row-major):
                         scale / sqrt(2) * x[i] * x[i]       if i == j
                         scale * x[i] * x[j]                 if i <  j

    Args:
        x: array of shape ``(..., Dk)``, Dk >= 1; float32, float64, float16 or bfloat16;
            any strides; any DLPack array (torch, numpy, cupy, jax, based.Buffer).
        scale: positive finite float; default ``1 / sqrt(Dk)``.
        out: optional array of shape ``(..., F)`` with x's dtype and device, written in
            place; ``F = 1 + Dk + Dk(Dk+1)/2``. Must not overlap x.
        stream: CUDA stream to run on (an int ``cudaStream_t`` handle, a
            ``torch.cuda.Stream`` or a CuPy stream); default the current stream of the
            inputs' library (PyTorch's ``torch.cuda.current_stream()``, CuPy's current
            stream), else the legacy default stream. Ignored on the CPU. The call never
            synchronises: results are ready in that stream's order.

    Returns:
        ``phi(x)`` of shape ``(..., F)`` and x's dtype, in x's array type (``out`` if given).
        Computed in float32 (float64 for float64 x).

    Raises:
        TypeError: x or out is not a DLPack array, or has an unsupported or mismatched dtype;
            a scale that is not a number (a bool is not).
        ValueError: bad shapes (an output whose size would overflow 64-bit indexing is
            refused before it is allocated), a non-positive or non-finite scale, devices that
            differ, out overlapping x or itself, or a read-only out.
        NotImplementedError: x is a CUDA array and based was built without CUDA.
    """
    _arrays.require_no_grad(x, "x")
    xi = _arrays.info(x, "x")
    _arrays.require_float(xi, "x")
    if len(xi.shape) < 1 or xi.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., Dk) with Dk >= 1, got {tuple(xi.shape)}")
    dk = xi.shape[-1]
    scale = _args.as_scale(scale, dk)
    if out is None:
        shape = tuple(xi.shape[:-1]) + (feature_dim(dk),)
        _arrays.require_indexable("out", "(..., F)", shape, xi.dtype)
        out = _arrays.empty(x, shape, xi.dtype, xi.device)
    _C.taylor_feature_map(x, out, scale, _arrays.stream_handle(stream, x))
    return out
