// sliding_window_decode.cu -- one new token per sequence, sliding-window softmax attention on
// CUDA (SPEC 1.2): based_cuda_sliding_window_decode.
//
// With n = tokens[b]: the new key and value go into ring slot n % W (it held position n - W,
// now outside the window), and query head h attends the L = min(n + 1, W) valid slots:
// positions 0 .. n while the ring is filling (slots 0 .. n), else every slot. So the keys of
// a decode step are exactly ring slots 0 .. L-1, in any order -- the kernel walks them in
// slot order, taking slot n % W from the call's k and v instead of the cache.
//
// Two launches on the caller's stream, nothing allocated, no host round trip, so a decode
// step can be captured in a CUDA graph:
//   1. decode_kernel: one block per (b, kv head, group of <= 8 query heads of that kv head),
//      so the ring of a kv head is read once for all heads of its GQA group (G <= 8; a larger
//      G is split over ceil(G / 8) blocks that each read the ring). The block writes the new
//      key and value into slot n % W (the first block of the kv head only); slot n % W is
//      never read as a key, so no block depends on that write;
//   2. tokens[b] += 1 (sliding_window.cuh), alone because every block of sequence b reads it.
// A counter that is negative or at 2^62 marks the sequence invalid: NaN outputs, its cache
// slots and counter untouched.
//
// Block of 128 threads, per chunk of kc slots (kc <= 128, a multiple of 8, sized so that the
// block's shared memory stays under 46 KiB: no opt-in, 4+ blocks per SM):
//   - K and V rows of the chunk's slots by 16-byte cp.async (element loads for strided or
//     misaligned rows). The first chunk's loads go out before anything else, the counter
//     read included (the ring always has W slots: rows past the valid ones are loaded and
//     never read), so the latencies of the counter, q and the new key and value hide behind
//     them. A row-major key cache is staged [slot][d]; a slot-contiguous key ring
//     (strides[2] == 1) is staged [d][slot], each key dimension of the chunk being one
//     contiguous run. Row strides in shared memory are an odd number of 16-byte units, so
//     the 16-byte score reads are bank-conflict free;
//   - scores: sp adjacent threads per (head g, slot j) (sp = 1..8: as many as keep every
//     thread busy), fp32 dot products with q pre-scaled by scale (held in shared memory as
//     fp32), the partial sums added by shuffles;
//   - online softmax per head by one warp (running max subtracted, fp32, expf: the CPU
//     kernel's arithmetic, so the float32 errors of both are alike);
//   - P V: thread per (head, 16-byte piece of d) -- split over up to 16 key partitions when
//     G * D / (16-byte piece) < 128 -- with fp32 accumulators in shared memory, rescaled per
//     chunk; partitions summed at the end;
//   - the new key and value go into slot n % W from shared memory (no second global read).
//   Every slot of a chunk lies in the window, so every key is weighed (Inf/NaN in a key or
//   value reach this query's output, as on the CPU).
// Measured on the H200 (W=64, D=64, H=Hkv=16, B=256: 4096 blocks, each one chunk; CUDA-graph
// replay): 33 us bf16, 56 us fp32 (55% / 61% of the same-run copy bandwidth). Before, a block
// that read the counter and q ahead of its ring loads, with 64-bit index divisions and scalar
// P V, took 39 / 61 us; ncu then showed the SMs issuing on 75% of cycles, so instruction count
// is what this kernel trims. A persistent variant (blocks walking several items, the next
// item's ring loading through a second buffer) was slower (52 us bf16): fewer blocks per SM,
// each waiting on the same serial latencies.
#include <algorithm>

#include "sliding_window.cuh"

namespace {

using namespace based;
using namespace based::window;

constexpr int kThreads = 128;
constexpr int kGroupMax = 8;         // query heads per block
constexpr int kChunkMax = 128;       // slots per chunk
constexpr int kPartsMax = 16;        // key partitions of P V
constexpr int kSplitMax = 8;         // threads per score (a power of two)
constexpr size_t kSmemBudget = 46 * 1024;

// Sizes and shared-memory layout of one launch (byte offsets, each 16-byte aligned).
struct DecodePlan {
    int gb;   // query heads per block (the last block of a kv head may have fewer)
    int nhg;  // blocks per (b, kv head)
    int kc;   // slots per chunk
    int dq;   // D rounded up to whole 16-byte pieces
    int ds;   // row stride (elements) of K rows and V rows in shared memory
    int rs;   // key partitions of P V
    int sp;   // threads per score (a power of two)
    int sp_log2;
    int64_t group;  // query heads per kv head, H / Hkv
    unsigned off_k, off_v, off_kn, off_vn, off_q, off_p, off_acc, off_stat, smem;
};

// Whether every row of a cache (b, kh, slots from `base` on) is fast: unit stride along d,
// 16-byte aligned start and a row stride of whole 16-byte units.
template <typename T>
__device__ __forceinline__ bool rows_fast(const based_tensor &cache, const T *base) {
    return cache.strides[3] == 1 && aligned16(base) && (cache.strides[2] * (int64_t)sizeof(T)) % 16 == 0;
}

// cp.async (element loads for rows that are not fast) of the keys and values of ring slots
// c0 .. c0+cnt-1 of (b, kv head kh) into Ks and Vs; the caller commits the group. Thread tid
// takes pieces tid, tid + 128, ... of the chunk's rows, its (row, piece) advanced by adding.
template <typename T, bool KT>
__device__ __forceinline__ void load_chunk(const based_sliding_window_args &a, const DecodePlan &pl, int64_t b,
                                           int64_t kh, int64_t c0, int cnt, T *Ks, T *Vs) {
    constexpr int E = 16 / sizeof(T);
    const int tid = threadIdx.x, kc = pl.kc, ds = pl.ds, pieces = pl.dq / E, D = (int)a.head_dim;
    const based_tensor &kcache = a.k_cache, &vcache = a.v_cache;
    const T *const kbase = row_ptr<T>(kcache, b, kh, c0);
    const T *const vbase = row_ptr<T>(vcache, b, kh, c0);
    const int64_t krow = kcache.strides[2], vrow = vcache.strides[2];
    const bool vfast = rows_fast(vcache, vbase);
    const int dr = kThreads / pieces, dc = kThreads - dr * pieces, r0 = tid / pieces, p0 = tid - r0 * pieces;
    if constexpr (KT) {
        const int runs = kc / E;  // per key dimension: a run of slots
        for (int i = tid; i < D * runs; i += kThreads) {
            const int d = i / runs, c = i % runs;
            if (c * E >= cnt) continue;
            const T *run = kbase + (int64_t)d * kcache.strides[3];
            load_piece(Ks + d * kc + c * E, run, krow, c * E, cnt, krow == 1 && aligned16(run));
        }
        for (int r = r0, c = p0; r < cnt;) {
            load_piece(Vs + r * ds + c * E, vbase + r * vrow, vcache.strides[3], c * E, D, vfast);
            r += dr;
            c += dc;
            if (c >= pieces) c -= pieces, r++;
        }
    } else {
        const bool kfast = rows_fast(kcache, kbase);
        for (int r = r0, c = p0; r < cnt;) {
            load_piece(Ks + r * ds + c * E, kbase + r * krow, kcache.strides[3], c * E, D, kfast);
            load_piece(Vs + r * ds + c * E, vbase + r * vrow, vcache.strides[3], c * E, D, vfast);
            r += dr;
            c += dc;
            if (c >= pieces) c -= pieces, r++;
        }
    }
}

template <typename T, bool KT>
__global__ void __launch_bounds__(kThreads) decode_kernel(const based_sliding_window_args a, const DecodePlan pl) {
    constexpr int E = 16 / sizeof(T);
    extern __shared__ uint4 smem_u4[];
    unsigned char *const sm = reinterpret_cast<unsigned char *>(smem_u4);
    T *const Ks = reinterpret_cast<T *>(sm + pl.off_k);       // KT ? [D][kc] : [kc][ds]
    T *const Vs = reinterpret_cast<T *>(sm + pl.off_v);       // [kc][ds]
    T *const Kn = reinterpret_cast<T *>(sm + pl.off_kn);      // [ds] the new key, zero-padded
    T *const Vn = reinterpret_cast<T *>(sm + pl.off_vn);      // [ds] the new value
    float *const qs = reinterpret_cast<float *>(sm + pl.off_q);     // [gb][dq] q * scale
    float *const ps = reinterpret_cast<float *>(sm + pl.off_p);     // [gb][kc] scores, then weights
    float *const acc = reinterpret_cast<float *>(sm + pl.off_acc);  // [rs][gb][dq] unnormalised outputs
    float *const m_s = reinterpret_cast<float *>(sm + pl.off_stat); // [gb] running max
    float *const l_s = m_s + pl.gb;                                 // [gb] running sum of weights
    float *const c_s = l_s + pl.gb;                                 // [gb] rescaling of this chunk

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gb = pl.gb, kc = pl.kc, dq = pl.dq, ds = pl.ds, rs = pl.rs, sp = pl.sp;
    // 32-bit divisions (the grid has < 2^31 blocks, so B, Hkv and nhg each fit): a 64-bit one
    // costs ~70 instructions, and this kernel is short enough for that to show
    const unsigned bx = blockIdx.x, nhg = (unsigned)pl.nhg, Hkv = (unsigned)a.kv_heads;
    const int64_t hg = bx % nhg, bk = bx / nhg;
    const int64_t kh = (unsigned)bk % Hkv, b = (unsigned)bk / Hkv;
    const int64_t G = pl.group;
    const int64_t h0 = kh * G + hg * gb;  // first query head of the block
    const int gcnt = (int)(G - hg * gb < gb ? G - hg * gb : gb);
    const int D = (int)a.head_dim;
    const int64_t W = a.window;
    const T *const knew = row_ptr<T>(a.k, b, 0, kh);
    const T *const vnew = row_ptr<T>(a.v, b, 0, kh);

    // The loads go out first, before the counter is read: the ring always has W slots, so
    // slots 0 .. min(W, kc)-1 may be read whatever tokens[b] is (slots past the valid ones are
    // loaded and never read), and the counter's latency overlaps theirs.
    if (gcnt > 0) load_chunk<T, KT>(a, pl, b, kh, 0, (int)(W < kc ? W : kc), Ks, Vs);
    for (int c = tid; c < dq / E; c += kThreads) {
        load_piece(Kn + c * E, knew, a.k.strides[3], c * E, D, a.k.strides[3] == 1 && aligned16(knew));
        load_piece(Vn + c * E, vnew, a.v.strides[3], c * E, D, a.v.strides[3] == 1 && aligned16(vnew));
    }
    cp_async_commit();

    const int64_t n = tokens_at(a.tokens, b);
    if (!counter_valid(n, 1)) {
        const T nan = nan_value<T>();
        for (int i = tid; i < gcnt * D; i += kThreads) {
            const int g = i / D, d = i % D;
            row_ptr_mut<T>(a.out, b, 0, h0 + g)[(int64_t)d * a.out.strides[3]] = nan;
        }
        cp_async_wait<0>();
        return;
    }
    const int64_t L = n + 1 < W ? n + 1 : W;  // valid slots 0 .. L-1
    const int64_t sn = (n | W) >> 32 == 0 ? (int64_t)((uint32_t)n % (uint32_t)W) : n % W;  // slot of the new token
    const float scale = (float)a.scale;

    for (int i = tid; i < gb * dq; i += kThreads) {
        const int g = (unsigned)i / dq, d = i - g * dq;
        qs[i] = g < gcnt && d < D ? to_float(row_ptr<T>(a.q, b, 0, h0 + g)[(int64_t)d * a.q.strides[3]]) * scale : 0.f;
    }
    for (int i = tid; i < rs * gb * dq; i += kThreads) acc[i] = 0.f;
    for (int i = tid; i < gb; i += kThreads) {
        m_s[i] = -INFINITY;
        l_s[i] = 0.f;
    }

    const int64_t slots = gcnt > 0 ? L : 0;  // no query head here (H == 0): only the cache write below
    for (int64_t c0 = 0; c0 < slots; c0 += kc) {
        const int cnt = (int)(slots - c0 < kc ? slots - c0 : kc);
        const int jn = sn >= c0 && sn < c0 + cnt ? (int)(sn - c0) : -1;  // the new token's row, if here

        // keys and values of slots c0 .. c0+cnt-1 (the first chunk's are on their way already;
        // row jn is loaded too, stale, and never read)
        if (c0 > 0) {
            load_chunk<T, KT>(a, pl, b, kh, c0, cnt, Ks, Vs);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();

        // scores of every (head, slot), sp adjacent threads each, partial sums added by shuffles
        const int total = gcnt * cnt * sp;
        for (int i0 = 0; i0 < total; i0 += kThreads) {
            const int i = i0 + tid;
            const int pair = i >> pl.sp_log2, part = i & (sp - 1), g = (unsigned)pair / cnt, j = pair - g * cnt;
            float s = 0.f;
            if (i < total) {
                const float *qg = qs + g * dq;
                if constexpr (KT) {
                    const T *kp = j == jn ? Kn : Ks + j;
                    const int st = j == jn ? 1 : kc;
                    for (int d = part; d < D; d += sp) s += qg[d] * to_float(kp[d * st]);
                } else {
                    const T *kp = j == jn ? Kn : Ks + j * ds;
                    for (int c = part; c < dq / E; c += sp) {
                        float kf[E];
                        piece_to_float<T>(*reinterpret_cast<const uint4 *>(kp + c * E), kf);
#pragma unroll
                        for (int e = 0; e < E; e += 4) {
                            const float4 qv = *reinterpret_cast<const float4 *>(qg + c * E + e);
                            s += qv.x * kf[e] + qv.y * kf[e + 1] + qv.z * kf[e + 2] + qv.w * kf[e + 3];
                        }
                    }
                }
            }
            for (int o = sp / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (i < total && part == 0) ps[g * kc + j] = s;
        }
        __syncthreads();

        // online softmax of each head over the chunk, one warp per head
        for (int g = warp; g < gcnt; g += kThreads / 32) {
            float *pg = ps + g * kc;
            float mx = -INFINITY;
            for (int j = lane; j < cnt; j += 32) mx = fmaxf(mx, pg[j]);
            mx = warp_max(mx);
            const float m_old = m_s[g], m_new = fmaxf(m_old, mx);
            const float mu = m_new == -INFINITY ? 0.f : m_new;
            const float corr = expf(m_old - mu);
            float sum = 0.f;
            for (int j = lane; j < cnt; j += 32) {
                const float p = expf(pg[j] - mu);
                pg[j] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            __syncwarp();
            if (lane == 0) {
                m_s[g] = m_new;
                l_s[g] = l_s[g] * corr + sum;
                c_s[g] = corr;
            }
        }
        __syncthreads();

        // acc = acc * corr + P V, per (key partition, head, 16-byte piece of d)
        const int pieces = dq / E, units = gb * pieces;
        for (int idx = tid; idx < rs * units; idx += kThreads) {
            const int part = (unsigned)idx / units, unit = idx - part * units;
            const int g = (unsigned)unit / pieces, c = unit - g * pieces;
            if (g >= gcnt) continue;
            const float *pg = ps + g * kc;
            float sum[E];
#pragma unroll
            for (int e = 0; e < E; e++) sum[e] = 0.f;
            for (int j = part; j < cnt; j += rs) {
                const float w = pg[j];
                float vf[E];
                piece_to_float<T>(*reinterpret_cast<const uint4 *>((j == jn ? Vn : Vs + j * ds) + c * E), vf);
#pragma unroll
                for (int e = 0; e < E; e++) sum[e] += w * vf[e];
            }
            float4 *ac = reinterpret_cast<float4 *>(acc + (part * gb + g) * dq + c * E);
            const float corr = c_s[g];
#pragma unroll
            for (int e = 0; e < E / 4; e++) {
                const float4 o = ac[e];
                ac[e] = make_float4(o.x * corr + sum[4 * e], o.y * corr + sum[4 * e + 1], o.z * corr + sum[4 * e + 2],
                                    o.w * corr + sum[4 * e + 3]);
            }
        }
        __syncthreads();  // before the next chunk replaces Ks, Vs, ps and c_s
    }
    if (slots == 0) {  // the new key and value were never waited for
        cp_async_wait<0>();
        __syncthreads();
    }

    for (int i = tid; i < gcnt * D; i += kThreads) {
        const int g = i / D, d = i % D;
        float s = 0.f;
        for (int part = 0; part < rs; part++) s += acc[(part * gb + g) * dq + d];
        row_ptr_mut<T>(a.out, b, 0, h0 + g)[(int64_t)d * a.out.strides[3]] = from_float<T>(s / l_s[g]);
    }
    if (hg == 0) {  // the new key and value into slot n % W, bit for bit (from shared memory)
        T *kd = row_ptr_mut<T>(a.k_cache, b, kh, sn);
        T *vd = row_ptr_mut<T>(a.v_cache, b, kh, sn);
        for (int d = tid; d < D; d += kThreads) {
            kd[(int64_t)d * a.k_cache.strides[3]] = Kn[d];
            vd[(int64_t)d * a.v_cache.strides[3]] = Vn[d];
        }
    }
}

// ---- host side ----------------------------------------------------------------------------

const char *const kOp = "sliding_window_decode";

template <typename T>
DecodePlan make_plan(const based_sliding_window_args &a, bool kt) {
    constexpr int isz = (int)sizeof(T), E = 16 / isz;
    const int D = (int)a.head_dim;
    const int64_t G = a.heads / a.kv_heads;
    DecodePlan p{};
    p.group = G;
    p.nhg = (int)std::max<int64_t>(1, (G + kGroupMax - 1) / kGroupMax);
    p.gb = (int)std::max<int64_t>(1, (G + p.nhg - 1) / p.nhg);
    p.dq = (D + E - 1) / E * E;
    p.ds = p.dq + ((p.dq / E) % 2 == 0 ? E : 2 * E);  // an odd number of 16-byte units
    const int units = p.gb * (p.dq / E);  // P V: a thread per (head, 16-byte piece of d, key partition)
    p.rs = units >= kThreads ? 1 : std::min(kThreads / units, kPartsMax);

    size_t off = 0;
    auto take = [&off](size_t bytes) {
        const size_t at = off;
        off += (bytes + 15) / 16 * 16;
        return (unsigned)at;
    };
    p.off_kn = take((size_t)p.ds * isz);
    p.off_vn = take((size_t)p.ds * isz);
    p.off_q = take((size_t)p.gb * p.dq * 4);
    p.off_acc = take((size_t)p.rs * p.gb * p.dq * 4);
    p.off_stat = take((size_t)3 * p.gb * 4);
    // per slot of a chunk: its key row, value row and one weight per head (+16 for rounding)
    const size_t per_slot = (size_t)(kt ? D : p.ds) * isz + (size_t)p.ds * isz + (size_t)p.gb * 4;
    int64_t kc = (int64_t)((kSmemBudget - off - 48) / per_slot) / 8 * 8;
    kc = std::min<int64_t>(kc, kChunkMax);
    if (a.window < kc) kc = (a.window + 7) / 8 * 8;  // (W + 7 would overflow for W near 2^63)
    kc = std::max<int64_t>(kc, 8);
    p.kc = (int)kc;
    p.off_k = take((size_t)(kt ? D : p.ds) * p.kc * isz);
    p.off_v = take((size_t)p.ds * p.kc * isz);
    p.off_p = take((size_t)p.gb * p.kc * 4);
    p.smem = (unsigned)off;
    int sp = 1;  // threads per score: as many as leave no thread idle, at most one per 16-byte piece
    while (sp < kSplitMax && (int64_t)p.gb * p.kc * sp * 2 <= kThreads && sp * 2 <= (kt ? D : p.dq / E)) sp *= 2;
    p.sp = sp;
    while ((1 << p.sp_log2) < sp) p.sp_log2++;
    return p;
}

template <typename T>
based_status launch_decode(const based_sliding_window_args &a, cudaStream_t stream) {
    if (a.head_dim < 1 || a.head_dim > 256)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "%s: head dim D=%lld is outside the CUDA kernels' 1..256", kOp,
                          (long long)a.head_dim);
    // the slot-contiguous key ring (strides (.., 1, W)) is staged by key dimension
    const bool kt = a.k_cache.strides[2] == 1 && a.k_cache.strides[3] != 1;
    const DecodePlan p = make_plan<T>(a, kt);
    const int64_t blocks = a.batch * a.kv_heads * p.nhg;
    if (blocks > INT32_MAX)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED,
                          "%s: B=%lld, Hkv=%lld need %lld thread blocks, more than the CUDA kernel supports (2^31 - 1)",
                          kOp, (long long)a.batch, (long long)a.kv_heads, (long long)blocks);
    if (kt)
        decode_kernel<T, true><<<(unsigned)blocks, kThreads, p.smem, stream>>>(a, p);
    else
        decode_kernel<T, false><<<(unsigned)blocks, kThreads, p.smem, stream>>>(a, p);
    return check_launch(kOp);
}

}  // namespace

extern "C" based_status based_cuda_sliding_window_decode(const based_sliding_window_args *args, cudaStream_t stream) {
    const based_sliding_window_args &a = *args;
    if (a.batch == 0) return BASED_STATUS_OK;
    BASED_CUDA_DEVICE(a.device.id, kOp);
    return dispatch_float(a.k.dtype, kOp, [&](auto tag) -> based_status {
        using T = decltype(tag);
        const based_status st = launch_decode<T>(a, stream);  // also with H == 0: it stores k, v
        if (st != BASED_STATUS_OK) return st;
        return launch_ring_and_tokens<T>(a, stream, false, 1, kOp);
    });
}
