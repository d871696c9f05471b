// sliding_window_prefill.cu -- sliding-window softmax attention over a prompt on CUDA
// (SPEC 1.2; paper Sec. 4): based_cuda_sliding_window_prefill.
//
//   o_p = softmax_u(scale * q_p . k_u) @ v_u   over key positions u in (p - W, p], u >= 0,
//   p = tokens[b] + t; keys before the call come from the ring cache (slot u % W).
//
// Three launches on the caller's stream, no host round trip, nothing allocated:
//   1. attention (this file), which reads tokens[b], the inputs and the cached keys;
//   2. ring update (sliding_window.cuh): the last min(T, W) keys/values into their slots;
//      after 1, because those slots may still hold keys that 1 reads;
//   3. counter advance, tokens[b] += T; after 2, because 1 and 2 read tokens[b] in many blocks.
// A sequence whose counter is out of range (negative, or tokens + T past 2^62) gets NaN
// outputs in 1 and is skipped by 2 and 3.
//
// Tensor-core kernel (float16, bfloat16): prefill_mma_kernel
//   Block = 64 query positions of one (b, h) (4 warps x 16 rows; for D > 128 two warps per
//   16 rows, each owning half of the output columns). Query head h reads kv head h / (H/Hkv).
//   Head dims are zero-padded in shared memory to DP in {32, 64, 128, 256} (D = 100 -> 128):
//   padded q/k columns add 0 to the scores, padded v columns are never stored.
//   The block's keys are positions [lo, hi] = [max(0, p_first - W + 1), p_last]: key tiles of
//   BN = 64 (32 for DP = 256) positions starting at lo, so W = 64 visits 2 tiles. Each tile
//   row is loaded from its source -- the ring cache (slot u % W) for u < tokens[b], the
//   call's k/v (time u - tokens[b]) after -- by 16-byte cp.async (zero-filled past D or past
//   hi); rows that are strided or misaligned go element by element. Two stages: tile j+1
//   loads while tile j is computed.
//   Per warp and tile: S = Q K^T by mma.sync m16n8k16 (operands from shared memory by
//   ldmatrix; fp32 accumulators), masked to each row's window, online softmax in base 2 in
//   fp32 registers (running max subtracted; scale * log2(e) applied to the fp32 scores),
//   P rounded to the input dtype as the A operand of O += P V (V by ldmatrix.trans).
//   8-key blocks outside every window of the warp's 16 rows are skipped (no mma, no exp).
//   Keys outside a row's window get weight 0; when a V tile holds a non-finite value (checked
//   from the bits as it lands) the tile's P V is done key by key instead, adding only keys
//   inside each row's window, so Inf/NaN reach exactly the outputs whose window holds them
//   (SPEC 4; a 0 weight times Inf inside the tensor-core sum would give NaN).
//   Epilogue: O / l rounded to the output dtype, staged in shared memory (over Q) and stored
//   as 16-byte pieces.
//   Shared memory: (64 + 2 stages * 2 * BN) rows of DP + 8 elements (the +8 makes every row
//   an odd number of 16-byte units: ldmatrix and the fragment stores are bank-conflict free):
//   DP=64: 45 KiB, DP=128: 85 KiB, DP=256 (one stage, BN=32): 66 KiB -- within the 99 KiB
//   per block of sm_86/89 as well as sm_80/90. Registers: O (DP/8 x 4 fp32) + S (BN/8 x 4
//   fp32) + fragments; DP <= 64 is held to 128 registers so 4 blocks (16 warps) share an SM.
//   Why it should reach the target (bf16, H=16, D=64, W=64, B=16, T=8192; IO floor 0.25 ms):
//   every q/k/v/out byte crosses DRAM once (a key tile is read by the two query tiles it
//   serves, the second time from L2); 16 warps per SM and cp.async double buffering keep
//   ~100 KiB of loads in flight per SM; the tensor-core work, 2 x 128 keys x 64 MACs per row
//   (69 GFLOP, i.e. 275 TFLOP/s if done in the IO-floor time, under half of what mma.sync
//   sustains on an H200), is cut by about a third by skipping the 8-key blocks outside the
//   band, and overlaps the loads of the other blocks on the SM.
//
// Float32 kernel (SIMT, fp32 FMA): prefill_simt_kernel
//   Block = 32 query rows (16 for D > 128) of one (b, h), 8 warps; each warp owns 4 rows (2).
//   Key tiles of 32 positions, loaded element by element into shared memory (q pre-scaled
//   by scale, k rows padded by one float against bank conflicts). Lane j scores key j for
//   the warp's rows; warp reductions give each row's max and sum; weights by expf (the CPU
//   kernel's arithmetic: q * scale, dot product, natural exp, so the float32 errors of both
//   are alike); P V by lanes over the head dim (d = lane + 32 c), adding only keys inside
//   each row's window.
//
// fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type";
// groupID g = lane >> 2, threadID_in_group t = lane % 4; element pairs are packed low-first):
//   A (16x16, row-major), 4 regs: a0,a1: (row g,   col 2t..2t+1)   a2,a3: (row g+8, col 2t..2t+1)
//                                a4,a5: (row g,   col 2t+8..+9)   a6,a7: (row g+8, col 2t+8..+9)
//   B (16x8, k x n),     2 regs: b0,b1: (k 2t..2t+1,   col g)      b2,b3: (k 2t+8..2t+9, col g)
//   C/D (16x8, fp32),    4 regs: c0,c1: (row g, col 2t..2t+1)      c2,c3: (row g+8, col 2t..2t+1)
// ldmatrix.m8n8.x4(.trans): lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i
// then holds matrix i's (row g, cols 2t, 2t+1), or with .trans its (rows 2t, 2t+1, col g).
// So: A of rows r..r+15, cols c..c+15 = x4 over (rows r+0..7, c), (r+8..15, c), (r+0..7, c+8),
// (r+8..15, c+8); B = K^T for keys n..n+7 and dims c..c+31 = x4 over the key rows at dims c,
// c+8, c+16, c+24 (regs 0,1: k-chunk c; regs 2,3: k-chunk c+16); B = V for keys k..k+15 and
// dims c..c+15 = x4.trans over (keys k+0..7, c), (k+8..15, c), (k+0..7, c+8), (k+8..15, c+8)
// (regs 0,1: dims c..c+7; regs 2,3: dims c+8..c+15). The A operand of P V is the S
// accumulator of key blocks 2kk and 2kk+1 repacked: (c0,c1), (c2,c3) of the first, then of
// the second.
#include <string.h>

#include <type_traits>

#include "sliding_window.cuh"

namespace {

using namespace based;
using namespace based::window;

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int clamp_to_int(int64_t x, int lo, int hi) {
    return x < lo ? lo : (x > hi ? hi : (int)x);
}

// First key column inside the window of a row at distance dpos = p - ts from the tile's first
// key, clamped to [0, n]: max(0, dpos - (W - 1)), without forming dpos - W (W may be near 2^63).
__device__ __forceinline__ int window_first_col(int64_t dpos, int64_t W, int n) {
    return dpos <= W - 1 ? 0 : clamp_to_int(dpos - (W - 1), 0, n);
}

// NaN into the outputs rows t0 .. t0+rows-1 of head h of sequence b.
template <typename T>
__device__ void fill_nan_rows(const based_sliding_window_args &a, int64_t b, int64_t t0, int rows, int64_t h,
                              int tid, int nt) {
    const int D = (int)a.head_dim;
    const T nan = nan_value<T>();
    for (int i = tid; i < rows * D; i += nt) {
        const int r = i / D, d = i % D;
        row_ptr_mut<T>(a.out, b, t0 + r, h)[(int64_t)d * a.out.strides[3]] = nan;
    }
}

// ---- tensor-core helpers ------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *smem) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *smem) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
    // c += a (16x16) * b (16x8)
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // (lo, hi) rounded to nearest, lo in the low 16 bits
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        uint32_t r;
        memcpy(&r, &h, sizeof r);
        return r;
    }
};

template <>
struct Mma<__half> {
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);
        uint32_t r;
        memcpy(&r, &h, sizeof r);
        return r;
    }
};

// Tiling of the tensor-core kernel for a padded head dim DP (see the header comment).
template <int DP>
struct MmaConfig {
    static constexpr int BM = 64;                                // query positions per block
    static constexpr int BN = DP == 256 ? 32 : 64;               // key positions per tile
    static constexpr int NSPLIT = DP == 256 ? 2 : 1;             // warps sharing 16 rows
    static constexpr int STAGES = DP == 256 ? 1 : 2;             // key/value tile buffers
    static constexpr int threads = 128 * NSPLIT;
    static constexpr int min_blocks = DP <= 64 ? 4 : (DP == 128 ? 2 : 1);
    static constexpr size_t smem_bytes = (size_t)(BM + 2 * STAGES * BN) * (DP + 8) * 2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(MmaConfig<DP>::threads, MmaConfig<DP>::min_blocks)
    prefill_mma_kernel(const based_sliding_window_args a, int64_t q_tiles) {
    using C = MmaConfig<DP>;
    using M = Mma<T>;
    constexpr int BM = C::BM, BN = C::BN, NSPLIT = C::NSPLIT, STAGES = C::STAGES, NT = C::threads;
    constexpr int SS = DP + 8;        // shared-memory row stride, elements
    constexpr int E = 8;              // elements per 16-byte piece
    constexpr int PR = DP / E;        // pieces per row
    constexpr int NB = BN / 8;        // 8-key blocks per tile
    constexpr int DPW = DP / NSPLIT;  // output columns per warp
    constexpr int ND = DPW / 8;       // 8-column output blocks per warp
    static_assert(DP % 32 == 0 && BN % 16 == 0 && ND % 2 == 0, "tile shape");

    extern __shared__ uint4 smem_u4[];
    T *const Qs = reinterpret_cast<T *>(smem_u4);  // [BM][SS]: q, later the output
    T *const Ks = Qs + BM * SS;                    // [STAGES][BN][SS]
    T *const Vs = Ks + STAGES * BN * SS;           // [STAGES][BN][SS]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t qt = (int64_t)blockIdx.x % q_tiles, bh = (int64_t)blockIdx.x / q_tiles;
    const int64_t H = a.heads, h = bh % H, b = bh / H;
    const int64_t kh = h / (H / a.kv_heads);
    const int64_t Tn = a.seqlen, W = a.window;
    const int D = (int)a.head_dim;
    const int64_t t0 = qt * BM;
    const int rows = (int)(Tn - t0 < BM ? Tn - t0 : BM);
    const int64_t n0 = tokens_at(a.tokens, b);
    if (!counter_valid(n0, Tn)) {
        fill_nan_rows<T>(a, b, t0, rows, h, tid, NT);
        return;
    }

    // keys of the block: positions lo .. hi, in tiles of BN starting at lo
    const int64_t p_first = n0 + t0, hi = p_first + rows - 1;
    const int64_t lo = p_first - W + 1 > 0 ? p_first - W + 1 : 0;
    const int64_t ntiles = (hi - lo + BN) / BN;

    for (int i = tid; i < BM * PR; i += NT) {
        const int r = i / PR, c = i % PR;
        T *dst = Qs + r * SS + c * E;
        if (r < rows && c * E < D) {
            const T *row = row_ptr<T>(a.q, b, t0 + r, h);
            load_piece(dst, row, a.q.strides[3], c * E, D, a.q.strides[3] == 1 && aligned16(row));
        } else {
            zero16(dst);
        }
    }

    // key/value rows of positions ts .. ts+BN-1 into buffer `stage`; past hi, or past D, zeros
    auto load_tile = [&](int64_t ts, int stage) {
        for (int i = tid; i < BN * PR; i += NT) {
            const int r = i / PR, c = i % PR;
            T *dk = Ks + (stage * BN + r) * SS + c * E;
            T *dv = Vs + (stage * BN + r) * SS + c * E;
            const int64_t u = ts + r;
            if (u > hi || c * E >= D) {
                zero16(dk);
                zero16(dv);
                continue;
            }
            const T *kr, *vr;
            int64_t ks, vs;
            if (u < n0) {  // from the ring: lo <= u < n0 lies in the cache's last W positions
                const int64_t slot = u % W;
                kr = row_ptr<T>(a.k_cache, b, kh, slot);
                vr = row_ptr<T>(a.v_cache, b, kh, slot);
                ks = a.k_cache.strides[3];
                vs = a.v_cache.strides[3];
            } else {
                kr = row_ptr<T>(a.k, b, u - n0, kh);
                vr = row_ptr<T>(a.v, b, u - n0, kh);
                ks = a.k.strides[3];
                vs = a.v.strides[3];
            }
            load_piece(dk, kr, ks, c * E, D, ks == 1 && aligned16(kr));
            load_piece(dv, vr, vs, c * E, D, vs == 1 && aligned16(vr));
        }
    };
    // whether a value this thread loaded into buffer `stage` is Inf or NaN
    auto v_nonfinite = [&](int stage) {
        bool bad = false;
        for (int i = tid; i < BN * PR; i += NT) {
            const int r = i / PR, c = i % PR;
            bad |= piece_nonfinite(Vs + (stage * BN + r) * SS + c * E);
        }
        return bad;
    };

    load_tile(lo, 0);
    cp_async_commit();  // group 0: q and the first tile

    const int rg = warp % 4, cs = warp / 4;  // row group (16 rows), column share of the output
    const int r0 = rg * 16;
    const int g = lane >> 2, tq = lane & 3, lrow = lane & 7, lmat = lane >> 3;
    const bool warp_active = r0 < rows;
    const int64_t pw = p_first + r0;                // position of the warp's first row
    const int64_t prow[2] = {pw + g, pw + g + 8};   // positions of this thread's rows
    const float sl2 = (float)a.scale * kLog2e;

    float O[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) O[dn][0] = O[dn][1] = O[dn][2] = O[dn][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    for (int64_t j = 0; j < ntiles; j++) {
        int stage = 0;
        if constexpr (STAGES == 2) {
            stage = (int)(j & 1);
            if (j + 1 < ntiles) {
                load_tile(lo + (j + 1) * BN, stage ^ 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
        } else {
            if (j > 0) {
                load_tile(lo + j * BN, 0);
                cp_async_commit();
            }
            cp_async_wait<0>();
        }
        const bool bad = __syncthreads_or(v_nonfinite(stage)) != 0;

        if (warp_active) {
            const int64_t ts = lo + j * BN;
            const T *Kt = Ks + stage * BN * SS;
            const T *Vt = Vs + stage * BN * SS;
            // key columns of this tile inside each row's window: jlo[r] .. jhi[r]
            int jlo[2], jhi[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int64_t dpos = prow[r] - ts;
                jhi[r] = clamp_to_int(dpos, -1, BN);
                jlo[r] = window_first_col(dpos, W, BN);
            }
            // 8-key blocks inside the window of some row of the warp
            const int wmax = clamp_to_int(pw + 15 - ts, -1, BN), wmin = window_first_col(pw - ts, W, BN);
            bool rel[NB];
#pragma unroll
            for (int nb = 0; nb < NB; nb++) rel[nb] = nb * 8 <= wmax && nb * 8 + 7 >= wmin;

            // S = Q K^T
            float S[NB][4];
#pragma unroll
            for (int nb = 0; nb < NB; nb++) S[nb][0] = S[nb][1] = S[nb][2] = S[nb][3] = 0.f;
#pragma unroll
            for (int kc2 = 0; kc2 < DP / 32; kc2++) {
                uint32_t qa0[4], qa1[4];
                const T *qp = Qs + (r0 + lrow + 8 * (lmat & 1)) * SS + kc2 * 32 + 8 * (lmat >> 1);
                ldmatrix_x4(qa0, qp);       // dims kc2*32 + 0..15
                ldmatrix_x4(qa1, qp + 16);  // dims kc2*32 + 16..31
#pragma unroll
                for (int nb = 0; nb < NB; nb++) {
                    if (!rel[nb]) continue;
                    uint32_t kb[4];
                    ldmatrix_x4(kb, Kt + (nb * 8 + lrow) * SS + kc2 * 32 + 8 * lmat);
                    M::run(S[nb], qa0, kb[0], kb[1]);
                    M::run(S[nb], qa1, kb[2], kb[3]);
                }
            }

            // online softmax, base 2: x = scale * log2(e) * s, -inf outside the window
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int nb = 0; nb < NB; nb++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int col = nb * 8 + 2 * tq + (i & 1), r = i >> 1;
                    const bool in = rel[nb] && col >= jlo[r] && col <= jhi[r];
                    S[nb][i] = in ? S[nb][i] * sl2 : -INFINITY;
                    mx[r] = fmaxf(mx[r], S[nb][i]);
                }
            }
            float mu[2], corr[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 2));
                const float m_new = fmaxf(m_run[r], mx[r]);
                mu[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: weights 0, not NaN
                corr[r] = exp2f(m_run[r] - mu[r]);
                m_run[r] = m_new;
            }
            float psum[2] = {0.f, 0.f};
#pragma unroll
            for (int nb = 0; nb < NB; nb++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    S[nb][i] = rel[nb] ? exp2f(S[nb][i] - mu[i >> 1]) : 0.f;
                    psum[i >> 1] += S[nb][i];
                }
            }
#pragma unroll
            for (int r = 0; r < 2; r++) l_run[r] = l_run[r] * corr[r] + psum[r];
#pragma unroll
            for (int dn = 0; dn < ND; dn++) {
                O[dn][0] *= corr[0];
                O[dn][1] *= corr[0];
                O[dn][2] *= corr[1];
                O[dn][3] *= corr[1];
            }

            if (!bad) {
                // O += P V on the tensor cores
#pragma unroll
                for (int kk = 0; kk < BN / 16; kk++) {
                    if (!rel[2 * kk] && !rel[2 * kk + 1]) continue;
                    const uint32_t pa[4] = {M::pack(S[2 * kk][0], S[2 * kk][1]), M::pack(S[2 * kk][2], S[2 * kk][3]),
                                            M::pack(S[2 * kk + 1][0], S[2 * kk + 1][1]),
                                            M::pack(S[2 * kk + 1][2], S[2 * kk + 1][3])};
                    const T *vp = Vt + (kk * 16 + lrow + 8 * (lmat & 1)) * SS + cs * DPW + 8 * (lmat >> 1);
#pragma unroll
                    for (int dn2 = 0; dn2 < ND / 2; dn2++) {
                        uint32_t vb[4];
                        ldmatrix_x4_trans(vb, vp + dn2 * 16);
                        M::run(O[2 * dn2], pa, vb[0], vb[1]);
                        M::run(O[2 * dn2 + 1], pa, vb[2], vb[3]);
                    }
                }
            } else {
                // a non-finite value in the tile: key by key, only keys inside each row's window
#pragma unroll
                for (int nb = 0; nb < NB; nb++) {
                    if (!rel[nb]) continue;
#pragma unroll
                    for (int jj = 0; jj < 8; jj++) {
                        const int col = nb * 8 + jj, src = (lane & ~3) | (jj >> 1);
                        const float p0 = __shfl_sync(kFullMask, S[nb][jj & 1], src);       // row g
                        const float p1 = __shfl_sync(kFullMask, S[nb][2 + (jj & 1)], src); // row g + 8
                        const bool in0 = col >= jlo[0] && col <= jhi[0], in1 = col >= jlo[1] && col <= jhi[1];
                        const T *vrow = Vt + col * SS + cs * DPW + 2 * tq;
#pragma unroll
                        for (int dn = 0; dn < ND; dn++) {
                            const float v0 = to_float(vrow[dn * 8]), v1 = to_float(vrow[dn * 8 + 1]);
                            if (in0) {
                                O[dn][0] += p0 * v0;
                                O[dn][1] += p0 * v1;
                            }
                            if (in1) {
                                O[dn][2] += p1 * v0;
                                O[dn][3] += p1 * v1;
                            }
                        }
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with buffer `stage` (and, after the last tile, with Qs)
    }

    // O / l in the output dtype, staged over Qs, then stored row by row
    if (warp_active) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            l_run[r] += __shfl_xor_sync(kFullMask, l_run[r], 1);
            l_run[r] += __shfl_xor_sync(kFullMask, l_run[r], 2);
        }
        const float inv0 = 1.f / l_run[0], inv1 = 1.f / l_run[1];
#pragma unroll
        for (int dn = 0; dn < ND; dn++) {
            const int col = cs * DPW + dn * 8 + 2 * tq;
            *reinterpret_cast<uint32_t *>(Qs + (r0 + g) * SS + col) = M::pack(O[dn][0] * inv0, O[dn][1] * inv0);
            *reinterpret_cast<uint32_t *>(Qs + (r0 + g + 8) * SS + col) = M::pack(O[dn][2] * inv1, O[dn][3] * inv1);
        }
    }
    __syncthreads();
    for (int i = tid; i < rows * PR; i += NT) {
        const int r = i / PR, c = i % PR;
        if (c * E >= D) continue;
        T *row = row_ptr_mut<T>(a.out, b, t0 + r, h);
        store_piece(row, a.out.strides[3], Qs + r * SS + c * E, c * E, D, a.out.strides[3] == 1 && aligned16(row));
    }
}

// ---- float32: SIMT kernel ---------------------------------------------------------------

template <int DPC, int RPW>
struct SimtConfig {
    static constexpr int NW = 8, threads = 32 * NW;
    static constexpr int BM = NW * RPW;  // query rows per block
    static constexpr int BN = 32;        // keys per tile: one per lane
    static constexpr int DP = 32 * DPC;  // padded head dim
    static constexpr int KS = DP + 1;    // key row stride (odd: lanes reading key rows hit distinct banks)
    static constexpr size_t smem_bytes = sizeof(float) * (size_t)(BM * DP + BN * KS + BN * DP + BM * BN);
};

template <int DPC, int RPW>
__global__ void __launch_bounds__(256, 2) prefill_simt_kernel(const based_sliding_window_args a, int64_t q_tiles) {
    using C = SimtConfig<DPC, RPW>;
    constexpr int NT = C::threads, BM = C::BM, BN = C::BN, DP = C::DP, KS = C::KS;
    extern __shared__ float smf[];
    float *const Qs = smf;           // [BM][DP] q * scale, zero-padded
    float *const Ks = Qs + BM * DP;  // [BN][KS]
    float *const Vs = Ks + BN * KS;  // [BN][DP]
    float *const Ps = Vs + BN * DP;  // [BM][BN] weights of the tile

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t qt = (int64_t)blockIdx.x % q_tiles, bh = (int64_t)blockIdx.x / q_tiles;
    const int64_t H = a.heads, h = bh % H, b = bh / H;
    const int64_t kh = h / (H / a.kv_heads);
    const int64_t Tn = a.seqlen, W = a.window;
    const int D = (int)a.head_dim;
    const int64_t t0 = qt * BM;
    const int rows = (int)(Tn - t0 < BM ? Tn - t0 : BM);
    const int64_t n0 = tokens_at(a.tokens, b);
    if (!counter_valid(n0, Tn)) {
        fill_nan_rows<float>(a, b, t0, rows, h, tid, NT);
        return;
    }
    const int64_t p_first = n0 + t0, hi = p_first + rows - 1;
    const int64_t lo = p_first - W + 1 > 0 ? p_first - W + 1 : 0;
    const int64_t ntiles = (hi - lo + BN) / BN;
    const float scale = (float)a.scale;

    for (int i = tid; i < BM * DP; i += NT) {
        const int r = i / DP, d = i % DP;
        Qs[i] = r < rows && d < D ? row_ptr<float>(a.q, b, t0 + r, h)[(int64_t)d * a.q.strides[3]] * scale : 0.f;
    }

    float acc[RPW][DPC], m_run[RPW], l_run[RPW];
#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        m_run[rr] = -INFINITY;
        l_run[rr] = 0.f;
#pragma unroll
        for (int c = 0; c < DPC; c++) acc[rr][c] = 0.f;
    }

    for (int64_t j = 0; j < ntiles; j++) {
        const int64_t ts = lo + j * BN;
        for (int i = tid; i < BN * DP; i += NT) {
            const int r = i / DP, d = i % DP;
            const int64_t u = ts + r;
            float kv = 0.f, vv = 0.f;
            if (u <= hi && d < D) {
                if (u < n0) {
                    const int64_t slot = u % W;
                    kv = row_ptr<float>(a.k_cache, b, kh, slot)[(int64_t)d * a.k_cache.strides[3]];
                    vv = row_ptr<float>(a.v_cache, b, kh, slot)[(int64_t)d * a.v_cache.strides[3]];
                } else {
                    kv = row_ptr<float>(a.k, b, u - n0, kh)[(int64_t)d * a.k.strides[3]];
                    vv = row_ptr<float>(a.v, b, u - n0, kh)[(int64_t)d * a.v.strides[3]];
                }
            }
            Ks[r * KS + d] = kv;
            Vs[r * DP + d] = vv;
        }
        __syncthreads();

        // lane = key column: scores of the warp's rows
        float s[RPW];
#pragma unroll
        for (int rr = 0; rr < RPW; rr++) s[rr] = 0.f;
#pragma unroll 8
        for (int d = 0; d < DP; d++) {
            const float kd = Ks[lane * KS + d];
#pragma unroll
            for (int rr = 0; rr < RPW; rr++) s[rr] += Qs[(warp * RPW + rr) * DP + d] * kd;
        }
        int jlo[RPW], jhi[RPW];
#pragma unroll
        for (int rr = 0; rr < RPW; rr++) {
            const int row = warp * RPW + rr;
            const int64_t dpos = p_first + row - ts;
            jhi[rr] = clamp_to_int(dpos, -1, BN);
            jlo[rr] = window_first_col(dpos, W, BN);
            const bool in = lane >= jlo[rr] && lane <= jhi[rr];
            const float x = in ? s[rr] : -INFINITY;
            const float m_new = fmaxf(m_run[rr], warp_max(x));
            const float mu = m_new == -INFINITY ? 0.f : m_new;
            const float corr = expf(m_run[rr] - mu);
            m_run[rr] = m_new;
            const float p = in ? expf(x - mu) : 0.f;
            l_run[rr] = l_run[rr] * corr + warp_sum(p);
            Ps[row * BN + lane] = p;
#pragma unroll
            for (int c = 0; c < DPC; c++) acc[rr][c] *= corr;
        }
        __syncwarp();
#pragma unroll 4
        for (int jj = 0; jj < BN; jj++) {
            float v[DPC];
#pragma unroll
            for (int c = 0; c < DPC; c++) v[c] = Vs[jj * DP + lane + 32 * c];
#pragma unroll
            for (int rr = 0; rr < RPW; rr++) {
                if (jj < jlo[rr] || jj > jhi[rr]) continue;  // outside the window: skipped, not weighted by 0
                const float p = Ps[(warp * RPW + rr) * BN + jj];
#pragma unroll
                for (int c = 0; c < DPC; c++) acc[rr][c] += p * v[c];
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        const int row = warp * RPW + rr;
        if (row >= rows) continue;
        const float inv = 1.f / l_run[rr];
        float *o = row_ptr_mut<float>(a.out, b, t0 + row, h);
#pragma unroll
        for (int c = 0; c < DPC; c++) {
            const int d = lane + 32 * c;
            if (d < D) o[(int64_t)d * a.out.strides[3]] = acc[rr][c] * inv;
        }
    }
}

// ---- host side ----------------------------------------------------------------------------

const char *const kOp = "sliding_window_prefill";

template <typename Kernel>
based_status launch_blocks(Kernel kernel, const based_sliding_window_args &a, int64_t q_tiles, int threads,
                           size_t smem, cudaStream_t stream) {
    const int64_t blocks = q_tiles * a.heads * a.batch;
    if (blocks > INT32_MAX)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED,
                          "%s: B=%lld, T=%lld, H=%lld need %lld thread blocks, more than the CUDA kernel supports "
                          "(2^31 - 1); split the batch",
                          kOp, (long long)a.batch, (long long)a.seqlen, (long long)a.heads, (long long)blocks);
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return cuda_fail(err, kOp, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    kernel<<<(unsigned)blocks, threads, smem, stream>>>(a, q_tiles);
    return check_launch(kOp);
}

template <typename T, int DP>
based_status launch_mma(const based_sliding_window_args &a, cudaStream_t stream) {
    using C = MmaConfig<DP>;
    return launch_blocks(prefill_mma_kernel<T, DP>, a, ceil_div<int64_t>(a.seqlen, C::BM), C::threads, C::smem_bytes,
                         stream);
}

template <int DPC, int RPW>
based_status launch_simt(const based_sliding_window_args &a, cudaStream_t stream) {
    using C = SimtConfig<DPC, RPW>;
    return launch_blocks(prefill_simt_kernel<DPC, RPW>, a, ceil_div<int64_t>(a.seqlen, C::BM), C::threads,
                         C::smem_bytes, stream);
}

template <typename T>
based_status launch_attention(const based_sliding_window_args &a, cudaStream_t stream) {
    const int64_t D = a.head_dim;
    if (D < 1 || D > 256)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "%s: head dim D=%lld is outside the CUDA kernels' 1..256", kOp,
                          (long long)D);
    if constexpr (std::is_same<T, float>::value) {
        if (D <= 32) return launch_simt<1, 4>(a, stream);
        if (D <= 64) return launch_simt<2, 4>(a, stream);
        if (D <= 128) return launch_simt<4, 4>(a, stream);
        return launch_simt<8, 2>(a, stream);
    } else {
        if (D <= 32) return launch_mma<T, 32>(a, stream);
        if (D <= 64) return launch_mma<T, 64>(a, stream);
        if (D <= 128) return launch_mma<T, 128>(a, stream);
        return launch_mma<T, 256>(a, stream);
    }
}

}  // namespace

extern "C" based_status based_cuda_sliding_window_prefill(const based_sliding_window_args *args,
                                                           cudaStream_t stream) {
    const based_sliding_window_args &a = *args;
    if (a.batch == 0 || a.seqlen == 0) return BASED_STATUS_OK;  // nothing to attend, store or count
    BASED_CUDA_DEVICE(a.device.id, kOp);
    return dispatch_float(a.k.dtype, kOp, [&](auto tag) -> based_status {
        using T = decltype(tag);
        if (a.heads > 0) {  // H == 0: no outputs, but the cache and the counters still move
            const based_status st = launch_attention<T>(a, stream);
            if (st != BASED_STATUS_OK) return st;
        }
        return launch_ring_and_tokens<T>(a, stream, true, a.seqlen, kOp);
    });
}
