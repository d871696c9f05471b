"""Every way to call linear attention wrongly (SPEC 4): the right exception, a message
naming the argument, the expected and the given, and out AND the state bit-identical
afterwards, for prefill and decode alike."""

import numpy as np
import pytest
from conftest import RawProducer, requires_torch, torch

import based
from based import _C

B, T, H, DK, DV = 2, 5, 3, 4, 6
F = 1 + DK + DK * (DK + 1) // 2


class Call:
    """Valid arguments for one prefill or decode call, a filled state, a sentinel out."""

    def __init__(self, decode: bool):
        rng = np.random.default_rng(0)
        self.decode = decode
        lead = (B, H) if decode else (B, T, H)
        self.q, self.k = (rng.standard_normal(lead + (DK,)).astype(np.float32) for _ in range(2))
        self.v = rng.standard_normal(lead + (DV,)).astype(np.float32)
        self.out = np.full(lead + (DV,), 7.0, np.float32)
        self.state = based.LinearAttentionState.zeros(B, H, DK, DV, like=self.q, scale=0.5)
        warm = rng.standard_normal((B, 3, H, DK)).astype(np.float32)
        based.linear_attention_prefill(warm, warm, rng.standard_normal((B, 3, H, DV)).astype(np.float32), self.state)
        self.snapshot = [a.tobytes() for a in (self.out, self.state.kv, self.state.ksum, self.state.tokens)]

    def public(self, **kw):
        args = {"q": self.q, "k": self.k, "v": self.v, "state": self.state, "out": self.out}
        args.update(kw)
        q, k, v, state = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("state")
        if self.decode:
            args.pop("scale", None)
            return based.linear_attention_decode(q, k, v, state, **args)
        return based.linear_attention_prefill(q, k, v, state, **args)

    def raw(self, **kw):
        """The _C entry point with explicit tensors (to reach what the Python layer does not)."""
        a = {"q": self.q, "k": self.k, "v": self.v, "kv": self.state.kv, "ksum": self.state.ksum,
             "tokens": self.state.tokens, "out": self.out, "scale": 0.5, "normalize": True, "eps": 1e-6, "chunk": 0}
        a.update(kw)
        args = [a[n] for n in ("q", "k", "v", "kv", "ksum", "tokens", "out", "scale", "normalize", "eps")]
        if self.decode:
            return _C.linear_attention_decode(*args, None)
        return _C.linear_attention_prefill(*args, a["chunk"], None)

    def untouched(self) -> bool:
        now = [a.tobytes() for a in (self.out, self.state.kv, self.state.ksum, self.state.tokens)]
        return now == self.snapshot


def shape_of(c, name, last=None):
    """Shape of argument name with the last dim replaced."""
    shape = list(getattr(c, name).shape)
    if last is not None:
        shape[-1] = last
    return tuple(shape)


# The Python layer's and the C core's messages for the same mistake differ, and each case
# pins the one it reaches: the message regex is a string (the same in prefill and decode)
# or a dict {mode: regex} naming the modes the case runs in (a case that exists in one
# mode only, like a chunk length, names just that mode).
PY_DTYPE = r"q must have dtype one of float32, float64, float16, bfloat16, got int32"
CORE_DTYPE = r"q has an unsupported dtype \(int, 32 bits, 1 lanes\); expected float32, float64, float16 or bfloat16"

# (id, how to call, exception, message regex or {mode: regex})
CASES = [
    ("q-ndim", lambda c: c.public(q=c.q[..., None]), ValueError,
     {"prefill": r"^q must have shape \(B, T, H, Dk\), got \(2, 5, 3, 4, 1\)$",                       # Python layer
      "decode": r"^q must have 3 dimensions \(B, H, Dk\), got 4 dimensions \(2, 3, 4, 1\)$"}),         # C core
    ("q-dk-33", lambda c: c.raw(q=np.zeros(shape_of(c, "q", 33), np.float32), k=np.zeros(shape_of(c, "q", 33),
                                                                                          np.float32)),
     ValueError, r"q must have a feature dim Dk in 1\.\.32, got Dk=33"),
    ("k-shape", lambda c: c.public(k=c.k[:1]), ValueError, r"k must have shape \(B=2, "),
    ("v-heads", lambda c: c.public(v=c.v[..., :2, :]), ValueError, r"v must have shape \(B=2, "),
    ("out-shape", lambda c: c.public(out=np.zeros(shape_of(c, "out", DV + 1), np.float32)), ValueError,
     r"out must have shape .*Dv=6\), got"),
    # the Python layer names a state mismatch in the user's terms ...
    ("state-dv", lambda c: c.public(v=np.zeros(shape_of(c, "v", 5), np.float32),
                                    out=np.zeros(shape_of(c, "v", 5), np.float32)),
     ValueError, r"the state was built for Dv \(v's last dim\) = 6, but the inputs have Dv \(v's last dim\) = 5"),
    ("state-dk", lambda c: c.public(q=np.zeros(shape_of(c, "q", 3), np.float32), k=np.zeros(shape_of(c, "q", 3),
                                                                                           np.float32)),
     ValueError, r"the state was built for Dk \(q's last dim\) = 4, but the inputs have Dk \(q's last dim\) = 3"),
    ("state-batch", lambda c: c.public(state=based.LinearAttentionState.zeros(3, H, DK, DV, like=c.q, scale=0.5)),
     ValueError, r"the state was built for batch = 3, but the inputs have batch = 2"),
    # ... and the C core checks the same on its own, in F rows
    ("state-dv-core", lambda c: c.raw(v=np.zeros(shape_of(c, "v", 5), np.float32),
                                      out=np.zeros(shape_of(c, "v", 5), np.float32)),
     ValueError, r"state.kv must have shape \(B=2, H=3, F=15, Dv=5\), got \(2, 3, 15, 6\)"),
    ("state-dk-core", lambda c: c.raw(q=np.zeros(shape_of(c, "q", 3), np.float32), k=np.zeros(shape_of(c, "q", 3),
                                                                                             np.float32)),
     ValueError, r"state.kv must have shape \(B=2, H=3, F=10, Dv=6\), got \(2, 3, 15, 6\)"),
    ("k-dtype", lambda c: c.public(k=c.k.astype(np.float64)), TypeError,
     r"k must have the dtype of q \(float32\), got float64"),
    ("v-dtype", lambda c: c.public(v=c.v.astype(np.float16)), TypeError,
     r"v must have the dtype of q \(float32\), got float16"),
    ("out-dtype", lambda c: c.public(out=c.out.astype(np.float64)), TypeError,
     r"out must have the dtype of v \(float32\), got float64"),
    # the Python prefill checks q's dtype itself; the Python decode leaves it to the C core
    ("q-int", lambda c: c.public(q=c.q.astype(np.int32)), TypeError, {"prefill": PY_DTYPE, "decode": CORE_DTYPE}),
    ("q-int-core", lambda c: c.raw(q=c.q.astype(np.int32)), TypeError, CORE_DTYPE),
    ("q-not-array", lambda c: c.public(q=[[1.0]]), TypeError, r"q must be an array implementing the DLPack"),
    ("ksum-dtype", lambda c: c.raw(ksum=np.zeros((B, H, F), np.float64)), TypeError,
     r"state.ksum must have the dtype of state.kv \(float32\), got float64"),
    ("tokens-dtype", lambda c: c.raw(tokens=np.zeros(B, np.float32)), TypeError,
     r"state.tokens must have dtype int64, got float32"),
    ("state-type", lambda c: c.public(state=(c.state.kv, c.state.ksum)), TypeError,
     r"state must be a based.LinearAttentionState, got tuple"),
    ("device-mixed", lambda c: c.raw(out=RawProducer(np.zeros_like(c.out), device=(2, 0))), ValueError,
     r"out is on cuda:0 but q is on cpu: all tensors of one call must be on one device"),
    ("device-all-cuda", lambda c: c.raw(**{n: RawProducer(np.zeros_like(getattr(c, n)), device=(2, 0))
                                           for n in ("q", "k", "v", "out")},
                                        kv=RawProducer(np.zeros_like(c.state.kv), device=(2, 0)),
                                        ksum=RawProducer(np.zeros_like(c.state.ksum), device=(2, 0)),
                                        tokens=RawProducer(np.zeros_like(c.state.tokens), device=(2, 0))),
     NotImplementedError, r"q is on cuda:0, and this build of based has no CUDA kernel"),
    ("out-overlaps-q", lambda c: c.raw(q=c.out[..., :DK], k=c.out[..., :DK]), ValueError,
     r"out shares memory with q"),
    ("out-self-overlap", lambda c: c.public(out=np.lib.stride_tricks.as_strided(c.out, c.out.shape,
                                                                                 (0,) * c.out.ndim)),
     ValueError, r"out has overlapping memory"),
    ("kv-overlaps-v", lambda c: c.raw(v=np.lib.stride_tricks.as_strided(c.state.kv, c.v.shape, c.v.strides)),
     ValueError, r"state.kv shares memory with v"),
    ("kv-self-overlap", lambda c: c.raw(kv=np.lib.stride_tricks.as_strided(c.state.kv, c.state.kv.shape,
                                                                            (0, 0, 4, 4))),
     ValueError, r"state.kv has overlapping memory"),
    ("out-is-ksum", lambda c: c.raw(out=np.lib.stride_tricks.as_strided(c.state.ksum, c.out.shape,
                                                                         c.out.strides)),
     ValueError, r"out shares memory with state.ksum"),
    # decode takes no scale (it uses the state's), so only a prefill can disagree with it
    ("scale-mismatch", lambda c: c.public(scale=0.3), ValueError,
     {"prefill": r"^scale=0\.3 disagrees with the state's scale 0\.5"}),
    ("scale-negative", lambda c: c.raw(scale=-1.0), ValueError, r"^scale must be a finite number > 0, got -1$"),
    ("scale-nan", lambda c: c.raw(scale=float("nan")), ValueError, r"scale must be a finite number > 0, got nan"),
    ("eps-negative", lambda c: c.public(eps=-1e-3), ValueError, r"eps must be a finite number >= 0, got -0.001"),
    ("eps-str", lambda c: c.public(eps="small"), TypeError, r"eps must be a number, got str"),
    ("chunk-too-big", lambda c: c.raw(chunk=4096), ValueError,
     {"prefill": r"^chunk_size must be in 0\.\.1024 \(0: default\), got 4096$"}),
    ("eps-inf", lambda c: c.raw(eps=float("inf")), ValueError, r"^eps must be a finite number >= 0, got inf$"),
    ("tokens-negative", lambda c: c.raw(tokens=np.array([3, -1], np.int64)), ValueError,
     r"state.tokens\[1\] is -1; token counts must be >= 0"),
    ("tokens-overflow", lambda c: c.raw(tokens=np.array([3, 2**63 - 1], np.int64)), ValueError,
     r"state.tokens\[1\] \+ \d+ overflows int64"),
    ("out-read-only", lambda c: c.public(out=RawProducer(c.out, readonly=True)), ValueError,
     r"out is read-only"),
    ("kv-read-only", lambda c: c.raw(kv=RawProducer(c.state.kv, readonly=True)), ValueError,
     r"state.kv is read-only"),
    ("params-count", lambda c: (_C.linear_attention_decode if c.decode else _C.linear_attention_prefill)(c.q),
     TypeError, {"prefill": r"takes 12 positional arguments, got 1",
                 "decode": r"takes 11 positional arguments, got 1"}),
]


# CUDA tensors pass every check and then meet the build: one without nvcc names itself here; a
# CUDA build is covered by tests/test_errors.py (test_cuda_tensors_*) and tests/c.
CUDA_BUILD_ONLY_SKIPS = {"device-all-cuda"} if based.build_info()["cuda"] else set()
RUNS = [(mode, case) for case in CASES for mode in ("prefill", "decode")
        if (isinstance(case[3], str) or mode in case[3]) and case[0] not in CUDA_BUILD_ONLY_SKIPS]


@pytest.mark.parametrize("mode, case", RUNS, ids=[f"{mode}-{case[0]}" for mode, case in RUNS])
def test_bad_call_raises_and_writes_nothing(mode, case):
    _, bad_call, exc, message = case
    c = Call(mode == "decode")
    with pytest.raises(exc, match=message if isinstance(message, str) else message[mode]):
        bad_call(c)
    assert c.untouched(), "out or the state changed on a rejected call"


@requires_torch
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_inputs_that_require_grad(decode):
    c = Call(decode)
    q = torch.from_numpy(c.q).requires_grad_()
    with pytest.raises(TypeError, match=r"q requires grad, but based kernels have no backward pass yet"):
        c.public(q=q)
    assert c.untouched()


def test_failed_prefill_without_a_state_returns_nothing():
    q = np.zeros((1, 3, 2, 4), np.float32)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        based.linear_attention_prefill(q, q.astype(np.float64), np.zeros((1, 3, 2, 5), np.float32))
    with pytest.raises(ValueError, match=r"q must have a feature dim Dk in 1\.\.32, got Dk=40"):
        based.linear_attention_prefill(np.zeros((1, 3, 2, 40), np.float32), np.zeros((1, 3, 2, 40), np.float32),
                                       np.zeros((1, 3, 2, 5), np.float32))


@requires_torch
def test_out_and_state_that_require_grad_are_refused_and_untouched():
    """torch refuses to export tensors that require grad through __dlpack__; based reads
    host tensors through torch's C exchange table, so it checks itself, before writing."""
    q = torch.randn(1, 4, 2, 4)
    v = torch.randn(1, 4, 2, 3)
    out = torch.zeros(1, 4, 2, 3, requires_grad=True)
    with pytest.raises(TypeError, match="out requires grad"):
        based.linear_attention_prefill(q, q, v, out=out)
    assert not out.detach().any()
    _, state = based.linear_attention_prefill(q, q, v)
    before = state.kv.clone()
    state.kv.requires_grad_()
    with pytest.raises(TypeError, match=r"LinearAttentionState.kv requires grad"):
        based.linear_attention_decode(q[:, 0], q[:, 0], v[:, 0], state)
    assert torch.equal(state.kv.detach(), before)


def test_normalize_must_be_a_bool():
    q = np.zeros((1, 2, 1, 4), np.float32)
    with pytest.raises(TypeError, match="normalize must be a bool, got str"):
        based.linear_attention_prefill(q, q, q, normalize="no")
