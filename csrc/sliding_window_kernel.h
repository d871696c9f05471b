/*
 * sliding_window_kernel.h -- the fast CPU sliding-window kernel, written once for a
 * compute type and included twice by sliding_window.c:
 *
 *   REAL             float (float32, float16, bfloat16 inputs) or double (float64 inputs)
 *   NATIVE           the dtype that is REAL (BASED_DTYPE_FLOAT32 or _FLOAT64)
 *   EXP              exp of a score minus the running max (<= 0 or NaN)
 *   LOAD / SCATTER   based_load_f32/f64, based_scatter_f32/f64
 *   FN(name)         name with a type suffix
 *
 * One work item is (sequence b, kv head kh, a block of up to QB_MAX query positions)
 * with the G = H / Hkv query heads that read kv head kh, so every key and value row is
 * converted once per item and used by all G heads. Keys are streamed in chunks,
 * converted to REAL into contiguous scratch (keys transposed, so that the scores of a
 * row of keys accumulate in registers; values row-major, padded to DP); each (query,
 * head) runs an online softmax over its window, one key block of up to KB keys at a time.
 *
 * A query's key blocks start at its own window start (lo, lo + KB, ...), and a chunk
 * holds every block that starts in it in full (chunks overlap by KB - 1 keys), so the
 * arithmetic done for a query depends only on its own window: prefill in one call, in
 * chunks, or token by token through decode gives bit-identical outputs, with any
 * number of threads.
 */

typedef struct {
    int64_t kcp; /* row length of kt: the chunk capacity rounded up, plus 4 * LANES of padding */
    REAL *kt;  /* [D][kcp]    keys of the current chunk, transposed */
    REAL *vv;  /* [cap][DP]   values of the current chunk, rows zero-padded to DP */
    REAL *qs;  /* [QB][G][D]  queries of the item, times scale */
    REAL *acc; /* [QB][G][DP] unnormalised outputs */
    REAL *m;   /* [QB][G]     running max of the scores */
    REAL *l;   /* [QB][G]     running sum of exp(score - m) */
    REAL *s;   /* [KB + 4 * LANES] scores of one key block, then their exponentials */
    REAL *tile; /* [LANES][D] key rows on their way into kt (transposed LANES rows at a time) */
} FN(window_scratch);

/* Element counts of the scratch arrays above for a chunk capacity of kcp - 4 * LANES keys,
 * each rounded up to a 64-byte multiple. */
static size_t FN(window_scratch_elems)(int64_t d, int64_t dp, int64_t g, int64_t qb, int64_t kcp, size_t offsets[8]) {
    const size_t per_line = 64 / sizeof(REAL);
    size_t sizes[8] = {(size_t)(d * kcp), (size_t)((kcp - 4 * LANES) * dp), (size_t)(qb * g * d), (size_t)(qb * g * dp),
                       (size_t)(qb * g), (size_t)(qb * g), (size_t)(KB + 4 * LANES), (size_t)(LANES * d)};
    size_t total = 0;
    for (int i = 0; i < 8; i++) {
        offsets[i] = total;
        total += (sizes[i] + per_line - 1) / per_line * per_line;
    }
    return total;
}

static void FN(window_scratch_bind)(FN(window_scratch) *sc, REAL *base, int64_t kcp, const size_t offsets[8]) {
    sc->kcp = kcp;
    sc->kt = base + offsets[0];
    sc->vv = base + offsets[1];
    sc->qs = base + offsets[2];
    sc->acc = base + offsets[3];
    sc->m = base + offsets[4];
    sc->l = base + offsets[5];
    sc->s = base + offsets[6];
    sc->tile = base + offsets[7];
}

/* n elements of a row of dtype dt (`stride` apart) to dst, `dst_stride` apart, as REAL. */
BASED_WINDOW_INLINE void FN(window_load_row)(REAL *dst, int64_t dst_stride, const char *src, based_dtype dt,
                                             int64_t n, int64_t stride) {
    if (dt == NATIVE) {
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

/* dst[i * ld + r] = src[r * ld_src + i] for r, i < LANES: a fixed-size block transpose,
 * which the compiler turns into vector shuffles. */
BASED_WINDOW_INLINE void FN(window_transpose_block)(REAL *restrict dst, int64_t ld, const REAL *restrict src,
                                                    int64_t ld_src) {
    REAL t[LANES][LANES];
    for (int r = 0; r < LANES; r++)
        for (int i = 0; i < LANES; i++) t[r][i] = src[r * ld_src + i];
    for (int i = 0; i < LANES; i++)
        for (int r = 0; r < LANES; r++) dst[i * ld + r] = t[r][i];
}

/* Keys and values of absolute positions from .. to-1 (sequence b, kv head kh) into
 * columns / rows j0.. of the chunk, one row at a time: from the ring cache for positions
 * before the call (pos < t0), else from the call's inputs. Key rows go through `tile`
 * and are transposed LANES at a time, so each store into kt fills LANES columns. */
BASED_WINDOW_INLINE void FN(window_load_rows)(const based_window_call *c, const FN(window_scratch) *sc, int64_t b,
                                              int64_t kh, int64_t t0, int64_t from, int64_t to, int64_t j0) {
    const int64_t d = c->head_dim, dp = DP_OF(d), kcp = sc->kcp;
    for (int64_t p0 = from; p0 < to; p0 += LANES) {
        const int64_t rows = to - p0 < LANES ? to - p0 : LANES, j = j0 + (p0 - from);
        /* rows of one head are H * D elements apart (a page or more): the hardware
         * prefetchers do not follow, so ask for the next tile's input rows now */
        for (int64_t pos = p0 + LANES; pos < to && pos < p0 + 2 * LANES; pos++) {
            if (pos < t0) continue;
            BASED_WINDOW_PREFETCH(based_window_row(&c->k, b, pos - t0, kh), d * c->k.itemsize);
            BASED_WINDOW_PREFETCH(based_window_row(&c->v, b, pos - t0, kh), d * c->v.itemsize);
        }
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
            FN(window_load_row)(sc->tile + r * d, 1, kp, c->k.dtype, d, ks);
            FN(window_load_row)(sc->vv + (j + r) * dp, 1, vp, c->v.dtype, d, vs);
        }
        REAL *kt = sc->kt + j;
        int64_t i = 0;
        if (rows == LANES)
            for (; i + LANES <= d; i += LANES) FN(window_transpose_block)(kt + i * kcp, kcp, sc->tile + i, d);
        for (; i < d; i++)
            for (int64_t r = 0; r < rows; r++) kt[i * kcp + r] = sc->tile[r * d + i];
    }
}

/* The same for positions from .. to-1, all before the call (in the ring cache), when the
 * key cache is slot-contiguous (k_cache[b, kh, :, i] has unit stride: the layout
 * SlidingWindowCache allocates): key columns are copied as they lie, no transpose. */
BASED_WINDOW_INLINE void FN(window_load_cached)(const based_window_call *c, const FN(window_scratch) *sc,
                                                int64_t b, int64_t kh, int64_t from, int64_t to, int64_t j) {
    const int64_t d = c->head_dim, dp = DP_OF(d), w = c->window;
    for (int64_t pos = from; pos < to;) {
        const int64_t slot = pos % w, seg = to - pos < w - slot ? to - pos : w - slot; /* up to the ring's end */
        const char *k0 = based_window_row(&c->k_cache, b, kh, slot);
        for (int64_t i = 0; i < d; i++)
            FN(window_load_row)(sc->kt + i * sc->kcp + j, 1, k0 + i * c->k_cache.strides[3] * c->k_cache.itemsize,
                                c->k_cache.dtype, seg, 1);
        for (int64_t r = 0; r < seg; r++)
            FN(window_load_row)(sc->vv + (j + r) * dp, 1, based_window_row(&c->v_cache, b, kh, slot + r),
                                c->v_cache.dtype, d, c->v_cache.strides[3]);
        pos += seg;
        j += seg;
    }
}

BASED_WINDOW_INLINE void FN(window_load_kv)(const based_window_call *c, const FN(window_scratch) *sc, int64_t b,
                                            int64_t kh, int64_t t0, int64_t from, int64_t to, int64_t j0) {
    if (c->k_cache.strides[2] == 1 && from < t0) {
        const int64_t cached_end = to < t0 ? to : t0;
        FN(window_load_cached)(c, sc, b, kh, from, cached_end, j0);
        j0 += cached_end - from;
        from = cached_end;
    }
    FN(window_load_rows)(c, sc, b, kh, t0, from, to, j0);
}

/* s[0 .. WIDTH) = q . k for the WIDTH keys at kp (transposed rows kcp apart): WIDTH
 * independent sums over the head dim, each in the order i = 0, 1, ..., D-1. */
#define WINDOW_SCORES(WIDTH)                                  \
    do {                                                      \
        REAL a[WIDTH] = {0};                                  \
        for (int64_t i = 0; i < d; i++) {                     \
            const REAL qi = q[i];                             \
            const REAL *kr = kp + i * kcp;                    \
            for (int x = 0; x < (WIDTH); x++) a[x] += qi * kr[x]; \
        }                                                     \
        for (int x = 0; x < (WIDTH); x++) out_s[x] = a[x];    \
    } while (0)

/* acc[0 .. WIDTH) += sum_j p_j v_j[i0 ..], each lane summed in the order j = 0, 1, ..., n-1. */
#define WINDOW_PV(WIDTH)                                      \
    do {                                                      \
        REAL o[WIDTH];                                        \
        for (int x = 0; x < (WIDTH); x++) o[x] = acc[i0 + x];  \
        const REAL *vr = sc->vv + j0 * dp + i0;               \
        for (int64_t j = 0; j < n; j++, vr += dp) {           \
            const REAL pj = s[j];                             \
            for (int x = 0; x < (WIDTH); x++) o[x] += pj * vr[x]; \
        }                                                     \
        for (int x = 0; x < (WIDTH); x++) acc[i0 + x] = o[x];  \
    } while (0)

/* One (query, head) against keys j0 .. j0+n-1 of the chunk (n <= KB, one key block):
 * the online-softmax update of (m, l, acc). q is already multiplied by scale.
 * Register blocks are 4 * LANES wide (independent add chains keep the vector units busy;
 * a narrow block is bound by the latency of its one chain, so computing up to 3 * LANES
 * padding lanes costs less) unless at most LANES keys remain. The width only decides
 * which lanes are computed together, never the order of any lane's operations, so the
 * result of every (query, key) pair is the same whichever width computed it. */
BASED_WINDOW_INLINE void FN(window_attend_block)(const FN(window_scratch) *sc, const REAL *q, int64_t d,
                                                 int64_t dp, int64_t j0, int64_t n, REAL *m, REAL *l, REAL *acc) {
    REAL *s = sc->s;
    const int64_t kcp = sc->kcp;
    int64_t jj = 0;
    for (; jj + LANES < n; jj += 4 * LANES) {
        const REAL *kp = sc->kt + j0 + jj;
        REAL *out_s = s + jj;
        WINDOW_SCORES(4 * LANES);
    }
    for (; jj < n; jj += LANES) {
        const REAL *kp = sc->kt + j0 + jj;
        REAL *out_s = s + jj;
        WINDOW_SCORES(LANES);
    }
    const int64_t n_pad = (n + LANES - 1) / LANES * LANES;
    for (int64_t j = n; j < n_pad; j++) s[j] = -INFINITY; /* exp() turns these into 0 */

    REAL lane[LANES]; /* block max, lane by lane (max is exact, so any order gives the same) */
    for (int x = 0; x < LANES; x++) lane[x] = -INFINITY;
    for (int64_t j = 0; j < n_pad; j += LANES)
        for (int x = 0; x < LANES; x++) lane[x] = s[j + x] > lane[x] ? s[j + x] : lane[x];
    REAL bm = -INFINITY; /* NaN scores are skipped here and turn into NaN through EXP below */
    for (int x = 0; x < LANES; x++) bm = lane[x] > bm ? lane[x] : bm;
    const REAL m_old = *m, m_new = bm > m_old ? bm : m_old;

    REAL sum = *l;
    if (m_new != m_old) { /* rescale what was accumulated under the old max */
        const REAL corr = EXP(m_old - m_new);
        sum *= corr;
        for (int64_t i = 0; i < dp; i++) acc[i] *= corr;
    }
    for (int64_t j = 0; j < n_pad; j++) s[j] = EXP(s[j] - m_new);
    for (int x = 0; x < LANES; x++) lane[x] = 0; /* sum of the block's weights: LANES partial sums */
    for (int64_t j = 0; j < n_pad; j += LANES)
        for (int x = 0; x < LANES; x++) lane[x] += s[j + x];
    for (int x = 0; x < LANES; x++) sum += lane[x];

    int64_t i0 = 0;
    for (; i0 + 4 * LANES <= dp; i0 += 4 * LANES) WINDOW_PV(4 * LANES);
    for (; i0 < dp; i0 += LANES) WINDOW_PV(LANES);
    *m = m_new;
    *l = sum;
}

#undef WINDOW_SCORES
#undef WINDOW_PV

/* Work item: outputs of query positions t_a .. t_b-1 (relative to the call) of sequence b
 * for the G query heads of kv head kh. Reads the cache, writes only out. */
BASED_WINDOW_CLONES
static void FN(window_item)(const based_window_call *c, const FN(window_scratch) *sc, int64_t b, int64_t kh,
                            int64_t t_a, int64_t t_b) {
    const int64_t d = c->head_dim, dp = DP_OF(d), w = c->window;
    const int64_t g_count = c->heads / c->kv_heads, h0 = kh * g_count, nq = t_b - t_a;
    const int64_t t0 = based_window_tokens(c, b);
    const REAL scale = (REAL)c->scale;

    for (int64_t i = 0; i < nq; i++) {
        for (int64_t g = 0; g < g_count; g++) {
            REAL *q = sc->qs + (i * g_count + g) * d;
            FN(window_load_row)(q, 1, based_window_row(&c->q, b, t_a + i, h0 + g), c->q.dtype, d, c->q.strides[3]);
            for (int64_t x = 0; x < d; x++) q[x] *= scale;
            sc->m[i * g_count + g] = -INFINITY;
            sc->l[i * g_count + g] = 0;
        }
    }
    memset(sc->acc, 0, (size_t)(nq * g_count * dp) * sizeof(REAL));

    const int64_t p_first = t0 + t_a, p_last = t0 + t_b - 1;
    const int64_t lo_all = p_first >= w - 1 ? p_first - w + 1 : 0;
    const int64_t cap = sc->kcp - 4 * LANES, range = p_last + 1 - lo_all;
    /* a chunk holds the blocks that start in [c0, c0 + step), with all their keys: one
     * chunk when every key of the item fits, else steps of cap - (KB - 1) */
    const int64_t step = range <= cap ? range : cap - (KB - 1);
    int64_t prev_c0 = lo_all, prev_end = lo_all;
    for (int64_t c0 = lo_all; c0 <= p_last; c0 += step) {
        const int64_t c_end = c0 + cap < p_last + 1 ? c0 + cap : p_last + 1;
        const int64_t keep = prev_end > c0 ? prev_end - c0 : 0; /* the overlap with the last chunk */
        if (keep > 0) {
            for (int64_t i = 0; i < d; i++)
                memmove(sc->kt + i * sc->kcp, sc->kt + i * sc->kcp + (c0 - prev_c0), (size_t)keep * sizeof(REAL));
            memmove(sc->vv, sc->vv + (c0 - prev_c0) * dp, (size_t)(keep * dp) * sizeof(REAL));
        }
        FN(window_load_kv)(c, sc, b, kh, t0, c0 + keep, c_end, keep);
        prev_c0 = c0;
        prev_end = c_end;
        for (int64_t i = 0; i < nq; i++) {
            const int64_t p = p_first + i, lo = p >= w - 1 ? p - w + 1 : 0;
            int64_t a = lo >= c0 ? lo : lo + (c0 - lo + KB - 1) / KB * KB; /* first block start >= c0 */
            for (; a < c0 + step && a <= p; a += KB) {
                const int64_t e = a + KB < p + 1 ? a + KB : p + 1;
                for (int64_t g = 0; g < g_count; g++) {
                    const int64_t r = i * g_count + g;
                    FN(window_attend_block)(sc, sc->qs + r * d, d, dp, a - c0, e - a, sc->m + r, sc->l + r,
                                            sc->acc + r * dp);
                }
            }
        }
    }

    for (int64_t i = 0; i < nq; i++) {
        for (int64_t g = 0; g < g_count; g++) {
            const int64_t r = i * g_count + g;
            REAL *o = sc->acc + r * dp;
            const REAL lr = sc->l[r];
            for (int64_t x = 0; x < d; x++) o[x] /= lr;
            SCATTER(based_window_row(&c->out, b, t_a + i, h0 + g), c->out.dtype, d, c->out.strides[3], o);
        }
    }
}

/* All outputs of a checked call (the cache is read, not written). */
static based_status FN(window_forward)(const based_window_call *c) {
    const int64_t d = c->head_dim, dp = DP_OF(d), g_count = c->heads / c->kv_heads;
    /* keep one item's accumulators near 128 KiB (in L2) */
    int64_t qb = (int64_t)(131072 / sizeof(REAL)) / (g_count * dp);
    qb = qb < 1 ? 1 : qb > QB_MAX ? QB_MAX : qb;
    qb = qb < c->seqlen ? qb : c->seqlen;
    /* chunk capacity: all keys an item needs (qb + W - 1) when that is small, else a
     * window of KC block starts plus one block of overhang */
    const int64_t need = qb - 1 < KC + KB - 1 - c->window ? qb + c->window - 1 : KC + KB - 1;
    const int64_t kcp = (need + LANES - 1) / LANES * LANES + 4 * LANES;
    const int64_t n_qblocks = (c->seqlen + qb - 1) / qb;
    const int64_t items = c->batch * c->kv_heads * n_qblocks;
    const int nthreads = based_threads_for(items);
    size_t offsets[8];
    const size_t per_thread = FN(window_scratch_elems)(d, dp, g_count, qb, kcp, offsets);
    if (per_thread > SIZE_MAX / sizeof(REAL) / (size_t)nthreads)
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "sliding_window: scratch size overflows");
    REAL *scratch = based_scratch_alloc(per_thread * sizeof(REAL) * (size_t)nthreads);
    if (scratch == NULL)
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "sliding_window: out of memory for %zu bytes of scratch",
                          per_thread * sizeof(REAL) * (size_t)nthreads);
    /* zero once: padding columns and rows are read (and their results ignored) but never written */
    memset(scratch, 0, per_thread * sizeof(REAL) * (size_t)nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        FN(window_scratch) sc;
        FN(window_scratch_bind)(&sc, scratch + per_thread * (size_t)based_thread_num(), kcp, offsets);
        const int64_t qi = it % n_qblocks, bh = it / n_qblocks;
        const int64_t t_a = qi * qb, t_b = t_a + qb < c->seqlen ? t_a + qb : c->seqlen;
        FN(window_item)(c, &sc, bh / c->kv_heads, bh % c->kv_heads, t_a, t_b);
    }
    based_scratch_free(scratch);
    return BASED_STATUS_OK;
}
