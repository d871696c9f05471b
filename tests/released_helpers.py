"""Synthetic checkpoints in the layout of the paper's released models, and the original
model's forward pass restated from the math.

Nothing here imports based.nn: the writer produces what ``torch.save(model.state_dict())`` /
the safetensors conversions of ``hazyresearch/based-*`` produce (names, fused tensors,
prefixes, extra entries; facts in based/nn/CHECKPOINTS.md), and ``reference_logits`` reads
those raw tensors and the raw config.json and computes the logits the way the authors' code
(``HazyResearch/based``, ``based/models/gpt.py`` and the mixers) defines them, in plain
PyTorch, in the dtype asked for. The flavours:

* ``based-360m``: current module names, ``fla_parallel`` (eps 1e-6), pytorch_model.bin with
  both names of the tied embedding (what ``torch.save`` of a state dict writes);
* ``based-1b``: ``fixed_decay`` and its ``transformer.decay.decay`` buffer, the default
  ``quadratic`` implementation (eps 1e-12), model.safetensors keeping one name of the tied
  pair (``lm_head.weight``, as the converted repos do);
* ``based-1b-50b``: every name under a ``model.`` prefix plus a Lightning metrics counter,
  model.safetensors;
* ``based-1.3b``: the older module names (``base_conv.BaseConvWithSiLU4`` with ``conv1``,
  ``linear_attn.LinearAttention`` with ``num_key_value_heads``/``train_view``/``feature_name``,
  ``slide_fa2.SlidingsMHA``), a config without ``vocab_size`` or ``layer_norm_epsilon``
  (GPT2Config's 50257 and 1e-5), pytorch_model.bin under ``model.`` with metrics entries;
* ``variants``: not a release; every switch the loader maps (MLP, qkv and out biases,
  grouped kv heads, half-dim interleaved rotary with another base, a convolution bias from
  ``use_cuda``, a 4-tap convolution, untied embeddings, the ``linear`` implementation with
  its own eps, an odd window_size, GatedMlp's default width).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

CONV_NEW = "based.models.mixers.convolution.BaseConv"
CONV_OLD = "based.models.mixers.base_conv.BaseConvWithSiLU4"
LINEAR_NEW = "based.models.mixers.linear_attention.LinearAttention"
LINEAR_OLD = "based.models.mixers.linear_attn.LinearAttention"
WINDOW_NEW = "based.models.mixers.slide_attention.SlidingAttention"
WINDOW_OLD = "based.models.mixers.slide_fa2.SlidingsMHA"
TAYLOR = "based.models.mixers.linear_attention.TaylorExp"

D_MODEL, N_HEAD, N_LAYER = 64, 4, 7
LINEAR_LAYERS, WINDOW_LAYERS = [1, 4], [2, 5]        # every kind present, conv first and last

# GPT2Config.to_dict() fields a dumped config carries beside the model's own
_HF_FIELDS = {
    "architectures": ["GPTLMHeadModel"], "model_type": "gpt2", "transformers_version": "4.38.2",
    "attn_pdrop": 0, "embd_pdrop": 0, "resid_pdrop": 0, "initializer_range": 0.02, "bos_token_id": 50256,
    "eos_token_id": 50256, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True, "use_cache": True,
}


def _new_config(**over):
    cfg = dict(_HF_FIELDS)
    cfg.update({
        "_target_": "based.models.gpt.GPT2MixerConfig", "activation_function": "swiglu",
        "alt_mixer_layers": LINEAR_LAYERS, "alt_mixer_2_layers": WINDOW_LAYERS,
        "mixer": {"_target_": CONV_NEW, "l_max": 2048, "use_bias": True, "expand_proj": 4, "kernel_sizes": 3},
        "alt_mixer": {"_target_": LINEAR_NEW, "l_max": 2048, "feature_map": {"_target_": TAYLOR, "input_dim": 16},
                      "feature_dim": 16, "num_heads": 4, "parallel_implementation": "fla_parallel"},
        "alt_mixer_2": {"_target_": WINDOW_NEW, "window_size": 8, "num_heads": N_HEAD, "causal": True},
        "n_embd": D_MODEL, "special_initializer": True, "n_head": N_HEAD, "n_layer": N_LAYER, "rms_norm": True,
        "fused_mlp": False, "n_positions": 0, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "fused_bias_fc": True,
        "out_proj_bias": False, "qkv_proj_bias": False, "use_flash_attn": True, "residual_in_fp32": True,
        "rotary_emb_fraction": 1, "fused_dropout_add_ln": True, "pad_vocab_size_multiple": 8,
        "reorder_and_upcast_attn": False, "scale_attn_by_inverse_layer_idx": False, "n_inner": 128,
        "layer_norm_epsilon": 1e-5, "vocab_size": 61,
    })
    cfg.update(over)
    return cfg


def flavour_config(name: str) -> dict:
    if name == "based-360m":
        return _new_config()
    if name == "based-1b":
        cfg = _new_config(fixed_decay=True, decay_const=-3, decay_denom=False)
        del cfg["alt_mixer"]["parallel_implementation"]            # the default: quadratic
        cfg["alt_mixer_2"]["window_size"] = 10
        return cfg
    if name == "based-1b-50b":
        return _new_config(fixed_decay=False, decay_const=-3, decay_denom=False)
    if name == "based-1.3b":        # the fields of the repo's 1.3b config (based/utils/hf.py @ ce39e97)
        return {
            "n_embd": D_MODEL, "n_inner": 256, "n_head": N_HEAD, "n_layer": N_LAYER,
            "mlp_fc1_bias": False, "mlp_fc2_bias": False, "out_proj_bias": False, "qkv_proj_bias": False,
            "reorder_and_upcast_attn": False, "scale_attn_by_inverse_layer_idx": False,
            "activation_function": "swiglu", "resid_pdrop": 0.0, "rms_norm": True, "residual_in_fp32": True,
            "pad_vocab_size_multiple": 8, "use_flash_attn": True, "special_initializer": True,
            "rotary_emb_fraction": 1, "max_position_embeddings": 0,
            "alt_mixer_layers": LINEAR_LAYERS, "alt_mixer_2_layers": WINDOW_LAYERS,
            "mixer": {"_target_": CONV_OLD, "expand_proj": 4, "l_max": 2048, "kernel_sizes": [3], "use_bias": True},
            "alt_mixer": {"_target_": LINEAR_OLD, "feature_dim": 16, "feature_name": "taylor_exp", "l_max": 2048,
                          "num_heads": 4, "num_key_value_heads": 4, "train_view": "linear"},
            "alt_mixer_2": {"_target_": WINDOW_OLD, "causal": True, "num_heads": N_HEAD, "window_size": 8},
        }
    if name == "variants":
        cfg = _new_config(mlp_fc1_bias=True, mlp_fc2_bias=True, qkv_proj_bias=True, out_proj_bias=True,
                          n_head_kv=2, rotary_emb_fraction=0.5, rotary_emb_interleaved=True, rotary_emb_base=500.0,
                          tie_word_embeddings=False, n_inner=None, layer_norm_epsilon=1e-6)
        cfg["mixer"] = {"_target_": CONV_NEW, "l_max": 2048, "use_bias": True, "expand_proj": 2, "kernel_size": 4,
                        "use_cuda": True}
        cfg["alt_mixer"] = {"_target_": LINEAR_NEW, "l_max": 2048, "feature_map": {"_target_": TAYLOR, "input_dim": 16},
                            "feature_dim": 16, "num_heads": 2, "head_dim": 24, "eps": 1e-3,
                            "parallel_implementation": "linear"}
        cfg["alt_mixer_2"]["window_size"] = 5
        return cfg
    raise KeyError(name)


FLAVOURS = ("based-360m", "based-1b", "based-1b-50b", "based-1.3b", "variants")
_FILES = {"based-360m": ("bin", "", "both"), "based-1b": ("safetensors", "", "head"),
          "based-1b-50b": ("safetensors", "model.", "both"), "based-1.3b": ("bin", "model.", "both"),
          "variants": ("bin", "", "untied")}


# -- the original model's sizes, read from its config as its code reads them ------------------


class Spec:
    """Everything the reference needs, derived from a raw config dict the way
    based/models/gpt.py and the mixers derive it."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.d = cfg["n_embd"]
        self.n_layer = cfg["n_layer"]
        self.n_head = cfg["n_head"]
        self.kv_heads = cfg.get("n_head_kv") or self.n_head
        self.head_dim = self.d // self.n_head
        vocab = cfg.get("vocab_size", 50257)
        m = cfg.get("pad_vocab_size_multiple", 1)
        self.vocab, self.rows = vocab, math.ceil(vocab / m) * m
        self.norm_eps = cfg.get("layer_norm_epsilon", 1e-5)
        hidden = cfg.get("n_inner") or int(8 * self.d / 3)
        self.hidden = (hidden + 255) // 256 * 256
        self.mlp_bias = cfg.get("mlp_fc1_bias", True)
        self.qkv_bias, self.out_bias = cfg.get("qkv_proj_bias", True), cfg.get("out_proj_bias", True)
        self.rotary_dim = int(cfg.get("rotary_emb_fraction", 0.0) * self.head_dim)
        self.rotary_base = cfg.get("rotary_emb_base", 10000.0)
        self.interleaved = cfg.get("rotary_emb_interleaved", False)
        self.tied = cfg.get("tie_word_embeddings", True)
        alt, alt2 = cfg.get("alt_mixer_layers") or [], cfg.get("alt_mixer_2_layers") or []
        self.mixers = [cfg["alt_mixer_2"] if i in alt2 else cfg["alt_mixer"] if i in alt else cfg["mixer"]
                       for i in range(self.n_layer)]

    @staticmethod
    def kind(mixer: dict) -> str:
        t = mixer["_target_"]
        return "conv" if t in (CONV_NEW, CONV_OLD) else "linear" if t in (LINEAR_NEW, LINEAR_OLD) else "window"

    def conv(self, m):
        expand = m.get("expand_proj", 2)
        kernel = m.get("kernel_size", 3) if m["_target_"] == CONV_NEW else m.get("kernel_sizes", [3])[0]
        path = "conv.conv" if m["_target_"] == CONV_NEW else "conv1.conv"
        return expand * self.d // 2, kernel, path, m.get("use_bias", True), m.get("use_cuda", False)

    def linear(self, m):
        heads, fdim = m.get("num_heads", 16), m.get("feature_dim", 16)
        if m["_target_"] == LINEAR_NEW:
            head_dim = m.get("head_dim") or self.d // heads
            taylor_dim = m["feature_map"]["input_dim"]
            eps = 1e-6 if "fla" in m.get("parallel_implementation", "quadratic") else m.get("eps", 1e-12)
        else:
            head_dim = m.get("head_dim") or self.d // m.get("num_key_value_heads", 16)
            taylor_dim = m.get("scale_dim") or fdim
            eps = m.get("eps", 1e-12)
        return heads, fdim, head_dim, taylor_dim, eps

    def window(self, m):
        return m.get("window_size", 128) // 2          # flash-attn's left window: keys [t - W//2, t]


# -- writing a checkpoint ---------------------------------------------------------------------


def random_state_dict(spec: Spec, seed: int) -> dict:
    """Random weights under the released names: projections N(0, 1/fan_in), norms 1 + N(0, 0.1^2),
    biases N(0, 0.1^2), so every activation is O(1) and attention far from uniform."""
    g = torch.Generator().manual_seed(seed)

    def lin(rows, cols):
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    def vec(n, base=0.0):
        return base + 0.1 * torch.randn(n, generator=g)

    d, sd = spec.d, {}
    sd["transformer.embeddings.word_embeddings.weight"] = torch.randn(spec.rows, d, generator=g)
    for i, m in enumerate(spec.mixers):
        p = f"transformer.layers.{i}."
        kind = spec.kind(m)
        if kind == "conv":
            inner, kernel, path, bias, cuda = spec.conv(m)
            sd[p + "mixer.in_proj.weight"] = lin(2 * inner, d)
            sd[p + "mixer.out_proj.weight"] = lin(d, inner)
            if bias:
                sd[p + "mixer.in_proj.bias"], sd[p + "mixer.out_proj.bias"] = vec(2 * inner), vec(d)
            sd[p + f"mixer.{path}.weight"] = torch.randn(inner, 1, kernel, generator=g) / math.sqrt(kernel)
            if cuda:                                   # causal-conv1d's path gives nn.Conv1d a bias
                sd[p + f"mixer.{path}.bias"] = vec(inner)
        elif kind == "linear":
            heads, fdim, head_dim, _, _ = spec.linear(m)
            sd[p + "mixer.proj_q.weight"] = lin(heads * fdim, d)
            sd[p + "mixer.proj_k.weight"] = lin(heads * fdim, d)
            sd[p + "mixer.proj_v.weight"] = lin(heads * head_dim, d)
            sd[p + "mixer.out_proj.weight"] = lin(d, heads * head_dim)
        else:
            rows = spec.head_dim * (spec.n_head + 2 * spec.kv_heads)
            sd[p + "mixer.Wqkv.weight"] = 2.0 * lin(rows, d)             # sharper softmax
            sd[p + "mixer.out_proj.weight"] = lin(d, d)
            if spec.qkv_bias:
                sd[p + "mixer.Wqkv.bias"] = vec(rows)
            if spec.out_bias:
                sd[p + "mixer.out_proj.bias"] = vec(d)
        sd[p + "mlp.fc1.weight"] = lin(2 * spec.hidden, d)
        sd[p + "mlp.fc2.weight"] = lin(d, spec.hidden)
        if spec.mlp_bias:
            sd[p + "mlp.fc1.bias"], sd[p + "mlp.fc2.bias"] = vec(2 * spec.hidden), vec(d)
        sd[p + "norm1.weight"], sd[p + "norm2.weight"] = vec(d, 1.0), vec(d, 1.0)
    sd["transformer.ln_f.weight"] = vec(d, 1.0)
    if spec.cfg.get("fixed_decay"):
        const = spec.cfg.get("decay_const", -5)
        sd["transformer.decay.decay"] = torch.log(1 - 2 ** (const - torch.arange(spec.n_head, dtype=torch.float)))
    if spec.tied:
        sd["lm_head.weight"] = sd["transformer.embeddings.word_embeddings.weight"]     # one tensor, two names
    else:
        sd["lm_head.weight"] = torch.randn(spec.rows, d, generator=g) / math.sqrt(d)
    return sd


def write_checkpoint(directory, name: str, *, seed: int = 0, config: dict | None = None,
                     state: dict | None = None) -> tuple[dict, dict]:
    """Write flavour ``name`` (config.json + weights in its file format, prefix and extras)
    into ``directory``; returns (config, state dict as written)."""
    cfg = flavour_config(name) if config is None else config
    sd = random_state_dict(Spec(cfg), seed) if state is None else dict(state)
    fmt, prefix, tied = _FILES[name]
    if tied == "head":
        del sd["transformer.embeddings.word_embeddings.weight"]
    sd = {prefix + k: v for k, v in sd.items()}
    if prefix:                                      # Lightning's torchmetrics counters
        sd["train_metrics.num-tokens.count"] = torch.tensor(123456.0)
        sd["val_metrics.num-tokens.count"] = torch.tensor(789.0)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    if fmt == "bin":
        torch.save(sd, os.path.join(directory, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file

        seen, out = {}, {}
        for k, v in sd.items():                     # safetensors stores each storage once
            if v.data_ptr() not in seen:
                seen[v.data_ptr()] = k
                out[k] = v.contiguous()
        save_file(out, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return cfg, sd


# -- the original forward pass, from the math -----------------------------------------------------


def _rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _taylor(x, dim):
    """TaylorExp: [1, x / dim^(1/4), vec(x x^T) / (sqrt(2) sqrt(dim))], the 1 + D + D^2 expansion."""
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / dim ** 0.25, outer / (math.sqrt(2) * math.sqrt(dim))], -1)


def _rotary(x, dim, base, interleaved):
    """flash-attn RotaryEmbedding on the first ``dim`` dims of (B, T, H, D): frequencies
    base^(-2i/dim), pairs (i, i + dim/2) or, interleaved, (2i, 2i + 1); position = t."""
    t = torch.arange(x.shape[1], dtype=x.dtype)
    inv = base ** (-torch.arange(0, dim, 2, dtype=x.dtype) / dim)
    ang = t[:, None] * inv[None, :]                                  # (T, dim/2)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    r, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        a, b = r[..., 0::2], r[..., 1::2]
        r = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    else:
        a, b = r[..., : dim // 2], r[..., dim // 2:]
        r = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    return torch.cat([r, rest], -1)


def _normalize(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if "metrics" in k:
            continue
        out[k[len("model."):] if k.startswith("model.") else k] = v
    return out


def reference_logits(cfg: dict, state: dict, tokens: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Logits ``(B, T, padded vocab)`` of the original model for int tokens ``(B, T)``,
    computed in ``dtype`` on the CPU from the raw config and the raw checkpoint tensors."""
    spec, sd = Spec(cfg), _normalize(state)

    def w(name):
        return sd[name].to(dtype)

    def opt(name):
        return sd[name].to(dtype) if name in sd else None

    emb = sd.get("transformer.embeddings.word_embeddings.weight", sd.get("lm_head.weight")).to(dtype)
    head = emb if spec.tied else w("lm_head.weight")
    x = emb[tokens]
    b, t, d = x.shape
    pos = torch.arange(t)
    for i, m in enumerate(spec.mixers):
        p = f"transformer.layers.{i}."
        h = _rms_norm(x, w(p + "norm1.weight"), spec.norm_eps)
        kind = spec.kind(m)
        if kind == "conv":
            inner, kernel, path, _, _ = spec.conv(m)
            u = F.linear(h, w(p + "mixer.in_proj.weight"), opt(p + "mixer.in_proj.bias"))
            u1, u2 = u[..., :inner], u[..., inner:]
            filt = w(p + f"mixer.{path}.weight")[:, 0, :]               # (C, k)
            y = torch.zeros_like(u1) if opt(p + f"mixer.{path}.bias") is None else \
                opt(p + f"mixer.{path}.bias").expand_as(u1).clone()
            for j in range(kernel):                                     # y_t += w_j u1_{t-(k-1)+j}
                shift = kernel - 1 - j
                if shift < t:
                    y[:, shift:] += filt[:, j] * u1[:, : t - shift]
            y = F.silu(y) * u2
            out = F.linear(y, w(p + "mixer.out_proj.weight"), opt(p + "mixer.out_proj.bias"))
        elif kind == "linear":
            heads, fdim, hd, taylor_dim, eps = spec.linear(m)
            q = _taylor((h @ w(p + "mixer.proj_q.weight").T).view(b, t, heads, fdim), taylor_dim)
            k = _taylor((h @ w(p + "mixer.proj_k.weight").T).view(b, t, heads, fdim), taylor_dim)
            v = (h @ w(p + "mixer.proj_v.weight").T).view(b, t, heads, hd)
            a = torch.einsum("bthf,buhf->bhtu", q, k) * (pos[:, None] >= pos[None, :])
            num = torch.einsum("bhtu,buhd->bthd", a, v)
            den = a.sum(-1).transpose(1, 2)[..., None] + eps           # phi(q_t) . sum_u phi(k_u)
            out = (num / den).reshape(b, t, heads * hd) @ w(p + "mixer.out_proj.weight").T
        else:
            nh, nkv, hd = spec.n_head, spec.kv_heads, spec.head_dim
            qkv = F.linear(h, w(p + "mixer.Wqkv.weight"), opt(p + "mixer.Wqkv.bias"))
            q = qkv[..., : nh * hd].view(b, t, nh, hd)
            k = qkv[..., nh * hd: (nh + nkv) * hd].view(b, t, nkv, hd)
            v = qkv[..., (nh + nkv) * hd:].view(b, t, nkv, hd)
            q = _rotary(q, spec.rotary_dim, spec.rotary_base, spec.interleaved)
            k = _rotary(k, spec.rotary_dim, spec.rotary_base, spec.interleaved)
            group = nh // nkv
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
            s = torch.einsum("bthd,buhd->bhtu", q, k) / math.sqrt(hd)
            left = spec.window(m)
            allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - left)
            s = s.masked_fill(~allowed, float("-inf"))
            o = torch.einsum("bhtu,buhd->bthd", torch.softmax(s, -1), v)
            out = F.linear(o.reshape(b, t, nh * hd), w(p + "mixer.out_proj.weight"), opt(p + "mixer.out_proj.bias"))
        x = x + out
        h = _rms_norm(x, w(p + "norm2.weight"), spec.norm_eps)
        up, gate = F.linear(h, w(p + "mlp.fc1.weight"), opt(p + "mlp.fc1.bias")).chunk(2, -1)
        x = x + F.linear(F.silu(gate) * up, w(p + "mlp.fc2.weight"), opt(p + "mlp.fc2.bias"))
    return _rms_norm(x, w("transformer.ln_f.weight"), spec.norm_eps) @ head.T
