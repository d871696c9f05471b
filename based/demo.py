"""``python -m based demo``: generate Shakespeare with the bundled BASED model through based's
kernels, streaming the text, then report speed and memory.

The model (based/models/shakespeare) is a 4.1M-parameter byte-level BASED LM: BaseConv,
Taylor linear-attention and sliding-window layers. The prompt is prefilled in one call
(chunked kernels), then each byte costs one decode step (one pass over each layer's state).

``python -m based generate --model DIR --prompt ...`` does the same for any model directory
``BasedLM.from_pretrained`` reads (ours, or a released ``hazyresearch/based-*`` checkpoint).
"""

from __future__ import annotations

import codecs
import os
import sys
import time

DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
DTYPES = ("float32", "bfloat16", "float16")


GENERATE_DESCRIPTION = """Generate text from a model directory through based's kernels, streaming it, then
report speed and memory as the demo does.

DIR is anything BasedLM.from_pretrained reads: a directory written by save_pretrained, or a
released checkpoint of the paper (hazyresearch/based-360m, based-1b, based-1b-50b, based-1.3b:
config.json with model.safetensors or pytorch_model.bin). Text is tokenized with the
tokenizer.json in DIR (or --tokenizer) through the `tokenizers` package -- GPT-2's BPE for the
released checkpoints, whose directories on the hub hold none (put GPT-2's tokenizer.json there);
without one, a model with a 256-token vocabulary reads and writes bytes, like the bundled model
(the default --model)."""


def _common_arguments(parser, *, max_new_tokens: int, unit: str) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"{unit} to generate (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40,
                        help=f"sample among the k most likely {unit}, 0 = all (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights and activations dtype (default float32); the linear-attention states stay float32")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads for PyTorch and based's kernels (torch.set_num_threads and "
                             "based.set_num_threads); default: one per CPU, or OMP_NUM_THREADS")


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue (default: a line of Romeo)")
    _common_arguments(parser, max_new_tokens=400, unit="bytes")


def add_generate_arguments(parser) -> None:
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="model directory (default: the bundled byte-level Shakespeare model)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--tokenizer", metavar="FILE", default=None,
                        help="a tokenizers tokenizer.json (default: DIR/tokenizer.json when there is one, else bytes)")
    _common_arguments(parser, max_new_tokens=100, unit="tokens")


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


def _check_args(args, torch, based) -> str | None:
    """The message for arguments that cannot run, or None."""
    if args.max_new_tokens < 1:
        return "--max-new-tokens must be >= 1"
    if args.temperature < 0:
        return "--temperature must be >= 0"
    if args.threads < 0:
        return "--threads must be >= 1 (or 0 for the default)"
    if not args.prompt:
        return "--prompt must not be empty"
    if args.device == "cuda":
        problem = _cuda_problem(torch, based)
        if problem:
            return f"--device cuda: {problem.rstrip('.')}. Run with --device cpu (the default)."
    return None


class _ByteText:
    """Bytes as tokens: the byte-level models' tokenizer, streamed through a UTF-8 decoder."""

    name = "bytes"

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def push(self, token: int) -> str:
        return self._decoder.decode(bytes([token]))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


class _TokenizerText:
    """A ``tokenizers.Tokenizer`` (e.g. GPT-2's byte-level BPE). Streaming decodes everything
    generated so far and prints what is new, holding back a trailing incomplete UTF-8
    character (shown as U+FFFD until its last byte arrives)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(path)
        self.name = f"tokenizer {path}"
        self._ids: list[int] = []
        self._shown = 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new, self._shown = text[self._shown:], len(text)
        return new

    def finish(self) -> str:
        text = self._tok.decode(self._ids)
        new, self._shown = text[self._shown:], len(text)
        return new


def _report(model, g, *, title: str, unit: str, dtype: str, device: str, load_seconds: float) -> None:
    import torch

    cfg = model.config
    length = g.prefill_tokens + g.tokens.shape[1]
    elem = torch.finfo(getattr(torch, dtype)).bits // 8
    kv_per_token = 2 * len(cfg.layers) * cfg.d_model * elem
    kv_bytes = kv_per_token * length
    state = g.cache.nbytes
    print("-" * 72)
    print(f"model            {title}, {model.num_parameters():,} parameters, "
          f"layers {'/'.join(cfg.layers)}, {dtype} on {device} (loaded in {load_seconds:.2f} s)")
    if device == "cpu":
        import based

        print(f"CPU threads      PyTorch {torch.get_num_threads()}, based {based.get_num_threads()} "
              f"(--threads; small calls use fewer)")
    print(f"prompt tokens    {g.prefill_tokens} ({unit})")
    print(f"prefill          {_fmt(g.prefill_tokens / max(g.prefill_seconds, 1e-9))} tokens/s "
          f"({g.prefill_tokens} tokens in {g.prefill_seconds * 1e3:.1f} ms)")
    print(f"decode           {_fmt(g.decode_tokens / max(g.decode_seconds, 1e-9))} tokens/s "
          f"({g.decode_tokens} steps in {g.decode_seconds:.2f} s, sampling included)")
    print(f"recurrent state  {state:,} bytes, the same at any length "
          f"(linear-attention states float32, window caches {dtype}, conv states)")
    print(f"KV cache         {kv_bytes:,} bytes: what a Transformer of the same width and depth "
          f"({len(cfg.layers)} layers x d_model {cfg.d_model}, {dtype}) would hold at {length} tokens "
          f"({kv_per_token:,} bytes per token; it passes this model's state at "
          f"{-(-state // kv_per_token):,} tokens)")


def _generate_and_report(args, model, text, *, title: str, load_seconds: float) -> int:
    import torch

    from based.nn import generate

    ids = text.encode(args.prompt)
    if not ids:
        print("--prompt encodes to no tokens", file=sys.stderr)
        return 2
    if max(ids) >= model.config.vocab_size:
        print(f"the tokenizer ({text.name}) gives ids up to {max(ids)}, past the model's vocabulary of "
              f"{model.config.vocab_size}: they do not belong together", file=sys.stderr)
        return 2
    out = sys.stdout
    out.write(args.prompt)
    out.flush()

    def stream(token):
        out.write(text.push(int(token[0])))
        out.flush()

    if args.threads:
        import based

        torch.set_num_threads(args.threads)
        based.set_num_threads(args.threads)
    prompt = torch.tensor([ids], dtype=torch.int64)
    # untimed warm-up on a throwaway cache: thread pools, first-touch allocations
    generate(model, prompt[:, :1], 2, temperature=0.0)
    g = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, seed=args.seed, on_token=stream)
    out.write(text.finish() + "\n")
    unit = "bytes" if isinstance(text, _ByteText) else "tokens"
    _report(model, g, title=title, unit=unit, dtype=args.dtype, device=args.device, load_seconds=load_seconds)
    return 0


def _imports():
    try:
        import torch
    except ImportError:
        print("based needs PyTorch for the language model (a torch module); install it, e.g. "
              "`pip install torch`, and run again.", file=sys.stderr)
        return None
    return torch


def run(args) -> int:
    torch = _imports()
    if torch is None:
        return 2
    import based
    from based.nn import load_bundled

    problem = _check_args(args, torch, based)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = load_bundled(device=args.device, dtype=getattr(torch, args.dtype))
    load_seconds = time.perf_counter() - t0
    return _generate_and_report(args, model, _ByteText(), title="bundled Shakespeare BASED LM",
                                load_seconds=load_seconds)


def run_generate(args) -> int:
    """``python -m based generate``: any model directory, its tokenizer or bytes."""
    torch = _imports()
    if torch is None:
        return 2
    import based
    from based.nn import BasedLM
    from based.nn.model import bundled_model_path

    problem = _check_args(args, torch, based)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    directory = args.model or bundled_model_path()
    tokenizer = args.tokenizer
    if tokenizer is None and os.path.isfile(os.path.join(directory, "tokenizer.json")):
        tokenizer = os.path.join(directory, "tokenizer.json")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        print(f"--tokenizer {tokenizer}: no such file", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        model = BasedLM.from_pretrained(directory, device=args.device, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as exc:
        print(f"--model {directory}: {exc}", file=sys.stderr)
        return 2
    load_seconds = time.perf_counter() - t0
    if tokenizer is not None:
        try:
            text = _TokenizerText(tokenizer)
        except ImportError:
            print(f"{tokenizer}: reading a tokenizer.json needs the `tokenizers` package "
                  "(pip install tokenizers, or based[generate])", file=sys.stderr)
            return 2
    elif model.config.vocab_size == 256:
        text = _ByteText()
    else:
        print(f"--model {directory}: its vocabulary has {model.config.vocab_size} tokens and the directory holds no "
              "tokenizer.json; put the model's tokenizer there (GPT-2's for the released BASED checkpoints) or "
              "pass --tokenizer FILE", file=sys.stderr)
        return 2
    return _generate_and_report(args, model, text, title=f"{directory} ({text.name})", load_seconds=load_seconds)
