"""The README's Python examples run, in order, in one namespace (docs that run)."""

import os
import re

import pytest
from conftest import requires_cuda

import based

pytest.importorskip("torch")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)            # the examples write files (state.npz)
    namespace = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message says which block broke
            raise AssertionError(f"README python block {i + 1} failed: {exc!r}\n{block}") from exc


# -- the support table (ops x devices x dtypes, limits, state dtypes) says what the build does --

SUPPORT_HEADER = "| op | CPU | CUDA | limits | state / cache dtype |"
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64")
OPS = ("linear_attention_prefill", "linear_attention_decode", "sliding_window_prefill", "sliding_window_decode",
       "taylor_feature_map")


def dtypes_in(cell: str) -> list:
    return re.findall(r"\b(float32|float64|float16|bfloat16|int64)\b", cell)


def support_table() -> list:
    """The README's support table as [{op, cpu, cuda, limits, state}], one per row; op is the
    first name in backticks of the row's first cell."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert SUPPORT_HEADER in text, f"README.md has no support table headed {SUPPORT_HEADER!r}"
    rows = []
    for line in text[text.index(SUPPORT_HEADER):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, f"support table row with {len(cells)} cells: {line}"
        rows.append({"op": re.search(r"`([^`(]+)", cells[0]).group(1), "cpu": dtypes_in(cells[1]),
                     "cuda": cells[2], "limits": cells[3], "state": cells[4]})
    return rows


ROWS = support_table()


def run_op(op, dtype, device="cpu", *, dk=8, d=8, state_dtype=None):
    """Call ``op`` (a row's name) once on small inputs of ``dtype`` on ``device``; a linear state
    or window cache of ``state_dtype`` when given (else the op's default)."""
    import torch

    like = torch.zeros(1, device=device)

    def t(*shape):
        if dtype == "int64":
            return torch.ones(shape, dtype=torch.int64, device=device)
        return torch.randn(shape).to(device=device, dtype=getattr(torch, dtype))

    if op == "linear_attention_prefill":
        state = None if state_dtype is None else based.LinearAttentionState.zeros(1, 2, dk, 4, dtype=state_dtype,
                                                                                  like=like)
        based.linear_attention_prefill(t(1, 3, 2, dk), t(1, 3, 2, dk), t(1, 3, 2, 4), state)
    elif op == "linear_attention_decode":
        state = based.LinearAttentionState.zeros(1, 2, dk, 4, dtype=state_dtype or "float32", like=like)
        based.linear_attention_decode(t(1, 2, dk), t(1, 2, dk), t(1, 2, 4), state)
    elif op == "sliding_window_prefill":
        if state_dtype is None:
            based.sliding_window_prefill(t(1, 3, 2, d), t(1, 3, 1, d), t(1, 3, 1, d), window=2)
        else:
            cache = based.SlidingWindowCache.zeros(1, 1, 2, d, dtype=state_dtype, like=like)
            based.sliding_window_prefill(t(1, 3, 2, d), t(1, 3, 1, d), t(1, 3, 1, d), cache=cache)
    elif op == "sliding_window_decode":
        cache = based.SlidingWindowCache.zeros(1, 1, 2, d, dtype=state_dtype or dtype, like=like)
        based.sliding_window_decode(t(1, 2, d), t(1, 1, d), t(1, 1, d), cache)
    elif op == "taylor_feature_map":
        based.taylor_feature_map(t(2, 3, dk))
    elif op == "reset":                                  # the state methods row
        state = based.LinearAttentionState.zeros(2, 2, 4, 3, dtype=dtype, like=like)
        state.reset([0])
        state.copy_(state.clone())
        state.index_select([1, 0])
        based.LinearAttentionState.from_expanded(*state.to_expanded())
        cache = based.SlidingWindowCache.zeros(2, 1, 3, 4, dtype=dtype, like=like)
        cache.reset([1])
        cache.copy_(cache.clone())
        cache.index_select([0])
    elif op == "based.zeros":
        based.zeros((2, 3), dtype, device=device)
    else:
        raise AssertionError(f"the support table has a row for {op!r}, which this test does not know how to call")


def test_support_table_covers_every_op():
    names = {r["op"] for r in ROWS}
    public = {n for n in based.__all__ if n.endswith(("_prefill", "_decode", "_feature_map"))}
    assert public <= names and set(OPS) <= names, f"ops without a row: {sorted((public | set(OPS)) - names)}"
    assert {"reset", "based.zeros"} <= names


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["op"])
def test_support_table_cpu_dtypes(row):
    """Every dtype the CPU column lists runs; every other one is a TypeError."""
    assert row["cpu"], f"{row['op']}: no CPU dtypes listed"
    for dtype in DTYPES:
        if dtype in row["cpu"]:
            run_op(row["op"], dtype)
        else:
            with pytest.raises(TypeError):
                run_op(row["op"], dtype)


@pytest.mark.parametrize("row", [r for r in ROWS if re.search(r"\bDk? ≤ \d+", r["limits"])], ids=lambda r: r["op"])
def test_support_table_limits(row):
    """"Dk ≤ N" / "D ≤ N": N runs, N + 1 is a ValueError."""
    for name, n in re.findall(r"\b(Dk|D) ≤ (\d+)", row["limits"]):
        n = int(n)
        key = "dk" if name == "Dk" else "d"
        run_op(row["op"], "float32", **{key: n})
        with pytest.raises(ValueError, match=str(n)):
            run_op(row["op"], "float32", **{key: n + 1})


@pytest.mark.parametrize("row", [r for r in ROWS if r["state"] != "—"], ids=lambda r: r["op"])
def test_support_table_state_dtypes(row):
    """Linear attention: every listed state dtype runs with every listed input dtype. Window:
    the cache holds the inputs' dtype, and another one is a TypeError."""
    if "inputs' dtype" in row["state"]:
        for dtype in row["cpu"]:
            run_op(row["op"], dtype, state_dtype=dtype)
            other = "float64" if dtype != "float64" else "float32"
            with pytest.raises(TypeError):
                run_op(row["op"], dtype, state_dtype=other)
    else:
        assert dtypes_in(row["state"]), f"{row['op']}: no state dtypes listed"
        for state_dtype in dtypes_in(row["state"]):
            for dtype in row["cpu"]:
                run_op(row["op"], dtype, state_dtype=state_dtype)


@requires_cuda
def test_support_table_cuda_column():
    """On a GPU: a "not yet" op raises NotImplementedError for CUDA tensors; an op whose CUDA
    cell lists dtypes runs in each (so the column is updated as the CUDA kernels land)."""
    for row in ROWS:
        if row["cuda"] == "not yet":
            for dtype in row["cpu"]:
                with pytest.raises(NotImplementedError):
                    run_op(row["op"], dtype, "cuda")
        else:
            assert dtypes_in(row["cuda"]), f"{row['op']}: CUDA cell {row['cuda']!r} is neither 'not yet' nor dtypes"
            for dtype in dtypes_in(row["cuda"]):
                run_op(row["op"], dtype, "cuda")
