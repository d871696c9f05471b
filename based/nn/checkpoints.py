"""Model directories: our own layout and the released checkpoints of the BASED paper.

``read(directory)`` returns a ``Checkpoint`` (config, tensors) for either layout and
``load_weights(model, checkpoint)`` puts the tensors into a ``BasedLM`` after checking
that the names and shapes match exactly. ``BasedLM.from_pretrained`` calls both.

The released layout (``hazyresearch/based-360m``, ``based-1b``, ``based-1b-50b``, ``based-1.3b``)
is a GPT-2-style ``config.json`` read by the authors' ``GPTLMHeadModel.from_pretrained_hf``
(``HazyResearch/based``, ``based/models/gpt.py``) plus ``pytorch_model.bin`` or
``model.safetensors``. ``released_config`` turns such a config into a ``BasedConfig`` and
``convert_weights`` renames the tensors; the facts both rely on (parameter names, config
fields, conventions, and where each was read) are in based/nn/CHECKPOINTS.md. Every config
field is either mapped, checked to hold the one value we implement, or listed in
``_INERT_TOP``/the mixers' inert sets as having no effect on the model's outputs; anything else
is a ValueError naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

from .config import BasedConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"

# -- the mixer classes of the released configs (hydra ``_target_``) ------------------------

_CONV_NEW = "based.models.mixers.convolution.BaseConv"
_CONV_OLD = "based.models.mixers.base_conv.BaseConvWithSiLU4"
_LINEAR_NEW = "based.models.mixers.linear_attention.LinearAttention"
_LINEAR_OLD = "based.models.mixers.linear_attn.LinearAttention"
_WINDOW_NEW = "based.models.mixers.slide_attention.SlidingAttention"
_WINDOW_OLD = "based.models.mixers.slide_fa2.SlidingsMHA"
_TAYLOR_EXP = "based.models.mixers.linear_attention.TaylorExp"
_KINDS = {_CONV_NEW: "conv", _CONV_OLD: "conv", _LINEAR_NEW: "linear", _LINEAR_OLD: "linear",
          _WINDOW_NEW: "window", _WINDOW_OLD: "window"}

# Top-level fields with no effect on the outputs of a model in eval mode: training-time
# settings (dropout, initialisation), kernel and fusion choices that compute the same
# function, Hugging Face's generic PretrainedConfig fields, and the decay fields (see
# CHECKPOINTS.md: the released linear-attention class never receives the decay).
_INERT_TOP = {
    # training: dropout, initialisation, GPT-2 summary head (absent from GPTLMHeadModel)
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "initializer_range", "special_initializer", "use_weight_init",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    # kernels and fusions computing the same function; fp32 residual (precision only)
    "use_flash_attn", "fused_bias_fc", "fused_dropout_add_ln", "residual_in_fp32", "sequence_parallel",
    "mlp_checkpoint_lvl", "reorder_and_upcast_attn", "use_cache",
    # decay buffer of GPTModel; only fixed_decay is checked (against the mixer class)
    "decay_const", "decay_denom",
    # Hugging Face / hydra metadata and generation defaults
    "_target_", "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "n_ctx",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix",
    "task_specific_params", "problem_type",
}
# top-level fields read below, with GPT2Config's attribute_map aliases
_ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
            "max_position_embeddings": "n_positions"}


@dataclass
class ReleasedLayout:
    """What ``convert_weights`` needs beyond the BasedConfig: per layer, the released module
    path of the short convolution (``conv.conv`` or ``conv1.conv``), and whether the
    checkpoint carries GPTModel's decay buffer."""

    conv_paths: dict = field(default_factory=dict)
    decay_buffer: bool = False


class _Fields:
    """A dict whose reads are recorded, so the fields nobody read can be reported."""

    def __init__(self, data: dict, where: str):
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
        self.data, self.where, self.used = data, where, set()

    def has(self, key):
        return key in self.data

    def get(self, key, default=None):
        self.used.add(key)
        return self.data.get(key, default)

    def use(self, *keys):
        self.used.update(keys)

    def left(self):
        return sorted(set(self.data) - self.used)


def _fail(where: str, message: str):
    raise ValueError(f"{where}: {message}")


def _int(f: _Fields, key: str, default=None, *, minimum: int = 1) -> int:
    value = f.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(f.where, f"{key} must be an int >= {minimum}, got {value!r}")
    return value


def _flag(f: _Fields, key: str, default: bool) -> bool:
    value = f.get(key, default)
    if not isinstance(value, bool):
        _fail(f.where, f"{key} must be true or false, got {value!r}")
    return value


def _require(f: _Fields, key: str, default, allowed, why: str):
    value = f.get(key, default)
    if value not in allowed:
        _fail(f.where, f"{key} = {value!r} is not supported ({why}); supported: "
                       f"{', '.join(repr(a) for a in allowed)}")
    return value


def _reject_unknown(f: _Fields, inert=frozenset()):
    unknown = [k for k in f.left() if k not in inert]
    if unknown:
        _fail(f.where, f"unsupported field(s) {unknown}: based.nn does not implement them, and a field "
                       "we cannot honour is an error rather than silently ignored (based/nn/CHECKPOINTS.md "
                       "lists the fields that are read)")


def is_released_config(data: dict) -> bool:
    """True for a GPT-2-style config of the paper's code, False for a ``BasedConfig``."""
    return isinstance(data, dict) and not ("d_model" in data and "layers" in data) and any(
        k in data for k in ("n_embd", "hidden_size", "n_layer", "num_hidden_layers", "mixer", "alt_mixer",
                            "alt_mixer_layers"))


# -- config ---------------------------------------------------------------------------------


def _layer_list(f: _Fields, key: str, n_layer: int) -> list[int]:
    value = f.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        _fail(f.where, f"{key} must be a list of layer indices, got {value!r}")
    bad = [i for i in value if not 0 <= i < n_layer]
    if bad:
        _fail(f.where, f"{key} names layers {bad} outside [0, n_layer = {n_layer})")
    return value


def _conv_fields(spec: _Fields, target: str, d: int):
    """BaseConv (convolution.py) / BaseConvWithSiLU4 (base_conv.py): kernel, widths, biases."""
    spec.use("_target_", "l_max")
    if target == _CONV_NEW:
        kernel = _int(spec, "kernel_size", 3)
        given = spec.get("kernel_sizes")            # swallowed by BaseConv's **kwargs
        if given is not None and given not in (kernel, [kernel]):
            _fail(spec.where, f"kernel_sizes = {given!r} is ignored by {target} (it reads kernel_size, here "
                              f"{kernel}); refusing a config whose fields disagree")
        path = "conv.conv"
    else:
        sizes = spec.get("kernel_sizes", [3])
        if isinstance(sizes, int) and not isinstance(sizes, bool):
            sizes = [sizes]
        if not isinstance(sizes, list) or not sizes or not all(isinstance(k, int) and k >= 1 for k in sizes):
            _fail(spec.where, f"kernel_sizes must be a list of positive ints, got {sizes!r}")
        if len(sizes) != 1:
            _fail(spec.where, f"kernel_sizes = {sizes}: {target} builds one convolution per entry but uses only "
                              "the first; only a single kernel size is supported")
        kernel = sizes[0]
        given = spec.get("kernel_size")             # swallowed by **kwargs
        if given is not None and given != kernel:
            _fail(spec.where, f"kernel_size = {given!r} is ignored by {target} (it reads kernel_sizes, here "
                              f"{sizes}); refusing a config whose fields disagree")
        spec.use("implicit_long_conv")              # stored, never read by the class
        path = "conv1.conv"
    expand = _int(spec, "expand_proj", 2)
    if expand * d % 2:
        _fail(spec.where, f"expand_proj * n_embd = {expand * d} must be even (in_proj is split in two halves)")
    proj_bias = _flag(spec, "use_bias", True)
    use_cuda = _flag(spec, "use_cuda", False)
    _reject_unknown(spec)
    return dict(conv_kernel=kernel, conv_inner=expand * d // 2, conv_proj_bias=proj_bias), path, use_cuda


def _linear_fields(spec: _Fields, target: str, d: int):
    """LinearAttention (linear_attention.py, or the older linear_attn.py): heads, dims, eps, scale."""
    spec.use("_target_", "l_max")
    feature_dim = _int(spec, "feature_dim", 16)
    heads = _int(spec, "num_heads", 16)
    scale_dim = feature_dim
    if target == _LINEAR_NEW:
        fmap = spec.get("feature_map")
        if fmap is None:
            _fail(spec.where, "feature_map is missing: the class default is the TaylorExp class itself, which "
                              "the original code cannot call; the released configs give "
                              f"{{'_target_': '{_TAYLOR_EXP}', 'input_dim': <feature_dim>}}")
        fm = _Fields(fmap, f"{spec.where}.feature_map")
        _require(fm, "_target_", None, (_TAYLOR_EXP,), "the Taylor feature map is the only one implemented")
        scale_dim = _int(fm, "input_dim")
        _reject_unknown(fm)
        kv_heads = spec.get("num_key_value_heads")  # swallowed by **kwargs
        if kv_heads is not None and kv_heads != heads:
            _fail(spec.where, f"num_key_value_heads = {kv_heads!r} differs from num_heads = {heads}: {target} "
                              "ignores it; refusing a config whose fields disagree")
        head_dim = spec.get("head_dim")
        head_dim = d // heads if head_dim is None else head_dim
        impl = _require(spec, "parallel_implementation", "quadratic", ("quadratic", "linear", "fla_parallel",
                                                                      "fla_chunk"),
                        "'tk' replaces the normaliser with a per-head RMSNorm")
        eps = spec.get("eps", 1e-12)
        # the FLA kernels normalise with their own eps, and recurrent_forward switches to it too
        eps = 1e-6 if "fla" in impl else eps
    else:
        _require(spec, "feature_name", "taylor_exp", ("taylor_exp",), "the Taylor feature map is the only one "
                                                                     "implemented")
        kv_heads = _int(spec, "num_key_value_heads", 16)
        if kv_heads != heads:
            _fail(spec.where, f"num_key_value_heads = {kv_heads} != num_heads = {heads}: grouped linear attention "
                              "is not implemented (and proj_k of that class is sized for num_heads)")
        head_dim = spec.get("head_dim")
        head_dim = d // kv_heads if head_dim is None else head_dim
        _require(spec, "train_view", "linear", ("linear", "quadratic"), "both compute the normalised Taylor "
                                                                         "attention with eps")
        eps = spec.get("eps", 1e-12)
        sd = spec.get("scale_dim")
        if sd is not None:
            scale_dim = sd
        for key in ("use_act", "use_rotary_apply", "use_proj_g", "use_output_gating", "use_decay_proj",
                    "initial_conv"):
            _require(spec, key, False, (False,), "that variant of the layer is not implemented")
        # stored but never read, initialisation only, or only read by variants refused above
        spec.use("mem_save", "c0", "c1", "c2", "fa_rotary", "init_weights", "linear_attn_init", "rope_theta",
                 "expand_rotary", "attention_dropout", "use_decay_proj_init_1", "attn_fp32", "use_exp_combo",
                 "use_positive", "feature_expanded_dim")
    if not isinstance(head_dim, int) or head_dim < 1:
        _fail(spec.where, f"head_dim must be a positive int, got {head_dim!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        _fail(spec.where, f"eps must be a positive number, got {eps!r}")
    if not isinstance(scale_dim, int) or scale_dim < 1:
        _fail(spec.where, f"the Taylor map's dimension (input_dim / scale_dim) must be a positive int, "
                          f"got {scale_dim!r}")
    _reject_unknown(spec)
    scale = None if scale_dim == feature_dim else 1.0 / math.sqrt(scale_dim)
    return dict(linear_heads=heads, linear_feature_dim=feature_dim, linear_head_dim=head_dim,
                linear_eps=float(eps), linear_scale=scale)


def _window_fields(spec: _Fields, target: str, n_head: int):
    """SlidingAttention / SlidingsMHA: the window. Heads, biases, rotary and softmax scale are
    the model's (sliding_window_additions overwrites them in the mixer's dict)."""
    spec.use("_target_", "causal", "dropout", "softmax_scale", "layer_idx", "use_flash_attn", "fused_bias_fc",
             "checkpointing", "qkv_proj_bias", "out_proj_bias", "rotary_emb_dim", "rotary_emb_base",
             "rotary_emb_scale_base", "rotary_emb_interleaved", "num_heads_kv")
    heads = spec.get("num_heads")
    if heads is not None and heads != n_head:
        _fail(spec.where, f"num_heads = {heads!r} differs from n_head = {n_head}: the original code replaces it "
                          "with n_head; refusing a config whose fields disagree")
    window_size = spec.get("window_size", 128)
    if window_size is None or not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 0:
        _fail(spec.where, f"window_size must be an int >= 0, got {window_size!r}")
    _require(spec, "cross_attn", False, (False,), "the BASED layers are self-attention")
    _require(spec, "return_residual", False, (False,), "the model's blocks take one output")
    if target == _WINDOW_OLD:
        spec.use("dwconv", "do_update", "batch_size")     # stored, never read by SlidingsMHA
    _reject_unknown(spec)
    # flash-attn window_size = (window_size // 2, 0): window_size // 2 previous keys plus self
    return dict(window=window_size // 2 + 1)


def released_config(data: dict, weight_names=(), where: str = CONFIG_NAME):
    """Map a released GPT-2-style ``config.json`` (a dict) to ``(BasedConfig, ReleasedLayout)``.

    ``weight_names`` (the checkpoint's tensor names after ``normalize_names``) settle the one
    thing the config cannot: whether a BaseConv with ``use_cuda: true`` was trained with the
    causal-conv1d package (whose path gives the convolution a bias). Raises ValueError naming
    the first unsupported field or value.
    """
    data = dict(data)
    for alias, name in _ALIASES.items():
        if alias in data:
            if name in data and name != "n_positions" and data[name] != data[alias]:
                _fail(where, f"{alias} = {data[alias]!r} and {name} = {data[name]!r} disagree")
            # GPT2Config sets the alias after n_positions, so max_position_embeddings wins
            data[name] = data.pop(alias)
    f = _Fields(data, where)
    d = _int(f, "n_embd")
    n_layer = _int(f, "n_layer")
    n_head = _int(f, "n_head")
    if d % n_head:
        _fail(where, f"n_embd = {d} must be divisible by n_head = {n_head}")
    head_dim = f.get("head_dim")
    if head_dim is not None and head_dim != d // n_head:
        _fail(where, f"head_dim = {head_dim!r} != n_embd // n_head = {d // n_head}: the sliding-window layer "
                     "sizes its heads by n_embd // n_head while rotary and the softmax scale would use head_dim")
    vocab = _int(f, "vocab_size", 50257)                       # GPT2Config defaults
    eps = f.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        _fail(where, f"layer_norm_epsilon must be a positive number, got {eps!r}")
    pad = _int(f, "pad_vocab_size_multiple", 1)
    positions = f.get("n_positions", 1024)
    if positions != 0:
        _fail(where, f"max_position_embeddings / n_positions = {positions!r}: learned absolute position "
                     "embeddings are not implemented (the BASED checkpoints set max_position_embeddings 0)")
    _require(f, "activation_function", "gelu_new", ("swiglu",), "the MLP is SwiGLU")
    _require(f, "mlp_type", "base", ("base",), "the fused fc1 = [up; gate] GatedMlp is the one implemented")
    f.use("ff_mult")                                           # read only by mlp_type 'alt'
    for key in ("fused_mlp", "fused_dense_sqrelu_dense", "parallel_block", "lm_head_bias", "attn_dwconv"):
        _require(f, key, False, (False,), "that variant is not implemented")
    _require(f, "rms_norm", False, (True,), "the norms are RMSNorm; LayerNorm is not implemented")
    _require(f, "prenorm", True, (True,), "blocks are pre-norm")
    _require(f, "word_embed_proj_dim", None, (None,), "no projection between embedding and model width")
    _require(f, "scale_attn_weights", True, (True,), "the window softmax scale is 1/sqrt(head_dim)")
    _require(f, "scale_attn_by_inverse_layer_idx", False, (False,), "the window softmax scale is 1/sqrt(head_dim)")
    _require(f, "rotary_emb_scale_base", None, (None,), "xPos scaling is not implemented")
    tie = _flag(f, "tie_word_embeddings", True)
    fc1_bias, fc2_bias = _flag(f, "mlp_fc1_bias", True), _flag(f, "mlp_fc2_bias", True)
    if fc1_bias != fc2_bias:
        _fail(where, f"mlp_fc1_bias = {fc1_bias} and mlp_fc2_bias = {fc2_bias}: only both or neither is supported")
    qkv_bias, out_bias = _flag(f, "qkv_proj_bias", True), _flag(f, "out_proj_bias", True)
    kv_heads = f.get("n_head_kv")
    kv_heads = n_head if kv_heads is None else kv_heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or n_head % kv_heads:
        _fail(where, f"n_head_kv = {kv_heads!r} must divide n_head = {n_head}")
    fraction = f.get("rotary_emb_fraction", 0.0)
    rotary_dim = int(fraction * (d // n_head)) if isinstance(fraction, (int, float)) else None
    interleaved = _flag(f, "rotary_emb_interleaved", False)
    base = f.get("rotary_emb_base", 10000.0)
    fixed_decay = _flag(f, "fixed_decay", False)
    n_inner = f.get("n_inner")
    hidden = int(8 * d / 3) if n_inner is None else n_inner     # GatedMlp's default
    if not isinstance(hidden, int) or hidden < 1:
        _fail(where, f"n_inner must be a positive int or null, got {n_inner!r}")
    hidden = -(-hidden // 256) * 256                           # GatedMlp rounds up to multiple_of = 256

    # which mixer each layer gets: create_mixer_cls checks alt_mixer_2_layers first
    alt = _layer_list(f, "alt_mixer_layers", n_layer)
    alt2 = _layer_list(f, "alt_mixer_2_layers", n_layer)
    if f.has("alt_2_mixer_layers"):             # the spelling of the repo's Feb-2024 hard-coded 1.3b config
        old = _layer_list(f, "alt_2_mixer_layers", n_layer)
        if f.has("alt_mixer_2_layers") and old != alt2:
            _fail(where, f"alt_2_mixer_layers {old} and alt_mixer_2_layers {alt2} disagree")
        alt2 = old
    specs = {tag: f.get(tag) for tag in ("mixer", "alt_mixer", "alt_mixer_2")}
    tags = []
    for i in range(n_layer):
        tag = "alt_mixer_2" if i in alt2 else "alt_mixer" if i in alt else "mixer"
        if specs[tag] is None:
            _fail(where, f"layer {i} gets full softmax attention (no '{tag}' given); only the BASED mixers "
                         f"({', '.join(sorted(_KINDS))}) are implemented")
        tags.append(tag)

    fields, kinds, layout = {}, [], ReleasedLayout()
    parsed = {}
    for tag in sorted(set(tags)):
        spec = _Fields(specs[tag], f"{where}: {tag}")
        target = spec.data.get("_target_")
        if target not in _KINDS:
            _fail(spec.where, f"_target_ = {target!r} is not a mixer based.nn implements; supported: "
                              f"{', '.join(sorted(_KINDS))}")
        kind = _KINDS[target]
        if kind == "conv":
            values, path, use_cuda = _conv_fields(spec, target, d)
            parsed[tag] = (kind, values, path, use_cuda)
        elif kind == "linear":
            if fixed_decay and target == _LINEAR_OLD:
                _fail(where, f"fixed_decay with {target}: that class applies GPTModel's decay (and refuses it "
                             "in its linear train_view); the decay is not implemented")
            parsed[tag] = (kind, _linear_fields(spec, target, d), None, False)
        else:
            parsed[tag] = (kind, _window_fields(spec, target, n_head), None, False)
    conv_cuda = False
    for i, tag in enumerate(tags):
        kind, values, path, use_cuda = parsed[tag]
        kinds.append(kind)
        for key, value in values.items():
            if fields.get(key, value) != value:
                _fail(where, f"two {kind} mixers of this config differ in {key} ({fields[key]!r} vs {value!r}); "
                             "based.nn gives all layers of one kind the same settings")
            fields[key] = value
        if kind == "conv":
            layout.conv_paths[i] = path
            conv_cuda = conv_cuda or use_cuda
    _reject_unknown(f, _INERT_TOP)

    if "window" in kinds and (rotary_dim is None or rotary_dim < 2 or rotary_dim % 2):
        _fail(where, f"rotary_emb_fraction = {fraction!r} gives rotary_emb_dim {rotary_dim} for head dim "
                     f"{d // n_head}: the window layers need an even rotary dim >= 2 (the checkpoints use 1)")
    if "conv" in kinds:
        # nn.Conv1d gets a bias only on the causal-conv1d path (use_cuda with the package installed)
        names = set(weight_names)
        with_bias = [i for i, p in layout.conv_paths.items() if f"transformer.layers.{i}.mixer.{p}.bias" in names]
        fields["conv_bias"] = conv_cuda and bool(with_bias)
    layout.decay_buffer = fixed_decay
    config = BasedConfig(
        vocab_size=vocab, pad_vocab_size_multiple=pad, tie_embeddings=tie, d_model=d, layers=kinds,
        mlp_hidden=hidden, mlp_bias=fc1_bias, norm_eps=float(eps), dropout=0.0,
        window_heads=n_head, window_kv_heads=kv_heads, window_head_dim=d // n_head,
        window_qkv_bias=qkv_bias, window_out_bias=out_bias, rotary_base=float(base),
        rotary_dim=None if "window" not in kinds or rotary_dim == d // n_head else rotary_dim,
        rotary_interleaved=interleaved,
        **{k: v for k, v in fields.items()})
    return config, layout


# -- weights ----------------------------------------------------------------------------------


def normalize_names(raw: dict, where: str) -> dict:
    """What ``from_pretrained_hf`` does before ``load_state_dict``: strip a leading ``model.``
    (Lightning's module prefix, present in some checkpoints) and drop the entries whose name
    contains ``metrics`` (Lightning's torchmetrics counters). Any other non-tensor entry is an
    error."""
    import torch

    out = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            _fail(where, f"entry {name!r} is not named by a string")
        if "metrics" in name:
            continue
        key = re.sub(r"^model\.", "", name)
        if not isinstance(value, torch.Tensor):
            _fail(where, f"entry {name!r} is a {type(value).__name__}, not a tensor")
        if key in out:
            _fail(where, f"{key!r} appears twice (with and without the 'model.' prefix)")
        out[key] = value
    return out


def released_names(config: BasedConfig, layout: ReleasedLayout) -> list[tuple[str, list[str]]]:
    """The released checkpoint's tensors, in order, each with the ``BasedLM`` parameters whose
    rows it stacks: ``mlp.fc1`` is [up; gate] (GatedMlp's ``y, gate = fc1(x).chunk(2)``, then
    ``silu(gate) * y``), the window's ``Wqkv`` is [q heads; k heads; v heads]. The tied
    embedding is listed once, as ``transformer.embeddings.word_embeddings.weight``."""
    pairs = [("transformer.embeddings.word_embeddings.weight", ["embed.weight"])]
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", ["lm_head.weight"]))
    pairs.append(("transformer.ln_f.weight", ["norm.weight"]))
    if layout.decay_buffer:
        pairs.append(("transformer.decay.decay", []))
    parts = ["weight"] + (["bias"] if config.mlp_bias else [])
    for i, kind in enumerate(config.layers):
        src, dst = f"transformer.layers.{i}.", f"blocks.{i}."
        m, o = src + "mixer.", dst + "mixer."
        pairs += [(src + "norm1.weight", [dst + "mixer_norm.weight"]),
                  (src + "norm2.weight", [dst + "mlp_norm.weight"])]
        for p in parts:
            pairs += [(src + f"mlp.fc1.{p}", [dst + f"mlp.up_proj.{p}", dst + f"mlp.gate_proj.{p}"]),
                      (src + f"mlp.fc2.{p}", [dst + f"mlp.down_proj.{p}"])]
        if kind == "conv":
            for p in ["weight"] + (["bias"] if config.conv_proj_bias else []):
                pairs += [(m + f"in_proj.{p}", [o + f"in_proj.{p}"]), (m + f"out_proj.{p}", [o + f"out_proj.{p}"])]
            for p in ["weight"] + (["bias"] if config.conv_bias else []):
                pairs.append((m + f"{layout.conv_paths[i]}.{p}", [o + f"conv.{p}"]))
        elif kind == "linear":
            pairs += [(m + f"{a}.weight", [o + f"{b}.weight"])
                      for a, b in (("proj_q", "q_proj"), ("proj_k", "k_proj"), ("proj_v", "v_proj"),
                                   ("out_proj", "out_proj"))]
        else:
            for p in ["weight"] + (["bias"] if config.window_qkv_bias else []):
                pairs.append((m + f"Wqkv.{p}", [o + f"q_proj.{p}", o + f"k_proj.{p}", o + f"v_proj.{p}"]))
            for p in ["weight"] + (["bias"] if config.window_out_bias else []):
                pairs.append((m + f"out_proj.{p}", [o + f"out_proj.{p}"]))
    return pairs


def convert_weights(model, weights: dict, layout: ReleasedLayout, where: str) -> dict:
    """Released tensors (names after ``normalize_names``) as a state dict of ``model``.

    Checks, in the released names, that every tensor ``released_names`` lists is there, that
    nothing else is, and that each has the shape the config implies; raises ValueError naming
    the missing, unexpected or mis-shaped tensors. With tied embeddings either name of the
    shared matrix may be present (the safetensors conversions keep one), or both if equal.
    """
    import torch

    config = model.config
    ours = {name: tuple(t.shape) for name, t in model.weights().items()}
    w = dict(weights)
    if config.tie_embeddings and "lm_head.weight" in w:
        head = w.pop("lm_head.weight")
        emb = w.setdefault("transformer.embeddings.word_embeddings.weight", head)
        if emb is not head and not (emb.shape == head.shape and torch.equal(emb, head)):
            _fail(where, "tie_word_embeddings is true but lm_head.weight and "
                         "transformer.embeddings.word_embeddings.weight differ")
    pairs = released_names(config, layout)
    names = [r for r, _ in pairs]
    missing = [r for r in names if r not in w]
    unexpected = sorted(set(w) - set(names))
    if missing or unexpected:
        _fail(where, f"weights do not match config.json: missing {missing}, unexpected {unexpected}")
    state = {}
    for rname, dsts in pairs:
        t = w[rname]
        if not dsts:                                 # a buffer the model does not use
            continue
        rows = [ours[d][0] for d in dsts]
        want = (sum(rows),) + ours[dsts[0]][1:]
        if tuple(t.shape) != want:
            _fail(where, f"{rname} has shape {tuple(t.shape)}, config.json implies {want}")
        for dst, part in zip(dsts, torch.split(t, rows, dim=0)):
            state[dst] = part
    return state


def _read_weights(directory: str):
    st, bin_ = os.path.join(directory, SAFETENSORS_NAME), os.path.join(directory, BIN_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st, device="cpu"), SAFETENSORS_NAME
    if os.path.isfile(bin_):
        import torch

        raw = torch.load(bin_, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            _fail(bin_, f"holds a {type(raw).__name__}, not a state dict")
        return raw, BIN_NAME
    raise FileNotFoundError(f"{directory}: no {SAFETENSORS_NAME} or {BIN_NAME}")


@dataclass
class Checkpoint:
    """A model directory as read: its config, its tensors, and for the released layout the
    ``ReleasedLayout`` (None for ours) and the weight file's path (for messages)."""

    config: BasedConfig
    weights: dict
    layout: ReleasedLayout | None
    where: str


def read(directory) -> Checkpoint:
    """Read ``config.json`` and the weights of a model directory in our layout or the released
    one. FileNotFoundError for a missing file; ValueError for a config we cannot honour."""
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not is_released_config(data):
        from safetensors.torch import load_file

        config = BasedConfig.from_dict(data)
        st = os.path.join(directory, SAFETENSORS_NAME)
        if not os.path.isfile(st):
            raise FileNotFoundError(f"{directory}: no {SAFETENSORS_NAME}")
        return Checkpoint(config, load_file(st, device="cpu"), None, directory)
    raw, name = _read_weights(directory)
    where = os.path.join(directory, name)
    weights = normalize_names(raw, where)
    config, layout = released_config(data, weights.keys(), path)
    return Checkpoint(config, weights, layout, where)


def load_weights(model, ckpt: Checkpoint) -> None:
    """Copy the checkpoint's tensors into ``model`` (built from ``ckpt.config``) after checking
    that names and shapes match exactly: ValueError listing the missing and unexpected names
    (in the file's own naming), or the first mis-shaped tensor."""
    if ckpt.layout is not None:
        weights = convert_weights(model, ckpt.weights, ckpt.layout, ckpt.where)
    else:
        weights = ckpt.weights
        expected = model.weights()
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{ckpt.where}: weights do not match config.json: missing {missing}, "
                             f"unexpected {unexpected}")
        for name, t in weights.items():
            if tuple(t.shape) != tuple(expected[name].shape):
                raise ValueError(f"{ckpt.where}: {name} has shape {tuple(t.shape)}, config.json implies "
                                 f"{tuple(expected[name].shape)}")
    model.load_state_dict(weights, strict=not model.config.tie_embeddings)
