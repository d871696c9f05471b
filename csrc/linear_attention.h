/*
 * linear_attention.h -- what the Taylor linear-attention files share: the per-thread
 * workspace of the chunked prefill, and the table of CPU kernels chosen at run time
 * (portable C, or the same C compiled for AVX2+FMA; see linear_attention_kernel.h).
 *
 *   linear_attention.c              the check, the prefill/decode drivers (dtype/stride handling),
 *                                   kernel choice
 *   linear_attention_kernel.h       the hot loops, written once, included per (type, ISA)
 *   linear_attention_kernel.c       portable instantiation (what any x86-64/ARM compiler emits)
 *   linear_attention_kernel_avx2.c  AVX2+FMA instantiation (GCC on x86), picked when the CPU has both
 *   linear_attention_ref.c          plain-loop reference twins (*_ref)
 *   linear_state.c                  compact <-> expanded (273-row) state conversion
 */
#ifndef BASED_LINEAR_ATTENTION_H
#define BASED_LINEAR_ATTENTION_H

#include "internal.h"
#include "ops.h"

#define BASED_LIN_DEFAULT_CHUNK 64
#define BASED_LIN_ROW_ALIGN 8        /* workspace rows padded to a multiple of 8 elements */

/* Threads in the team of the innermost parallel region (1 outside one, or without
 * OpenMP). Work split by hand inside `omp parallel num_threads(n)` must use this, not n:
 * OpenMP may start fewer (nested regions, OMP_DYNAMIC, OMP_THREAD_LIMIT). */
static inline int based_lin_team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* Workspace of one thread for the chunked prefill of one (b, h), in the compute type.
 * Token-indexed arrays have ldc = C rounded up to BASED_LIN_ROW_ALIGN columns, value
 * rows ld = Dv rounded up likewise; the padding is zero-filled once and never read back. */
typedef struct {
    int64_t C, Dk, F, Dv, ld, ldc;
    double scale, eps;
    int normalize;
    void *qt;    /* (Dk, ldc) queries of the chunk, feature-major (raw, unscaled) */
    void *kt;    /* (Dk, ldc) keys of the chunk                                   */
    void *phiq;  /* (F, ldc)  phi(q) of the chunk, feature-major                  */
    void *phik;  /* (F, ldc)  phi(k) of the chunk                                 */
    void *att;   /* (C, ldc)  1 + s + s^2/2 on and below the diagonal (causal)    */
    void *den;   /* (C,)      normalisers of the chunk's outputs                  */
    void *v;     /* (C, ld)   values of the chunk                                 */
    void *o;     /* (C, ld)   output rows (normalised in place when normalize)    */
    void *kv;    /* (F, ld)   the state through the previous chunks               */
    void *ksum;  /* (F,)                                                          */
} based_lin_ws;

typedef struct {
    const char *name;
    /* One chunk of c <= C tokens: o = causal output of the chunk, then kv += chunk. */
    void (*chunk_f32)(const based_lin_ws *w, int64_t c);
    void (*chunk_f64)(const based_lin_ws *w, int64_t c);
    /* Decode over F state rows of Dv elements (row r at kv + r * row_stride):
     *   kv[r, :] += phik[r] * v;  num += phiq[r] * kv[r, :]  (one pass, updated rows). */
    void (*decode_rows_f32)(float *kv, int64_t row_stride, int64_t F, int64_t Dv, const float *phik,
                            const float *phiq, const float *v, float *num);
    void (*decode_rows_f64)(double *kv, int64_t row_stride, int64_t F, int64_t Dv, const double *phik,
                            const double *phiq, const double *v, double *num);
    /* phi of one q row and one k row (Dk each) -> phiq, phik (F each). */
    void (*decode_phi_f32)(const float *q, const float *k, int64_t dk, float scale, float *phiq, float *phik);
    void (*decode_phi_f64)(const double *q, const double *k, int64_t dk, double scale, double *phiq, double *phik);
    /* ksum += phik over F contiguous elements; returns phiq . ksum (the updated sums). */
    float (*decode_ksum_f32)(float *ksum, const float *phik, const float *phiq, int64_t F);
    double (*decode_ksum_f64)(double *ksum, const double *phik, const double *phiq, int64_t F);
} based_lin_kernels;

extern const based_lin_kernels based_lin_kernels_generic;

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define BASED_LIN_HAVE_AVX2 1
extern const based_lin_kernels based_lin_kernels_avx2;
#else
#define BASED_LIN_HAVE_AVX2 0
#endif

/* The kernels for this CPU: AVX2+FMA when built in and the CPU has both, else the
 * portable ones. The environment variable BASED_CPU_ISA=generic forces the portable
 * kernels (tests use it to cover both); it is read once per process. */
const based_lin_kernels *based_lin_kernels_pick(void);

#endif /* BASED_LINEAR_ATTENTION_H */
