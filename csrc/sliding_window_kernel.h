/*
 * sliding_window_kernel.h -- the fast CPU sliding-window kernels, written once and included
 * by sliding_window.c for each compute type and instruction set, with these defined:
 *
 *   REAL        float (float32, float16, bfloat16 inputs) or double (float64 inputs)
 *   NATIVE      the dtype that is REAL; HALF_LOADS is 1 when REAL is float (the decode
 *               then reads float16/bfloat16 caches in place, converting as it loads)
 *   VL          REALs per vector register of the instruction set (GCC/Clang vector
 *               extension); a divisor of LANES
 *   NV4, NV1    key vectors of a score tile of 4 rows / of 1 row (accumulators in registers;
 *               NV4 <= 5, NV1 <= 8)
 *   DV4, DV1    output vectors of a value tile of 4 rows / of 1 row
 *   EXP         exp of (score - running max), scalar; VEC_EXP is 1 when REAL is float
 *               (the softmax step then runs in vectors, window_exp_f32 lane by lane)
 *   SFMA(a,b,c) a * b + c rounded once (fused multiply-add) on REALs
 *   VFMA(a,b,c) the same on vectors, where the instruction set has it (optional: without
 *               it, each lane goes through SFMA, which gives the same bits, more slowly)
 *   FN(name)    name with the type and instruction-set suffix
 *
 * VL, NV4, NV1, DV4, DV1, VFMA and FN are #undef'd at the end, ready for the next instantiation.
 *
 * A row is one (query position, query head). Every path computes a row with the
 * arithmetic spelled out in sliding_window.c (key blocks aligned to absolute positions,
 * scores summed over the head dim in order, per-block online softmax, weights summed in
 * LANES lanes by position mod LANES): the tiles below only decide which rows and keys are
 * computed together, never the order of any row's operations. Vectors are elementwise
 * IEEE operations; the products that are summed (scores, weighted values, exp's polynomial)
 * are fused multiply-adds, written out (SFMA, FN(vfma)), and nothing else is fused (ISO C
 * mode does not contract a * b + c by itself), so every instruction set gives the same bits.
 *
 * Prefill (window_prefill_item): one work item is (sequence b, kv head kh, a block of query
 * positions) with the G query heads of kh, rows ordered position-major. For each key block
 * of the item its keys are converted to REAL into scratch, transposed (kt: panels of LANES
 * keys, [D][LANES] each, keys in vector lanes), and its values row-major (vv: [kcp][DP]);
 * then tiles of 4 rows take
 * scores (4 x NV4 vectors of keys, register-blocked over the head dim), update each row's
 * softmax, and accumulate 4 x DV4 vectors of outputs per pass over the keys, each value row
 * loaded once for the 4 rows (keys outside a row's window are skipped, not weighted by 0).
 *
 * Decode (window_decode_item): one work item is (b, kh), reading every key and value of
 * the window where it lies in the ring, with no copy; G heads 4 at a time (else 1) share
 * each key and value load. Keys are slot-contiguous, so the slots of a block are one or
 * two runs of each key row; a ring no longer than a block is scored in one pass in slot
 * order and rotated into position order.
 */

#define VEC FN(vec)
typedef REAL VEC __attribute__((vector_size(VL * sizeof(REAL)), aligned(sizeof(REAL)), may_alias));

/* a * b + c rounded once, lane by lane: VFMA, else SFMA on each lane (the same bits) */
BASED_WINDOW_INLINE VEC FN(vfma)(VEC a, VEC b, VEC c) {
#ifdef VFMA
    return VFMA(a, b, c);
#else
    VEC r = c; /* every lane is overwritten; initialised for -Wmaybe-uninitialized at -O1 */
    for (int t = 0; t < VL; t++) r[t] = SFMA(a[t], b[t], c[t]);
    return r;
#endif
}

/* x in every lane: x - (+0) is x for every x (-0 and NaN included), and compiles to one
 * broadcast (a lane-by-lane fill would be VL inserts) */
BASED_WINDOW_INLINE VEC FN(splat)(REAL x) { return x - (VEC){0}; }

/* ---------------------------------------------------------------------------------
 * Loads: element i of a row of kind KIND_NATIVE (REAL), KIND_BF16 or KIND_F16, as REAL
 * --------------------------------------------------------------------------------- */

BASED_WINDOW_INLINE REAL FN(sload)(const void *p, int64_t i, const int kind) {
#if HALF_LOADS
    if (kind == KIND_BF16) return window_bf16_to_f32(((const uint16_t *)p)[i]);
    if (kind == KIND_F16) return window_f16_to_f32(((const uint16_t *)p)[i]);
#else
    (void)kind;
#endif
    return ((const REAL *)p)[i];
}

/* Elements i .. i+VL-1: the values of sload, lane by lane (window_f16_to_f32 in vectors). */
BASED_WINDOW_INLINE VEC FN(vload)(const void *p, int64_t i, const int kind) {
#if HALF_LOADS
    if (kind != KIND_NATIVE) {
        typedef uint16_t hvec __attribute__((vector_size(VL * 2), aligned(2), may_alias));
        typedef uint32_t uvec __attribute__((vector_size(VL * 4)));
        typedef int32_t svec __attribute__((vector_size(VL * 4)));
        const uvec h = __builtin_convertvector(*(const hvec *)((const uint16_t *)p + i), uvec);
        if (kind == KIND_BF16) return (VEC)(h << 16);
        const uvec em = h & 0x7fffu, sign = (h & 0x8000u) << 16;
        const uvec normal = (em << 13) + 0x38000000u, inf_nan = (em << 13) | 0x7f800000u;
        const VEC sub = __builtin_convertvector((svec)em, VEC) * 5.9604644775390625e-8f;
        const uvec special = (uvec)(em >= 0x7c00u), is_normal = (uvec)(em >= 0x0400u);
        const uvec r = (inf_nan & special) | (normal & ~special & is_normal) | ((uvec)sub & ~is_normal);
        return (VEC)(sign | r);
    }
#else
    (void)kind;
#endif
    return *(const VEC *)((const REAL *)p + i);
}

/* ---------------------------------------------------------------------------------
 * Register tiles
 * --------------------------------------------------------------------------------- */

/* Scores of R rows against NV vectors of keys, vectors v0 .. v0+NV-1 of a run:
 * s[m * lds + so_n + x] = sum over i of q[m * ldq + i] * k[i * ldk + ko_n + x], from 0 in
 * the order i = 0, 1, ..., d-1, each step one fused multiply-add (keys in lanes, so no lane
 * ever mixes with another).
 * Rows of keys (panel == 0): vector n at ko_n = so_n = (v0 + n) VL, the last one moved
 * back by `back` < VL keys (it then overlaps the one before, whose shared lanes it
 * recomputes to the same values). Panels (panel > 0): keys in blocks of LANES, each a
 * [D][LANES] panel `panel` elements long (ldk = LANES), so vector v lies at
 * (v VL / LANES) panel + (v VL) % LANES. */
#define WINDOW_QK(R, NV)                                                                                   \
    BASED_WINDOW_INLINE void FN(qk_##R##_##NV)(const REAL *restrict q, int64_t ldq, const void *restrict k, \
                                               int64_t ldk, int64_t d, REAL *restrict s, int64_t lds,      \
                                               int64_t v0, int64_t back, int64_t panel, const int kind) {  \
        int64_t ko[NV], so[NV];                                                                            \
        for (int n = 0; n < (NV); n++) {                                                                   \
            const int64_t v = (v0 + n) * VL;                                                               \
            so[n] = v - (n == (NV) - 1 ? back : 0);                                                        \
            ko[n] = panel ? v / LANES * panel + v % LANES : so[n];                                         \
        }                                                                                                  \
        VEC acc[R][NV];                                                                                    \
        for (int m = 0; m < (R); m++)                                                                      \
            for (int n = 0; n < (NV); n++) acc[m][n] = (VEC){0};                                           \
        for (int64_t i = 0; i < d; i++) {                                                                  \
            VEC kv[NV];                                                                                    \
            for (int n = 0; n < (NV); n++) kv[n] = FN(vload)(k, i * ldk + ko[n], kind);                    \
            for (int m = 0; m < (R); m++) {                                                                \
                const VEC x = FN(splat)(q[m * ldq + i]);                                                   \
                for (int n = 0; n < (NV); n++) acc[m][n] = FN(vfma)(x, kv[n], acc[m][n]);                  \
            }                                                                                              \
        }                                                                                                  \
        for (int m = 0; m < (R); m++)                                                                      \
            for (int n = 0; n < (NV); n++) *(VEC *)(s + m * lds + so[n]) = acc[m][n];                      \
    }
WINDOW_QK(4, 1)
WINDOW_QK(4, 2)
WINDOW_QK(4, 3)
WINDOW_QK(4, 4)
WINDOW_QK(4, 5)
WINDOW_QK(1, 1)
WINDOW_QK(1, 2)
WINDOW_QK(1, 3)
WINDOW_QK(1, 4)
WINDOW_QK(1, 5)
WINDOW_QK(1, 6)
WINDOW_QK(1, 7)
WINDOW_QK(1, 8)
#undef WINDOW_QK

/* Scores of R (4 or 1) rows against the keys 0 .. n-1 of k (n >= VL; a multiple of LANES
 * for panels): whole vectors, the last one ending at key n-1 (overlapping the one before
 * when VL does not divide n). */
BASED_WINDOW_INLINE void FN(qk_rows_body)(const int R, const REAL *q, int64_t ldq, const void *k, int64_t ldk,
                                          int64_t d, REAL *s, int64_t lds, int64_t n, int64_t panel, const int kind) {
    const int64_t nv = (n + VL - 1) / VL, back = nv * VL - n;
    int64_t v = 0;
#define QK_AT(R_, NV_, BACK_) FN(qk_##R_##_##NV_)(q, ldq, k, ldk, d, s, lds, v, BACK_, panel, kind)
    if (R == 4) {
        for (; v + NV4 < nv; v += NV4) FN(CAT(qk_4_, NV4))(q, ldq, k, ldk, d, s, lds, v, 0, panel, kind);
        switch (nv - v) {
        case 1: QK_AT(4, 1, back); break;
        case 2: QK_AT(4, 2, back); break;
        case 3: QK_AT(4, 3, back); break;
        case 4: QK_AT(4, 4, back); break;
        case 5: QK_AT(4, 5, back); break;
        default: break;
        }
    } else {
        for (; v + NV1 < nv; v += NV1) FN(CAT(qk_1_, NV1))(q, ldq, k, ldk, d, s, lds, v, 0, panel, kind);
        switch (nv - v) {
        case 1: QK_AT(1, 1, back); break;
        case 2: QK_AT(1, 2, back); break;
        case 3: QK_AT(1, 3, back); break;
        case 4: QK_AT(1, 4, back); break;
        case 5: QK_AT(1, 5, back); break;
        case 6: QK_AT(1, 6, back); break;
        case 7: QK_AT(1, 7, back); break;
        case 8: QK_AT(1, 8, back); break;
        default: break;
        }
    }
#undef QK_AT
}

/* The same, compiled once per kind of key rows (each body holds every tile shape). */
static void FN(qk_rows)(int R, const REAL *q, int64_t ldq, const void *k, int64_t ldk, int64_t d, REAL *s,
                        int64_t lds, int64_t n, int64_t panel, int kind) {
#if HALF_LOADS
    if (kind == KIND_BF16) {
        FN(qk_rows_body)(R, q, ldq, k, ldk, d, s, lds, n, panel, KIND_BF16);
        return;
    }
    if (kind == KIND_F16) {
        FN(qk_rows_body)(R, q, ldq, k, ldk, d, s, lds, n, panel, KIND_F16);
        return;
    }
#endif
    (void)kind;
    FN(qk_rows_body)(R, q, ldq, k, ldk, d, s, lds, n, panel, KIND_NATIVE);
}

/* Scores of R rows against n keys one at a time (columns col .. col+n-1 of k): the same sums. */
static void FN(qk_scalar)(int R, const REAL *q, int64_t ldq, const void *k, int64_t ldk, int64_t d, int64_t col,
                          int64_t n, REAL *s, int64_t lds, int kind) {
    for (int64_t j = 0; j < n; j++)
        for (int m = 0; m < R; m++) {
            REAL a = 0;
            for (int64_t i = 0; i < d; i++) a = SFMA(q[m * ldq + i], FN(sload)(k, i * ldk + col + j, kind), a);
            s[m * lds + j] = a;
        }
}

/* Outputs of R rows over DV vectors: a[m][x] += e[m * lde + j] * v[j * ldv + x] (fused) for
 * keys j = 0, 1, ..., n-1 in order (acc rows lda apart, read and written back). */
#define WINDOW_PV(R, DV)                                                                                   \
    BASED_WINDOW_INLINE void FN(pv_##R##_##DV)(REAL *restrict acc, int64_t lda, const REAL *restrict e,     \
                                               int64_t lde, const void *restrict v, int64_t ldv, int64_t n, \
                                               const int kind) {                                           \
        VEC a[R][DV];                                                                                      \
        for (int m = 0; m < (R); m++)                                                                      \
            for (int x = 0; x < (DV); x++) a[m][x] = *(const VEC *)(acc + m * lda + x * VL);               \
        for (int64_t j = 0; j < n; j++) {                                                                  \
            VEC vv[DV];                                                                                    \
            for (int x = 0; x < (DV); x++) vv[x] = FN(vload)(v, j * ldv + x * VL, kind);                   \
            for (int m = 0; m < (R); m++) {                                                                \
                const VEC w = FN(splat)(e[m * lde + j]);                                                   \
                for (int x = 0; x < (DV); x++) a[m][x] = FN(vfma)(w, vv[x], a[m][x]);                      \
            }                                                                                              \
        }                                                                                                  \
        for (int m = 0; m < (R); m++)                                                                      \
            for (int x = 0; x < (DV); x++) *(VEC *)(acc + m * lda + x * VL) = a[m][x];                     \
    }
WINDOW_PV(4, 1)
WINDOW_PV(4, 2)
WINDOW_PV(4, 3)
WINDOW_PV(4, 4)
WINDOW_PV(1, 1)
WINDOW_PV(1, 2)
WINDOW_PV(1, 3)
WINDOW_PV(1, 4)
WINDOW_PV(1, 5)
WINDOW_PV(1, 6)
WINDOW_PV(1, 7)
WINDOW_PV(1, 8)
#undef WINDOW_PV

/* The same for 4 rows with their own key ranges: row m takes key j only for
 * lo[m] <= j < hi[m] (skipped, not weighted by 0: a value outside the window may be inf).
 * Keys f0 <= j < f1 (0 <= f0 <= f1 <= n) are in every row's range, so they need no test. */
#define WINDOW_PV_STEP(DV, TEST)                                                                           \
    do {                                                                                                   \
        VEC vv[DV];                                                                                        \
        for (int x = 0; x < (DV); x++) vv[x] = *(const VEC *)(v + j * ldv + x * VL);                       \
        for (int m = 0; m < 4; m++) {                                                                      \
            if (TEST && (j < lo[m] || j >= hi[m])) continue;                                               \
            const VEC w = FN(splat)(e[m * lde + j]);                                                       \
            for (int x = 0; x < (DV); x++) a[m][x] = FN(vfma)(w, vv[x], a[m][x]);                          \
        }                                                                                                  \
    } while (0)
#define WINDOW_PV_MASKED(DV)                                                                               \
    BASED_WINDOW_INLINE void FN(pvm_##DV)(REAL *restrict acc, int64_t lda, const REAL *restrict e,         \
                                          int64_t lde, const REAL *restrict v, int64_t ldv, int64_t n,     \
                                          const int64_t lo[4], const int64_t hi[4], int64_t f0, int64_t f1) { \
        VEC a[4][DV];                                                                                      \
        for (int m = 0; m < 4; m++)                                                                        \
            for (int x = 0; x < (DV); x++) a[m][x] = *(const VEC *)(acc + m * lda + x * VL);               \
        int64_t j = 0;                                                                                     \
        for (; j < f0; j++) WINDOW_PV_STEP(DV, 1);                                                         \
        for (; j < f1; j++) WINDOW_PV_STEP(DV, 0);                                                         \
        for (; j < n; j++) WINDOW_PV_STEP(DV, 1);                                                          \
        for (int m = 0; m < 4; m++)                                                                        \
            for (int x = 0; x < (DV); x++) *(VEC *)(acc + m * lda + x * VL) = a[m][x];                     \
    }
WINDOW_PV_MASKED(1)
WINDOW_PV_MASKED(2)
WINDOW_PV_MASKED(3)
WINDOW_PV_MASKED(4)
#undef WINDOW_PV_MASKED
#undef WINDOW_PV_STEP

/* Outputs of R (4 or 1) rows over nvd vectors (elements 0 .. nvd * VL of each row). */
BASED_WINDOW_INLINE void FN(pv_rows_body)(const int R, REAL *acc, int64_t lda, const REAL *e, int64_t lde, const void *v,
                                     int64_t ldv, int64_t n, int64_t nvd, const int kind) {
    const size_t vb = kind == KIND_NATIVE ? sizeof(REAL) : 2;
    int64_t x = 0;
#define PV_AT(R_, DV_) FN(pv_##R_##_##DV_)(acc + x * VL, lda, e, lde, (const char *)v + x * VL * vb, ldv, n, kind)
    if (R == 4) {
        for (; x + DV4 <= nvd; x += DV4) FN(CAT(pv_4_, DV4))(acc + x * VL, lda, e, lde,
                                                                    (const char *)v + x * VL * vb, ldv, n, kind);
        switch (nvd - x) {
        case 1: PV_AT(4, 1); break;
        case 2: PV_AT(4, 2); break;
        case 3: PV_AT(4, 3); break;
        default: break;
        }
    } else {
        for (; x + DV1 <= nvd; x += DV1) FN(CAT(pv_1_, DV1))(acc + x * VL, lda, e, lde,
                                                                    (const char *)v + x * VL * vb, ldv, n, kind);
        switch (nvd - x) {
        case 1: PV_AT(1, 1); break;
        case 2: PV_AT(1, 2); break;
        case 3: PV_AT(1, 3); break;
        case 4: PV_AT(1, 4); break;
        case 5: PV_AT(1, 5); break;
        case 6: PV_AT(1, 6); break;
        case 7: PV_AT(1, 7); break;
        default: break;
        }
    }
#undef PV_AT
}

static void FN(pv_rows)(int R, REAL *acc, int64_t lda, const REAL *e, int64_t lde, const void *v, int64_t ldv,
                        int64_t n, int64_t nvd, int kind) {
#if HALF_LOADS
    if (kind == KIND_BF16) {
        FN(pv_rows_body)(R, acc, lda, e, lde, v, ldv, n, nvd, KIND_BF16);
        return;
    }
    if (kind == KIND_F16) {
        FN(pv_rows_body)(R, acc, lda, e, lde, v, ldv, n, nvd, KIND_F16);
        return;
    }
#endif
    (void)kind;
    FN(pv_rows_body)(R, acc, lda, e, lde, v, ldv, n, nvd, KIND_NATIVE);
}

/* The same for elements i0 .. i0+cnt-1 of each row, one at a time (a head dim that is not a
 * multiple of VL, read in place). */
static void FN(pv_scalar)(int R, REAL *acc, int64_t lda, const REAL *e, int64_t lde, const void *v, int64_t ldv,
                          int64_t n, int64_t i0, int64_t cnt, int kind) {
    for (int64_t j = 0; j < n; j++)
        for (int m = 0; m < R; m++) {
            const REAL w = e[m * lde + j];
            for (int64_t i = i0; i < i0 + cnt; i++) acc[m * lda + i] = SFMA(w, FN(sload)(v, j * ldv + i, kind), acc[m * lda + i]);
        }
}

/* ---------------------------------------------------------------------------------
 * One row's softmax step over one key block
 * --------------------------------------------------------------------------------- */

/* Softmax step of R (4 or 1) rows over one key block. Row m's scores are in
 * s[m * SROW + 0 .. nx), for keys base + x (base and nx multiples of LANES), of which x in
 * [va[m], vb[m]) are the row's keys of this block (possibly none). Updates the row's
 * running max m[m] and sum l[m], leaves s[m * SROW + x] = EXP(score - max) for its keys and
 * 0 elsewhere, and sets corr[m], the factor its outputs must be multiplied by first (1
 * when the max did not change: exact). The weights are summed in LANES lanes, lane
 * x % LANES in increasing x, then the lanes in order: the same for every path, as
 * x % LANES is position % LANES. The max ignores NaN scores (they give NaN weights); its
 * order does not matter. The rows are independent: done side by side so that their
 * reductions overlap. */
#if VEC_EXP
typedef int32_t FN(ivec) __attribute__((vector_size(VL * 4)));

/* lanes of a where mask (all ones), else of b */
BASED_WINDOW_INLINE VEC FN(vselect)(FN(ivec) mask, VEC a, VEC b) {
    return (VEC)(((FN(ivec))a & mask) | ((FN(ivec))b & ~mask));
}

/* window_exp_f32, lane by lane (the same operations, so the same bits) */
BASED_WINDOW_INLINE VEC FN(vexp)(VEC x) {
#define K_(c) ((VEC){0} + (c)) /* c in every lane (c != 0, so exact) */
    const VEC lo = K_(WINDOW_EXP_LO);
    const FN(ivec) in_range = x > lo;
    const VEC xc = FN(vselect)(in_range, x, lo);
    const VEC n = WINDOW_EXP_ROUND(xc, FN(vfma), K_);
    const VEC r = WINDOW_EXP_REDUCE(xc, n, FN(vfma), K_);
    VEC p = K_(1.0f / 5040.0f);
    WINDOW_EXP_POLY(p, r, FN(vfma), K_);
#undef K_
    const FN(ivec) bits = (__builtin_convertvector(n, FN(ivec)) + 127) * (1 << 23);
    const VEC e = p * (VEC)bits;
    return FN(vselect)(in_range, e, FN(vselect)(x == x, (VEC){0}, x));
}

BASED_WINDOW_INLINE void FN(tile_softmax)(const int R, REAL *restrict s, const int64_t *va, const int64_t *vb,
                                          int64_t nx, REAL *m, REAL *l, REAL *corr) {
    FN(ivec) iota;
    for (int t = 0; t < VL; t++) iota[t] = t;
    const VEC neg_inf = (VEC){0} - INFINITY;
    int64_t a0 = va[0], b1 = vb[0];
    for (int r = 1; r < R; r++) {
        a0 = va[r] < a0 ? va[r] : a0;
        b1 = vb[r] > b1 ? vb[r] : b1;
    }
    VEC mv[4];
    for (int r = 0; r < R; r++) mv[r] = neg_inf;
    for (int64_t x0 = a0 / VL * VL; x0 < b1; x0 += VL) {
        const FN(ivec) x = iota + (int32_t)x0;
        for (int r = 0; r < R; r++) {
            const FN(ivec) in = (x >= (int32_t)va[r]) & (x < (int32_t)vb[r]);
            const VEC sv = FN(vselect)(in, *(const VEC *)(s + r * SROW + x0), neg_inf);
            mv[r] = FN(vselect)(sv > mv[r], sv, mv[r]);
        }
    }
    REAL m_new[4];
    for (int r = 0; r < R; r++) m_new[r] = m[r];
    for (int t = 0; t < VL; t++)
        for (int r = 0; r < R; r++) m_new[r] = mv[r][t] > m_new[r] ? mv[r][t] : m_new[r];
    for (int r = 0; r < R; r++) corr[r] = m_new[r] != m[r] ? EXP(m[r] - m_new[r]) : 1;
    VEC lane[4][LANES / VL];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < LANES / VL; u++) lane[r][u] = (VEC){0};
    for (int64_t x0 = 0; x0 < nx; x0 += LANES)
        for (int u = 0; u < LANES / VL; u++) {
            const FN(ivec) x = iota + (int32_t)(x0 + u * VL);
            for (int r = 0; r < R; r++) {
                REAL *sp = s + r * SROW + x0 + u * VL;
                const FN(ivec) in = (x >= (int32_t)va[r]) & (x < (int32_t)vb[r]);
                /* EXP(-inf) == 0: lanes outside [va, vb) get weight 0 */
                const VEC e = FN(vexp)(FN(vselect)(in, *(const VEC *)sp - m_new[r], neg_inf));
                *(VEC *)sp = e;
                lane[r][u] = lane[r][u] + e;
            }
        }
    REAL sum[4];
    for (int r = 0; r < R; r++) sum[r] = l[r] * corr[r];
    for (int t = 0; t < LANES; t++)
        for (int r = 0; r < R; r++) sum[r] += lane[r][t / VL][t % VL];
    for (int r = 0; r < R; r++) {
        m[r] = m_new[r];
        l[r] = sum[r];
    }
}
#else
BASED_WINDOW_INLINE void FN(tile_softmax)(const int R, REAL *restrict s, const int64_t *va, const int64_t *vb,
                                          int64_t nx, REAL *m, REAL *l, REAL *corr) {
    for (int r = 0; r < R; r++) {
        REAL *sr = s + r * SROW, bm = -INFINITY;
        for (int64_t x = va[r]; x < vb[r]; x++) bm = sr[x] > bm ? sr[x] : bm;
        const REAL m_new = bm > m[r] ? bm : m[r];
        corr[r] = m_new != m[r] ? EXP(m[r] - m_new) : 1;
        REAL lane[LANES] = {0};
        for (int64_t x0 = 0; x0 < nx; x0 += LANES)
            for (int t = 0; t < LANES; t++) {
                const int64_t x = x0 + t;
                const REAL e = x >= va[r] && x < vb[r] ? EXP(sr[x] - m_new) : 0;
                sr[x] = e;
                lane[t] += e;
            }
        REAL sum = l[r] * corr[r];
        for (int t = 0; t < LANES; t++) sum += lane[t];
        m[r] = m_new;
        l[r] = sum;
    }
}
#endif

/* n elements of a row of dtype dt (`stride` apart) to dst, `dst_stride` apart, as REAL. */
BASED_WINDOW_INLINE void FN(load_row)(REAL *dst, int64_t dst_stride, const char *src, based_dtype dt, int64_t n,
                                      int64_t stride) {
    if (dt == NATIVE && stride == 1 && dst_stride == 1) { /* a short row: inline vector copies, no call */
        const REAL *restrict x = (const REAL *)src;
        REAL *restrict y = dst;
        for (int64_t i = 0; i < n; i++) y[i] = x[i];
    } else if (dt == NATIVE) {
        const REAL *x = (const REAL *)src;
        for (int64_t i = 0; i < n; i++) dst[i * dst_stride] = x[i * stride];
    } else if (dt == BASED_DTYPE_BFLOAT16) {
        const uint16_t *x = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i * dst_stride] = (REAL)window_bf16_to_f32(x[i * stride]);
    } else if (dt == BASED_DTYPE_FLOAT16) {
        const uint16_t *x = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i * dst_stride] = (REAL)window_f16_to_f32(x[i * stride]);
    } else {
        for (int64_t i = 0; i < n; i++) dst[i * dst_stride] = (REAL)LOAD(src, dt, i * stride);
    }
}

/* q[b, t, h] times scale into dst (d REALs). */
BASED_WINDOW_INLINE void FN(load_query)(const based_sliding_window_args *c, REAL *dst, int64_t b, int64_t t,
                                        int64_t h) {
    const int64_t d = c->head_dim;
    const REAL scale = (REAL)c->scale;
    FN(load_row)(dst, 1, based_window_row(&c->q, b, t, h), c->q.dtype, d, c->q.strides[3]);
    for (int64_t i = 0; i < d; i++) dst[i] *= scale;
}

/* Output row: acc / l into out[b, t, h] in out's dtype. */
BASED_WINDOW_INLINE void FN(store_row)(const based_sliding_window_args *c, REAL *acc, REAL l, int64_t b, int64_t t,
                                       int64_t h) {
    char *o = based_window_row(&c->out, b, t, h);
    if (c->out.dtype == NATIVE && c->out.strides[3] == 1) {
        REAL *restrict y = (REAL *)o;
        const REAL *restrict x = acc;
        for (int64_t i = 0; i < c->head_dim; i++) y[i] = x[i] / l;
        return;
    }
    for (int64_t i = 0; i < c->head_dim; i++) acc[i] /= l;
    SCATTER(o, c->out.dtype, c->head_dim, c->out.strides[3], acc);
}


/* ---------------------------------------------------------------------------------
 * Decode
 * --------------------------------------------------------------------------------- */

/* Scores of R rows (q rows ldq apart) for the n keys in slots s0 .. s0+n-1 of a ring of w
 * slots, key dim i of slot j at element i * ldk + j of k: into out[m * SROW + 0 .. n).
 * Vectors where the run is at least one long; a shorter run through one vector that lies
 * inside the key row (its other lanes are dropped), or one key at a time when a row is
 * shorter than a vector. */
static void FN(decode_scores)(int R, const REAL *q, int64_t ldq, const void *k, int64_t ldk, int64_t d, int64_t w,
                              int64_t s0, int64_t n, REAL *out, int kind) {
    const size_t kb = kind == KIND_NATIVE ? sizeof(REAL) : 2;
    if (n >= VL) {
        FN(qk_rows)(R, q, ldq, (const char *)k + s0 * kb, ldk, d, out, SROW, n, 0, kind);
    } else if (w >= VL) {
        const int64_t x0 = s0 + VL <= w ? s0 : w - VL;
        REAL tmp[4 * VL];
        FN(qk_rows)(R, q, ldq, (const char *)k + x0 * kb, ldk, d, tmp, VL, VL, 0, kind);
        for (int m = 0; m < R; m++)
            for (int64_t j = 0; j < n; j++) out[m * SROW + j] = tmp[m * VL + (s0 - x0) + j];
    } else {
        FN(qk_scalar)(R, q, ldq, k, ldk, d, s0, n, out, SROW, kind);
    }
}

/* Outputs of R rows (acc rows ACC_LD apart) for n keys whose values are rows ldv apart. */
static void FN(decode_values)(int R, REAL *acc, const REAL *e, const void *v, int64_t ldv, int64_t n, int64_t d,
                               int kind) {
    const int64_t nvd = d / VL;
    if (nvd > 0) FN(pv_rows)(R, acc, ACC_LD, e, SROW, v, ldv, n, nvd, kind);
    if (nvd * VL < d) FN(pv_scalar)(R, acc, ACC_LD, e, SROW, v, ldv, n, nvd * VL, d - nvd * VL, kind);
}

/* Work item (b, kh) of a decode step whose key cache is slot-contiguous
 * (k_cache[b, kh, :, i] unit-stride) and whose value rows are unit-stride. Writes
 * k_cache/v_cache[b, kh, tokens[b] % W] and out[b, h] for the G heads of kh.
 *
 * The new key's slot is a column of the key slab, one element in each of D cache lines,
 * which stores to a slab not yet in cache would fetch one line after another. So its
 * scores are taken from the input row (the same sum, so the same bits), over the stale
 * slot's, and the column is stored once the score pass has brought the slab in. */
static void FN(window_decode_item)(const based_sliding_window_args *c, int64_t b, int64_t kh) {
    const int kind = c->k.dtype == BASED_DTYPE_BFLOAT16 ? KIND_BF16 : c->k.dtype == BASED_DTYPE_FLOAT16 ? KIND_F16
                                                                                                    : KIND_NATIVE;
    const int64_t d = c->head_dim, w = c->window, g_count = c->heads / c->kv_heads, h0 = kh * g_count;
    const int64_t p = based_tokens_at(&c->tokens, b), lo = p >= w - 1 ? p - w + 1 : 0, slot = p % w;
    const int64_t isz = c->k.itemsize, ldk = c->k_cache.strides[3], ldv = c->v_cache.strides[2];
    char *kc = based_window_row(&c->k_cache, b, kh, 0), *vc = based_window_row(&c->v_cache, b, kh, 0);
    const char *kn = based_window_row(&c->k, b, 0, kh), *vn = based_window_row(&c->v, b, 0, kh);
    const int64_t ks = c->k.strides[3], vs = c->v.strides[3];
    if (isz == 2) /* the new value into its slot (a contiguous row) */
        for (int64_t i = 0; i < d; i++) ((uint16_t *)vc)[slot * ldv + i] = ((const uint16_t *)vn)[i * vs];
    else if (isz == 4)
        for (int64_t i = 0; i < d; i++) ((uint32_t *)vc)[slot * ldv + i] = ((const uint32_t *)vn)[i * vs];
    else
        for (int64_t i = 0; i < d; i++) ((uint64_t *)vc)[slot * ldv + i] = ((const uint64_t *)vn)[i * vs];

    REAL qs[4 * BASED_WINDOW_MAX_HEAD_DIM], acc[4 * ACC_LD], s[4 * SROW], ring[4 * SROW], mx[4], l[4], corr[4];
    REAL s_new[4];
    const int64_t filled = p + 1 < w ? p + 1 : w; /* slots holding positions of the window: 0 .. filled-1 */
    int key_stored = 0;
    for (int64_t g0 = 0; g0 < g_count;) {
        const int R = g_count - g0 >= 4 ? 4 : 1;
        for (int m = 0; m < R; m++) {
            REAL *qm = qs + m * BASED_WINDOW_MAX_HEAD_DIM;
            FN(load_query)(c, qm, b, 0, h0 + g0 + m);
            for (int64_t x = 0; x < d; x++) acc[m * ACC_LD + x] = 0;
            mx[m] = -INFINITY;
            l[m] = 0;
            REAL a = 0; /* the new key's score, summed as every score is */
            for (int64_t i = 0; i < d; i++) a = SFMA(qm[i], FN(sload)(kn, i * ks, kind), a);
            s_new[m] = a;
        }
        /* a ring no longer than a block: the scores of all its slots in one pass, in slot order */
        if (w <= KB) {
            FN(decode_scores)(R, qs, BASED_WINDOW_MAX_HEAD_DIM, kc, ldk, d, w, 0, filled, ring, kind);
            for (int m = 0; m < R; m++) ring[m * SROW + slot] = s_new[m];
        }
        for (int64_t blk = lo / KB * KB; blk <= p; blk += KB) {
            const int64_t ja = blk > lo ? blk : lo, jb = blk + KB < p + 1 ? blk + KB : p + 1;
            const int64_t base = ja / LANES * LANES, nx = (jb + LANES - 1) / LANES * LANES - base;
            const int64_t x1 = ja - base, x2 = jb - base;
            for (int m = 0; m < R; m++) { /* the lanes around the keys are read (masked) by row_softmax */
                for (int64_t x = 0; x < x1; x++) s[m * SROW + x] = 0;
                for (int64_t x = x2; x < nx; x++) s[m * SROW + x] = 0;
            }
            /* the block's keys lie in slots ja % w .. w-1, then from slot 0 (one or two runs) */
            const int64_t s1 = ja % w, n1 = jb - ja < w - s1 ? jb - ja : w - s1, n2 = jb - ja - n1;
            if (w <= KB) {
                for (int m = 0; m < R; m++) {
                    memcpy(s + m * SROW + x1, ring + m * SROW + s1, (size_t)n1 * sizeof(REAL));
                    memcpy(s + m * SROW + x1 + n1, ring + m * SROW, (size_t)n2 * sizeof(REAL));
                }
            } else {
                FN(decode_scores)(R, qs, BASED_WINDOW_MAX_HEAD_DIM, kc, ldk, d, w, s1, n1, s + x1, kind);
                if (n2 > 0)
                    FN(decode_scores)(R, qs, BASED_WINDOW_MAX_HEAD_DIM, kc, ldk, d, w, 0, n2, s + x1 + n1, kind);
                if (jb == p + 1) /* the new key is the last of the window */
                    for (int m = 0; m < R; m++) s[m * SROW + x2 - 1] = s_new[m];
            }
            if (!key_stored && jb == p + 1) { /* every score of this pass is taken: the new key into its slot */
                if (isz == 2)
                    for (int64_t i = 0; i < d; i++) ((uint16_t *)kc)[i * ldk + slot] = ((const uint16_t *)kn)[i * ks];
                else if (isz == 4)
                    for (int64_t i = 0; i < d; i++) ((uint32_t *)kc)[i * ldk + slot] = ((const uint32_t *)kn)[i * ks];
                else
                    for (int64_t i = 0; i < d; i++) ((uint64_t *)kc)[i * ldk + slot] = ((const uint64_t *)kn)[i * ks];
                key_stored = 1;
            }
            const int64_t va[4] = {x1, x1, x1, x1}, vb[4] = {x2, x2, x2, x2};
            if (R == 4) /* R a constant in each call, so that the loops unroll */
                FN(tile_softmax)(4, s, va, vb, nx, mx, l, corr);
            else
                FN(tile_softmax)(1, s, va, vb, nx, mx, l, corr);
            for (int m = 0; m < R; m++)
                if (corr[m] != 1)
                    for (int64_t x = 0; x < d; x++) acc[m * ACC_LD + x] *= corr[m];
            FN(decode_values)(R, acc, s + x1, vc + s1 * ldv * isz, ldv, n1, d, kind);
            if (n2 > 0) FN(decode_values)(R, acc, s + x1 + n1, vc, ldv, n2, d, kind);
        }
        for (int m = 0; m < R; m++) FN(store_row)(c, acc + m * ACC_LD, l[m], b, 0, h0 + g0 + m);
        g0 += R;
    }
    if (!key_stored) /* no query heads */
        for (int64_t i = 0; i < d; i++) memcpy(kc + (i * ldk + slot) * isz, kn + i * ks * isz, (size_t)isz);
}

/* ---------------------------------------------------------------------------------
 * Prefill
 * --------------------------------------------------------------------------------- */


/* dst[i * ld + r] = src[r * ld_src + i] for r, i < VL: a block transpose in registers,
 * log2(VL) rounds that swap the off-diagonal h x h blocks of each 2h x 2h block with
 * two-vector shuffles (GCC's __builtin_shuffle; element by element elsewhere). */
BASED_WINDOW_INLINE void FN(transpose_block)(REAL *restrict dst, int64_t ld, const REAL *restrict src,
                                             int64_t ld_src) {
#if defined(__GNUC__) && !defined(__clang__)
    typedef IREAL FN(mask) __attribute__((vector_size(VL * sizeof(REAL))));
    VEC r[VL];
    for (int i = 0; i < VL; i++) r[i] = *(const VEC *)(src + i * ld_src);
#pragma GCC unroll 8
    for (int h = VL / 2; h >= 1; h /= 2) { /* unrolled, so that the masks are constants */
        FN(mask) lo = {0}, hi = {0}; /* every lane set below; the zeros keep -O1 quiet */
#pragma GCC unroll 16
        for (int j = 0; j < VL; j++) {
            lo[j] = (j & h) ? VL + j - h : j;
            hi[j] = (j & h) ? VL + j : j + h;
        }
#pragma GCC unroll 16
        for (int i = 0; i < VL; i++)
            if (!(i & h)) {
                const VEC a = r[i], b = r[i + h];
                r[i] = __builtin_shuffle(a, b, lo);
                r[i + h] = __builtin_shuffle(a, b, hi);
            }
    }
    for (int i = 0; i < VL; i++) *(VEC *)(dst + i * ld) = r[i];
#else
    for (int r = 0; r < VL; r++)
        for (int i = 0; i < VL; i++) dst[i * ld + r] = src[r * ld_src + i];
#endif
}

/* Key u of the block (u = pos - cbase) and dim i in kt: panels of LANES keys, [D][LANES] each. */
#define KT_AT(kt, u, i, d) ((kt) + (u) / LANES * LANES * (d) + (i) * LANES + (u) % LANES)

/* Keys and values of absolute positions from .. to-1 (sequence b, kv head kh) into key
 * u = pos - cbase of kt and row u of vv: from the ring cache for
 * positions before the call (pos < t0), else from the call's inputs. Keys are transposed VL
 * rows at a time, straight from the input rows when they are REAL with unit stride, else
 * through `tile`; each VL x VL block lands in one panel, VL * LANES contiguous elements. */
static void FN(load_rows)(const based_sliding_window_args *c, const window_scratch *sc, int64_t b, int64_t kh,
                          int64_t t0, int64_t from, int64_t to, int64_t cbase) {
    const int64_t d = c->head_dim, dp = sc->dp;
    REAL *tile = (REAL *)sc->tile, *kt = (REAL *)sc->kt, *vv = (REAL *)sc->vv;
    const int direct = c->k.dtype == NATIVE && c->k.strides[3] == 1;
    for (int64_t p0 = from, rows; p0 < to; p0 += rows) {
        const int64_t u0 = p0 - cbase, fit = VL - u0 % VL; /* groups end on multiples of VL */
        rows = to - p0 < fit ? to - p0 : fit;
        /* rows of one head are H * D elements apart (a page or more): the hardware
         * prefetchers do not follow, so ask for the next rows now */
        for (int64_t pos = p0 + VL; pos < to && pos < p0 + 2 * VL; pos++) {
            if (pos < t0) continue;
            BASED_WINDOW_PREFETCH(based_window_row(&c->k, b, pos - t0, kh), d * c->k.itemsize);
            BASED_WINDOW_PREFETCH(based_window_row(&c->v, b, pos - t0, kh), d * c->v.itemsize);
        }
        const int from_input = p0 >= t0 && direct;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t pos = p0 + r;
            const char *kp, *vp;
            int64_t ks, vs;
            if (pos < t0) {
                kp = based_window_row(&c->k_cache, b, kh, pos % c->window);
                vp = based_window_row(&c->v_cache, b, kh, pos % c->window);
                ks = c->k_cache.strides[3];
                vs = c->v_cache.strides[3];
            } else {
                kp = based_window_row(&c->k, b, pos - t0, kh);
                vp = based_window_row(&c->v, b, pos - t0, kh);
                ks = c->k.strides[3];
                vs = c->v.strides[3];
            }
            if (!from_input || rows < VL) FN(load_row)(tile + r * d, 1, kp, c->k.dtype, d, ks); /* else read below */
            FN(load_row)(vv + (u0 + r) * dp, 1, vp, c->v.dtype, d, vs);
        }
        const int straight = from_input && rows == VL;
        const REAL *src = straight ? (const REAL *)based_window_row(&c->k, b, p0 - t0, kh) : tile;
        const int64_t ld_src = straight ? c->k.strides[1] : d;
        int64_t i = 0;
        if (rows == VL)
            for (; i + VL <= d; i += VL) FN(transpose_block)(KT_AT(kt, u0, i, d), LANES, src + i, ld_src);
        for (; i < d; i++)
            for (int64_t r = 0; r < rows; r++) *KT_AT(kt, u0 + r, i, d) = src[r * ld_src + i];
    }
}

/* The same for positions from .. to-1, all before the call (in the ring cache), when the
 * key cache is slot-contiguous: key rows are copied as they lie, no transpose. */
static void FN(load_cached)(const based_sliding_window_args *c, const window_scratch *sc, int64_t b, int64_t kh,
                            int64_t from, int64_t to, int64_t cbase) {
    const int64_t d = c->head_dim, dp = sc->dp, w = c->window;
    REAL *kt = (REAL *)sc->kt, *vv = (REAL *)sc->vv;
    for (int64_t pos = from; pos < to;) {
        /* up to the ring's end and to the end of the panel */
        const int64_t slot = pos % w, u = pos - cbase, lane = u % LANES;
        int64_t seg = to - pos < w - slot ? to - pos : w - slot;
        seg = seg < LANES - lane ? seg : LANES - lane;
        const char *k0 = based_window_row(&c->k_cache, b, kh, slot);
        for (int64_t i = 0; i < d; i++)
            FN(load_row)(KT_AT(kt, u, i, d), 1, k0 + i * c->k_cache.strides[3] * c->k_cache.itemsize, c->k_cache.dtype,
                         seg, 1);
        for (int64_t r = 0; r < seg; r++)
            FN(load_row)(vv + (u + r) * dp, 1, based_window_row(&c->v_cache, b, kh, slot + r), c->v_cache.dtype, d,
                         c->v_cache.strides[3]);
        pos += seg;
    }
}

/* One tile of R rows r0 .. r0+R-1 (R = 4 or 1) against the keys ja .. jb-1 of the block in
 * scratch (kt column / vv row u - cbase): scores, softmax step, outputs. */
BASED_WINDOW_INLINE void FN(prefill_tile)(const based_sliding_window_args *c, const window_scratch *sc, const int R,
                                          int64_t r0, int64_t p_first, int64_t ja, int64_t jb, int64_t cbase) {
    const int64_t d = c->head_dim, dp = sc->dp, w = c->window, g_count = c->heads / c->kv_heads;
    REAL *qs = (REAL *)sc->qs + r0 * d, *acc = (REAL *)sc->acc + r0 * dp;
    REAL *mx = (REAL *)sc->m + r0, *l = (REAL *)sc->l + r0, *s = (REAL *)sc->s;
    const REAL *kt = (const REAL *)sc->kt, *vv = (const REAL *)sc->vv;
    const int64_t base = ja / LANES * LANES, nx = (jb + LANES - 1) / LANES * LANES - base;
    FN(qk_rows)(R, qs, d, kt + (base - cbase) * d, LANES, d, s, SROW, nx, LANES * d, KIND_NATIVE);
    int64_t lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0}; /* each row's keys, relative to ja (maybe none) */
    int64_t va[4], vb[4];
    for (int m = 0; m < R; m++) {
        const int64_t p = p_first + (r0 + m) / g_count, first = p >= w - 1 ? p - w + 1 : 0;
        const int64_t a = first > ja ? first : ja, e = p + 1 < jb ? p + 1 : jb;
        va[m] = a - base;
        vb[m] = e > a ? e - base : a - base;
        if (a < e) {
            lo[m] = a - ja;
            hi[m] = e - ja;
        }
    }
    REAL corr[4];
    FN(tile_softmax)(R, s, va, vb, nx, mx, l, corr);
    for (int m = 0; m < R; m++)
        if (corr[m] != 1)
            for (int64_t x = 0; x < dp; x++) acc[m * dp + x] *= corr[m];
    const int64_t nvd = dp / VL;
    const REAL *e0 = s + (ja - base), *v0 = vv + (ja - cbase) * dp;
    if (R == 1) {
        if (hi[0] > lo[0])
            FN(pv_rows)(1, acc, dp, e0 + lo[0], SROW, v0 + lo[0] * dp, dp, hi[0] - lo[0], nvd, KIND_NATIVE);
        return;
    }
    int64_t f0 = 0, f1 = jb - ja; /* keys of every row */
    for (int m = 0; m < 4; m++) {
        f0 = lo[m] > f0 ? lo[m] : f0;
        f1 = hi[m] < f1 ? hi[m] : f1;
    }
    if (f1 < f0) f1 = f0;
    const int64_t n = jb - ja;
    int64_t x = 0;
#define PVM_AT(DV_) FN(pvm_##DV_)(acc + x * VL, dp, e0, SROW, v0 + x * VL, dp, n, lo, hi, f0, f1)
    for (; x + DV4 <= nvd; x += DV4) FN(CAT(pvm_, DV4))(acc + x * VL, dp, e0, SROW, v0 + x * VL, dp, n, lo, hi, f0, f1);
    switch (nvd - x) {
    case 1: PVM_AT(1); break;
    case 2: PVM_AT(2); break;
    case 3: PVM_AT(3); break;
    default: break;
    }
#undef PVM_AT
}

/* Work item: outputs of query positions t_a .. t_b-1 (relative to the call) of sequence b
 * for the G query heads of kv head kh. Reads the cache, writes only out. */
static void FN(window_prefill_item)(const based_sliding_window_args *c, const window_scratch *sc, int64_t b,
                                    int64_t kh, int64_t t_a, int64_t t_b) {
    const int64_t d = c->head_dim, dp = sc->dp, w = c->window;
    const int64_t g_count = c->heads / c->kv_heads, h0 = kh * g_count, rows = (t_b - t_a) * g_count;
    const int64_t t0 = based_tokens_at(&c->tokens, b);
    REAL *qs = (REAL *)sc->qs, *acc = (REAL *)sc->acc, *mx = (REAL *)sc->m, *l = (REAL *)sc->l;
    for (int64_t r = 0; r < rows; r++) {
        if (r + 2 * LANES < rows) /* rows of one head are H * D elements apart: ask ahead (as in load_rows) */
            BASED_WINDOW_PREFETCH(based_window_row(&c->q, b, t_a + (r + 2 * LANES) / g_count,
                                                   h0 + (r + 2 * LANES) % g_count),
                                  d * c->q.itemsize);
        FN(load_query)(c, qs + r * d, b, t_a + r / g_count, h0 + r % g_count);
        mx[r] = -INFINITY;
        l[r] = 0;
    }
    memset(acc, 0, (size_t)(rows * dp) * sizeof(REAL));

    const int64_t p_first = t0 + t_a, p_last = t0 + t_b - 1;
    const int64_t u_lo = p_first >= w - 1 ? p_first - w + 1 : 0, u_hi = p_last + 1;
    for (int64_t blk = u_lo / KB * KB; blk < u_hi; blk += KB) {
        const int64_t ba = blk > u_lo ? blk : u_lo, be = blk + KB < u_hi ? blk + KB : u_hi;
        const int64_t cbase = ba / LANES * LANES;
        int64_t from = cbase; /* from the panel's start: keys before ba are loaded, never weighted */
        if (c->k_cache.strides[2] == 1 && from < t0) {
            const int64_t cached_end = be < t0 ? be : t0;
            FN(load_cached)(c, sc, b, kh, from, cached_end, cbase);
            from = cached_end;
        }
        FN(load_rows)(c, sc, b, kh, t0, from, be, cbase);
        for (int64_t r0 = 0; r0 < rows;) {
            const int R = rows - r0 >= 4 ? 4 : 1;
            const int64_t pa = p_first + r0 / g_count, pz = p_first + (r0 + R - 1) / g_count;
            const int64_t lo_a = pa >= w - 1 ? pa - w + 1 : 0;
            const int64_t ja = ba > lo_a ? ba : lo_a, jb = be < pz + 1 ? be : pz + 1;
            if (ja < jb) { /* R a constant in each call, so that the tile's loops unroll */
                if (R == 4)
                    FN(prefill_tile)(c, sc, 4, r0, p_first, ja, jb, cbase);
                else
                    FN(prefill_tile)(c, sc, 1, r0, p_first, ja, jb, cbase);
            }
            /* the output rows of the tile, for writing, once (in the block of its last position):
             * they arrive while the next tiles compute, and the stores at the end of the item
             * then hit the cache instead of each waiting for its line (rows of one head are
             * H * D elements apart, a stride the hardware prefetchers do not follow) */
            if (pz >= ba && pz < be)
                for (int64_t r = r0; r < r0 + R; r++)
                    BASED_WINDOW_PREFETCH_W(based_window_row(&c->out, b, t_a + r / g_count, h0 + r % g_count),
                                            d * c->out.itemsize);
            r0 += R;
        }
    }
    for (int64_t r = 0; r < rows; r++) FN(store_row)(c, acc + r * dp, l[r], b, t_a + r / g_count, h0 + r % g_count);
}

#undef VEC
#undef VL
#undef VFMA
#undef NV4
#undef NV1
#undef DV4
#undef DV1
#undef FN
