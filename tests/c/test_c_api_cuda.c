/*
 * test_c_api_cuda.c -- csrc/based.h from plain C with CUDA device memory (no Python, no
 * framework): tensors are cudaMalloc'd, every op runs on a created non-blocking stream, and
 * each result is copied back and compared with the same call on host tensors (the CPU
 * backend). Covers linear attention and sliding window (prefill, then decode), the feature
 * map, the linear state's expanded layout, the state helpers (zero, copy on one device and
 * between host and GPU with conversions, gather with repeats and in place), and the error
 * contract on CUDA: mixed host/GPU tensors and float64 GPU tensors fail with a message, and
 * nothing is written.
 * Built and run by tests/test_c_api.py on machines with a GPU (kernels/ with nvcc, csrc/ with
 * -DBASED_WITH_CUDA, this file with cc, linked by nvcc).
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "based.h"

#include "check.h"

#define CUDA_OK(call)                                                                          \
    do {                                                                                       \
        cudaError_t err_ = (call);                                                             \
        if (err_ != cudaSuccess) {                                                             \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
            exit(2);                                                                           \
        }                                                                                      \
    } while (0)

static cudaStream_t stream;

static DLTensor tensor(void *data, int gpu, int ndim, int64_t *shape, uint8_t code, uint8_t bits) {
    return dl_tensor(data, gpu ? kDLCUDA : kDLCPU, 0, ndim, shape, NULL, code, bits);
}

static DLTensor f32(void *data, int gpu, int ndim, int64_t *shape) { return tensor(data, gpu, ndim, shape, kDLFloat, 32); }
static DLTensor i64(void *data, int gpu, int ndim, int64_t *shape) { return tensor(data, gpu, ndim, shape, kDLInt, 64); }

static void *to_gpu(const void *host, size_t bytes) {
    void *d = NULL;
    CUDA_OK(cudaMalloc(&d, bytes));
    CUDA_OK(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
    return d;
}

/* Waits for the stream (where based ran), then copies back. */
static void from_gpu(void *host, const void *dev, size_t bytes) {
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
}

static unsigned seed = 12345u;
static float uniform(void) { /* in [-1, 1] */
    seed = seed * 1103515245u + 12345u;
    return (float)((seed >> 8) & 0xffffff) / 8388607.5f - 1.f;
}

static void fill(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = uniform();
}

static float max_abs(const float *x, size_t n) {
    float m = 0.f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

/* |gpu - cpu| <= atol + rtol |cpu| everywhere; returns the count of misses (reports the first). */
static int compare(const char *what, const float *gpu, const float *cpu, size_t n, float atol, float rtol) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!(fabsf(gpu[i] - cpu[i]) <= atol + rtol * fabsf(cpu[i]))) {
            if (bad == 0) CHECK(0, "%s[%zu]: GPU %.9g, CPU %.9g", what, i, gpu[i], cpu[i]);
            bad++;
        }
    }
    if (bad) fprintf(stderr, "  %s: %d of %zu elements differ\n", what, bad, n);
    return bad;
}

/* ---- linear attention: prefill then decode, on the GPU and on the host ----------------------- */
enum { B = 2, T = 70, H = 2, DK = 16, DV = 64, F = 1 + DK + DK * (DK + 1) / 2, E = 1 + DK + DK * DK };

static float lq[B][T][H][DK], lk[B][T][H][DK], lv[B][T][H][DV], lo_cpu[B][T][H][DV], lo_gpu[B][T][H][DV];
static float dq[B][H][DK], dk_[B][H][DK], dv[B][H][DV], do_cpu[B][H][DV], do_gpu[B][H][DV];
static float kv_cpu[B][H][F][DV], ks_cpu[B][H][F], kv_gpu[B][H][F][DV], ks_gpu[B][H][F];

static void test_linear_attention(void) {
    fill(&lq[0][0][0][0], sizeof lq / 4);
    fill(&lk[0][0][0][0], sizeof lk / 4);
    fill(&lv[0][0][0][0], sizeof lv / 4);
    fill(&dq[0][0][0], sizeof dq / 4);
    fill(&dk_[0][0][0], sizeof dk_ / 4);
    fill(&dv[0][0][0], sizeof dv / 4);
    int64_t tok_cpu[B] = {0, 0}, tok_gpu[B];
    memset(kv_cpu, 0, sizeof kv_cpu);
    memset(ks_cpu, 0, sizeof ks_cpu);
    int64_t qs[4] = {B, T, H, DK}, vs[4] = {B, T, H, DV}, kvs[4] = {B, H, F, DV}, kss[3] = {B, H, F}, ts[1] = {B};
    int64_t q3[3] = {B, H, DK}, v3[3] = {B, H, DV};
    based_linear_attention_params p = based_linear_attention_params_default(DK);

    /* host */
    DLTensor q = f32(lq, 0, 4, qs), k = f32(lk, 0, 4, qs), v = f32(lv, 0, 4, vs), o = f32(lo_cpu, 0, 4, vs);
    DLTensor kv = f32(kv_cpu, 0, 4, kvs), ks = f32(ks_cpu, 0, 3, kss), tok = i64(tok_cpu, 0, 1, ts);
    CHECK(based_linear_attention_prefill(&q, &k, &v, &kv, &ks, &tok, &o, &p) == BASED_STATUS_OK, "CPU prefill: %s",
          based_last_error());
    DLTensor q1 = f32(dq, 0, 3, q3), k1 = f32(dk_, 0, 3, q3), v1 = f32(dv, 0, 3, v3), o1 = f32(do_cpu, 0, 3, v3);
    CHECK(based_linear_attention_decode(&q1, &k1, &v1, &kv, &ks, &tok, &o1, &p) == BASED_STATUS_OK, "CPU decode: %s",
          based_last_error());

    /* GPU */
    void *gq = to_gpu(lq, sizeof lq), *gk = to_gpu(lk, sizeof lk), *gv = to_gpu(lv, sizeof lv);
    void *go = to_gpu(lo_gpu, sizeof lo_gpu);
    static const float zkv[B][H][F][DV], zks[B][H][F];
    static const int64_t ztok[B];
    void *gkv = to_gpu(zkv, sizeof zkv), *gks = to_gpu(zks, sizeof zks), *gtok = to_gpu(ztok, sizeof ztok);
    void *gq1 = to_gpu(dq, sizeof dq), *gk1 = to_gpu(dk_, sizeof dk_), *gv1 = to_gpu(dv, sizeof dv);
    void *go1 = to_gpu(do_gpu, sizeof do_gpu);
    p.stream = stream;
    q = f32(gq, 1, 4, qs), k = f32(gk, 1, 4, qs), v = f32(gv, 1, 4, vs), o = f32(go, 1, 4, vs);
    kv = f32(gkv, 1, 4, kvs), ks = f32(gks, 1, 3, kss), tok = i64(gtok, 1, 1, ts);
    CHECK(based_linear_attention_prefill(&q, &k, &v, &kv, &ks, &tok, &o, &p) == BASED_STATUS_OK, "GPU prefill: %s",
          based_last_error());
    from_gpu(lo_gpu, go, sizeof lo_gpu);
    q1 = f32(gq1, 1, 3, q3), k1 = f32(gk1, 1, 3, q3), v1 = f32(gv1, 1, 3, v3), o1 = f32(go1, 1, 3, v3);
    CHECK(based_linear_attention_decode(&q1, &k1, &v1, &kv, &ks, &tok, &o1, &p) == BASED_STATUS_OK, "GPU decode: %s",
          based_last_error());
    from_gpu(do_gpu, go1, sizeof do_gpu);
    from_gpu(kv_gpu, gkv, sizeof kv_gpu);
    from_gpu(ks_gpu, gks, sizeof ks_gpu);
    from_gpu(tok_gpu, gtok, sizeof tok_gpu);

    /* Outputs are weighted averages of values in [-1, 1] (positive weights K >= 1/2): float32
     * sums of <= 71 terms in two orders differ by a few 1e-6; 1e-4 leaves a wide margin yet
     * catches any wrong term. The state sums phi(k) v over 71 tokens: relative to its largest
     * entry, the same bound. */
    compare("linear prefill out", &lo_gpu[0][0][0][0], &lo_cpu[0][0][0][0], sizeof lo_cpu / 4, 1e-4f, 0.f);
    compare("linear decode out", &do_gpu[0][0][0], &do_cpu[0][0][0], sizeof do_cpu / 4, 1e-4f, 0.f);
    compare("state.kv", &kv_gpu[0][0][0][0], &kv_cpu[0][0][0][0], sizeof kv_cpu / 4,
            1e-5f * max_abs(&kv_cpu[0][0][0][0], sizeof kv_cpu / 4), 1e-5f);
    compare("state.ksum", &ks_gpu[0][0][0], &ks_cpu[0][0][0], sizeof ks_cpu / 4,
            1e-5f * max_abs(&ks_cpu[0][0][0], sizeof ks_cpu / 4), 1e-5f);
    CHECK(tok_gpu[0] == T + 1 && tok_gpu[1] == T + 1, "GPU tokens %lld %lld", (long long)tok_gpu[0],
          (long long)tok_gpu[1]);

    /* the expanded layout of that state, both ways, against the CPU's conversion */
    static float e_cpu[B][H][E][DV], es_cpu[B][H][E], e_gpu[B][H][E][DV], es_gpu[B][H][E];
    static float back_cpu[B][H][F][DV], backs_cpu[B][H][F], back_gpu[B][H][F][DV], backs_gpu[B][H][F];
    int64_t es[4] = {B, H, E, DV}, ess[3] = {B, H, E};
    DLTensor hkv = f32(kv_cpu, 0, 4, kvs), hks = f32(ks_cpu, 0, 3, kss);
    DLTensor he = f32(e_cpu, 0, 4, es), hes = f32(es_cpu, 0, 3, ess);
    DLTensor hb = f32(back_cpu, 0, 4, kvs), hbs = f32(backs_cpu, 0, 3, kss);
    CHECK(based_linear_state_to_expanded(&hkv, &hks, &he, &hes, NULL) == BASED_STATUS_OK, "%s", based_last_error());
    CHECK(based_linear_state_from_expanded(&he, &hes, &hb, &hbs, NULL) == BASED_STATUS_OK, "%s", based_last_error());
    void *ge = to_gpu(e_gpu, sizeof e_gpu), *ges = to_gpu(es_gpu, sizeof es_gpu);
    void *gb = to_gpu(back_gpu, sizeof back_gpu), *gbs = to_gpu(backs_gpu, sizeof backs_gpu);
    DLTensor de = f32(ge, 1, 4, es), des = f32(ges, 1, 3, ess), db = f32(gb, 1, 4, kvs), dbs = f32(gbs, 1, 3, kss);
    CHECK(based_linear_state_to_expanded(&kv, &ks, &de, &des, stream) == BASED_STATUS_OK, "GPU to_expanded: %s",
          based_last_error());
    CHECK(based_linear_state_from_expanded(&de, &des, &db, &dbs, stream) == BASED_STATUS_OK, "GPU from_expanded: %s",
          based_last_error());
    from_gpu(e_gpu, ge, sizeof e_gpu);
    from_gpu(es_gpu, ges, sizeof es_gpu);
    from_gpu(back_gpu, gb, sizeof back_gpu);
    from_gpu(backs_gpu, gbs, sizeof backs_gpu);
    /* the GPU converts the GPU's state, in float32 (the CPU in float64): the state's own
     * difference (1e-5 above) plus a few float32 roundings */
    const float skv = max_abs(&kv_cpu[0][0][0][0], sizeof kv_cpu / 4), sks = max_abs(&ks_cpu[0][0][0], sizeof ks_cpu / 4);
    compare("kv expanded", &e_gpu[0][0][0][0], &e_cpu[0][0][0][0], sizeof e_cpu / 4, 2e-5f * skv, 1e-5f);
    compare("ksum expanded", &es_gpu[0][0][0], &es_cpu[0][0][0], sizeof es_cpu / 4, 2e-5f * sks, 1e-5f);
    compare("kv round trip", &back_gpu[0][0][0][0], &back_cpu[0][0][0][0], sizeof back_cpu / 4, 2e-5f * skv, 1e-5f);
    compare("ksum round trip", &backs_gpu[0][0][0], &backs_cpu[0][0][0], sizeof backs_cpu / 4, 2e-5f * sks, 1e-5f);

    /* errors on CUDA: nothing may be written */
    static float kv_before[B][H][F][DV];
    int64_t tok_before[B];
    from_gpu(kv_before, gkv, sizeof kv_before);
    from_gpu(tok_before, gtok, sizeof tok_before);
    DLTensor host_out = f32(lo_cpu, 0, 4, vs);  /* out on the host, the rest on the GPU */
    CHECK(based_linear_attention_prefill(&q, &k, &v, &kv, &ks, &tok, &host_out, &p) == BASED_STATUS_VALUE_ERROR,
          "prefill with a host out: %s", based_last_error());
    CHECK(strstr(based_last_error(), "out") && strstr(based_last_error(), "cpu") && strstr(based_last_error(), "cuda"),
          "the message names out and both devices: %s", based_last_error());
    DLTensor q64 = tensor(gq, 1, 4, qs, kDLFloat, 64), k64 = tensor(gk, 1, 4, qs, kDLFloat, 64);
    DLTensor v64 = tensor(gv, 1, 4, vs, kDLFloat, 64), o64 = tensor(go, 1, 4, vs, kDLFloat, 64);
    /* (the float32 buffers are large enough: only half of their bytes are float64 elements) */
    int64_t qs64[4] = {B, T / 2, H, DK}, vs64[4] = {B, T / 2, H, DV};
    q64.shape = qs64, k64.shape = qs64, v64.shape = vs64, o64.shape = vs64;
    CHECK(based_linear_attention_prefill(&q64, &k64, &v64, &kv, &ks, &tok, &o64, &p) == BASED_STATUS_TYPE_ERROR,
          "float64 on CUDA: %s", based_last_error());
    CHECK(strstr(based_last_error(), "float64") != NULL, "the message names float64: %s", based_last_error());
    static float kv_after[B][H][F][DV];
    int64_t tok_after[B];
    from_gpu(kv_after, gkv, sizeof kv_after);
    from_gpu(tok_after, gtok, sizeof tok_after);
    CHECK(memcmp(kv_before, kv_after, sizeof kv_after) == 0 && memcmp(tok_before, tok_after, sizeof tok_after) == 0,
          "a rejected call changed the GPU state");

    void *all[] = {gq, gk, gv, go, gkv, gks, gtok, gq1, gk1, gv1, go1, ge, ges, gb, gbs};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) CUDA_OK(cudaFree(all[i]));
}

/* ---- sliding window: prefill then decode -------------------------------------------------------- */
enum { WB = 2, WT = 23, WH = 4, WHKV = 2, WD = 64, W = 8 };

static void test_sliding_window(void) {
    static float q[WB][WT][WH][WD], k[WB][WT][WHKV][WD], v[WB][WT][WHKV][WD];
    static float o_cpu[WB][WT][WH][WD], o_gpu[WB][WT][WH][WD];
    static float q1[WB][WH][WD], k1[WB][WHKV][WD], v1[WB][WHKV][WD], o1_cpu[WB][WH][WD], o1_gpu[WB][WH][WD];
    static float kc_cpu[WB][WHKV][W][WD], vc_cpu[WB][WHKV][W][WD], kc_gpu[WB][WHKV][W][WD], vc_gpu[WB][WHKV][W][WD];
    fill(&q[0][0][0][0], sizeof q / 4);
    fill(&k[0][0][0][0], sizeof k / 4);
    fill(&v[0][0][0][0], sizeof v / 4);
    fill(&q1[0][0][0], sizeof q1 / 4);
    fill(&k1[0][0][0], sizeof k1 / 4);
    fill(&v1[0][0][0], sizeof v1 / 4);
    int64_t qs[4] = {WB, WT, WH, WD}, ks[4] = {WB, WT, WHKV, WD}, cs[4] = {WB, WHKV, W, WD}, ts[1] = {WB};
    int64_t q3[3] = {WB, WH, WD}, k3[3] = {WB, WHKV, WD};
    int64_t tok_cpu[WB] = {0, 0}, tok_gpu[WB];
    based_sliding_window_params p = {W, 1.0 / sqrt((double)WD), NULL};

    DLTensor tq = f32(q, 0, 4, qs), tk = f32(k, 0, 4, ks), tv = f32(v, 0, 4, ks), to = f32(o_cpu, 0, 4, qs);
    DLTensor tkc = f32(kc_cpu, 0, 4, cs), tvc = f32(vc_cpu, 0, 4, cs), ttok = i64(tok_cpu, 0, 1, ts);
    CHECK(based_sliding_window_prefill(&tq, &tk, &tv, &tkc, &tvc, &ttok, &to, &p) == BASED_STATUS_OK,
          "CPU window prefill: %s", based_last_error());
    DLTensor tq1 = f32(q1, 0, 3, q3), tk1 = f32(k1, 0, 3, k3), tv1 = f32(v1, 0, 3, k3), to1 = f32(o1_cpu, 0, 3, q3);
    CHECK(based_sliding_window_decode(&tq1, &tk1, &tv1, &tkc, &tvc, &ttok, &to1, &p) == BASED_STATUS_OK,
          "CPU window decode: %s", based_last_error());

    static const float zc[WB][WHKV][W][WD];
    static const int64_t ztok[WB];
    void *gq = to_gpu(q, sizeof q), *gk = to_gpu(k, sizeof k), *gv = to_gpu(v, sizeof v), *go = to_gpu(o_gpu, sizeof o_gpu);
    void *gkc = to_gpu(zc, sizeof zc), *gvc = to_gpu(zc, sizeof zc), *gtok = to_gpu(ztok, sizeof ztok);
    void *gq1 = to_gpu(q1, sizeof q1), *gk1 = to_gpu(k1, sizeof k1), *gv1 = to_gpu(v1, sizeof v1);
    void *go1 = to_gpu(o1_gpu, sizeof o1_gpu);
    p.stream = stream;
    tq = f32(gq, 1, 4, qs), tk = f32(gk, 1, 4, ks), tv = f32(gv, 1, 4, ks), to = f32(go, 1, 4, qs);
    tkc = f32(gkc, 1, 4, cs), tvc = f32(gvc, 1, 4, cs), ttok = i64(gtok, 1, 1, ts);
    CHECK(based_sliding_window_prefill(&tq, &tk, &tv, &tkc, &tvc, &ttok, &to, &p) == BASED_STATUS_OK,
          "GPU window prefill: %s", based_last_error());
    from_gpu(o_gpu, go, sizeof o_gpu);
    tq1 = f32(gq1, 1, 3, q3), tk1 = f32(gk1, 1, 3, k3), tv1 = f32(gv1, 1, 3, k3), to1 = f32(go1, 1, 3, q3);
    CHECK(based_sliding_window_decode(&tq1, &tk1, &tv1, &tkc, &tvc, &ttok, &to1, &p) == BASED_STATUS_OK,
          "GPU window decode: %s", based_last_error());
    from_gpu(o1_gpu, go1, sizeof o1_gpu);
    from_gpu(kc_gpu, gkc, sizeof kc_gpu);
    from_gpu(vc_gpu, gvc, sizeof vc_gpu);
    from_gpu(tok_gpu, gtok, sizeof tok_gpu);
    /* softmax averages of values in [-1, 1] over <= 8 keys, float32 in both: 1e-5 */
    compare("window prefill out", &o_gpu[0][0][0][0], &o_cpu[0][0][0][0], sizeof o_cpu / 4, 1e-5f, 0.f);
    compare("window decode out", &o1_gpu[0][0][0], &o1_cpu[0][0][0], sizeof o1_cpu / 4, 1e-5f, 0.f);
    /* the caches hold the keys and values exactly as given */
    CHECK(memcmp(kc_gpu, kc_cpu, sizeof kc_cpu) == 0 && memcmp(vc_gpu, vc_cpu, sizeof vc_cpu) == 0,
          "window caches differ");
    CHECK(tok_gpu[0] == WT + 1 && tok_gpu[1] == WT + 1, "window tokens %lld %lld", (long long)tok_gpu[0],
          (long long)tok_gpu[1]);

    /* k on the host, the rest on the GPU: refused, cache untouched */
    DLTensor host_k = f32(k, 0, 4, ks);
    CHECK(based_sliding_window_prefill(&tq, &host_k, &tv, &tkc, &tvc, &ttok, &to, &p) == BASED_STATUS_VALUE_ERROR,
          "window prefill with a host k: %s", based_last_error());
    CHECK(strstr(based_last_error(), "cpu") && strstr(based_last_error(), "cuda"), "message: %s", based_last_error());
    static float kc_after[WB][WHKV][W][WD];
    int64_t tok_after[WB];
    from_gpu(kc_after, gkc, sizeof kc_after);
    from_gpu(tok_after, gtok, sizeof tok_after);
    CHECK(memcmp(kc_after, kc_gpu, sizeof kc_after) == 0 && memcmp(tok_after, tok_gpu, sizeof tok_after) == 0,
          "a rejected window call changed the cache");
    void *all[] = {gq, gk, gv, go, gkc, gvc, gtok, gq1, gk1, gv1, go1};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) CUDA_OK(cudaFree(all[i]));
}

/* ---- feature map ---------------------------------------------------------------------------------- */
static void test_feature_map(void) {
    enum { R0 = 3, R1 = 5 };
    static float x[R0][R1][DK], phi_cpu[R0][R1][F], phi_gpu[R0][R1][F];
    fill(&x[0][0][0], sizeof x / 4);
    int64_t xs[3] = {R0, R1, DK}, fs[3] = {R0, R1, F};
    const double scale = 0.25;
    DLTensor tx = f32(x, 0, 3, xs), tf = f32(phi_cpu, 0, 3, fs);
    CHECK(based_taylor_feature_map(&tx, &tf, scale, NULL) == BASED_STATUS_OK, "CPU feature map: %s", based_last_error());
    void *gx = to_gpu(x, sizeof x);
    for (size_t i = 0; i < sizeof phi_gpu / 4; i++) (&phi_gpu[0][0][0])[i] = NAN;  /* unwritten -> NaN -> fails */
    void *gf = to_gpu(phi_gpu, sizeof phi_gpu);
    DLTensor gtx = f32(gx, 1, 3, xs), gtf = f32(gf, 1, 3, fs);
    CHECK(based_taylor_feature_map(&gtx, &gtf, scale, stream) == BASED_STATUS_OK, "GPU feature map: %s",
          based_last_error());
    from_gpu(phi_gpu, gf, sizeof phi_gpu);
    /* the same float32 constants and operation order: equal up to 1 ulp */
    compare("phi", &phi_gpu[0][0][0], &phi_cpu[0][0][0], sizeof phi_cpu / 4, 0.f, 1.2e-7f);

    /* mixed devices and float64 on CUDA: refused, out untouched */
    DLTensor host_out = f32(phi_cpu, 0, 3, fs);
    CHECK(based_taylor_feature_map(&gtx, &host_out, scale, stream) == BASED_STATUS_VALUE_ERROR, "mixed devices: %s",
          based_last_error());
    CHECK(strstr(based_last_error(), "out is on cpu") != NULL, "the message names out: %s", based_last_error());
    int64_t xs64[3] = {R0, R1, DK / 2}, fs64[3] = {R0, R1, 1 + DK / 2 + (DK / 2) * (DK / 2 + 1) / 2};
    DLTensor x64 = tensor(gx, 1, 3, xs64, kDLFloat, 64), f64 = tensor(gf, 1, 3, fs64, kDLFloat, 64);
    CHECK(based_taylor_feature_map(&x64, &f64, scale, stream) == BASED_STATUS_TYPE_ERROR, "float64 on CUDA: %s",
          based_last_error());
    static float after[R0][R1][F];
    from_gpu(after, gf, sizeof after);
    CHECK(memcmp(after, phi_gpu, sizeof after) == 0, "a rejected feature map call wrote out");
    CUDA_OK(cudaFree(gx));
    CUDA_OK(cudaFree(gf));
}

/* ---- state helpers ----------------------------------------------------------------------------------- */
enum { SB = 5, S1 = 3, S2 = 7 };

static void test_state_helpers(void) {
    static float a[SB][S1][S2], a_cpu[SB][S1][S2], a_gpu[SB][S1][S2];
    fill(&a[0][0][0], sizeof a / 4);
    int64_t shape[3] = {SB, S1, S2}, ns[1];

    /* zero rows {1, 4} (host indices), then everything */
    int64_t rows[2] = {1, 4};
    ns[0] = 2;
    DLTensor idx = i64(rows, 0, 1, ns);
    memcpy(a_cpu, a, sizeof a);
    DLTensor h = f32(a_cpu, 0, 3, shape);
    CHECK(based_state_zero(&h, &idx, NULL) == BASED_STATUS_OK, "CPU zero: %s", based_last_error());
    void *ga = to_gpu(a, sizeof a);
    DLTensor g = f32(ga, 1, 3, shape);
    CHECK(based_state_zero(&g, &idx, stream) == BASED_STATUS_OK, "GPU zero: %s", based_last_error());
    from_gpu(a_gpu, ga, sizeof a_gpu);
    CHECK(memcmp(a_gpu, a_cpu, sizeof a_cpu) == 0, "zero rows: GPU and CPU differ");
    CHECK(based_state_zero(&g, NULL, stream) == BASED_STATUS_OK, "GPU zero all: %s", based_last_error());
    from_gpu(a_gpu, ga, sizeof a_gpu);
    static const float zeros[SB][S1][S2];
    CHECK(memcmp(a_gpu, zeros, sizeof zeros) == 0, "zero all left something");
    int64_t bad_row[1] = {SB};
    ns[0] = 1;
    DLTensor bad = i64(bad_row, 0, 1, ns);
    CHECK(based_state_zero(&g, &bad, stream) == BASED_STATUS_VALUE_ERROR, "index out of range: %s",
          based_last_error());

    /* copy: host float32 -> GPU bfloat16 (converted), GPU bfloat16 -> GPU float32,
     * GPU float32 -> host float32, each against the CPU's conversions bit for bit */
    static uint16_t b16_cpu[SB][S1][S2], b16_gpu[SB][S1][S2];
    DLTensor hsrc = f32(a, 0, 3, shape), hb16 = tensor(b16_cpu, 0, 3, shape, kDLBfloat, 16);
    CHECK(based_state_copy(&hb16, &hsrc, NULL) == BASED_STATUS_OK, "CPU copy to bfloat16: %s", based_last_error());
    void *gb16 = to_gpu(b16_gpu, sizeof b16_gpu);
    DLTensor db16 = tensor(gb16, 1, 3, shape, kDLBfloat, 16);
    CHECK(based_state_copy(&db16, &hsrc, stream) == BASED_STATUS_OK, "host -> GPU copy to bfloat16: %s",
          based_last_error());
    from_gpu(b16_gpu, gb16, sizeof b16_gpu);
    CHECK(memcmp(b16_gpu, b16_cpu, sizeof b16_cpu) == 0, "host float32 -> GPU bfloat16 differs from the CPU's");
    CHECK(based_state_copy(&g, &db16, stream) == BASED_STATUS_OK, "GPU bfloat16 -> float32: %s", based_last_error());
    static float widened[SB][S1][S2];
    DLTensor hw = f32(widened, 0, 3, shape);
    CHECK(based_state_copy(&hw, &hb16, NULL) == BASED_STATUS_OK, "CPU bfloat16 -> float32: %s", based_last_error());
    memset(a_gpu, 0xff, sizeof a_gpu);
    DLTensor hback = f32(a_gpu, 0, 3, shape);
    CHECK(based_state_copy(&hback, &g, stream) == BASED_STATUS_OK, "GPU -> host copy: %s", based_last_error());
    CHECK(memcmp(a_gpu, widened, sizeof widened) == 0, "GPU -> host copy differs");
    /* float64 on the host into a float32 GPU tensor (converted on the host) */
    static double a64[SB][S1][S2];
    for (size_t i = 0; i < sizeof a64 / 8; i++) (&a64[0][0][0])[i] = (double)(&a[0][0][0])[i] / 3.0;
    DLTensor h64 = tensor(a64, 0, 3, shape, kDLFloat, 64);
    CHECK(based_state_copy(&g, &h64, stream) == BASED_STATUS_OK, "host float64 -> GPU float32: %s",
          based_last_error());
    DLTensor hc = f32(a_cpu, 0, 3, shape);
    CHECK(based_state_copy(&hc, &h64, NULL) == BASED_STATUS_OK, "CPU float64 -> float32: %s", based_last_error());
    from_gpu(a_gpu, ga, sizeof a_gpu);
    CHECK(memcmp(a_gpu, a_cpu, sizeof a_cpu) == 0, "host float64 -> GPU float32 differs from the CPU's");

    /* gather with repeats into a new tensor, then in place */
    int64_t order[SB] = {4, 0, 0, 2, 1}, perm[SB] = {3, 1, 4, 0, 2};
    ns[0] = SB;
    DLTensor tord = i64(order, 0, 1, ns), tperm = i64(perm, 0, 1, ns);
    static float gathered_cpu[SB][S1][S2], gathered_gpu[SB][S1][S2];
    DLTensor hg = f32(gathered_cpu, 0, 3, shape);
    CHECK(based_state_gather(&hg, &hc, &tord, NULL) == BASED_STATUS_OK, "CPU gather: %s", based_last_error());
    void *gg = to_gpu(gathered_gpu, sizeof gathered_gpu);
    DLTensor dg = f32(gg, 1, 3, shape);
    CHECK(based_state_gather(&dg, &g, &tord, stream) == BASED_STATUS_OK, "GPU gather: %s", based_last_error());
    from_gpu(gathered_gpu, gg, sizeof gathered_gpu);
    CHECK(memcmp(gathered_gpu, gathered_cpu, sizeof gathered_cpu) == 0, "gather differs");
    CHECK(based_state_gather(&hc, &hc, &tperm, NULL) == BASED_STATUS_OK, "CPU gather in place: %s",
          based_last_error());
    CHECK(based_state_gather(&g, &g, &tperm, stream) == BASED_STATUS_OK, "GPU gather in place: %s",
          based_last_error());
    from_gpu(a_gpu, ga, sizeof a_gpu);
    CHECK(memcmp(a_gpu, a_cpu, sizeof a_cpu) == 0, "gather in place differs");

    /* int64 token counters: zero one, copy to the host */
    int64_t tok[4] = {10, 20, 30, 40}, tok_cpu[4], one[1] = {-1};
    int64_t ts[1] = {4};
    ns[0] = 1;
    void *gt = to_gpu(tok, sizeof tok);
    DLTensor dt = i64(gt, 1, 1, ts), ht = i64(tok_cpu, 0, 1, ts), tone = i64(one, 0, 1, ns);
    CHECK(based_state_zero(&dt, &tone, stream) == BASED_STATUS_OK, "GPU zero tokens[-1]: %s", based_last_error());
    CHECK(based_state_copy(&ht, &dt, stream) == BASED_STATUS_OK, "tokens GPU -> host: %s", based_last_error());
    CHECK(tok_cpu[0] == 10 && tok_cpu[2] == 30 && tok_cpu[3] == 0, "tokens after zero of [-1]: %lld %lld %lld",
          (long long)tok_cpu[0], (long long)tok_cpu[2], (long long)tok_cpu[3]);

    CUDA_OK(cudaFree(ga));
    CUDA_OK(cudaFree(gb16));
    CUDA_OK(cudaFree(gg));
    CUDA_OK(cudaFree(gt));
}

int main(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("test_c_api_cuda: no CUDA device, nothing run\n");
        return 0;
    }
    CHECK(based_built_with_cuda() == 1 && based_cuda_device_count() >= 1, "built with CUDA: %d, devices: %d",
          based_built_with_cuda(), based_cuda_device_count());
    CUDA_OK(cudaSetDevice(0));
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    test_linear_attention();
    test_sliding_window();
    test_feature_map();
    test_state_helpers();
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaStreamDestroy(stream));
    CUDA_OK(cudaGetLastError());
    if (failures == 0) printf("test_c_api_cuda: all checks passed (based %s)\n", based_version());
    else fprintf(stderr, "test_c_api_cuda: %d checks failed\n", failures);
    return failures != 0;
}
