"""``python -m based demo``: generate Shakespeare with the bundled BASED model through based's
kernels, streaming the text, then report speed and memory.

The model (based/models/shakespeare) is a 4.1M-parameter byte-level BASED LM: BaseConv,
Taylor linear-attention and sliding-window layers. The prompt is prefilled in one call
(chunked kernels), then each byte costs one decode step (one pass over each layer's state).
"""

from __future__ import annotations

import codecs
import sys
import time

DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue (default: a line of Romeo)")
    parser.add_argument("--max-new-tokens", type=int, default=400, help="bytes to generate (default 400)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely bytes, 0 = all (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights and activations dtype (default float32); the linear-attention states stay float32")


def _cuda_problem(torch, based) -> str | None:
    """Why --device cuda cannot run here, or None if it can."""
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device on this machine."
    if not based.cuda_available():
        return ("this build of based has no CUDA support (it was built without nvcc, or sees no GPU); "
                "rebuild with nvcc on PATH (BASED_CUDA=1 pip install -e .).")
    q = torch.zeros(1, 1, 1, 1, device="cuda")
    try:
        based.linear_attention_prefill(q, q, q)
    except NotImplementedError as exc:
        return f"based's CUDA kernels are not there yet: {exc}"
    return None


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def run(args) -> int:
    try:
        import torch
    except ImportError:
        print("based demo needs PyTorch (the model is a torch module); install it, e.g. "
              "`pip install torch`, and run again.", file=sys.stderr)
        return 2
    import based
    from based.nn import generate, load_bundled

    if args.max_new_tokens < 1:
        print("--max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    if args.temperature < 0:
        print("--temperature must be >= 0", file=sys.stderr)
        return 2
    prompt_bytes = args.prompt.encode("utf-8")
    if not prompt_bytes:
        print("--prompt must not be empty", file=sys.stderr)
        return 2
    if args.device == "cuda":
        problem = _cuda_problem(torch, based)
        if problem:
            print(f"--device cuda: {problem.rstrip('.')}. Run with --device cpu (the default).", file=sys.stderr)
            return 2

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = load_bundled(device=args.device, dtype=dtype)
    load_seconds = time.perf_counter() - t0
    cfg = model.config

    out = sys.stdout
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(args.prompt)
    out.flush()

    def stream(token):
        out.write(decoder.decode(bytes([int(token[0])])))
        out.flush()

    prompt = torch.tensor([list(prompt_bytes)], dtype=torch.int64)
    # untimed warm-up on a throwaway cache: thread pools, first-touch allocations
    generate(model, prompt[:, :1], 2, temperature=0.0)
    g = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, seed=args.seed, on_token=stream)
    out.write(decoder.decode(b"", final=True) + "\n")

    length = g.prefill_tokens + args.max_new_tokens
    elem = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * len(cfg.layers) * cfg.d_model * length * elem
    kv_per_token = 2 * len(cfg.layers) * cfg.d_model * elem
    state = g.cache.nbytes
    print("-" * 72)
    print(f"model            bundled Shakespeare BASED LM, {model.num_parameters():,} parameters, "
          f"layers {'/'.join(cfg.layers)}, {args.dtype} on {args.device} (loaded in {load_seconds:.2f} s)")
    print(f"prompt tokens    {g.prefill_tokens} (bytes)")
    print(f"prefill          {_fmt(g.prefill_tokens / max(g.prefill_seconds, 1e-9))} tokens/s "
          f"({g.prefill_tokens} tokens in {g.prefill_seconds * 1e3:.1f} ms)")
    print(f"decode           {_fmt(g.decode_tokens / max(g.decode_seconds, 1e-9))} tokens/s "
          f"({g.decode_tokens} steps in {g.decode_seconds:.2f} s, sampling included)")
    print(f"recurrent state  {state:,} bytes, the same at any length "
          f"(linear-attention states float32, window caches {args.dtype}, conv states)")
    print(f"KV cache         {kv_bytes:,} bytes: what a Transformer of the same width and depth "
          f"({len(cfg.layers)} layers x d_model {cfg.d_model}, {args.dtype}) would hold at {length} tokens "
          f"({kv_per_token:,} bytes per token; it passes this model's state at "
          f"{-(-state // kv_per_token):,} tokens)")
    return 0
