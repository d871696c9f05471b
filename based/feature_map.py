"""The Taylor feature map of BASED (paper Sec. 4.1, Eq. 4; SPEC 1.1)."""

from __future__ import annotations

from . import _arrays, _C


def feature_dim(head_dim: int) -> int:
    """Number of Taylor features F = 1 + Dk + Dk(Dk+1)/2 for feature dim Dk (153 for Dk=16).

    Raises ValueError if head_dim < 1.
    """
    if int(head_dim) < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    return int(_C.feature_dim(int(head_dim)))


def taylor_feature_map(x, *, scale=None, out=None):
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

    Returns:
        ``phi(x)`` of shape ``(..., F)`` and x's dtype, in x's array type (``out`` if given).
        Computed in float32 (float64 for float64 x).

    Raises:
        TypeError: x or out is not a DLPack array, or has an unsupported or mismatched dtype.
        ValueError: bad shapes, a non-positive or non-finite scale, devices that differ,
            out overlapping x or itself, or a read-only out.
        NotImplementedError: x is a CUDA array (this op has no CUDA kernel yet).
    """
    _arrays.require_no_grad(x, "x")
    xi = _arrays.info(x, "x")
    _arrays.require_float(xi, "x")
    if len(xi.shape) < 1 or xi.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., Dk) with Dk >= 1, got {tuple(xi.shape)}")
    dk = xi.shape[-1]
    if scale is None:
        scale = _arrays.default_scale(dk)
    if out is None:
        out = _arrays.empty(x, tuple(xi.shape[:-1]) + (feature_dim(dk),), xi.dtype, xi.device)
    _C.taylor_feature_map(x, out, scale)
    return out
