"""BasedLM.step writes the decode kernels' outputs into per-layer buffers kept in the
BasedCache (allocated at the first step, reused by every later one): the buffers stay put,
the kernels really get them as ``out=``, and the results are bit-identical to steps that
allocate fresh outputs."""

import pytest

torch = pytest.importorskip("torch")

import based  # noqa: E402
from based.nn import DecodeBuffer  # noqa: E402

torch.set_num_threads(1)

from test_nn_inference import small_model as _inference_model, tokens  # noqa: E402  (tests/ is on sys.path)

LAYERS = ["conv", "linear", "window", "linear", "window", "conv"]  # the layers of test_nn_inference's model
ATTENTION = [i for i, kind in enumerate(LAYERS) if kind != "conv"]


def small_model(dtype=torch.float32):
    """test_nn_inference's model (all three mixers, a window of 5 that wraps, GQA) with
    linear-attention value dim 32."""
    model = _inference_model(head_dim=32, dtype=dtype)
    assert list(model.config.layers) == LAYERS
    return model


def step_allocating(model, token, cache):
    """BasedLM.step without the cache's buffers: every decode op allocates its output."""
    x = model.embed(token)
    for block, state in zip(model.blocks, cache.states):
        x = block.step(x, state)            # buffer=None
    return model.lm_head(model.norm(x))


@pytest.fixture
def spy(monkeypatch):
    """Records, per call of the two decode ops, the ``out=`` they were given and what they returned."""
    calls = []
    for name in ("linear_attention_decode", "sliding_window_decode"):
        op = getattr(based, name)

        def wrapper(*args, _op=op, _name=name, **kwargs):
            result = _op(*args, **kwargs)
            calls.append((_name, kwargs.get("out"), result))
            return result

        monkeypatch.setattr(based, name, wrapper)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_steps_write_into_the_same_buffers(spy, dtype):
    """After the first step, every further step hands each attention layer's decode op the
    same tensor (same object, same data_ptr) as ``out=``, and the op writes there; BaseConv
    layers use none."""
    model = small_model(dtype)
    _, cache = model.prefill(tokens(2, 7))
    assert all(b.tensor is None for b in cache.buffers)           # nothing allocated before a step
    token = tokens(2, 1, seed=2)[:, 0]
    ptrs = []
    for _ in range(9):
        spy.clear()
        token = model.step(token, cache).argmax(-1)
        assert len(spy) == len(ATTENTION)
        for (name, out, result), layer in zip(spy, ATTENTION):
            assert out is not None, f"{name} (layer {layer}) was called without out="
            assert out is cache.buffers[layer].tensor and result is out
        ptrs.append([cache.buffers[i].tensor.data_ptr() for i in ATTENTION])
    assert all(p == ptrs[0] for p in ptrs), "a decode step allocated new output tensors"
    assert [b.allocations for b in cache.buffers] == [0 if kind == "conv" else 1 for kind in LAYERS]
    lin, win = cache.buffers[ATTENTION[0]].tensor, cache.buffers[ATTENTION[1]].tensor
    assert lin.shape == (2, 2, 32) and win.shape == (2, 4, 16)   # (B, H, Dv), (B, H query heads, D)
    assert lin.dtype == win.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_reused_buffers_give_bit_identical_logits(dtype):
    """Twenty greedy steps through the cache's buffers == the same steps with a fresh output
    per op, bit for bit. The logits of every step are kept (not copied) until the end, so a
    result that still pointed into a buffer overwritten by a later step would show here."""
    model = small_model(dtype)
    prompt = tokens(3, 6)
    _, reused = model.prefill(prompt)
    _, fresh = model.prefill(prompt)
    token = tokens(3, 1, seed=4)[:, 0]
    got, want = [], []
    for _ in range(20):                                           # the window (5) wraps 4 times
        got.append(model.step(token, reused))
        want.append(step_allocating(model, token, fresh))
        token = got[-1].argmax(-1)
    for t, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {t}: max |diff| {(a.float() - b.float()).abs().max().item()}"
    for s, f in zip(reused.states, fresh.states):                 # and the states agree too
        assert all(torch.equal(getattr(s, n), getattr(f, n)) for n in s._tensors)


def test_new_caches_get_their_own_buffers_sized_for_their_batch():
    """index_select / clone make caches with empty buffers (a beam search never shares output
    memory between caches); a step allocates them for the new batch once."""
    model = small_model()
    _, cache = model.prefill(tokens(2, 5))
    model.step(tokens(2, 1)[:, 0], cache)
    before = [cache.buffers[i].tensor for i in ATTENTION]
    beams = cache.index_select([0, 0, 1])
    twin = cache.clone()
    assert all(b.tensor is None for b in beams.buffers + twin.buffers)
    model.step(tokens(3, 1)[:, 0], beams)
    model.step(tokens(2, 1)[:, 0], twin)
    for i, old in zip(ATTENTION, before):
        assert beams.buffers[i].tensor.shape[0] == 3
        assert cache.buffers[i].tensor is old                    # the original's are untouched
        assert len({cache.buffers[i].tensor.data_ptr(), beams.buffers[i].tensor.data_ptr(),
                    twin.buffers[i].tensor.data_ptr()}) == 3


def test_decode_buffer_reallocates_only_when_the_request_changes():
    buf = DecodeBuffer()
    a = buf.get((2, 4, 16), torch.float32, "cpu")
    assert buf.get((2, 4, 16), torch.float32, torch.device("cpu")) is a and buf.allocations == 1
    b = buf.get((3, 4, 16), torch.float32, "cpu")                # a new batch size
    assert b is not a and b.shape == (3, 4, 16) and buf.allocations == 2
    c = buf.get((3, 4, 16), torch.bfloat16, "cpu")               # a model cast to another dtype
    assert c.dtype == torch.bfloat16 and buf.allocations == 3 and buf.get((3, 4, 16), torch.bfloat16, "cpu") is c
    assert "allocations=3" in repr(buf)
