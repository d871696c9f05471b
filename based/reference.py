"""Readable float64 NumPy references for every based kernel.

These are the ground truth of the test suite: straight from the equations, no tricks,
in float64. They cite the paper (Arora et al., "Simple linear attention language models
balance the recall-throughput tradeoff", ICML 2024) and SPEC.md.
"""

from __future__ import annotations

import math

import numpy as np


def taylor_feature_map(x, scale=None):
    """phi(x) in the compact order of SPEC 1.1 (paper Sec. 4.1, Eq. 4), in float64.

    x: (..., Dk) array-like. Returns (..., 1 + Dk + Dk(Dk+1)/2) float64, such that
    phi(q) @ phi(k) == 1 + s + s**2 / 2 with s = scale * (q @ k).
    """
    x = np.asarray(x, dtype=np.float64)
    dk = x.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    i, j = np.triu_indices(dk)                      # upper triangle, row-major
    pair = x[..., i] * x[..., j]
    weight = np.where(i == j, scale / math.sqrt(2.0), scale)
    ones = np.ones(x.shape[:-1] + (1,))
    return np.concatenate([ones, math.sqrt(scale) * x, weight * pair], axis=-1)


def taylor_kernel(q, k, scale=None):
    """K(q, k) = 1 + s + s^2/2, s = scale * q.k, for broadcastable (..., Dk) inputs."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = scale * np.sum(q * k, axis=-1)
    return 1.0 + s + 0.5 * s * s
