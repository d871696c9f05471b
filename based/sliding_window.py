"""Sliding-window softmax attention (SPEC 1.2; Arora et al., ICML 2024, Sec. 4): prefill,
decode, and the ring-buffer cache that carries a sequence from one call to the next.

Query position p attends the ``window`` most recent key positions including its own,
u in (p - window, p] -- flash-attention's ``window_size=(window - 1, 0)``:

    o_p = softmax_u(scale * q_p . k_u) @ v_u,        scale defaults to 1/sqrt(D)

Grouped-query attention: q has H heads, k and v have Hkv heads, H % Hkv == 0, and query
head h reads kv head h // (H // Hkv). The softmax runs in float32 (float64 for float64
inputs) with the running max subtracted. Note on checkpoints of the BASED repository: its
config ``window_size: 128`` means flash ``(64, 0)``, i.e. ``window=65`` here.
"""

from __future__ import annotations

import numpy as np

from . import _args, _arrays, _C
from ._state import RecurrentState, _dtype_name

MAX_HEAD_DIM = _C.limits()["max_head_dim"]  # the C core's limit (based.h)


def _key_ring(like, shape, dtype, device):
    """Zeros of shape (B, Hkv, W, D) whose memory is slot-contiguous, i.e. a view of a
    row-major (B, Hkv, D, W) array: a CPU decode step then reads each key dimension of the
    window as one contiguous run, with no transpose. A based.Buffer (or another library's
    array) has no strided views, so it stays row-major; the CPU kernels take either. On a
    CUDA device the ring is row-major too: the CUDA kernels read whole 16-byte pieces of
    key rows and need unit stride along D."""
    b, h, w, d = shape
    dev = _arrays.parse_device(device) if device is not None else (
        _arrays.info(like, "like").device if like is not None else (_arrays.DLPACK_CPU, 0))
    if dev[0] == _arrays.DLPACK_CUDA:
        return _arrays.zeros(like, shape, dtype, device)
    k = _arrays.zeros(like, (b, h, d, w), dtype, device)
    if _arrays.is_torch(k):
        return k.transpose(2, 3)
    if isinstance(k, np.ndarray):
        return k.swapaxes(2, 3)
    return _arrays.zeros(like, shape, dtype, device)


class SlidingWindowCache(RecurrentState):
    """Keys and values of the last ``window`` positions of each sequence, in ring buffers.

    Tensors (zero-copy views in the array type the cache was made with; writing through
    them changes the cache):

    * ``k``, ``v``: ``(batch, kv_heads, window, head_dim)``. The key of absolute position
      p of sequence b lives in ``k[b, :, p % window]``. For torch and numpy caches, ``k``
      is a view with strides ``(..., 1, window)`` (memory laid out slot-contiguous, which
      decode reads without a transpose); it is not C-contiguous, index it as usual.
    * ``tokens``: ``(batch,)`` int64, positions seen so far per sequence. The valid slots
      of sequence b hold its last ``min(tokens[b], window)`` positions; other slots are
      never read. Sequences may have different counts (e.g. after ``reset`` of some).

    Memory is fixed at creation and never grows with the sequence. The cache stores keys
    and values exactly as given, so k and v passed to prefill/decode must have the
    cache's dtype (``TypeError`` otherwise); this is what makes a prompt processed in one
    prefill, in chunks, or token by token through decode give bit-identical outputs.

    Settings: ``window`` (keys attended per query, the query's own included) and
    ``scale``; calls that pass a different one fail (SPEC 3). Batch management
    (``reset``, ``copy_``, ``clone``, ``index_select``, ``save``/``load``) comes from
    ``based._state.RecurrentState``; a method that refuses its arguments or the cache (a
    read-only view, an index out of range) changes nothing.

    Threads: a cache takes one call at a time. Every op and method that reads or writes it
    (``sliding_window_prefill``/``_decode``, ``reset``, ``copy_`` -- on both caches --,
    ``clone``, ``index_select``, ``save``) holds the cache's in-use flag while it runs, and a
    second call on the same cache meanwhile, from another thread, raises ``RuntimeError``
    at once and changes nothing (it does not wait: decoding one cache from two threads is a
    bug, as it would lose updates). Independent caches run in parallel threads freely.
    Writing through the ``k``/``v``/``tokens`` views is not guarded.
    """

    _tensors = ("k", "v", "tokens")
    _settings = ("window", "scale")
    _ndims = {"k": 4, "v": 4, "tokens": 1}

    @classmethod
    def zeros(cls, batch, kv_heads, window, head_dim, *, dtype=None, device=None, scale=None, like=None):
        """An empty cache (``tokens`` all zero).

        Args:
            batch: sequences, >= 0. kv_heads: key/value heads Hkv, >= 1.
            window: W, keys attended per query (its own included), 1..2**63-1. The cache
                holds W slots per sequence and kv head from the start:
                ``2 * batch * kv_heads * W * head_dim`` elements, whatever the sequence length.
            head_dim: D, 1..256.
            dtype: 'float32', 'float64', 'float16' or 'bfloat16' (or a numpy/torch dtype);
                the dtype of the k and v the cache will be fed. Default: like's dtype.
            device: 'cpu', 'cuda', 'cuda:N'; default like's device, else 'cpu'.
            scale: softmax scale > 0; default 1/sqrt(head_dim).
            like: an array whose type the tensors take (torch in -> torch tensors, numpy
                in -> numpy arrays); without it they are ``based.Buffer`` objects, and so
                are bfloat16 tensors made like a numpy array (numpy has no bfloat16).

        Raises:
            TypeError: a non-integer size (floats and bools included), an unknown dtype, or
                no dtype and no like.
            ValueError: a size or scale out of range -- also a cache too large for 64-bit
                indexing, refused before anything is allocated --, a bad device.
        """
        batch = _args.as_int(batch, "batch", 0)
        kv_heads = _args.as_int(kv_heads, "kv_heads", 1)
        window = _args.as_int(window, "window", 1, _arrays.INDEX_MAX)
        head_dim = _args.as_int(head_dim, "head_dim", 1, MAX_HEAD_DIM)
        if dtype is None:
            if like is None:
                raise TypeError("SlidingWindowCache.zeros needs a dtype (or like=, whose dtype it then takes)")
            dtype = _dtype_name(like, "like")
        dtype = _args.as_dtype(dtype)
        scale = _args.as_scale(scale, head_dim)
        shape = (batch, kv_heads, window, head_dim)
        _arrays.require_indexable("the cache's k and v", "(batch, kv_heads, window, head_dim)", shape, dtype)
        _arrays.require_indexable("the cache's tokens", "(batch,)", (batch,), "int64")
        tensors = {
            "k": _key_ring(like, shape, dtype, device),
            "v": _arrays.zeros(like, shape, dtype, device),
            "tokens": _arrays.zeros(like, (batch,), "int64", device),
        }
        return cls(tensors, {"window": window, "scale": scale})

    @classmethod
    def load(cls, path, *, device=None, like=None):
        """A cache read from a file written by ``save`` (format: based._state docstring),
        with its saved dtype, in like's array type on ``device`` (default like's, else
        'cpu'). Without ``like``, a host cache is NumPy arrays -- except bfloat16 k/v,
        which NumPy cannot hold: those are ``based.Buffer`` objects (``torch.from_dlpack``
        views them; pass ``like=`` a torch tensor to get torch tensors) -- and a CUDA cache
        is ``based.Buffer`` objects.

        Raises:
            ValueError: naming the file, for one that is empty, truncated, damaged, or not a
                saved SlidingWindowCache (or holds sizes or settings no cache can have).
            OSError: as ``open`` raises it (e.g. FileNotFoundError).
            TypeError, ValueError: a bad ``like`` or ``device``.
        """
        meta, arrays = cls._read(path)
        with cls._file_errors(path, cls.__name__):
            batch, kv_heads, window, head_dim = (int(n) for n in arrays["k"].shape)
            settings = meta["settings"]
            if settings["window"] != window or _args.is_bool(settings["window"]):
                raise ValueError(f"window setting {settings['window']!r} does not match k's shape "
                                 f"{arrays['k'].shape}")
            settings = {"dtype": meta["dtypes"]["k"], "scale": settings["scale"]}
            cls.zeros(0, kv_heads, window, head_dim, **settings)   # by zeros' rules; allocates nothing
        new = cls.zeros(batch, kv_heads, window, head_dim, device=device, like=cls._load_like(like, device),
                        **settings)
        with cls._file_errors(path, cls.__name__):
            return new._fill_from(arrays)

    def _zeros_like_self(self, batch: int):
        k = self._t["k"]
        # like the token counter: it always has the array type the cache was made with
        return type(self).zeros(batch, self.kv_heads, self.window, self.head_dim, dtype=_dtype_name(k, "cache.k"),
                                device=self.device, scale=self.scale, like=self._t["tokens"])

    @property
    def k(self):
        """Key ring buffer, (batch, kv_heads, window, head_dim); position p in slot p % window."""
        return self._t["k"]

    @property
    def v(self):
        """Value ring buffer, (batch, kv_heads, window, head_dim)."""
        return self._t["v"]

    @property
    def window(self) -> int:
        """Keys attended per query, the query's own included."""
        return self._s["window"]

    @property
    def scale(self) -> float:
        """Softmax scale: scores are scale * q.k."""
        return self._s["scale"]

    @property
    def kv_heads(self) -> int:
        return int(self._t["k"].shape[1])

    @property
    def head_dim(self) -> int:
        return int(self._t["k"].shape[3])


def _inputs(q, k, v, q_layout: str, kv_layout: str):
    """ArrayInfo of q, k, v after the checks the Python layer needs before allocating."""
    return (_arrays.float_input(q, "q", q_layout), _arrays.float_input(k, "k", kv_layout),
            _arrays.float_input(v, "v", kv_layout))


def _check_cache_fits(cache, qi, ki, vi) -> None:
    """Name a cache/input mismatch in the user's terms (batch, kv heads, head dim, dtype)
    before the C core reports it against its internal k_cache/v_cache arguments. qi, ki, vi:
    ArrayInfo of q, k, v. Only inputs that agree among themselves are compared with the
    cache: a disagreement between q, k and v is reported by the C core, naming them."""
    shapes = (qi.shape, ki.shape, vi.shape)
    if len({len(s) for s in shapes}) != 1 or len(qi.shape) not in (3, 4):
        return
    if len({s[0] for s in shapes}) != 1 or len({s[-1] for s in shapes}) != 1 or ki.shape[:-1] != vi.shape[:-1]:
        return
    if not 1 <= qi.shape[-1] <= MAX_HEAD_DIM or ki.shape[-2] < 1 or qi.shape[-2] % ki.shape[-2]:
        return
    cache._require_fits((("batch", cache.batch, ki.shape[0]), ("kv heads (Hkv)", cache.kv_heads, ki.shape[-2]),
                         ("head dim (D)", cache.head_dim, ki.shape[-1])), "k and v")
    held = _dtype_name(cache.k, "cache.k")
    if qi.dtype == ki.dtype == vi.dtype and ki.dtype in _arrays.FLOAT_DTYPES and ki.dtype != held:
        raise TypeError(f"the cache holds {held} keys and values, but q, k and v are {ki.dtype}; the cache takes "
                        f"their dtype (make it with dtype={ki.dtype!r}, or like=k)")


def _require_cache(cache):
    if not isinstance(cache, SlidingWindowCache):
        raise TypeError(f"cache must be a based.SlidingWindowCache, got {type(cache).__name__}")


def sliding_window_prefill(q, k, v, *, window=None, scale=None, cache=None, out=None, stream=None):
    """Sliding-window softmax attention over a prompt (or the next chunk of one).

    ``o[b, t, h] = softmax_u(scale * q[b, t, h] . k[b, u, h // G]) @ v[b, u, h // G]``
    over the ``window`` positions u in (t - window, t], G = H // Hkv (SPEC 1.2, paper
    Sec. 4). Positions count from the cache's ``tokens``: a given cache is continued,
    so the first queries also attend to the cached keys before them (chunked prefill).

    Args:
        q: ``(B, T, H, D)``; k, v: ``(B, T, Hkv, D)``, H % Hkv == 0, 1 <= D <= 256, T >= 0.
            One dtype for all three: float32, float64, float16 or bfloat16. Any strides
            (a ``(B, H, T, D)`` tensor passed as ``x.transpose(1, 2)`` needs no copy); any
            DLPack array.
        window: keys attended per query (its own included), 1..2**63-1. Required without
            a cache; with one it defaults to ``cache.window`` and must equal it.
        scale: softmax scale > 0; default the cache's, else ``1 / sqrt(D)``. With a cache it
            must equal ``cache.scale``.
        cache: a ``SlidingWindowCache`` of shape ``(B, Hkv, window, D)`` and k's dtype, updated
            in place. None: a new one (``SlidingWindowCache.zeros(..., like=q)``) is
            allocated and filled, with capacity for ``window`` positions per sequence and kv
            head -- ``2 * B * Hkv * window * D`` elements of k's dtype, whatever T is, since
            decode continues from it. A window far beyond the prompt costs that memory up
            front (``window=2**20`` at Hkv=8, D=64, float16: 2 GiB per sequence) and is
            refused only when it overflows 64-bit indexing; pick the window the model was
            trained with.
        out: optional ``(B, T, H, D)`` array with v's dtype, written in place; must not
            overlap the inputs or the cache.
        stream: CUDA stream to run on (an int ``cudaStream_t`` handle, a
            ``torch.cuda.Stream`` or a CuPy stream); default the current stream of the
            inputs' library (PyTorch's ``torch.cuda.current_stream()``, CuPy's current
            stream), else the legacy default stream. Ignored on the CPU. The call never
            synchronises: results are ready in that stream's order.

    Returns:
        ``(o, cache)``: o in v's dtype and array type (``out`` if given); cache holds
        the last ``min(tokens, window)`` keys and values of each sequence, and is the very
        object passed in, if one was.

    Raises:
        TypeError: a non-array, unsupported or mismatched dtypes (the cache's included), a
            tensor that requires grad, a cache that is not a SlidingWindowCache.
        ValueError: shapes (incl. H % Hkv != 0, D out of 1..256), a window or scale that is
            out of range or disagrees with the cache, a new cache too large for 64-bit
            indexing (refused before anything is allocated), devices that differ, out
            overlapping an input, the cache or itself, a read-only out.
        RuntimeError: ``cache`` is in use by a call running in another thread (see
            ``SlidingWindowCache``).
        NotImplementedError: CUDA arrays in a build of based without CUDA.
    On any error nothing is written: out and the cache keep every bit.
    """
    qi, ki, vi = _inputs(q, k, v, "(B, T, H, D)", "(B, T, Hkv, D)")
    batch, seqlen, heads, head_dim = qi.shape
    if cache is None:
        if window is None:
            raise ValueError("sliding_window_prefill: window is required when no cache is given")
        window = _args.as_int(window, "window", 1, _arrays.INDEX_MAX)
        if not 1 <= head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"q must have a head dim D between 1 and {MAX_HEAD_DIM}, got D={head_dim}")
        cache = SlidingWindowCache.zeros(batch, ki.shape[2], window, head_dim, dtype=ki.dtype, scale=scale,
                                         like=q, device=qi.device)
    else:
        _require_cache(cache)
        _check_cache_fits(cache, qi, ki, vi)
        if window is not None:
            window = _args.as_int(window, "window", 1, _arrays.INDEX_MAX)
            _args.same_setting("window", window, cache.window, "cache")
        if scale is not None:
            _args.same_setting("scale", _args.as_scale(scale), cache.scale, "cache")
    cache._require_writable()
    _arrays.require_no_grad(out, "out")
    if out is None:
        out = _arrays.empty(v, (batch, seqlen, heads, head_dim), vi.dtype, qi.device)
    with cache._in_use:
        _C.sliding_window_prefill(q, k, v, cache.k, cache.v, cache.tokens, out, cache.window, cache.scale,
                                  _arrays.stream_handle(stream, q))
    return out, cache


def sliding_window_decode(q, k, v, cache, *, out=None, stream=None):
    """One new token per sequence: store its key and value in the cache, then attend.

    The key and value go into ring slot ``tokens[b] % window`` (replacing the position that
    just left the window), ``tokens[b]`` grows by one, and the query attends the valid slots,
    its own included -- the same output ``sliding_window_prefill`` gives that position.

    Args:
        q: ``(B, H, D)``; k, v: ``(B, Hkv, D)``; one float dtype, the cache's. Any strides.
        cache: the ``SlidingWindowCache`` to read and update in place; its window and
            scale apply.
        out: optional ``(B, H, D)`` array with v's dtype, written in place.
        stream: as in ``sliding_window_prefill``. With ``out`` a CUDA decode allocates
            nothing and is CUDA-graph capturable.

    Returns:
        o: ``(B, H, D)``, v's dtype and array type (``out`` if given).

    Raises:
        TypeError, ValueError, RuntimeError, NotImplementedError: as
        ``sliding_window_prefill``; on any error out and the cache keep every bit.
    """
    _require_cache(cache)
    cache._require_writable()
    _arrays.require_no_grad(out, "out")
    qi, ki, vi = _inputs(q, k, v, "(B, H, D)", "(B, Hkv, D)")
    _check_cache_fits(cache, qi, ki, vi)
    if out is None:
        out = _arrays.empty(v, tuple(qi.shape), vi.dtype, qi.device)
    with cache._in_use:
        _C.sliding_window_decode(q, k, v, cache.k, cache.v, cache.tokens, out, cache.window, cache.scale,
                                 _arrays.stream_handle(stream, q))
    return out
