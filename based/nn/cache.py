"""BasedCache: the recurrent state of a whole BasedLM, one state object per layer, and the
per-layer output buffers its decode steps write into (DecodeBuffer)."""

from __future__ import annotations

import torch

from .._state import as_indices


class DecodeBuffer:
    """One layer's decode-step output tensor, kept between steps.

    ``get(shape, dtype, device)`` returns the same tensor on every call while the request is
    unchanged, and allocates a new one (``torch.empty``) when shape, dtype or device change
    (a new batch size, a model cast to another dtype). An attention layer's ``step`` passes
    it as ``out=`` to ``based.linear_attention_decode`` / ``based.sliding_window_decode``, so
    a token costs no output allocation. Its contents are overwritten by the next step: the
    layer reads it (output projection) before returning, and nothing else keeps it.
    ``allocations`` counts the tensors made so far.
    """

    __slots__ = ("tensor", "allocations")

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.allocations = 0

    def get(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        t = self.tensor
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != torch.device(device):
            t = self.tensor = torch.empty(shape, dtype=dtype, device=device)
            self.allocations += 1
        return t

    def __repr__(self) -> str:
        t = self.tensor
        held = "empty" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}"
        return f"DecodeBuffer({held}, allocations={self.allocations})"


class BasedCache:
    """Per-layer decode states of a ``BasedLM``, in layer order.

    Each entry is the state object of that layer's mixer: a ``based.LinearAttentionState``
    (linear attention), a ``based.SlidingWindowCache`` (sliding window) or a
    ``based.nn.BaseConvState`` (BaseConv). All have the same batch; none grows with the
    sequence. ``reset`` and ``index_select`` act on every layer, so batched sampling (restart
    some sequences) and beam search (reorder sequences) work.

    ``buffers`` holds one ``DecodeBuffer`` per layer: the output tensors that
    ``BasedLM.step`` lets the decode kernels write into, allocated at the first step and
    reused by every later one (scratch, not state: ``nbytes``, ``clone`` and
    ``index_select`` leave them out, and a new cache starts with empty ones).
    """

    def __init__(self, states):
        self.states = list(states)
        self.buffers = [DecodeBuffer() for _ in self.states]

    @property
    def batch(self) -> int:
        return self.states[0].batch if self.states else 0

    @property
    def tokens(self):
        """Tokens seen by each sequence, ``(batch,)`` int64 (the first layer's counter)."""
        return self.states[0].tokens

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's state together: the model's whole recurrent memory."""
        return sum(s.nbytes for s in self.states)

    def reset(self, batch_indices=None) -> "BasedCache":
        """Zero the state of all sequences (None) or the given ones, in every layer. Returns self."""
        if batch_indices is not None:    # checked once, before any layer is reset
            batch_indices = as_indices(batch_indices, self.batch)
        for s in self.states:
            s.reset(batch_indices)
        return self

    def index_select(self, batch_indices) -> "BasedCache":
        """A new cache whose sequence i is this cache's sequence ``batch_indices[i]``
        (beam search: keep and duplicate the surviving beams)."""
        idx = as_indices(batch_indices, self.batch)
        return BasedCache(s.index_select(idx) for s in self.states)

    def reorder_(self, batch_indices) -> "BasedCache":
        """In place: sequence i becomes sequence ``batch_indices[i]`` (same batch size). Returns self."""
        idx = as_indices(batch_indices, self.batch)
        if len(idx) != self.batch:
            raise ValueError(f"reorder_: {len(idx)} indices for a batch of {self.batch}; use index_select "
                             "to change the batch size")
        for s in self.states:
            s.copy_(s.index_select(idx))
        return self

    def clone(self) -> "BasedCache":
        return BasedCache(s.clone() for s in self.states)

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        kinds = ", ".join(type(s).__name__ for s in self.states)
        return f"BasedCache(batch={self.batch}, layers=[{kinds}], nbytes={self.nbytes})"
