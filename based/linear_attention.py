"""Taylor linear attention, BASED's global token mixer: chunked prefill, decode and the
fixed-size recurrent state that joins them (SPEC 1.1 and 3; Arora et al., ICML 2024,
Sec. 4.1 Eq. 4 for the kernel, Sec. 5.2 for the IO-aware chunked algorithm).

Per batch b and head h, with s = scale * (q_t . k_u) and K = 1 + s + s^2/2::

    o_t = sum_{u<=t} K(q_t, k_u) v_u / (sum_{u<=t} K(q_t, k_u) + eps)     (normalize=True)
    o_t = sum_{u<=t} K(q_t, k_u) v_u                                      (normalize=False)

The state after tokens 0..t is ``kv = sum_u phi(k_u) v_u^T`` (F x Dv) and
``ksum = sum_u phi(k_u)`` (F), with phi the compact Taylor feature map
(``based.taylor_feature_map``), F = 1 + Dk + Dk(Dk+1)/2.
"""

from __future__ import annotations

import math

from . import _args, _arrays, _C
from ._state import RecurrentState, _dtype_name

MAX_FEATURE_DIM = _C.limits()["max_feature_dim"]  # the C core's limit (based.h)


def _dk_from_compact(rows: int) -> int:
    """Dk with 1 + Dk + Dk(Dk+1)/2 == rows, or -1."""
    r = math.isqrt(1 + 8 * rows)
    dk = (r - 3) // 2
    return dk if dk >= 1 and 1 + dk + dk * (dk + 1) // 2 == rows else -1


def _dk_from_expanded(rows: int) -> int:
    """Dk with 1 + Dk + Dk^2 == rows, or -1."""
    r = math.isqrt(max(4 * rows - 3, 0))
    dk = (r - 1) // 2
    return dk if dk >= 1 and 1 + dk + dk * dk == rows else -1


class LinearAttentionState(RecurrentState):
    """The recurrent state of Taylor linear attention for a batch of sequences (SPEC 3).

    Tensors (zero-copy views, in the array type it was created with; writing through them
    changes the state):

    * ``kv``: ``(batch, heads, F, value_dim)``, ``sum_u phi(k_u) v_u^T``
    * ``ksum``: ``(batch, heads, F)``, ``sum_u phi(k_u)`` (the normaliser's state)
    * ``tokens``: ``(batch,)`` int64, tokens folded in per sequence

    F = 1 + Dk + Dk(Dk+1)/2 (153 for the paper's Dk = 16): the symmetric second-order
    block is stored once, 0.56x the bytes of the 1 + Dk + Dk^2 = 273 rows of the paper's
    code (``to_expanded``/``from_expanded`` convert). The state carries its ``scale``; a
    call with a different scale is refused.

    ``kv``/``ksum`` are float32 by default. A float64 state makes the kernels compute in
    float64 whatever the inputs' dtype, so it accumulates in float64 across calls and decode
    steps (prefill with float32 inputs then takes about 2x the time); bfloat16/float16 halve
    the bytes but are lossy over long sequences (each prefill call rounds the state once, each
    decode step once per token; float16 can overflow once sums pass 65504).

    Batch management (``reset``, ``copy_``, ``clone``, ``index_select``) and files
    (``save``/``load``, NumPy .npz + JSON metadata) come from ``based._state.RecurrentState``.
    A method that refuses its arguments or the state (a read-only view, an index out of
    range) changes nothing.

    Threads: a state takes one call at a time. Every op and method that reads or writes it
    (``linear_attention_prefill``/``_decode``, ``reset``, ``copy_`` -- on both states --,
    ``clone``, ``index_select``, ``save``, ``to_expanded``) holds the state's in-use flag
    while it runs, and a second call on the same state meanwhile, from another thread,
    raises ``RuntimeError`` at once and changes nothing (it does not wait: decoding one
    state from two threads is a bug, as it would lose updates). Independent states run in
    parallel threads freely (the GIL is released in the kernels). Writing through the
    ``kv``/``ksum``/``tokens`` views is not guarded.
    """

    _tensors = ("kv", "ksum", "tokens")
    _settings = ("scale",)
    _ndims = {"kv": 4, "ksum": 3, "tokens": 1}

    @classmethod
    def zeros(cls, batch: int, heads: int, feature_dim: int, value_dim: int, *, dtype: str = "float32",
              device=None, scale=None, like=None) -> "LinearAttentionState":
        """An all-zero state (no tokens seen).

        Args:
            batch, heads: number of sequences and heads (>= 0).
            feature_dim: Dk, the q/k feature dim (1..32; 16 in the paper), not F.
            value_dim: Dv, the value head dim (>= 1).
            dtype: 'float32' (default), 'float64', 'bfloat16' or 'float16' for kv and ksum.
            device: 'cpu', 'cuda[:N]' or a torch.device; default like's device, else 'cpu'.
            scale: s = scale * q.k; positive and finite, default 1/sqrt(feature_dim).
            like: an array whose type the tensors take (torch in -> torch state, numpy in ->
                numpy state); None gives ``based.Buffer`` arrays. NumPy has no bfloat16, so
                a bfloat16 state made like a numpy array is ``based.Buffer`` arrays.

        Raises:
            TypeError: a non-integer size (floats and bools included), an unknown dtype or a
                non-number scale.
            ValueError: sizes out of range -- also a state too large for 64-bit indexing,
                refused before anything is allocated --, a bad scale or device.
        """
        b = _args.as_int(batch, "batch", 0)
        h = _args.as_int(heads, "heads", 0)
        dv = _args.as_int(value_dim, "value_dim", 1)
        dk = _args.as_int(feature_dim, "feature_dim (Dk, the q/k dim)", 1, MAX_FEATURE_DIM)
        dtype = _args.as_dtype(dtype)
        scale = _args.as_scale(scale, dk)
        if device is None:
            device = _arrays.info(like, "like").device if like is not None else "cpu"
        f = int(_C.feature_dim(dk))
        _arrays.require_indexable("the state's kv", "(batch, heads, F, value_dim)", (b, h, f, dv), dtype)
        _arrays.require_indexable("the state's tokens", "(batch,)", (b,), "int64")
        tensors = {
            "kv": _arrays.zeros(like, (b, h, f, dv), dtype, device),
            "ksum": _arrays.zeros(like, (b, h, f), dtype, device),
            "tokens": _arrays.zeros(like, (b,), "int64", device),
        }
        return cls(tensors, {"scale": scale})

    # -- views and settings -------------------------------------------------------------

    @property
    def kv(self):
        """``(batch, heads, F, value_dim)``: sum of phi(k_u) v_u^T. Zero-copy."""
        return self._t["kv"]

    @property
    def ksum(self):
        """``(batch, heads, F)``: sum of phi(k_u). Zero-copy."""
        return self._t["ksum"]

    @property
    def scale(self) -> float:
        """The kernel's scale: s = scale * q.k."""
        return self._s["scale"]

    @property
    def heads(self) -> int:
        return int(self._t["kv"].shape[1])

    @property
    def feature_dim(self) -> int:
        """Dk, the q/k feature dim (F = 1 + Dk + Dk(Dk+1)/2 rows)."""
        return _dk_from_compact(int(self._t["kv"].shape[2]))

    @property
    def value_dim(self) -> int:
        """Dv, the value head dim."""
        return int(self._t["kv"].shape[3])

    def _zeros_like_self(self, batch: int) -> "LinearAttentionState":
        # like the token counter: it always has the array type the state was made with (kv
        # may be a based.Buffer where that library lacks the dtype, e.g. numpy bfloat16)
        return type(self).zeros(batch, self.heads, self.feature_dim, self.value_dim,
                                dtype=_dtype_name(self.kv, "state.kv"), scale=self.scale, like=self._t["tokens"])

    # -- the paper code's expanded layout ----------------------------------------------

    def to_expanded(self):
        """The state in the paper code's layout: ``(kv273, ksum273)``.

        Rows ``[1, sqrt(scale) x, scale/sqrt(2) vec(x x^T)]``, 1 + Dk + Dk^2 of them (273
        for Dk = 16), as in HazyResearch/based's ``TaylorExp`` with the default scale:
        ``kv273`` is ``(batch, heads, 1 + Dk + Dk^2, value_dim)``, ``ksum273`` is
        ``(batch, heads, 1 + Dk + Dk^2)``; new arrays of the state's type, dtype and device.
        Off-diagonal compact rows are split as row/sqrt(2) into (i, j) and (j, i).
        """
        b, h, _, dv = (int(s) for s in self.kv.shape)
        dk = self.feature_dim
        rows = 1 + dk + dk * dk
        dtype = _dtype_name(self.kv, "state.kv")
        kv_e = _arrays.empty(self.kv, (b, h, rows, dv), dtype)
        ksum_e = _arrays.empty(self.ksum, (b, h, rows), dtype)
        with self._in_use:
            _C.linear_state_to_expanded(self.kv, self.ksum, kv_e, ksum_e, _arrays.stream_handle(None, self.kv))
        return kv_e, ksum_e

    @classmethod
    def from_expanded(cls, kv, ksum, *, scale=None, like=None) -> "LinearAttentionState":
        """A state from the paper code's layout (see ``to_expanded``).

        Args:
            kv: ``(batch, heads, 1 + Dk + Dk^2, value_dim)``, any float dtype; Dk is
                inferred from the row count (273 -> 16).
            ksum: ``(batch, heads, 1 + Dk + Dk^2)``, kv's dtype.
            scale: the scale the expanded state was built with (the conversion itself
                needs none); default 1/sqrt(Dk), which is what ``TaylorExp`` uses.
            like: array type of the new state; default kv's.

        The new state has kv's dtype and device; its ``tokens`` are 0 (the expanded layout
        does not record them; set ``state.tokens[...]`` if you track them). The symmetric
        block is symmetrised: compact (i, j) = (exp(i, j) + exp(j, i)) / sqrt(2).

        Raises:
            TypeError: non-float dtypes. ValueError: shapes, a row count that is not
            1 + Dk + Dk^2 for Dk in 1..32, a bad scale.
        """
        ki = _arrays.info(kv, "kv")
        _arrays.require_float(ki, "kv")
        if len(ki.shape) != 4:
            raise ValueError(f"kv must have shape (batch, heads, 1 + Dk + Dk^2, value_dim), got {tuple(ki.shape)}")
        dk = _dk_from_expanded(int(ki.shape[2]))
        if not 1 <= dk <= MAX_FEATURE_DIM:
            raise ValueError(f"kv has {ki.shape[2]} feature rows, which is not 1 + Dk + Dk^2 for any Dk in "
                             f"1..{MAX_FEATURE_DIM} (273 for Dk = 16)")
        b, h, _, dv = (int(s) for s in ki.shape)
        new = cls.zeros(b, h, dk, dv, dtype=ki.dtype, scale=scale, like=kv if like is None else like,
                        device=None if like is not None else ki.device)
        _C.linear_state_from_expanded(kv, ksum, new.kv, new.ksum, _arrays.stream_handle(None, new.kv))
        return new

    # -- files ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path, *, like=None, device=None) -> "LinearAttentionState":
        """Read a state written by ``save`` (format: ``based._state``'s docstring).

        The tensors come back in the dtype they were saved with, in like's array type on
        ``device`` (default like's, else 'cpu'). Without ``like``, a host state is NumPy
        arrays -- except a bfloat16 kv/ksum, which NumPy cannot hold: those are
        ``based.Buffer`` objects (``torch.from_dlpack`` views them; pass ``like=`` a torch
        tensor to get torch tensors) -- and a CUDA state is ``based.Buffer`` objects.

        Raises:
            ValueError: naming the file, for one that is empty, truncated, damaged, or not a
                saved LinearAttentionState (or holds sizes or settings no state can have).
            OSError: as ``open`` raises it (e.g. FileNotFoundError).
            TypeError, ValueError: a bad ``like`` or ``device``.
        """
        meta, arrays = cls._read(path)
        with cls._file_errors(path, cls.__name__):
            b, h, f, dv = (int(s) for s in arrays["kv"].shape)
            dk = _dk_from_compact(f)
            if dk < 1:
                raise ValueError(f"kv has {f} feature rows, not 1 + Dk + Dk(Dk+1)/2 for any Dk")
            settings = {"dtype": meta["dtypes"]["kv"], "scale": meta["settings"]["scale"]}
            cls.zeros(0, h, dk, dv, **settings)   # the file's sizes and settings, by zeros' rules; allocates nothing
        state = cls.zeros(b, h, dk, dv, like=cls._load_like(like, device), device=device, **settings)
        with cls._file_errors(path, cls.__name__):
            return state._fill_from(arrays)


def _resolve_scale(scale, state: LinearAttentionState) -> float:
    if scale is None:
        return state.scale
    _args.same_setting("scale", _args.as_scale(scale), state.scale, "state")
    return state.scale


def _require_state(state) -> None:
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"state must be a based.LinearAttentionState, got {type(state).__name__}")


def _check_state_fits(state: LinearAttentionState, q, v, ndim: int) -> None:
    """Name a state/input mismatch in the user's terms (Dk, heads, Dv, batch) before the C
    core reports it as a shape of F rows. q, v: (B, [T,] H, D) arrays with a .shape; inputs
    of another ndim are left to the C core's shape check."""
    qs, vs = getattr(q, "shape", None), getattr(v, "shape", None)
    if qs is None or vs is None or len(qs) != ndim or len(vs) != ndim:
        return
    state._require_fits((("Dk (q's last dim)", state.feature_dim, qs[-1]), ("heads", state.heads, qs[-2]),
                         ("Dv (v's last dim)", state.value_dim, vs[-1]), ("batch", state.batch, qs[0])),
                        "the inputs")


def linear_attention_prefill(q, k, v, state=None, *, scale=None, normalize=True, eps=1e-6, out=None,
                             stream=None):
    """Causal Taylor linear attention over a whole sequence, continuing ``state``.

    ``o_t = sum_{u<=t} K(q_t, k_u) v_u / (sum_{u<=t} K(q_t, k_u) + eps)`` with
    ``K = 1 + s + s^2/2``, ``s = scale * q_t . k_u`` (SPEC 1.1; paper Sec. 4.1 Eq. 4), where
    u also runs over every token already folded into ``state``. Runs the IO-aware chunked
    algorithm (paper Sec. 5.2): within a chunk of tokens, K straight from q . k under the
    causal mask; across chunks, through the compact state. No T x T matrix and no
    whole-sequence feature map is ever formed.

    Args:
        q, k: ``(B, T, H, Dk)``, Dk in 1..32; float32, float64, float16 or bfloat16, any
            strides (a ``(B, H, T, D)`` tensor passed as ``x.transpose(1, 2)`` is not copied).
        v: ``(B, T, H, Dv)``, q's dtype.
        state: a ``LinearAttentionState`` for (B, H, Dk, Dv) (kv is (B, H, F, Dv)) to continue (chunked
            prefill), updated in place; None starts from zeros (float32, q's array type).
        scale: positive float; default the state's scale, else 1/sqrt(Dk). A value that
            disagrees with a given state's scale is an error.
        normalize: divide by the normaliser (default True); False returns the numerator.
        eps: added to the normaliser, >= 0 (default 1e-6).
        out: optional ``(B, T, H, Dv)`` array of v's dtype to write into.
        stream: CUDA stream to run on (an int ``cudaStream_t`` handle, a
            ``torch.cuda.Stream`` or a CuPy stream); default the current stream of the
            inputs' library (PyTorch's ``torch.cuda.current_stream()``, CuPy's current
            stream), else the legacy default stream. Ignored on the CPU. The call never
            synchronises: results are ready in that stream's order.

    Returns:
        ``(o, state)``: o ``(B, T, H, Dv)`` in v's dtype and array type (``out`` if given);
        ``state`` the same object that was passed (or the new one), with ``tokens += T``.

    Accumulation is float64 when the inputs or the state are float64, else float32. The
    state is read once and written once per call, in its own dtype.

    Raises:
        TypeError: non-arrays, unsupported or mismatched dtypes, a non-state ``state``,
            inputs that require grad.
        ValueError: shapes (with ``state=None``, a state whose size would overflow 64-bit
            indexing is refused before anything is allocated), strides (out/state
            overlapping themselves or an input), devices, settings (scale, eps), a read-only
            out or state. Nothing is written then.
        RuntimeError: ``state`` is in use by a call running in another thread (see
            ``LinearAttentionState``); nothing is written.
        NotImplementedError: CUDA arrays in a build of based without CUDA (no nvcc at build time).
    """
    qi = _arrays.float_input(q, "q", "(B, T, H, Dk)")
    _arrays.require_no_grad(k, "k")
    vi = _arrays.float_input(v, "v", "(B, T, H, Dv)")
    if not 1 <= qi.shape[3] <= MAX_FEATURE_DIM:
        raise ValueError(f"q must have a feature dim Dk in 1..{MAX_FEATURE_DIM}, got Dk={qi.shape[3]}")
    if state is None:
        b, _, h, dk = qi.shape
        state = LinearAttentionState.zeros(b, h, dk, max(int(vi.shape[3]), 1), scale=scale, like=q,
                                           device=qi.device)   # its size is checked before it is allocated
        scale = state.scale
    else:
        _require_state(state)
        _check_state_fits(state, q, v, 4)
        scale = _resolve_scale(scale, state)
    state._require_writable()
    normalize = _args.as_flag(normalize, "normalize")
    _arrays.require_no_grad(out, "out")
    if out is None:
        out = _arrays.empty(v, tuple(vi.shape), vi.dtype, vi.device)
    with state._in_use:
        _C.linear_attention_prefill(q, k, v, state.kv, state.ksum, state.tokens, out, scale, normalize, eps, 0,
                                    _arrays.stream_handle(stream, q))
    return out, state


def linear_attention_decode(q, k, v, state, *, normalize=True, eps=1e-6, out=None, stream=None):
    """One decoding step: fold token (k, v) of every sequence into ``state``, then read it with q.

    ``kv += phi(k) v^T; ksum += phi(k); o = phi(q) kv / (phi(q) . ksum + eps)`` (SPEC 1.1,
    paper Sec. 4.1 Eq. 3), in one pass over the state. Uses ``state.scale``.

    Args:
        q, k: ``(B, H, Dk)``; v: ``(B, H, Dv)``; one dtype (float32, float64, float16,
            bfloat16), any strides.
        state: the ``LinearAttentionState`` to update in place (``tokens += 1``).
        normalize, eps: as in ``linear_attention_prefill``.
        out: optional ``(B, H, Dv)`` array of v's dtype.
        stream: as in ``linear_attention_prefill``. With ``out`` and an existing state a
            CUDA decode allocates nothing and is CUDA-graph capturable.

    Returns:
        o ``(B, H, Dv)`` in v's dtype and array type (``out`` if given).

    Raises:
        TypeError, ValueError, RuntimeError, NotImplementedError: as
        ``linear_attention_prefill``; a rejected call leaves ``out`` and the state unchanged.
    """
    _require_state(state)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _arrays.require_no_grad(x, name)
    _check_state_fits(state, q, v, 3)
    state._require_writable()
    normalize = _args.as_flag(normalize, "normalize")
    _arrays.require_no_grad(out, "out")
    if out is None:
        vi = _arrays.float_input(v, "v", "(B, H, Dv)")
        out = _arrays.empty(v, tuple(vi.shape), vi.dtype, vi.device)
    with state._in_use:
        _C.linear_attention_decode(q, k, v, state.kv, state.ksum, state.tokens, out, state.scale, normalize, eps,
                                   _arrays.stream_handle(stream, q))
    return out
