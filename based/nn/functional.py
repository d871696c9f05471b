"""Differentiable pure-PyTorch training paths of the two BASED attentions, and rotary.

These compute exactly the math of SPEC 1.1 and 1.2 (no approximation), in the quadratic
(masked) form: memory grows as T^2, which is fine at training lengths. Inference goes
through based's kernels, which compute the same numbers with a fixed-size state.

Layout is SPEC 2's: ``(batch, seqlen, heads, dim)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # accumulation is at least float32 (SPEC 2); float64 stays float64 (tests)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Causal 2nd-order Taylor linear attention, quadratic form (SPEC 1.1; paper Sec. 4.1, Eq. 2-4).

    With ``s = scale * q_t . k_u`` and ``K = 1 + s + s^2 / 2``::

        o_t = sum_{u<=t} K(q_t, k_u) v_u / (sum_{u<=t} K(q_t, k_u) + eps)     (normalize)
        o_t = sum_{u<=t} K(q_t, k_u) v_u                                        (not normalize)

    Args:
        q, k: ``(B, T, H, Dk)``; v: ``(B, T, H, Dv)``; any float dtype, one device.
        scale: default ``1 / sqrt(Dk)``.
        normalize, eps: as above (SPEC defaults True, 1e-6).

    Returns:
        ``(B, T, H, Dv)`` in v's dtype. Computed in float32 (float64 for float64 inputs),
        autocast disabled, so the training path matches the kernels' fp32 accumulation.
        Memory: ``B * H * T^2`` compute-dtype elements.
    """
    dk = q.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    dtype = _compute_dtype(v)
    t = q.shape[1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf = q.to(dtype).transpose(1, 2)                      # (B, H, T, Dk)
        kf = k.to(dtype).transpose(1, 2)                      # (B, H, T, Dk)
        vf = v.to(dtype).transpose(1, 2)                      # (B, H, T, Dv)
        s = (qf @ kf.transpose(-1, -2)) * scale               # (B, H, T, T)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        kernel = (1.0 + s + 0.5 * s * s).masked_fill(~causal, 0.0)
        o = kernel @ vf                                       # (B, H, T, Dv)
        if normalize:
            o = o / (kernel.sum(-1, keepdim=True) + eps)
    return o.transpose(1, 2).to(v.dtype)


def window_mask(t: int, window: int, device=None) -> torch.Tensor:
    """Boolean ``(T, T)`` mask, True where query t may attend key u: ``t - window < u <= t``."""
    pos = torch.arange(t, device=device)
    offset = pos[:, None] - pos[None, :]                      # t - u
    return (offset >= 0) & (offset < window)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention over the ``window`` most recent keys, self included (SPEC 1.2).

    ``o_t = softmax_u(scale * q_t . k_u) @ v_u`` over ``u in (t - window, t]``; flash-attention's
    ``window_size=(window - 1, 0)``. Grouped-query attention: query head h reads kv head
    ``h // (H // Hkv)``. Rotary embeddings are the caller's (apply them to q and k first).

    Args:
        q: ``(B, T, H, D)``; k, v: ``(B, T, Hkv, D)`` with ``H % Hkv == 0``.
        window: keys per query, >= 1.
        scale: default ``1 / sqrt(D)``.

    Returns:
        ``(B, T, H, D)`` in q's dtype (PyTorch's scaled_dot_product_attention with a boolean
        band mask; its softmax runs in at least float32).

    Raises:
        ValueError: window < 1, or Hkv does not divide H.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv heads ({kv_heads}) must divide query heads ({heads})")
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = window_mask(q.shape[1], window, q.device)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def rotary_positions(start, t: int, device=None) -> torch.Tensor:
    """Positions ``start + [0, T)``: ``(1, T)`` for an int start, ``(B, T)`` for a ``(B,)`` tensor
    (each sequence of a batch at its own offset, e.g. a state's ``tokens``)."""
    steps = torch.arange(t, device=device)
    if isinstance(start, torch.Tensor):
        return start.to(device=device, dtype=torch.int64).reshape(-1, 1) + steps
    return (int(start) + steps).reshape(1, t)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, *,
                 rotary_dim: int | None = None, interleaved: bool = False) -> torch.Tensor:
    """Rotary position embedding (RoPE) on the first ``rotary_dim`` dims of each head.

    With ``R = rotary_dim`` (default: the full head dim D) the vector at position p has its
    pairs rotated by angle ``p * base^(-2i/R)``, i in [0, R/2); dims R..D-1 pass through, so
    ``apply_rotary(q, m) . apply_rotary(k, n)`` depends on m - n only. Pair i is
    ``(i, i + R/2)`` ("rotate half", non-interleaved: the layout of the paper's
    sliding-window layers, paper.md Sec. 1.7, full head dim, base 10000) or ``(2i, 2i + 1)``
    when ``interleaved`` (GPT-J style). These are flash-attention's RotaryEmbedding
    conventions (``rotary_emb_dim``, ``interleaved``), which the released checkpoints use.

    Args:
        x: ``(B, T, H, D)``.
        positions: ``(B, T)`` or ``(1, T)`` integer positions (``rotary_positions``).
        base: the frequency base.
        rotary_dim: R, even, 0 < R <= D (None: D).
        interleaved: pair layout, as above.

    Returns:
        ``(B, T, H, D)`` in x's dtype; the rotation is computed in float32 (float64 for float64).

    Raises:
        ValueError: R odd or outside (0, D].
    """
    d = x.shape[-1]
    r = d if rotary_dim is None else int(rotary_dim)
    if r <= 0 or r > d or r % 2:
        raise ValueError(f"rotary_dim must be even and in (0, {d}] (the head dim), got {rotary_dim}")
    dtype = _compute_dtype(x)
    inv_freq = base ** (-torch.arange(0, r, 2, device=x.device, dtype=dtype) / r)     # (R/2,)
    angle = positions.to(dtype)[..., None] * inv_freq                                  # (B, T, R/2)
    cos = angle.cos()[:, :, None, :]                                                   # (B, T, 1, R/2)
    sin = angle.sin()[:, :, None, :]
    xf = x.to(dtype)
    rot, rest = xf[..., :r], xf[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rot, rest), dim=-1).to(x.dtype) if r < d else rot.to(x.dtype)
