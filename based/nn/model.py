"""BasedLM: a BASED language model, its files (ours and the released checkpoints'), and held-out loss."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attention import LinearAttention, SlidingWindowAttention
from .cache import BasedCache
from .config import BasedConfig
from .layers import BaseConv, RMSNorm, SwiGLU

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def make_mixer(kind: str, config: BasedConfig) -> nn.Module:
    """The sequence mixer of one block: ``"conv"``, ``"linear"`` or ``"window"``."""
    c = config
    if kind == "conv":
        return BaseConv(c.d_model, c.conv_inner, c.conv_kernel, proj_bias=c.conv_proj_bias, conv_bias=c.conv_bias)
    if kind == "linear":
        return LinearAttention(c.d_model, c.linear_heads, c.linear_feature_dim, c.linear_head_dim, c.linear_eps,
                               c.linear_scale)
    if kind == "window":
        return SlidingWindowAttention(c.d_model, c.window_heads, c.window_kv_heads, c.window_head_dim, c.window,
                                      c.rotary_base, rotary_dim=c.rotary_dim, rotary_interleaved=c.rotary_interleaved,
                                      qkv_bias=c.window_qkv_bias, out_bias=c.window_out_bias)
    raise ValueError(f"unknown layer kind {kind!r}")


class BasedBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + SwiGLU(norm(x))``.

    Shapes: ``(B, T, d_model) -> (B, T, d_model)``. Dropout (training only) is applied to
    each branch's output before the residual add.
    """

    def __init__(self, kind: str, config: BasedConfig):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = make_mixer(kind, config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.mixer_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def prefill(self, x: torch.Tensor, state) -> torch.Tensor:
        """Inference: ``(B, T, d_model)`` continuing the mixer's ``state`` (updated in place)."""
        x = x + self.mixer.prefill(self.mixer_norm(x), state)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x: torch.Tensor, state, buffer=None) -> torch.Tensor:
        """Inference: one token per sequence, ``(B, d_model) -> (B, d_model)``; ``buffer`` (a
        ``DecodeBuffer``) is handed to the mixer's ``step`` for its kernel's output."""
        x = x + self.mixer.step(self.mixer_norm(x), state, buffer)
        return x + self.mlp(self.mlp_norm(x))


class BasedLM(nn.Module):
    """BASED language model (Arora et al., ICML 2024, Sec. 4 and 6).

    Token embedding -> ``BasedBlock`` per entry of ``config.layers`` -> RMSNorm -> LM head.
    No absolute positions: the window layers carry rotary embeddings, the linear-attention
    and conv layers are position-free (paper.md Sec. 1.7). By default the LM head is untied
    from the embedding (for the byte-level models' 256-token vocabulary it costs
    ``256 * d_model`` parameters); ``config.tie_embeddings`` shares one matrix, as the
    released GPT-2-vocabulary checkpoints do (``from_pretrained`` reads those too).

    Shapes: ``forward``: int tokens ``(B, T)`` -> logits ``(B, T, padded_vocab_size)`` (float32
    outside autocast; ``padded_vocab_size == vocab_size`` unless the config pads the
    vocabulary, as the released checkpoints do: the padding rows' logits are returned like
    the original model's, and ``generate`` never samples them). Weights are initialised
    N(0, 0.02), output projections of every branch scaled by ``1 / sqrt(2 * n_layers)``
    (GPT-2's residual scaling); biases zero, norms one.
    """

    def __init__(self, config: BasedConfig):
        super().__init__()
        self.config = config
        rows = config.padded_vocab_size
        self.embed = nn.Embedding(rows, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(BasedBlock(kind, config) for kind in config.layers)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, rows, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * len(self.blocks))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("out_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                module.reset_parameters()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_dropout(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    # -- inference: prefill a prompt, then decode token by token through the kernels ----

    def new_cache(self, batch: int) -> "BasedCache":
        """Empty recurrent state for ``batch`` sequences: one state per layer (a
        ``based.LinearAttentionState``, a ``based.SlidingWindowCache`` or a ``BaseConvState``),
        fixed in size whatever the sequence length."""
        return BasedCache([block.mixer.new_state(batch) for block in self.blocks])

    def check_tokens(self, tokens, ndim: int, cache: "BasedCache | None" = None) -> None:
        """Raise a clear TypeError/ValueError unless ``tokens`` is an integer tensor of ``ndim``
        dims, with ids in ``[0, vocab_size)`` and a batch that matches ``cache``."""
        shape = "(B, T)" if ndim == 2 else "(B,)"
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be an integer torch tensor of shape {shape}, e.g. "
                            f"torch.tensor([list(b'text')]); got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must have an integer dtype (token ids), got {tokens.dtype}")
        if tokens.ndim != ndim or (ndim == 2 and tokens.shape[1] < 1):
            raise ValueError(f"tokens must have shape {shape}{' with T >= 1' if ndim == 2 else ''}, "
                             f"got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})"
                             f"{' (bytes for this byte-level model)' if self.config.vocab_size == 256 else ''}, "
                             f"got values in [{int(tokens.min())}, {int(tokens.max())}]")
        if cache is not None and cache.batch != tokens.shape[0]:
            raise ValueError(f"the cache holds {cache.batch} sequences but tokens have batch {tokens.shape[0]}")

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: "BasedCache | None" = None):
        """Run int tokens ``(B, T)`` through the model, continuing ``cache`` (a new one if None).

        Returns ``(logits, cache)``: logits ``(B, T, vocab_size)`` for every position; the
        cache is updated in place. The attention layers run based's chunked prefill kernels.
        """
        self.check_tokens(tokens, 2, cache)
        if cache is None:
            cache = self.new_cache(tokens.shape[0])
        x = self.embed(tokens)
        for block, state in zip(self.blocks, cache.states):
            x = block.prefill(x, state)
        return self.lm_head(self.norm(x)), cache

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: "BasedCache") -> torch.Tensor:
        """Decode one token per sequence: int tokens ``(B,)`` -> logits ``(B, vocab_size)``;
        the cache is updated in place (based's decode kernels: one pass over each state).
        The kernels write their outputs into ``cache.buffers`` (allocated at the first step,
        reused after), so a step allocates no attention output."""
        self.check_tokens(tokens, 1, cache)
        x = self.embed(tokens)
        for block, state, buffer in zip(self.blocks, cache.states, cache.buffers):
            x = block.step(x, state, buffer)
        return self.lm_head(self.norm(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- files ------------------------------------------------------------------------

    def weights(self) -> dict:
        """The state dict as written to a file: every tensor once (with tied embeddings the
        LM head is the embedding, so ``lm_head.weight`` is left out)."""
        state = self.state_dict()
        if self.config.tie_embeddings:
            del state["lm_head.weight"]
        return state

    def save_pretrained(self, directory, *, dtype: torch.dtype = torch.float16) -> None:
        """Write ``config.json`` and ``model.safetensors`` (weights cast to ``dtype``) into
        ``directory`` (created if missing)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.save(os.path.join(directory, CONFIG_NAME))
        weights = {name: t.detach().to("cpu", dtype).contiguous() for name, t in self.weights().items()}
        save_file(weights, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory, *, device="cpu", dtype: torch.dtype = torch.float32) -> "BasedLM":
        """Load a model directory, in eval mode, weights cast to ``dtype``.

        Two layouts are read:

        * ours, written by ``save_pretrained`` (``config.json`` holding a ``BasedConfig``,
          ``model.safetensors``);
        * the released checkpoints of the paper (``hazyresearch/based-360m``, ``based-1b``,
          ``based-1b-50b``, ``based-1.3b``): a GPT-2-style ``config.json`` (``n_embd``,
          ``alt_mixer_layers``, ``mixer``...) with ``model.safetensors`` or
          ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``). Their parameter
          names, config fields and conventions are mapped as based/nn/CHECKPOINTS.md records
          (``based.nn.checkpoints``).

        Raises FileNotFoundError if a file is missing; ValueError if the config has a field or
        value this model does not implement (naming it), or if the weights do not match the
        config (naming the missing, unexpected or mis-shaped tensors).
        """
        from . import checkpoints

        ckpt = checkpoints.read(directory)
        model = cls(ckpt.config)
        checkpoints.load_weights(model, ckpt)
        return model.to(device=device, dtype=dtype).eval()


def bundled_model_path(name: str = "shakespeare") -> str:
    """Directory of a model shipped inside the package (``based/models/<name>``)."""
    path = os.path.join(BUNDLED_DIR, name)
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        available = sorted(d for d in os.listdir(BUNDLED_DIR) if os.path.isdir(os.path.join(BUNDLED_DIR, d)))
        raise ValueError(f"no bundled model {name!r}; available: {available}")
    return path


def load_bundled(name: str = "shakespeare", *, device="cpu", dtype: torch.dtype = torch.float32) -> BasedLM:
    """The byte-level BASED model shipped with the package (trained on tinyshakespeare; see
    based/models/README.md), in eval mode on ``device`` with weights cast to ``dtype``."""
    return BasedLM.from_pretrained(bundled_model_path(name), device=device, dtype=dtype)


def _as_byte_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.detach().to("cpu", torch.uint8).reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).copy())
    return torch.from_numpy(np.array(data, dtype=np.uint8).reshape(-1))        # a copy: may be read-only


@torch.no_grad()
def evaluate_loss(model: nn.Module, data, seq_len: int, *, batch_size: int = 32, max_bytes: int | None = None,
                  device=None, autocast_dtype: torch.dtype | None = None) -> float:
    """Mean next-byte cross-entropy of ``model`` on ``data``, in nats per byte.

    ``data`` (bytes, a uint8 array or tensor; the first ``max_bytes`` of it when given) is cut
    into consecutive non-overlapping windows of ``seq_len`` inputs, each predicting the next
    ``seq_len`` bytes from nothing but its own window (the last window may be shorter). Every
    byte except the first is predicted exactly once, so the result is deterministic and
    independent of ``batch_size``.

    Args:
        model: maps int64 tokens ``(B, T)`` to logits ``(B, T, V)`` (a ``BasedLM``).
        seq_len: context per window, >= 1.
        device: where to run (default: the model's parameters' device).
        autocast_dtype: e.g. ``torch.bfloat16`` to evaluate under autocast; None for none.

    Raises ValueError if fewer than 2 bytes are given or seq_len < 1. The model's training
    mode is restored afterwards.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tokens = _as_byte_tensor(data)
    if max_bytes is not None:
        tokens = tokens[: int(max_bytes)]
    if tokens.numel() < 2:
        raise ValueError(f"need at least 2 bytes to evaluate, got {tokens.numel()}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    n = tokens.numel() - 1                      # bytes predicted
    full = n // seq_len
    windows = [(s, seq_len) for s in range(0, full * seq_len, seq_len)]
    if n % seq_len:
        windows.append((full * seq_len, n % seq_len))
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            length = group[0][1]
            if any(w[1] != length for w in group):      # the short tail window runs alone
                total += _window_loss(model, tokens, group[:-1], device, autocast_dtype)
                group = group[-1:]
            total += _window_loss(model, tokens, group, device, autocast_dtype)
    finally:
        model.train(was_training)
    return total / n


def _window_loss(model, tokens, windows, device, autocast_dtype) -> float:
    # windows: [(start, length)] of equal length -> summed cross-entropy (nats)
    if not windows:
        return 0.0
    length = windows[0][1]
    starts = torch.tensor([s for s, _ in windows])
    idx = starts[:, None] + torch.arange(length + 1)                  # (B, L + 1)
    batch = tokens[idx].to(device=device, dtype=torch.int64)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        logits = model(batch[:, :-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))       # at least float32
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return float(loss)
