"""based.nn modules: shapes, the mixers against the float64 references, BaseConv decode,
BasedLM causality, config JSON, save/load and evaluate_loss."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import EPS

torch = pytest.importorskip("torch")
import based.nn as bnn  # noqa: E402
from based import reference as ref  # noqa: E402
from based.nn import functional as fn  # noqa: E402


def small_config(**overrides):
    base = dict(d_model=32, layers=["conv", "linear", "window", "conv"], mlp_hidden=48, linear_heads=2,
                linear_feature_dim=8, linear_head_dim=16, window=5, window_heads=4, window_kv_heads=2,
                window_head_dim=8, conv_inner=24)
    base.update(overrides)
    return bnn.BasedConfig(**base)


def make_model(config, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return bnn.BasedLM(config).to(dtype).eval()


# -- shapes -------------------------------------------------------------------------------


def test_module_shapes():
    x = torch.randn(2, 7, 32)
    assert bnn.RMSNorm(32)(x).shape == (2, 7, 32)
    assert bnn.SwiGLU(32, 40)(x).shape == (2, 7, 32)
    assert bnn.BaseConv(32, 24)(x).shape == (2, 7, 32)
    la = bnn.LinearAttention(32, heads=3, feature_dim=16, head_dim=112)
    q, k, v = la.project(x)
    assert (q.shape, k.shape, v.shape) == ((2, 7, 3, 16), (2, 7, 3, 16), (2, 7, 3, 112))
    assert la(x).shape == (2, 7, 32)
    swa = bnn.SlidingWindowAttention(32, heads=4, kv_heads=2, head_dim=112, window=3)
    q, k, v = swa.project(x)
    assert (q.shape, k.shape, v.shape) == ((2, 7, 4, 112), (2, 7, 2, 112), (2, 7, 2, 112))
    assert swa(x).shape == (2, 7, 32)


def test_rmsnorm_formula():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    norm = bnn.RMSNorm(2, eps=0.0).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(norm(x), torch.tensor([[3.0, 8.0]], dtype=torch.float64) / math.sqrt(12.5))


@pytest.mark.parametrize("head_dim", [64, 112])
def test_based_lm_value_head_dims(head_dim):
    """Dv = 64 (the paper's 360M model) and Dv = 112 (its 1.3B model), d_model not H * Dv."""
    config = small_config(linear_heads=2, linear_head_dim=head_dim, window_heads=2, window_kv_heads=1,
                          window_head_dim=head_dim)
    model = make_model(config, dtype=torch.float32)
    logits = model(torch.randint(0, 256, (2, 9)))
    assert logits.shape == (2, 9, 256) and torch.isfinite(logits).all()
    assert model.blocks[1].mixer.v_proj.weight.shape == (2 * head_dim, 32)


# -- mixers against the references --------------------------------------------------------


def test_linear_attention_layer_is_spec_math():
    torch.manual_seed(1)
    layer = bnn.LinearAttention(24, heads=3, feature_dim=16, head_dim=112).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = layer.project(x)
        got = layer(x)
        o = ref.linear_attention_quadratic(q.numpy(), k.numpy(), v.numpy(), scale=0.25, normalize=True, eps=1e-6)
    want = o.reshape(2, 13, -1) @ layer.out_proj.weight.detach().numpy().T
    # float64 both ways; the output projection sums 336 terms: a few hundred ulps of the output scale
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e3 * EPS["float64"] * np.abs(want).max())


def test_window_layer_is_spec_math_with_rotary():
    torch.manual_seed(2)
    layer = bnn.SlidingWindowAttention(24, heads=4, kv_heads=2, head_dim=8, window=4, rotary_base=100.0).double()
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        pos = fn.rotary_positions(0, 11)
        q = fn.apply_rotary(layer.q_proj(x).view(2, 11, 4, 8), pos, 100.0)
        k = fn.apply_rotary(layer.k_proj(x).view(2, 11, 2, 8), pos, 100.0)
        v = layer.v_proj(x).view(2, 11, 2, 8)
        o = ref.sliding_window_attention(q.numpy(), k.numpy(), v.numpy(), 4)
    want = o.reshape(2, 11, -1) @ layer.out_proj.weight.detach().numpy().T
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e3 * EPS["float64"] * np.abs(want).max())


def test_window_project_start_offsets_positions():
    torch.manual_seed(3)
    layer = bnn.SlidingWindowAttention(16, heads=2, kv_heads=2, head_dim=8, window=4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        q_full, k_full, v_full = layer.project(x)
        q_tail, k_tail, v_tail = layer.project(x[:, 4:], start=torch.tensor([4, 4]))
    torch.testing.assert_close(q_tail, q_full[:, 4:], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(k_tail, k_full[:, 4:], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(v_tail, v_full[:, 4:])


def baseconv_reference(layer, x):
    """BaseConv written as loops in float64 NumPy: y_t = sum_j w[c, j] u1[t - (k-1) + j]."""
    w_in, b_in = layer.in_proj.weight.detach().numpy(), layer.in_proj.bias.detach().numpy()
    w, b = layer.conv.weight.detach().numpy()[:, 0, :], layer.conv.bias.detach().numpy()
    w_out, b_out = layer.out_proj.weight.detach().numpy(), layer.out_proj.bias.detach().numpy()
    u = x.numpy() @ w_in.T + b_in
    c = layer.inner
    u1, u2 = u[..., :c], u[..., c:]
    kk = layer.kernel_size
    conv = np.zeros_like(u1)
    for t in range(x.shape[1]):
        conv[:, t] = b
        for j in range(kk):
            src = t - (kk - 1) + j
            if src >= 0:
                conv[:, t] += w[:, j] * u1[:, src]
    silu = conv / (1.0 + np.exp(-conv))
    return (silu * u2) @ w_out.T + b_out


@pytest.mark.parametrize("kernel_size", [1, 3, 4])
def test_baseconv_matches_loop_reference(kernel_size):
    torch.manual_seed(4)
    layer = bnn.BaseConv(12, 10, kernel_size).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x).numpy()
    want = baseconv_reference(layer, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e3 * EPS["float64"] * np.abs(want).max())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_baseconv_step_and_prefill_equal_full(kernel_size, dtype):
    dt = getattr(torch, dtype)
    torch.manual_seed(5)
    layer = bnn.BaseConv(16, 20, kernel_size).to(dt)
    x = torch.randn(3, 9, 16, dtype=dt)
    with torch.no_grad():
        full = layer(x)
    # 1) step by step from a fresh state
    state = layer.new_state(3)
    steps = torch.stack([layer.step(x[:, t], state) for t in range(9)], dim=1)
    # 2) a chunked prefill (T = 1 chunk included), then steps
    state2 = layer.new_state(3)
    parts = [layer.prefill(x[:, :1], state2), layer.prefill(x[:, 1:5], state2)]
    parts += [layer.step(x[:, t], state2)[:, None] for t in range(5, 9)]
    chunked = torch.cat(parts, dim=1)
    # float64: equal up to summation order (a few ulps); float32: the in/out projections run
    # as different GEMM shapes ((B*T, d) vs (B, d)), whose reduction orders over d + C terms differ
    tol = (16 + 20) * 4 * EPS[dtype] * float(full.abs().max())
    torch.testing.assert_close(steps, full, rtol=0, atol=tol)
    torch.testing.assert_close(chunked, full, rtol=0, atol=tol)
    assert state.tokens.tolist() == [9, 9, 9] and state2.tokens.tolist() == [9, 9, 9]
    torch.testing.assert_close(state.inputs, state2.inputs, rtol=0, atol=tol)


def test_baseconv_state_batch_management(tmp_path):
    torch.manual_seed(6)
    layer = bnn.BaseConv(8, 6, 3)
    x = torch.randn(3, 5, 8)
    state = layer.new_state(3)
    layer.prefill(x, state)
    assert state.inputs.shape == (3, 6, 2) and state.kernel_size == 3
    picked = state.index_select([2, 0])
    torch.testing.assert_close(picked.inputs, state.inputs[[2, 0]], rtol=0, atol=0)
    assert picked.tokens.tolist() == [5, 5]
    # a reordered state continues exactly like the reordered batch would
    y = layer.step(x[[2, 0], 0], picked)
    ref_state = layer.new_state(2)
    layer.prefill(x[[2, 0]], ref_state)
    torch.testing.assert_close(y, layer.step(x[[2, 0], 0], ref_state), rtol=0, atol=0)
    path = tmp_path / "conv_state.npz"
    state.save(path)
    loaded = bnn.BaseConvState.load(path)
    assert torch.equal(loaded.inputs, state.inputs) and torch.equal(loaded.tokens, state.tokens)
    state.reset([1])
    assert not state.inputs[1].any() and state.tokens[1] == 0 and state.inputs[0].any()
    assert "BaseConvState" in repr(state) and state.nbytes == 3 * 6 * 2 * 4 + 3 * 8


# -- the language model -------------------------------------------------------------------


def test_based_lm_is_causal():
    model = make_model(small_config(layers=["conv", "linear", "window", "linear", "conv"]))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1 + torch.arange(6)) % 256
    with torch.no_grad():
        lx, ly = model(x), model(y)
    # every computation at positions < 10 sees identical inputs: only summation order may differ
    torch.testing.assert_close(lx[:, :10], ly[:, :10], rtol=0, atol=1e-12)
    assert (lx[:, 10] - ly[:, 10]).abs().max() > 1e-3          # and the change does reach position 10


@pytest.mark.parametrize("kind", ["conv", "linear", "window"])
def test_each_mixer_alone_is_causal(kind):
    model = make_model(small_config(layers=[kind]))
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 6] = (y[0, 6] + 7) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :6], model(y)[:, :6], rtol=0, atol=1e-12)


def test_dropout_only_in_training_mode():
    model = make_model(small_config(dropout=0.5))
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_parameter_count_matches_the_formula():
    c = small_config()
    d = c.d_model
    conv = d * 2 * c.conv_inner + 2 * c.conv_inner + c.conv_inner * c.conv_kernel + c.conv_inner + c.conv_inner * d + d
    linear = 2 * d * c.linear_heads * c.linear_feature_dim + 2 * d * c.linear_heads * c.linear_head_dim
    window = 2 * d * c.window_heads * c.window_head_dim + 2 * d * c.window_kv_heads * c.window_head_dim
    per_block = 3 * d * c.mlp_hidden + 2 * d
    mixers = {"conv": conv, "linear": linear, "window": window}
    want = 2 * 256 * d + d + sum(mixers[k] + per_block for k in c.layers)
    assert bnn.BasedLM(c).num_parameters() == want


# -- config -------------------------------------------------------------------------------


def test_config_json_round_trip(tmp_path):
    c = small_config(dropout=0.1, rotary_base=500.0)
    again = bnn.BasedConfig.from_json(c.to_json())
    assert again == c and again.layers == ["conv", "linear", "window", "conv"]
    c.save(tmp_path / "config.json")
    assert bnn.BasedConfig.load(tmp_path / "config.json") == c
    assert json.loads(c.to_json())["window_kv_heads"] == 2


def test_config_fills_derived_sizes():
    c = bnn.BasedConfig(d_model=96, linear_heads=3, window_heads=2)
    assert (c.mlp_hidden, c.linear_head_dim, c.window_head_dim, c.conv_inner) == (192, 32, 48, 192)
    assert json.loads(c.to_json())["linear_head_dim"] == 32


@pytest.mark.parametrize("overrides, message", [
    (dict(layers=["conv", "mamba"]), "unknown layer kind 'mamba'"),
    (dict(layers=[]), "at least one layer"),
    (dict(window_kv_heads=3), r"window_kv_heads \(3\) must divide window_heads \(4\)"),
    (dict(window_head_dim=7), "window_head_dim must be even"),
    (dict(d_model=0), "d_model must be a positive int, got 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_config_unknown_key():
    with pytest.raises(ValueError, match=r"unknown keys \['heads'\]"):
        bnn.BasedConfig.from_dict({"d_model": 64, "heads": 2})


# -- files --------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = make_model(small_config(), dtype=torch.float32)
    x = torch.randint(0, 256, (2, 10))
    model.save_pretrained(tmp_path / "fp32", dtype=torch.float32)
    loaded = bnn.BasedLM.from_pretrained(tmp_path / "fp32")
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    model.save_pretrained(tmp_path / "fp16")                      # float16 by default
    from safetensors import safe_open
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}
        assert set(f.keys()) == set(model.state_dict())
    half = bnn.BasedLM.from_pretrained(tmp_path / "fp16")
    for name, t in half.state_dict().items():
        assert t.dtype == torch.float32
        assert torch.equal(t, model.state_dict()[name].half().float()), name


def test_from_pretrained_errors(tmp_path):
    model = make_model(small_config(), dtype=torch.float32)
    model.save_pretrained(tmp_path)
    small_config(d_model=40).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match="has shape"):
        bnn.BasedLM.from_pretrained(tmp_path)
    small_config(layers=["conv"]).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match="unexpected"):
        bnn.BasedLM.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        bnn.BasedLM.from_pretrained(tmp_path)


# -- evaluate_loss ------------------------------------------------------------------------


def test_evaluate_loss_definition():
    model = make_model(small_config())
    data = np.random.default_rng(0).integers(0, 256, 100).astype(np.uint8)
    got = bnn.evaluate_loss(model, data, 16, batch_size=4)
    # the definition, written out: windows [0,16), [16,32), ... and a 3-byte tail, each alone
    total, n = 0.0, 0
    for s in range(0, 99, 16):
        length = min(16, 99 - s)
        x = torch.from_numpy(data[s:s + length + 1].astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(x[:, :-1]), -1)
        total -= float(logp[0].gather(-1, x[0, 1:, None]).sum())
        n += length
    assert n == 99
    assert got == pytest.approx(total / n, rel=1e-12)
    assert bnn.evaluate_loss(model, bytes(data), 16, batch_size=64) == pytest.approx(got, rel=1e-12)
    assert bnn.evaluate_loss(model, torch.from_numpy(data), 16, max_bytes=50) == pytest.approx(
        bnn.evaluate_loss(model, data[:50], 16), rel=1e-12)


def test_evaluate_loss_of_a_random_model_is_near_uniform():
    model = make_model(small_config(), dtype=torch.float32)
    model.train()
    data = np.frombuffer(b"To be, or not to be, that is the question." * 4, dtype=np.uint8)
    loss = bnn.evaluate_loss(model, data, 32)
    assert abs(loss - math.log(256)) < 0.1             # N(0, 0.02) init: nearly uniform logits
    assert model.training                              # mode restored
    with pytest.raises(ValueError, match="at least 2 bytes"):
        bnn.evaluate_loss(model, b"a", 8)


# -- packaging ----------------------------------------------------------------------------


def test_based_imports_without_torch_and_based_nn_says_why():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import based\n"
            "try:\n    import based.nn\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "based.nn needs PyTorch" in r.stdout


def test_tied_and_padded_vocabulary(tmp_path):
    """tie_embeddings: one matrix for embedding and LM head, written once; the vocabulary padded
    to a multiple: logits cover the padding rows, token ids stop at vocab_size, generate never
    samples a padding id."""
    c = small_config(vocab_size=250, pad_vocab_size_multiple=16, tie_embeddings=True)
    model = make_model(c, dtype=torch.float32)
    assert c.padded_vocab_size == 256 and model.lm_head.weight is model.embed.weight
    x = torch.randint(0, 250, (2, 7))
    with torch.no_grad():
        assert model(x).shape == (2, 7, 256)
        model.lm_head.weight[250:] = 0.0
        model.norm.weight.zero_()                # every logit 0: the padding rows tie for argmax
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 250\)"):
        model.step(torch.tensor([250, 0]), model.new_cache(2))
    g = bnn.generate(model, x, 20, temperature=1.0, seed=0)
    assert int(g.tokens.max()) < 250
    model.save_pretrained(tmp_path, dtype=torch.float32)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "embed.weight" in f.keys()
    again = bnn.BasedLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.embed.weight
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_is_relative_and_leaves_the_rest(interleaved):
    torch.manual_seed(6)
    x = torch.randn(1, 5, 2, 12, dtype=torch.float64)
    y = torch.randn(1, 5, 2, 12, dtype=torch.float64)
    kw = dict(rotary_dim=8, interleaved=interleaved)
    rx = fn.apply_rotary(x, fn.rotary_positions(3, 5), 100.0, **kw)
    ry = fn.apply_rotary(y, fn.rotary_positions(0, 5), 100.0, **kw)
    assert torch.equal(rx[..., 8:], x[..., 8:])
    # rotating both by the same extra offset keeps every dot product
    rx2 = fn.apply_rotary(x, fn.rotary_positions(10, 5), 100.0, **kw)
    ry2 = fn.apply_rotary(y, fn.rotary_positions(7, 5), 100.0, **kw)
    torch.testing.assert_close((rx * ry).sum(-1), (rx2 * ry2).sum(-1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        fn.apply_rotary(x, fn.rotary_positions(0, 5), rotary_dim=7)
