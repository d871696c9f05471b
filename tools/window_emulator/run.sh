#!/usr/bin/env bash
# Runs the CUDA sliding-window kernels on the host (see README.md).
#   tools/window_emulator/run.sh harness [asan|tsan|fast] [-v] [f32|f16|bf16] [case ...]
#   tools/window_emulator/run.sh pytest [pytest args, e.g. -k "T5-W7 or wrap"]
# BUILD (default /tmp/based-window-emu): build directory; SRC_ROOT: the tree whose kernels run
# (default this checkout); CUDA_INC: the CUDA include directory (found from CUDA_HOME/nvcc).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${SRC_ROOT:-$(cd "$HERE/../.." && pwd)}
BUILD=${BUILD:-/tmp/based-window-emu}
if [ -z "${CUDA_INC:-}" ]; then
    for d in "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include /usr/local/cuda-*/include; do
        if [ -f "$d/cuda_runtime.h" ]; then CUDA_INC=$d; break; fi
    done
fi
[ -n "${CUDA_INC:-}" ] || { echo "no cuda_runtime.h found: set CUDA_INC" >&2; exit 1; }
mkdir -p "$BUILD"
python3 "$HERE/transform.py" "$ROOT" "$BUILD/src" >/dev/null
cp "$HERE/emu.h" "$BUILD/"
echo '#include "src/kernels/sliding_window_prefill.cu"' > "$BUILD/prefill.cpp"
echo '#include "src/kernels/sliding_window_decode.cu"' > "$BUILD/decode.cpp"
WARN="-Wall -Wno-unused-function -Wno-unknown-pragmas -Wno-class-memaccess"
INC="-I$CUDA_INC -I$BUILD -I$BUILD/src/kernels -I$HERE"
what=${1:-harness}
shift || true
if [ "$what" = harness ]; then
    mode=${1:-asan}
    shift || true
    case $mode in
        asan) SAN="-fsanitize=address,undefined -fno-omit-frame-pointer"; OPT=-O1 ;;
        tsan) SAN="-fsanitize=thread"; OPT=-O1 ;;
        fast) SAN=""; OPT=-O2 ;;
        *) echo "mode: asan, tsan or fast" >&2; exit 2 ;;
    esac
    for f in stubs harness; do cp "$HERE/$f.cpp" "$BUILD/$f.cpp"; done
    for f in stubs prefill decode harness; do
        g++ -std=c++17 $OPT -g $WARN $INC $SAN -c "$BUILD/$f.cpp" -o "$BUILD/$f.$mode.o" &
    done
    wait
    g++ $SAN -pthread "$BUILD"/{stubs,prefill,decode,harness}.$mode.o -o "$BUILD/harness.$mode"
    exec "$BUILD/harness.$mode" "$@"
elif [ "$what" = pytest ]; then
    cp "$HERE/stubs.cpp" "$BUILD/stubs.cpp"
    for f in stubs prefill decode; do
        g++ -std=c++17 -O2 -fPIC $WARN $INC -c "$BUILD/$f.cpp" -o "$BUILD/$f.so.o" &
    done
    wait
    lib="$BUILD/libemu.$$.so"  # a fresh name: a running session keeps its own copy mapped
    g++ -shared -pthread "$BUILD"/{stubs,prefill,decode}.so.o -o "$lib"
    mkdir -p "$BUILD/pytest"
    cp "$ROOT/tests/conftest.py" "$HERE/emu_ops.py" "$BUILD/pytest/"
    python3 "$HERE/bridge.py" "$ROOT/tests/test_sliding_window_cuda.py" "$BUILD/pytest/test_window_emulated.py"
    cd "$BUILD/pytest"
    BASED_WINDOW_EMU_LIB=$lib PYTHONPATH="$ROOT:$BUILD/pytest" python -m pytest -p no:cacheprovider \
        test_window_emulated.py -k "not graph and not offsets" "$@"
else
    echo "usage: run.sh harness|pytest ..." >&2
    exit 2
fi
