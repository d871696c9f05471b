"""bridge.py TEST OUT: write TEST (tests/test_sliding_window_cuda.py) to OUT with its CUDA
tensors on the CPU and based's ops routed to the emulated kernels by emu_ops.py; the calls the
test makes on CPU copies (its references, through _cpu()) keep going to based's CPU path."""
import sys

src = open(sys.argv[1]).read()
s = src.replace("pytestmark = requires_cuda\n", "import emu_ops  # noqa: F401\n")
s = s.replace('"cuda"', '"cpu"')
old = '''def _cpu(x, dtype):
    return x.detach().cpu().to(_td(dtype))'''
new = '''def _cpu(x, dtype):
    y = x.detach().cpu().to(_td(dtype)).clone()
    y._ref = True
    return y'''
assert "import emu_ops" in s and old in s, "the test file changed: update bridge.py"
open(sys.argv[2], "w").write(s.replace(old, new))
