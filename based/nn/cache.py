"""BasedCache: the recurrent state of a whole BasedLM, one state object per layer."""

from __future__ import annotations

from .._state import as_indices


class BasedCache:
    """Per-layer decode states of a ``BasedLM``, in layer order.

    Each entry is the state object of that layer's mixer: a ``based.LinearAttentionState``
    (linear attention), a ``based.SlidingWindowCache`` (sliding window) or a
    ``based.nn.BaseConvState`` (BaseConv). All have the same batch; none grows with the
    sequence. ``reset`` and ``index_select`` act on every layer, so batched sampling (restart
    some sequences) and beam search (reorder sequences) work.
    """

    def __init__(self, states):
        self.states = list(states)

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
