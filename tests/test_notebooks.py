"""The notebooks run top to bottom (so they never rot), through the README's own headless
command: `jupyter nbconvert --execute` printing every cell with its output, so the command
a reader copies is the one tested (and one that shows output, unlike `jupyter execute`)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")
pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
QUICKSTART = "notebooks/quickstart.ipynb"


def readme_notebook_command() -> list[str]:
    """The README's command for running the quickstart notebook headless, as argv."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        commands = re.findall(r"`(jupyter [^`]*" + re.escape(QUICKSTART) + r")`", f.read())
    assert len(commands) == 1, f"expected one `jupyter ... {QUICKSTART}` command in README.md, found {commands}"
    return shlex.split(commands[0])


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs_through_the_readme_command(name):
    """nbconvert exits non-zero on a cell error; for the quickstart, the command must also
    show what the cells print (`jupyter execute` alone prints nothing)."""
    argv = readme_notebook_command()
    assert argv[0] == "jupyter" and "--execute" in argv
    argv = [f"notebooks/{name}" if a == QUICKSTART else a for a in argv]
    # `python -m jupyter` is the `jupyter` of this interpreter, whether or not its bin/ is on PATH
    run = subprocess.run([sys.executable, "-m", "jupyter", *argv[1:]], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, (f"{' '.join(argv)} exited {run.returncode}:\nstderr:\n{run.stderr[-4000:]}\n"
                                 f"stdout:\n{run.stdout[-2000:]}")
    if f"notebooks/{name}" == QUICKSTART:
        for printed in ("max |error| prefill:", "saved and loaded equal: True", "tokens/s", "BasedCache(batch=1"):
            assert printed in run.stdout, f"{printed!r} is not in what {' '.join(argv)} printed:\n{run.stdout[-2000:]}"
