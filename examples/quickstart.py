"""Quickstart: BASED's Taylor feature map on real arrays, through the C core and DLPack.

phi(q) . phi(k) must equal 1 + s + s^2/2 with s = q.k / sqrt(Dk) (paper Sec. 4.1, Eq. 4);
this script checks that on random queries and keys, with NumPy and (if installed) PyTorch.
Run:  python examples/quickstart.py
"""

import numpy as np

import based
from based import reference

rng = np.random.default_rng(0)
B, T, H, Dk = 2, 128, 4, 16
q = rng.standard_normal((B, T, H, Dk)).astype(np.float32)
k = rng.standard_normal((B, T, H, Dk)).astype(np.float32)

phi_q = based.taylor_feature_map(q)           # numpy in -> numpy out, (B, T, H, 153)
phi_k = based.taylor_feature_map(k)
kernel = np.einsum("bthf,bshf->bhts", phi_q, phi_k)
s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(Dk)
err = np.abs(kernel - (1 + s + s**2 / 2)).max()
print(f"based {based.__version__}  (CUDA available: {based.cuda_available()})")
print(f"phi: {q.shape} -> {phi_q.shape}, F = 1 + Dk + Dk(Dk+1)/2 = {based.feature_dim(Dk)}")
print(f"max |phi(q).phi(k) - (1 + s + s^2/2)| over {kernel.size} pairs: {err:.2e}")
assert err < 1e-3

try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    qt = torch.from_numpy(q).to(torch.bfloat16).transpose(1, 2)   # (B, H, T, Dk) view, no copy
    phi_t = based.taylor_feature_map(qt)                          # torch in -> torch out
    ref = reference.taylor_feature_map(qt.float().numpy())
    print(f"torch bf16 {tuple(qt.shape)} -> {tuple(phi_t.shape)} {phi_t.dtype}, "
          f"max rel err vs float64: {np.abs(phi_t.double().numpy() - ref).max() / np.abs(ref).max():.1e}")
