"""based.nn decode at B=1 on the CPU: what the BasedCache's per-layer output buffers save.

    python benchmarks/bench_nn_decode_cpu.py                  # A/B timing, about a minute
    valgrind --tool=callgrind python benchmarks/bench_nn_decode_cpu.py --count reuse 20
        # instructions of a whole run (MODE reuse or alloc, STEPS decode steps): the difference
        # between STEPS = 220 and 20, over 200, is the per-token count, free of timing noise

Contenders: the bundled Shakespeare model (6 layers: 2 linear attention, 2 sliding window,
2 BaseConv), float32, greedy decoding of one sequence after a 58-byte prompt, torch and based
on one thread:
  * reuse: ``BasedLM.step`` as it is: the decode ops write into ``cache.buffers`` (``out=``);
  * alloc: the same with the cache's buffers taken away (``cache.buffers = [None] * layers``),
    so every decode op allocates its output, as every step did before.
Times are CPU time of this thread (``time.thread_time``: time spent descheduled on a shared
machine is not counted); the contenders alternate round by round; min and median over rounds.
Also timed: one ``based.linear_attention_decode`` and one ``based.sliding_window_decode`` call
of the model's shapes (B=1, H=4; Dk=16, Dv=64; W=128, D=64), with and without ``out=``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import based  # noqa: E402
from based.nn import load_bundled  # noqa: E402

PROMPT = b"ROMEO:\nBut soft, what light through yonder window breaks?\n"


def decode(model, steps: int, reuse: bool) -> float:
    """Seconds of thread CPU time per decode step over ``steps`` greedy steps."""
    logits, cache = model.prefill(torch.tensor([list(PROMPT)]))
    if not reuse:
        cache.buffers = [None] * len(cache.states)
    token = logits[:, -1].argmax(-1)
    t0 = time.thread_time()
    for _ in range(steps):
        token = model.step(token, cache).argmax(-1)
    return (time.thread_time() - t0) / steps


def per_call(fn, calls: int = 2000, rounds: int = 7) -> float:
    """Best over ``rounds`` of the mean thread CPU time of ``calls`` calls, in seconds."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - t0) / calls)
    return best


def ops_table() -> list:
    g = torch.Generator().manual_seed(0)
    rows = []
    state = based.LinearAttentionState.zeros(1, 4, 16, 64, like=torch.zeros(1))
    q, k = torch.randn(2, 1, 4, 16, generator=g)
    v, o = torch.randn(1, 4, 64, generator=g), torch.empty(1, 4, 64)
    rows.append(("linear_attention_decode (H=4, Dk=16, Dv=64)",
                 per_call(lambda: based.linear_attention_decode(q, k, v, state)),
                 per_call(lambda: based.linear_attention_decode(q, k, v, state, out=o))))
    cache = based.SlidingWindowCache.zeros(1, 4, 128, 64, like=torch.zeros(1))
    qw, kw, vw = torch.randn(3, 1, 4, 64, generator=g)
    ow = torch.empty(1, 4, 64)
    rows.append(("sliding_window_decode (H=4, W=128, D=64)",
                 per_call(lambda: based.sliding_window_decode(qw, kw, vw, cache)),
                 per_call(lambda: based.sliding_window_decode(qw, kw, vw, cache, out=ow))))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="A/B rounds of the model step (default 15)")
    parser.add_argument("--steps", type=int, default=200, help="decode steps per round (default 200)")
    parser.add_argument("--count", nargs=2, metavar=("MODE", "STEPS"),
                        help="only decode STEPS tokens in MODE (reuse or alloc), for an instruction count")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_bundled()
    with torch.no_grad():
        if args.count:
            mode, steps = args.count
            if mode not in ("reuse", "alloc"):
                parser.error(f"MODE must be reuse or alloc, got {mode!r}")
            decode(model, int(steps), mode == "reuse")
            return 0
        times = {True: [], False: []}
        decode(model, 20, True)                                   # warm up
        for _ in range(args.rounds):
            for reuse in (False, True):
                times[reuse].append(decode(model, args.steps, reuse))
        ops = ops_table()
    print(f"# based.nn decode, B=1, bundled model, float32, 1 thread (torch {torch.__version__}, "
          f"Python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.1f})\n")
    print("| decode step | min us/token | median us/token | tokens/s at the min |")
    print("|---|---|---|---|")
    for reuse, name in ((False, "alloc: every decode op allocates its output"),
                        (True, "reuse: out= into cache.buffers")):
        t = times[reuse]
        print(f"| {name} | {min(t) * 1e6:.0f} | {statistics.median(t) * 1e6:.0f} | {1 / min(t):.0f} |")
    print("\n| one op call, B=1 | us allocating the output | us with out= |")
    print("|---|---|---|")
    for name, alloc, reuse in ops:
        print(f"| {name} | {alloc * 1e6:.1f} | {reuse * 1e6:.1f} |")
    print(f"\nCommand: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
