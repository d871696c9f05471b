"""The state helpers, the expanded linear-state layout and the feature map on CUDA (SPEC 1.1, 3):
each CUDA result against the CPU's for the same inputs.

Copies, resets and reorderings move or convert elements exactly as the CPU does (float32 to
bfloat16/float16 rounds to nearest even from the exact value on both), so they must agree bit
for bit. The feature map and the layout conversion compute in float32 on CUDA; tolerances are
stated where they are used.
"""

import math

import numpy as np
import pytest
from conftest import EPS, requires_cuda, torch

import based

pytestmark = requires_cuda

State = based.LinearAttentionState
Cache = based.SlidingWindowCache
FLOAT_DTYPES = ["float32", "bfloat16", "float16"]
# One ulp of the subnormal range: where a result is subnormal, one ulp is this much, not a
# relative amount (float16 subnormals start below 6.1e-5; randn values land there at times).
SUBNORMAL_ULP = {"float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}


def names(state):
    return ("kv", "ksum", "tokens") if isinstance(state, State) else ("k", "v", "tokens")


def as_torch(a):
    """A torch view of a state tensor (torch tensors as they are, based.Buffer zero-copy)."""
    return a if isinstance(a, torch.Tensor) else torch.from_dlpack(a)


def make(kind, device, dtype="float32", batch=4, like=True):
    """An all-zero state of `kind` ('linear' or 'window') on `device`; torch tensors when like,
    else based.Buffer arrays (like=None)."""
    like_t = torch.empty(0) if like else None
    if kind == "linear":
        return State.zeros(batch, 3, 5, 6, dtype=dtype, device=device, like=like_t)
    return Cache.zeros(batch, 2, 7, 8, dtype=dtype, device=device, like=like_t)


def fill(state, seed):
    """Random contents, written through the zero-copy views (random tokens too)."""
    g = torch.Generator().manual_seed(seed)
    for name in names(state):
        t = as_torch(getattr(state, name))
        if name == "tokens":
            values = torch.randint(0, 1000, tuple(t.shape), generator=g)
        else:
            values = torch.randn(tuple(t.shape), generator=g).to(t.dtype)
        t.copy_(values)
    return state


def twins(kind, dtype="float32", seed=0, batch=4):
    """(CPU state, CUDA state) with the same contents."""
    return fill(make(kind, "cpu", dtype, batch), seed), fill(make(kind, "cuda", dtype, batch), seed)


def assert_same(gpu, cpu, what=""):
    """Every tensor of the CUDA state equals the CPU state's, bit for bit."""
    for name in names(cpu):
        a, b = as_torch(getattr(gpu, name)), as_torch(getattr(cpu, name))
        assert a.device.type == "cuda", (what, name, a.device)
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.cpu(), b.cpu()), f"{what}: {name} differs between CUDA and CPU"


# ---------------------------------------------------------------------------------------
# Creation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "window"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zeros_on_cuda(kind, dtype):
    """device='cuda' with a CPU torch like, and the device taken from a CUDA like."""
    made = [make(kind, "cuda", dtype)]
    like = torch.empty(0, device="cuda")
    made.append(State.zeros(4, 3, 5, 6, dtype=dtype, like=like) if kind == "linear"
                else Cache.zeros(4, 2, 7, 8, dtype=dtype, like=like))
    for s in made:
        assert s.device == "cuda:0"
        for name in names(s):
            t = getattr(s, name)
            assert isinstance(t, torch.Tensor) and t.device.type == "cuda" and not t.any()
            assert t.dtype == (torch.int64 if name == "tokens" else getattr(torch, dtype))


# ---------------------------------------------------------------------------------------
# reset, copy_, clone, index_select
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "window"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("indices", [None, [1], [0, 2], [-1], [-4, 1, 1], "cuda tensor"])
def test_reset(kind, dtype, indices):
    cpu, gpu = twins(kind, dtype)
    if indices == "cuda tensor":
        cpu_idx, gpu_idx = torch.tensor([3, 0]), torch.tensor([3, 0], device="cuda")
    else:
        cpu_idx = gpu_idx = indices
    assert gpu.reset(gpu_idx) is gpu
    cpu.reset(cpu_idx)
    assert_same(gpu, cpu, f"reset({indices})")


@pytest.mark.parametrize("kind", ["linear", "window"])
def test_reset_bad_index_resets_nothing(kind):
    cpu, gpu = twins(kind)
    with pytest.raises(ValueError, match="out of range"):
        gpu.reset([0, 4])
    assert_same(gpu, cpu, "a failed reset")


@pytest.mark.parametrize("kind", ["linear", "window"])
@pytest.mark.parametrize("dst_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("src_dtype", FLOAT_DTYPES)
def test_copy_on_cuda(kind, dst_dtype, src_dtype):
    cpu_dst, gpu_dst = twins(kind, dst_dtype, seed=1)
    cpu_src, gpu_src = twins(kind, src_dtype, seed=2)
    assert gpu_dst.copy_(gpu_src) is gpu_dst
    cpu_dst.copy_(cpu_src)
    assert_same(gpu_dst, cpu_dst, f"copy_ {src_dtype} -> {dst_dtype}")


@pytest.mark.parametrize("kind", ["linear", "window"])
@pytest.mark.parametrize("dst_dtype,src_dtype", [("float32", "float32"), ("bfloat16", "float32"),
                                                 ("float32", "float16"), ("float32", "float64"),
                                                 ("float16", "float64")])
def test_copy_from_cpu_to_cuda(kind, dst_dtype, src_dtype):
    """float64 only on the CPU side: CUDA states are float32, bfloat16 or float16."""
    src = fill(make(kind, "cpu", src_dtype), seed=3)
    cpu_dst, gpu_dst = twins(kind, dst_dtype, seed=4)
    gpu_dst.copy_(src)
    cpu_dst.copy_(src)
    assert_same(gpu_dst, cpu_dst, f"copy_ cpu {src_dtype} -> cuda {dst_dtype}")


@pytest.mark.parametrize("kind", ["linear", "window"])
@pytest.mark.parametrize("dst_dtype,src_dtype", [("float32", "float32"), ("float64", "float32"),
                                                 ("float64", "bfloat16"), ("float16", "float32")])
def test_copy_from_cuda_to_cpu(kind, dst_dtype, src_dtype):
    cpu_src, gpu_src = twins(kind, src_dtype, seed=5)
    via_cuda = fill(make(kind, "cpu", dst_dtype), seed=6)
    via_cpu = fill(make(kind, "cpu", dst_dtype), seed=6)
    via_cuda.copy_(gpu_src)
    via_cpu.copy_(cpu_src)
    for name in names(via_cpu):
        a, b = getattr(via_cuda, name), getattr(via_cpu, name)
        assert a.device.type == "cpu" and torch.equal(a, b), f"copy_ cuda {src_dtype} -> cpu {dst_dtype}: {name}"


@pytest.mark.parametrize("kind", ["linear", "window"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clone(kind, dtype):
    cpu, gpu = twins(kind, dtype)
    c = gpu.clone()
    assert c is not gpu and type(c) is type(gpu)
    assert_same(c, cpu, "clone")
    for name in names(c):  # new memory: changing the clone leaves the original alone
        getattr(c, name).zero_()
    assert_same(gpu, cpu, "the original after its clone was zeroed")


@pytest.mark.parametrize("kind", ["linear", "window"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("order", [[2, 0, 0, 1], [3, 2, 1, 0], [-1, 0], [1, 1, 1, 1, 1, 1]])
def test_index_select(kind, dtype, order):
    cpu, gpu = twins(kind, dtype)
    picked = gpu.index_select(order)
    assert picked.batch == len(order)
    assert_same(picked, cpu.index_select(order), f"index_select({order})")
    assert_same(gpu, cpu, "index_select's source")


@pytest.mark.parametrize("kind", ["linear", "window"])
def test_index_select_many_rows(kind):
    """More rows than one launch takes (the indices travel by value, 256 per launch)."""
    cpu, gpu = twins(kind, batch=300)
    order = list(np.random.default_rng(7).integers(-300, 300, size=700))
    assert_same(gpu.index_select(order), cpu.index_select(order), "index_select of 700 rows")
    rows = order[:400]
    gpu.reset(rows)
    cpu.reset(rows)
    assert_same(gpu, cpu, "reset of 400 rows")


@pytest.mark.parametrize("kind", ["linear", "window"])
def test_reorder_in_place(kind):
    """The documented idiom for beam search: state.copy_(state.index_select(order))."""
    cpu, gpu = twins(kind)
    order = [3, 3, 0, 1]
    gpu.copy_(gpu.index_select(order))
    cpu.copy_(cpu.index_select(order))
    assert_same(gpu, cpu, "reorder in place")


# ---------------------------------------------------------------------------------------
# The expanded linear-state layout
# ---------------------------------------------------------------------------------------


def _assert_close_conversion(a, b, dtype, what):
    """CPU: float64 math, one rounding to dtype. CUDA: float32 math (one multiply by a rounded
    1/sqrt(2), or one add and that multiply), then the same rounding. Before that last rounding
    they differ by at most 3 float32 ulps (rtol 4 EPS32); a float32-level difference can move a
    bfloat16/float16 result by one of its own ulps (rtol EPS[dtype])."""
    rtol = 4 * EPS["float32"] + (EPS[dtype] if dtype != "float32" else 0.0)
    a64, b64 = a.cpu().double(), b.cpu().double()
    assert torch.all((a64 - b64).abs() <= rtol * b64.abs() + SUBNORMAL_ULP[dtype]), (
        f"{what}: max rel error {((a64 - b64).abs() / b64.abs().clamp_min(1e-30)).max().item():.3e} > {rtol:.3e}")


@pytest.mark.parametrize("dk", [1, 3, 16])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_expanded_layout(dk, dtype):
    cpu = State.zeros(2, 3, dk, 5, dtype=dtype, like=torch.empty(0))
    gpu = State.zeros(2, 3, dk, 5, dtype=dtype, device="cuda", like=torch.empty(0))
    fill(cpu, 8)
    fill(gpu, 8)
    e_gpu, es_gpu = gpu.to_expanded()
    e_cpu, es_cpu = cpu.to_expanded()
    rows = 1 + dk + dk * dk
    assert e_gpu.device.type == "cuda" and e_gpu.shape == (2, 3, rows, 5) and es_gpu.shape == (2, 3, rows)
    _assert_close_conversion(e_gpu, e_cpu, dtype, "to_expanded kv")
    _assert_close_conversion(es_gpu, es_cpu, dtype, "to_expanded ksum")
    # back, from the CPU's expanded tensors so both sides convert the same input
    back_gpu = State.from_expanded(e_cpu.cuda(), es_cpu.cuda(), scale=gpu.scale)
    back_cpu = State.from_expanded(e_cpu, es_cpu, scale=cpu.scale)
    assert back_gpu.device == "cuda:0" and back_gpu.feature_dim == dk
    _assert_close_conversion(back_gpu.kv, back_cpu.kv, dtype, "from_expanded kv")
    _assert_close_conversion(back_gpu.ksum, back_cpu.ksum, dtype, "from_expanded ksum")
    assert not back_gpu.tokens.any()


def test_from_expanded_symmetrises_on_cuda():
    """An asymmetric expanded block: compact (i, j) = (e(i, j) + e(j, i)) / sqrt(2)."""
    dk = 3
    e = torch.randn(1, 1, 1 + dk + dk * dk, 2, dtype=torch.float64)
    es = torch.randn(1, 1, 1 + dk + dk * dk, dtype=torch.float64)
    s = State.from_expanded(e.float().cuda(), es.float().cuda())
    kv = s.kv.cpu().double()
    f = 1 + dk
    for i in range(dk):
        for j in range(i, dk):
            a, b = e[0, 0, 1 + dk + i * dk + j], e[0, 0, 1 + dk + j * dk + i]
            want = a if i == j else (a.float().double() + b.float().double()) / math.sqrt(2)
            assert torch.allclose(kv[0, 0, f], want, rtol=4 * EPS["float32"], atol=0), (i, j)
            f += 1


# ---------------------------------------------------------------------------------------
# The Taylor feature map
# ---------------------------------------------------------------------------------------


def _assert_same_features(a, b, dtype, what=""):
    """CUDA and CPU use the same float32 constants and operation order, so the features agree
    bit for bit; 1 ulp of the output dtype (rtol EPS[dtype]) is allowed in case a compiler
    rounds one intermediate differently (one subnormal ulp where the feature is subnormal) --
    anything larger is a wrong feature."""
    assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape, (what, a.shape, b.shape)
    a64, b64 = a.cpu().double(), b.cpu().double()
    assert torch.all((a64 - b64).abs() <= EPS[dtype] * b64.abs() + SUBNORMAL_ULP[dtype]), (
        f"{what}: max abs difference {(a64 - b64).abs().max().item():.3e}")


# x as views of a (3, 4, 10, Dk + 3) tensor: strided leading dims with unit stride along Dk
VIEWS = {
    "sliced": lambda t: t[:, 1:, ::2, 1:-2],
    "transposed": lambda t: t[:, 1:, ::2, 1:-2].transpose(0, 2),
    "offset": lambda t: t[1:, :, 3:, 2:-1],
    "vector": lambda t: t[0, 0, 0, :-3],
    "contiguous": lambda t: t[..., :-3].contiguous(),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dk", [1, 2, 3, 5, 7, 9, 15, 16, 17, 23, 31, 32])
def test_taylor_feature_map(dtype, dk):
    g = torch.Generator().manual_seed(dk)
    base = torch.randn(3, 4, 10, dk + 3, generator=g).to(getattr(torch, dtype))
    base_gpu = base.cuda()
    for name, view in VIEWS.items():
        xg, xc = view(base_gpu), view(base)
        assert xg.shape[-1] == dk and xg.stride(-1) == 1 and xg.stride() == xc.stride()
        _assert_same_features(based.taylor_feature_map(xg), based.taylor_feature_map(xc), dtype, name)
    empty = based.taylor_feature_map(torch.empty(0, dk, dtype=base.dtype, device="cuda"))
    assert empty.shape == (0, 1 + dk + dk * (dk + 1) // 2) and empty.device.type == "cuda"


def test_taylor_feature_map_out_and_scale():
    x = torch.randn(5, 7, 16, device="cuda")
    F = 153
    out = torch.full((5, 7, F + 4), float("nan"), device="cuda")[..., 2:F + 2]  # a strided out
    got = based.taylor_feature_map(x, scale=0.3, out=out)
    assert got is out
    _assert_same_features(out, based.taylor_feature_map(x.cpu(), scale=0.3), "float32")


def test_taylor_feature_map_into_a_based_buffer():
    """based.zeros(device='cuda') as the out of a CUDA op."""
    x = torch.randn(4, 6, device="cuda")
    out = based.zeros((4, 1 + 6 + 21), "float32", device="cuda")
    assert based.taylor_feature_map(x, out=out) is out
    _assert_same_features(torch.from_dlpack(out), based.taylor_feature_map(x.cpu()), "float32")


def test_taylor_feature_map_errors_on_cuda():
    x = torch.randn(2, 4, device="cuda")
    with pytest.raises(ValueError, match="out"):  # out on the host, x on the GPU
        based.taylor_feature_map(x, out=torch.zeros(2, 15))
    with pytest.raises(TypeError, match="float64"):
        based.taylor_feature_map(x.double())


# ---------------------------------------------------------------------------------------
# States made of based.Buffer arrays on CUDA (no framework)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "window"])
def test_based_buffers_as_state_tensors(kind):
    gpu = fill(make(kind, "cuda", like=False), 9)
    cpu = fill(make(kind, "cpu"), 9)
    for name in names(gpu):
        assert isinstance(getattr(gpu, name), based.Buffer)
    assert gpu.device == "cuda:0"
    assert_same(gpu, cpu, "filled")
    assert_same(gpu.clone(), cpu.clone(), "clone")
    assert_same(gpu.index_select([1, 1, 0]), cpu.index_select([1, 1, 0]), "index_select")
    gpu.reset([0, -1])
    cpu.reset([0, -1])
    assert_same(gpu, cpu, "reset")
    src = fill(make(kind, "cpu", "float16"), 10)
    gpu.copy_(src)
    cpu.copy_(src)
    assert_same(gpu, cpu, "copy_ from the host")
    if kind == "linear":
        e_gpu, es_gpu = gpu.to_expanded()
        e_cpu, es_cpu = cpu.to_expanded()
        _assert_close_conversion(as_torch(e_gpu), e_cpu, "float32", "to_expanded of Buffers")
        _assert_close_conversion(as_torch(es_gpu), es_cpu, "float32", "to_expanded of Buffers")

