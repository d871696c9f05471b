"""transform.py ROOT OUT: copy ROOT's kernels (and the csrc headers they include) into OUT with the
CUDA-only constructs replaced by calls into emu.h: the inline-asm statements (cp.async,
ldmatrix, mma), kernel launches, extern __shared__ arrays, intrinsics and built-in variables."""
import re, sys, pathlib
root = pathlib.Path(sys.argv[1])
out = pathlib.Path(sys.argv[2]); out.mkdir(exist_ok=True)
(out / "csrc").mkdir(exist_ok=True)
for f in ["args.h", "based.h", "dlpack.h"]:
    if (root / "csrc" / f).exists():
        (out / "csrc" / f).write_text((root / "csrc" / f).read_text())
(out / "kernels").mkdir(exist_ok=True)
ASM = [
    (r'asm volatile\("cp\.async\.cg\.shared\.global.*?\);', 'emu_cp_async16(dst, src);'),
    (r'asm volatile\("cp\.async\.commit_group.*?\);', 'emu_cp_async_commit();'),
    (r'asm volatile\("cp\.async\.wait_group.*?\);', 'emu_cp_async_wait(N);'),
    (r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.x4\.trans\.shared\.b16.*?\);', 'emu_ldmatrix(r, addr, true);'),
    (r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.x4\.shared\.b16.*?\);', 'emu_ldmatrix(r, addr, false);'),
    (r'asm\("mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32.*?\);', 'emu_mma<__nv_bfloat16>(c, a, b0, b1);'),
    (r'asm\("mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32.*?\);', 'emu_mma<__half>(c, a, b0, b1);'),
]
RENAME = {"__syncthreads_or": "emu_syncthreads_or", "__syncthreads": "emu_syncthreads", "__syncwarp": "emu_syncwarp",
          "__shfl_xor_sync": "emu_shfl_xor_sync", "__shfl_sync": "emu_shfl_sync",
          "__cvta_generic_to_shared": "emu_cvta_shared", "__cvta_generic_to_global": "emu_cvta_global",
          "__int_as_float": "emu_int_as_float", "__uint_as_float": "emu_uint_as_float", "threadIdx": "emu_threadIdx", "blockIdx": "emu_blockIdx",
          "blockDim": "emu_blockDim", "gridDim": "emu_gridDim"}
counts = {}
for f in sorted((root / "kernels").iterdir()):
    if f.suffix not in (".cu", ".cuh", ".h") or f.name == "runtime.cu":
        continue
    s = f.read_text()
    for pat, rep in ASM:
        s, k = re.subn(pat, rep, s, flags=re.S)
        counts[pat[:40]] = counts.get(pat[:40], 0) + k
    s = re.sub(r'extern __shared__ uint4 smem_u4\[\];', 'uint4 *smem_u4 = (uint4 *)emu_smem_u4();', s)
    s = re.sub(r'extern __shared__ float smf\[\];', 'float *smf = (float *)emu_smem_u4();', s)
    s = re.sub(r'([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.+?)>>>\(', r'emu_launch(\1, \2, ', s)
    for a, b in RENAME.items():
        s = re.sub(r'\b%s\b' % a, b, s)
    if f.name == "common.cuh":
        s = s.replace('#include <cuda_runtime.h>', '#include <cuda_runtime.h>\n#include "emu.h"')
    (out / "kernels" / f.name).write_text(s)
print(counts)
