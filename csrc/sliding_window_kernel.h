/*
 * sliding_window_kernel.h -- the fast CPU sliding-window kernel, written once for a
 * compute type and included twice by sliding_window.c:
 *
 *   REAL  float (float32, float16, bfloat16 inputs) or double (float64 inputs)
 *   EXP   expf or exp
 *   GATHER / SCATTER   based_gather_f32/f64, based_scatter_f32/f64
 *   FN(name)           name with a type suffix
 *
 * One work item is (sequence b, kv head kh, a block of up to QB query positions) with
 * the G = H / Hkv query heads that read kv head kh, so every key and value row is
 * converted once per item and used by all G heads. Keys are streamed in chunks of KC
 * positions, converted to REAL into contiguous scratch (keys transposed, so that the
 * scores of LANES keys accumulate in registers; values row-major, padded to DP); each
 * (query, head) runs an online softmax over its window, one key block at a time.
 *
 * Key blocks and chunks are aligned to absolute positions (multiples of KB and KC), so
 * the arithmetic done for a query depends only on its own window: prefill in one call,
 * in chunks, or token by token through decode gives bit-identical outputs, with any
 * number of threads.
 */

typedef struct {
    REAL *kt;  /* [D][KCP]    keys of the current chunk, transposed */
    REAL *vv;  /* [KC][DP]    values of the current chunk, rows zero-padded to DP */
    REAL *row; /* [D]         one row in REAL, before transposing */
    REAL *qs;  /* [QB][G][D]  queries of the item, times scale */
    REAL *acc; /* [QB][G][DP] unnormalised outputs */
    REAL *m;   /* [QB][G]     running max of the scores */
    REAL *l;   /* [QB][G]     running sum of exp(score - m) */
    REAL *s;   /* [KB + LANES] scores of one key block, then their exponentials */
} FN(window_scratch);

/* Element counts of the scratch arrays above, each rounded up to a 64-byte multiple. */
static size_t FN(window_scratch_elems)(int64_t d, int64_t dp, int64_t g, int64_t qb, size_t offsets[8]) {
    const size_t per_line = 64 / sizeof(REAL);
    size_t sizes[8] = {(size_t)(d * KCP), (size_t)(KC * dp), (size_t)d, (size_t)(qb * g * d),
                       (size_t)(qb * g * dp), (size_t)(qb * g), (size_t)(qb * g), (size_t)(KB + LANES)};
    size_t total = 0;
    for (int i = 0; i < 8; i++) {
        offsets[i] = total;
        total += (sizes[i] + per_line - 1) / per_line * per_line;
    }
    return total;
}

static void FN(window_scratch_bind)(FN(window_scratch) *sc, REAL *base, const size_t offsets[8]) {
    sc->kt = base + offsets[0];
    sc->vv = base + offsets[1];
    sc->row = base + offsets[2];
    sc->qs = base + offsets[3];
    sc->acc = base + offsets[4];
    sc->m = base + offsets[5];
    sc->l = base + offsets[6];
    sc->s = base + offsets[7];
}

/* Key and value of absolute position pos (sequence b, kv head kh) into column / row j of
 * the chunk: from the ring cache for positions before the call (pos < t0), else from the
 * call's inputs. */
static void FN(window_load_kv)(const based_window_call *c, const FN(window_scratch) *sc, int64_t b, int64_t kh,
                               int64_t t0, int64_t pos, int64_t j) {
    const int64_t d = c->head_dim, dp = DP_OF(d);
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
    GATHER(sc->row, kp, c->k.dtype, d, ks);
    for (int64_t i = 0; i < d; i++) sc->kt[i * KCP + j] = sc->row[i];
    GATHER(sc->vv + j * dp, vp, c->v.dtype, d, vs);
}

/* One (query, head) against keys j0 .. j0+n-1 of the chunk (n <= KB, one key block):
 * the online-softmax update of (m, l, acc). q is already multiplied by scale. */
static void FN(window_attend_block)(const FN(window_scratch) *sc, const REAL *q, int64_t d, int64_t dp, int64_t j0,
                                    int64_t n, REAL *m, REAL *l, REAL *acc) {
    REAL *s = sc->s;
    for (int64_t jj = 0; jj < n; jj += LANES) { /* s = q . k for LANES keys at once */
        REAL a[LANES] = {0};
        const REAL *kp = sc->kt + j0 + jj;
        for (int64_t i = 0; i < d; i++) {
            const REAL qi = q[i];
            const REAL *kr = kp + i * KCP;
            for (int x = 0; x < LANES; x++) a[x] += qi * kr[x];
        }
        for (int x = 0; x < LANES; x++) s[jj + x] = a[x];
    }
    REAL bm = -INFINITY; /* NaN scores are skipped here and turn into NaN through EXP below */
    for (int64_t j = 0; j < n; j++)
        if (s[j] > bm) bm = s[j];
    const REAL m_old = *m, m_new = bm > m_old ? bm : m_old;
    REAL sum = *l;
    if (m_new != m_old) { /* rescale what was accumulated under the old max */
        const REAL corr = EXP(m_old - m_new);
        sum *= corr;
        for (int64_t i = 0; i < dp; i++) acc[i] *= corr;
    }
    for (int64_t j = 0; j < n; j++) {
        s[j] = EXP(s[j] - m_new);
        sum += s[j];
    }
    for (int64_t i0 = 0; i0 < dp; i0 += LANES) { /* acc += p @ V, LANES output dims at once */
        REAL o[LANES];
        for (int x = 0; x < LANES; x++) o[x] = acc[i0 + x];
        const REAL *vr = sc->vv + j0 * dp + i0;
        for (int64_t j = 0; j < n; j++, vr += dp) {
            const REAL pj = s[j];
            for (int x = 0; x < LANES; x++) o[x] += pj * vr[x];
        }
        for (int x = 0; x < LANES; x++) acc[i0 + x] = o[x];
    }
    *m = m_new;
    *l = sum;
}

/* Work item: outputs of query positions t_a .. t_b-1 (relative to the call) of sequence b
 * for the G query heads of kv head kh. Reads the cache, writes only out. */
static void FN(window_item)(const based_window_call *c, const FN(window_scratch) *sc, int64_t b, int64_t kh,
                            int64_t t_a, int64_t t_b) {
    const int64_t d = c->head_dim, dp = DP_OF(d), w = c->window;
    const int64_t g_count = c->heads / c->kv_heads, h0 = kh * g_count, nq = t_b - t_a;
    const int64_t t0 = based_window_tokens(c, b);
    const REAL scale = (REAL)c->scale;

    for (int64_t i = 0; i < nq; i++) {
        for (int64_t g = 0; g < g_count; g++) {
            REAL *q = sc->qs + (i * g_count + g) * d;
            GATHER(q, based_window_row(&c->q, b, t_a + i, h0 + g), c->q.dtype, d, c->q.strides[3]);
            for (int64_t x = 0; x < d; x++) q[x] *= scale;
            sc->m[i * g_count + g] = -INFINITY;
            sc->l[i * g_count + g] = 0;
        }
    }
    memset(sc->acc, 0, (size_t)(nq * g_count * dp) * sizeof(REAL));

    const int64_t p_first = t0 + t_a, p_last = t0 + t_b - 1;
    const int64_t lo_all = p_first >= w - 1 ? p_first - w + 1 : 0;
    for (int64_t c0 = lo_all - lo_all % KC; c0 <= p_last; c0 += KC) {
        const int64_t c1 = c0 + KC < p_last + 1 ? c0 + KC : p_last + 1;
        for (int64_t pos = c0 > lo_all ? c0 : lo_all; pos < c1; pos++)
            FN(window_load_kv)(c, sc, b, kh, t0, pos, pos - c0);
        for (int64_t i = 0; i < nq; i++) {
            const int64_t p = p_first + i, lo = p >= w - 1 ? p - w + 1 : 0;
            const int64_t a = lo > c0 ? lo : c0, e = p + 1 < c1 ? p + 1 : c1;
            for (int64_t k0 = a; k0 < e;) {
                const int64_t k1 = (k0 / KB + 1) * KB < e ? (k0 / KB + 1) * KB : e;
                for (int64_t g = 0; g < g_count; g++) {
                    const int64_t r = i * g_count + g;
                    FN(window_attend_block)(sc, sc->qs + r * d, d, dp, k0 - c0, k1 - k0, sc->m + r, sc->l + r,
                                            sc->acc + r * dp);
                }
                k0 = k1;
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
    const int64_t n_qblocks = (c->seqlen + qb - 1) / qb;
    const int64_t items = c->batch * c->kv_heads * n_qblocks;
    const int nthreads = based_threads_for(items);
    size_t offsets[8];
    const size_t per_thread = FN(window_scratch_elems)(d, dp, g_count, qb, offsets);
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
        FN(window_scratch_bind)(&sc, scratch + per_thread * (size_t)based_thread_num(), offsets);
        const int64_t qi = it % n_qblocks, bh = it / n_qblocks;
        const int64_t t_a = qi * qb, t_b = t_a + qb < c->seqlen ? t_a + qb : c->seqlen;
        FN(window_item)(c, &sc, bh / c->kv_heads, bh % c->kv_heads, t_a, t_b);
    }
    based_scratch_free(scratch);
    return BASED_STATUS_OK;
}
