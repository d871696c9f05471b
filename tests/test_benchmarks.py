"""The benchmark scripts print measurements, not verdicts: a "(target >= 10x)" after a measured
5.3x reads like a failed self-test. Targets and how results compare with them live in
benchmarks/RESULTS.md only, so no string in a benchmark script may mention a target."""

import ast
import glob
import os
import re

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPTS = sorted(glob.glob(os.path.join(BENCHMARKS, "*.py")))


def string_constants(path):
    """(line, text) of every string literal in the script, f-string pieces included (docstrings
    and comments are not output: a module docstring is skipped, comments are not in the AST)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_there_are_benchmark_scripts():
    assert any(os.path.basename(p) == "bench_linear_attention_cpu.py" for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_benchmarks_print_no_targets(path):
    hits = [(line, text) for line, text in string_constants(path) if re.search(r"\btargets?\b", text, re.I)]
    assert not hits, f"{os.path.basename(path)} prints targets (they belong in benchmarks/RESULTS.md): {hits}"
