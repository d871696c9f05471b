"""Taylor linear attention (SPEC 1.1, 3): the chunked prefill and the decode against their
plain-loop C twins and the float64 NumPy references (quadratic and recurrent forms), over a
covering grid of shapes, dtypes, layouts and states; continuation (prefill in pieces and
decode steps equal one prefill); numerics with large inputs; non-finite inputs staying
local; hypothesis property tests. Tolerances: see tests/linear_helpers.py."""

import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import HAS_TORCH, requires_torch, rounded, to_numpy64, torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linear_helpers import (DEFAULT_CHUNK, DTYPES, SHORT, assert_within, call, compute_dtype, empty_like_lib,
                            feature_count, output_bound, state_arrays, state_bound, to_lib)

import based
from based import _C
from based import reference as ref

FAST = (_C.linear_attention_prefill, _C.linear_attention_decode)
REF = (_C.linear_attention_prefill_ref, _C.linear_attention_decode_ref)


# ---------------------------------------------------------------------------------------
# The NumPy references agree with each other (the ground truth is consistent)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "state"])
def test_quadratic_and_recurrent_references_agree(normalize, with_state):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 2, 37, 3, 5))
    v = rng.standard_normal((2, 37, 3, 7))
    kv0 = ks0 = None
    if with_state:
        kv0, ks0 = ref.linear_attention_state(*rng.standard_normal((2, 2, 11, 3, 5))[:1], v[:, :11], scale=0.3)
    o_quad = ref.linear_attention_quadratic(q, k, v, scale=0.3, normalize=normalize, kv=kv0, ksum=ks0)
    o_rec, kv, ks = ref.linear_attention_recurrent(q, k, v, scale=0.3, normalize=normalize, kv=kv0, ksum=ks0)
    np.testing.assert_allclose(o_quad, o_rec, rtol=1e-12, atol=1e-12)   # float64, same sums in two orders
    kv2, ks2 = ref.linear_attention_state(k, v, scale=0.3, kv=kv0, ksum=ks0)
    np.testing.assert_allclose(kv, kv2, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(ks, ks2, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# A covering grid: every pair of values of every two axes appears in some case
# ---------------------------------------------------------------------------------------

AXES = {
    "B": [1, 3],
    "T": [1, 2, 63, 64, 65, 200, 1025],
    "H": [1, 4],
    "Dk": [1, 4, 8, 16, 24, 32],
    "Dv": [1, 24, 64, 100],
    "dtype": DTYPES,
    "norm": [True, False],
    "layout": ["bthd", "bhtd"],           # bhtd: head-first storage passed as a transposed view
    "state": DTYPES,                      # the state's dtype
    "init": ["zeros", "prefix"],          # start from zeros or from the state of 5 earlier tokens
    "lib": ["numpy", "torch"],
}
BUDGET = 4e8   # flops of the slowest references in one case (C twin, 3 NumPy quadratic runs)


def _valid(c):
    return not (c["lib"] == "numpy" and "bfloat16" in (c["dtype"], c["state"]))


def _cost(c):
    bh, f = c["B"] * c["H"], feature_count(c["Dk"])
    return max(bh * c["T"] * f * c["Dv"] * 4, bh * c["T"] ** 2 * (c["Dk"] + c["Dv"]) * 3)


def _cheapest():
    c = {n: min(AXES[n], key=lambda x: (isinstance(x, str), x)) for n in AXES}
    c["lib"] = "torch" if HAS_TORCH else "numpy"
    return c


def _feasible_pairs():
    """Every (axis a = x, axis b = y) that some valid case within the budget can hold."""
    names, cheapest, pairs = list(AXES), _cheapest(), set()
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for x in AXES[a]:
                for y in AXES[b]:
                    c = {**cheapest, a: x, b: y}
                    if _valid(c) and _cost(c) <= BUDGET:
                        pairs.add((a, x, b, y))
    return pairs


def _covering_cases(seed=0):
    """Greedy pairwise covering under the cost budget: deterministic, ~50 cases."""
    rnd = random.Random(seed)
    names = list(AXES)
    cheapest = _cheapest()
    pairs = _feasible_pairs()

    def covered(c):
        return {(a, x, b, y) for (a, x, b, y) in pairs if c[a] == x and c[b] == y}

    cases = []
    while pairs:
        a, x, b, y = min(pairs, key=repr)
        best, gain = {**cheapest, a: x, b: y}, -1
        for _ in range(80):
            c = {n: rnd.choice(AXES[n]) for n in names}
            c[a], c[b] = x, y
            if _valid(c) and _cost(c) <= BUDGET and len(covered(c)) > gain:
                best, gain = c, len(covered(c))
        cases.append(best)
        pairs -= covered(best)
    return cases


def _case_id(c):
    return (f"B{c['B']}-T{c['T']}-H{c['H']}-Dk{c['Dk']}-Dv{c['Dv']}-{SHORT[c['dtype']]}-"
            f"{'norm' if c['norm'] else 'raw'}-{c['layout']}-state{SHORT[c['state']]}-{c['init']}-{c['lib']}")


CASES = _covering_cases()


def _inputs(c, rng, amp=1.0):
    b, t, h, dk, dv = c["B"], c["T"], c["H"], c["Dk"], c["Dv"]
    q64 = rounded(amp * rng.standard_normal((b, t, h, dk)), c["dtype"])
    k64 = rounded(amp * rng.standard_normal((b, t, h, dk)), c["dtype"])
    v64 = rounded(rng.standard_normal((b, t, h, dv)), c["dtype"])
    return q64, k64, v64


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_prefill_grid(case):
    """Fast kernel and C twin vs the float64 quadratic form, in outputs and final state."""
    if case["lib"] == "torch" and not HAS_TORCH:
        pytest.skip("PyTorch is not installed")
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))
    b, t, h, dk, dv, dtype, lib = (case[n] for n in ("B", "T", "H", "Dk", "Dv", "dtype", "lib"))
    scale = dk**-0.5
    q64, k64, v64 = _inputs(case, rng)
    kv0 = ks0 = None
    tokens0 = 0
    if case["init"] == "prefix":
        kp, vp = rng.standard_normal((b, 5, h, dk)), rng.standard_normal((b, 5, h, dv))
        kv0, ks0 = (rounded(a, case["state"]) for a in ref.linear_attention_state(kp, vp, scale=scale))
        tokens0 = 5
    qa, ka, va = (to_lib(x, dtype, lib, case["layout"]) for x in (q64, k64, v64))
    for fn, compute in ((_C.linear_attention_prefill, compute_dtype(dtype, case["state"])),
                        (_C.linear_attention_prefill_ref, "float64")):
        kv, ks, tok = state_arrays(b, h, dk, dv, case["state"], lib, kv0, ks0, tokens0)
        out = to_lib(np.full((b, t, h, dv), np.nan), dtype, lib, case["layout"])
        call(fn, qa, ka, va, kv, ks, tok, out, scale=scale, normalize=case["norm"])
        o_ref, o_bound = output_bound(q64, k64, v64, dtype, scale=scale, normalize=case["norm"], kv0=kv0,
                                      ksum0=ks0, compute=compute)
        assert_within(out, o_ref, o_bound, f"{fn.__name__} output")
        kv_ref, ks_ref, kv_b, ks_b = state_bound(k64, v64, case["state"], compute, scale=scale, kv0=kv0, ksum0=ks0)
        assert_within(kv, kv_ref, kv_b, f"{fn.__name__} state.kv")
        assert_within(ks, ks_ref, ks_b, f"{fn.__name__} state.ksum")
        assert list(to_numpy64(tok)) == [tokens0 + t] * b


def test_grid_covers_every_pair():
    """Every feasible pair of values of two axes appears in some case (so every value of
    every axis does), and the grid stays small enough for CI."""
    missing = [p for p in _feasible_pairs() if not any(c[p[0]] == p[1] and c[p[2]] == p[3] for c in CASES)]
    assert not missing, missing[:5]
    for name, values in AXES.items():
        assert {c[name] for c in CASES} == set(values), name
    assert len(CASES) <= 60


# ---------------------------------------------------------------------------------------
# Chunk boundaries: every chunk length, any T
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 8, 16, 63, 64, 65, 200, 1024])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_any_chunk_length(chunk, dtype):
    """The chunk length changes only rounding: T = 130 covers full chunks, a tail, C > T."""
    rng = np.random.default_rng(chunk)
    b, t, h, dk, dv = 2, 130, 2, 8, 12
    q64, k64, v64 = (rng.standard_normal(s) for s in ((b, t, h, dk), (b, t, h, dk), (b, t, h, dv)))
    qa, ka, va = (x.astype(dtype) for x in (q64, k64, v64))
    q64, k64, v64 = (x.astype(np.float64) for x in (qa, ka, va))
    kv, ks, tok = state_arrays(b, h, dk, dv, "float32", "numpy")
    out = np.full((b, t, h, dv), np.nan, dtype)
    call(_C.linear_attention_prefill, qa, ka, va, kv, ks, tok, out, scale=0.4, chunk=chunk)
    o_ref, bound = output_bound(q64, k64, v64, dtype, scale=0.4, normalize=True, chunk=chunk)
    assert_within(out, o_ref, bound, "output")
    kv_ref, ks_ref, kv_b, ks_b = state_bound(k64, v64, "float32", compute_dtype(dtype), scale=0.4, chunk=chunk)
    assert_within(kv, kv_ref, kv_b, "state.kv")
    assert_within(ks, ks_ref, ks_b, "state.ksum")


# ---------------------------------------------------------------------------------------
# Continuation: prefill(T) == prefill(T1) + prefill(T2, state) + decode steps
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("split", [(1, 99), (64, 36), (37, 50)], ids=lambda s: f"{s[0]}+{s[1]}")
def test_prefill_in_pieces_then_decode_equals_one_prefill(split, dtype):
    rng = np.random.default_rng(sum(split))
    b, h, dk, dv = 2, 3, 16, 20
    t1, t2 = split
    steps = 100 - t1 - t2 + 5          # decode the rest, one token at a time
    total = t1 + t2 + steps
    q, k = (rng.standard_normal((b, total, h, dk)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((b, total, h, dv)).astype(dtype)
    state_dtype = "float64" if dtype == "float64" else "float32"

    o_all, s_all = based.linear_attention_prefill(q, k, v, based.LinearAttentionState.zeros(
        b, h, dk, dv, dtype=state_dtype, like=q))
    state = based.LinearAttentionState.zeros(b, h, dk, dv, dtype=state_dtype, like=q)
    o1, s1 = based.linear_attention_prefill(q[:, :t1], k[:, :t1], v[:, :t1], state)
    o2, s2 = based.linear_attention_prefill(q[:, t1:t1 + t2], k[:, t1:t1 + t2], v[:, t1:t1 + t2], state)
    assert s1 is state and s2 is state
    o3 = [based.linear_attention_decode(q[:, t], k[:, t], v[:, t], state) for t in range(t1 + t2, total)]
    pieces = np.concatenate([o1, o2, np.stack(o3, axis=1)], axis=1)
    # the two paths round differently (chunk boundaries, decode's recurrent sums): both are
    # within the bound of the exact result, so they are within twice the bound of each other
    o_ref, bound = output_bound(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), dtype,
                                scale=dk**-0.5, normalize=True)
    assert_within(o_all, o_ref, bound, "one prefill")
    assert_within(pieces, o_ref, bound, "pieces")
    np.testing.assert_array_less(np.abs(pieces - o_all), 2 * bound + 1e-300)
    kv_ref, ks_ref, kv_b, ks_b = state_bound(k.astype(np.float64), v.astype(np.float64), state_dtype,
                                             compute_dtype(dtype), scale=dk**-0.5)
    for s in (s_all, state):
        assert_within(s.kv, kv_ref, kv_b, "state.kv")
        assert_within(s.ksum, ks_ref, ks_b, "state.ksum")
        assert list(s.tokens) == [total] * b


def test_empty_sequence_is_a_no_op():
    q = np.zeros((2, 0, 3, 4), np.float32)
    v = np.zeros((2, 0, 3, 5), np.float32)
    state = based.LinearAttentionState.zeros(2, 3, 4, 5, like=q)
    state.kv[...] = 1.5
    o, s = based.linear_attention_prefill(q, q, v, state)
    assert o.shape == (2, 0, 3, 5) and s is state
    assert np.all(state.kv == 1.5) and list(state.tokens) == [0, 0]


# ---------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------

DECODE_CASES = [
    # B, H, Dk, Dv, dtype, state dtype, strided inputs
    (1, 1, 1, 1, "float32", "float32", False),
    (3, 4, 16, 64, "float32", "float32", True),
    (2, 3, 32, 100, "float64", "float64", False),
    (2, 2, 8, 24, "float64", "float32", True),
    (2, 3, 16, 64, "float32", "float64", False),
    (1, 2, 5, 9, "float16", "float64", True),
    (2, 4, 16, 64, "bfloat16", "float32", False),
    (1, 2, 24, 7, "float16", "float16", True),
    (3, 1, 4, 33, "float32", "bfloat16", False),
    (2, 2, 16, 64, "bfloat16", "bfloat16", True),
]


@pytest.mark.parametrize("case", DECODE_CASES,
                         ids=[f"B{c[0]}-H{c[1]}-Dk{c[2]}-Dv{c[3]}-{SHORT[c[4]]}-state{SHORT[c[5]]}"
                              f"{'-strided' if c[6] else ''}" for c in DECODE_CASES])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_decode_matches_references(case, normalize):
    b, h, dk, dv, dtype, state_dtype, strided = case
    if "bfloat16" in (dtype, state_dtype) and not HAS_TORCH:
        pytest.skip("bfloat16 needs PyTorch")
    lib = "torch" if "bfloat16" in (dtype, state_dtype) else "numpy"
    rng = np.random.default_rng(b * 100 + dk)
    scale = 0.7 * dk**-0.5
    kp, vp = rng.standard_normal((b, 9, h, dk)), rng.standard_normal((b, 9, h, dv))
    kv0, ks0 = (rounded(a, state_dtype) for a in ref.linear_attention_state(kp, vp, scale=scale))
    q64, k64 = (rounded(rng.standard_normal((b, 1, h, dk)), dtype) for _ in range(2))
    v64 = rounded(rng.standard_normal((b, 1, h, dv)), dtype)

    def decode_input(x):  # (B, 1, H, d) -> (B, H, d), optionally as a strided view
        if not strided:
            return to_lib(x[:, 0], dtype, lib)
        big = np.zeros(x.shape[:1] + (x.shape[2], 2 * x.shape[3]))
        big[..., ::2] = x[:, 0]
        return to_lib(big, dtype, lib)[..., ::2]

    qa, ka, va = (decode_input(x) for x in (q64, k64, v64))
    for fn, compute in ((_C.linear_attention_decode, compute_dtype(dtype, state_dtype)),
                        (_C.linear_attention_decode_ref, "float64")):
        kv, ks, tok = state_arrays(b, h, dk, dv, state_dtype, lib, kv0, ks0, 9)
        out = empty_like_lib((b, h, dv), dtype, lib)
        call(fn, qa, ka, va, kv, ks, tok, out, scale=scale, normalize=normalize)
        o_ref, bound = output_bound(q64, k64, v64, dtype, scale=scale, normalize=normalize, kv0=kv0, ksum0=ks0,
                                    compute=compute)
        assert_within(out, o_ref[:, 0], bound[:, 0], f"{fn.__name__} output")
        kv_ref, ks_ref, kv_b, ks_b = state_bound(k64, v64, state_dtype, compute, scale=scale, kv0=kv0, ksum0=ks0)
        assert_within(kv, kv_ref, kv_b, f"{fn.__name__} state.kv")
        assert_within(ks, ks_ref, ks_b, f"{fn.__name__} state.ksum")
        assert list(to_numpy64(tok)) == [10] * b


def test_decode_and_prefill_on_a_strided_state():
    """The C core takes states of any strides (here every other element of a bigger buffer)."""
    rng = np.random.default_rng(5)
    b, t, h, dk, dv = 2, 20, 3, 4, 6
    f = feature_count(dk)
    q, k = rng.standard_normal((2, b, t + 1, h, dk)).astype(np.float32)
    v = rng.standard_normal((b, t + 1, h, dv)).astype(np.float32)
    big_kv, big_ks = np.zeros((b, h, f, 2 * dv), np.float32), np.zeros((b, h, 2 * f), np.float32)
    kv, ks, tok = big_kv[..., ::2], big_ks[..., 1::2], np.zeros(b, np.int64)
    out = np.empty((b, t, h, dv), np.float32)
    call(_C.linear_attention_prefill, q[:, :t], k[:, :t], v[:, :t], kv, ks, tok, out, scale=0.5, chunk=8)
    out1 = np.empty((b, h, dv), np.float32)
    call(_C.linear_attention_decode, q[:, t], k[:, t], v[:, t], kv, ks, tok, out1, scale=0.5)
    o_ref, bound = output_bound(*(x.astype(np.float64) for x in (q, k, v)), "float32", scale=0.5, normalize=True,
                                chunk=8)
    assert_within(np.concatenate([out, out1[:, None]], 1), o_ref, bound, "output")
    assert np.all(big_kv[..., 1::2] == 0) and np.all(big_ks[..., ::2] == 0), "wrote outside the state views"
    kv_ref, ks_ref, kv_b, ks_b = state_bound(k.astype(np.float64), v.astype(np.float64), "float32", "float32",
                                             scale=0.5, chunk=8)
    assert_within(kv, kv_ref, kv_b, "state.kv")


def test_negative_and_zero_strides():
    """Inputs may run backwards in time (negative strides) or repeat one key for every
    head (stride 0): read as given, no copies, same results as contiguous copies."""
    rng = np.random.default_rng(9)
    b, t, h, dk, dv = 2, 70, 3, 8, 12
    q = rng.standard_normal((b, t, h, dk))[:, ::-1]
    k = np.broadcast_to(rng.standard_normal((b, t, 1, dk)), (b, t, h, dk))
    v = rng.standard_normal((b, t, h, 2 * dv))[..., ::-2]
    assert q.strides[1] < 0 and k.strides[2] == 0 and v.strides[3] < 0
    o, state = based.linear_attention_prefill(q, k, v)
    o_ref, bound = output_bound(q, k, v, "float64", scale=dk**-0.5, normalize=True)
    assert_within(o, o_ref, bound, "output")
    o2, _ = based.linear_attention_prefill(*(np.ascontiguousarray(x) for x in (q, k, v)))
    np.testing.assert_array_equal(o, o2)
    o_dec = based.linear_attention_decode(q[:, 0], k[:, 0], v[:, 0], state)
    assert np.isfinite(o_dec).all()


# ---------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_large_inputs_stay_within_running_range_of_v(dtype):
    """|q|, |k| ~ 4 make s ~ 16 and K ~ 100s (sums grow ~ T K): normalised outputs are convex
    combinations of the values seen so far, pulled towards 0 by eps, so they stay within
    their running min/max up to
      * eps's pull: |o| eps / (den + eps) <= max|v| eps / ((t+1)/2), as every K >= 1/2;
      * rounding: the elementwise bound of tests/linear_helpers.py for the output's dtype
        (compute float32, one rounding to the output dtype).
    The same slack for every dtype; no reference output is compared here."""
    if dtype == "bfloat16" and not HAS_TORCH:
        pytest.skip("bfloat16 needs PyTorch")
    lib = "torch" if dtype == "bfloat16" else "numpy"
    rng = np.random.default_rng(4)
    b, t, h, dk, dv = 2, 300, 2, 16, 8
    q64, k64 = (rounded(4 * rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
    v64 = rounded(rng.uniform(-3, 3, (b, t, h, dv)), dtype)
    o, state = based.linear_attention_prefill(*(to_lib(x, dtype, lib) for x in (q64, k64, v64)))
    o = to_numpy64(o)
    lo, hi = np.minimum.accumulate(v64, axis=1), np.maximum.accumulate(v64, axis=1)
    _, rounding = output_bound(q64, k64, v64, dtype, scale=dk**-0.5, normalize=True)
    pull = np.maximum(np.abs(lo), np.abs(hi)) * 1e-6 * 2 / np.arange(1, t + 1)[None, :, None, None]
    slack = rounding + pull
    assert np.all(o >= lo - slack) and np.all(o <= hi + slack)
    assert np.all(np.isfinite(to_numpy64(state.kv)))


def test_float64_inputs_compute_in_float64_with_a_float32_state():
    """float64 inputs are computed in float64 inside a call, whatever the state dtype; the
    state keeps what its dtype can (float32 here: rounded once at the end of the call)."""
    rng = np.random.default_rng(6)
    q, k = rng.standard_normal((2, 1, 150, 2, 8))
    v = rng.standard_normal((1, 150, 2, 5))
    o, state = based.linear_attention_prefill(q, k, v)          # default float32 state
    assert state.kv.dtype == np.float32 and o.dtype == np.float64
    o_ref, bound = output_bound(q, k, v, "float64", scale=8**-0.5, normalize=True)
    assert_within(o, o_ref, bound, "output")                    # float64-level bound
    assert np.abs(o - o_ref).max() < 1e-12
    kv_ref, _ = ref.linear_attention_state(k, v, scale=8**-0.5)
    np.testing.assert_array_equal(state.kv, kv_ref.astype(np.float32))  # float64 sums, one rounding


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_float64_state_accumulates_in_float64_with_float32_inputs(lib):
    """A float64 state makes the kernels compute in float64 whatever the inputs' dtype, so
    what it carries across calls (prefill in pieces, then decode steps) has float64
    accuracy; a float32 state, run alongside, is held to the same bound and misses it
    (the bound tells the two apart)."""
    if lib == "torch" and not HAS_TORCH:
        pytest.skip("PyTorch is not installed")
    rng = np.random.default_rng(12)
    b, h, dk, dv, t1, t2, steps = 2, 3, 16, 24, 70, 45, 40
    total = t1 + t2 + steps
    q64, k64, v64 = (rounded(rng.standard_normal((b, total, h, d)), "float32") for d in (dk, dk, dv))
    q, k, v = (to_lib(x, "float32", lib) for x in (q64, k64, v64))
    scale = dk**-0.5
    # float64 compute: n u_64 from the module doc; the float32 outputs get one rounding
    o_ref, bound = output_bound(q64, k64, v64, "float32", scale=scale, normalize=True, compute="float64")
    # the state's longest chain (64 in-chunk + 3 chunk + 40 decode additions) is within
    # state_bound's n = 2C + T/C + 2 = 133
    kv_ref, ks_ref, kv_b, ks_b = state_bound(k64, v64, "float64", "float64", scale=scale)
    worst = {}
    for state_dtype in ("float64", "float32"):
        state = based.LinearAttentionState.zeros(b, h, dk, dv, dtype=state_dtype, like=q)
        o1, _ = based.linear_attention_prefill(q[:, :t1], k[:, :t1], v[:, :t1], state)
        o2, _ = based.linear_attention_prefill(q[:, t1:t1 + t2], k[:, t1:t1 + t2], v[:, t1:t1 + t2], state)
        o3 = [to_numpy64(based.linear_attention_decode(q[:, t], k[:, t], v[:, t], state))
              for t in range(t1 + t2, total)]
        o = np.concatenate([to_numpy64(o1), to_numpy64(o2), np.stack(o3, axis=1)], axis=1)
        if state_dtype == "float64":
            assert_within(o, o_ref, bound, "outputs")
            assert_within(state.kv, kv_ref, kv_b, "state.kv")
            assert_within(state.ksum, ks_ref, ks_b, "state.ksum")
        worst[state_dtype] = np.max(np.abs(to_numpy64(state.kv) - kv_ref) / kv_b)
    assert worst["float64"] <= 1 < worst["float32"], worst


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("t_bad", [0, 5, 64, 66], ids=lambda t: f"t{t}")
def test_non_finite_inputs_stay_local(where, t_bad, dtype):
    """A NaN in q_t of one (sequence, head) reaches its o_t only; a NaN/Inf in k_t or v_t
    reaches its o_u for u >= t and its state, never an earlier output (even inside a chunk:
    t = 5, 66), another head or another sequence (SPEC 4). A decode step afterwards reads
    the poisoned state of that (sequence, head) only. float32 runs the AVX2 kernels where
    the CPU has them."""
    rng = np.random.default_rng(7)
    b, t, h, dk, dv, bb, hb = 3, 100, 2, 4, 9, 1, 1          # (bb, hb): the poisoned pair
    x = {"q": rng.standard_normal((b, t + 1, h, dk)), "k": rng.standard_normal((b, t + 1, h, dk)),
         "v": rng.standard_normal((b, t + 1, h, dv))}
    x[where][bb, t_bad, hb, 0] = np.inf if where == "v" else np.nan
    q, k, v = (x[n].astype(dtype) for n in "qkv")
    o, state = based.linear_attention_prefill(q[:, :t], k[:, :t], v[:, :t], out=np.full((b, t, h, dv), np.nan, dtype))
    o_dec = based.linear_attention_decode(q[:, t], k[:, t], v[:, t], state, out=np.full((b, h, dv), np.nan, dtype))
    others = np.ones((b, h), bool)
    others[bb, hb] = False
    finite, kv_finite = np.isfinite(o), np.isfinite(state.kv)
    assert finite.transpose(0, 2, 1, 3)[others].all(), "another (sequence, head) was touched"
    assert kv_finite[others].all() and np.isfinite(state.ksum)[others].all(), "another state was touched"
    assert np.isfinite(o_dec)[others].all(), "a decode read another state"
    assert finite[bb, :t_bad, hb].all(), "an earlier output was touched"
    if where == "q":
        assert not finite[bb, t_bad, hb].any()
        assert finite[bb, t_bad + 1:, hb].all() and kv_finite.all() and np.isfinite(o_dec).all()
    else:
        assert not finite[bb, t_bad:, hb].all(axis=-1).any()
        assert not kv_finite[bb, hb].all() and not np.isfinite(o_dec[bb, hb]).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_non_finite_decode_inputs_stay_local(where, dtype):
    """A NaN/Inf in one (sequence, head) of a decode step reaches that output (and, from k
    or v, that state) only; the next step of every other pair is unaffected."""
    rng = np.random.default_rng(8)
    b, t, h, dk, dv, bb, hb = 3, 20, 2, 16, 24, 1, 1
    q, k = rng.standard_normal((2, b, t + 2, h, dk)).astype(dtype)
    v = rng.standard_normal((b, t + 2, h, dv)).astype(dtype)
    _, state = based.linear_attention_prefill(q[:, :t], k[:, :t], v[:, :t],
                                              based.LinearAttentionState.zeros(b, h, dk, dv, dtype=dtype, like=q))
    step = {"q": q[:, t].copy(), "k": k[:, t].copy(), "v": v[:, t].copy()}
    step[where][bb, hb, 3] = np.inf if where == "v" else np.nan
    o1 = based.linear_attention_decode(step["q"], step["k"], step["v"], state)
    o2 = based.linear_attention_decode(q[:, t + 1], k[:, t + 1], v[:, t + 1], state)
    others = np.ones((b, h), bool)
    others[bb, hb] = False
    for what, a in (("first output", o1), ("next output", o2), ("state.kv", state.kv), ("state.ksum", state.ksum)):
        assert np.isfinite(a)[others].all(), f"{what} of another (sequence, head) was touched"
    assert not np.isfinite(o1[bb, hb]).all()
    poisoned_state = not np.isfinite(state.kv[bb, hb]).all()
    assert poisoned_state == (where != "q"), "the state holds what k and v carry, never q"
    assert np.isfinite(o2[bb, hb]).all() == (where == "q")


# ---------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3), t=st.integers(0, 90), h=st.integers(1, 3), dk=st.integers(1, 32), dv=st.integers(1, 40),
    dtype=st.sampled_from(["float32", "float64", "float16"]), state_dtype=st.sampled_from(["float32", "float64"]),
    chunk=st.integers(0, 70), normalize=st.booleans(), scale=st.floats(0.05, 2.0), seed=st.integers(0, 2**31),
)
def test_property_fast_equals_twin_equals_numpy(b, t, h, dk, dv, dtype, state_dtype, chunk, normalize, scale, seed):
    """The fast kernel against its C twin directly (each is within its bound of the exact
    result, so they are within the sum of the bounds of each other), then both against
    the float64 NumPy reference."""
    rng = np.random.default_rng(seed)
    q64, k64, v64 = (rounded(rng.standard_normal(s), dtype) for s in ((b, t, h, dk), (b, t, h, dk), (b, t, h, dv)))
    qa, ka, va = (x.astype(dtype) for x in (q64, k64, v64))
    c = chunk or DEFAULT_CHUNK
    runs = []
    for fn, compute in ((_C.linear_attention_prefill, compute_dtype(dtype, state_dtype)),
                        (_C.linear_attention_prefill_ref, "float64")):
        kv, ks, tok = state_arrays(b, h, dk, dv, state_dtype, "numpy")
        out = np.full((b, t, h, dv), np.nan, dtype)
        call(fn, qa, ka, va, kv, ks, tok, out, scale=scale, normalize=normalize, chunk=chunk)
        assert list(tok) == [t] * b
        o_ref, o_b = output_bound(q64, k64, v64, dtype, scale=scale, normalize=normalize, chunk=c, compute=compute)
        kv_ref, ks_ref, kv_b, ks_b = state_bound(k64, v64, state_dtype, compute, scale=scale, chunk=c)
        runs.append((fn.__name__, (out, kv, ks), (o_ref, kv_ref, ks_ref), (o_b, kv_b, ks_b)))
    (_, fast, _, fast_b), (_, twin, _, twin_b) = runs
    for what, x, y, bx, by in zip(("output", "state.kv", "state.ksum"), fast, twin, fast_b, twin_b):
        assert_within(x, to_numpy64(y), bx + by, f"fast vs twin: {what}")
    for name, got, want, bound in runs:
        for what, x, y, bx in zip(("output", "state.kv", "state.ksum"), got, want, bound):
            assert_within(x, y, bx, f"{name} vs numpy: {what}")


# ---------------------------------------------------------------------------------------
# The portable kernels (what a CPU without AVX2+FMA runs) pass the same checks
# ---------------------------------------------------------------------------------------

_GENERIC_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from based import _C
from linear_helpers import assert_within, call, compute_dtype, output_bound, state_arrays, state_bound
assert _C.linear_kernel_isa() == "generic", _C.linear_kernel_isa()
rng = np.random.default_rng(0)
for (b, t, h, dk, dv, dtype, state_dtype, chunk) in [
        (2, 130, 2, 16, 64, "float32", "float32", 0), (1, 67, 3, 5, 13, "float64", "float64", 8),
        (2, 33, 1, 32, 100, "float16", "float32", 5), (1, 9, 2, 3, 1, "float32", "float32", 1),
        (2, 40, 2, 8, 7, "float32", "float64", 16)]:
    # t prompt tokens, then one decode step with token t
    q64, k64, v64 = (rng.standard_normal(s).astype(dtype).astype(np.float64)
                     for s in ((b, t + 1, h, dk), (b, t + 1, h, dk), (b, t + 1, h, dv)))
    compute, c = compute_dtype(dtype, state_dtype), chunk or 64
    kv, ks, tok = state_arrays(b, h, dk, dv, state_dtype, "numpy")
    out = np.full((b, t, h, dv), np.nan, dtype)
    call(_C.linear_attention_prefill, *(x[:, :t].astype(dtype) for x in (q64, k64, v64)), kv, ks, tok, out,
         scale=0.3, chunk=chunk)
    o_ref, bound = output_bound(q64[:, :t], k64[:, :t], v64[:, :t], dtype, scale=0.3, normalize=True, chunk=c,
                                compute=compute)
    assert_within(out, o_ref, bound, f"generic prefill {dtype}")
    kv_ref, ks_ref, kv_b, ks_b = state_bound(k64[:, :t], v64[:, :t], state_dtype, compute, scale=0.3, chunk=c)
    assert_within(kv, kv_ref, kv_b, "generic prefill state.kv")
    assert_within(ks, ks_ref, ks_b, "generic prefill state.ksum")
    out1 = np.full((b, h, dv), np.nan, dtype)
    call(_C.linear_attention_decode, *(x[:, t].astype(dtype) for x in (q64, k64, v64)), kv, ks, tok, out1, scale=0.3)
    o_ref, bound = output_bound(q64, k64, v64, dtype, scale=0.3, normalize=True, chunk=c, compute=compute)
    assert_within(out1, o_ref[:, t], bound[:, t], f"generic decode {dtype}")
    kv_ref, ks_ref, kv_b, ks_b = state_bound(k64, v64, state_dtype, compute, scale=0.3, chunk=c)
    assert_within(kv, kv_ref, kv_b, "generic decode state.kv")
    assert_within(ks, ks_ref, ks_b, "generic decode state.ksum")
    assert list(tok) == [t + 1] * b
print("generic ok")
"""


def test_portable_kernels_in_a_subprocess():
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "BASED_CPU_ISA": "generic"}
    run = subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT, tests_dir], capture_output=True, text=True, env=env,
                         cwd=tests_dir)
    assert run.returncode == 0, run.stderr
    assert "generic ok" in run.stdout


def test_kernel_isa_is_reported():
    assert _C.linear_kernel_isa() in ("avx2+fma", "generic")


# ---------------------------------------------------------------------------------------
# Threads: every (batch, head) is computed whatever team OpenMP starts, with the same bits
# ---------------------------------------------------------------------------------------

# Prefill then one decode step, outputs NaN-poisoned, through the C entry points; saves
# outputs and states. B * H = 10 heads do not split evenly over 3 or 4 threads. The ops are
# asked for OMP_NUM_THREADS threads (based.set_num_threads: the default would be capped at
# the machine's CPUs) with BASED_PARALLEL_ANY_SIZE=1, so that calls this small split at all.
_THREADS_SCRIPT = r"""
import os
import sys
import numpy as np
from based import _C
_C.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
rng = np.random.default_rng(21)
b, t, h, dk, dv = 2, 70, 5, 4, 3
f = 1 + dk + dk * (dk + 1) // 2
res = {}
for dtype in ("float32", "float64"):
    q, k = rng.standard_normal((2, b, t + 1, h, dk)).astype(dtype)
    v = rng.standard_normal((b, t + 1, h, dv)).astype(dtype)
    kv, ks, tok = np.zeros((b, h, f, dv), dtype), np.zeros((b, h, f), dtype), np.zeros(b, np.int64)
    out, out1 = np.full((b, t, h, dv), np.nan, dtype), np.full((b, h, dv), np.nan, dtype)
    _C.linear_attention_prefill(q[:, :t], k[:, :t], v[:, :t], kv, ks, tok, out, 0.5, True, 1e-6, 16, None)
    res[dtype + "_prefill_kv"] = kv.copy()
    _C.linear_attention_decode(q[:, t], k[:, t], v[:, t], kv, ks, tok, out1, 0.5, True, 1e-6, None)
    res.update({dtype + "_out": np.concatenate([out, out1[:, None]], 1), dtype + "_kv": kv, dtype + "_ksum": ks,
                dtype + "_tokens": tok})
np.savez(sys.argv[1], **res)
"""

_OMP_ENVS = {
    "threads1": {"OMP_NUM_THREADS": "1"},
    "threads2": {"OMP_NUM_THREADS": "2"},
    "threads3": {"OMP_NUM_THREADS": "3"},
    # OpenMP starts fewer threads than the kernel asks for:
    "thread-limit1": {"OMP_NUM_THREADS": "2", "OMP_THREAD_LIMIT": "1"},
    "thread-limit3": {"OMP_NUM_THREADS": "4", "OMP_THREAD_LIMIT": "3"},
    "dynamic": {"OMP_NUM_THREADS": "4", "OMP_DYNAMIC": "true"},
}


def _run_threads_script(path, omp_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["BASED_PARALLEL_ANY_SIZE"] = "1"
    run = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(path)], env={**env, **omp_env},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return np.load(path)


@pytest.fixture(scope="module")
def one_thread_run(tmp_path_factory):
    """The script's results on one thread, checked against the float64 references."""
    res = _run_threads_script(tmp_path_factory.mktemp("threads") / "one.npz", _OMP_ENVS["threads1"])
    rng = np.random.default_rng(21)
    b, t, h, dk, dv = 2, 70, 5, 4, 3
    for dtype in ("float32", "float64"):
        q64, k64 = (x.astype(dtype).astype(np.float64) for x in rng.standard_normal((2, b, t + 1, h, dk)))
        v64 = rng.standard_normal((b, t + 1, h, dv)).astype(dtype).astype(np.float64)
        o_ref, bound = output_bound(q64, k64, v64, dtype, scale=0.5, normalize=True, chunk=16)
        assert_within(res[dtype + "_out"], o_ref, bound, f"{dtype} outputs")
        kv_ref, ks_ref, kv_b, ks_b = state_bound(k64, v64, dtype, compute_dtype(dtype), scale=0.5, chunk=16)
        assert_within(res[dtype + "_kv"], kv_ref, kv_b, f"{dtype} state.kv")
        assert_within(res[dtype + "_ksum"], ks_ref, ks_b, f"{dtype} state.ksum")
        assert list(res[dtype + "_tokens"]) == [t + 1] * b
    return res


@pytest.mark.parametrize("name", [n for n in _OMP_ENVS if n != "threads1"])
def test_thread_count_does_not_change_bits(one_thread_run, name, tmp_path):
    """Each (batch, head) is computed by one thread in a fixed order, so any team (more
    threads, or fewer than asked for: OMP_THREAD_LIMIT, OMP_DYNAMIC) gives the bits of one
    thread, which match the references; an uncomputed head would leave NaN in out."""
    res = _run_threads_script(tmp_path / "res.npz", _OMP_ENVS[name])
    for key in one_thread_run.files:
        assert res[key].tobytes() == one_thread_run[key].tobytes(), f"{key} differs from the one-thread run"


# A C caller's own parallel region: the kernels' regions nested inside it get one thread
# (nesting is off) although they ask for 4 (based_set_num_threads, BASED_PARALLEL_ANY_SIZE=1),
# against the twins called outside.
_NESTED_C = r"""
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include "based.h"

enum { B = 2, T = 70, H = 5, DK = 4, DV = 3, F = 1 + DK + DK * (DK + 1) / 2 };
static float q[B][T + 1][H][DK], k[B][T + 1][H][DK], v[B][T + 1][H][DV];
static float out[2][B][T][H][DV], out1[2][B][H][DV], kv[2][B][H][F][DV], ks[2][B][H][F];
static int64_t tok[2][B];

static DLTensor tensor(void *data, int ndim, int64_t *shape, int64_t *strides, uint8_t code, uint8_t bits) {
    DLTensor t = {0};
    t.data = data, t.device.device_type = kDLCPU, t.ndim = ndim, t.shape = shape, t.strides = strides;
    t.dtype.code = code, t.dtype.bits = bits, t.dtype.lanes = 1;
    return t;
}

/* prefill of T tokens and a decode of token T into run r's out, state: ref = 1 the twins */
static int run(int r, int ref) {
    int64_t s_in[4] = {B, T, H, DK}, st_in[4] = {(T + 1) * H * DK, H * DK, DK, 1};
    int64_t s_v[4] = {B, T, H, DV}, st_v[4] = {(T + 1) * H * DV, H * DV, DV, 1};
    int64_t s_o[4] = {B, T, H, DV}, s_kv[4] = {B, H, F, DV}, s_ks[3] = {B, H, F}, s_t[1] = {B};
    int64_t s_1[3] = {B, H, DK}, st_1[3] = {(T + 1) * H * DK, DK, 1};
    int64_t s_1v[3] = {B, H, DV}, st_1v[3] = {(T + 1) * H * DV, DV, 1}, s_o1[3] = {B, H, DV};
    DLTensor tq = tensor(q, 4, s_in, st_in, kDLFloat, 32), tk = tensor(k, 4, s_in, st_in, kDLFloat, 32);
    DLTensor tv = tensor(v, 4, s_v, st_v, kDLFloat, 32), to = tensor(out[r], 4, s_o, NULL, kDLFloat, 32);
    DLTensor tkv = tensor(kv[r], 4, s_kv, NULL, kDLFloat, 32), tks = tensor(ks[r], 3, s_ks, NULL, kDLFloat, 32);
    DLTensor tt = tensor(tok[r], 1, s_t, NULL, kDLInt, 64);
    DLTensor q1 = tensor(&q[0][T], 3, s_1, st_1, kDLFloat, 32), k1 = tensor(&k[0][T], 3, s_1, st_1, kDLFloat, 32);
    DLTensor v1 = tensor(&v[0][T], 3, s_1v, st_1v, kDLFloat, 32), o1 = tensor(out1[r], 3, s_o1, NULL, kDLFloat, 32);
    based_linear_attention_params p = based_linear_attention_params_default(DK);
    p.chunk_size = 16;
    int bad = (ref ? based_linear_attention_prefill_ref : based_linear_attention_prefill)(&tq, &tk, &tv, &tkv, &tks,
                                                                                         &tt, &to, &p);
    bad |= (ref ? based_linear_attention_decode_ref : based_linear_attention_decode)(&q1, &k1, &v1, &tkv, &tks, &tt,
                                                                                    &o1, &p);
    return bad;
}

int main(void) {
    unsigned x = 12345u;
    float *in[3] = {&q[0][0][0][0], &k[0][0][0][0], &v[0][0][0][0]};
    const int n[3] = {B * (T + 1) * H * DK, B * (T + 1) * H * DK, B * (T + 1) * H * DV};
    for (int a = 0; a < 3; a++)
        for (int i = 0; i < n[a]; i++) {
            x = x * 1664525u + 1013904223u;
            in[a][i] = (float)(x >> 8) / (float)(1u << 23) - 1.0f; /* uniform in [-1, 1) */
        }
    float *o = &out[0][0][0][0][0], *o1 = &out1[0][0][0][0];
    for (int i = 0; i < 2 * B * T * H * DV; i++) o[i] = NAN;
    for (int i = 0; i < 2 * B * H * DV; i++) o1[i] = NAN;
    omp_set_max_active_levels(1);
    based_set_num_threads(4);
    int bad = 0, asked = 0, inner = 0;
#pragma omp parallel num_threads(2)
    {
#pragma omp single
        {
            asked = based_get_num_threads();
#pragma omp parallel num_threads(4)
            {
                if (omp_get_thread_num() == 0) inner = omp_get_num_threads();
            }
            bad = run(0, 0);
        }
    }
    bad |= run(1, 1);
    if (bad || asked < 2 || inner != 1) {
        printf("status %d, threads asked %d, nested team %d: not the case under test\n", bad, asked, inner);
        return 1;
    }
    /* float32 compute (tests/linear_helpers.py): n u_32 with n = F + 2C + T/C + Dk = 56, times
     * (num_abs + |o| den_abs) / den <= 20 (|s| <= scale |q| |k| <= 2, so K <= 5 in absolute
     * terms, K >= 1/2, |v| < 1): 1.3e-4, under 2e-4; a NaN fails the comparison */
    int nbad = 0;
    for (int i = 0; i < B * T * H * DV; i++) nbad += !(fabsf(o[i] - o[B * T * H * DV + i]) <= 2e-4f);
    for (int i = 0; i < B * H * DV; i++) nbad += !(fabsf(o1[i] - o1[B * H * DV + i]) <= 2e-4f);
    /* the state: n = 2C + T/C + 2 = 39 additions of |phi(k) v| <= 1 over 71 tokens: 3.3e-4 */
    const float *s = &kv[0][0][0][0][0], *z = &ks[0][0][0][0];
    for (int i = 0; i < B * H * F * DV; i++) nbad += !(fabsf(s[i] - s[B * H * F * DV + i]) <= 5e-4f);
    for (int i = 0; i < B * H * F; i++) nbad += !(fabsf(z[i] - z[B * H * F + i]) <= 5e-4f);
    if (nbad || tok[0][0] != T + 1 || tok[0][1] != T + 1) {
        printf("%d outputs or state elements differ from the twins'\n", nbad);
        return 1;
    }
    printf("nested ok\n");
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_prefill_inside_a_callers_parallel_region(tmp_path):
    """A C program calls prefill and decode from inside its own `omp parallel` + `single`:
    the kernels get a team of one although they ask for more, and every head is computed."""
    root = Path(__file__).resolve().parent.parent
    src = tmp_path / "nested.c"
    src.write_text(_NESTED_C)
    sources = sorted(str(p) for p in (root / "csrc").glob("*.c"))  # the C core, as tests/test_c_api.py builds it
    exe = tmp_path / "nested"
    build = subprocess.run(["cc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-fopenmp",
                            f"-I{root / 'csrc'}", str(src), *sources, "-lm", "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OMP_")}, "OMP_NUM_THREADS": "4",
           "BASED_PARALLEL_ANY_SIZE": "1"}
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "nested ok" in run.stdout


# ---------------------------------------------------------------------------------------
# Array libraries and out=
# ---------------------------------------------------------------------------------------


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_in_torch_out_and_out_argument(dtype):
    rng = np.random.default_rng(8)
    b, t, h, dk, dv = 2, 40, 3, 16, 24
    q, k = (to_lib(rng.standard_normal((b, t, h, dk)), dtype, "torch", "bhtd") for _ in range(2))
    v = to_lib(rng.standard_normal((b, t, h, dv)), dtype, "torch", "bhtd")
    o, state = based.linear_attention_prefill(q, k, v)
    assert isinstance(o, torch.Tensor) and o.dtype == v.dtype and o.shape == (b, t, h, dv)
    assert isinstance(state.kv, torch.Tensor) and state.kv.dtype == torch.float32
    big = torch.full((b, t, h, 2 * dv), float("nan"), dtype=v.dtype)
    out = big[..., ::2]
    o2, _ = based.linear_attention_prefill(q, k, v, out=out)
    assert o2 is out and torch.isnan(big[..., 1::2]).all()
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    o_dec = based.linear_attention_decode(q[:, 0], k[:, 0], v[:, 0], state)
    assert isinstance(o_dec, torch.Tensor) and o_dec.shape == (b, h, dv)
    assert state.tokens.tolist() == [t + 1] * b
