/*
 * linear_attention.c -- Taylor linear attention on the CPU (SPEC 1.1, 3; paper Sec. 4.1
 * Eq. 4 and Sec. 5.2): argument checks, the chunked prefill and the one-pass decode.
 *
 * This file moves data: it gathers strided inputs of any dtype into per-thread
 * workspaces in the compute type, hands them to the kernels of linear_attention_kernel.h, and
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

#include "linear_attention.h"

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

based_status based_linear_attention_check(based_linear_attention_args *args, const DLTensor *q_, const DLTensor *k_,
                                          const DLTensor *v_, const DLTensor *kv_, const DLTensor *ksum_,
                                          const DLTensor *tokens_, const DLTensor *out_,
                                          const based_linear_attention_params *p, based_phase phase, const char *op) {
    memset(args, 0, sizeof *args);
    based_view q, k, v, kv, ksum, tokens, out;
    BASED_TRY(based_view_init(&q, q_, "q"));
    BASED_TRY(based_view_init(&k, k_, "k"));
    BASED_TRY(based_view_init(&v, v_, "v"));
    BASED_TRY(based_view_init(&kv, kv_, "state.kv"));
    BASED_TRY(based_view_init(&ksum, ksum_, "state.ksum"));
    BASED_TRY(based_view_init(&tokens, tokens_, "state.tokens"));
    BASED_TRY(based_view_init(&out, out_, "out"));
    if (p == NULL) return based_fail(BASED_STATUS_VALUE_ERROR, "%s: params is NULL", op);

    BASED_TRY(based_check_dtype(&q, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&k, &q));
    BASED_TRY(based_check_same_dtype(&v, &q));
    BASED_TRY(based_check_same_dtype(&out, &v));
    BASED_TRY(based_check_dtype(&kv, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&ksum, &kv));
    BASED_TRY(based_check_dtype(&tokens, BASED_DTYPES_INDEX));

    /* shapes: q fixes B, (T,) H, Dk; v fixes Dv */
    const int prefill = phase == BASED_PHASE_PREFILL;
    const int nd = prefill ? 4 : 3;
    const int64_t any[4] = {-1, -1, -1, -1};
    BASED_TRY(based_check_shape(&q, nd, any, prefill ? "B,T,H,Dk" : "B,H,Dk"));
    const int64_t B = q.shape[0], T = prefill ? q.shape[1] : 1, H = q.shape[nd - 2], Dk = q.shape[nd - 1];
    if (Dk < 1 || Dk > BASED_MAX_FEATURE_DIM)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: q must have a feature dim Dk in 1..%d, got Dk=%lld", op,
                          BASED_MAX_FEATURE_DIM, (long long)Dk);
    const int64_t F = based_taylor_feature_dim(Dk);
    int64_t want[4];
    if (prefill) {
        const int64_t qs[4] = {B, T, H, Dk}, vs[4] = {B, T, H, -1};
        BASED_TRY(based_check_shape(&k, 4, qs, "B,T,H,Dk"));
        BASED_TRY(based_check_shape(&v, 4, vs, "B,T,H,Dv"));
    } else {
        const int64_t qs[3] = {B, H, Dk}, vs[3] = {B, H, -1};
        BASED_TRY(based_check_shape(&k, 3, qs, "B,H,Dk"));
        BASED_TRY(based_check_shape(&v, 3, vs, "B,H,Dv"));
    }
    const int64_t Dv = v.shape[nd - 1];
    if (Dv < 1)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: v must have a value dim Dv >= 1, got Dv=0", op);
    for (int i = 0; i < nd; i++) want[i] = v.shape[i];
    BASED_TRY(based_check_shape(&out, nd, want, prefill ? "B,T,H,Dv" : "B,H,Dv"));
    const int64_t kvs[4] = {B, H, F, Dv}, kss[3] = {B, H, F}, ts[1] = {B};
    BASED_TRY(based_check_shape(&kv, 4, kvs, "B,H,F,Dv"));
    BASED_TRY(based_check_shape(&ksum, 3, kss, "B,H,F"));
    BASED_TRY(based_check_shape(&tokens, 1, ts, "B"));

    const based_view *all[] = {&q, &k, &v, &kv, &ksum, &tokens, &out};
    BASED_TRY(based_check_device(all, 7, op, &args->device));
    const based_view *rows[] = {&q, &k, &v, &kv, &ksum, &out};
    BASED_TRY(based_check_cuda_rows(rows, 6, args->device, op));

    BASED_TRY(based_check_scalar(p->scale, "scale", 1));
    BASED_TRY(based_check_scalar(p->eps, "eps", 0));
    if (p->chunk_size < 0 || p->chunk_size > BASED_MAX_CHUNK_SIZE)
        return based_fail(BASED_STATUS_VALUE_ERROR, "chunk_size must be in 0..%d (0: default), got %lld",
                          BASED_MAX_CHUNK_SIZE, (long long)p->chunk_size);

    /* what is written must not overlap itself, another output or an input */
    const based_view *wr[] = {&out, &kv, &ksum, &tokens}, *rd[] = {&q, &k, &v};
    BASED_TRY(based_check_writes(wr, 4, rd, 3));

    args->phase = phase;
    args->q = prefill ? based_tensor_of(&q) : based_tensor_of_decode(&q);
    args->k = prefill ? based_tensor_of(&k) : based_tensor_of_decode(&k);
    args->v = prefill ? based_tensor_of(&v) : based_tensor_of_decode(&v);
    args->out = prefill ? based_tensor_of(&out) : based_tensor_of_decode(&out);
    args->kv = based_tensor_of(&kv);
    args->ksum = based_tensor_of(&ksum);
    args->tokens = based_tensor_of(&tokens);
    args->batch = B;
    args->seqlen = T;
    args->heads = H;
    args->feature_dim = Dk;
    args->value_dim = Dv;
    args->feature_count = F;
    args->compute = q.dtype == BASED_DTYPE_FLOAT64 || kv.dtype == BASED_DTYPE_FLOAT64 ? BASED_DTYPE_FLOAT64
                                                                                     : BASED_DTYPE_FLOAT32;
    args->scale = p->scale;
    args->eps = p->eps;
    args->normalize = p->normalize != 0;
    args->chunk = p->chunk_size ? p->chunk_size : BASED_LIN_DEFAULT_CHUNK;

    /* token counters: non-negative, and room for T more (on the host only: CUDA counters are
     * the kernels' to read, see kernels/based_cuda.h) */
    for (int64_t b = 0; args->device.kind == BASED_DEVICE_CPU && b < B; b++) {
        int64_t n = based_tokens_at(&args->tokens, b), sum;
        if (n < 0)
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: state.tokens[%lld] is %lld; token counts must be >= 0",
                              op, (long long)b, (long long)n);
        if (__builtin_add_overflow(n, T, &sum))
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: state.tokens[%lld] + %lld overflows int64", op,
                              (long long)b, (long long)T);
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
static void state_load(const based_linear_attention_args *a, const based_lin_ws *w, int64_t b, int64_t h) {
    const based_tensor *kv = &a->kv, *ks = &a->ksum;
    const char *kp = kv->data + (b * kv->strides[0] + h * kv->strides[1]) * kv->itemsize;
    const char *sp = ks->data + (b * ks->strides[0] + h * ks->strides[1]) * ks->itemsize;
    for (int64_t f = 0; f < a->feature_count; f++) {
        const char *row = kp + f * kv->strides[2] * kv->itemsize;
        if (a->compute == BASED_DTYPE_FLOAT64) {
            based_gather_f64((double *)w->kv + f * w->ld, row, kv->dtype, a->value_dim, kv->strides[3]);
            ((double *)w->ksum)[f] = based_load_f64(sp, ks->dtype, f * ks->strides[2]);
        } else {
            based_gather_f32((float *)w->kv + f * w->ld, row, kv->dtype, a->value_dim, kv->strides[3]);
            ((float *)w->ksum)[f] = based_load_f32(sp, ks->dtype, f * ks->strides[2]);
        }
    }
}

static void state_store(const based_linear_attention_args *a, const based_lin_ws *w, int64_t b, int64_t h) {
    const based_tensor *kv = &a->kv, *ks = &a->ksum;
    char *kp = kv->data + (b * kv->strides[0] + h * kv->strides[1]) * kv->itemsize;
    char *sp = ks->data + (b * ks->strides[0] + h * ks->strides[1]) * ks->itemsize;
    for (int64_t f = 0; f < a->feature_count; f++) {
        char *row = kp + f * kv->strides[2] * kv->itemsize;
        if (a->compute == BASED_DTYPE_FLOAT64) {
            based_scatter_f64(row, kv->dtype, a->value_dim, kv->strides[3], (const double *)w->kv + f * w->ld);
            based_store_f64(sp, ks->dtype, f * ks->strides[2], ((const double *)w->ksum)[f]);
        } else {
            based_scatter_f32(row, kv->dtype, a->value_dim, kv->strides[3], (const float *)w->kv + f * w->ld);
            based_store_f32(sp, ks->dtype, f * ks->strides[2], ((const float *)w->ksum)[f]);
        }
    }
}

/* Asks for the cache lines of row (b, t, h) of x, when its last axis is contiguous. */
static inline void prefetch_row(const based_tensor *x, int64_t b, int64_t t, int64_t h, int64_t n) {
    if (x->strides[3] != 1) return;
    const char *p = x->data + BASED_AT3(*x, b, t, h) * x->itemsize;
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
static void chunk_load(const based_linear_attention_args *a, const based_lin_ws *w, int64_t b, int64_t h, int64_t t0,
                       int64_t c) {
    const int64_t dk = a->feature_dim, ld = w->ld, ldc = w->ldc;
    for (int64_t i = 0; i < c; i++) {
        const int64_t t = t0 + i;
        if (i + PREFETCH_TOKENS < c) {
            prefetch_row(&a->q, b, t + PREFETCH_TOKENS, h, dk);
            prefetch_row(&a->k, b, t + PREFETCH_TOKENS, h, dk);
            prefetch_row(&a->v, b, t + PREFETCH_TOKENS, h, a->value_dim);
        }
        const char *qp = a->q.data + BASED_AT3(a->q, b, t, h) * a->q.itemsize;
        const char *kp = a->k.data + BASED_AT3(a->k, b, t, h) * a->k.itemsize;
        const char *vp = a->v.data + BASED_AT3(a->v, b, t, h) * a->v.itemsize;
        if (a->compute == BASED_DTYPE_FLOAT64) {
            row_to_f64((double *)w->qt + i, ldc, qp, a->q.dtype, dk, a->q.strides[3]);
            row_to_f64((double *)w->kt + i, ldc, kp, a->k.dtype, dk, a->k.strides[3]);
            row_to_f64((double *)w->v + i * ld, 1, vp, a->v.dtype, a->value_dim, a->v.strides[3]);
        } else {
            row_to_f32((float *)w->qt + i, ldc, qp, a->q.dtype, dk, a->q.strides[3]);
            row_to_f32((float *)w->kt + i, ldc, kp, a->k.dtype, dk, a->k.strides[3]);
            row_to_f32((float *)w->v + i * ld, 1, vp, a->v.dtype, a->value_dim, a->v.strides[3]);
        }
    }
}

static void chunk_store(const based_linear_attention_args *a, const based_lin_ws *w, int64_t b, int64_t h, int64_t t0,
                        int64_t c) {
    const based_tensor *out = &a->out;
    for (int64_t i = 0; i < c; i++) {
        char *op = out->data + BASED_AT3(*out, b, t0 + i, h) * out->itemsize;
        if (a->compute == BASED_DTYPE_FLOAT64) {
            based_scatter_f64(op, out->dtype, a->value_dim, out->strides[3], (const double *)w->o + i * w->ld);
        } else if (out->dtype == BASED_DTYPE_FLOAT32 && out->strides[3] == 1) {
            const float *src = (const float *)w->o + i * w->ld;
            float *dst = (float *)op;
            for (int64_t j = 0; j < a->value_dim; j++) dst[j] = src[j];
        } else {
            based_scatter_f32(op, out->dtype, a->value_dim, out->strides[3], (const float *)w->o + i * w->ld);
        }
    }
}

based_status based_cpu_linear_attention_prefill(const based_linear_attention_args *a) {
    if (a->batch == 0 || a->seqlen == 0) return BASED_STATUS_OK;
    if (a->heads == 0) {
        based_tokens_add(&a->tokens, a->batch, a->seqlen);
        return BASED_STATUS_OK;
    }

    const int64_t C = a->chunk < a->seqlen ? a->chunk : a->seqlen;
    const size_t elem = a->compute == BASED_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
    based_lin_ws proto = {.C = C, .Dk = a->feature_dim, .F = a->feature_count, .Dv = a->value_dim,
                          .ld = round_up(a->value_dim, BASED_LIN_ROW_ALIGN), .ldc = round_up(C, BASED_LIN_ROW_ALIGN),
                          .scale = a->scale, .eps = a->eps, .normalize = a->normalize};
    const int64_t work = a->batch * a->heads;
    /* per token of a (b, h): the state read with phi(q) and phi(k) v folded into it, ~2 F (Dv + 1) */
    const int64_t macs = work * a->seqlen * 2 * a->feature_count * (a->value_dim + 1);
    const int nthreads = based_threads_for(work, macs, BASED_MIN_MACS_PER_THREAD);
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
    void (*chunk)(const based_lin_ws *, int64_t) =
        a->compute == BASED_DTYPE_FLOAT64 ? kern->chunk_f64 : kern->chunk_f32;
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
                state_load(a, &w, i / a->heads, i % a->heads);
            }
            for (int64_t t0 = 0; t0 < a->seqlen; t0 += C) {
                const int64_t c = a->seqlen - t0 < C ? a->seqlen - t0 : C;
                for (int64_t i = g0; i < g1; i++) {
                    const int64_t b = i / a->heads, h = i % a->heads;
                    use_state_slot(&w, states, i - g0, elem);
                    chunk_load(a, &w, b, h, t0, c);
                    chunk(&w, c);
                    chunk_store(a, &w, b, h, t0, c);
                }
            }
            for (int64_t i = g0; i < g1; i++) {
                use_state_slot(&w, states, i - g0, elem);
                state_store(a, &w, i / a->heads, i % a->heads);
            }
        }
    }
    based_scratch_free(scratch);
    based_tokens_add(&a->tokens, a->batch, a->seqlen);
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
#define BASED_LIN_DECODE_HEAD(REAL, SFX, LOAD, STORE, DT)                                                    \
    static void decode_head_##SFX(const based_linear_attention_args *a, const based_lin_kernels *kern,       \
                                  REAL *ws, int64_t b, int64_t h) {                                          \
        const int64_t F = a->feature_count, dv = a->value_dim, dk = a->feature_dim;                          \
        REAL *phiq = ws, *phik = phiq + F, *v = phik + F, *num = v + dv, *row = num + dv, *xq = row + dv;    \
        REAL *xk = xq + dk;                                                                                  \
        row_to_##SFX(xq, 1, a->q.data + BASED_AT3(a->q, b, 0, h) * a->q.itemsize, a->q.dtype, dk,            \
                     a->q.strides[3]);                                                                       \
        row_to_##SFX(xk, 1, a->k.data + BASED_AT3(a->k, b, 0, h) * a->k.itemsize, a->k.dtype, dk,            \
                     a->k.strides[3]);                                                                       \
        row_to_##SFX(v, 1, a->v.data + BASED_AT3(a->v, b, 0, h) * a->v.itemsize, a->v.dtype, dv,             \
                     a->v.strides[3]);                                                                       \
        kern->decode_phi_##SFX(xq, xk, dk, (REAL)a->scale, phiq, phik);                                      \
        for (int64_t j = 0; j < dv; j++) num[j] = 0;                                                         \
        /* normaliser: ksum += phi(k); den = phi(q) . ksum */                                                \
        char *sp = a->ksum.data + (b * a->ksum.strides[0] + h * a->ksum.strides[1]) * a->ksum.itemsize;      \
        REAL den = 0;                                                                                        \
        if (a->ksum.dtype == DT && a->ksum.strides[2] == 1) {                                                \
            den = kern->decode_ksum_##SFX((REAL *)sp, phik, phiq, F);                                        \
        } else {                                                                                             \
            for (int64_t f = 0; f < F; f++) {                                                                \
                const REAL z = LOAD(sp, a->ksum.dtype, f * a->ksum.strides[2]) + phik[f];                    \
                STORE(sp, a->ksum.dtype, f * a->ksum.strides[2], z);                                         \
                den += phiq[f] * z;                                                                          \
            }                                                                                                \
        }                                                                                                    \
        char *kp = a->kv.data + (b * a->kv.strides[0] + h * a->kv.strides[1]) * a->kv.itemsize;              \
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
        row_from_##SFX(a->out.data + BASED_AT3(a->out, b, 0, h) * a->out.itemsize, a->out.dtype, dv,         \
                       a->out.strides[3], num);                                                              \
    }

BASED_LIN_DECODE_HEAD(float, f32, based_load_f32, based_store_f32, BASED_DTYPE_FLOAT32)
BASED_LIN_DECODE_HEAD(double, f64, based_load_f64, based_store_f64, BASED_DTYPE_FLOAT64)

based_status based_cpu_linear_attention_decode(const based_linear_attention_args *a) {
    if (a->batch == 0) return BASED_STATUS_OK;
    if (a->heads == 0) {
        based_tokens_add(&a->tokens, a->batch, 1);
        return BASED_STATUS_OK;
    }
    const int64_t work = a->batch * a->heads;
    const int64_t state_bytes = work * a->feature_count * a->value_dim * a->kv.itemsize;
    const int nthreads = based_threads_for(work, state_bytes, BASED_MIN_BYTES_PER_THREAD);
    const size_t elem = a->compute == BASED_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
    const size_t per_thread = align64((size_t)(2 * a->feature_count + 3 * a->value_dim + 2 * a->feature_dim) * elem);
    char *scratch = based_scratch_alloc(per_thread * (size_t)nthreads);
    if (scratch == NULL)
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "linear_attention_decode: out of memory for %zu bytes of scratch",
                          per_thread * (size_t)nthreads);
    const based_lin_kernels *kern = based_lin_kernels_pick();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < work; bh++) {
        void *ws = scratch + per_thread * (size_t)based_thread_num();
        if (a->compute == BASED_DTYPE_FLOAT64)
            decode_head_f64(a, kern, ws, bh / a->heads, bh % a->heads);
        else
            decode_head_f32(a, kern, ws, bh / a->heads, bh % a->heads);
    }
    based_scratch_free(scratch);
    based_tokens_add(&a->tokens, a->batch, 1);
    return BASED_STATUS_OK;
}
