/*
 * based.h -- the whole C interface of `based`.
 *
 * BASED (Arora et al., "Simple linear attention language models balance the
 * recall-throughput tradeoff", ICML 2024) mixes tokens with two cheap attentions:
 *
 *   - Taylor linear attention: K(q, k) = 1 + s + s^2/2 with s = scale * q.k, a
 *     global attention whose recurrent state has a fixed size (paper Sec. 4.1, Eq. 4);
 *   - sliding-window softmax attention over the last `window` tokens (Sec. 4).
 *
 * This header is usable from plain C with no Python. Every op takes DLTensor
 * pointers (csrc/dlpack.h), checks everything before it writes anything, and
 * returns a based_status; on failure based_last_error() holds a message for the
 * calling thread that names the argument, what was expected and what was given.
 * Nothing here aborts or exits on bad input, and nothing allocates memory that the
 * caller sees: outputs and states are caller-owned tensors.
 *
 * Streams: every op takes a `void *stream` (in its params struct, or as its last argument),
 * the cudaStream_t to run on when its tensors are CUDA tensors; NULL is the legacy default
 * stream, and on the CPU it is ignored. A CUDA call returns once its work is queued.
 *
 * Glossary (used in every shape comment):
 *   B  batch          T  sequence length (tokens)       H   query heads
 *   Hkv key/value heads (H % Hkv == 0, grouped-query attention)
 *   Dk feature dim of q/k for linear attention (16 in the paper)
 *   Dv value head dim (64 in the paper's 360M model, 112 in the 1.3B)
 *   D  head dim of sliding-window attention      W  window (tokens attended)
 *   F  Taylor feature count = 1 + Dk + Dk(Dk+1)/2 (153 for Dk = 16)
 *
 * Layouts: prefill tensors are (B, T, H, dim), decode tensors (B, H, dim). Any
 * element strides are accepted on the CPU (zero and negative strides included for
 * inputs; outputs and states must not overlap themselves). Compute dtypes are
 * float32, float64, float16 and bfloat16; accumulation is float32 (float64 for
 * float64 inputs). Outputs have the dtype of v.
 *
 * Devices: every tensor of a call lives on one device, which picks where the op runs:
 * CPU memory (kDLCPU, pinned kDLCUDAHost) runs the CPU kernels; CUDA memory (kDLCUDA,
 * kDLCUDAManaged) the CUDA kernels of a build with nvcc, on that device, asynchronously on
 * the stream the call passes (NULL: the legacy default stream). Both backends refuse the
 * same calls with the same messages, and CUDA adds two rules, checked in every build: no
 * float64 tensors (TypeError: the CUDA kernels compute in float32, float16 and bfloat16),
 * and each tensor an op reads or writes by rows (q, k, v, out, the state, the cache, x)
 * has unit stride along its last dim when that dim is longer than 1 (ValueError). Token
 * counters of CUDA tensors are not read on the host (kernels/based_cuda.h says what the
 * kernels do with them). A build without nvcc answers CUDA tensors that pass the checks
 * with BASED_STATUS_NOT_IMPLEMENTED, naming the op; so do the _ref twins, on the CPU only.
 *
 * Worked example (C, no Python): prefill a prompt, then decode one token.
 *
 *     based_linear_attention_params p = based_linear_attention_params_default(16);
 *     // q, k: (B, T, H, 16) float32; v, o: (B, T, H, 64); kv: (B, H, 153, 64) float32,
 *     // ksum: (B, H, 153) float32, tokens: (B,) int64 -- all zero-filled by the caller.
 *     if (based_linear_attention_prefill(&q, &k, &v, &kv, &ksum, &tokens, &o, &p) != BASED_STATUS_OK)
 *         fprintf(stderr, "%s\n", based_last_error());
 *     // q1, k1: (B, H, 16), v1, o1: (B, H, 64): one new token per sequence
 *     based_linear_attention_decode(&q1, &k1, &v1, &kv, &ksum, &tokens, &o1, &p);
 */
#ifndef BASED_H
#define BASED_H

#include <stddef.h>
#include <stdint.h>

#include "dlpack.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define BASED_API
#else
#define BASED_API __attribute__((visibility("default")))
#endif

#define BASED_VERSION "0.1.0"

/* ---------------------------------------------------------------------------------
 * Status and errors
 * --------------------------------------------------------------------------------- */

typedef enum {
    BASED_STATUS_OK = 0,
    BASED_STATUS_TYPE_ERROR = 1,       /* wrong dtype or kind of argument (Python: TypeError) */
    BASED_STATUS_VALUE_ERROR = 2,      /* shape, stride, device, setting (Python: ValueError) */
    BASED_STATUS_OUT_OF_MEMORY = 3,    /* scratch allocation failed (Python: MemoryError) */
    BASED_STATUS_NOT_IMPLEMENTED = 4,  /* valid input this build has no kernel for, e.g. CUDA
                                          tensors in a CPU-only build (Python: NotImplementedError) */
    BASED_STATUS_CUDA_ERROR = 5,       /* the CUDA runtime failed (Python: RuntimeError) */
    BASED_STATUS_INTERNAL_ERROR = 6,   /* a bug in based (Python: RuntimeError) */
} based_status;

/* A short constant name for a status, e.g. "value error". Never NULL. */
BASED_API const char *based_status_str(based_status status);

/* The message of the last failed call on this thread ("" if none). Valid until the
 * next based call on the same thread. */
BASED_API const char *based_last_error(void);
BASED_API void based_clear_error(void);

/* ---------------------------------------------------------------------------------
 * Build information
 * --------------------------------------------------------------------------------- */

BASED_API const char *based_version(void);
/* 1 if the library was compiled with nvcc (kernels/ linked in), else 0. */
BASED_API int based_built_with_cuda(void);
/* Number of usable CUDA devices: 0 when built without CUDA, with no driver or no GPU.
 * Never fails; safe to call on machines without a GPU. */
BASED_API int based_cuda_device_count(void);
/* 1 if compiled with OpenMP, else 0 (the CPU ops then run on the calling thread). */
BASED_API int based_built_with_openmp(void);

/* ---------------------------------------------------------------------------------
 * Threads of the CPU ops
 * --------------------------------------------------------------------------------- */

/* Threads the CPU ops may use from now on, for the whole process: n >= 1, or 0 to go back
 * to the default. Safe to call from any thread, also while ops run (a running op keeps the
 * count it started with). VALUE_ERROR for n < 0. An op runs on fewer threads when its work
 * is too small to keep each thread busy for a while (a decode step reading less than
 * 256 KiB of state per thread, a short prompt): waking a thread costs microseconds on an
 * idle machine and up to a scheduler time slice (milliseconds) on a busy one. */
BASED_API based_status based_set_num_threads(int n);

/* The threads a CPU op started now on this thread may use: the count set by
 * based_set_num_threads, else the default, omp_get_max_threads() of the calling thread
 * (OMP_NUM_THREADS, else one per CPU; PyTorch's torch.set_num_threads sets it too, as
 * torch and based share the process's OpenMP runtime) capped at omp_get_num_procs()
 * (the CPUs this process may run on): threads beyond the cores only wait for each other.
 * 1 without OpenMP. */
BASED_API int based_get_num_threads(void);

/* based_get_num_threads() (its former name, kept). */
BASED_API int based_max_threads(void);
/* The compute capabilities the CUDA kernels were compiled for, ';'-separated ("80;86;89;90"),
 * or "" when built without CUDA. */
BASED_API const char *based_cuda_archs(void);
/* The CPU kernels `op` runs on this machine, picked at its first call from the CPU and the
 * environment variable BASED_CPU_ISA ("generic", or "avx2": no AVX-512):
 *   "linear_attention": "avx2+fma" or "generic";  "sliding_window": "avx512", "avx2" or "generic".
 * NULL for any other op (the others have one CPU kernel). */
BASED_API const char *based_cpu_kernel_isa(const char *op);

/* Limits of the ops; a call beyond one fails with BASED_STATUS_VALUE_ERROR naming it. */
#define BASED_MAX_NDIM 16          /* dimensions of any tensor argument */
#define BASED_MAX_FEATURE_DIM 32   /* Dk of linear attention (F = 561 at Dk = 32) */
#define BASED_MAX_CHUNK_SIZE 1024  /* based_linear_attention_params.chunk_size */
#define BASED_MAX_HEAD_DIM 256     /* D of sliding-window attention */
#define BASED_MAX_FEATURE_MAP_DIM 3037000498LL /* Dk of based_taylor_feature_dim: F fits int64 */

/* ---------------------------------------------------------------------------------
 * CUDA memory, for callers with no array library at hand (based.Buffer). Each call
 * makes `device` current for its duration (the caller's device is restored) and has
 * finished when it returns. Without CUDA in the build: BASED_STATUS_NOT_IMPLEMENTED.
 * A CUDA failure is BASED_STATUS_CUDA_ERROR (OUT_OF_MEMORY when memory ran out) with
 * the runtime's words in based_last_error().
 * --------------------------------------------------------------------------------- */

/* *ptr = nbytes of zero-filled memory on `device` (NULL on failure). */
BASED_API based_status based_cuda_malloc_zeroed(void **ptr, size_t nbytes, int device);
/* Frees what based_cuda_malloc_zeroed returned; safe from any thread. */
BASED_API based_status based_cuda_free(void *ptr, int device);
/* nbytes from src to dst, either of them host or device memory (cudaMemcpyDefault). */
BASED_API based_status based_cuda_memcpy(void *dst, const void *src, size_t nbytes, int device);

/* ---------------------------------------------------------------------------------
 * Taylor feature map (SPEC 1.1; paper Sec. 4.1, Eq. 4), compact order:
 *   phi(x) = [1, sqrt(scale) x_i (i < Dk),
 *             scale/sqrt(2) x_i^2 (i == j), scale x_i x_j (i < j)]   (upper triangle, row-major)
 * so that phi(q) . phi(k) = 1 + s + s^2/2 with s = scale * q.k.
 * --------------------------------------------------------------------------------- */

/* F = 1 + Dk + Dk(Dk+1)/2, or -1 if head_dim < 1 or F would overflow int64. */
BASED_API int64_t based_taylor_feature_dim(int64_t head_dim);

/* x: (..., Dk) -> out: (..., F), same leading dims and dtype as x; scale > 0 and finite.
 * Computed in float32 (float64 for float64 x). out must not overlap x or itself.
 * stream: cudaStream_t for CUDA tensors (NULL: the legacy default stream); ignored on CPU. */
BASED_API based_status based_taylor_feature_map(const DLTensor *x, DLTensor *out, double scale, void *stream);

/* ---------------------------------------------------------------------------------
 * Taylor linear attention (SPEC 1.1, 3)
 *
 * State of one (b, h) after tokens 0..t (compact feature order above):
 *   kv[f, :] = sum_u phi(k_u)[f] v_u        kv:   (B, H, F, Dv)
 *   ksum[f]  = sum_u phi(k_u)[f]            ksum: (B, H, F)
 *   tokens[b] = number of tokens folded in  tokens: (B,) int64
 * Output: num_t = phi(q_t) @ kv, den_t = phi(q_t) @ ksum (state including token t),
 *   o_t = num_t / (den_t + eps) if normalize, else num_t.
 * kv and ksum share one dtype: float32 (default), float64, bfloat16 or float16.
 * --------------------------------------------------------------------------------- */

typedef struct {
    double scale;       /* s = scale * q.k; > 0 and finite. Default 1/sqrt(Dk). */
    int normalize;      /* nonzero: divide by the normaliser (default 1) */
    double eps;         /* added to the normaliser; >= 0 and finite (default 1e-6) */
    int64_t chunk_size; /* prefill chunk length C; 0 picks the default */
    void *stream;       /* cudaStream_t for CUDA tensors (NULL: legacy default); ignored on CPU */
} based_linear_attention_params;

BASED_API based_linear_attention_params based_linear_attention_params_default(int64_t head_dim);

/* Chunked prefill, continuing from (kv, ksum, tokens) and updating them in place.
 *   q, k: (B, T, H, Dk), 1 <= Dk <= 32;  v, out: (B, T, H, Dv);  T >= 0.
 * q, k, v share one dtype; out has it too. Compute is float64 when the inputs or the
 * state are float64, else float32. The state is read once and written once per call, so
 * a float32/bfloat16/float16 state bounds only what is carried between calls, and a
 * float64 state accumulates in float64 even for float32 inputs. tokens[b] += T.
 * Messages name the state tensors "state.kv", "state.ksum", "state.tokens". On x86-64
 * the AVX2+FMA kernels run when the CPU has both (BASED_CPU_ISA=generic in the
 * environment forces the portable ones). */
BASED_API based_status based_linear_attention_prefill(
    const DLTensor *q, const DLTensor *k, const DLTensor *v,
    DLTensor *kv, DLTensor *ksum, DLTensor *tokens, DLTensor *out,
    const based_linear_attention_params *params);

/* One token per sequence: folds (k, v) into the state, then reads it with q, in one
 * pass over the state (each element loaded and stored once). tokens[b] += 1.
 *   q, k: (B, H, Dk);  v, out: (B, H, Dv). Compute type as for the prefill; the state is
 * rounded to its dtype once per token. */
BASED_API based_status based_linear_attention_decode(
    const DLTensor *q, const DLTensor *k, const DLTensor *v,
    DLTensor *kv, DLTensor *ksum, DLTensor *tokens, DLTensor *out,
    const based_linear_attention_params *params);

/* Plain-loop reference twins of the two kernels above (same contract, CPU only). */
BASED_API based_status based_linear_attention_prefill_ref(
    const DLTensor *q, const DLTensor *k, const DLTensor *v,
    DLTensor *kv, DLTensor *ksum, DLTensor *tokens, DLTensor *out,
    const based_linear_attention_params *params);
BASED_API based_status based_linear_attention_decode_ref(
    const DLTensor *q, const DLTensor *k, const DLTensor *v,
    DLTensor *kv, DLTensor *ksum, DLTensor *tokens, DLTensor *out,
    const based_linear_attention_params *params);

/* Conversion to and from the paper code's expanded layout (F273 = 1 + Dk + Dk^2 rows,
 * [1, sqrt(scale) x, scale/sqrt(2) vec(x x^T)], so phi273(q).phi273(k) = 1 + s + s^2/2).
 *   kv: (B, H, F, Dv), ksum: (B, H, F)  <->  kv_exp: (B, H, F273, Dv), ksum_exp: (B, H, F273)
 * Row (i, j) of the expanded block holds scale/sqrt(2) x_i x_j, so an off-diagonal compact
 * row is split as row/sqrt(2) into (i, j) and (j, i); the conversion needs no scale.
 * stream: cudaStream_t for CUDA tensors (NULL: the legacy default stream); ignored on CPU. */
BASED_API based_status based_linear_state_to_expanded(
    const DLTensor *kv, const DLTensor *ksum, DLTensor *kv_exp, DLTensor *ksum_exp, void *stream);
BASED_API based_status based_linear_state_from_expanded(
    const DLTensor *kv_exp, const DLTensor *ksum_exp, DLTensor *kv, DLTensor *ksum, void *stream);

/* ---------------------------------------------------------------------------------
 * Sliding-window attention (SPEC 1.2, 3)
 *
 * Query t attends to keys u in (t - W, t]: o_t = softmax_u(scale q_t.k_u) v_u, in
 * float32 with the running max subtracted (flash-attention window_size=(W-1, 0)).
 * Cache: ring buffers k_cache, v_cache: (B, Hkv, W, D); the key of absolute position
 * p of sequence b lives in slot p % W; tokens[b] counts the positions seen, so the
 * valid slots are the last min(tokens[b], W) positions.
 * --------------------------------------------------------------------------------- */

typedef struct {
    int64_t window;     /* W >= 1: keys attended per query, the query's own included */
    double scale;       /* > 0 and finite; default 1/sqrt(D) */
    void *stream;       /* cudaStream_t for CUDA tensors; ignored on CPU */
} based_sliding_window_params;

/*   q, out: (B, T, H, D);  k, v: (B, T, Hkv, D);  cache as above (continued and
 *   updated in place: queries also attend to the cached keys before them). */
BASED_API based_status based_sliding_window_prefill(
    const DLTensor *q, const DLTensor *k, const DLTensor *v,
    DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
    const based_sliding_window_params *params);

/*   q, out: (B, H, D);  k, v: (B, Hkv, D): writes (k, v) into its slot, then attends. */
BASED_API based_status based_sliding_window_decode(
    const DLTensor *q, const DLTensor *k, const DLTensor *v,
    DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
    const based_sliding_window_params *params);

BASED_API based_status based_sliding_window_prefill_ref(
    const DLTensor *q, const DLTensor *k, const DLTensor *v,
    DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
    const based_sliding_window_params *params);
BASED_API based_status based_sliding_window_decode_ref(
    const DLTensor *q, const DLTensor *k, const DLTensor *v,
    DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
    const based_sliding_window_params *params);

/* ---------------------------------------------------------------------------------
 * State helpers, shared by the linear-attention state and the window cache. They
 * work on any tensor whose axis 0 is the batch, in any supported dtype
 * (float32/float64/float16/bfloat16/int64), any strides. They run on CUDA when a
 * tensor is there; copy and gather may also move rows between the host and a GPU or
 * two GPUs. Batch indices are read on the host: they must be in CPU memory. stream:
 * cudaStream_t for CUDA tensors (NULL: the legacy default stream); ignored on CPU.
 * --------------------------------------------------------------------------------- */

/* Zero t[i] for every i in batch_indices (int64, 1-D; NULL: all of t). Indices may be
 * negative (Python style); out-of-range indices fail before anything is written. */
BASED_API based_status based_state_zero(DLTensor *t, const DLTensor *batch_indices, void *stream);

/* dst[...] = src[...]: same shape, any strides; dst must not overlap itself nor share
 * memory with src. Float dtypes convert (round to nearest even); int64 copies to int64. */
BASED_API based_status based_state_copy(DLTensor *dst, const DLTensor *src, void *stream);

/* dst[i] = src[indices[i]] along axis 0 (beam-search reordering). dst may be src
 * (reordering in place) when dst.shape[0] == len(indices). */
BASED_API based_status based_state_gather(DLTensor *dst, const DLTensor *src, const DLTensor *indices,
                                          void *stream);

#ifdef __cplusplus
}
#endif

#endif /* BASED_H */
