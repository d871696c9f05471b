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
//     misaligned rows). A row-major key cache is staged [slot][d]; the slot-contiguous key ring
//     of based.SlidingWindowCache (strides[2] == 1) is staged [d][slot], each key dimension of
//     the chunk being one contiguous run. Row strides in shared memory are an odd number of
//     16-byte units, so the 16-byte score reads are bank-conflict free;
//   - scores: thread per (head g, slot j), fp32 dot products with q pre-scaled by scale
//     (held in shared memory as fp32);
//   - online softmax per head by one warp (running max subtracted, fp32, expf: the CPU
//     kernel's arithmetic, so the float32 errors of both are alike);
//   - P V: thread per (head, d) -- split over up to 16 key partitions when G * D < 128 -- with
//     fp32 accumulators in shared memory, rescaled per chunk; partitions summed at the end.
//   Every slot of a chunk lies in the window, so every key is weighed (Inf/NaN in a key or
//   value reach this query's output, as on the CPU).
// Why it should reach the target (W=64, D=64, H=Hkv=16, B=256: 4096 blocks, each one chunk):
//   each block moves its 16 KiB (bf16) or 32 KiB (fp32) of ring with 8 (16) 16-byte cp.async
//   per thread, all in flight at once; 19 KiB (35 KiB) of shared memory and ~40 registers
//   allow 11 (6) blocks per SM, i.e. ~200 KiB of loads in flight per SM, more than the
//   ~30 KiB per SM that 4.8 TB/s at ~1 us latency needs; the arithmetic (~12 k FMAs a block)
//   is small next to the loads. B = 1: 16 blocks, one load round trip plus ~1 us of
//   arithmetic, then the 1-thread-per-sequence counter launch.
#include <algorithm>

#include "sliding_window.cuh"

namespace {

using namespace based;
using namespace based::window;

constexpr int kThreads = 128;
constexpr int kGroupMax = 8;         // query heads per block
constexpr int kChunkMax = 128;       // slots per chunk
constexpr int kPartsMax = 16;        // key partitions of P V
constexpr size_t kSmemBudget = 46 * 1024;

// Sizes and shared-memory layout of one launch (byte offsets, each 16-byte aligned).
struct DecodePlan {
    int gb;   // query heads per block (the last block of a kv head may have fewer)
    int nhg;  // blocks per (b, kv head)
    int kc;   // slots per chunk
    int dq;   // D rounded up to whole 16-byte pieces
    int ds;   // row stride (elements) of K rows and V rows in shared memory
    int rs;   // key partitions of P V
    unsigned off_k, off_v, off_kn, off_vn, off_q, off_p, off_acc, off_stat, smem;
};

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
    float *const acc = reinterpret_cast<float *>(sm + pl.off_acc);  // [rs][gb][D] unnormalised outputs
    float *const m_s = reinterpret_cast<float *>(sm + pl.off_stat); // [gb] running max
    float *const l_s = m_s + pl.gb;                                 // [gb] running sum of weights
    float *const c_s = l_s + pl.gb;                                 // [gb] rescaling of this chunk

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gb = pl.gb, kc = pl.kc, dq = pl.dq, ds = pl.ds, rs = pl.rs;
    const int64_t hg = (int64_t)blockIdx.x % pl.nhg, bk = (int64_t)blockIdx.x / pl.nhg;
    const int64_t Hkv = a.kv_heads, kh = bk % Hkv, b = bk / Hkv;
    const int64_t G = a.heads / Hkv;
    const int64_t h0 = kh * G + hg * gb;  // first query head of the block
    const int gcnt = (int)(G - hg * gb < gb ? G - hg * gb : gb);
    const int D = (int)a.head_dim;
    const int64_t W = a.window;

    const int64_t n = tokens_at(a.tokens, b);
    if (!counter_valid(n, 1)) {
        const T nan = nan_value<T>();
        for (int i = tid; i < gcnt * D; i += kThreads) {
            const int g = i / D, d = i % D;
            row_ptr_mut<T>(a.out, b, 0, h0 + g)[(int64_t)d * a.out.strides[3]] = nan;
        }
        return;
    }
    const int64_t L = n + 1 < W ? n + 1 : W;  // valid slots 0 .. L-1
    const int64_t sn = n % W;                 // slot of the new token
    const float scale = (float)a.scale;
    const T *const knew = row_ptr<T>(a.k, b, 0, kh);
    const T *const vnew = row_ptr<T>(a.v, b, 0, kh);

    for (int c = tid; c < dq / E; c += kThreads) {
        load_piece(Kn + c * E, knew, a.k.strides[3], c * E, D, a.k.strides[3] == 1 && aligned16(knew));
        load_piece(Vn + c * E, vnew, a.v.strides[3], c * E, D, a.v.strides[3] == 1 && aligned16(vnew));
    }
    for (int i = tid; i < gb * dq; i += kThreads) {
        const int g = i / dq, d = i % dq;
        qs[i] = g < gcnt && d < D ? to_float(row_ptr<T>(a.q, b, 0, h0 + g)[(int64_t)d * a.q.strides[3]]) * scale : 0.f;
    }
    for (int i = tid; i < rs * gb * D; i += kThreads) acc[i] = 0.f;
    for (int i = tid; i < gb; i += kThreads) {
        m_s[i] = -INFINITY;
        l_s[i] = 0.f;
    }

    const based_tensor &kcache = a.k_cache, &vcache = a.v_cache;
    const int64_t slots = gcnt > 0 ? L : 0;  // no query head here (H == 0): only the cache write below
    for (int64_t c0 = 0; c0 < slots; c0 += kc) {
        const int cnt = (int)(slots - c0 < kc ? slots - c0 : kc);
        const int jn = sn >= c0 && sn < c0 + cnt ? (int)(sn - c0) : -1;  // the new token's row, if here

        // keys and values of slots c0 .. c0+cnt-1 (row jn is loaded too, stale, and never read)
        if constexpr (KT) {
            const int pieces = kc / E;  // per key dimension: a run of slots
            for (int i = tid; i < D * pieces; i += kThreads) {
                const int d = i / pieces, c = i % pieces;
                if (c * E >= cnt) continue;
                const T *run = row_ptr<T>(kcache, b, kh, c0) + (int64_t)d * kcache.strides[3];
                load_piece(Ks + d * kc + c * E, run, kcache.strides[2], c * E, cnt,
                           kcache.strides[2] == 1 && aligned16(run));
            }
        } else {
            const int pieces = dq / E;
            for (int i = tid; i < cnt * pieces; i += kThreads) {
                const int r = i / pieces, c = i % pieces;
                const T *row = row_ptr<T>(kcache, b, kh, c0 + r);
                load_piece(Ks + r * ds + c * E, row, kcache.strides[3], c * E, D,
                           kcache.strides[3] == 1 && aligned16(row));
            }
        }
        {
            const int pieces = dq / E;
            for (int i = tid; i < cnt * pieces; i += kThreads) {
                const int r = i / pieces, c = i % pieces;
                const T *row = row_ptr<T>(vcache, b, kh, c0 + r);
                load_piece(Vs + r * ds + c * E, row, vcache.strides[3], c * E, D,
                           vcache.strides[3] == 1 && aligned16(row));
            }
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        // scores of every (head, slot)
        for (int i = tid; i < gcnt * cnt; i += kThreads) {
            const int g = i / cnt, j = i % cnt;
            const float *qg = qs + g * dq;
            float s = 0.f;
            if constexpr (KT) {
                const T *kp = j == jn ? Kn : Ks + j;
                const int st = j == jn ? 1 : kc;
                for (int d = 0; d < D; d++) s += qg[d] * to_float(kp[d * st]);
            } else {
                const T *kp = j == jn ? Kn : Ks + j * ds;
                for (int c = 0; c < dq / E; c++) {
                    float kf[E];
                    piece_to_float<T>(*reinterpret_cast<const uint4 *>(kp + c * E), kf);
#pragma unroll
                    for (int e = 0; e < E; e++) s += qg[c * E + e] * kf[e];
                }
            }
            ps[g * kc + j] = s;
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

        // acc = acc * corr + P V, per (key partition, head, d)
        const int items = gb * D;
        for (int idx = tid; idx < rs * items; idx += kThreads) {
            const int part = idx / items, item = idx % items, g = item / D, d = item % D;
            if (g >= gcnt) continue;
            const float *pg = ps + g * kc;
            float s = 0.f;
            for (int j = part; j < cnt; j += rs) s += pg[j] * to_float((j == jn ? Vn : Vs + j * ds)[d]);
            float *ac = acc + (part * gb + g) * D + d;
            *ac = *ac * c_s[g] + s;
        }
        __syncthreads();  // before the next chunk replaces Ks, Vs, ps and c_s
    }

    for (int i = tid; i < gcnt * D; i += kThreads) {
        const int g = i / D, d = i % D;
        float s = 0.f;
        for (int part = 0; part < rs; part++) s += acc[(part * gb + g) * D + d];
        row_ptr_mut<T>(a.out, b, 0, h0 + g)[(int64_t)d * a.out.strides[3]] = from_float<T>(s / l_s[g]);
    }
    if (hg == 0) {  // the new key and value into slot n % W, bit for bit
        T *kd = row_ptr_mut<T>(kcache, b, kh, sn);
        T *vd = row_ptr_mut<T>(vcache, b, kh, sn);
        for (int d = tid; d < D; d += kThreads) {
            kd[(int64_t)d * kcache.strides[3]] = knew[(int64_t)d * a.k.strides[3]];
            vd[(int64_t)d * vcache.strides[3]] = vnew[(int64_t)d * a.v.strides[3]];
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
    p.nhg = (int)std::max<int64_t>(1, (G + kGroupMax - 1) / kGroupMax);
    p.gb = (int)std::max<int64_t>(1, (G + p.nhg - 1) / p.nhg);
    p.dq = (D + E - 1) / E * E;
    p.ds = p.dq + ((p.dq / E) % 2 == 0 ? E : 2 * E);  // an odd number of 16-byte units
    const int items = p.gb * D;
    p.rs = items >= kThreads ? 1 : std::min(kThreads / items, kPartsMax);

    size_t off = 0;
    auto take = [&off](size_t bytes) {
        const size_t at = off;
        off += (bytes + 15) / 16 * 16;
        return (unsigned)at;
    };
    p.off_kn = take((size_t)p.ds * isz);
    p.off_vn = take((size_t)p.ds * isz);
    p.off_q = take((size_t)p.gb * p.dq * 4);
    p.off_acc = take((size_t)p.rs * p.gb * D * 4);
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
