/*
 * linear_attention_kernel.h -- the hot loops of Taylor linear attention, written once in plain C
 * and included by each instantiation with these macros defined:
 *
 *   LK_REAL         compute type (float or double)
 *   LK_VEC          lanes of one vector register of LK_REAL on the target
 *   LK_FMA(a,b,c)   a * b + c on scalars; LK_VFMA(s,b,c): scalar s times vector b plus vector c
 *                   (both fused where the target has FMA)
 *   LK_SFX          suffix of the generated names (f32, f64)
 *
 * The matrix products are register-blocked micro-kernels written with the GCC/Clang vector
 * extension (4 rows x up to 3 vectors of accumulators: 12 of 16 registers), because the
 * auto-vectoriser keeps such accumulators in registers for some widths and not others (a
 * 4 x 16 float tile ran at a third of the speed of a 4 x 24 one); so is the decode's row
 * sweep. Everything else is plain loops over a row, sums with explicit partial sums, which
 * the compiler vectorises without -ffast-math (checked with -fopt-info-vec-optimized).
 *
 * The chunked prefill (SPEC 1.1; the CPU analogue of the paper's Algorithm 1, Sec. 5.2):
 * for a chunk of c tokens with queries Q, keys K, values V,
 *   O  = phi(Q) kv,  den = phi(Q) ksum                inter-chunk: the earlier chunks' state
 *   A  = tril(1 + S + S^2/2), S = scale Q K^T         intra-chunk, never through phi
 *   O += A V,  den += A 1
 *   kv += phi(K)^T V,  ksum += phi(K)^T 1             fold the chunk into the state
 *   O /= den + eps                                    (when normalising)
 * Only one chunk's phi (F x C) is ever formed; no T x T matrix exists.
 */

#define LK_CAT_(a, b) a##_##b
#define LK_CAT(a, b) LK_CAT_(a, b)
#define LK_NAME(n) LK_CAT(n, LK_SFX)

/* One vector register of LK_REAL (GCC/Clang vector extension); loads and stores through
 * it may be unaligned and may alias LK_REAL. */
typedef LK_REAL LK_NAME(lk_vec)
    __attribute__((vector_size(LK_VEC * sizeof(LK_REAL)), aligned(sizeof(LK_REAL)), may_alias));

/* c[R x NV vectors] (+)= a[R x K] b[K x NV vectors]: a[r][kk] at a[r * ar + kk * ak], b rows
 * ldb apart, c rows ldc apart; c is added to when `add`, else overwritten. The R * NV
 * accumulators live in registers for the whole K loop, so each step is NV loads of b, R
 * broadcasts of a and R * NV fused multiply-adds. */
#define LK_TILE(R, NV)                                                                                   \
    static inline __attribute__((always_inline)) void LK_NAME(lk_tile_##R##x##NV)(                      \
        const LK_REAL *restrict a, int64_t ar, int64_t ak, const LK_REAL *restrict b, int64_t ldb,       \
        LK_REAL *restrict c, int64_t ldc, int64_t K, int add) {                                          \
        typedef LK_NAME(lk_vec) vec;                                                                     \
        vec acc[R][NV];                                                                                  \
        for (int r = 0; r < R; r++)                                                                      \
            for (int j = 0; j < NV; j++) acc[r][j] = add ? *(const vec *)(c + r * ldc + j * LK_VEC) : (vec){0}; \
        for (int64_t kk = 0; kk < K; kk++) {                                                             \
            vec bv[NV];                                                                                  \
            for (int j = 0; j < NV; j++) bv[j] = *(const vec *)(b + kk * ldb + j * LK_VEC);              \
            for (int r = 0; r < R; r++) {                                                                \
                const LK_REAL x = a[r * ar + kk * ak];                                                   \
                for (int j = 0; j < NV; j++) acc[r][j] = LK_VFMA(x, bv[j], acc[r][j]);                   \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int j = 0; j < NV; j++) *(vec *)(c + r * ldc + j * LK_VEC) = acc[r][j];                 \
    }
LK_TILE(4, 3)
LK_TILE(4, 2)
LK_TILE(4, 1)
LK_TILE(1, 3)
LK_TILE(1, 2)
LK_TILE(1, 1)
#undef LK_TILE

/* c[M x N] (+)= a[M x K] b[K x N] (added to c when `add`), N a multiple of LK_VEC. Column
 * panels of b outermost so a panel (K x 3 vectors) stays in L1 while the rows of a stream. */
static void LK_NAME(lk_gemm)(int64_t M, int64_t N, int64_t K, const LK_REAL *restrict a, int64_t ar, int64_t ak,
                             const LK_REAL *restrict b, int64_t ldb, LK_REAL *restrict c, int64_t ldc, int add) {
    if (M <= 0 || (K <= 0 && add)) return;
    for (int64_t j = 0; j < N;) {
        const int64_t nv = (N - j) / LK_VEC >= 3 ? 3 : (N - j) / LK_VEC;
        int64_t i = 0;
#define LK_PANEL(NV)                                                                                       \
    for (; i + 4 <= M; i += 4)                                                                             \
        LK_NAME(lk_tile_4x##NV)(a + i * ar, ar, ak, b + j, ldb, c + i * ldc + j, ldc, K, add);            \
    for (; i < M; i++) LK_NAME(lk_tile_1x##NV)(a + i * ar, ar, ak, b + j, ldb, c + i * ldc + j, ldc, K, add);
        if (nv == 3) {
            LK_PANEL(3)
        } else if (nv == 2) {
            LK_PANEL(2)
        } else {
            LK_PANEL(1)
        }
#undef LK_PANEL
        j += nv * LK_VEC;
    }
}

/* x[0] + ... + x[n-1] with 2 * LK_VEC partial sums (vectorises without reassociation flags). */
static inline LK_REAL LK_NAME(lk_sum)(const LK_REAL *restrict x, int64_t n) {
    LK_REAL part[2 * LK_VEC] = {0};
    int64_t i = 0;
    for (; i + 2 * LK_VEC <= n; i += 2 * LK_VEC)
        for (int j = 0; j < 2 * LK_VEC; j++) part[j] += x[i + j];
    LK_REAL s = 0;
    for (; i < n; i++) s += x[i];
    for (int j = 0; j < 2 * LK_VEC; j++) s += part[j];
    return s;
}

/* phi of c tokens given feature-major x (Dk, ldc) -> phi (F, ldc), compact order of SPEC 1.1. */
static void LK_NAME(lk_phi_cols)(const LK_REAL *restrict xt, int64_t dk, int64_t ldc, int64_t c, LK_REAL scale,
                                 LK_REAL *restrict phi) {
    const LK_REAL c1 = (LK_REAL)sqrt((double)scale), c2 = (LK_REAL)((double)scale / sqrt(2.0));
    LK_REAL *p = phi;
    for (int64_t t = 0; t < c; t++) p[t] = 1;
    p += ldc;
    for (int64_t i = 0; i < dk; i++, p += ldc)
        for (int64_t t = 0; t < c; t++) p[t] = c1 * xt[i * ldc + t];
    for (int64_t i = 0; i < dk; i++) {
        const LK_REAL *xi = xt + i * ldc;
        for (int64_t t = 0; t < c; t++) p[t] = c2 * xi[t] * xi[t];
        p += ldc;
        for (int64_t j = i + 1; j < dk; j++, p += ldc) {
            const LK_REAL *xj = xt + j * ldc;
            for (int64_t t = 0; t < c; t++) p[t] = scale * xi[t] * xj[t];
        }
    }
}

static void LK_NAME(lk_chunk)(const based_lin_ws *w, int64_t c) {
    const int64_t dk = w->Dk, F = w->F, ld = w->ld, ldc = w->ldc, dv = w->Dv;
    const int64_t cv = (c + LK_VEC - 1) / LK_VEC * LK_VEC; /* c rounded up to whole vectors (<= ldc) */
    const LK_REAL scale = (LK_REAL)w->scale;
    const LK_REAL *qt = w->qt, *kt = w->kt, *v = w->v;
    LK_REAL *phiq = w->phiq, *phik = w->phik, *att = w->att, *o = w->o;
    LK_REAL *kv = w->kv, *ksum = w->ksum, *den = w->den;

    LK_NAME(lk_phi_cols)(qt, dk, ldc, c, scale, phiq);
    LK_NAME(lk_phi_cols)(kt, dk, ldc, c, scale, phik);

    /* inter-chunk: o = phi(Q) kv, den = phi(Q) ksum  (state of the earlier chunks) */
    LK_NAME(lk_gemm)(c, ld, F, phiq, 1, ldc, kv, ld, o, ld, 0);
    for (int64_t t = 0; t < c; t++) den[t] = 0;
    for (int64_t f = 0; f < F; f++) {
        const LK_REAL z = ksum[f], *pf = phiq + f * ldc;
        for (int64_t t = 0; t < c; t++) den[t] = LK_FMA(pf[t], z, den[t]);
    }

    /* intra-chunk weights: att = Q K^T (every column, only j <= i is read), then
     * att[i][j] = 1 + s + s^2/2 with s = scale att[i][j] on and below the diagonal */
    LK_NAME(lk_gemm)(c, cv, dk, qt, 1, ldc, kt, ldc, att, ldc, 0);
    for (int64_t i = 0; i < c; i++) {
        LK_REAL *row = att + i * ldc;
        for (int64_t j = 0; j <= i; j++) {
            const LK_REAL s = scale * row[j];
            row[j] = 1 + s + (LK_REAL)0.5 * s * s;
        }
        den[i] += LK_NAME(lk_sum)(row, i + 1);
    }
    /* o += tril(att) V: a block of 4 rows shares the keys before it (a register-blocked
     * product); its own triangle is added row by row, so no output reads a value after
     * its own token (an Inf or NaN there must not reach it through a 0 weight). */
    for (int64_t i0 = 0; i0 < c; i0 += 4) {
        const int64_t rows = c - i0 < 4 ? c - i0 : 4;
        LK_NAME(lk_gemm)(rows, ld, i0, att + i0 * ldc, ldc, 1, v, ld, o + i0 * ld, ld, 1);
        for (int64_t i = i0; i < i0 + rows; i++) {
            LK_REAL *restrict orow = o + i * ld;
            for (int64_t j = i0; j <= i; j++) {
                const LK_REAL a = att[i * ldc + j];
                const LK_REAL *restrict vrow = v + j * ld;
                for (int64_t x = 0; x < ld; x++) orow[x] = LK_FMA(a, vrow[x], orow[x]);
            }
        }
    }

    /* fold the chunk into the state: kv += phi(K)^T V, ksum += phi(K)^T 1 */
    LK_NAME(lk_gemm)(F, ld, c, phik, ldc, 1, v, ld, kv, ld, 1);
    for (int64_t f = 0; f < F; f++) ksum[f] += LK_NAME(lk_sum)(phik + f * ldc, c);

    if (w->normalize) {
        const LK_REAL eps = (LK_REAL)w->eps;
        for (int64_t i = 0; i < c; i++) {
            LK_REAL *row = o + i * ld;
            const LK_REAL inv = 1 / (den[i] + eps);
            for (int64_t j = 0; j < dv; j++) row[j] *= inv;
        }
    }
}

/* Decode over F state rows of dv elements (row r at kv + r * row_stride):
 *   kv[r, :] += phik[r] v;  num += phiq[r] kv[r, :] (the updated row)
 * (num is added to). The value dim goes in blocks of 8 (then 4, then 1) vectors whose sums
 * stay in registers for a sweep over the rows, so every state element is loaded once,
 * stored once and used for two fused multiply-adds, and a 64-wide row (8 AVX2 vectors) is
 * read front to back; a tail narrower than a vector is done element by element. */
static void LK_NAME(lk_decode_rows)(LK_REAL *kv, int64_t row_stride, int64_t F, int64_t dv,
                                    const LK_REAL *restrict phik, const LK_REAL *restrict phiq,
                                    const LK_REAL *restrict v, LK_REAL *restrict num) {
    typedef LK_NAME(lk_vec) vec;
    int64_t j = 0;
#define LK_DECODE_BLOCK(NV)                                                                     \
    for (; j + NV * LK_VEC <= dv; j += NV * LK_VEC) {                                          \
        vec vb[NV], acc[NV];                                                                    \
        for (int u = 0; u < NV; u++) {                                                          \
            vb[u] = *(const vec *)(v + j + u * LK_VEC);                                         \
            acc[u] = *(const vec *)(num + j + u * LK_VEC);                                      \
        }                                                                                       \
        for (int64_t f = 0; f < F; f++) {                                                       \
            LK_REAL *row = kv + f * row_stride + j;                                             \
            const LK_REAL pk = phik[f], pq = phiq[f];                                           \
            for (int u = 0; u < NV; u++) {                                                      \
                const vec x = LK_VFMA(pk, vb[u], *(const vec *)(row + u * LK_VEC));             \
                *(vec *)(row + u * LK_VEC) = x;                                                 \
                acc[u] = LK_VFMA(pq, x, acc[u]);                                                \
            }                                                                                   \
        }                                                                                       \
        for (int u = 0; u < NV; u++) *(vec *)(num + j + u * LK_VEC) = acc[u];                   \
    }
    LK_DECODE_BLOCK(8)
    LK_DECODE_BLOCK(4)
    LK_DECODE_BLOCK(1)
#undef LK_DECODE_BLOCK
    if (j < dv) {
        for (int64_t f = 0; f < F; f++) {
            LK_REAL *row = kv + f * row_stride;
            for (int64_t x = j; x < dv; x++) {
                row[x] = LK_FMA(phik[f], v[x], row[x]);
                num[x] = LK_FMA(phiq[f], row[x], num[x]);
            }
        }
    }
}

/* ksum += phik; returns phiq . ksum (the updated sums), with vector-wide partial sums. */
static LK_REAL LK_NAME(lk_decode_ksum)(LK_REAL *restrict ksum, const LK_REAL *restrict phik,
                                       const LK_REAL *restrict phiq, int64_t F) {
    typedef LK_NAME(lk_vec) vec;
    vec part = {0};
    int64_t f = 0;
    for (; f + LK_VEC <= F; f += LK_VEC) {
        const vec z = *(const vec *)(ksum + f) + *(const vec *)(phik + f);
        *(vec *)(ksum + f) = z;
        part += *(const vec *)(phiq + f) * z;
    }
    LK_REAL den = 0;
    for (; f < F; f++) {
        ksum[f] += phik[f];
        den = LK_FMA(phiq[f], ksum[f], den);
    }
    for (int u = 0; u < LK_VEC; u++) den += part[u];
    return den;
}

/* phi(q) and phi(k) of one token (SPEC 1.1, compact order). */
static void LK_NAME(lk_decode_phi)(const LK_REAL *restrict q, const LK_REAL *restrict k, int64_t dk, LK_REAL scale,
                                   LK_REAL *restrict phiq, LK_REAL *restrict phik) {
    const LK_REAL c1 = (LK_REAL)sqrt((double)scale), c2 = (LK_REAL)((double)scale / sqrt(2.0));
    phiq[0] = phik[0] = 1;
    for (int64_t i = 0; i < dk; i++) {
        phiq[1 + i] = c1 * q[i];
        phik[1 + i] = c1 * k[i];
    }
    int64_t f = 1 + dk;
    for (int64_t i = 0; i < dk; i++) {
        const LK_REAL qi = scale * q[i], ki = scale * k[i];
        phiq[f] = c2 * q[i] * q[i];
        phik[f] = c2 * k[i] * k[i];
        f++;
        for (int64_t j = i + 1; j < dk; j++, f++) {
            phiq[f] = qi * q[j];
            phik[f] = ki * k[j];
        }
    }
}

#undef LK_NAME
#undef LK_CAT
#undef LK_CAT_
