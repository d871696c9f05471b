"""BasedLM.from_pretrained on the released checkpoints' layout (synthetic checkpoints written
by released_helpers in every flavour), against the original forward pass restated from the
math, and ``python -m based generate`` on such a checkpoint.

Tolerance (why it is what it is). Our model (float32, through based's kernels or the
training path) and ``reference_logits`` in float32 are two float32 computations of the
same function; ``reference_logits`` in float64 is the truth. The check is the CUDA tests'
policy (``assert_within_policy``): our error must be at most 3x the float32 restatement's
own error, about 1e-6 of the logits' scale here. The factor is 3 rather than 2 because
every sum is taken in another order (the chunked kernels, the split fused projections,
online softmax), which moves each rounding but not its size. Any convention wrong by one
(a window key too many, fc1's halves swapped, the rotary pairing, a dropped bias, eps
1e-3) moves the logits by 1e-2 or more; the tests were checked to fail that way.
"""

import json
import os
import pickle
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from conftest import assert_within_policy, requires_cuda  # noqa: E402
from released_helpers import FLAVOURS, Spec, flavour_config, random_state_dict, reference_logits, \
    write_checkpoint  # noqa: E402

from based.nn import BasedLM  # noqa: E402
from based.nn.checkpoints import released_config  # noqa: E402

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture
def exact_cuda_float32():
    """No TF32 anywhere (cuDNN convolutions allow it by default): float32 means float32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tokens_for(cfg, b=2, t=19, seed=2):
    return torch.randint(0, Spec(cfg).vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_released_flavour_equals_original_forward(flavour, device, tmp_path, exact_cuda_float32):
    """Full forward, and prefill (7 tokens) + 12 decode steps through based's kernels: logits at
    all 19 positions against the float64 restatement. The windows (4 to 6 keys) are shorter
    than the sequence, so the ring buffers wrap."""
    cfg, sd = write_checkpoint(tmp_path, flavour, seed=1)
    model = BasedLM.from_pretrained(tmp_path, device=device)
    x = tokens_for(cfg)
    ref64 = reference_logits(cfg, sd, x)
    ref32 = reference_logits(cfg, sd, x, torch.float32)
    xd = x.to(device)
    with torch.no_grad():
        full = model(xd)
    assert full.shape == ref64.shape == (2, 19, Spec(cfg).rows)
    assert_within_policy(full, ref64, ref32, "forward", factor=3.0)
    logits, cache = model.prefill(xd[:, :7])
    steps = [logits] + [model.step(xd[:, t], cache)[:, None] for t in range(7, 19)]
    assert_within_policy(torch.cat(steps, 1), ref64, ref32, "prefill + decode", factor=3.0)
    assert int(cache.tokens[0]) == 19


def test_config_mapping(tmp_path):
    """The conventions that the logits alone cannot pin down (eps 1e-6 vs 1e-12 changes them
    by less than float32 resolves), and the sizes each flavour implies."""
    def config(name):
        cfg, sd = flavour_config(name), random_state_dict(Spec(flavour_config(name)), 0)
        return released_config(cfg, sd.keys())[0]

    c = config("based-360m")
    assert c.layers == ["conv", "linear", "window", "conv", "linear", "window", "conv"]
    assert c.window == 5 and c.linear_eps == 1e-6 and c.tie_embeddings        # fla_parallel: FLA's eps
    assert (c.vocab_size, c.padded_vocab_size, c.mlp_hidden, c.conv_inner) == (61, 64, 256, 128)
    assert (c.conv_bias, c.conv_proj_bias, c.mlp_bias, c.window_qkv_bias, c.rotary_dim) == (False, True, False,
                                                                                            False, None)
    c = config("based-1b")
    assert c.window == 6 and c.linear_eps == 1e-12                            # quadratic: the class's eps
    c = config("based-1.3b")
    assert (c.vocab_size, c.padded_vocab_size, c.norm_eps, c.linear_eps, c.linear_head_dim) == (50257, 50264, 1e-5,
                                                                                                1e-12, 16)
    c = config("variants")
    assert (c.window, c.window_kv_heads, c.rotary_dim, c.rotary_interleaved, c.rotary_base) == (3, 2, 8, True, 500.0)
    assert (c.conv_bias, c.conv_kernel, c.conv_inner, c.mlp_hidden, c.linear_eps) == (True, 4, 64, 256, 1e-3)
    assert not c.tie_embeddings and c.mlp_bias and c.window_out_bias
    # the paper's 1.3B shape (reference/based-1b.yaml): window_size 256 -> 128 previous keys + self
    cfg = flavour_config("based-1b")
    cfg.update(n_embd=1792, n_head=16, n_layer=36, n_inner=3584, vocab_size=50257,
               alt_mixer_layers=[1, 6, 11, 16, 21, 27, 33], alt_mixer_2_layers=[2, 7, 12, 17, 22, 28, 34])
    cfg["alt_mixer"]["num_heads"] = 16
    cfg["alt_mixer_2"].update(num_heads=16, window_size=256)
    c = released_config(cfg)[0]
    assert (c.window, c.linear_head_dim, c.window_head_dim, c.mlp_hidden, c.padded_vocab_size) == (129, 112, 112,
                                                                                                   3584, 50264)
    assert c.layers.count("linear") == 7 and c.layers.count("window") == 7 and c.layers.count("conv") == 22


# -- errors -------------------------------------------------------------------------------------


def rewrite(tmp_path, flavour, *, config=None, state=None, seed=1):
    cfg = flavour_config(flavour) if config is None else config
    sd = random_state_dict(Spec(cfg), seed) if state is None else state
    write_checkpoint(tmp_path, flavour, config=cfg, state=sd)
    return tmp_path


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    cfg = flavour_config("based-360m")
    sd = random_state_dict(Spec(cfg), 0)
    del sd["transformer.layers.3.mixer.conv.conv.weight"]
    sd["transformer.layers.0.mixer.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"missing \['transformer.layers.3.mixer.conv.conv.weight'\], "
                                         r"unexpected \['transformer.layers.0.mixer.extra.weight'\]"):
        BasedLM.from_pretrained(rewrite(tmp_path, "based-360m", state=sd))
    sd = random_state_dict(Spec(cfg), 0)
    sd["transformer.layers.2.mixer.Wqkv.weight"] = sd["transformer.layers.2.mixer.Wqkv.weight"][:-1]
    with pytest.raises(ValueError, match=r"transformer.layers.2.mixer.Wqkv.weight has shape \(191, 64\), "
                                         r"config.json implies \(192, 64\)"):
        BasedLM.from_pretrained(rewrite(tmp_path, "based-360m", state=sd))
    sd = random_state_dict(Spec(cfg), 0)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="tie_word_embeddings is true but lm_head.weight and"):
        BasedLM.from_pretrained(rewrite(tmp_path, "based-360m", state=sd))
    # a checkpoint trained with causal-conv1d has conv biases; a use_cuda: false config does not
    sd = random_state_dict(Spec(cfg), 0)
    sd["transformer.layers.0.mixer.conv.conv.bias"] = torch.zeros(128)
    with pytest.raises(ValueError, match=r"unexpected \['transformer.layers.0.mixer.conv.conv.bias'\]"):
        BasedLM.from_pretrained(rewrite(tmp_path, "based-360m", state=sd))


def test_decay_buffer_only_with_fixed_decay(tmp_path):
    cfg = flavour_config("based-1b")
    sd = random_state_dict(Spec(cfg), 0)
    cfg["fixed_decay"] = False
    with pytest.raises(ValueError, match=r"unexpected \['transformer.decay.decay'\]"):
        BasedLM.from_pretrained(rewrite(tmp_path, "based-1b", config=cfg, state=sd))


def _edit(flavour, fn):
    cfg = flavour_config(flavour)
    fn(cfg)
    return cfg


@pytest.mark.parametrize("flavour, edit, message", [
    ("based-360m", lambda c: c.update(my_option=1), r"unsupported field\(s\) \['my_option'\]"),
    ("based-360m", lambda c: c["alt_mixer"].update(foo=2), r"alt_mixer: unsupported field\(s\) \['foo'\]"),
    ("based-360m", lambda c: c["alt_mixer"].update(parallel_implementation="tk"),
     "parallel_implementation = 'tk' is not supported"),
    ("based-360m", lambda c: c.update(rms_norm=False), "rms_norm = False is not supported"),
    ("based-360m", lambda c: c.update(activation_function="gelu"), "activation_function = 'gelu' is not supported"),
    ("based-360m", lambda c: c.update(n_positions=2048), "learned absolute position embeddings"),
    ("based-360m", lambda c: c.update(alt_mixer_2=None), "layer 2 gets full softmax attention"),
    ("based-360m", lambda c: c["alt_mixer_2"].update(_target_="flash_attn.modules.mha.MHA"),
     "_target_ = 'flash_attn.modules.mha.MHA' is not a mixer"),
    ("based-360m", lambda c: c["alt_mixer_2"].update(num_heads=8), "num_heads = 8 differs from n_head = 4"),
    ("based-360m", lambda c: c["alt_mixer"]["feature_map"].update(_target_="x.PosELU"), "_target_ = 'x.PosELU'"),
    ("based-360m", lambda c: c.update(rotary_emb_fraction=0.0), "need an even rotary dim"),
    ("based-360m", lambda c: c.update(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("based-360m", lambda c: c["mixer"].update(kernel_sizes=4), "kernel_sizes = 4 is ignored"),
    ("based-1.3b", lambda c: c["alt_mixer"].update(use_decay_proj=True), "use_decay_proj = True is not supported"),
    ("based-1.3b", lambda c: c["alt_mixer"].update(num_key_value_heads=2), "grouped linear attention"),
    ("based-1.3b", lambda c: c.update(fixed_decay=True), "fixed_decay with based.models.mixers.linear_attn"),
    ("based-1.3b", lambda c: c["alt_mixer"].update(feature_name="performer"), "feature_name = 'performer'"),
])
def test_unsupported_config_is_an_error(flavour, edit, message, tmp_path):
    sd = random_state_dict(Spec(flavour_config(flavour)), 0)
    with pytest.raises(ValueError, match=message):
        BasedLM.from_pretrained(rewrite(tmp_path, flavour, config=_edit(flavour, edit), state=sd))


class _Boom:
    def __reduce__(self):
        return (os.makedirs, (os.path.join(os.environ["BASED_TEST_MARK"], "executed"),))


def test_bin_is_read_with_weights_only(tmp_path, monkeypatch):
    """A pytorch_model.bin that would run code when unpickled is refused, not run."""
    write_checkpoint(tmp_path, "based-360m")
    mark = tmp_path / "mark"
    mark.mkdir()
    monkeypatch.setenv("BASED_TEST_MARK", str(mark))
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["evil"] = _Boom()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        BasedLM.from_pretrained(tmp_path)
    assert not (mark / "executed").exists()
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        BasedLM.from_pretrained(tmp_path)


def test_own_format_with_tied_and_padded_vocabulary(tmp_path):
    """save_pretrained/from_pretrained keep the tied matrix once and the padding rows; the
    reloaded model (ours, as a released checkpoint becomes after save_pretrained) is exact."""
    write_checkpoint(tmp_path / "released", "based-1.3b")
    model = BasedLM.from_pretrained(tmp_path / "released")
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.shape[0] == 50264
    model.save_pretrained(tmp_path / "ours", dtype=torch.float32)
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["tie_embeddings"] is True
    again = BasedLM.from_pretrained(tmp_path / "ours")
    assert again.lm_head.weight is again.embed.weight
    x = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# -- python -m based generate -------------------------------------------------------------------


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "based", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)


def tiny_tokenizer(path):
    """A byte-level BPE (GPT-2's scheme) trained on a few sentences, 300 tokens."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world, the end"] * 20,
                            trainer)
    tok.save(str(path))
    return tok


def test_generate_cli_with_a_tokenizer(tmp_path):
    """A released-layout checkpoint with a 300-token vocabulary and its tokenizer.json: the
    greedy continuation printed equals generate() on the same model, decoded by the tokenizer."""
    from based.nn import generate

    cfg = flavour_config("based-360m")
    cfg["vocab_size"] = 300
    write_checkpoint(tmp_path, "based-360m", config=cfg, state=random_state_dict(Spec(cfg), 3))
    tok = tiny_tokenizer(tmp_path / "tokenizer.json")
    r = run_cli("generate", "--model", str(tmp_path), "--prompt", "the quick", "--max-new-tokens", "12",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    ids = tok.encode("the quick", add_special_tokens=False).ids
    g = generate(BasedLM.from_pretrained(tmp_path), torch.tensor([ids]), 12, temperature=0.0)
    assert r.stdout.startswith("the quick" + tok.decode(g.tokens[0].tolist()) + "\n")
    assert f"prompt tokens    {len(ids)} (tokens)" in r.stdout
    for line in ("prefill ", "decode ", "recurrent state  ", "KV cache ", "tokenizer "):
        assert line in r.stdout, line


def test_generate_cli_bytes_and_errors(tmp_path):
    r = run_cli("generate", "--prompt", "KING:", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr                 # the bundled byte-level model by default
    assert r.stdout.startswith("KING:") and "prompt tokens    5 (bytes)" in r.stdout
    write_checkpoint(tmp_path, "based-360m")           # vocabulary 61, no tokenizer.json
    r = run_cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "holds no tokenizer.json" in r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert r.returncode == 2 and "--model" in r.stderr and "nowhere" in r.stderr
    tiny_tokenizer(tmp_path / "tokenizer.json")        # 300 ids for a 61-token model
    r = run_cli("generate", "--model", str(tmp_path), "--prompt", "the quick brown fox")
    assert r.returncode == 2 and "past the model's vocabulary of 61" in r.stderr
