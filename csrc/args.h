/*
 * args.h -- the seam between the checks and the kernels: one plain struct of checked
 * arguments per op, consumed by both backends (the CPU kernels in csrc/, the CUDA
 * kernels in kernels/, which take it by value).
 *
 * How a call flows (every public op of based.h):
 *
 *   based_linear_attention_prefill(DLTensor *q, ...)                 csrc/dispatch.c
 *     1. based_linear_attention_check(&args, ..., BASED_PHASE_PREFILL, op)
 *            every check of SPEC 4, shared by both backends, writes nothing    csrc/<op>.c
 *     2. args.device.kind == BASED_DEVICE_CUDA
 *            ? based_cuda_linear_attention_prefill(&args, stream)              kernels/<op>_*.cu
 *            : based_cpu_linear_attention_prefill(&args)                       csrc/<op>.c
 *
 * csrc/ops.h lists every op's check, CPU kernel, reference twin and CUDA kernel file.
 *
 * Everything here is plain C (no OpenMP, no CUDA types) so that nvcc compiles it as C++.
 * Sizes and strides are int64 everywhere: B*T*H*D beyond 2^31 elements is indexed right.
 * Vocabulary (the same words in C, CUDA, Python, tests, benchmarks):
 *   op:     linear_attention, sliding_window, taylor_feature_map, state (zero/copy/gather),
 *           linear_state (to/from expanded)
 *   phase:  prefill (B, T, ...) and decode (one token: T = 1)
 *   args:   the checked arguments of one call (this file);  params: the user's settings
 *           (based.h: based_linear_attention_params, based_sliding_window_params)
 *   kernel: the fast implementation of an op on one backend;  ref: its plain-loop twin (CPU)
 */
#ifndef BASED_ARGS_H
#define BASED_ARGS_H

#include <stdint.h>

#include "based.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Records a message for this thread (based_last_error) and returns status. */
based_status based_fail(based_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

typedef enum {
    BASED_DTYPE_FLOAT32 = 0,
    BASED_DTYPE_FLOAT64 = 1,
    BASED_DTYPE_FLOAT16 = 2,
    BASED_DTYPE_BFLOAT16 = 3,
    BASED_DTYPE_INT64 = 4,
    BASED_DTYPE_COUNT_ = 5,
} based_dtype;

typedef enum { BASED_PHASE_PREFILL = 0, BASED_PHASE_DECODE = 1 } based_phase;

typedef enum { BASED_DEVICE_CPU = 0, BASED_DEVICE_CUDA = 1 } based_device_kind;

typedef struct {
    based_device_kind kind;
    int32_t id;        /* CUDA device ordinal; 0 on the CPU */
} based_device;

/* One tensor argument of an op after its checks: the address of element [0, 0, 0, 0]
 * (byte_offset applied; NULL for an empty tensor, never dereferenced then) and element
 * strides. Prefill tensors are (B, T, H, d); decode tensors are seen as (B, 1, H, d)
 * with strides[1] = 0, so both phases share one indexing. Unused axes have stride 0.
 * On CUDA every tensor an op reads or writes row-wise has strides[3] == 1 (checked). */
typedef struct {
    char *data;
    int64_t strides[4];
    based_dtype dtype;
    int32_t itemsize;
} based_tensor;

/* Element offset of [i0, i1, i2, 0]. */
#define BASED_AT3(t, i0, i1, i2) ((i0) * (t).strides[0] + (i1) * (t).strides[1] + (i2) * (t).strides[2])

/* ---------------------------------------------------------------------------------
 * Taylor linear attention (SPEC 1.1)
 * --------------------------------------------------------------------------------- */
typedef struct {
    based_phase phase;
    based_device device;
    based_tensor q, k;       /* (B, T, H, Dk) */
    based_tensor v, out;     /* (B, T, H, Dv) */
    based_tensor kv;         /* (B, H, F, Dv): strides[0..3] over (b, h, f, j) */
    based_tensor ksum;       /* (B, H, F): strides[0..2] over (b, h, f) */
    based_tensor tokens;     /* (B,) int64: strides[0] */
    int64_t batch, seqlen, heads, feature_dim, value_dim, feature_count; /* B, T, H, Dk, Dv, F */
    based_dtype compute;     /* float32, or float64 (CPU only) for float64 inputs or state */
    double scale, eps;
    int normalize;
    int64_t chunk;           /* CPU prefill chunk length; the CUDA kernels pick their own tiles */
} based_linear_attention_args;

/* ---------------------------------------------------------------------------------
 * Sliding-window attention (SPEC 1.2): query position p attends key positions
 * (p - W, p]; query head h reads kv head h / (H / Hkv); ring slot of position u is u % W.
 * --------------------------------------------------------------------------------- */
typedef struct {
    based_phase phase;
    based_device device;
    based_tensor q, out;             /* (B, T, H, D) */
    based_tensor k, v;               /* (B, T, Hkv, D) */
    based_tensor k_cache, v_cache;   /* (B, Hkv, W, D): strides over (b, kv head, slot, d) */
    based_tensor tokens;             /* (B,) int64 */
    int64_t batch, seqlen, heads, kv_heads, head_dim, window;   /* B, T, H, Hkv, D, W */
    double scale;
} based_sliding_window_args;

/* ---------------------------------------------------------------------------------
 * Taylor feature map: x (..., Dk) -> out (..., F), any number of leading dims.
 * --------------------------------------------------------------------------------- */
#define BASED_ARGS_MAX_NDIM BASED_MAX_NDIM /* based.h */

typedef struct {
    based_device device;
    char *x, *out;
    based_dtype dtype;                       /* of x and out */
    int32_t ndim;                            /* >= 1; the last axis is Dk (x) or F (out) */
    int64_t shape[BASED_ARGS_MAX_NDIM];      /* x's shape */
    int64_t x_strides[BASED_ARGS_MAX_NDIM], out_strides[BASED_ARGS_MAX_NDIM];
    int64_t rows, feature_dim, feature_count; /* product of the leading dims, Dk, F */
    double scale;
} based_feature_map_args;

/* ---------------------------------------------------------------------------------
 * State helpers (zero / copy / gather along axis 0, any dtype, any ndim <= 16)
 * --------------------------------------------------------------------------------- */
typedef struct {
    char *data;
    based_dtype dtype;
    int32_t itemsize;
    based_device device;
    int32_t ndim;
    int64_t shape[BASED_ARGS_MAX_NDIM];
    int64_t strides[BASED_ARGS_MAX_NDIM];
    int64_t numel;
} based_state_tensor;

typedef struct {
    based_state_tensor dst, src;    /* src unused by zero */
    const int64_t *indices;         /* host array of n_indices rows, normalised to [0, B);
                                       NULL: every row (zero) or the identity (copy). Valid
                                       for the call only: the C core frees it on return */
    int64_t n_indices;
} based_state_args;

/* Linear state layout conversion: compact (F rows) <-> expanded (1 + Dk + Dk^2 rows). */
typedef struct {
    based_device device;
    based_tensor kv, ksum;           /* compact: (B, H, F, Dv), (B, H, F) */
    based_tensor kv_exp, ksum_exp;   /* expanded: (B, H, F273, Dv), (B, H, F273) */
    int64_t batch, heads, feature_dim, value_dim, feature_count, expanded_count;
    int from_expanded;               /* direction: 0 compact -> expanded, 1 back */
} based_linear_state_args;

#ifdef __cplusplus
}
#endif

#endif /* BASED_ARGS_H */
