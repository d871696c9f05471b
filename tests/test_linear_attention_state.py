"""LinearAttentionState (SPEC 3): creation in the caller's array type, zero-copy views,
batch management (reset, copy_, clone, index_select), save/load, and the paper code's
expanded 273-row layout (to_expanded / from_expanded)."""

import math

import numpy as np
import pytest
from conftest import EPS, HAS_TORCH, requires_torch, to_numpy64, torch
from linear_helpers import DTYPES, SHORT, assert_within, feature_count

import based
from based import reference as ref

State = based.LinearAttentionState


def filled(b=3, h=2, dk=4, dv=5, t=7, dtype="float32", like=None, seed=0):
    """A state after prefilling t random tokens (numpy inputs unless like is torch)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, b, t, h, dk)).astype(np.float32)
    v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
    if like is not None and HAS_TORCH and isinstance(like, torch.Tensor):
        q, k, v = (torch.from_numpy(x) for x in (q, k, v))
    state = State.zeros(b, h, dk, dv, dtype=dtype, like=q if like is None else like)
    based.linear_attention_prefill(q, k, v, state)
    return state


def decode_once(state, seed=1):
    """One decode step with fixed random inputs; returns the output as float64 numpy."""
    rng = np.random.default_rng(seed)
    b, h, dk, dv = state.batch, state.heads, state.feature_dim, state.value_dim
    q, k = rng.standard_normal((2, b, h, dk)).astype(np.float32)
    v = rng.standard_normal((b, h, dv)).astype(np.float32)
    if HAS_TORCH and isinstance(state.kv, torch.Tensor):
        q, k, v = (torch.from_numpy(x) for x in (q, k, v))
    return to_numpy64(based.linear_attention_decode(q, k, v, state))


# ---------------------------------------------------------------------------------------
# Creation and properties
# ---------------------------------------------------------------------------------------


def test_zeros_numpy_like():
    x = np.zeros((1,), np.float16)
    s = State.zeros(2, 3, 16, 64, like=x)
    assert isinstance(s.kv, np.ndarray) and s.kv.shape == (2, 3, 153, 64) and s.kv.dtype == np.float32
    assert s.ksum.shape == (2, 3, 153) and s.tokens.shape == (2,) and s.tokens.dtype == np.int64
    assert (s.batch, s.heads, s.feature_dim, s.value_dim) == (2, 3, 16, 64)
    assert s.scale == 0.25 and s.device == "cpu"
    assert s.nbytes == 4 * (2 * 3 * 153 * 64 + 2 * 3 * 153) + 8 * 2
    assert not s.kv.any() and not s.ksum.any() and not s.tokens.any()
    assert "LinearAttentionState(kv=(2, 3, 153, 64)" in repr(s) and "scale=0.25" in repr(s)


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_torch_like(dtype):
    s = State.zeros(2, 1, 8, 3, dtype=dtype, like=torch.zeros(1), scale=0.5)
    assert isinstance(s.kv, torch.Tensor) and s.kv.dtype == getattr(torch, dtype)
    assert s.tokens.dtype == torch.int64 and s.scale == 0.5 and s.feature_dim == 8
    assert s.nbytes == s.kv.element_size() * (2 * 45 * 3 + 2 * 45) + 16


def test_zeros_without_a_framework_gives_based_buffers():
    s = State.zeros(1, 2, 3, 4)
    assert isinstance(s.kv, based.Buffer) and s.kv.shape == (1, 2, 10, 4)
    assert np.from_dlpack(s.kv).sum() == 0


def test_bfloat16_state_like_numpy_is_buffers():
    s = State.zeros(1, 2, 3, 4, dtype="bfloat16", like=np.zeros(1))
    assert isinstance(s.kv, based.Buffer) and s.kv.dtype == "bfloat16"


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        ({"feature_dim": 0}, ValueError, r"feature_dim \(Dk, the q/k dim\) must be between 1 and 32, got 0"),
        ({"feature_dim": 33}, ValueError, r"between 1 and 32, got 33"),
        ({"feature_dim": 2.5}, TypeError, r"feature_dim \(Dk, the q/k dim\) must be an int, got float"),
        ({"value_dim": 0}, ValueError, r"value_dim must be >= 1, got 0"),
        ({"batch": -1}, ValueError, r"batch must be >= 0, got -1"),
        ({"batch": None}, TypeError, r"batch must be an int, got NoneType"),
        ({"dtype": "int64"}, TypeError, r"dtype must be one of float32, float64, float16, bfloat16, got int64"),
        ({"scale": 0.0}, ValueError, r"scale must be a finite number > 0, got 0.0"),
        ({"scale": math.inf}, ValueError, r"scale must be a finite number > 0, got inf"),
        ({"scale": "x"}, TypeError, r"scale must be a number, got str"),
        ({"device": "tpu"}, ValueError, r"device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ],
    ids=["dk-0", "dk-33", "dk-float", "dv-0", "batch-negative", "batch-none", "dtype-int", "scale-0", "scale-inf",
         "scale-str", "device"],
)
def test_zeros_rejects_bad_settings(kwargs, exc, message):
    args = {"batch": 1, "heads": 2, "feature_dim": 4, "value_dim": 3, **kwargs}
    extra = {k: args.pop(k) for k in ("dtype", "scale", "device") if k in args}
    with pytest.raises(exc, match=message):
        State.zeros(args["batch"], args["heads"], args["feature_dim"], args["value_dim"], like=np.zeros(1), **extra)


# ---------------------------------------------------------------------------------------
# Zero-copy views
# ---------------------------------------------------------------------------------------


def test_views_are_zero_copy_numpy():
    s = filled()
    assert s.kv is s.kv and np.shares_memory(s.kv, s._t["kv"])
    before = decode_once(s.clone())
    s.kv[...] = 0.0           # write through the view ...
    s.ksum[...] = 1.0
    after = decode_once(s)    # ... and decode sees it: only the new token's term is left
    assert not np.allclose(before, after)
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 3, 2, 4)).astype(np.float32)
    v = rng.standard_normal((3, 2, 5)).astype(np.float32)
    phi_q, phi_k = ref.taylor_feature_map(q, 0.5), ref.taylor_feature_map(k, 0.5)
    want = (phi_q * phi_k).sum(-1)[..., None] * v / ((phi_q * (1.0 + phi_k)).sum(-1)[..., None] + 1e-6)
    np.testing.assert_allclose(after, want, rtol=2e-5)


@requires_torch
def test_views_are_zero_copy_torch():
    s = filled(like=torch.zeros(1))
    ptr = s.kv.data_ptr()
    s.kv.zero_()
    s.ksum.zero_()
    assert s.kv.data_ptr() == ptr and s.kv.abs().sum() == 0
    out = decode_once(s)
    assert np.all(np.isfinite(out))


# ---------------------------------------------------------------------------------------
# Batch management
# ---------------------------------------------------------------------------------------


def test_reset_all_and_some():
    s = filled(b=4)
    kv = s.kv.copy()
    s.reset([1, -1])
    assert not s.kv[1].any() and not s.kv[3].any() and not s.ksum[1].any() and list(s.tokens) == [7, 0, 7, 0]
    np.testing.assert_array_equal(s.kv[[0, 2]], kv[[0, 2]])
    with pytest.raises(ValueError, match="batch index 4 is out of range for batch size 4"):
        s.reset([0, 4])
    np.testing.assert_array_equal(s.kv[0], kv[0])      # a bad index resets nothing
    assert s.reset() is s and not s.kv.any() and not s.tokens.any()


def test_reset_sequence_decodes_like_a_fresh_one():
    s = filled(b=2)
    s.reset([0])
    fresh = State.zeros(2, 2, 4, 5, like=np.zeros(1))
    np.testing.assert_array_equal(decode_once(s)[0], decode_once(fresh)[0])


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_copy_and_clone(dtype):
    a, b = filled(dtype=dtype, seed=1), filled(dtype=dtype, seed=2)
    c = a.clone()
    assert c.kv is not a.kv and not np.shares_memory(c.kv, a.kv)
    np.testing.assert_array_equal(c.kv, a.kv)
    assert a.copy_(b) is a
    np.testing.assert_array_equal(a.kv, b.kv)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(c.kv, a.kv)
    np.testing.assert_array_equal(decode_once(a), decode_once(b))


def test_copy_converts_dtypes_and_checks_settings():
    a32, a64 = filled(dtype="float32"), State.zeros(3, 2, 4, 5, dtype="float64", like=np.zeros(1))
    a64.copy_(a32)
    np.testing.assert_array_equal(a64.kv, a32.kv.astype(np.float64))
    other_scale = State.zeros(3, 2, 4, 5, scale=0.3, like=np.zeros(1))
    with pytest.raises(ValueError, match=r"copy_: scale differs \(0.3 here, 0.5 in other\)"):
        other_scale.copy_(a32)
    with pytest.raises(ValueError, match="copy_: kv has shape"):
        State.zeros(2, 2, 4, 5, like=np.zeros(1)).copy_(a32)


def test_index_select_reorders_beams():
    s = filled(b=3)
    order = [2, 2, 0]
    t = s.index_select(order)
    assert t.batch == 3 and t.scale == s.scale
    np.testing.assert_array_equal(t.kv, s.kv[order])
    np.testing.assert_array_equal(t.tokens, s.tokens[order])
    # decoding the reordered state == decoding the original, then reordering the output
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 3, 2, 4)).astype(np.float32)
    v = rng.standard_normal((3, 2, 5)).astype(np.float32)
    o_t = based.linear_attention_decode(q[order], k[order], v[order], t)
    o_s = based.linear_attention_decode(q, k, v, s)
    np.testing.assert_array_equal(o_t, o_s[order])
    before = s.kv.copy()
    s.copy_(s.index_select([1, 0, 2]))   # the in-place reorder recipe of the docstring
    np.testing.assert_array_equal(s.kv, before[[1, 0, 2]])


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_save_load_round_trip(tmp_path, dtype, lib):
    if (lib == "torch" or dtype == "bfloat16") and not HAS_TORCH:
        pytest.skip("PyTorch is not installed")
    like = np.zeros(1) if lib == "numpy" else torch.zeros(1)
    s = filled(dtype=dtype, like=like)
    s2 = State.zeros(3, 2, 4, 5, dtype=dtype, scale=0.3, like=like)   # a second scale, to see it saved
    for state in (s, s2):
        path = tmp_path / f"state-{SHORT[dtype]}.npz"
        state.save(path)
        back = State.load(path, like=like)
        assert type(back.kv) is type(state.kv) and back.scale == state.scale
        assert str(back.kv.dtype) == str(state.kv.dtype)
        np.testing.assert_array_equal(to_numpy64(back.kv), to_numpy64(state.kv))
        np.testing.assert_array_equal(to_numpy64(back.ksum), to_numpy64(state.ksum))
        np.testing.assert_array_equal(to_numpy64(back.tokens), to_numpy64(state.tokens))
    with np.load(tmp_path / f"state-{SHORT[dtype]}.npz") as z:   # a documented, plain .npz
        assert set(z.files) == {"kv", "ksum", "tokens", "__based_state__"}


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", kv=np.zeros(3))
    with pytest.raises(ValueError, match="is not a based state file"):
        State.load(tmp_path / "x.npz")


# ---------------------------------------------------------------------------------------
# The paper code's expanded layout
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dk", [1, 3, 16])
def test_expanded_kernel_identity(dk):
    """phi273(q) . phi273(k) == 1 + s + s^2/2 == phi(q) . phi(k)."""
    rng = np.random.default_rng(dk)
    q, k = rng.standard_normal((2, 20, dk))
    e = (ref.taylor_feature_map_expanded(q) * ref.taylor_feature_map_expanded(k)).sum(-1)
    np.testing.assert_allclose(e, ref.taylor_kernel(q, k), rtol=1e-12)
    assert ref.taylor_feature_map_expanded(q).shape[-1] == 1 + dk + dk * dk


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dk", [1, 2, 16])
def test_to_expanded_equals_the_paper_state(dk, dtype):
    """Our state, expanded, is sum_t phi273(k_t) v_t^T: what the reference code keeps."""
    rng = np.random.default_rng(dk)
    b, t, h, dv = 2, 30, 3, 6
    q, k = rng.standard_normal((2, b, t, h, dk)).astype(dtype)
    v = rng.standard_normal((b, t, h, dv)).astype(dtype)
    state = State.zeros(b, h, dk, dv, dtype=dtype, like=q)
    based.linear_attention_prefill(q, k, v, state)
    kv273, ksum273 = state.to_expanded()
    assert kv273.shape == (b, h, 1 + dk + dk * dk, dv) and kv273.dtype == np.dtype(dtype)
    phi = ref.taylor_feature_map_expanded(k)
    want_kv = np.einsum("bthf,bthv->bhfv", phi, v.astype(np.float64))
    want_ks = phi.sum(1)
    # Error bound (tests/linear_helpers.py): the compact sums, computed in the inputs' dtype
    # u, err <= n u sum|terms| with n = 2C + T/C + 2 = 63 (C = T = 30); the expanded rows
    # are those rows times 1 or 1/sqrt(2), so their sum|terms| is the same einsum on
    # absolute values; then two roundings to the dtype (the state, then the expanded copy).
    u, n = EPS[dtype], 2 * t + 1 + 2
    kv_b = n * u * np.einsum("bthf,bthv->bhfv", np.abs(phi), np.abs(v.astype(np.float64))) + 2 * u * np.abs(want_kv)
    ks_b = n * u * np.abs(phi).sum(1) + 2 * u * want_ks
    assert_within(kv273, want_kv, kv_b, "expanded kv")
    assert_within(ksum273, want_ks, ks_b, "expanded ksum")
    # reading the expanded state with phi273(q) gives what decode reads from the compact one.
    # Computed in float64 from the rounded state: num and den are off by at most
    # e_num = |phi_q| . (kv_b + F u64 |kv273|) and e_den likewise (state error, then the
    # float64 sum of F = 1 + Dk + Dk^2 terms), so |o - o_ref| <= (e_num + |o_ref| e_den) / (den - e_den).
    phi_q = ref.taylor_feature_map_expanded(q[:, -1])
    f, u64 = kv273.shape[2], EPS["float64"]
    num, den = np.einsum("bhf,bhfv->bhv", phi_q, kv273), np.einsum("bhf,bhf->bh", phi_q, ksum273)[..., None] + 1e-6
    o_ref = ref.linear_attention_quadratic(q, k, v)[:, -1]
    e_num = np.einsum("bhf,bhfv->bhv", np.abs(phi_q), kv_b + f * u64 * np.abs(kv273.astype(np.float64)))
    e_den = np.einsum("bhf,bhf->bh", np.abs(phi_q), ks_b + f * u64 * np.abs(ksum273.astype(np.float64)))[..., None]
    assert_within(num / den, o_ref, (e_num + np.abs(o_ref) * e_den) / (den - e_den), "output from the expanded state")


@pytest.mark.parametrize("dtype", DTYPES)
def test_expanded_round_trip(dtype):
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs PyTorch")
    like = torch.zeros(1) if dtype == "bfloat16" else np.zeros(1)
    s = State.zeros(2, 3, 5, 4, dtype=dtype, like=like)
    rng = np.random.default_rng(0)
    kv, ks = ref.linear_attention_state(rng.standard_normal((2, 9, 3, 5)), rng.standard_normal((2, 9, 3, 4)))
    s.kv[...] = torch.from_numpy(kv).to(s.kv.dtype) if dtype == "bfloat16" else kv
    s.ksum[...] = torch.from_numpy(ks).to(s.ksum.dtype) if dtype == "bfloat16" else ks
    kv273, ks273 = s.to_expanded()
    back = State.from_expanded(kv273, ks273, scale=s.scale)
    assert type(back.kv) is type(s.kv) and back.feature_dim == 5 and back.scale == s.scale
    assert str(back.kv.dtype) == str(s.kv.dtype)
    # x -> x/sqrt2 twice -> (x/sqrt2 + x/sqrt2)/sqrt2: three float64 roundings (float64), then
    # one rounding of the expanded rows to the dtype and one back (float32/16, bfloat16)
    rtol = {"float64": 1e-15, "float32": 2**-23, "float16": 2**-10, "bfloat16": 2**-7}[dtype]
    np.testing.assert_allclose(to_numpy64(back.kv), to_numpy64(s.kv), rtol=rtol)
    np.testing.assert_allclose(to_numpy64(back.ksum), to_numpy64(s.ksum), rtol=rtol)
    np.testing.assert_array_equal(to_numpy64(back.kv)[..., :6, :], to_numpy64(s.kv)[..., :6, :])  # copied rows


def test_from_expanded_symmetrises_and_infers_dk():
    dk, dv = 3, 2
    kv273 = np.random.default_rng(1).standard_normal((1, 1, 1 + dk + dk * dk, dv))
    ks273 = np.ones((1, 1, 1 + dk + dk * dk))
    s = State.from_expanded(kv273, ks273)
    assert s.feature_dim == 3 and s.scale == 1 / math.sqrt(3) and list(s.tokens) == [0]
    e = kv273[0, 0, 1 + dk:].reshape(dk, dk, dv)
    np.testing.assert_allclose(s.kv[0, 0, 1 + dk + 1], (e[0, 1] + e[1, 0]) / math.sqrt(2), rtol=1e-15)
    np.testing.assert_array_equal(s.kv[0, 0, 1 + dk], e[0, 0])
    with pytest.raises(ValueError, match="kv has 12 feature rows, which is not 1 \\+ Dk \\+ Dk\\^2"):
        State.from_expanded(np.zeros((1, 1, 12, 2)), np.zeros((1, 1, 12)))
    with pytest.raises(ValueError, match=r"ksum_expanded must have shape \(B=1, H=1, F273=13\), got \(1, 1, 12\)"):
        State.from_expanded(np.zeros((1, 1, 13, 2)), np.zeros((1, 1, 12)))


def test_feature_count_helper_matches_based():
    assert all(feature_count(d) == based.feature_dim(d) for d in range(1, 33))


@pytest.mark.parametrize("method", ["clone", "index_select"])
def test_clone_and_index_select_keep_every_tensor_type(method):
    """A bfloat16 state made like numpy holds Buffers for kv/ksum and numpy token counts;
    its copies must hold the same types (the counters stay writable numpy arrays)."""
    s = State.zeros(2, 1, 2, 3, dtype="bfloat16", like=np.zeros(1))
    c = s.clone() if method == "clone" else s.index_select([1, 0])
    assert type(c.kv) is type(s.kv) and type(c.tokens) is type(s.tokens) is np.ndarray
    c.tokens[0] = 5
