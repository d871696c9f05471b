/*
 * linear_kernels.h -- the hot loops of Taylor linear attention, written once in plain C
 * and included by each instantiation with these macros defined:
 *
 *   LK_REAL        compute type (float or double)
 *   LK_VEC         lanes of one vector register of LK_REAL for the target (tile widths)
 *   LK_FMA(a,b,c)  a * b + c (fused where the target has FMA)
 *   LK_SFX         suffix of the generated names (f32, f64)
 *
 * Everything the compiler must vectorise is a loop over the columns of a row (the value
 * dim, padded to the workspace's ld) with no reductions, so it vectorises without
 * -ffast-math; the matrix products are register-blocked (4 rows x up to 3 vectors of
 * accumulators, 12 of 16 vector registers) so the inner loop is loads + broadcasts + FMAs.
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

/* c[R x NB] += a[R x K] b[K x NB]: a[r][kk] at a[r * ar + kk * ak], b rows ldb apart,
 * c rows ldc apart. R <= 4 and NB <= 3 * LK_VEC are constants after inlining. */
static inline __attribute__((always_inline)) void LK_NAME(lk_tile)(int R, int NB, const LK_REAL *restrict a,
                                                                  int64_t ar, int64_t ak,
                                                                  const LK_REAL *restrict b, int64_t ldb,
                                                                  LK_REAL *restrict c, int64_t ldc, int64_t K) {
    LK_REAL acc[4][3 * LK_VEC];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) acc[r][j] = c[r * ldc + j];
    for (int64_t kk = 0; kk < K; kk++) {
        const LK_REAL *bk = b + kk * ldb;
        for (int r = 0; r < R; r++) {
            const LK_REAL x = a[r * ar + kk * ak];
            for (int j = 0; j < NB; j++) acc[r][j] = LK_FMA(x, bk[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) c[r * ldc + j] = acc[r][j];
}

/* c[M x N] += a[M x K] b[K x N], N a multiple of LK_VEC. Column panels of b outermost so
 * a panel (K x 3 vectors) stays in L1 while every row block of a streams past it. */
static void LK_NAME(lk_gemm)(int64_t M, int64_t N, int64_t K, const LK_REAL *restrict a, int64_t ar, int64_t ak,
                             const LK_REAL *restrict b, int64_t ldb, LK_REAL *restrict c, int64_t ldc) {
    if (M <= 0 || K <= 0) return;
    for (int64_t j = 0; j < N;) {
        const int64_t w = N - j >= 3 * LK_VEC ? 3 * LK_VEC : N - j;
        int64_t i = 0;
#define LK_PANEL(NB)                                                                                   \
    for (; i + 4 <= M; i += 4) LK_NAME(lk_tile)(4, NB, a + i * ar, ar, ak, b + j, ldb, c + i * ldc + j, ldc, K); \
    for (; i < M; i++) LK_NAME(lk_tile)(1, NB, a + i * ar, ar, ak, b + j, ldb, c + i * ldc + j, ldc, K);
        if (w == 3 * LK_VEC) {
            LK_PANEL(3 * LK_VEC)
        } else if (w == 2 * LK_VEC) {
            LK_PANEL(2 * LK_VEC)
        } else {
            LK_PANEL(LK_VEC)
        }
#undef LK_PANEL
        j += w;
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
    const LK_REAL *q = w->q, *k = w->k, *v = w->v;
    LK_REAL *qt = w->qt, *kt = w->kt, *phiq = w->phiq, *phik = w->phik, *att = w->att, *o = w->o;
    LK_REAL *kv = w->kv, *ksum = w->ksum, *den = w->den;

    for (int64_t t = 0; t < c; t++) /* (c, Dk) -> (Dk, ldc) */
        for (int64_t i = 0; i < dk; i++) {
            qt[i * ldc + t] = q[t * dk + i];
            kt[i * ldc + t] = k[t * dk + i];
        }
    LK_NAME(lk_phi_cols)(qt, dk, ldc, c, scale, phiq);
    LK_NAME(lk_phi_cols)(kt, dk, ldc, c, scale, phik);

    /* inter-chunk: o = phi(Q) kv, den = phi(Q) ksum  (state of the earlier chunks) */
    memset(o, 0, (size_t)(c * ld) * sizeof(LK_REAL));
    LK_NAME(lk_gemm)(c, ld, F, phiq, 1, ldc, kv, ld, o, ld);
    for (int64_t t = 0; t < c; t++) den[t] = 0;
    for (int64_t f = 0; f < F; f++) {
        const LK_REAL z = ksum[f], *pf = phiq + f * ldc;
        for (int64_t t = 0; t < c; t++) den[t] = LK_FMA(pf[t], z, den[t]);
    }

    /* intra-chunk weights: att = Q K^T (every column, only j <= i is read), then
     * att[i][j] = 1 + s + s^2/2 with s = scale att[i][j] on and below the diagonal */
    memset(att, 0, (size_t)(c * ldc) * sizeof(LK_REAL));
    LK_NAME(lk_gemm)(c, cv, dk, q, dk, 1, kt, ldc, att, ldc);
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
        LK_NAME(lk_gemm)(rows, ld, i0, att + i0 * ldc, ldc, 1, v, ld, o + i0 * ld, ld);
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
    LK_NAME(lk_gemm)(F, ld, c, phik, ldc, 1, v, ld, kv, ld);
    for (int64_t f = 0; f < F; f++) ksum[f] += LK_NAME(lk_sum)(phik + f * ldc, c);

    if (w->normalize) {
        const LK_REAL eps = (LK_REAL)w->eps;
        for (int64_t i = 0; i < c; i++) {
            LK_REAL *row = o + i * ld;
            const LK_REAL d = den[i] + eps;
            for (int64_t j = 0; j < dv; j++) row[j] = row[j] / d;
        }
    }
}

static void LK_NAME(lk_decode_rows)(LK_REAL *kv, int64_t row_stride, int64_t F, int64_t dv,
                                    const LK_REAL *restrict phik, const LK_REAL *restrict phiq,
                                    const LK_REAL *restrict v, LK_REAL *restrict num) {
    for (int64_t f = 0; f < F; f++) {
        LK_REAL *restrict row = kv + f * row_stride;
        const LK_REAL pk = phik[f], pq = phiq[f];
        for (int64_t j = 0; j < dv; j++) {
            const LK_REAL x = LK_FMA(pk, v[j], row[j]);
            row[j] = x;
            num[j] = LK_FMA(pq, x, num[j]);
        }
    }
}

#undef LK_NAME
#undef LK_CAT
#undef LK_CAT_
