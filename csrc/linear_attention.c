/*
 * linear_attention.c -- Taylor linear attention on the CPU (SPEC 1.1, 3; paper Sec. 4.1
 * Eq. 4 and Sec. 5.2): argument checks, the chunked prefill and the one-pass decode.
 *
 * This file moves data: it gathers strided inputs of any dtype into per-thread
 * workspaces in the compute type, hands them to the kernels of linear_kernels.h, and
 * scatters the results back. Work is split over (batch, head) with OpenMP.
 *
 * Precision: the compute type is float64 when the inputs or the state are float64, else
 * float32. A prefill reads the state once into a compute-type workspace, runs every
 * chunk there and writes it back once, so a bfloat16/float16 state is rounded once per
 * call, not per token; a decode rounds it once per token. The state's dtype therefore
 * bounds what is carried from one call to the next (a float32 state with float64 inputs
 * keeps float32), and a float64 state accumulates in float64 whatever the inputs' dtype.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "linear_internal.h"

based_linear_attention_params based_linear_attention_params_default(int64_t head_dim) {
    based_linear_attention_params p;
    p.scale = head_dim > 0 ? 1.0 / sqrt((double)head_dim) : 1.0;
    p.normalize = 1;
    p.eps = 1e-6;
    p.chunk_size = 0;
    p.stream = NULL;
    return p;
}

/* ---------------------------------------------------------------------------------
 * Kernel dispatch
 * --------------------------------------------------------------------------------- */

static const based_lin_kernels *pick_uncached(void) {
    if (based_cpu_isa_cap() == BASED_ISA_CAP_GENERIC) return &based_lin_kernels_generic;
#if BASED_LIN_HAVE_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &based_lin_kernels_avx2;
#endif
    return &based_lin_kernels_generic;
}

const based_lin_kernels *based_lin_kernels_pick(void) {
    static _Atomic(const based_lin_kernels *) chosen = NULL;
    const based_lin_kernels *k = atomic_load_explicit(&chosen, memory_order_acquire);
    if (k == NULL) {
        k = pick_uncached();
        atomic_store_explicit(&chosen, k, memory_order_release);
    }
    return k;
}

/* ---------------------------------------------------------------------------------
 * Checks (SPEC 4): everything below runs before the first write.
 * --------------------------------------------------------------------------------- */

based_status based_linear_check_args(based_linear_args *a, const DLTensor *q_, const DLTensor *k_,
                                     const DLTensor *v_, DLTensor *kv_, DLTensor *ksum_, DLTensor *tokens_,
                                     DLTensor *out_, const based_linear_attention_params *p, int has_time,
                                     const char *op) {
    memset(a, 0, sizeof *a);
    a->has_time = has_time;
    BASED_TRY(based_view_init(&a->q, q_, "q"));
    BASED_TRY(based_view_init(&a->k, k_, "k"));
    BASED_TRY(based_view_init(&a->v, v_, "v"));
    BASED_TRY(based_view_init(&a->kv, kv_, "state.kv"));
    BASED_TRY(based_view_init(&a->ksum, ksum_, "state.ksum"));
    BASED_TRY(based_view_init(&a->tokens, tokens_, "state.tokens"));
    BASED_TRY(based_view_init(&a->out, out_, "out"));
    if (p == NULL) return based_fail(BASED_STATUS_VALUE_ERROR, "%s: params is NULL", op);

    BASED_TRY(based_check_dtype(&a->q, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&a->k, &a->q));
    BASED_TRY(based_check_same_dtype(&a->v, &a->q));
    BASED_TRY(based_check_same_dtype(&a->out, &a->v));
    BASED_TRY(based_check_dtype(&a->kv, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&a->ksum, &a->kv));
    BASED_TRY(based_check_dtype(&a->tokens, BASED_DTYPES_INDEX));

    /* shapes: q fixes B, (T,) H, Dk; v fixes Dv */
    const int nd = has_time ? 4 : 3;
    const int64_t any[4] = {-1, -1, -1, -1};
    BASED_TRY(based_check_shape(&a->q, nd, any, has_time ? "B,T,H,Dk" : "B,H,Dk"));
    a->B = a->q.shape[0];
    a->T = has_time ? a->q.shape[1] : 1;
    a->H = a->q.shape[nd - 2];
    a->Dk = a->q.shape[nd - 1];
    if (a->Dk < 1 || a->Dk > BASED_LIN_MAX_DK)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: q must have a feature dim Dk in 1..%d, got Dk=%lld", op,
                          BASED_LIN_MAX_DK, (long long)a->Dk);
    a->F = based_taylor_feature_dim(a->Dk);
    int64_t want[4];
    if (has_time) {
        const int64_t qs[4] = {a->B, a->T, a->H, a->Dk}, vs[4] = {a->B, a->T, a->H, -1};
        BASED_TRY(based_check_shape(&a->k, 4, qs, "B,T,H,Dk"));
        BASED_TRY(based_check_shape(&a->v, 4, vs, "B,T,H,Dv"));
    } else {
        const int64_t qs[3] = {a->B, a->H, a->Dk}, vs[3] = {a->B, a->H, -1};
        BASED_TRY(based_check_shape(&a->k, 3, qs, "B,H,Dk"));
        BASED_TRY(based_check_shape(&a->v, 3, vs, "B,H,Dv"));
    }
    a->Dv = a->v.shape[nd - 1];
    if (a->Dv < 1)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: v must have a value dim Dv >= 1, got Dv=0", op);
    for (int i = 0; i < nd; i++) want[i] = a->v.shape[i];
    BASED_TRY(based_check_shape(&a->out, nd, want, has_time ? "B,T,H,Dv" : "B,H,Dv"));
    const int64_t kvs[4] = {a->B, a->H, a->F, a->Dv}, kss[3] = {a->B, a->H, a->F}, ts[1] = {a->B};
    BASED_TRY(based_check_shape(&a->kv, 4, kvs, "B,H,F,Dv"));
    BASED_TRY(based_check_shape(&a->ksum, 3, kss, "B,H,F"));
    BASED_TRY(based_check_shape(&a->tokens, 1, ts, "B"));

    const based_view *all[] = {&a->q, &a->k, &a->v, &a->kv, &a->ksum, &a->tokens, &a->out};
    BASED_TRY(based_check_same_device(all, 7));
    for (int i = 0; i < 7; i++) BASED_TRY(based_check_host(all[i], op));

    BASED_TRY(based_check_scalar(p->scale, "scale", 1));
    BASED_TRY(based_check_scalar(p->eps, "eps", 0));
    if (p->chunk_size < 0 || p->chunk_size > BASED_LIN_MAX_CHUNK)
        return based_fail(BASED_STATUS_VALUE_ERROR, "chunk_size must be in 0..%d (0: default), got %lld",
                          BASED_LIN_MAX_CHUNK, (long long)p->chunk_size);
    a->scale = p->scale;
    a->eps = p->eps;
    a->normalize = p->normalize != 0;
    a->chunk = p->chunk_size ? p->chunk_size : BASED_LIN_DEFAULT_CHUNK;
    a->compute = a->q.dtype == BASED_DTYPE_FLOAT64 || a->kv.dtype == BASED_DTYPE_FLOAT64 ? BASED_DTYPE_FLOAT64
                                                                                         : BASED_DTYPE_FLOAT32;

    /* what is written must not overlap itself, another output or an input */
    const based_view *wr[] = {&a->out, &a->kv, &a->ksum, &a->tokens}, *rd[] = {&a->q, &a->k, &a->v};
    BASED_TRY(based_check_writes(wr, 4, rd, 3));

    /* token counters: non-negative, and room for T more */
    for (int64_t b = 0; b < a->B; b++) {
        int64_t n = based_tokens_at(&a->tokens, b), sum;
        if (n < 0)
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: state.tokens[%lld] is %lld; token counts must be >= 0",
                              op, (long long)b, (long long)n);
        if (__builtin_add_overflow(n, a->T, &sum))
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: state.tokens[%lld] + %lld overflows int64", op,
                              (long long)b, (long long)a->T);
    }
    return BASED_STATUS_OK;
}

/* ---------------------------------------------------------------------------------
 * Prefill
 * --------------------------------------------------------------------------------- */

static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* Head states one thread keeps in its workspace at once (sized for a 1 MiB L2). */
#define BASED_LIN_GROUP_BYTES (512 * 1024)

static size_t align64(size_t n) { return (n + 63u) & ~(size_t)63u; }

/* Carves the chunk buffers of one thread out of `base` (64-byte aligned sections; NULL
 * only sizes them); returns their size. */
static size_t ws_layout(based_lin_ws *w, char *base, size_t elem) {
    const int64_t C = w->C, dk = w->Dk, F = w->F, ld = w->ld, ldc = w->ldc;
    void **slots[] = {&w->qt, &w->kt, &w->phiq, &w->phik, &w->att, &w->den, &w->v, &w->o};
    const int64_t sizes[] = {dk * ldc, dk * ldc, F * ldc, F * ldc, C * ldc, C, C * ld, C * ld};
    size_t off = 0;
    for (int i = 0; i < 8; i++) {
        if (base) *slots[i] = base + off;
        off += align64((size_t)sizes[i] * elem);
    }
    return off;
}

/* Bytes of one head's state slot: kv (F, ld), then ksum (F). */
static size_t state_slot_bytes(const based_lin_ws *w, size_t elem) {
    return align64((size_t)(w->F * w->ld) * elem) + align64((size_t)w->F * elem);
}

/* Points w's kv and ksum at slot g of `base`. */
static void use_state_slot(based_lin_ws *w, char *base, int64_t g, size_t elem) {
    char *slot = base + (size_t)g * state_slot_bytes(w, elem);
    w->kv = slot;
    w->ksum = slot + align64((size_t)(w->F * w->ld) * elem);
}

/* state (b, h) <-> workspace kv (F, ld), ksum (F) */
static void state_load(const based_linear_args *a, const based_lin_ws *w, int64_t b, int64_t h) {
    const based_view *kv = &a->kv, *ks = &a->ksum;
    const char *kp = kv->data + (b * kv->strides[0] + h * kv->strides[1]) * kv->itemsize;
    const char *sp = ks->data + (b * ks->strides[0] + h * ks->strides[1]) * ks->itemsize;
    for (int64_t f = 0; f < a->F; f++) {
        const char *row = kp + f * kv->strides[2] * kv->itemsize;
        if (a->compute == BASED_DTYPE_FLOAT64) {
            based_gather_f64((double *)w->kv + f * w->ld, row, kv->dtype, a->Dv, kv->strides[3]);
            ((double *)w->ksum)[f] = based_load_f64(sp, ks->dtype, f * ks->strides[2]);
        } else {
            based_gather_f32((float *)w->kv + f * w->ld, row, kv->dtype, a->Dv, kv->strides[3]);
            ((float *)w->ksum)[f] = based_load_f32(sp, ks->dtype, f * ks->strides[2]);
        }
    }
}

static void state_store(const based_linear_args *a, const based_lin_ws *w, int64_t b, int64_t h) {
    const based_view *kv = &a->kv, *ks = &a->ksum;
    char *kp = kv->data + (b * kv->strides[0] + h * kv->strides[1]) * kv->itemsize;
    char *sp = ks->data + (b * ks->strides[0] + h * ks->strides[1]) * ks->itemsize;
    for (int64_t f = 0; f < a->F; f++) {
        char *row = kp + f * kv->strides[2] * kv->itemsize;
        if (a->compute == BASED_DTYPE_FLOAT64) {
            based_scatter_f64(row, kv->dtype, a->Dv, kv->strides[3], (const double *)w->kv + f * w->ld);
            based_store_f64(sp, ks->dtype, f * ks->strides[2], ((const double *)w->ksum)[f]);
        } else {
            based_scatter_f32(row, kv->dtype, a->Dv, kv->strides[3], (const float *)w->kv + f * w->ld);
            based_store_f32(sp, ks->dtype, f * ks->strides[2], ((const float *)w->ksum)[f]);
        }
    }
}

/* Asks for the cache lines of row (b, t, h) of x, when its last axis is contiguous. */
static inline void prefetch_row(const based_view *x, int64_t b, int64_t t, int64_t h, int64_t n) {
    if (x->strides[3] != 1) return;
    const char *p = x->data + based_lin_row(x, 1, b, t, h) * x->itemsize;
    for (int64_t off = 0; off < n * x->itemsize; off += 64) __builtin_prefetch(p + off, 0, 3);
}

/* n elements of a row of dtype dt, stride `stride`, as float: the contiguous float32 case
 * inline (rows are short: a call to memcpy costs as much as the copy), the rest through
 * based_load_f32. dst elements are dst_stride apart. */
static inline void row_to_f32(float *dst, int64_t dst_stride, const char *p, based_dtype dt, int64_t n,
                              int64_t stride) {
    if (dt == BASED_DTYPE_FLOAT32 && stride == 1) {
        const float *src = (const float *)p;
        for (int64_t j = 0; j < n; j++) dst[j * dst_stride] = src[j];
    } else {
        for (int64_t j = 0; j < n; j++) dst[j * dst_stride] = based_load_f32(p, dt, j * stride);
    }
}

static inline void row_to_f64(double *dst, int64_t dst_stride, const char *p, based_dtype dt, int64_t n,
                              int64_t stride) {
    if (dt == BASED_DTYPE_FLOAT32 && stride == 1) { /* a float32 state row under float64 compute */
        const float *src = (const float *)p;
        for (int64_t j = 0; j < n; j++) dst[j * dst_stride] = src[j];
    } else {
        for (int64_t j = 0; j < n; j++) dst[j * dst_stride] = based_load_f64(p, dt, j * stride);
    }
}

/* Tokens t0 .. t0+c-1 of (b, h): q, k -> columns of (Dk, ldc), v -> (c, ld) rows (padding
 * untouched). In the (B, T, H, d) layout a head's consecutive tokens are a page apart,
 * where the hardware prefetchers do not follow, so the rows PREFETCH_TOKENS ahead are
 * asked for explicitly (measured: a few % of a prefill at T = 2048, H = 16). */
#define PREFETCH_TOKENS 8
static void chunk_load(const based_linear_args *a, const based_lin_ws *w, int64_t b, int64_t h, int64_t t0,
                       int64_t c) {
    const int64_t dk = a->Dk, ld = w->ld, ldc = w->ldc;
    for (int64_t i = 0; i < c; i++) {
        const int64_t t = t0 + i;
        if (i + PREFETCH_TOKENS < c) {
            prefetch_row(&a->q, b, t + PREFETCH_TOKENS, h, dk);
            prefetch_row(&a->k, b, t + PREFETCH_TOKENS, h, dk);
            prefetch_row(&a->v, b, t + PREFETCH_TOKENS, h, a->Dv);
        }
        const char *qp = a->q.data + based_lin_row(&a->q, 1, b, t, h) * a->q.itemsize;
        const char *kp = a->k.data + based_lin_row(&a->k, 1, b, t, h) * a->k.itemsize;
        const char *vp = a->v.data + based_lin_row(&a->v, 1, b, t, h) * a->v.itemsize;
        if (a->compute == BASED_DTYPE_FLOAT64) {
            row_to_f64((double *)w->qt + i, ldc, qp, a->q.dtype, dk, a->q.strides[3]);
            row_to_f64((double *)w->kt + i, ldc, kp, a->k.dtype, dk, a->k.strides[3]);
            row_to_f64((double *)w->v + i * ld, 1, vp, a->v.dtype, a->Dv, a->v.strides[3]);
        } else {
            row_to_f32((float *)w->qt + i, ldc, qp, a->q.dtype, dk, a->q.strides[3]);
            row_to_f32((float *)w->kt + i, ldc, kp, a->k.dtype, dk, a->k.strides[3]);
            row_to_f32((float *)w->v + i * ld, 1, vp, a->v.dtype, a->Dv, a->v.strides[3]);
        }
    }
}

static void chunk_store(const based_linear_args *a, const based_lin_ws *w, int64_t b, int64_t h, int64_t t0,
                        int64_t c) {
    const based_view *out = &a->out;
    for (int64_t i = 0; i < c; i++) {
        char *op = out->data + based_lin_row(out, 1, b, t0 + i, h) * out->itemsize;
        if (a->compute == BASED_DTYPE_FLOAT64) {
            based_scatter_f64(op, out->dtype, a->Dv, out->strides[3], (const double *)w->o + i * w->ld);
        } else if (out->dtype == BASED_DTYPE_FLOAT32 && out->strides[3] == 1) {
            const float *src = (const float *)w->o + i * w->ld;
            float *dst = (float *)op;
            for (int64_t j = 0; j < a->Dv; j++) dst[j] = src[j];
        } else {
            based_scatter_f32(op, out->dtype, a->Dv, out->strides[3], (const float *)w->o + i * w->ld);
        }
    }
}

based_status based_linear_attention_prefill(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                            DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                            const based_linear_attention_params *params) {
    based_linear_args a;
    BASED_TRY(based_linear_check_args(&a, q, k, v, kv, ksum, tokens, out, params, 1, "linear_attention_prefill"));
    if (a.B == 0 || a.T == 0) return BASED_STATUS_OK;
    if (a.H == 0) {
        based_tokens_add(&a.tokens, a.T);
        return BASED_STATUS_OK;
    }

    const int64_t C = a.chunk < a.T ? a.chunk : a.T;
    const size_t elem = a.compute == BASED_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
    based_lin_ws proto = {.C = C, .Dk = a.Dk, .F = a.F, .Dv = a.Dv, .ld = round_up(a.Dv, BASED_LIN_ROW_ALIGN),
                          .ldc = round_up(C, BASED_LIN_ROW_ALIGN), .scale = a.scale, .eps = a.eps,
                          .normalize = a.normalize};
    const int64_t work = a.B * a.H;
    const int nthreads = based_threads_for(work);
    /* Each thread takes a contiguous range of (b, h) and walks the sequence chunk by chunk
     * for a group of them at once, so the pages holding a chunk's tokens (every head of a
     * token shares them in the (B, T, H, d) layout) are visited together rather than once
     * per head. A group holds as many head states as fit BASED_LIN_GROUP_BYTES (>= 1).
     * Scratch is sized for the threads asked for; a smaller team uses the first slices. */
    const size_t chunk_bytes = ws_layout(&proto, NULL, elem), slot = state_slot_bytes(&proto, elem);
    const int64_t per_thread_items = (work + nthreads - 1) / nthreads;
    int64_t group = (int64_t)(BASED_LIN_GROUP_BYTES / slot);
    group = group < 1 ? 1 : group > per_thread_items ? per_thread_items : group;
    const size_t per_thread = chunk_bytes + (size_t)group * slot;
    char *scratch = based_scratch_alloc(per_thread * (size_t)nthreads);
    if (scratch == NULL)
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "linear_attention_prefill: out of memory for %zu bytes of scratch",
                          per_thread * (size_t)nthreads);
    memset(scratch, 0, per_thread * (size_t)nthreads); /* the padding stays zero */

    const based_lin_kernels *kern = based_lin_kernels_pick();
    void (*chunk)(const based_lin_ws *, int64_t) = a.compute == BASED_DTYPE_FLOAT64 ? kern->chunk_f64 : kern->chunk_f32;
#pragma omp parallel num_threads(nthreads)
    {
        /* split over the team OpenMP actually started: it can be smaller than asked for
         * (inside a caller's parallel region, OMP_DYNAMIC, OMP_THREAD_LIMIT), and a split
         * over the asked-for count would leave the missing threads' heads uncomputed */
        const int tid = based_thread_num(), team = based_lin_team_size();
        const int64_t lo = work * tid / team, hi = work * (tid + 1) / team;
        char *mine = scratch + per_thread * (size_t)tid, *states = mine + chunk_bytes;
        based_lin_ws w = proto;
        ws_layout(&w, mine, elem);
        for (int64_t g0 = lo; g0 < hi; g0 += group) {
            const int64_t g1 = g0 + group < hi ? g0 + group : hi;
            for (int64_t i = g0; i < g1; i++) {
                use_state_slot(&w, states, i - g0, elem);
                state_load(&a, &w, i / a.H, i % a.H);
            }
            for (int64_t t0 = 0; t0 < a.T; t0 += C) {
                const int64_t c = a.T - t0 < C ? a.T - t0 : C;
                for (int64_t i = g0; i < g1; i++) {
                    const int64_t b = i / a.H, h = i % a.H;
                    use_state_slot(&w, states, i - g0, elem);
                    chunk_load(&a, &w, b, h, t0, c);
                    chunk(&w, c);
                    chunk_store(&a, &w, b, h, t0, c);
                }
            }
            for (int64_t i = g0; i < g1; i++) {
                use_state_slot(&w, states, i - g0, elem);
                state_store(&a, &w, i / a.H, i % a.H);
            }
        }
    }
    based_scratch_free(scratch);
    based_tokens_add(&a.tokens, a.T);
    return BASED_STATUS_OK;
}

/* ---------------------------------------------------------------------------------
 * Decode: one token per sequence, one pass over the state.
 * --------------------------------------------------------------------------------- */

/* The contiguous float32 case inline, as in row_to_f32. */
static inline void row_from_f32(char *p, based_dtype dt, int64_t n, int64_t stride, const float *src) {
    if (dt == BASED_DTYPE_FLOAT32 && stride == 1) {
        float *dst = (float *)p;
        for (int64_t j = 0; j < n; j++) dst[j] = src[j];
    } else {
        based_scatter_f32(p, dt, n, stride, src);
    }
}

static inline void row_from_f64(char *p, based_dtype dt, int64_t n, int64_t stride, const double *src) {
    if (dt == BASED_DTYPE_FLOAT32 && stride == 1) {
        float *dst = (float *)p;
        for (int64_t j = 0; j < n; j++) dst[j] = (float)src[j];
    } else {
        based_scatter_f64(p, dt, n, stride, src);
    }
}

/* One (b, h) in compute type REAL (DT its dtype). `ws` holds phiq, phik (F), v, num, row
 * (Dv) and xq, xk (Dk). The state is used in place when it has the compute dtype and
 * contiguous rows, else row by row through a compute-type copy. */
#define BASED_LIN_DECODE_HEAD(REAL, SFX, LOAD, STORE, DT)                                                   \
    static void decode_head_##SFX(const based_linear_args *a, const based_lin_kernels *kern, REAL *ws,       \
                                  int64_t b, int64_t h) {                                                    \
        const int64_t F = a->F, dv = a->Dv, dk = a->Dk;                                                      \
        REAL *phiq = ws, *phik = phiq + F, *v = phik + F, *num = v + dv, *row = num + dv, *xq = row + dv;    \
        REAL *xk = xq + dk;                                                                                  \
        row_to_##SFX(xq, 1, a->q.data + based_lin_row(&a->q, 0, b, 0, h) * a->q.itemsize, a->q.dtype, dk,   \
                     a->q.strides[2]);                                                                       \
        row_to_##SFX(xk, 1, a->k.data + based_lin_row(&a->k, 0, b, 0, h) * a->k.itemsize, a->k.dtype, dk,   \
                     a->k.strides[2]);                                                                       \
        row_to_##SFX(v, 1, a->v.data + based_lin_row(&a->v, 0, b, 0, h) * a->v.itemsize, a->v.dtype, dv,    \
                     a->v.strides[2]);                                                                       \
        kern->decode_phi_##SFX(xq, xk, dk, (REAL)a->scale, phiq, phik);                                     \
        for (int64_t j = 0; j < dv; j++) num[j] = 0;                                                         \
        /* normaliser: ksum += phi(k); den = phi(q) . ksum */                                                \
        char *sp = a->ksum.data + (b * a->ksum.strides[0] + h * a->ksum.strides[1]) * a->ksum.itemsize;     \
        REAL den = 0;                                                                                        \
        if (a->ksum.dtype == DT && a->ksum.strides[2] == 1) {                                                \
            den = kern->decode_ksum_##SFX((REAL *)sp, phik, phiq, F);                                        \
        } else {                                                                                             \
            for (int64_t f = 0; f < F; f++) {                                                                \
                const REAL z = LOAD(sp, a->ksum.dtype, f * a->ksum.strides[2]) + phik[f];                   \
                STORE(sp, a->ksum.dtype, f * a->ksum.strides[2], z);                                         \
                den += phiq[f] * z;                                                                          \
            }                                                                                                \
        }                                                                                                    \
        char *kp = a->kv.data + (b * a->kv.strides[0] + h * a->kv.strides[1]) * a->kv.itemsize;             \
        const int64_t rs = a->kv.strides[2];                                                                 \
        if (a->kv.dtype == DT && a->kv.strides[3] == 1) {                                                    \
            kern->decode_rows_##SFX((REAL *)kp, rs, F, dv, phik, phiq, v, num);                              \
        } else {                                                                                             \
            for (int64_t f = 0; f < F; f++) {                                                                \
                char *rp = kp + f * rs * a->kv.itemsize;                                                     \
                row_to_##SFX(row, 1, rp, a->kv.dtype, dv, a->kv.strides[3]);                                 \
                kern->decode_rows_##SFX(row, 0, 1, dv, phik + f, phiq + f, v, num);                          \
                row_from_##SFX(rp, a->kv.dtype, dv, a->kv.strides[3], row);                                  \
            }                                                                                                \
        }                                                                                                    \
        if (a->normalize) {                                                                                  \
            const REAL inv = 1 / (den + (REAL)a->eps);                                                       \
            for (int64_t j = 0; j < dv; j++) num[j] *= inv;                                                  \
        }                                                                                                    \
        row_from_##SFX(a->out.data + based_lin_row(&a->out, 0, b, 0, h) * a->out.itemsize, a->out.dtype, dv, \
                       a->out.strides[2], num);                                                              \
    }

BASED_LIN_DECODE_HEAD(float, f32, based_load_f32, based_store_f32, BASED_DTYPE_FLOAT32)
BASED_LIN_DECODE_HEAD(double, f64, based_load_f64, based_store_f64, BASED_DTYPE_FLOAT64)

/* Below this many state bytes a decode runs on one thread: waking a second costs more. */
#define BASED_LIN_DECODE_MIN_BYTES_PER_THREAD (256 * 1024)

based_status based_linear_attention_decode(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                           DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                           const based_linear_attention_params *params) {
    based_linear_args a;
    BASED_TRY(based_linear_check_args(&a, q, k, v, kv, ksum, tokens, out, params, 0, "linear_attention_decode"));
    if (a.B == 0) return BASED_STATUS_OK;
    if (a.H == 0) {
        based_tokens_add(&a.tokens, 1);
        return BASED_STATUS_OK;
    }
    const int64_t work = a.B * a.H;
    const int64_t state_bytes = work * a.F * a.Dv * a.kv.itemsize;
    int nthreads = based_threads_for(work);
    const int64_t by_size = state_bytes / BASED_LIN_DECODE_MIN_BYTES_PER_THREAD + 1;
    if (by_size < nthreads) nthreads = (int)by_size;
    const size_t elem = a.compute == BASED_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
    const size_t per_thread = align64((size_t)(2 * a.F + 3 * a.Dv + 2 * a.Dk) * elem);
    char *scratch = based_scratch_alloc(per_thread * (size_t)nthreads);
    if (scratch == NULL)
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "linear_attention_decode: out of memory for %zu bytes of scratch",
                          per_thread * (size_t)nthreads);
    const based_lin_kernels *kern = based_lin_kernels_pick();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < work; bh++) {
        void *ws = scratch + per_thread * (size_t)based_thread_num();
        if (a.compute == BASED_DTYPE_FLOAT64)
            decode_head_f64(&a, kern, ws, bh / a.H, bh % a.H);
        else
            decode_head_f32(&a, kern, ws, bh / a.H, bh % a.H);
    }
    based_scratch_free(scratch);
    based_tokens_add(&a.tokens, 1);
    return BASED_STATUS_OK;
}
