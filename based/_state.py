"""Machinery shared by the recurrent states (LinearAttentionState, SlidingWindowCache).

A state is a small named bundle of arrays whose axis 0 is the batch (one row per
sequence), plus settings it was built with (``scale``, ``window``...). The arrays are the
caller's own type (torch, numpy, or a based.Buffer when no framework was at hand) and
the properties return them as they are: zero-copy views, writes through them change the
state. Batch management (reset, copy, clone, reorder) runs in the C core
(``based_state_zero/copy/gather``), so it works for every dtype and stride.

File format of ``save``/``load``: a NumPy ``.npz`` archive (``numpy.savez``) with one
entry per tensor, named as the attribute (``kv``, ``ksum``, ``tokens``...), and an entry
``__based_state__`` holding UTF-8 JSON::

    {"format": "based-state", "version": 1, "class": "LinearAttentionState",
     "dtypes": {"kv": "bfloat16", ...}, "settings": {"scale": 0.25, ...}}

NumPy has no bfloat16, so bfloat16 and float16 tensors are stored as float32 (exact) and
converted back on load; ``dtypes`` records what they were.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import numpy as np

from . import _arrays, _C

FORMAT_NAME = "based-state"
FORMAT_VERSION = 1


def _dtype_name(a: Any) -> str:
    if _arrays.is_torch(a):
        return _arrays.torch_dtype_name(a.dtype)
    if isinstance(a, np.ndarray):
        return a.dtype.name
    return _C.dlpack_info(a)[1]


def _nbytes(a: Any) -> int:
    if _arrays.is_torch(a):
        return a.numel() * a.element_size()
    return int(a.nbytes)


def _host_copy(a: Any) -> np.ndarray:
    """A numpy copy of a host or CUDA array, float16/bfloat16 widened to float32 (exact)."""
    if _arrays.is_torch(a):
        a = a.detach().to("cpu")
    name = _dtype_name(a)
    wide = "float32" if name in ("float16", "bfloat16") else name
    host = np.empty(tuple(a.shape), dtype=wide)
    _C.state_copy(host, a)
    return host


def as_indices(indices: Any, what: str = "batch_indices") -> np.ndarray:
    """Any sequence of ints (list, numpy, torch on any device) as an int64 host array."""
    if _arrays.is_torch(indices):
        indices = indices.detach().to("cpu").numpy()
    arr = np.asarray(indices)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


class RecurrentState:
    """Base class: subclasses set ``_tensors`` (attribute names, batch on axis 0) and
    ``_settings`` (names of scalar settings), and implement ``_zeros_like_self(batch)``."""

    _tensors: ClassVar[tuple[str, ...]] = ()
    _settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tensors: dict[str, Any], settings: dict[str, Any]):
        self._t = dict(tensors)
        self._s = dict(settings)

    # -- properties -------------------------------------------------------------------

    @property
    def batch(self) -> int:
        """Number of sequences (axis 0 of every tensor)."""
        return int(self._t[self._tensors[0]].shape[0])

    @property
    def tokens(self):
        """Tokens folded into each sequence's state so far: int64 array of shape (batch,)."""
        return self._t["tokens"]

    @property
    def dtype(self):
        """dtype of the state tensors, as their array library spells it."""
        return self._t[self._tensors[0]].dtype

    @property
    def device(self) -> str:
        """'cpu' or 'cuda:N'."""
        return _arrays.device_name(_arrays.info(self._t[self._tensors[0]], "state").device)

    @property
    def nbytes(self) -> int:
        """Bytes held by all the state's tensors (token counters included)."""
        return sum(_nbytes(t) for t in self._t.values())

    # -- batch management -------------------------------------------------------------

    def reset(self, batch_indices=None):
        """Zero the state of every sequence (``None``) or of the given ones, in place.

        batch_indices: ints (list, numpy or torch), negative values count from the end.
        Raises ValueError for an index out of range (nothing is reset then). Returns self.
        """
        idx = None if batch_indices is None else as_indices(batch_indices)
        # every tensor has the same batch, so if the first passes the C core's index
        # check (made before it writes), all do: a bad index resets nothing
        for name in self._tensors:
            _C.state_zero(self._t[name], idx)
        return self

    def copy_(self, other: "RecurrentState"):
        """Copy other's state into this one in place (same class, settings and shapes;
        float dtypes may differ and are converted). Returns self."""
        if type(other) is not type(self):
            raise TypeError(f"copy_: expected a {type(self).__name__}, got {type(other).__name__}")
        for key in self._settings:
            if self._s[key] != other._s[key]:
                raise ValueError(f"copy_: {key} differs ({self._s[key]!r} here, {other._s[key]!r} in other)")
        for name in self._tensors:  # check every shape before the first write
            a, b = self._t[name], other._t[name]
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"copy_: {name} has shape {tuple(b.shape)} in other, {tuple(a.shape)} here")
        for name in self._tensors:
            _C.state_copy(self._t[name], other._t[name])
        return self

    def clone(self):
        """A deep copy with new memory of the same array type, device and dtype."""
        return self._zeros_like_self(self.batch).copy_(self)

    def index_select(self, batch_indices):
        """A new state whose sequence i is this state's sequence ``batch_indices[i]``
        (beam-search reordering; repeats allowed, len(batch_indices) is the new batch).
        For an in-place reorder: ``state.copy_(state.index_select(order))``."""
        idx = as_indices(batch_indices)
        new = self._zeros_like_self(len(idx))
        for name in self._tensors:
            _C.state_gather(new._t[name], self._t[name], idx)
        return new

    def _zeros_like_self(self, batch: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _require_fits(self, checks, inputs: str) -> None:
        """Name a mismatch between this state and a call's inputs in the user's terms, before
        the C core reports it as the shape of one of the state's tensors. checks: (what,
        the state's value, the inputs' value) triples; inputs: what holds the latter."""
        owner = "cache" if type(self).__name__.endswith("Cache") else "state"
        for what, have, got in checks:
            if int(got) != have:
                raise ValueError(f"the {owner} was built for {what} = {have}, but {inputs} have {what} = {int(got)} "
                                 f"({owner}: {self!r})")

    def _require_writable(self) -> None:
        """Kernels write the state in place: torch tensors that require grad are refused
        (torch's own __dlpack__ refuses them; the fast import path must too)."""
        for name, t in self._t.items():
            _arrays.require_no_grad(t, f"{type(self).__name__}.{name}")

    # -- files ------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the state to ``path`` as a .npz archive (format in based._state's docstring)."""
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "class": type(self).__name__,
            "dtypes": {name: _dtype_name(self._t[name]) for name in self._tensors},
            "settings": self._s,
        }
        arrays = {name: _host_copy(self._t[name]) for name in self._tensors}
        arrays["__based_state__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with open(os.fspath(path), "wb") as f:      # an exact path: savez would append .npz
            np.savez(f, **arrays)

    @classmethod
    def _read(cls, path) -> tuple[dict, dict[str, np.ndarray]]:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            if "__based_state__" not in z.files:
                raise ValueError(f"{path} is not a based state file (no __based_state__ entry)")
            meta = json.loads(bytes(z["__based_state__"]).decode())
            arrays = {name: z[name] for name in z.files if name != "__based_state__"}
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported state file format {meta.get('format')!r} "
                             f"version {meta.get('version')!r}")
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{path} holds a {meta.get('class')}, not a {cls.__name__}")
        missing = [n for n in cls._tensors if n not in arrays]
        if missing:
            raise ValueError(f"{path} lacks the tensors {missing}")
        return meta, arrays

    def _fill_from(self, arrays: dict[str, np.ndarray]):
        for name in self._tensors:
            want = tuple(self._t[name].shape)
            if tuple(arrays[name].shape) != want:
                raise ValueError(f"{name} in the file has shape {arrays[name].shape}, expected {want}")
        for name in self._tensors:
            target = self._t[name]
            if _arrays.is_torch(target) and target.device.type != "cpu":
                host = _arrays._torch().empty(tuple(target.shape), dtype=target.dtype)
                _C.state_copy(host, arrays[name])
                target.copy_(host)
            else:
                _C.state_copy(target, arrays[name])
        return self

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(self._t[n].shape)}" for n in self._tensors if n != "tokens")
        settings = ", ".join(f"{k}={v!r}" for k, v in self._s.items())
        return f"{type(self).__name__}({shapes}, dtype={_dtype_name(self._t[self._tensors[0]])}, " \
               f"device={self.device}, {settings})"
