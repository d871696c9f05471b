"""Recurrent states under misuse (issue 10): a refused state operation changes nothing,
batch indices are range-checked whatever their integer dtype, one state is never driven by
two calls at once, and damaged files are refused by name. Both state classes
(LinearAttentionState, SlidingWindowCache) share the machinery, so each test runs on both."""

import threading
import time
import zipfile

import numpy as np
import pytest
from conftest import HAS_TORCH, requires_torch, to_numpy64, torch

import based
from based import _C

B = 4


def linear_state(batch=B, seed=0, like=None, big=False):
    """A numpy-backed (torch if like) LinearAttentionState after a short prefill: H=2, Dk=3,
    Dv=5, or with big=True the paper's H=8, Dk=16, Dv=64 (a decode step then takes long
    enough for threads to overlap)."""
    rng = np.random.default_rng(seed)
    h, dk, dv = (8, 16, 64) if big else (2, 3, 5)
    q, k = rng.standard_normal((2, batch, 6, h, dk)).astype(np.float32)
    v = rng.standard_normal((batch, 6, h, dv)).astype(np.float32)
    if like is not None:
        q, k, v = (torch.from_numpy(x) for x in (q, k, v))
    _, state = based.linear_attention_prefill(q, k, v)
    return state


def window_cache(batch=B, seed=0, like=None, big=False):
    """A numpy-backed (torch if like) SlidingWindowCache after a short prefill: Hkv=2, W=5,
    D=8, or with big=True Hkv=8, W=1024, D=64."""
    rng = np.random.default_rng(seed)
    hkv, w, d, t = (8, 1024, 64, 1100) if big else (2, 5, 8, 7)
    q = rng.standard_normal((batch, t, 2 * hkv, d)).astype(np.float32)
    k, v = rng.standard_normal((2, batch, t, hkv, d)).astype(np.float32)
    if like is not None:
        q, k, v = (torch.from_numpy(x) for x in (q, k, v))
    _, cache = based.sliding_window_prefill(q, k, v, window=w)
    return cache


MAKERS = {"LinearAttentionState": linear_state, "SlidingWindowCache": window_cache}


@pytest.fixture(params=sorted(MAKERS))
def make(request):
    return MAKERS[request.param]


def snapshot(state):
    return {name: to_numpy64(state._t[name]).copy() for name in state._tensors}


def assert_unchanged(state, before):
    for name, was in before.items():
        np.testing.assert_array_equal(to_numpy64(state._t[name]), was, err_msg=f"{name} changed")


def decode_step(state, seed=5):
    """One decode call on ``state`` with fixed inputs (numpy)."""
    rng = np.random.default_rng(seed)
    b = state.batch
    if isinstance(state, based.LinearAttentionState):
        q, k = rng.standard_normal((2, b, state.heads, state.feature_dim)).astype(np.float32)
        v = rng.standard_normal((b, state.heads, state.value_dim)).astype(np.float32)
        return based.linear_attention_decode(q, k, v, state)
    q = rng.standard_normal((b, 2 * state.kv_heads, state.head_dim)).astype(np.float32)
    k, v = rng.standard_normal((2, b, state.kv_heads, state.head_dim)).astype(np.float32)
    return based.sliding_window_decode(q, k, v, state)


# ---------------------------------------------------------------------------------------
# 1. A refused state operation changes nothing
# ---------------------------------------------------------------------------------------


def read_only_cases():
    return [(cls, name) for cls, names in (("LinearAttentionState", ("kv", "ksum", "tokens")),
                                            ("SlidingWindowCache", ("k", "v", "tokens"))) for name in names]


@pytest.mark.parametrize("cls,name", read_only_cases(), ids=lambda x: x)
@pytest.mark.parametrize("op", ["reset-all", "reset-some", "copy_"])
def test_read_only_part_refuses_the_whole_operation(cls, name, op):
    state = MAKERS[cls]()
    other = MAKERS[cls](seed=1)
    getattr(state, name).flags.writeable = False
    before = snapshot(state)
    with pytest.raises(ValueError, match=rf"{op.split('-')[0]}: {cls}\.{name} is read-only"):
        if op == "reset-all":
            state.reset()
        elif op == "reset-some":
            state.reset([0, 2])
        else:
            state.copy_(other)
    assert_unchanged(state, before)
    getattr(state, name).flags.writeable = True      # and once writable again, it works
    state.reset()
    assert not to_numpy64(state.tokens).any()


@pytest.mark.parametrize("cls,name", read_only_cases(), ids=lambda x: x)
def test_read_only_part_refuses_decode(cls, name):
    """The ops import every tensor (and check it is writable) before the kernel writes."""
    state = MAKERS[cls]()
    getattr(state, name).flags.writeable = False
    before = snapshot(state)
    with pytest.raises(ValueError, match="read-only"):
        decode_step(state)
    assert_unchanged(state, before)


@requires_torch
def test_part_requiring_grad_refuses_reset_and_copy(make):
    state, other = make(like=torch), make(seed=1, like=torch)
    last = state._tensors[1]
    state._t[last].requires_grad_(True)
    before = snapshot(state)
    with pytest.raises(TypeError, match=f"{last} requires grad"):
        state.reset()
    with pytest.raises(TypeError, match=f"{last} requires grad"):
        state.copy_(other)
    assert_unchanged(state, before)
    state._t[last].requires_grad_(False)
    other._t[last].requires_grad_(True)             # a source that requires grad: nothing copied either
    with pytest.raises(TypeError, match=f"{last} requires grad"):
        state.copy_(other)
    assert_unchanged(state, before)


# ---------------------------------------------------------------------------------------
# 2. Batch indices
# ---------------------------------------------------------------------------------------


BAD_INDICES = [
    (np.array([2**64 - 1], np.uint64), "18446744073709551615"),
    (np.array([0, B], np.int64), str(B)),
    (np.array([-B - 1], np.int64), str(-B - 1)),
    (np.array([B], np.uint8), str(B)),
    ([2**64 - 1], "18446744073709551615"),
    ([-1, 2**64 - 1], "18446744073709551615"),   # numpy would make this list float64
    ([2**70], str(2**70)),
    (np.uint64(2**63), str(2**63)),
]


@pytest.mark.parametrize("indices,shown", BAD_INDICES, ids=[f"bad{i}" for i in range(len(BAD_INDICES))])
@pytest.mark.parametrize("method", ["reset", "index_select"])
def test_out_of_range_index_is_an_index_error(make, indices, shown, method):
    state = make()
    before = snapshot(state)
    with pytest.raises(IndexError, match=rf"batch_indices: batch index {shown} is out of range for batch size {B}"):
        getattr(state, method)(indices)
    assert_unchanged(state, before)


@requires_torch
def test_out_of_range_torch_uint64_index(make):
    state = make()
    before = snapshot(state)
    idx = torch.from_numpy(np.array([2**64 - 1], np.uint64))
    with pytest.raises(IndexError, match="batch index 18446744073709551615 is out of range"):
        state.reset(idx)
    assert_unchanged(state, before)


def test_index_error_is_also_a_value_error(make):
    """SPEC 4 promises ValueError for values out of range; IndexError is the Python name."""
    with pytest.raises(ValueError, match="out of range"):
        make().reset([B])


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
def test_valid_indices_of_every_integer_dtype(make, dtype):
    state = make()
    ref = make()
    signed = np.dtype(dtype).kind == "i"
    idx = np.array([-1, 0] if signed else [B - 1, 0], dtype=dtype)
    picked = state.index_select(idx)
    for name in state._tensors:
        np.testing.assert_array_equal(to_numpy64(picked._t[name]), to_numpy64(ref._t[name])[[B - 1, 0]])
    state.reset(idx)
    assert to_numpy64(state.tokens).tolist() == [0] + [to_numpy64(ref.tokens)[1]] * (B - 2) + [0]


def test_negative_indices_count_from_the_end_as_in_numpy(make):
    state = make()
    tokens = to_numpy64(state.tokens).copy()
    picked = state.index_select([-B, -1, 2])
    np.testing.assert_array_equal(to_numpy64(picked.tokens), tokens[[-B, -1, 2]])


def test_empty_list_is_a_no_op_reset_and_a_zero_row_select(make):
    state = make()
    before = snapshot(state)
    for empty in ([], (), range(0), np.array([], np.int64)):
        assert state.reset(empty) is state
        assert_unchanged(state, before)
        picked = state.index_select(empty)
        assert type(picked) is type(state) and picked.batch == 0
        assert picked._s == state._s
        for name in state._tensors:
            assert tuple(picked._t[name].shape) == (0,) + tuple(state._t[name].shape[1:])


@pytest.mark.parametrize("indices", [[True], np.array([True, False]), [0, True], [1.0], np.array([0.0]),
                                     np.array([], np.float64), "0", [[0]]], ids=lambda x: repr(x))
def test_non_integer_indices_are_refused(make, indices):
    state = make()
    before = snapshot(state)
    with pytest.raises((TypeError, ValueError), match="batch_indices"):
        state.reset(indices)
    with pytest.raises((TypeError, ValueError), match="batch_indices"):
        state.index_select(indices)
    assert_unchanged(state, before)


def test_c_core_checks_indices_of_an_empty_state():
    """The C API refuses a bad index even when there is nothing to zero."""
    with pytest.raises(ValueError, match="batch index 5 is out of range for batch size 0"):
        _C.state_zero(np.zeros((0, 3), np.float32), np.array([5]), None)
    with pytest.raises(TypeError, match=r"batch_indices has an unsupported dtype \(uint, 64 bits"):
        _C.state_zero(np.zeros((2, 3), np.float32), np.array([2**64 - 1], np.uint64), None)


# ---------------------------------------------------------------------------------------
# 6. One call at a time per state
# ---------------------------------------------------------------------------------------


def test_concurrent_decodes_never_lose_updates(make):
    """Threads hammering one state: every call either runs alone or is refused with a
    RuntimeError, so the state equals that of the successful calls made one after another."""
    state = make(batch=4, big=True)
    fresh = make(batch=4, big=True)
    counts = {"ok": 0, "refused": 0}
    lock = threading.Lock()
    start = threading.Barrier(3)

    def worker():
        start.wait()
        for _ in range(100):
            try:
                decode_step(state)
            except RuntimeError as exc:
                assert "in use by another call" in str(exc)
                with lock:
                    counts["refused"] += 1
            else:
                with lock:
                    counts["ok"] += 1

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(counts["ok"]):
        decode_step(fresh)
    assert to_numpy64(state.tokens).tolist() == to_numpy64(fresh.tokens).tolist()
    for name in state._tensors:
        np.testing.assert_array_equal(to_numpy64(state._t[name]), to_numpy64(fresh._t[name]), err_msg=name)


def long_prefill(state):
    """A prefill on ``state`` long enough (~0.3 s) for another thread to run into it."""
    rng = np.random.default_rng(9)
    b = state.batch
    if isinstance(state, based.LinearAttentionState):
        q, k = rng.standard_normal((2, b, 1, state.heads, state.feature_dim)).astype(np.float32)
        v = rng.standard_normal((b, 1, state.heads, state.value_dim)).astype(np.float32)
        t = 3_000_000
        q, k, v = (np.broadcast_to(x, (b, t) + x.shape[2:]) for x in (q, k, v))
        return based.linear_attention_prefill(q, k, v, state)
    q = rng.standard_normal((b, 1, 2 * state.kv_heads, state.head_dim)).astype(np.float32)
    k, v = rng.standard_normal((2, b, 1, state.kv_heads, state.head_dim)).astype(np.float32)
    t = 2_000_000
    q, k, v = (np.broadcast_to(x, (b, t) + x.shape[2:]) for x in (q, k, v))
    return based.sliding_window_prefill(q, k, v, cache=state)


@pytest.mark.parametrize("second", ["decode", "reset", "copy_", "clone", "index_select", "save"])
def test_second_caller_gets_a_runtime_error_while_a_call_runs(make, second, tmp_path):
    state = make(batch=1)
    done = threading.Event()
    failures = []

    def first():
        deadline = time.monotonic() + 60
        try:
            while True:            # the first call may itself meet one of ours: retry until it ran
                try:
                    long_prefill(state)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            done.set()

    other = make(batch=1, seed=3)
    calls = {"decode": lambda: decode_step(state), "reset": lambda: state.reset([0]),
             "copy_": lambda: state.copy_(other), "clone": state.clone, "index_select": lambda: state.index_select([0]),
             "save": lambda: state.save(tmp_path / "s.npz")}
    thread = threading.Thread(target=first)
    thread.start()
    refused = 0
    while not done.is_set():
        try:
            calls[second]()
        except RuntimeError as exc:
            assert f"this {type(state).__name__} is already in use by another call" in str(exc)
            refused += 1
        time.sleep(0.001)          # leave the first thread room to start its call between ours
    thread.join()
    assert not failures, failures
    assert refused > 0, "the second caller never met the first call: the guard is missing"


def test_other_state_as_copy_source_is_guarded_too(make):
    """copy_ reads ``other``: a call running on other refuses it as well."""
    a, b = make(), make(seed=1)
    with b._in_use:                 # as if another thread were running an op on b
        before = snapshot(a)
        with pytest.raises(RuntimeError, match="already in use"):
            a.copy_(b)
        assert_unchanged(a, before)
    a.copy_(b)
    a.copy_(a)                      # copying a state onto itself is fine (one flag, taken once)


def test_independent_states_in_threads_are_bit_identical(make):
    states = [make(batch=1) for _ in range(4)]
    outs = [None] * 4

    def run(i):
        outs[i] = [to_numpy64(decode_step(states[i], seed=s)) for s in range(50)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(1, 4):
        np.testing.assert_array_equal(np.stack(outs[i]), np.stack(outs[0]))


# ---------------------------------------------------------------------------------------
# 8. Files: damaged ones are refused by name; a plain load gives numpy arrays
# ---------------------------------------------------------------------------------------


def damaged_files(tmp_path, state):
    """(label, path) of files that are not a valid saved ``state``."""
    good = tmp_path / "good.npz"
    state.save(good)
    data = good.read_bytes()
    files = {"empty": b"", "text": b"hello, world\n" * 10, "half": data[: len(data) // 2],
             "head": data[:30], "tail-cut": data[:-10]}
    out = []
    for label, content in files.items():
        p = tmp_path / f"{label}.bin"
        p.write_bytes(content)
        out.append((label, p))
    p = tmp_path / "array.npy"
    np.save(p, np.zeros(3))
    out.append(("npy", p))
    p = tmp_path / "empty-zip.npz"
    with zipfile.ZipFile(p, "w"):
        pass
    out.append(("empty-zip", p))
    corrupt = bytearray(data)                       # flip bytes inside the first entry's data
    at = data.index(b"NUMPY") + 200
    corrupt[at:at + 16] = b"\xff" * 16
    p = tmp_path / "corrupt.npz"
    p.write_bytes(bytes(corrupt))
    out.append(("crc", p))

    def rewrite(label, meta=None, **arrays):
        with np.load(good) as z:
            entries = {n: z[n] for n in z.files}
        if meta is not None:
            entries["__based_state__"] = np.frombuffer(meta, np.uint8)
        entries.update(arrays)
        path = tmp_path / f"{label}.npz"
        with open(path, "wb") as f:
            np.savez(f, **entries)
        out.append((label, path))

    rewrite("json", meta=b"{not json")
    rewrite("not-utf8", meta=b"\xff\xfe")
    rewrite("list-meta", meta=b"[1, 2]")
    meta = __import__("json").loads(bytes(np.load(good)["__based_state__"]).decode())
    dumps = __import__("json").dumps
    rewrite("no-settings", meta=dumps({k: v for k, v in meta.items() if k != "settings"}).encode())
    rewrite("bad-scale", meta=dumps({**meta, "settings": {**meta["settings"], "scale": "big"}}).encode())
    rewrite("bad-dtype", meta=dumps({**meta, "dtypes": {**meta["dtypes"], state._tensors[0]: "int8"}}).encode())
    rewrite("float-tokens", tokens=np.zeros(state.batch))
    rewrite("negative-tokens", tokens=-np.ones(state.batch, np.int64))
    rewrite("batch-mismatch", tokens=np.zeros(state.batch + 1, np.int64))
    first = state._tensors[0]
    rewrite("flat", **{first: np.zeros(7, np.float32)})
    second = state._tensors[1]
    rewrite("shape-mismatch", **{second: np.zeros((state.batch, 1, 1, 1)[: to_numpy64(state._t[second]).ndim],
                                                  np.float32)})
    return out


def test_damaged_files_are_value_errors_naming_the_file(make, tmp_path):
    state = make()
    cls = type(state)
    for label, path in damaged_files(tmp_path, state):
        with pytest.raises(ValueError) as info:
            cls.load(path)
        assert str(path) in str(info.value), (label, str(info.value))
    with pytest.raises(FileNotFoundError):          # a missing file is not a damaged one
        cls.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_load_without_like_gives_numpy_arrays(make, tmp_path, dtype):
    state = make()
    typed = type(state).zeros(*((state.batch, state.heads, state.feature_dim, state.value_dim)
                                if isinstance(state, based.LinearAttentionState)
                                else (state.batch, state.kv_heads, state.window, state.head_dim)),
                              dtype=dtype, scale=state.scale, like=np.zeros(1))
    typed.copy_(state)
    typed.save(tmp_path / "s.npz")
    back = type(state).load(tmp_path / "s.npz")
    for name in state._tensors:
        assert isinstance(back._t[name], np.ndarray), name
        np.testing.assert_array_equal(back._t[name], typed._t[name])
    assert back._t[state._tensors[0]].dtype == np.dtype(dtype)


def test_load_bfloat16_without_like_is_based_buffers(make, tmp_path):
    """numpy has no bfloat16: those tensors come back as based.Buffer (tokens as numpy)."""
    state = make()
    dims = ((state.batch, state.heads, state.feature_dim, state.value_dim)
            if isinstance(state, based.LinearAttentionState) else (state.batch, state.kv_heads, state.window,
                                                                   state.head_dim))
    bf = type(state).zeros(*dims, dtype="bfloat16", scale=state.scale)
    bf.copy_(state)
    bf.save(tmp_path / "s.npz")
    back = type(state).load(tmp_path / "s.npz")
    first = state._tensors[0]
    assert isinstance(back._t[first], based.Buffer) and back._t[first].dtype == "bfloat16"
    assert isinstance(back.tokens, np.ndarray)
    if HAS_TORCH:
        for name in state._tensors:
            np.testing.assert_array_equal(to_numpy64(back._t[name]), to_numpy64(bf._t[name]))
