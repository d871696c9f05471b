"""Generation and prefill throughput of BASED on the GPU, against a Transformer++ of the
same size in the same run (issue 13; the paper's Table 1 and Figure 4).

    python benchmarks/bench_generation.py              # the whole run, ~2-4 minutes on an H200
    python benchmarks/bench_generation.py --check      # graph-captured decode == eager (exit 1 if not)
    python benchmarks/bench_generation.py --quick      # tiny shapes on any device (CPU smoke test)

Models (random bf16 weights; what is timed does not depend on the values):

* ``based-1.3b``: the paper's 1.3B shape (36 layers, d_model 1792; Taylor linear attention in
  layers 1,6,11,16,21,27,33 with 16 heads, feature dim 16, value dim 112; sliding window in
  layers 2,7,12,17,22,28,34, 16 heads of 112, ``--window-size`` 128 i.e. 64 previous keys + self;
  BaseConv (expand 4, kernel 3) elsewhere; SwiGLU 3584; GPT-2 vocabulary padded to 50264, tied),
  and ``based-360m`` (27 layers, d 1024, value/head dim 64, SwiGLU 2048). Built as
  ``based.nn.BasedLM``; prompts are prefilled by ``BasedLM.prefill`` (based's kernels).
* ``transformer-1.3b`` / ``transformer-360m``: Transformer++ (the paper's baseline config,
  HazyResearch/based ``reference/attn-1b.yaml``: 36 layers, d 1680, 24 heads of 70, rotary on
  half of each head, SwiGLU 4608, RMSNorm; 360m: 24 x 1024, 16 heads of 64, SwiGLU 2816).
  Prefill with SDPA (flash) and a causal mask, decode from a static KV cache under CUDA
  graphs, one graph per 256-position bucket of the cache (each step reads the cache only up to
  its bucket, masked). Head dim 70 is not a multiple of 8, which SDPA's flash, cuDNN and
  memory-efficient kernels require for bf16: the ``attention_head_dim`` section times every
  backend at 70 and with q, k, v zero-padded to 72 and 80 (exact: the padded dims add 0 to
  q.k and give 0 outputs that are sliced off, the scale stays 1/sqrt(70)) and the models use
  the fastest exact choice, recorded in the JSON.
* ``based-torch-*``: the same BASED model decoded by a pure-PyTorch step (Taylor feature map,
  state update and read-out, a ring buffer and SDPA for the window) on the same states, also
  inside a CUDA graph; prefill by the model's differentiable training path (quadratic).

Generation (paper Table 1): batch 128, a 16-token prompt, then 2048 greedy tokens, each decode
step (embedding to argmax, the argmax fed back as the next input) one CUDA graph replay with
static buffers: the states and caches are the model's own tensors, based's decode ops are
called with ``out=`` into preallocated buffers and existing states, so nothing allocates in the
graph. BASED's step costs the same at every position, so the step time is measured over 128
replays (and, for the headline, over all 2048 tokens too); tokens/ms = batch / step time. The
Transformer's step grows with the context: each 256-position bucket's graph is timed and the
2048 steps are summed bucket by bucket. Batch sweep 1..256 (Transformer at the mean context,
prompt + 1024). The step's memory-traffic floor (weights once, linear-attention states read and
written, window caches read, KV cache read) is divided by the copy bandwidth measured in the
same run (``torch.Tensor.copy_`` of 2 GiB, bytes read + written per second).

Prefill (Table 1, Figure 4): batch 2, T = 1k..32k, tokens/ms and the peak of memory allocated
through torch during the call above what was allocated before it (weights excluded; the BASED
states, the Transformer's KV cache and all activations included). Logits only for the last
position. State bytes per sequence of BASED (fixed) against the Transformer's KV cache.

Output: JSON (``--out``, default benchmarks/results/generation.json), written after every
section, with any section's failure recorded under ``errors`` and the run going on; plots
(``--plots``, default benchmarks/plots/) by benchmarks/plot_generation.py; a Markdown table
on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import based  # noqa: E402
from based.nn import BasedConfig, BasedLM  # noqa: E402
from common import git_commit  # noqa: E402

PROMPT = 16
GEN_TOKENS = 2048
BUCKET = 256

# -- shapes ---------------------------------------------------------------------------------------


def based_config(name: str, window_size: int = 128, quick: bool = False) -> BasedConfig:
    if quick:
        return BasedConfig(vocab_size=300, pad_vocab_size_multiple=8, tie_embeddings=True, d_model=64,
                           layers=["conv", "linear", "window", "conv"], mlp_hidden=128, linear_heads=4,
                           linear_feature_dim=16, linear_head_dim=16, window=window_size // 2 + 1, window_heads=4,
                           conv_inner=128, linear_eps=1e-12, conv_bias=False, norm_eps=1e-5)
    if name == "1.3b":
        d, n, lin, win, dv, hidden = 1792, 36, [1, 6, 11, 16, 21, 27, 33], [2, 7, 12, 17, 22, 28, 34], 112, 3584
    else:
        d, n, lin, win, dv, hidden = 1024, 27, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22], 64, 2048
    layers = ["window" if i in win else "linear" if i in lin else "conv" for i in range(n)]
    # the released checkpoints' conventions (based/nn/CHECKPOINTS.md): no conv bias, eps 1e-12
    return BasedConfig(vocab_size=50257, pad_vocab_size_multiple=8, tie_embeddings=True, d_model=d, layers=layers,
                       mlp_hidden=hidden, linear_heads=16, linear_feature_dim=16, linear_head_dim=dv,
                       window=window_size // 2 + 1, window_heads=16, window_head_dim=d // 16, conv_inner=2 * d,
                       conv_kernel=3, conv_bias=False, linear_eps=1e-12, norm_eps=1e-5)


def transformer_shape(name: str, quick: bool = False) -> dict:
    if quick:
        return dict(d=60, layers=3, heads=4, head_dim=15, hidden=128, rotary_dim=8, vocab=304)
    if name == "1.3b":     # reference/attn-1b.yaml: GatedMlp int(8 * 1680 / 3) -> multiple of 256
        return dict(d=1680, layers=36, heads=24, head_dim=70, hidden=4608, rotary_dim=36, vocab=50272)
    return dict(d=1024, layers=24, heads=16, head_dim=64, hidden=2816, rotary_dim=32, vocab=50272)


# -- timing ---------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, n: int) -> float:
    """Milliseconds per call of fn over n back-to-back calls (CUDA events on the GPU)."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


class Step:
    """One decode step as a callable: a CUDA graph replay when captured, else the eager
    function. ``out`` is the step's static output (the logits)."""

    def __init__(self, fn, device, graph: bool):
        self.fn, self.device, self.graph, self.out = fn, device, None, None
        if graph and device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):           # warm-up: cuBLAS workspaces, lazy inits
                fn()
                fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            sync(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn()
            sync(device)

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.out
        self.out = self.fn()
        return self.out


# -- BASED decode step ----------------------------------------------------------------------------


def _rms(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _swiglu(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def _rotate(x, cos, sin):
    """Rotate-half rotary on the first 2 * cos.shape[-1] dims of (B, H, D), in float32."""
    r = cos.shape[-1]
    xf = x.float()
    a, b, rest = xf[..., :r], xf[..., r:2 * r], xf[..., 2 * r:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin, rest), dim=-1).to(x.dtype)


def rotary_tables(rotary_dim: int, base: float, positions: int, device):
    inv = base ** (-torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    ang = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv
    return ang.cos(), ang.sin()                                   # (positions, rotary_dim / 2)


def feature_map_indices(dk: int, scale: float, device):
    iu, ju = torch.triu_indices(dk, dk, device=device)
    return iu, ju, torch.where(iu == ju, scale / math.sqrt(2.0), scale).float()


def compact_feature_map(x, scale, indices):
    """based.taylor_feature_map in PyTorch: [1, sqrt(s) x, s/sqrt(2) x_i^2, s x_i x_j (i<j)]
    (SPEC 1.1's compact order), ``indices`` from ``feature_map_indices``."""
    iu, ju, coef = indices
    return torch.cat((torch.ones_like(x[..., :1]), math.sqrt(scale) * x, coef * x[..., iu] * x[..., ju]), dim=-1)


class BasedDecoder:
    """Greedy decoding of a ``BasedLM`` one token per sequence per step, written for CUDA-graph
    capture: fused projections (q|k|v, gate|up), static token/position buffers, the model's own
    state objects, based's decode ops with ``out=`` (``kernels=True``) or a pure-PyTorch
    restatement of them on the same tensors (``kernels=False``). ``parts`` keeps only some of
    the step's work, for the time breakdown: {'gemm', 'mixer', 'other'}."""

    def __init__(self, model: BasedLM, batch: int, *, kernels: bool = True, parts=("gemm", "mixer", "other"),
                 max_positions: int = PROMPT + GEN_TOKENS + 64):
        c = model.config
        self.model, self.c, self.batch, self.kernels, self.parts = model, c, batch, kernels, set(parts)
        w = model.embed.weight
        self.device, self.dtype = w.device, w.dtype
        self.tok = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.cos, self.sin = rotary_tables(c.rotary_dim or c.window_head_dim, c.rotary_base, max_positions, self.device)
        self.layers = []
        with torch.no_grad():
            for block in model.blocks:
                m, L = block.mixer, {"kind": block.kind}
                L["n1"], L["n2"] = block.mixer_norm.weight, block.mlp_norm.weight
                L["gu"] = torch.cat((block.mlp.gate_proj.weight, block.mlp.up_proj.weight))
                L["down"] = block.mlp.down_proj.weight
                if block.kind == "conv":
                    L["in"], L["in_b"], L["out"], L["out_b"] = m.in_proj.weight, m.in_proj.bias, m.out_proj.weight, \
                        m.out_proj.bias
                    L["filt"], L["filt_b"], L["inner"] = m.conv.weight[:, 0, :], m.conv.bias, m.inner
                elif block.kind == "linear":
                    L["qkv"] = torch.cat((m.q_proj.weight, m.k_proj.weight, m.v_proj.weight))
                    L["out"], L["mod"] = m.out_proj.weight, m
                    L["o"] = torch.empty(batch, m.heads, m.head_dim, device=self.device, dtype=self.dtype)
                    L["fmap"] = feature_map_indices(m.feature_dim, m.scale, self.device)
                else:
                    L["qkv"] = torch.cat((m.q_proj.weight, m.k_proj.weight, m.v_proj.weight))
                    L["out"], L["mod"] = m.out_proj.weight, m
                    L["o"] = torch.empty(batch, m.heads, m.head_dim, device=self.device, dtype=self.dtype)
                    L["slots"] = torch.arange(m.window, device=self.device)
                self.layers.append(L)
        self.cache = None

    @torch.no_grad()
    def prefill(self, prompt):
        """Prefill through ``BasedLM.prefill`` (based's kernels); the first token is its argmax."""
        logits, self.cache = self.model.prefill(prompt)
        self.tok.copy_(logits[:, -1, : self.c.vocab_size].argmax(-1))
        self.pos.fill_(prompt.shape[1])
        return logits[:, -1]

    # the pure-PyTorch mixers, on the based state objects' own tensors
    def _linear_torch(self, m, state, q, k, v, fmap):
        b, h = q.shape[:2]
        pq = compact_feature_map(q.float(), m.scale, fmap)                # (B, H, F)
        pk = compact_feature_map(k.float(), m.scale, fmap)
        kv, ksum = state.kv, state.ksum                                   # (B, H, F, Dv), (B, H, F)
        kv.view(b * h, *kv.shape[2:]).baddbmm_(pk.reshape(b * h, -1, 1), v.float().reshape(b * h, 1, -1))
        ksum.add_(pk)
        num = torch.bmm(pq.reshape(b * h, 1, -1), kv.view(b * h, *kv.shape[2:])).view(b, h, -1)
        den = (pq * ksum).sum(-1, keepdim=True)
        state.tokens.add_(1)
        return (num / (den + m.eps)).to(v.dtype)

    def _window_torch(self, m, cache, q, k, v, slots):
        slot = (self.pos[:1] % m.window)                                 # all sequences at one position
        cache.k.index_copy_(2, slot, k[:, :, None])
        cache.v.index_copy_(2, slot, v[:, :, None])
        valid = (slots <= self.pos[:1]) | (self.pos[:1] >= m.window)     # slots written so far
        g = m.heads // m.kv_heads
        kk = cache.k.repeat_interleave(g, 1) if g > 1 else cache.k
        vv = cache.v.repeat_interleave(g, 1) if g > 1 else cache.v
        o = F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=valid[None, None, None, :],
                                           scale=m.scale)
        cache.tokens.add_(1)
        return o[:, :, 0]

    @torch.no_grad()
    def step(self):
        """One decode step from ``self.tok`` at ``self.pos``: returns the logits (B, padded V)
        and writes the argmax into ``self.tok``, advancing ``self.pos``."""
        c, parts, b = self.c, self.parts, self.batch
        gemm, mixer, other = "gemm" in parts, "mixer" in parts, "other" in parts
        x = F.embedding(self.tok, self.model.embed.weight)
        cos, sin = self.cos[self.pos][:, None], self.sin[self.pos][:, None]    # (B, 1, R/2)
        for L, state in zip(self.layers, self.cache.states):
            h = _rms(x, L["n1"], c.norm_eps) if other else x
            kind = L["kind"]
            if kind == "conv":
                u = F.linear(h, L["in"], L["in_b"]) if gemm else h.repeat(1, 2 * L["inner"] // h.shape[-1])
                u1, u2 = u[:, : L["inner"]], u[:, L["inner"]:]
                if other:
                    st = state.inputs                                        # (B, C, k - 1)
                    taps = torch.cat((st, u1[:, :, None]), dim=-1)
                    y = (taps * L["filt"]).sum(-1)
                    if L["filt_b"] is not None:
                        y = y + L["filt_b"]
                    st.copy_(taps[..., 1:])
                    y = F.silu(y) * u2
                else:
                    y = u1
                o = F.linear(y, L["out"], L["out_b"]) if gemm else y[:, : x.shape[-1]]
            else:
                m = L["mod"]
                qkv = F.linear(h, L["qkv"]) if gemm else None
                if kind == "linear":
                    nq = m.heads * m.feature_dim
                    if qkv is None:
                        qkv = h.new_zeros(b, 2 * nq + m.heads * m.head_dim)
                    q = qkv[:, :nq].view(b, m.heads, m.feature_dim)
                    k = qkv[:, nq:2 * nq].view(b, m.heads, m.feature_dim)
                    v = qkv[:, 2 * nq:].view(b, m.heads, m.head_dim)
                    if not mixer:
                        o = L["o"]
                    elif self.kernels:
                        o = based.linear_attention_decode(q, k, v, state, eps=m.eps, out=L["o"])
                    else:
                        o = self._linear_torch(m, state, q, k, v, L["fmap"])
                else:
                    nq, nkv = m.heads * m.head_dim, m.kv_heads * m.head_dim
                    if qkv is None:
                        qkv = h.new_zeros(b, nq + 2 * nkv)
                    q = qkv[:, :nq].view(b, m.heads, m.head_dim)
                    k = qkv[:, nq:nq + nkv].view(b, m.kv_heads, m.head_dim)
                    v = qkv[:, nq + nkv:].view(b, m.kv_heads, m.head_dim)
                    if other:
                        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
                    if not mixer:
                        o = L["o"]
                    elif self.kernels:
                        o = based.sliding_window_decode(q, k, v, state, out=L["o"])
                    else:
                        o = self._window_torch(m, state, q, k, v, L["slots"])
                o = o.reshape(b, -1)
                o = F.linear(o, L["out"]) if gemm else o[:, : x.shape[-1]]
            x = x + o if other else o
            h = _rms(x, L["n2"], c.norm_eps) if other else x
            if gemm:
                a = F.linear(h, L["gu"])
                a = _swiglu(a) if other else a[:, : c.mlp_hidden]
                o = F.linear(a, L["down"])
            else:
                o = h
            x = x + o if other else o
        h = _rms(x, self.model.norm.weight, c.norm_eps) if other else x
        logits = F.linear(h, self.model.lm_head.weight) if gemm else h
        if other:
            self.tok.copy_(logits[:, : c.vocab_size].argmax(-1))
        self.pos.add_(1)
        return logits

    def floor_bytes(self) -> dict:
        """Bytes one step must move at least: every weight matrix once (the tied embedding once,
        by the LM head), the linear-attention states read and written, the window caches read
        (and one slot written), the conv states read and written."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        lin = win = conv = 0
        for s in self.cache.states:
            if isinstance(s, based.LinearAttentionState):
                lin += 2 * (s.kv.numel() * s.kv.element_size() + s.ksum.numel() * s.ksum.element_size())
            elif isinstance(s, based.SlidingWindowCache):
                slot = s.k.numel() // s.window * s.k.element_size()
                win += s.k.numel() * s.k.element_size() + s.v.numel() * s.v.element_size() + 2 * slot
            else:
                conv += 2 * s.inputs.numel() * s.inputs.element_size()
        return {"weights": weights, "linear_states": lin, "window_caches": win, "conv_states": conv,
                "total": weights + lin + win + conv}


# -- Transformer++ -----------------------------------------------------------------------------


class Transformer:
    """Transformer++ (pre-norm RMSNorm, fused qkv, rotary on ``rotary_dim`` dims, SwiGLU, tied
    embedding) with random bf16 weights: SDPA prefill and a static-KV-cache decode step."""

    def __init__(self, shape: dict, device, dtype, *, pad_to: int, max_positions: int):
        self.s, self.device, self.dtype = shape, device, dtype
        d, hd = shape["d"], shape["head_dim"]
        self.pad_to = max(pad_to, hd)
        g = torch.Generator(device=device).manual_seed(0)

        def lin(rows, cols):
            return (torch.randn(rows, cols, device=device, generator=g) / math.sqrt(cols)).to(dtype)

        self.embed = lin(shape["vocab"], d)
        self.layers = [dict(n1=torch.ones(d, device=device, dtype=dtype), n2=torch.ones(d, device=device, dtype=dtype),
                            qkv=lin(3 * shape["heads"] * hd, d), out=lin(d, shape["heads"] * hd),
                            gu=lin(2 * shape["hidden"], d), down=lin(d, shape["hidden"]))
                       for _ in range(shape["layers"])]
        self.norm = torch.ones(d, device=device, dtype=dtype)
        self.cos, self.sin = rotary_tables(shape["rotary_dim"], 10000.0, max_positions, device)
        self.k_cache = self.v_cache = None

    def parameters_bytes(self) -> int:
        n = self.embed.numel() + self.norm.numel() + sum(t.numel() for L in self.layers for t in L.values())
        return n * torch.finfo(self.dtype).bits // 8

    def allocate(self, batch: int, length: int):
        shape = (self.s["layers"], batch, self.s["heads"], length, self.pad_to)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)

    def _heads(self, qkv, b, t):
        hd, h = self.s["head_dim"], self.s["heads"]
        q, k, v = qkv.view(b, t, 3, h, hd).unbind(2)                     # (B, T, H, hd)
        return q, k, v

    def _pad(self, x):
        return F.pad(x, (0, self.pad_to - x.shape[-1])) if self.pad_to > x.shape[-1] else x

    @torch.no_grad()
    def prefill(self, tokens, *, backend=None):
        """Causal prefill writing the KV cache (allocated for T if needed); last-position logits."""
        b, t = tokens.shape
        if self.k_cache is None or self.k_cache.shape[1] != b or self.k_cache.shape[3] < t:
            self.allocate(b, t)
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[:t][None, :, None], self.sin[:t][None, :, None]
        hd = self.s["head_dim"]
        for i, L in enumerate(self.layers):
            h = _rms(x, L["n1"], 1e-5)
            q, k, v = self._heads(F.linear(h, L["qkv"]), b, t)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            q, k, v = (self._pad(z).transpose(1, 2) for z in (q, k, v))   # (B, H, T, Dp)
            self.k_cache[i, :, :, :t] = k
            self.v_cache[i, :, :, :t] = v
            o = _sdpa(q, k, v, backend, is_causal=True, scale=1 / math.sqrt(hd))
            o = o[..., :hd].transpose(1, 2).reshape(b, t, -1)
            x = x + F.linear(o, L["out"])
            x = x + F.linear(_swiglu(F.linear(_rms(x, L["n2"], 1e-5), L["gu"])), L["down"])
        return F.linear(_rms(x[:, -1], self.norm, 1e-5), self.embed)

    def decoder(self, batch: int, length: int, backend=None):
        """A decode step over a cache read up to ``length`` (a bucket), masked to the positions
        written; static ``tok``/``pos`` buffers; argmax fed back."""
        tok = torch.zeros(batch, dtype=torch.int64, device=self.device)
        pos = torch.zeros(batch, dtype=torch.int64, device=self.device)
        slots = torch.arange(length, device=self.device)
        hd, h = self.s["head_dim"], self.s["heads"]

        @torch.no_grad()
        def step():
            x = F.embedding(tok, self.embed)
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
            mask = (slots <= pos[:1])[None, None, None, :]
            p = pos[:1]
            for i, L in enumerate(self.layers):
                hh = _rms(x, L["n1"], 1e-5)
                q, k, v = F.linear(hh, L["qkv"]).view(batch, 3, h, hd).unbind(1)
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
                kc, vc = self.k_cache[i], self.v_cache[i]
                kc.index_copy_(2, p, self._pad(k)[:, :, None])
                vc.index_copy_(2, p, self._pad(v)[:, :, None])
                o = _sdpa(self._pad(q)[:, :, None], kc[:, :, :length], vc[:, :, :length], backend, attn_mask=mask,
                          scale=1 / math.sqrt(hd))
                x = x + F.linear(o[:, :, 0, :hd].reshape(batch, -1), L["out"])
                x = x + F.linear(_swiglu(F.linear(_rms(x, L["n2"], 1e-5), L["gu"])), L["down"])
            logits = F.linear(_rms(x, self.norm, 1e-5), self.embed)
            tok.copy_(logits[:, :50257 if self.embed.shape[0] > 50257 else self.embed.shape[0]].argmax(-1))
            pos.add_(1)
            return logits

        return step, tok, pos

    def floor_bytes(self, batch: int, length: int) -> dict:
        kv = 2 * self.s["layers"] * batch * self.s["heads"] * length * self.pad_to * torch.finfo(self.dtype).bits // 8
        return {"weights": self.parameters_bytes(), "kv_cache_read": kv, "total": self.parameters_bytes() + kv}


def _sdpa(q, k, v, backend, **kw):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, **kw)


# -- the run ----------------------------------------------------------------------------------------


class Run:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.graphs = self.device.type == "cuda" and not args.no_graphs
        self.out = Path(args.out)
        self.t0 = time.perf_counter()
        self.results = {"meta": self.meta(), "errors": {}}
        self.models = {}

    def meta(self) -> dict:
        info = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__, "based": based.build_info(),
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "quick": self.quick,
                "graphs": self.graphs, "prompt": PROMPT, "generated": self.gen_tokens(), "bucket": BUCKET,
                "window_size": self.args.window_size}
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            info["gpu"] = {"name": p.name, "memory_bytes": p.total_memory, "sms": p.multi_processor_count,
                           "capability": f"{p.major}.{p.minor}"}
        else:
            info["cpu"] = platform.processor() or platform.machine()
        return info

    def gen_tokens(self) -> int:
        return 8 if self.quick else GEN_TOKENS

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.results["meta"]["seconds"] = round(self.elapsed(), 1)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out)

    def section(self, name, fn):
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        if self.elapsed() > self.args.max_seconds:
            self.results["errors"][name] = f"skipped: {self.elapsed():.0f} s spent, past --max-seconds"
            print(f"    {name} skipped (time budget)", flush=True)
            self.save()
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a failed section is recorded and the run goes on
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
            print(f"    {name} failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            self.free()
            self.save()

    def free(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # models, built on the device directly (weights initialised there)
    def based_model(self, size: str, dtype=None) -> BasedLM:
        dtype = dtype or self.dtype
        key = f"based-{size}-{dtype}"
        if key not in self.models:
            torch.manual_seed(0)
            with torch.device(self.device):
                model = BasedLM(based_config(size, self.args.window_size, self.quick))
            self.models[key] = model.to(dtype).eval()
        return self.models[key]

    def drop_models(self):
        self.models.clear()
        self.free()

    def prompt(self, batch: int, vocab: int):
        g = torch.Generator().manual_seed(batch)
        return torch.randint(0, vocab, (batch, PROMPT), generator=g).to(self.device)

    def sizes(self):
        return ["1.3b"] if self.quick else ["1.3b", "360m"]

    # -- sections ------------------------------------------------------------------------

    def copy_bandwidth(self):
        n = (1 << 20) if self.quick else (1 << 30)                   # bf16 elements: 2 GiB
        a = torch.empty(n, device=self.device, dtype=self.dtype).normal_()
        b = torch.empty_like(a)
        ms = min(time_ms(lambda: b.copy_(a), self.device, 5 if self.quick else 20) for _ in range(3))
        nbytes = a.numel() * a.element_size()
        self.bandwidth = 2 * nbytes / (ms * 1e-3)
        self.results["copy_bandwidth"] = {"bytes_per_s": self.bandwidth, "buffer_bytes": nbytes, "ms": ms,
                                          "method": "torch copy_ between two buffers; bytes read + written"}

    def attention_head_dim(self):
        """SDPA at head dim 70 (the 1.3B Transformer++): every backend, as is and zero-padded."""
        out = {}
        self.results["attention_head_dim"] = out
        if self.device.type != "cuda":
            out["skipped"] = "SDPA backends are a CUDA question"
            self.tpp_backend = {"pad_to": 0, "prefill": None, "decode": None}
            return
        from torch.nn.attention import SDPBackend

        backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH, "default": None}
        b, h, t, hd = 2, 24, 4096, 70
        g = torch.Generator(device=self.device).manual_seed(0)
        q, k, v = (torch.randn(b, h, t, hd, device=self.device, dtype=self.dtype, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        bq = 128
        dq = torch.randn(bq, h, 1, hd, device=self.device, dtype=self.dtype, generator=g)
        L = 2048
        dk, dv = (torch.randn(bq, h, L, hd, device=self.device, dtype=self.dtype, generator=g) for _ in range(2))
        mask = (torch.arange(L, device=self.device) <= 1500)[None, None, None]
        dref = F.scaled_dot_product_attention(dq.float(), dk.float(), dv.float(), attn_mask=mask)
        scale = 1 / math.sqrt(hd)
        for pad in (70, 72, 80):
            def padded(x):
                return F.pad(x, (0, pad - hd)) if pad > hd else x
            pq, pk, pv = padded(q), padded(k), padded(v)
            ddq, ddk, ddv = padded(dq), padded(dk), padded(dv)
            for name, be in backends.items():
                key = f"D{pad}_{name}"
                r = {}
                try:
                    def pre():
                        return _sdpa(pq, pk, pv, be, is_causal=True, scale=scale)
                    err = (pre()[..., :hd].float() - ref).abs().max().item()
                    r["prefill_ms"] = min(time_ms(pre, self.device, 5) for _ in range(2))
                    r["prefill_max_err"] = err
                except Exception as exc:  # noqa: BLE001
                    r["prefill_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                try:
                    def dec():
                        return _sdpa(ddq, ddk, ddv, be, attn_mask=mask, scale=scale)
                    err = (dec()[..., :hd].float() - dref).abs().max().item()
                    r["decode_ms"] = min(time_ms(dec, self.device, 10) for _ in range(2))
                    r["decode_max_err"] = err
                except Exception as exc:  # noqa: BLE001
                    r["decode_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                out[key] = r
        out["shapes"] = {"prefill": [b, h, t, hd], "decode": [bq, h, 1, L, hd], "dtype": str(self.dtype)}

        def best(phase):
            ok = [(r[f"{phase}_ms"], key) for key, r in out.items() if isinstance(r, dict) and f"{phase}_ms" in r
                  and r.get(f"{phase}_max_err", 1) < 0.05]
            return min(ok) if ok else None
        pre, dec = best("prefill"), best("decode")
        choice = {"prefill": pre[1] if pre else None, "decode": dec[1] if dec else None}

        def parse(key):
            if key is None:
                return 72, None
            pad, name = key.split("_", 1)
            return int(pad[1:]), backends[name]
        # one cache layout serves both phases: the decode choice sets the padding
        pad_d, be_d = parse(choice["decode"])
        pad_p, be_p = parse(choice["prefill"])
        if pad_p != pad_d:
            alt = [(r["prefill_ms"], key) for key, r in out.items() if key.startswith(f"D{pad_d}_")
                   and "prefill_ms" in r and r.get("prefill_max_err", 1) < 0.05]
            if alt:
                choice["prefill"] = min(alt)[1]
                pad_p, be_p = parse(choice["prefill"])
        out["chosen"] = choice
        self.tpp_backend = {"pad_to": pad_d, "prefill": be_p, "decode": be_d}

    def _tpp(self, size, max_positions):
        be = getattr(self, "tpp_backend", {"pad_to": 72 if self.device.type == "cuda" else 0})
        return Transformer(transformer_shape(size, self.quick), self.device, self.dtype, pad_to=be["pad_to"],
                           max_positions=max_positions)

    def generation(self):
        """Batch 128 (4 in --quick), 2048 tokens: BASED (kernels), BASED (torch), Transformer++."""
        batch = 4 if self.quick else 128
        gen = self.gen_tokens()
        out = self.results.setdefault("generation", {})
        for size in self.sizes():
            model = self.based_model(size)
            for kernels in (True, False):
                key = f"based-{size}" if kernels else f"based-torch-{size}"
                try:
                    out[key] = self._based_generation(model, batch, gen, kernels, headline=True)
                except Exception as exc:  # noqa: BLE001
                    self.results["errors"][f"generation/{key}"] = f"{type(exc).__name__}: {exc}\n" \
                        f"{traceback.format_exc(limit=6)}"
                    print(f"    {key} failed: {exc}", flush=True)
                self.save()
                self.free()
            self.drop_models()
            key = f"transformer-{size}"
            try:
                out[key] = self._tpp_generation(size, batch, gen)
            except Exception as exc:  # noqa: BLE001
                self.results["errors"][f"generation/{key}"] = f"{type(exc).__name__}: {exc}\n" \
                    f"{traceback.format_exc(limit=6)}"
                print(f"    {key} failed: {exc}", flush=True)
            self.save()
            self.free()
        for size in self.sizes():
            b, t = out.get(f"based-{size}", {}), out.get(f"transformer-{size}", {})
            if "tok_per_ms" in b and "tok_per_ms" in t:
                b["vs_transformer"] = b["tok_per_ms"] / t["tok_per_ms"]
            bt = out.get(f"based-torch-{size}", {})
            if "tok_per_ms" in b and "tok_per_ms" in bt:
                b["vs_based_torch"] = b["tok_per_ms"] / bt["tok_per_ms"]

    def _based_generation(self, model, batch, gen, kernels, *, headline=False, steps=None):
        dec = BasedDecoder(model, batch, kernels=kernels, max_positions=PROMPT + gen + 64)
        dec.prefill(self.prompt(batch, model.config.vocab_size))
        step = Step(dec.step, self.device, self.graphs)
        steps = steps or (4 if self.quick else 128)
        step()
        ms = time_ms(step, self.device, steps)
        how = "graph replays" if step.graph is not None else "eager steps"
        r = {"batch": batch, "step_ms": ms, "tok_per_ms": batch / ms, "timed_steps": steps, "graph": step.graph is
             not None, "method": f"{steps} {how} after the prompt; the step's cost does not depend on the position"}
        if headline and kernels:
            dec2 = BasedDecoder(model, batch, kernels=kernels, max_positions=PROMPT + gen + 64)
            dec2.prefill(self.prompt(batch, model.config.vocab_size))
            step2 = Step(dec2.step, self.device, self.graphs)
            total = time_ms(step2, self.device, gen) * gen
            r.update(full_run_ms=total, full_run_tok_per_ms=batch * gen / total)
        if headline:
            floor = dec.floor_bytes()
            r["floor_bytes"] = floor
            if hasattr(self, "bandwidth"):
                r["floor_ms"] = floor["total"] / self.bandwidth * 1e3
                r["floor_fraction"] = r["floor_ms"] / ms
            r["state_bytes"] = dec.cache.nbytes
        if headline and kernels:
            r["breakdown_ms"] = self._breakdown(model, batch, gen)
        return r

    def _breakdown(self, model, batch, gen):
        """The step with only its GEMMs, only based's mixer ops, or GEMMs + mixers (no
        elementwise work), each as one graph: where the full step's time goes."""
        out = {}
        variants = (("gemm_only", ("gemm",)), ("mixer_only", ("mixer",)), ("gemm_and_mixer", ("gemm", "mixer")))
        for name, parts in variants:
            try:
                dec = BasedDecoder(model, batch, parts=parts, max_positions=PROMPT + gen + 64)
                dec.prefill(self.prompt(batch, model.config.vocab_size))
                step = Step(dec.step, self.device, self.graphs)
                out[name] = time_ms(step, self.device, 4 if self.quick else 64)
            except Exception as exc:  # noqa: BLE001
                out[name] = f"{type(exc).__name__}: {exc}"
        return out

    def _tpp_generation(self, size, batch, gen, *, mean_only=False):
        tpp = self._tpp(size, PROMPT + gen + BUCKET)
        be = getattr(self, "tpp_backend", {})
        first, last = PROMPT, PROMPT + gen - 1                          # positions decoded
        if mean_only:
            buckets = [math.ceil((PROMPT + gen // 2 + 1) / BUCKET) * BUCKET]
        else:
            buckets = list(range(math.ceil((first + 1) / BUCKET) * BUCKET, last + 1 + BUCKET, BUCKET))
            buckets = [L for L in buckets if L - BUCKET <= last]
        tpp.allocate(batch, max(buckets))
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, 50257 if not self.quick else 300, (batch, PROMPT), generator=g).to(self.device)
        tpp.prefill(prompt, backend=be.get("prefill"))
        per_bucket = {}
        for L in buckets:
            step_fn, tok, pos = tpp.decoder(batch, L, backend=be.get("decode"))
            p = max(L - BUCKET, PROMPT)                                   # a position inside the bucket
            pos.fill_(p)
            step = Step(step_fn, self.device, self.graphs)
            pos.fill_(p)
            per_bucket[L] = time_ms(step, self.device, 2 if self.quick else 16)
            del step
        if mean_only:
            ms = per_bucket[buckets[0]]
            r = {"batch": batch, "step_ms": ms, "tok_per_ms": batch / ms, "context": buckets[0],
                 "method": "one graph at the bucket holding the mean context (prompt + gen/2)"}
        else:
            total = 0.0
            for p in range(first, last + 1):
                total += per_bucket[math.ceil((p + 1) / BUCKET) * BUCKET]
            r = {"batch": batch, "total_ms": total, "tok_per_ms": batch * gen / total, "step_ms_per_bucket": per_bucket,
                 "method": f"each {BUCKET}-position bucket's graph timed, summed over the {gen} steps"}
            floor = tpp.floor_bytes(batch, (PROMPT + PROMPT + gen) // 2)
            r["floor_bytes_mean_context"] = floor
            if hasattr(self, "bandwidth"):
                r["floor_ms_mean_context"] = floor["total"] / self.bandwidth * 1e3
                r["floor_fraction"] = r["floor_ms_mean_context"] / (total / gen)
        r["graph"] = self.graphs
        r["head_dim_padded_to"] = tpp.pad_to
        r["kv_cache_bytes"] = tpp.k_cache.numel() * tpp.k_cache.element_size() * 2
        return r

    def compiled(self):
        """The headline BASED step with its elementwise helpers under torch.compile (fuses the
        norms, activations, rotary and conv update into a few kernels), in one graph."""
        if self.device.type != "cuda":
            self.results["generation_compiled"] = {"skipped": "CUDA only"}
            return
        global _rms, _swiglu, _rotate
        saved = (_rms, _swiglu, _rotate)
        try:
            _rms, _swiglu, _rotate = (torch.compile(f, dynamic=False, fullgraph=True) for f in saved)
            model = self.based_model("1.3b")
            t0 = time.perf_counter()
            r = self._based_generation(model, 128, self.gen_tokens(), True)
            r["compile_and_capture_s"] = time.perf_counter() - t0
            self.results["generation_compiled"] = {"based-1.3b": r}
            base = self.results.get("generation", {}).get("based-1.3b", {})
            if "tok_per_ms" in base:
                r["vs_eager_graph"] = r["tok_per_ms"] / base["tok_per_ms"]
        finally:
            _rms, _swiglu, _rotate = saved
            self.drop_models()

    def batch_sweep(self):
        batches = [1, 2] if self.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
        out = self.results.setdefault("batch_sweep", {})
        gen = self.gen_tokens()
        for size in self.sizes():
            model = self.based_model(size)
            for kernels in (True, False):
                key = f"based-{size}" if kernels else f"based-torch-{size}"
                rows = out.setdefault(key, [])
                for b in batches:
                    try:
                        r = self._based_generation(model, b, gen, kernels, steps=4 if self.quick else 32)
                        rows.append({k: r[k] for k in ("batch", "step_ms", "tok_per_ms", "graph")})
                    except Exception as exc:  # noqa: BLE001
                        rows.append({"batch": b, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                    self.free()
                self.save()
            self.drop_models()
            key = f"transformer-{size}"
            rows = out.setdefault(key, [])
            for b in batches:
                try:
                    r = self._tpp_generation(size, b, gen, mean_only=True)
                    rows.append({k: r[k] for k in ("batch", "step_ms", "tok_per_ms", "graph", "context")})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"batch": b, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                self.free()
            self.save()

    def prefill(self):
        batch = 1 if self.quick else 2
        lengths = [64, 128] if self.quick else [1024, 2048, 4096, 8192, 16384, 32768]
        out = self.results.setdefault("prefill", {"batch": batch})
        size = "1.3b"
        model = self.based_model(size)
        vocab = model.config.vocab_size

        def based_kernels(tokens):
            cache = model.new_cache(tokens.shape[0])
            x = model.embed(tokens)
            for block, state in zip(model.blocks, cache.states):
                x = block.prefill(x, state)
            return model.lm_head(model.norm(x[:, -1]))

        def based_torch(tokens):
            x = model.embed(tokens)
            for block in model.blocks:
                x = block(x)
            return model.lm_head(model.norm(x[:, -1]))

        for key, fn, limit in ((f"based-{size}", based_kernels, None), (f"based-torch-{size}", based_torch, 8192)):
            rows = out.setdefault(key, [])
            for t in lengths:
                if limit and t > limit:
                    why = f"the quadratic training path needs O(T^2) memory; run up to {limit}"
                    rows.append({"T": t, "skipped": why})
                    continue
                rows.append(self._time_prefill(lambda x: fn(x), batch, t, vocab))
                self.save()
        self.drop_models()
        tpp = self._tpp(size, max(lengths) + 1)
        be = getattr(self, "tpp_backend", {}).get("prefill")
        rows = out.setdefault(f"transformer-{size}", [])
        for t in lengths:
            tpp.k_cache = tpp.v_cache = None
            self.free()
            rows.append(self._time_prefill(lambda x: tpp.prefill(x, backend=be), batch, t, tpp.s["vocab"] - 15,
                                           cache_owner=tpp))
            self.save()

    @torch.no_grad()
    def _time_prefill(self, fn, batch, t, vocab, cache_owner=None):
        g = torch.Generator().manual_seed(t)
        x = torch.randint(0, vocab, (batch, t), generator=g).to(self.device)
        try:
            fn(x)                                                           # warm-up (and the KV cache)
            if cache_owner is not None:
                cache_owner.k_cache = cache_owner.v_cache = None            # the timed call allocates its own
            self.free()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            ms = time_ms(lambda: fn(x), self.device, 1)
            r = {"T": t, "batch": batch, "ms": ms, "tok_per_ms": batch * t / ms}
            if self.device.type == "cuda":
                r["peak_bytes"] = torch.cuda.max_memory_allocated(self.device) - before
            reps = 1 if self.quick else 2
            r["ms"] = min([ms] + [time_ms(lambda: fn(x), self.device, 1) for _ in range(reps)])
            r["tok_per_ms"] = batch * t / r["ms"]
            return r
        except torch.cuda.OutOfMemoryError as exc:
            return {"T": t, "batch": batch, "error": f"OOM: {str(exc).splitlines()[0][:200]}"}
        except Exception as exc:  # noqa: BLE001
            return {"T": t, "batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    def state_bytes(self):
        """Per sequence: BASED's whole recurrent state (fixed) against the Transformer's KV cache."""
        out = {}
        for size in self.sizes():
            cfg = based_config(size, self.args.window_size, self.quick)
            lin = sum(1 for k in cfg.layers if k == "linear")
            win = sum(1 for k in cfg.layers if k == "window")
            conv = sum(1 for k in cfg.layers if k == "conv")
            f = 1 + cfg.linear_feature_dim + cfg.linear_feature_dim * (cfg.linear_feature_dim + 1) // 2
            elem = torch.finfo(self.dtype).bits // 8
            parts = {"linear_states_fp32": lin * cfg.linear_heads * f * (cfg.linear_head_dim + 1) * 4,
                     "window_caches": win * 2 * cfg.window_kv_heads * cfg.window * cfg.window_head_dim * elem,
                     "conv_states": conv * cfg.conv_inner * (cfg.conv_kernel - 1) * elem}
            based_total = sum(parts.values())
            # measured: the cache BasedLM.new_cache allocates for one sequence (token counters included)
            model = self.based_model(size)
            measured = model.new_cache(1).nbytes
            self.drop_models()
            s = transformer_shape(size, self.quick)
            per_token = 2 * s["layers"] * s["heads"] * s["head_dim"] * elem
            lengths = [256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
            out[size] = {"based_bytes": based_total, "based_parts": parts, "based_measured_bytes": measured,
                         "kv_bytes_per_token": per_token, "kv_bytes": {str(L): per_token * L for L in lengths},
                         "crossover_tokens": math.ceil(based_total / per_token),
                         "dtype": str(self.dtype).replace("torch.", ""),
                         "note": "KV bytes at the model's head dim; the decode benchmark's cache may be zero-padded "
                                 "(attention_head_dim.chosen), which holds pad/head_dim times more"}
        self.results["state_bytes"] = out

    @torch.no_grad()
    def check(self):
        """A few decode steps from one prefilled state, all fed the same tokens: the
        graph-captured step against the same step run eagerly (the same kernels: equal to
        rounding), and the eager step, the graph and the pure-PyTorch step against
        ``BasedLM.step`` (the library's own decode: separate rather than fused projections, its
        own RMSNorm). In float32 everything must agree to 1e-4 of the logits' scale (fp32
        rounding through 36 layers is ~1e-6; a wrong state, position or rotary is O(1)); in
        bfloat16 the graph must equal eager to 1e-3 and the rest agree to 5e-2 (each side
        rounds every bf16 GEMM output and activation differently)."""
        size = "1.3b"
        res = {}
        dtypes = [torch.float32] + ([torch.bfloat16] if self.dtype == torch.bfloat16 else [])
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False          # BaseConv's prefill convolution: float32 is float32
        try:
            self._check(size, dtypes, res)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        res["passed"] = all(v["passed"] for v in res.values() if isinstance(v, dict))
        self.results["check"] = res

    def _check(self, size, dtypes, res):
        for dtype in dtypes:
            model = self.based_model(size, dtype)
            batch, steps = 4, 6
            prompt = self.prompt(batch, model.config.vocab_size)
            feed = torch.randint(0, model.config.vocab_size, (steps, batch), generator=torch.Generator().manual_seed(9))
            feed = feed.to(self.device)

            def run_decoder(kernels, graph):
                dec = BasedDecoder(model, batch, kernels=kernels)
                dec.prefill(prompt)
                saved, pos = dec.cache.clone(), dec.pos.clone()
                step = Step(dec.step, self.device, graph)
                for s, new in zip(dec.cache.states, saved.states):           # undo the warm-up steps
                    s.copy_(new)
                dec.pos.copy_(pos)
                got = []
                for t in range(steps):
                    dec.tok.copy_(feed[t])
                    got.append(step().float().clone())
                return torch.stack(got)

            logits, cache = model.prefill(prompt)
            ref = torch.stack([model.step(feed[t], cache).float() for t in range(steps)])
            scale = ref.abs().max().item()
            r = {"batch": batch, "steps": steps, "logit_scale": scale}
            eager = run_decoder(True, False)
            r["eager_vs_model_step"] = (eager - ref).abs().max().item() / scale
            if self.graphs:
                graph = run_decoder(True, True)
                r["graph_vs_eager"] = (graph - eager).abs().max().item() / scale
                r["graph_vs_model_step"] = (graph - ref).abs().max().item() / scale
            r["torch_path_vs_model_step"] = (run_decoder(False, self.graphs) - ref).abs().max().item() / scale
            r["argmax_agreement"] = (eager.argmax(-1) == ref.argmax(-1)).float().mean().item()
            tight, loose = (1e-4, 1e-4) if dtype == torch.float32 else (1e-3, 5e-2)
            r["tolerance"] = {"graph_vs_eager": tight, "vs_model_step": loose}
            r["passed"] = r.get("graph_vs_eager", 0.0) <= tight and all(
                v <= loose for k, v in r.items() if k.endswith("_vs_model_step"))
            res[str(dtype).replace("torch.", "")] = r
            print(f"    check {dtype}: {json.dumps(r)}", flush=True)
            self.drop_models()


def markdown(results: dict) -> str:
    lines = []
    gen = results.get("generation", {})
    if gen:
        lines += ["| model | batch | tok/ms | step ms | floor fraction | vs Transformer++ | vs pure PyTorch |",
                  "|---|---|---|---|---|---|---|"]
        for key, r in gen.items():
            if "tok_per_ms" not in r:
                continue
            step = r.get("step_ms", r.get("total_ms", 0) / max(results["meta"].get("generated", 1), 1))
            nan = float("nan")
            lines.append(f"| {key} | {r['batch']} | {r['tok_per_ms']:.2f} | {step:.3f} | "
                         f"{r.get('floor_fraction', nan):.2f} | {r.get('vs_transformer', nan):.2f}x | "
                         f"{r.get('vs_based_torch', nan):.2f}x |")
    pre = results.get("prefill", {})
    if pre:
        lines += ["", "| model | T | tok/ms | ms | peak extra memory (GB) |", "|---|---|---|---|---|"]
        for key, rows in pre.items():
            if not isinstance(rows, list):
                continue
            for r in rows:
                if "tok_per_ms" in r:
                    lines.append(f"| {key} | {r['T']} | {r['tok_per_ms']:.1f} | {r['ms']:.2f} | "
                                 f"{r.get('peak_bytes', float('nan')) / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a smoke test; any device)")
    parser.add_argument("--check", action="store_true", help="only the decode check (exit 1 if it fails)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--window-size", type=int, default=128,
                        help="the configs' window_size: window_size // 2 previous keys + self (default 128)")
    parser.add_argument("--sections", default="all",
                        help="comma list of: check, bandwidth, attention, generation, compiled, sweep, prefill, state")
    parser.add_argument("--no-graphs", action="store_true", help="time eager steps (no CUDA graphs)")
    parser.add_argument("--max-seconds", type=float, default=420.0,
                        help="start no section after this many seconds (recorded as skipped; default 420)")
    parser.add_argument("--out", default=str(HERE / "results" / "generation.json"))
    parser.add_argument("--plots", default=str(HERE / "plots"), help="folder for the plots ('' for none)")
    args = parser.parse_args(argv)
    if args.quick and args.out == str(HERE / "results" / "generation.json"):
        args.out = str(HERE / "results" / "generation_quick.json")
    run = Run(args)
    order = ["check", "bandwidth", "attention", "generation", "sweep", "prefill", "state", "compiled"]
    wanted = order if args.sections == "all" else [s.strip() for s in args.sections.split(",")]
    if args.check:
        wanted = ["check"]
    fns = {"check": run.check, "bandwidth": run.copy_bandwidth, "attention": run.attention_head_dim,
           "generation": run.generation, "compiled": run.compiled, "sweep": run.batch_sweep, "prefill": run.prefill,
           "state": run.state_bytes}
    unknown = [s for s in wanted if s not in fns]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {order}")
    if "generation" in wanted and "bandwidth" not in wanted:
        wanted.insert(0, "bandwidth")

    def finish():
        table = markdown(run.results)
        if table:
            print(table)
        if args.plots and not args.check:
            from plot_generation import plot_all
            try:
                for path in plot_all(run.results, args.plots):
                    print(f"plot: {path}")
            except Exception as exc:  # noqa: BLE001
                print(f"plots failed: {type(exc).__name__}: {exc}")

    for name in order:
        if name == "compiled" and "compiled" in wanted and len(wanted) > 1:
            finish()            # tables and plots first: the compile may be slow on a fresh machine
        if name in wanted:
            run.section(name, fns[name])
    print(f"[{run.elapsed():6.1f} s] done; results in {run.out}")
    finish()
    if run.results["errors"]:
        print(f"sections with errors: {sorted(run.results['errors'])}")
    if args.check:
        return 0 if run.results.get("check", {}).get("passed") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
