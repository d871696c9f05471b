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


def linear_attention(q, k, v, scale=None, normalize=True, eps=1e-6):
    """Causal Taylor linear attention, quadratic form (SPEC 1.1; paper Sec. 4.1, Eq. 2-4), float64.

    q, k: (B, T, H, Dk); v: (B, T, H, Dv). Returns (B, T, H, Dv)::

        o_t = sum_{u<=t} K(q_t, k_u) v_u / (sum_{u<=t} K(q_t, k_u) + eps),  K = 1 + s + s^2/2
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    t = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = scale * np.einsum("bthd,buhd->bhtu", q, k)
    kernel = (1.0 + s + 0.5 * s * s) * np.tril(np.ones((t, t)))
    num = np.einsum("bhtu,buhd->bthd", kernel, v)
    if not normalize:
        return num
    den = kernel.sum(-1).transpose(0, 2, 1)[..., None]          # (B, T, H, 1)
    return num / (den + eps)


def sliding_window_attention(q, k, v, window, scale=None):
    """Causal softmax attention over keys u in (t - window, t] (SPEC 1.2), float64.

    q: (B, T, H, D); k, v: (B, T, Hkv, D), H % Hkv == 0, query head h reads kv head
    h // (H // Hkv). Returns (B, T, H, D).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    t, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    group = heads // kv_heads
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = scale * np.einsum("bthd,buhd->bhtu", q, k)
    pos = np.arange(t)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhtu,buhd->bthd", p, v)


def taylor_feature_map_expanded(x, scale=None):
    """phi273(x): the paper code's expanded layout (HazyResearch/based ``TaylorExp``), float64.

    x: (..., Dk). Returns (..., 1 + Dk + Dk^2) = [1, sqrt(scale) x, scale/sqrt(2) vec(x x^T)]
    (row-major (i, j)), so phi273(q) @ phi273(k) == 1 + s + s**2 / 2 as for the compact map.
    """
    x = np.asarray(x, dtype=np.float64)
    dk = x.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (dk * dk,))
    ones = np.ones(x.shape[:-1] + (1,))
    return np.concatenate([ones, math.sqrt(scale) * x, scale / math.sqrt(2.0) * outer], axis=-1)


def _state_or_zeros(kv, ksum, b, h, f, dv):
    kv = np.zeros((b, h, f, dv)) if kv is None else np.asarray(kv, dtype=np.float64)
    ksum = np.zeros((b, h, f)) if ksum is None else np.asarray(ksum, dtype=np.float64)
    return kv, ksum


def linear_attention_quadratic(q, k, v, *, scale=None, normalize=True, eps=1e-6, kv=None, ksum=None):
    """Causal Taylor linear attention by the masked T x T form (SPEC 1.1; paper Eq. 2), float64.

    q, k: (B, T, H, Dk); v: (B, T, H, Dv). kv (B, H, F, Dv) and ksum (B, H, F), if given,
    are a state of earlier tokens: they add phi(q_t) @ kv to the numerator and
    phi(q_t) @ ksum to the normaliser of every output. Returns o: (B, T, H, Dv)::

        s[t, u] = scale * q_t . k_u,   A = tril(1 + s + s^2/2)
        o_t = (A v)_t / (sum_u A[t, u] + eps)        (or (A v)_t without normalize)
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    b, t, h, dk = q.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    s = scale * np.einsum("bthd,bshd->bhts", q, k)
    a = np.tril(1.0 + s + 0.5 * s * s)
    num = np.einsum("bhts,bshv->bthv", a, v)
    den = a.sum(-1).transpose(0, 2, 1)                         # (B, T, H)
    if kv is not None or ksum is not None:
        kv, ksum = _state_or_zeros(kv, ksum, b, h, 1 + dk + dk * (dk + 1) // 2, v.shape[-1])
        phi_q = taylor_feature_map(q, scale)                   # (B, T, H, F)
        num = num + np.einsum("bthf,bhfv->bthv", phi_q, kv)
        den = den + np.einsum("bthf,bhf->bth", phi_q, ksum)
    return num / (den[..., None] + eps) if normalize else num


def linear_attention_recurrent(q, k, v, *, scale=None, normalize=True, eps=1e-6, kv=None, ksum=None):
    """Causal Taylor linear attention by the recurrent form (SPEC 1.1; paper Eq. 3), float64.

    Same arguments as ``linear_attention_quadratic``. Token by token::

        kv += phi(k_t) v_t^T;  ksum += phi(k_t)
        o_t = phi(q_t) kv / (phi(q_t) . ksum + eps)

    Returns (o, kv, ksum): outputs (B, T, H, Dv) and the final state (new arrays).
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    b, t, h, dk = q.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    kv, ksum = _state_or_zeros(kv, ksum, b, h, 1 + dk + dk * (dk + 1) // 2, v.shape[-1])
    kv, ksum = kv.copy(), ksum.copy()
    phi_q, phi_k = taylor_feature_map(q, scale), taylor_feature_map(k, scale)
    o = np.empty(v.shape)
    for i in range(t):
        kv += np.einsum("bhf,bhv->bhfv", phi_k[:, i], v[:, i])
        ksum += phi_k[:, i]
        num = np.einsum("bhf,bhfv->bhv", phi_q[:, i], kv)
        den = np.einsum("bhf,bhf->bh", phi_q[:, i], ksum)
        o[:, i] = num / (den[..., None] + eps) if normalize else num
    return o, kv, ksum


def linear_attention_state(k, v, *, scale=None, kv=None, ksum=None):
    """The state after folding (k, v) into (kv, ksum) (zeros if None), float64:
    kv + sum_t phi(k_t) v_t^T (B, H, F, Dv) and ksum + sum_t phi(k_t) (B, H, F)."""
    k, v = np.asarray(k, dtype=np.float64), np.asarray(v, dtype=np.float64)
    b, t, h, dk = k.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    kv, ksum = _state_or_zeros(kv, ksum, b, h, 1 + dk + dk * (dk + 1) // 2, v.shape[-1])
    phi_k = taylor_feature_map(k, scale)
    return kv + np.einsum("bthf,bthv->bhfv", phi_k, v), ksum + phi_k.sum(1)
def sliding_window_mask(t_q, t_k, window, offset=0):
    """Boolean (t_q, t_k) band: query i (absolute position offset + i) may attend key j
    (absolute position j) iff offset + i - window < j <= offset + i (SPEC 1.2; flash-attention
    window_size=(window - 1, 0))."""
    p = offset + np.arange(t_q)[:, None]
    u = np.arange(t_k)[None, :]
    return (u <= p) & (u > p - window)


def sliding_window_attention(q, k, v, window, scale=None, offset=0):
    """Sliding-window softmax attention in float64 with an explicit mask (SPEC 1.2, paper Sec. 4).

    q: (B, T, H, D) queries at absolute positions offset .. offset+T-1; k, v: (B, offset+T,
    Hkv, D) keys and values of every position from 0 (the history a cache would hold, then
    the call's own); H % Hkv == 0, query head h reads kv head h // (H // Hkv).
    Returns (B, T, H, D) float64:
        o[b, t, h] = softmax(scale * q[b, t, h] @ k[b, :, h // G].T  masked to the band) @ v[b, :, h // G]
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    _, t_q, heads, dim = q.shape
    group = heads // k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    k = np.repeat(k, group, axis=2)                 # (B, S, H, D): kv head h // group for head h
    v = np.repeat(v, group, axis=2)
    scores = scale * np.einsum("bthd,bshd->bhts", q, k)
    scores = np.where(sliding_window_mask(t_q, k.shape[1], window, offset), scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True, initial=-np.inf)   # every row holds its own key
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)
