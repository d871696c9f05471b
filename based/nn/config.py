"""BasedConfig: every hyperparameter of a BasedLM, round-tripping through JSON.

This module does not import torch, so a config can be read and checked anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

LAYER_KINDS = ("conv", "linear", "window")


def _paper_pattern() -> list[str]:
    # the 360M model's period of five (paper.md Sec. 4): conv, linear, window, conv, conv
    return ["conv", "linear", "window", "conv", "conv"]


@dataclass
class BasedConfig:
    """Hyperparameters of a BASED language model (Arora et al., ICML 2024, Sec. 4).

    ``layers`` lists the sequence mixer of each block, in order: ``"conv"`` (BaseConv, gated
    short convolution), ``"linear"`` (Taylor linear attention, SPEC 1.1) or ``"window"``
    (sliding-window softmax attention with rotary embeddings, SPEC 1.2). Every block is
    ``x + mixer(norm(x))`` then ``x + SwiGLU(norm(x))``.

    Fields left as ``None`` are filled from ``d_model`` when the config is made, so a saved
    config.json always spells every size out:

    * ``mlp_hidden``: SwiGLU hidden width, default ``2 * d_model`` (the paper's n_inner);
    * ``linear_head_dim``: Dv of linear attention, default ``d_model // linear_heads``;
    * ``window_kv_heads``: key/value heads of window attention, default ``window_heads`` (no GQA);
    * ``window_head_dim``: head_dim of window attention, default ``d_model // window_heads``;
    * ``conv_inner``: width of BaseConv's convolved and gating branches, default
      ``2 * d_model`` (the paper's in_proj d -> 4d, split in two);
    * ``rotary_dim``: dims of each window head that rotary rotates, default all of them.

    The defaults are those of the byte-level models this package trains (256-token vocabulary,
    untied LM head, no MLP or attention biases, BaseConv with biases). The other switches exist
    for the released checkpoints (``BasedLM.from_pretrained`` on a ``hazyresearch/based-*``
    directory, see based/nn/CHECKPOINTS.md): ``pad_vocab_size_multiple`` (embedding and LM-head
    rows are ``vocab_size`` rounded up to it, ``padded_vocab_size``; ids past ``vocab_size``
    are never sampled), ``tie_embeddings`` (the LM head is the embedding matrix), ``mlp_bias``,
    ``window_qkv_bias``/``window_out_bias``, ``conv_bias`` (the depthwise filter's bias) and
    ``conv_proj_bias`` (in_proj/out_proj), ``linear_scale`` (s = scale * q.k, default
    ``1/sqrt(linear_feature_dim)``) and ``rotary_interleaved`` (pairs (2i, 2i+1) instead of
    (i, i + R/2)).

    Raises ValueError (from ``__post_init__``) for an unknown layer kind, a non-positive
    size, an odd window head_dim or rotary_dim (rotary pairs dimensions), a rotary_dim past
    the head dim, a non-bool switch, a non-positive linear_scale, or window_kv_heads not
    dividing window_heads.
    """

    vocab_size: int = 256
    pad_vocab_size_multiple: int = 1
    tie_embeddings: bool = False
    d_model: int = 256
    layers: list[str] = field(default_factory=_paper_pattern)
    mlp_hidden: int | None = None
    mlp_bias: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    # Taylor linear attention (SPEC 1.1): q, k -> heads x feature_dim, v -> heads x head_dim
    linear_heads: int = 4
    linear_feature_dim: int = 16
    linear_head_dim: int | None = None
    linear_eps: float = 1e-6
    linear_scale: float | None = None
    # sliding-window attention (SPEC 1.2): window = keys attended, self included
    window: int = 64
    window_heads: int = 4
    window_kv_heads: int | None = None
    window_head_dim: int | None = None
    window_qkv_bias: bool = False
    window_out_bias: bool = False
    rotary_base: float = 10000.0
    rotary_dim: int | None = None
    rotary_interleaved: bool = False
    # BaseConv (paper.md Sec. 1.8)
    conv_kernel: int = 3
    conv_inner: int | None = None
    conv_bias: bool = True
    conv_proj_bias: bool = True

    def __post_init__(self):
        self.layers = list(self.layers)
        d = self.d_model
        if self.mlp_hidden is None:
            self.mlp_hidden = 2 * d
        if self.linear_head_dim is None:
            self.linear_head_dim = d // self.linear_heads if self.linear_heads > 0 else 0
        if self.window_kv_heads is None:
            self.window_kv_heads = self.window_heads
        if self.window_head_dim is None:
            self.window_head_dim = d // self.window_heads if self.window_heads > 0 else 0
        if self.conv_inner is None:
            self.conv_inner = 2 * d
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("vocab_size", "pad_vocab_size_multiple", "d_model", "mlp_hidden", "linear_heads", "linear_feature_dim",
                     "linear_head_dim", "window", "window_heads", "window_kv_heads", "window_head_dim",
                     "conv_kernel", "conv_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BasedConfig.{name} must be a positive int, got {value!r}")
        if not self.layers:
            raise ValueError("BasedConfig.layers must name at least one layer")
        bad = [kind for kind in self.layers if kind not in LAYER_KINDS]
        if bad:
            raise ValueError(f"BasedConfig.layers: unknown layer kind {bad[0]!r}; expected one of {LAYER_KINDS}")
        if self.window_head_dim % 2:
            raise ValueError(f"BasedConfig.window_head_dim must be even (rotary rotates pairs), "
                             f"got {self.window_head_dim}")
        if self.window_heads % self.window_kv_heads:
            raise ValueError(f"BasedConfig.window_kv_heads ({self.window_kv_heads}) must divide "
                             f"window_heads ({self.window_heads})")
        if self.rotary_dim is not None and (not isinstance(self.rotary_dim, int) or isinstance(self.rotary_dim, bool)
                                            or self.rotary_dim < 2 or self.rotary_dim % 2
                                            or self.rotary_dim > self.window_head_dim):
            raise ValueError(f"BasedConfig.rotary_dim must be None or an even int in [2, window_head_dim = "
                             f"{self.window_head_dim}], got {self.rotary_dim!r}")
        for name in ("tie_embeddings", "mlp_bias", "window_qkv_bias", "window_out_bias", "rotary_interleaved",
                     "conv_bias", "conv_proj_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BasedConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.linear_scale is not None and not (isinstance(self.linear_scale, (int, float))
                                                  and not isinstance(self.linear_scale, bool)
                                                  and 0 < self.linear_scale < float("inf")):
            raise ValueError(f"BasedConfig.linear_scale must be None or a positive finite number, "
                             f"got {self.linear_scale!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BasedConfig.dropout must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "linear_eps", "rotary_base"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BasedConfig.{name} must be positive, got {getattr(self, name)!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: ``vocab_size`` rounded up to a multiple of
        ``pad_vocab_size_multiple`` (the released checkpoints pad GPT-2's 50257 to 50264)."""
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    # -- JSON -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BasedConfig":
        """Build from a dict such as ``to_dict()`` gives. Raises ValueError on unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BasedConfig: unknown keys {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "BasedConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "BasedConfig":
        with open(os.fspath(path), encoding="utf-8") as f:
            return cls.from_json(f.read())
