"""RMSNorm, the SwiGLU MLP, and BaseConv (the gated short convolution) with its decode state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._state import RecurrentState


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * weight`` over the last dim.

    Shapes: ``(..., dim) -> (..., dim)``, x's dtype; the statistics are float32.
    The paper's models use pre-norm RMSNorm with eps 1e-5 (paper.md Sec. 4).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP ``down(silu(gate(x)) * up(x))`` (Shazeer 2020; the paper's MLP), no biases
    unless ``bias`` (then all three projections have one).

    Shapes: ``(..., dim) -> (..., dim)`` through a hidden width ``hidden``.
    """

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BaseConvState(RecurrentState):
    """Decode state of one BaseConv layer: the last ``kernel_size - 1`` inputs of its
    depthwise convolution, per sequence and channel, oldest first.

    Tensors (torch, batch on axis 0): ``inputs (B, C, kernel_size - 1)`` in the layer's
    compute dtype, ``tokens (B,)`` int64. A fresh state is zeros, which is exactly the causal
    zero padding of the full convolution, so ``prefill`` then ``step`` equals one ``forward``.
    reset / copy_ / clone / index_select / save / load come from ``based._state.RecurrentState``.
    """

    _tensors = ("inputs", "tokens")
    _settings = ("kernel_size",)
    _ndims = {"inputs": 3, "tokens": 1}

    @classmethod
    def zeros(cls, batch: int, channels: int, kernel_size: int, *, dtype=torch.float32, device="cpu"):
        """A zero state for ``batch`` sequences."""
        if batch < 0 or channels < 1 or kernel_size < 1:
            raise ValueError(f"BaseConvState.zeros: need batch >= 0, channels >= 1, kernel_size >= 1; "
                             f"got batch={batch}, channels={channels}, kernel_size={kernel_size}")
        tensors = {
            "inputs": torch.zeros(batch, channels, kernel_size - 1, dtype=dtype, device=device),
            "tokens": torch.zeros(batch, dtype=torch.int64, device=device),
        }
        return cls(tensors, {"kernel_size": int(kernel_size)})

    @property
    def inputs(self) -> torch.Tensor:
        """``(B, C, kernel_size - 1)``: the convolution's most recent inputs, oldest first."""
        return self._t["inputs"]

    @property
    def kernel_size(self) -> int:
        return self._s["kernel_size"]

    def _zeros_like_self(self, batch: int):
        x = self.inputs
        return type(self).zeros(batch, x.shape[1], self.kernel_size, dtype=x.dtype, device=x.device)

    @classmethod
    def load(cls, path, device="cpu"):
        """Read a state written by ``save``. ValueError naming the file for one that is not
        a saved BaseConvState (empty, truncated, damaged, or of impossible sizes)."""
        meta, arrays = cls._read(path)
        with cls._file_errors(path, cls.__name__):
            dtype = getattr(torch, meta["dtypes"]["inputs"])
            batch, channels, taps = arrays["inputs"].shape
            kernel_size = meta["settings"]["kernel_size"]
            if type(kernel_size) is not int or kernel_size != taps + 1:
                raise ValueError(f"kernel_size setting {kernel_size!r} does not match inputs' shape "
                                 f"{arrays['inputs'].shape}")
            cls.zeros(0, channels, kernel_size, dtype=dtype)
        state = cls.zeros(batch, channels, kernel_size, dtype=dtype, device=device)
        with cls._file_errors(path, cls.__name__):
            return state._fill_from(arrays)


class BaseConv(nn.Module):
    """Gated short causal convolution ("BaseConv", Arora et al. 2024, Sec. 4; paper.md Sec. 1.8).

    ``u1, u2 = split(in_proj(x))`` (each of width ``inner``), ``y = silu(conv(u1)) * u2``,
    ``out = out_proj(y)``, where ``conv`` is a causal depthwise convolution with
    ``kernel_size`` taps (3 in the paper). in_proj and out_proj have biases, as in the paper
    (``proj_bias``); so does the convolution (``conv_bias``; the released checkpoints have none).

    Shapes: ``forward``/``prefill``: ``(B, T, dim) -> (B, T, dim)``; ``step``: ``(B, dim) -> (B, dim)``.
    The decode state is a ``BaseConvState`` (``new_state``).
    """

    def __init__(self, dim: int, inner: int, kernel_size: int = 3, *, proj_bias: bool = True,
                 conv_bias: bool = True):
        super().__init__()
        self.inner = inner
        self.kernel_size = kernel_size
        self.in_proj = nn.Linear(dim, 2 * inner, bias=proj_bias)
        self.conv = nn.Conv1d(inner, inner, kernel_size, groups=inner, bias=conv_bias)
        self.out_proj = nn.Linear(inner, dim, bias=proj_bias)

    def _gate_out(self, conv: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.silu(conv) * u2)

    def _convolve(self, u1: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        # u1: (B, T, C); history: (B, C, k-1) or None (zeros) -> (B, T, C), and the padded
        # input (B, C, T + k-1) whose last k-1 columns are the next history
        x = u1.transpose(1, 2)
        if history is None:
            padded = F.pad(x, (self.kernel_size - 1, 0))
        else:
            padded = torch.cat((history.to(x.dtype), x), dim=-1)
        return F.conv1d(padded, self.conv.weight, self.conv.bias, groups=self.inner).transpose(1, 2), padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        conv, _ = self._convolve(u1, None)
        return self._gate_out(conv, u2)

    def new_state(self, batch: int, *, dtype=None, device=None) -> BaseConvState:
        """A zero ``BaseConvState`` for ``batch`` sequences (default: the weights' dtype and device)."""
        w = self.conv.weight
        return BaseConvState.zeros(batch, self.inner, self.kernel_size, dtype=dtype or w.dtype,
                                   device=device or w.device)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, state: BaseConvState) -> torch.Tensor:
        """Run ``(B, T, dim)`` tokens that continue ``state``; update the state in place.
        Inference only (no autograd)."""
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        with state._in_use:
            conv, padded = self._convolve(u1, state.inputs)
            state.inputs.copy_(padded[..., padded.shape[-1] - (self.kernel_size - 1):])
            state.tokens.add_(x.shape[1])
        return self._gate_out(conv, u2)

    @torch.no_grad()
    def step(self, x: torch.Tensor, state: BaseConvState, buffer=None) -> torch.Tensor:
        """One decode token per sequence, ``(B, dim) -> (B, dim)``; update the state in place.
        Inference only (no autograd). ``buffer`` is accepted so every mixer's ``step`` takes
        the same arguments, and unused: this step calls no based kernel."""
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)                       # (B, C) each
        with state._in_use:
            taps = torch.cat((state.inputs.to(u1.dtype), u1[:, :, None]), dim=-1)   # (B, C, k)
            state.inputs.copy_(taps[..., 1:])
            state.tokens.add_(1)
        conv = (taps * self.conv.weight[:, 0, :]).sum(-1)
        if self.conv.bias is not None:
            conv = conv + self.conv.bias
        return self._gate_out(conv, u2)
