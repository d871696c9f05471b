"""Sampling text from a BasedLM: prefill the prompt once, then one decode step per token,
both through based's kernels and the model's fixed-size recurrent state (BasedCache)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .cache import BasedCache


@dataclass
class Generation:
    """What ``generate`` returns.

    tokens: ``(B, max_new_tokens)`` int64, the sampled continuation of each prompt.
    cache: the model's state after the last sampled token was read (ready to continue).
    prefill_tokens, prefill_seconds: the prompt's length per sequence and its prefill time.
    decode_tokens, decode_seconds: tokens produced by decode steps (per sequence) and their time.
    """

    tokens: torch.Tensor
    cache: BasedCache
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per sequence from logits ``(B, V)``: greedy argmax when ``temperature == 0``,
    else a draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
    tokens (all when None). Returns ``(B,)`` int64. Raises ValueError for a negative
    temperature or top_k < 1."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, cache: BasedCache | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> Generation:
    """Continue each prompt by ``max_new_tokens`` sampled tokens (greedy when ``temperature == 0``).

    The prompt ``(B, T)`` (int tokens, T >= 1) is prefilled in one call (chunked kernels);
    every further token costs one ``model.step`` (decode kernels reading each layer's state
    once). ``seed`` makes sampling reproducible (a CPU ``torch.Generator``); ``on_token`` is
    called with each new ``(B,)`` token tensor as soon as it is sampled (for streaming).
    A given ``cache`` is continued (e.g. a multi-turn session); otherwise a new one is made.
    The result's ``tokens`` hold only the continuation, not the prompt.
    Raises TypeError for a prompt that is not an integer tensor; ValueError for an empty
    prompt, token ids outside the vocabulary, a cache of another batch size, or a negative
    ``max_new_tokens``.
    """
    model.check_tokens(prompt, 2, cache)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = next(model.parameters()).device
    prompt = prompt.to(device=device, dtype=torch.int64)
    out = torch.empty(prompt.shape[0], max_new_tokens, dtype=torch.int64, device=device)

    start = time.perf_counter()
    logits, cache = model.prefill(prompt, cache)
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    logits = logits[:, -1]
    vocab = model.config.vocab_size              # padding rows of the LM head are never sampled
    for i in range(max_new_tokens):
        token = sample_next(logits[:, :vocab], temperature=temperature, top_k=top_k, generator=generator)
        out[:, i] = token
        if on_token is not None:
            on_token(token)
        if i + 1 < max_new_tokens:
            logits = model.step(token, cache)
    decode_seconds = time.perf_counter() - start
    return Generation(out, cache, prompt.shape[1], prefill_seconds, max(0, max_new_tokens - 1), decode_seconds)
