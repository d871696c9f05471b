/*
 * internal.h -- what the C core's files share and the public header does not show:
 * the per-thread error record, a validated view of a DLTensor (based_view), the
 * argument checks every op runs before it writes, and dtype conversion.
 *
 * Rules every op follows (SPEC 4):
 *   1. build a based_view for every tensor argument (based_view_init);
 *   2. run every check (dtype, shape, device, layout, settings, overlap);
 *   3. only then write. A failing call leaves outputs and states untouched.
 */
#ifndef BASED_INTERNAL_H
#define BASED_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "args.h"
#include "based.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---------------------------------------------------------------------------------
 * Errors: based_fail() (args.h) records a message for this thread and returns the status,
 * so checks read `if (bad) return based_fail(BASED_STATUS_VALUE_ERROR, "...", ...);`
 * --------------------------------------------------------------------------------- */

#define BASED_TRY(expr)                          \
    do {                                         \
        based_status based_try_st_ = (expr);     \
        if (based_try_st_ != BASED_STATUS_OK)    \
            return based_try_st_;                \
    } while (0)

/* ---------------------------------------------------------------------------------
 * dtypes
 * --------------------------------------------------------------------------------- */

#define BASED_DTYPES_FLOAT                                                              \
    ((1u << BASED_DTYPE_FLOAT32) | (1u << BASED_DTYPE_FLOAT64) | (1u << BASED_DTYPE_FLOAT16) | \
     (1u << BASED_DTYPE_BFLOAT16))
#define BASED_DTYPES_INDEX (1u << BASED_DTYPE_INT64)

const char *based_dtype_name(based_dtype dt);
int based_dtype_size(based_dtype dt);

/* ---------------------------------------------------------------------------------
 * based_view: a checked, normalised DLTensor. Strides are in elements and always
 * filled in (a NULL DLTensor.strides becomes row-major); `data` already includes
 * byte_offset. Zero-size views may have data == NULL and must never be touched.
 * --------------------------------------------------------------------------------- */

typedef struct {
    const char *name;      /* the argument's name, for messages ("q", "state.kv") */
    char *data;            /* address of element [0, ..., 0] */
    int32_t ndim;
    int64_t shape[BASED_MAX_NDIM];
    int64_t strides[BASED_MAX_NDIM];
    based_dtype dtype;
    int32_t itemsize;
    DLDevice device;
    int64_t numel;
    int64_t lo, hi;        /* element offsets of the lowest and highest reachable element */
} based_view;

/* Fills v from t. Fails on NULL, ndim out of range, negative sizes, unsupported dtype
 * (TYPE_ERROR, naming code and bits), NULL data for a non-empty tensor, and sizes or
 * strides whose byte extent would overflow int64. */
based_status based_view_init(based_view *v, const DLTensor *t, const char *name);

/* dtype must be in `allowed` (a mask of 1u << based_dtype). */
based_status based_check_dtype(const based_view *v, unsigned allowed);

/* v and ref must have one dtype ("k must have the dtype of q (float32), got float16"). */
based_status based_check_same_dtype(const based_view *v, const based_view *ref);

/* Shape check. expected[i] < 0 accepts any size. dims is a comma-separated list of
 * dimension names for the message, e.g. "B,T,H,Dk". Message:
 *   "k must have shape (B=2, T=5, H=4, Dk=16), got (2, 6, 4, 16)" */
based_status based_check_shape(const based_view *v, int32_t ndim, const int64_t *expected,
                               const char *dims);

/* All views on one device (type and id); NULL entries skipped. */
based_status based_check_same_device(const based_view *const *views, int n);

/* The device rule of SPEC 4, the same for both backends. based_device_of: v's device as a
 * backend, CPU for host memory (kDLCPU, pinned kDLCUDAHost), CUDA with its ordinal for
 * kDLCUDA and kDLCUDAManaged; any other device is a VALUE_ERROR naming `op` and v.
 * based_check_device: views[0..n) (NULL skipped) on one device (based_check_same_device),
 * which based_device_of maps into *device. */
based_status based_device_of(const based_view *v, const char *op, based_device *device);
based_status based_check_device(const based_view *const *views, int n, const char *op, based_device *device);

/* What the CUDA kernels of an op that computes need of the tensors it reads or writes row by
 * row, checked whichever backend the build has so that both refuse the same calls (no-op
 * unless device is CUDA): no float64 tensor (TYPE_ERROR: the CUDA kernels compute in float32,
 * float16 and bfloat16), then unit stride along the last axis where it has size > 1
 * (VALUE_ERROR). Token counters and batch indices are not rows. */
based_status based_check_cuda_rows(const based_view *const *views, int n, based_device device, const char *op);

/* Outputs and states: no two index tuples may address the same element
 * ("out has overlapping memory: stride 0 along axis 2 of size 4"). */
based_status based_check_no_self_overlap(const based_view *v);

/* Writable tensor a must not share memory with b (their byte ranges must be disjoint). */
based_status based_check_disjoint(const based_view *a, const based_view *b);

/* What an op writes: each of written[0..nw) must not overlap itself, another written
 * tensor, or any of read[0..nr). Self-overlaps are reported first. */
based_status based_check_writes(const based_view *const *written, int nw, const based_view *const *read, int nr);

/* A scalar setting must be finite and > 0 (positive) or >= 0 (!positive). */
based_status based_check_scalar(double value, const char *name, int positive);

/* "(2, 6, 4, 16)" into buf; returns buf. */
const char *based_format_shape(const based_view *v, char *buf, size_t size);

/* ---------------------------------------------------------------------------------
 * Scalar conversion. float16 and bfloat16 are stored as uint16_t bit patterns and
 * converted with round-to-nearest-even; NaN stays NaN, overflow becomes inf.
 * --------------------------------------------------------------------------------- */

static inline float based_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t based_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float based_f16_to_f32(uint16_t h);
uint16_t based_f32_to_f16(float f);

/* Element i (an element offset from p) of a float tensor of dtype dt, as float/double. */
static inline float based_load_f32(const char *p, based_dtype dt, int64_t i) {
    switch (dt) {
    case BASED_DTYPE_FLOAT32: return ((const float *)p)[i];
    case BASED_DTYPE_FLOAT64: return (float)((const double *)p)[i];
    case BASED_DTYPE_FLOAT16: return based_f16_to_f32(((const uint16_t *)p)[i]);
    case BASED_DTYPE_BFLOAT16: return based_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return NAN;
    }
}

static inline double based_load_f64(const char *p, based_dtype dt, int64_t i) {
    if (dt == BASED_DTYPE_FLOAT64) return ((const double *)p)[i];
    return (double)based_load_f32(p, dt, i);
}

static inline void based_store_f32(char *p, based_dtype dt, int64_t i, float x) {
    switch (dt) {
    case BASED_DTYPE_FLOAT32: ((float *)p)[i] = x; break;
    case BASED_DTYPE_FLOAT64: ((double *)p)[i] = (double)x; break;
    case BASED_DTYPE_FLOAT16: ((uint16_t *)p)[i] = based_f32_to_f16(x); break;
    case BASED_DTYPE_BFLOAT16: ((uint16_t *)p)[i] = based_f32_to_bf16(x); break;
    default: break;
    }
}

static inline void based_store_f64(char *p, based_dtype dt, int64_t i, double x) {
    if (dt == BASED_DTYPE_FLOAT64)
        ((double *)p)[i] = x;
    else
        based_store_f32(p, dt, i, (float)x);
}

/* Strided row <-> contiguous scratch: n elements starting at p, `stride` elements apart. */
void based_gather_f32(float *dst, const char *p, based_dtype dt, int64_t n, int64_t stride);
void based_gather_f64(double *dst, const char *p, based_dtype dt, int64_t n, int64_t stride);
void based_scatter_f32(char *p, based_dtype dt, int64_t n, int64_t stride, const float *src);
void based_scatter_f64(char *p, based_dtype dt, int64_t n, int64_t stride, const double *src);

/* Aligned scratch memory for kernels (64-byte aligned; NULL on failure or n == 0). */
void *based_scratch_alloc(size_t nbytes);
void based_scratch_free(void *p);

/* The cap BASED_CPU_ISA puts on the CPU kernels an op picks at its first call:
 * "generic" (the portable ones), "avx2" (no AVX-512), unset or anything else: none
 * (based/__init__.py refuses other values at import). */
typedef enum { BASED_ISA_CAP_NONE, BASED_ISA_CAP_AVX2, BASED_ISA_CAP_GENERIC } based_isa_cap;
based_isa_cap based_cpu_isa_cap(void);

/* Threads for a parallel region over `items` independent items doing `work` units in all:
 * based_get_num_threads(), fewer so that each thread gets at least min_per_thread units and
 * at least one item; 1 at least. A region costs a few microseconds to fork and join on an
 * idle machine, and on a busy one it waits for its slowest thread, which may not be
 * scheduled for a time slice (milliseconds): threads only pay when each has a lot to do.
 * BASED_PARALLEL_ANY_SIZE=1 in the environment drops the minimum (for tests). */
int based_threads_for(int64_t items, int64_t work, int64_t min_per_thread);

/* Work per thread below which a region does not start another thread (based_threads_for):
 * bytes streamed by memory-bound loops (decode steps, cache copies: ~20 us per thread at
 * ~10 GB/s), multiply-adds of compute-bound ones (~100 us per thread at ~10 GMAC/s). */
#define BASED_MIN_BYTES_PER_THREAD ((int64_t)256 << 10)
#define BASED_MIN_MACS_PER_THREAD ((int64_t)1 << 20)

/* ---------------------------------------------------------------------------------
 * From checked views to the kernels' arguments (args.h)
 * --------------------------------------------------------------------------------- */

/* v (at most 4 dimensions) as an args tensor: strides copied, axes past v's ndim get stride 0. */
static inline based_tensor based_tensor_of(const based_view *v) {
    based_tensor t;
    memset(&t, 0, sizeof t);
    t.data = v->data;
    for (int32_t i = 0; i < v->ndim && i < 4; i++) t.strides[i] = v->strides[i];
    t.dtype = v->dtype;
    t.itemsize = v->itemsize;
    return t;
}

/* A decode tensor (B, H, d) seen as (B, 1, H, d): strides {s0, 0, s1, s2}. */
static inline based_tensor based_tensor_of_decode(const based_view *v) {
    based_tensor t = based_tensor_of(v);
    t.strides[3] = t.strides[2];
    t.strides[2] = t.strides[1];
    t.strides[1] = 0;
    return t;
}

/* Token counters, a checked (B,) int64 tensor on the host: tokens[b], and tokens[b] += n
 * for every b < batch. */
static inline int64_t based_tokens_at(const based_tensor *tokens, int64_t b) {
    return ((const int64_t *)tokens->data)[b * tokens->strides[0]];
}

static inline void based_tokens_add(const based_tensor *tokens, int64_t batch, int64_t n) {
    for (int64_t b = 0; b < batch; b++) ((int64_t *)tokens->data)[b * tokens->strides[0]] += n;
}

/* The calling thread's index inside a parallel region (0 without OpenMP). */
static inline int based_thread_num(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#endif /* BASED_INTERNAL_H */
