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

One call at a time: every op and method that reads or writes a state holds its in-use flag
(``RecurrentState._in_use``) for the duration of the call, and a second call on the same
state meanwhile -- from another thread -- raises ``RuntimeError`` instead of racing it.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import threading
import zipfile
import zlib
from typing import Any, ClassVar

import numpy as np

from . import _args, _arrays, _C

FORMAT_NAME = "based-state"
FORMAT_VERSION = 1


def _dtype_name(a: Any, name: str) -> str:
    """a's dtype name ("float32", ...); DLPack errors name ``name`` (the argument or
    state part a is, e.g. "state.kv")."""
    if _arrays.is_torch(a):
        return _arrays.torch_dtype_name(a.dtype)
    if isinstance(a, np.ndarray):
        return a.dtype.name
    return _C.dlpack_info(a, name)[1]


def _nbytes(a: Any) -> int:
    if _arrays.is_torch(a):
        return a.numel() * a.element_size()
    return int(a.nbytes)


def _host_copy(a: Any, name: str) -> np.ndarray:
    """A numpy copy of a host or CUDA array, float16/bfloat16 widened to float32 (exact);
    DLPack errors name ``name``."""
    if _arrays.is_torch(a):
        a = a.detach().to("cpu")
    dtype = _dtype_name(a, name)
    wide = "float32" if dtype in ("float16", "bfloat16") else dtype
    host = np.empty(tuple(a.shape), dtype=wide)
    _C.state_copy(host, a, None)
    return host


class BatchIndexError(IndexError, ValueError):
    """A batch index outside ``[-batch, batch)``. An ``IndexError``, as Python and NumPy
    name it, and a ``ValueError``, as SPEC 4 promises for a value out of range."""


def _index_list(indices, what: str) -> list:
    """The elements of a Python sequence as ints (operator.index; bools refused)."""
    values = []
    for x in indices:
        if _args.is_bool(x):
            raise TypeError(f"{what} must be integers, got a bool ({x!r})")
        try:
            values.append(operator.index(x))
        except TypeError:
            raise TypeError(f"{what} must be integers, got {type(x).__name__} {x!r}") from None
    return values


def as_indices(indices: Any, batch: int, what: str = "batch_indices") -> np.ndarray:
    """Batch indices as a C-contiguous int64 host array of rows in ``[0, batch)``.

    indices: one int, a sequence of ints (``[]`` included: no rows), or an integer array of
    any integer dtype (numpy, torch on any device, anything numpy.asarray reads), 0-d or
    1-D. Negative values count from the end, as in NumPy. Every value is range-checked as
    the integer it is (a uint64 2**64 - 1 is not -1) before anything is converted.

    Raises TypeError for non-integers (bools and floats included), ValueError for arrays
    of more than one dimension, BatchIndexError (an IndexError and a ValueError) naming
    ``what`` and the value for an index outside ``[-batch, batch)``.
    """
    if _arrays.is_torch(indices):
        if _args.is_bool(indices):
            raise TypeError(f"{what} must be integers, got dtype torch.bool")
        indices = indices.detach().to("cpu").numpy()
    if isinstance(indices, (str, bytes)):
        raise TypeError(f"{what} must be integers, got {type(indices).__name__} {indices!r}")
    if isinstance(indices, (list, tuple, range)):
        values = _index_list(indices, what)
        arr = None
    else:
        if hasattr(indices, "__index__") and not hasattr(indices, "dtype") and not _args.is_bool(indices):
            indices = [operator.index(indices)]          # a plain int
        arr = np.asarray(indices)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
        if arr.ndim > 1:
            raise ValueError(f"{what} must be one index or a 1-D sequence of them, got shape {arr.shape}")
        arr = arr.reshape(-1)
        values = [int(arr.min()), int(arr.max())] if arr.size else []   # exact for uint64 too
    for j in values:
        if not -batch <= j < batch:
            if arr is not None:                          # report the first offending element
                j = next(x for x in arr.tolist() if not -batch <= x < batch)
            raise BatchIndexError(f"{what}: batch index {j} is out of range for batch size {batch} "
                                  f"(valid indices: -{batch} to {batch - 1}, negative ones counting from the end)")
    out = np.array(values, dtype=np.int64) if arr is None else arr.astype(np.int64)   # in range: exact
    if out.size and out.min() < 0:
        out = np.where(out < 0, out + batch, out)
    return np.ascontiguousarray(out, dtype=np.int64)


class _InUse:
    """The in-use flag of one state: a non-blocking lock taken for the duration of every op
    and method that reads or writes the state. A second call meanwhile raises RuntimeError
    at once (it never waits, so it can never deadlock); nothing is changed by that call."""

    __slots__ = ("_lock", "_owner")

    def __init__(self, owner: str):
        self._lock = threading.Lock()
        self._owner = owner

    def __enter__(self):
        if not self._lock.acquire(False):
            raise RuntimeError(
                f"this {self._owner} is already in use by another call (another thread is running an op or method "
                f"on it); a state takes one call at a time, else updates would be lost. Give each thread its own "
                f"state (clone()), or serialise the calls with a lock. This call changed nothing")
        return self

    def __exit__(self, *exc) -> bool:
        self._lock.release()
        return False


# What np.load and the zip/npy readers raise for a file that is not a (whole) .npz archive
_DAMAGED = (ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
            NotImplementedError, OverflowError)


class RecurrentState:
    """Base class: subclasses set ``_tensors`` (attribute names, batch on axis 0) and
    ``_settings`` (names of scalar settings), and implement ``_zeros_like_self(batch)``."""

    _tensors: ClassVar[tuple[str, ...]] = ()
    _settings: ClassVar[tuple[str, ...]] = ()

    #: optional ndim of each tensor, checked when a file is read
    _ndims: ClassVar[dict[str, int]] = {}

    def __init__(self, tensors: dict[str, Any], settings: dict[str, Any]):
        self._t = dict(tensors)
        self._s = dict(settings)
        self._in_use = _InUse(type(self).__name__)

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
        first = self._tensors[0]
        return _arrays.device_name(_arrays.info(self._t[first], self._part(first)).device)

    @property
    def nbytes(self) -> int:
        """Bytes held by all the state's tensors (token counters included)."""
        return sum(_nbytes(t) for t in self._t.values())

    # -- batch management -------------------------------------------------------------

    def reset(self, batch_indices=None):
        """Zero the state of every sequence (``None``) or of the given ones, in place.

        batch_indices: an int, a sequence of ints (``[]``: nothing to reset) or an integer
        array of any integer dtype (numpy, or torch on any device); negative values count
        from the end, as in NumPy. All of it is checked before anything is written:
        IndexError (also a ValueError) names an index outside ``[-batch, batch)``, TypeError
        non-integers, ValueError a read-only part (TypeError one that requires grad), and
        RuntimeError a call running on this state in another thread -- then nothing is
        reset. Returns self.
        """
        idx = None if batch_indices is None else as_indices(batch_indices, self.batch)
        self._require_all_writable("reset")
        with self._in_use:
            for name in self._tensors:
                _C.state_zero(self._t[name], idx, _arrays.stream_handle(None, self._t[name]))
        return self

    def copy_(self, other: "RecurrentState"):
        """Copy other's state into this one in place (same class, settings and shapes;
        float dtypes may differ and are converted; other may be on another device, CPU or
        GPU: such a copy is staged through host memory and synchronises). Every part is
        checked before the first write (a read-only or grad-requiring part, another call
        running on either state refuse the whole copy). Returns self."""
        if type(other) is not type(self):
            raise TypeError(f"copy_: expected a {type(self).__name__}, got {type(other).__name__}")
        for key in self._settings:
            if self._s[key] != other._s[key]:
                raise ValueError(f"copy_: {key} differs ({self._s[key]!r} here, {other._s[key]!r} in other)")
        for name in self._tensors:
            a, b = self._t[name], other._t[name]
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"copy_: {name} has shape {tuple(b.shape)} in other, {tuple(a.shape)} here")
        other._require_readable("other's ")
        for name, t in other._t.items():
            _arrays.require_no_grad(t, f"copy_: other's {type(self).__name__}.{name}")
        self._require_all_writable("copy_")
        with self._in_use, (contextlib.nullcontext() if other is self else other._in_use):
            self._copy_from(other)
        return self

    def _copy_from(self, other: "RecurrentState") -> None:
        """The copy itself, all checks made and both flags held."""
        for name in self._tensors:
            _C.state_copy(self._t[name], other._t[name], _arrays.stream_handle(None, self._t[name]))

    def clone(self):
        """A deep copy with new memory of the same array type, device and dtype."""
        self._require_readable()
        new = self._zeros_like_self(self.batch)
        with self._in_use:
            new._copy_from(self)
        return new

    def index_select(self, batch_indices):
        """A new state whose sequence i is this state's sequence ``batch_indices[i]``
        (beam-search reordering; repeats allowed, len(batch_indices) is the new batch, ``[]``
        gives a state of batch 0). Indices as in ``reset`` (same errors, also raised before
        anything is allocated). For an in-place reorder:
        ``state.copy_(state.index_select(order))``."""
        idx = as_indices(batch_indices, self.batch)
        self._require_readable()
        new = self._zeros_like_self(len(idx))
        with self._in_use:
            for name in self._tensors:
                _C.state_gather(new._t[name], self._t[name], idx, _arrays.stream_handle(None, new._t[name]))
        return new

    def _zeros_like_self(self, batch: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _owner(self) -> str:
        """What the user calls this object in messages: "state", or "cache" for a cache."""
        return "cache" if type(self).__name__.endswith("Cache") else "state"

    def _part(self, name: str) -> str:
        """A tensor's name in DLPack errors, e.g. "state.kv", "cache.k" (as the ops name
        the linear-attention state's tensors)."""
        return f"{self._owner()}.{name}"

    def _require_fits(self, checks, inputs: str) -> None:
        """Name a mismatch between this state and a call's inputs in the user's terms, before
        the C core reports it as the shape of one of the state's tensors. checks: (what,
        the state's value, the inputs' value) triples; inputs: what holds the latter."""
        owner = self._owner()
        for what, have, got in checks:
            if int(got) != have:
                raise ValueError(f"the {owner} was built for {what} = {have}, but {inputs} have {what} = {int(got)} "
                                 f"({owner}: {self!r})")

    def _require_readable(self, prefix: str = "") -> None:
        """Import each part that is neither a torch tensor nor a numpy array once, so that a
        DLPack protocol failure names it (``prefix`` + e.g. "state.ksum"), before the C state
        helpers, which know their arguments only as dst and src, see it."""
        for name, t in self._t.items():
            if not (_arrays.is_torch(t) or isinstance(t, np.ndarray)):
                _arrays.info(t, prefix + self._part(name))

    def _require_writable(self) -> None:
        """Kernels write the state in place: torch tensors that require grad are refused
        (torch's own __dlpack__ refuses them; the fast import path must too). The ops need
        no more: they import every tensor, checking it is writable, before the kernel runs."""
        for name, t in self._t.items():
            _arrays.require_no_grad(t, f"{type(self).__name__}.{name}")

    def _require_all_writable(self, op: str) -> None:
        """For methods that write the tensors one C call at a time: refuse a read-only or
        grad-requiring part before the first write, so that a refused call changes nothing."""
        self._require_writable()
        for name, t in self._t.items():
            if _arrays.readonly(t, self._part(name)):
                raise ValueError(f"{op}: {type(self).__name__}.{name} is read-only (a numpy view with "
                                 f"flags.writeable False, or an array exported read-only), but {op} writes every "
                                 f"part of the state; nothing was changed")

    # -- files ------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the state to ``path`` as a .npz archive (format in based._state's docstring)."""
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "class": type(self).__name__,
            "dtypes": {name: _dtype_name(self._t[name], self._part(name)) for name in self._tensors},
            "settings": self._s,
        }
        with self._in_use:
            arrays = {name: _host_copy(self._t[name], self._part(name)) for name in self._tensors}
        arrays["__based_state__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with open(os.fspath(path), "wb") as f:      # an exact path: savez would append .npz
            np.savez(f, **arrays)

    @classmethod
    def _read(cls, path) -> tuple[dict, dict[str, np.ndarray]]:
        """The metadata and host arrays of a file written by ``save``, checked for
        everything a state needs (format, class, entries, dtypes, ndims, one batch,
        tokens >= 0). ValueError naming the file for anything else -- an empty, truncated
        or damaged file, or one that is not a saved ``cls``; OSError (e.g.
        FileNotFoundError) as open raises it."""
        where = os.fspath(path)
        raw, arrays = None, {}
        with open(where, "rb") as f:       # ours to close, whatever np.load makes of it
            try:
                loaded = np.load(f, allow_pickle=False)
                if isinstance(loaded, np.lib.npyio.NpzFile):
                    with loaded as z:
                        for name in z.files:    # read every entry: a damaged one fails here
                            if name == "__based_state__":
                                raw = bytes(z[name])
                            else:
                                arrays[name] = z[name]
            except _DAMAGED as exc:
                if os.fstat(f.fileno()).st_size == 0:
                    raise ValueError(f"{where} is not a based state file: it is empty") from exc
                raise ValueError(f"{where} is not a based state file, or is truncated or damaged "
                                 f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{where} is not a based state file: it holds a single array (.npy), not a .npz archive")
        if raw is None:
            raise ValueError(f"{where} is not a based state file (no __based_state__ entry)")
        try:
            meta = json.loads(raw.decode())
        except ValueError as exc:            # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{where}: its __based_state__ entry is not UTF-8 JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: its __based_state__ entry is not a JSON object")
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{where}: unsupported state file format {meta.get('format')!r} "
                             f"version {meta.get('version')!r}")
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{where} holds a {meta.get('class')}, not a {cls.__name__}")
        missing = [n for n in cls._tensors if n not in arrays]
        if missing:
            raise ValueError(f"{where} lacks the tensors {missing}")
        dtypes, settings = meta.get("dtypes"), meta.get("settings")
        if not isinstance(dtypes, dict) or not isinstance(settings, dict):
            raise ValueError(f"{where}: its metadata lacks the 'dtypes' or 'settings' object")
        absent = [k for k in cls._settings if k not in settings]
        if absent:
            raise ValueError(f"{where}: its metadata lacks the settings {absent}")
        for name in cls._tensors:
            a, saved = arrays[name], dtypes.get(name)
            want = ("int64",) if name == "tokens" else _arrays.FLOAT_DTYPES
            stored = ("int64",) if name == "tokens" else ("float32", "float64")
            if saved not in want or a.dtype.name not in stored:
                raise ValueError(f"{where}: {name} is stored as {a.dtype.name} and recorded as {saved!r}; a saved "
                                 f"{cls.__name__} has {name} recorded as one of {', '.join(want)}")
            if name in cls._ndims and a.ndim != cls._ndims[name]:
                raise ValueError(f"{where}: {name} has shape {a.shape}, not {cls._ndims[name]}-D")
            if a.ndim < 1 or a.shape[0] != arrays[cls._tensors[0]].shape[0]:
                raise ValueError(f"{where}: {name} has shape {a.shape}, whose batch (axis 0) is not that of "
                                 f"{cls._tensors[0]} {arrays[cls._tensors[0]].shape}")
        if "tokens" in arrays and arrays["tokens"].size and arrays["tokens"].min() < 0:
            raise ValueError(f"{where}: tokens holds a negative count ({int(arrays['tokens'].min())})")
        return meta, arrays

    @staticmethod
    @contextlib.contextmanager
    def _file_errors(path, cls_name: str):
        """Within it, a TypeError or ValueError about what a file holds (its sizes and
        settings) becomes a ValueError naming the file."""
        try:
            yield
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{os.fspath(path)} does not hold a valid {cls_name}: {exc}") from exc

    @staticmethod
    def _load_like(like, device):
        """What a load without ``like=`` returns: numpy arrays for a host state (based.Buffer
        only where numpy lacks the dtype, i.e. bfloat16), based.Buffer on a CUDA device."""
        if like is None and (device is None or _arrays.parse_device(device)[0] == _arrays.DLPACK_CPU):
            return np.empty(0, np.float32)
        return like

    def _fill_from(self, arrays: dict[str, np.ndarray]):
        for name in self._tensors:
            want = tuple(self._t[name].shape)
            if tuple(arrays[name].shape) != want:
                raise ValueError(f"{name} in the file has shape {arrays[name].shape}, expected {want}")
        for name in self._tensors:
            target = self._t[name]
            if _arrays.is_torch(target) and target.device.type != "cpu":
                host = _arrays._torch().empty(tuple(target.shape), dtype=target.dtype)
                _C.state_copy(host, arrays[name], None)
                target.copy_(host)
            else:
                _C.state_copy(target, arrays[name], None)
        return self

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(self._t[n].shape)}" for n in self._tensors if n != "tokens")
        settings = ", ".join(f"{k}={v!r}" for k, v in self._s.items())
        first = self._tensors[0]
        return f"{type(self).__name__}({shapes}, dtype={_dtype_name(self._t[first], self._part(first))}, " \
               f"device={self.device}, {settings})"
