"""One launch of each main CUDA kernel at the benchmark's shapes, for Nsight Compute:

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \\
        -k regex:'prefill|decode' --launch-skip 0 python benchmarks/profile_cuda.py

bf16, H=16, Dk=16, Dv=64: linear prefill B=16 T=2048, linear decode B=256 (fp32 state),
window prefill B=16 T=2048 W=64 D=64, window decode B=256.
"""

import torch

import based

H, DK, DV, W, D = 16, 16, 64, 64, 64


def main():
    bf = torch.bfloat16
    q, k = (0.5 * torch.randn(16, 2048, H, DK, device="cuda", dtype=bf) for _ in range(2))
    v = torch.randn(16, 2048, H, DV, device="cuda", dtype=bf)
    qd, kd = (torch.randn(256, H, DK, device="cuda", dtype=bf) for _ in range(2))
    vd = torch.randn(256, H, DV, device="cuda", dtype=bf)
    state = based.LinearAttentionState.zeros(256, H, DK, DV, like=qd)
    qw, kw, vw = (torch.randn(16, 2048, H, D, device="cuda", dtype=bf) for _ in range(3))
    _, cache = based.sliding_window_prefill(torch.randn(256, 80, H, D, device="cuda", dtype=bf),
                                            torch.randn(256, 80, H, D, device="cuda", dtype=bf),
                                            torch.randn(256, 80, H, D, device="cuda", dtype=bf), window=W)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profiled")
    based.linear_attention_prefill(q, k, v)
    based.linear_attention_decode(qd, kd, vd, state)
    based.sliding_window_prefill(qw, kw, vw, window=W)
    based.sliding_window_decode(torch.randn(256, H, D, device="cuda", dtype=bf), vd.clone(), vd.clone(), cache)
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
