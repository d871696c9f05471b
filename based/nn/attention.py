"""The two attention mixers of BASED as PyTorch modules.

Each is split into ``project`` (x -> q, k, v in SPEC 2's ``(B, T, H, D)`` layout, rotary
applied), ``attend`` (the differentiable training path, ``based.nn.functional``) and
``output`` (heads -> d_model). Inference (``new_state``, ``prefill``, ``step``) hands the
projected q, k, v to based's kernels (``based.linear_attention_prefill/decode``,
``based.sliding_window_prefill/decode``) and their state objects.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import based

from . import functional


class LinearAttention(nn.Module):
    """Taylor linear attention layer (SPEC 1.1; paper Sec. 4.1).

    q and k are projected to ``heads x feature_dim`` (Dk, 16 in the paper), v to
    ``heads x head_dim`` (Dv: 64 in the 360M model, 112 in the 1.3B one); the heads' outputs
    are concatenated and projected back to ``dim``. No positional encoding (paper.md Sec. 1.7),
    no biases. Normalised, ``eps`` in the denominator, ``scale`` default ``1 / sqrt(feature_dim)``
    (the paper's Taylor map, whose feature map divides x by Dk^(1/4) and x x^T by sqrt(2 Dk)).

    Shapes: ``forward``: ``(B, T, dim) -> (B, T, dim)``.
    """

    def __init__(self, dim: int, heads: int, feature_dim: int = 16, head_dim: int = 64, eps: float = 1e-6,
                 scale: float | None = None):
        super().__init__()
        self.heads, self.feature_dim, self.head_dim, self.eps = heads, feature_dim, head_dim, eps
        self.scale = 1.0 / math.sqrt(feature_dim) if scale is None else float(scale)
        self.q_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def project(self, x: torch.Tensor):
        """``(B, T, dim)`` -> q, k ``(B, T, H, Dk)`` and v ``(B, T, H, Dv)``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.feature_dim)
        k = self.k_proj(x).view(b, t, self.heads, self.feature_dim)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim)
        return q, k, v

    def attend(self, q, k, v) -> torch.Tensor:
        """Training path: ``(B, T, H, Dv)`` from the quadratic form of SPEC 1.1."""
        return functional.linear_attention(q, k, v, scale=self.scale, normalize=True, eps=self.eps)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """``(B, T, H, Dv)`` -> ``(B, T, dim)``."""
        return self.out_proj(o.flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attend(*self.project(x)))

    # -- inference through based's kernels ----------------------------------------------

    def new_state(self, batch: int) -> "based.LinearAttentionState":
        """A zero float32 ``based.LinearAttentionState`` (torch tensors on the weights' device)."""
        return based.LinearAttentionState.zeros(batch, self.heads, self.feature_dim, self.head_dim,
                                                like=self.q_proj.weight, scale=self.scale)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, state: "based.LinearAttentionState") -> torch.Tensor:
        """``(B, T, dim)`` tokens continuing ``state`` -> ``(B, T, dim)``; state updated in place
        (``based.linear_attention_prefill``, the chunked kernel)."""
        q, k, v = self.project(x)
        o, _ = based.linear_attention_prefill(q, k, v, state, eps=self.eps)
        return self.output(o)

    @torch.no_grad()
    def step(self, x: torch.Tensor, state: "based.LinearAttentionState", buffer=None) -> torch.Tensor:
        """One token per sequence, ``(B, dim) -> (B, dim)`` (``based.linear_attention_decode``).

        ``buffer``: a ``based.nn.DecodeBuffer`` (``BasedCache.buffers``) whose ``(B, H, Dv)``
        tensor the kernel writes as ``out=``, the same memory every step; None allocates it."""
        q, k, v = (t[:, 0] for t in self.project(x[:, None]))
        out = None if buffer is None else buffer.get(v.shape, v.dtype, v.device)
        o = based.linear_attention_decode(q, k, v, state, eps=self.eps, out=out)
        return self.out_proj(o.flatten(-2))        # a new tensor: nothing keeps o past this step


class SlidingWindowAttention(nn.Module):
    """Sliding-window softmax attention layer with rotary embeddings and GQA (SPEC 1.2).

    Query t attends keys ``(t - window, t]`` (``window`` keys, itself included). q is projected
    to ``heads x head_dim``, k and v to ``kv_heads x head_dim`` (``kv_heads`` divides ``heads``;
    query head h reads kv head ``h // (heads // kv_heads)``). Rotary embeddings (full head dim,
    non-interleaved, ``rotary_base``; ``rotary_dim`` and ``rotary_interleaved`` as in
    ``functional.apply_rotary``) are applied to q and k in ``project``, before attention.
    ``scale = 1 / sqrt(head_dim)``; no biases unless ``qkv_bias`` / ``out_bias``.

    Shapes: ``forward``: ``(B, T, dim) -> (B, T, dim)``.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, window: int,
                 rotary_base: float = 10000.0, *, rotary_dim: int | None = None, rotary_interleaved: bool = False,
                 qkv_bias: bool = False, out_bias: bool = False):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.window, self.rotary_base = window, rotary_base
        self.rotary_dim, self.rotary_interleaved = rotary_dim, rotary_interleaved
        self.scale = 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=out_bias)

    def project(self, x: torch.Tensor, start=0):
        """``(B, T, dim)`` at positions ``start + [0, T)`` -> q ``(B, T, H, D)``, k and v
        ``(B, T, Hkv, D)``, rotary applied to q and k. ``start``: an int, or a ``(B,)`` integer
        tensor giving each sequence's own first position (a cache's ``tokens``)."""
        b, t, _ = x.shape
        positions = functional.rotary_positions(start, t, x.device)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        rotary = dict(rotary_dim=self.rotary_dim, interleaved=self.rotary_interleaved)
        q = functional.apply_rotary(q, positions, self.rotary_base, **rotary)
        k = functional.apply_rotary(k, positions, self.rotary_base, **rotary)
        return q, k, v

    def attend(self, q, k, v) -> torch.Tensor:
        """Training path: ``(B, T, H, D)`` through a boolean band mask (SPEC 1.2)."""
        return functional.sliding_window_attention(q, k, v, window=self.window, scale=self.scale)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """``(B, T, H, D)`` -> ``(B, T, dim)``."""
        return self.out_proj(o.flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attend(*self.project(x)))

    # -- inference through based's kernels ----------------------------------------------

    def new_state(self, batch: int) -> "based.SlidingWindowCache":
        """An empty ring-buffer ``based.SlidingWindowCache`` of ``window`` slots in the
        weights' dtype (torch tensors on the weights' device); memory never grows."""
        return based.SlidingWindowCache.zeros(batch, self.kv_heads, self.window, self.head_dim,
                                              like=self.k_proj.weight, scale=self.scale)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, cache: "based.SlidingWindowCache") -> torch.Tensor:
        """``(B, T, dim)`` tokens continuing ``cache`` -> ``(B, T, dim)``; rotary positions start
        at each sequence's ``cache.tokens``; cache updated in place."""
        q, k, v = self.project(x, start=cache.tokens)
        o, _ = based.sliding_window_prefill(q, k, v, cache=cache)
        return self.output(o)

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: "based.SlidingWindowCache", buffer=None) -> torch.Tensor:
        """One token per sequence, ``(B, dim) -> (B, dim)`` (``based.sliding_window_decode``).

        ``buffer``: a ``based.nn.DecodeBuffer`` (``BasedCache.buffers``) whose ``(B, H, D)``
        tensor the kernel writes as ``out=``, the same memory every step; None allocates it."""
        q, k, v = (t[:, 0] for t in self.project(x[:, None], start=cache.tokens))
        out = None if buffer is None else buffer.get(q.shape, v.dtype, v.device)
        o = based.sliding_window_decode(q, k, v, cache, out=out)
        return self.out_proj(o.flatten(-2))        # a new tensor: nothing keeps o past this step
