"""Plots of benchmarks/bench_generation.py's JSON: generation throughput against batch,
prefill time and peak memory against length, recurrent state against KV cache.

    python benchmarks/plot_generation.py [results.json] [out_dir]

Used by bench_generation.py after a run and by notebooks/benchmarks.ipynb; needs only the
JSON (no GPU, no torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

STYLE = {"based": ("C0", "-"), "based-torch": ("C2", "--"), "transformer": ("C3", "-.")}


def _style(key: str):
    family = "based-torch" if key.startswith("based-torch") else key.split("-")[0]
    color, line = STYLE.get(family, ("C7", ":"))
    return dict(color=color, linestyle=line, marker="o" if key.endswith("1.3b") else "s",
                alpha=1.0 if key.endswith("1.3b") else 0.6)


def _rows(rows, x, y):
    pts = [(r[x], r[y]) for r in rows if isinstance(r, dict) and x in r and y in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _title(results: dict, what: str) -> str:
    meta = results.get("meta", {})
    where = meta.get("gpu", {}).get("name") or meta.get("device", "?")
    extra = " (--quick smoke test, not a measurement)" if meta.get("quick") else ""
    return f"{what}: {where}, {meta.get('dtype', '')}{extra}"


def figures(results: dict) -> dict:
    """{name: matplotlib Figure} for whatever sections the results hold."""
    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    sweep, gen = results.get("batch_sweep", {}), results.get("generation", {})
    if sweep or gen:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, rows in sweep.items():
            xs, ys = _rows(rows, "batch", "tok_per_ms")
            if xs:
                ax.plot(xs, ys, label=key, **_style(key))
        for key, r in gen.items():
            if isinstance(r, dict) and "tok_per_ms" in r:
                ax.plot([r["batch"]], [r["tok_per_ms"]], marker="*", markersize=14, linestyle="none",
                        color=_style(key)["color"], label=f"{key}, {results.get('meta', {}).get('generated', '')} "
                                                          f"tokens: {r['tok_per_ms']:.1f} tok/ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences decoded together)")
        ax.set_ylabel("generated tokens / ms")
        ax.set_title(_title(results, "Generation"), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        figs["generation_throughput"] = fig
    pre = {k: v for k, v in results.get("prefill", {}).items() if isinstance(v, list)}
    if pre:
        for name, field, label, scale in (("prefill_time", "ms", "prefill time (ms)", 1.0),
                                          ("prefill_memory", "peak_bytes", "peak memory above weights (GB)", 1e-9)):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for key, rows in pre.items():
                xs, ys = _rows(rows, "T", field)
                if xs:
                    ax.plot(xs, [y * scale for y in ys], label=key, **_style(key))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"prompt length T (batch {results['prefill'].get('batch', '?')})")
            ax.set_ylabel(label)
            ax.set_title(_title(results, "Prefill"), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, f"no {field} in these results (CUDA only)", transform=ax.transAxes, ha="center")
            figs[name] = fig
    states = results.get("state_bytes", {})
    if states:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for size, s in states.items():
            lengths = sorted(int(L) for L in s["kv_bytes"])
            ax.plot(lengths, [s["kv_bytes"][str(L)] / 1e6 for L in lengths], label=f"transformer-{size} KV cache",
                    **_style(f"transformer-{size}"))
            ax.plot(lengths, [s["based_bytes"] / 1e6] * len(lengths), label=f"based-{size} state (any length)",
                    **_style(f"based-{size}"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens in context")
        ax.set_ylabel("MB per sequence")
        ax.set_title(_title(results, "Decode memory per sequence"), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        figs["state_memory"] = fig
    return figs


def plot_all(results: dict, out_dir) -> list[str]:
    """Write every figure as ``out_dir/<name>.png``; returns the paths."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(results).items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(path))
    return paths


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "generation.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else HERE / "plots"
    for p in plot_all(json.loads(src.read_text()), dst):
        print(p)
