/*
 * test_c_api.c -- csrc/based.h used from plain C, no Python: the feature map against a
 * direct formula, the error contract (status, message, nothing written), state helpers, and
 * the linear-attention and sliding-window kernels against their plain-loop twins, and the
 * device rule for CUDA tensors in this build without CUDA (tests/c/test_cuda_dispatch.c has
 * the CUDA build's side).
 * Built and run by tests/test_c_api.py (cc -std=c11 -fopenmp -Icsrc, with every csrc C file).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "based.h"

#include "check.h"

static DLTensor tensor(void *data, int ndim, int64_t *shape, int64_t *strides, uint8_t code, uint8_t bits) {
    return dl_tensor(data, kDLCPU, 0, ndim, shape, strides, code, bits);
}

/* An address no host access may touch (far from anything mapped): the memory of a CUDA
 * tensor, which the C core must never read or write on the host. */
static void *device_address(int i) { return (void *)(((uintptr_t)1 << 44) + ((uintptr_t)i << 32)); }

static DLTensor on_cuda(DLTensor t, int i) {
    t.data = device_address(i);
    t.device.device_type = kDLCUDA;
    t.device.device_id = 0;
    return t;
}

#define CHECK_ERROR(call, status, message)                                                                \
    do {                                                                                                  \
        based_status st_ = (call);                                                                        \
        CHECK(st_ == (status), "%s: status %s, want %s (%s)", #call, based_status_str(st_),               \
              based_status_str(status), based_last_error());                                              \
        CHECK(strcmp(based_last_error(), (message)) == 0, "%s:\n  message %s\n  want    %s", #call,        \
              based_last_error(), (message));                                                             \
    } while (0)

/* The device rule (SPEC 4) for CUDA tensors, which passes or fails in the checks shared by
 * both backends, before anything runs: float64 and rows with a non-unit last stride are
 * refused; a call that passes meets this build, which has no CUDA, and says so. Every
 * tensor's memory is a device address: a host access would crash the test. */
static void test_device_rule(void) {
    int64_t xs[2] = {3, 4}, fs[2] = {3, 15}, x_strided[2] = {8, 2};
    DLTensor x = on_cuda(tensor(NULL, 2, xs, NULL, kDLFloat, 32), 0);
    DLTensor phi = on_cuda(tensor(NULL, 2, fs, NULL, kDLFloat, 32), 1);
    DLTensor x64 = x, phi64 = phi;
    x64.dtype.bits = phi64.dtype.bits = 64;
    CHECK_ERROR(based_taylor_feature_map(&x64, &phi64, 0.5, NULL), BASED_STATUS_TYPE_ERROR,
                "taylor_feature_map: x is float64 on cuda:0; the CUDA kernels compute in float32, float16 and "
                "bfloat16");
    DLTensor xs2 = x;
    xs2.strides = x_strided;
    CHECK_ERROR(based_taylor_feature_map(&xs2, &phi, 0.5, NULL), BASED_STATUS_VALUE_ERROR,
                "taylor_feature_map: on CUDA, x must have unit stride along its last dim (of size 4), got stride 2; "
                "pass .contiguous()");
    CHECK_ERROR(based_taylor_feature_map(&x, &phi, 0.5, NULL), BASED_STATUS_NOT_IMPLEMENTED,
                "taylor_feature_map: x is on cuda:0, and this build of based has no CUDA kernel for taylor_feature_map "
                "(it was built without nvcc); use CPU tensors");

    /* linear attention decode: q, k (B=2, H=3, Dk=4), v, out (2, 3, 5), state (2, 3, 15, 5) */
    int64_t qs[3] = {2, 3, 4}, vs[3] = {2, 3, 5}, kvs[4] = {2, 3, 15, 5}, kss[3] = {2, 3, 15}, ts[1] = {2};
    DLTensor q = on_cuda(tensor(NULL, 3, qs, NULL, kDLFloat, 16), 2), k = on_cuda(q, 3);
    DLTensor v = on_cuda(tensor(NULL, 3, vs, NULL, kDLFloat, 16), 4), out = on_cuda(v, 5);
    DLTensor kv = on_cuda(tensor(NULL, 4, kvs, NULL, kDLFloat, 32), 6);
    DLTensor ksum = on_cuda(tensor(NULL, 3, kss, NULL, kDLFloat, 32), 7);
    DLTensor tokens = on_cuda(tensor(NULL, 1, ts, NULL, kDLInt, 64), 8);
    based_linear_attention_params p = based_linear_attention_params_default(4);
    /* the token counters are not read on the host (a device sync): the call reaches the build */
    CHECK_ERROR(based_linear_attention_decode(&q, &k, &v, &kv, &ksum, &tokens, &out, &p),
                BASED_STATUS_NOT_IMPLEMENTED,
                "linear_attention_decode: q is on cuda:0, and this build of based has no CUDA kernel for "
                "linear_attention_decode (it was built without nvcc); use CPU tensors");
    CHECK_ERROR(based_linear_attention_decode_ref(&q, &k, &v, &kv, &ksum, &tokens, &out, &p),
                BASED_STATUS_NOT_IMPLEMENTED,
                "linear_attention_decode_ref: q is on cuda:0; the reference twins run on the CPU, so pass CPU tensors");
    int64_t ks_strided[3] = {90, 30, 2};
    DLTensor ksum2 = ksum;
    ksum2.strides = ks_strided;
    CHECK_ERROR(based_linear_attention_decode(&q, &k, &v, &kv, &ksum2, &tokens, &out, &p), BASED_STATUS_VALUE_ERROR,
                "linear_attention_decode: on CUDA, state.ksum must have unit stride along its last dim (of size 15), "
                "got stride 2; pass .contiguous()");
    DLTensor kv64 = kv, ksum64 = ksum;
    kv64.dtype.bits = ksum64.dtype.bits = 64;
    CHECK_ERROR(based_linear_attention_decode(&q, &k, &v, &kv64, &ksum64, &tokens, &out, &p), BASED_STATUS_TYPE_ERROR,
                "linear_attention_decode: state.kv is float64 on cuda:0; the CUDA kernels compute in float32, float16 "
                "and bfloat16");
    DLTensor host_tokens = tokens;
    host_tokens.device.device_type = kDLCPU;
    CHECK_ERROR(based_linear_attention_decode(&q, &k, &v, &kv, &ksum, &host_tokens, &out, &p),
                BASED_STATUS_VALUE_ERROR,
                "state.tokens is on cpu but q is on cuda:0: all tensors of one call must be on one device");

    /* state helpers: host batch indices, a CUDA state */
    int64_t idx[2] = {1, -2}, is[1] = {2};
    DLTensor tidx = tensor(idx, 1, is, NULL, kDLInt, 64);
    CHECK_ERROR(based_state_zero(&kv, &tidx, NULL), BASED_STATUS_NOT_IMPLEMENTED,
                "reset: state is on cuda:0, and this build of based has no CUDA kernel for reset (it was built without "
                "nvcc); use CPU tensors");
    DLTensor cuda_idx = on_cuda(tidx, 9);
    CHECK_ERROR(based_state_zero(&kv, &cuda_idx, NULL), BASED_STATUS_NOT_IMPLEMENTED,
                "reset: batch_indices is on cuda:0; batch indices are read on the host, so pass them in CPU memory");
}

int main(void) {
    /* feature map of 2 rows, Dk = 3 -> F = 10, against the formula of SPEC 1.1 */
    float x[2][3] = {{1.f, 2.f, 3.f}, {-0.5f, 0.25f, 4.f}};
    float out[2][10];
    int64_t xs[2] = {2, 3}, os[2] = {2, 10};
    DLTensor tx = tensor(x, 2, xs, NULL, kDLFloat, 32), to = tensor(out, 2, os, NULL, kDLFloat, 32);
    double scale = 0.5;
    CHECK(based_taylor_feature_dim(3) == 10, "F(3) = %lld", (long long)based_taylor_feature_dim(3));
    CHECK(based_taylor_feature_map(&tx, &to, scale, NULL) == BASED_STATUS_OK, "%s", based_last_error());
    for (int r = 0; r < 2; r++) {
        float want[10];
        int f = 0;
        want[f++] = 1.f;
        for (int i = 0; i < 3; i++) want[f++] = sqrtf((float)scale) * x[r][i];
        for (int i = 0; i < 3; i++)
            for (int j = i; j < 3; j++)
                want[f++] = (float)(i == j ? scale / sqrt(2.0) : scale) * x[r][i] * x[r][j];
        for (int i = 0; i < 10; i++)
            CHECK(fabsf(out[r][i] - want[i]) <= 1e-6f * (1.f + fabsf(want[i])), "phi[%d][%d] = %g, want %g", r, i,
                  out[r][i], want[i]);
    }

    /* errors: status, message, and out untouched */
    for (int i = 0; i < 20; i++) ((float *)out)[i] = 7.f;
    int64_t bad_shape[2] = {2, 9};
    DLTensor tbad = tensor(out, 2, bad_shape, NULL, kDLFloat, 32);
    CHECK(based_taylor_feature_map(&tx, &tbad, scale, NULL) == BASED_STATUS_VALUE_ERROR, "bad shape status");
    CHECK(strstr(based_last_error(), "out must have shape") != NULL, "message: %s", based_last_error());
    CHECK(based_taylor_feature_map(&tx, &to, -1.0, NULL) == BASED_STATUS_VALUE_ERROR, "negative scale");
    CHECK(strstr(based_last_error(), "scale must be a finite number > 0") != NULL, "message: %s",
          based_last_error());
    DLTensor tint = tensor(x, 2, xs, NULL, kDLInt, 32);
    CHECK(based_taylor_feature_map(&tint, &to, scale, NULL) == BASED_STATUS_TYPE_ERROR, "int32 x");
    CHECK(based_taylor_feature_map(NULL, &to, scale, NULL) == BASED_STATUS_VALUE_ERROR, "NULL x");
    DLTensor tcuda = tx;
    tcuda.device.device_type = kDLCUDA;
    DLTensor tocuda = to;
    tocuda.device.device_type = kDLCUDA;
    CHECK(based_taylor_feature_map(&tcuda, &tocuda, scale, NULL) == BASED_STATUS_NOT_IMPLEMENTED, "CUDA tensors");
    CHECK(based_taylor_feature_map(&tcuda, &to, scale, NULL) == BASED_STATUS_VALUE_ERROR, "mixed devices");
    CHECK(strstr(based_last_error(), "one device") != NULL, "message: %s", based_last_error());
    for (int i = 0; i < 20; i++) CHECK(((float *)out)[i] == 7.f, "out[%d] was written by a failed call", i);

    /* state helpers: zero row 1 of a (3, 2) int64 tensor, then gather rows [2, 0, 0] */
    int64_t st[3][2] = {{1, 2}, {3, 4}, {5, 6}}, idx[3] = {2, 0, 0}, one[1] = {1};
    int64_t ss[2] = {3, 2}, is[1] = {3}, os1[1] = {1};
    DLTensor tst = tensor(st, 2, ss, NULL, kDLInt, 64), tidx = tensor(idx, 1, is, NULL, kDLInt, 64);
    DLTensor tone = tensor(one, 1, os1, NULL, kDLInt, 64);
    CHECK(based_state_zero(&tst, &tone, NULL) == BASED_STATUS_OK, "%s", based_last_error());
    CHECK(st[1][0] == 0 && st[1][1] == 0 && st[0][0] == 1, "state_zero");
    CHECK(based_state_gather(&tst, &tst, &tidx, NULL) == BASED_STATUS_OK, "%s", based_last_error());
    CHECK(st[0][0] == 5 && st[1][1] == 2 && st[2][0] == 1, "state_gather in place");

    /* linear attention: fast kernel == plain-loop twin, prefill then decode; B=1 T=70 H=2 Dk=4 Dv=3
     * (T not a multiple of the chunk, Dv not a power of two) */
    enum { T = 70, H = 2, DK = 4, DV = 3, F = 1 + DK + DK * (DK + 1) / 2 };
    static float lq[T][H][DK], lk[T][H][DK], lv[T][H][DV], lo[2][T][H][DV];
    static float kv[2][H][F][DV], ks[2][H][F];
    int64_t tok[2][1] = {{0}, {0}};
    unsigned seed = 12345u;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            for (int i = 0; i < DK; i++) {
                seed = seed * 1103515245u + 12345u;
                lq[t][h][i] = (float)((seed >> 16) % 2001) / 1000.f - 1.f;
                seed = seed * 1103515245u + 12345u;
                lk[t][h][i] = (float)((seed >> 16) % 2001) / 1000.f - 1.f;
            }
            for (int i = 0; i < DV; i++) lv[t][h][i] = (float)((t * 7 + h * 3 + i) % 11) - 5.f;
        }
    int64_t qs4[4] = {1, T - 1, H, DK}, vs4[4] = {1, T - 1, H, DV}, kvs[4] = {1, H, F, DV}, kss[3] = {1, H, F};
    int64_t ts1[1] = {1}, q3[3] = {1, H, DK}, v3[3] = {1, H, DV};
    based_linear_attention_params lp = based_linear_attention_params_default(DK);
    for (int which = 0; which < 2; which++) { /* 0: fast, 1: reference twin */
        DLTensor tq = tensor(lq, 4, qs4, NULL, kDLFloat, 32), tk = tensor(lk, 4, qs4, NULL, kDLFloat, 32);
        DLTensor tv = tensor(lv, 4, vs4, NULL, kDLFloat, 32), to4 = tensor(lo[which], 4, vs4, NULL, kDLFloat, 32);
        DLTensor tkv = tensor(kv[which], 4, kvs, NULL, kDLFloat, 32), tks = tensor(ks[which], 3, kss, NULL, kDLFloat, 32);
        DLTensor ttok = tensor(tok[which], 1, ts1, NULL, kDLInt, 64);
        based_status st = which ? based_linear_attention_prefill_ref(&tq, &tk, &tv, &tkv, &tks, &ttok, &to4, &lp)
                                : based_linear_attention_prefill(&tq, &tk, &tv, &tkv, &tks, &ttok, &to4, &lp);
        CHECK(st == BASED_STATUS_OK, "linear prefill (%d): %s", which, based_last_error());
        DLTensor dq = tensor(lq[T - 1], 3, q3, NULL, kDLFloat, 32), dk = tensor(lk[T - 1], 3, q3, NULL, kDLFloat, 32);
        DLTensor dv = tensor(lv[T - 1], 3, v3, NULL, kDLFloat, 32), dout = tensor(lo[which][T - 1], 3, v3, NULL, kDLFloat, 32);
        st = which ? based_linear_attention_decode_ref(&dq, &dk, &dv, &tkv, &tks, &ttok, &dout, &lp)
                   : based_linear_attention_decode(&dq, &dk, &dv, &tkv, &tks, &ttok, &dout, &lp);
        CHECK(st == BASED_STATUS_OK, "linear decode (%d): %s", which, based_last_error());
        CHECK(tok[which][0] == T, "tokens after prefill + decode: %lld", (long long)tok[which][0]);
    }
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < DV; i++) /* normalised outputs are O(|v|) = O(5); float32 sums over <= 70 terms */
                CHECK(fabsf(lo[0][t][h][i] - lo[1][t][h][i]) <= 1e-4f, "linear o[%d][%d][%d]: %g vs %g", t, h, i,
                      lo[0][t][h][i], lo[1][t][h][i]);
    /* a bad call (wrong Dv in out) fails and leaves the state untouched */
    float kv_before = kv[0][1][F - 1][DV - 1];
    int64_t bad_vs[4] = {1, T - 1, H, DV + 1};
    DLTensor bq = tensor(lq, 4, qs4, NULL, kDLFloat, 32), bv = tensor(lv, 4, vs4, NULL, kDLFloat, 32);
    DLTensor bo = tensor(lo[0], 4, bad_vs, NULL, kDLFloat, 32), bkv = tensor(kv[0], 4, kvs, NULL, kDLFloat, 32);
    DLTensor bks = tensor(ks[0], 3, kss, NULL, kDLFloat, 32), btok = tensor(tok[0], 1, ts1, NULL, kDLInt, 64);
    CHECK(based_linear_attention_prefill(&bq, &bq, &bv, &bkv, &bks, &btok, &bo, &lp) == BASED_STATUS_VALUE_ERROR,
          "bad out shape accepted");
    CHECK(kv[0][1][F - 1][DV - 1] == kv_before && tok[0][0] == T, "a rejected call wrote the state");

    /* sliding window: fast == twin; window 5 < T, GQA 2 query heads over 1 kv head */
    enum { WT = 23, W = 5, WD = 3 };
    static float wq[WT][2][WD], wk[WT][1][WD], wv[WT][1][WD], wo[2][WT][2][WD], kc[2][1][W][WD], vc[2][1][W][WD];
    int64_t wtok[2][1] = {{0}, {0}};
    for (int t = 0; t < WT; t++)
        for (int i = 0; i < WD; i++) {
            wq[t][0][i] = lq[t][0][i];
            wq[t][1][i] = lq[t][1][i];
            wk[t][0][i] = lk[t][0][i];
            wv[t][0][i] = (float)((t + i) % 5);
        }
    int64_t wqs[4] = {1, WT, 2, WD}, wks[4] = {1, WT, 1, WD}, cs[4] = {1, 1, W, WD};
    based_sliding_window_params wp = {W, 1.0 / sqrt((double)WD), NULL};
    for (int which = 0; which < 2; which++) {
        DLTensor tq = tensor(wq, 4, wqs, NULL, kDLFloat, 32), tk = tensor(wk, 4, wks, NULL, kDLFloat, 32);
        DLTensor tv = tensor(wv, 4, wks, NULL, kDLFloat, 32), to4 = tensor(wo[which], 4, wqs, NULL, kDLFloat, 32);
        DLTensor tkc = tensor(kc[which], 4, cs, NULL, kDLFloat, 32), tvc = tensor(vc[which], 4, cs, NULL, kDLFloat, 32);
        DLTensor ttok = tensor(wtok[which], 1, ts1, NULL, kDLInt, 64);
        based_status st = which ? based_sliding_window_prefill_ref(&tq, &tk, &tv, &tkc, &tvc, &ttok, &to4, &wp)
                                : based_sliding_window_prefill(&tq, &tk, &tv, &tkc, &tvc, &ttok, &to4, &wp);
        CHECK(st == BASED_STATUS_OK, "window prefill (%d): %s", which, based_last_error());
        CHECK(wtok[which][0] == WT, "window tokens %lld", (long long)wtok[which][0]);
    }
    for (int t = 0; t < WT; t++)
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < WD; i++) /* softmax averages of values in [0, 4] */
                CHECK(fabsf(wo[0][t][h][i] - wo[1][t][h][i]) <= 1e-5f, "window o[%d][%d][%d]: %g vs %g", t, h, i,
                      wo[0][t][h][i], wo[1][t][h][i]);
    based_sliding_window_params bad_wp = {0, 1.0, NULL};
    DLTensor tq = tensor(wq, 4, wqs, NULL, kDLFloat, 32), tk = tensor(wk, 4, wks, NULL, kDLFloat, 32);
    DLTensor tkc = tensor(kc[0], 4, cs, NULL, kDLFloat, 32), tvc = tensor(vc[0], 4, cs, NULL, kDLFloat, 32);
    DLTensor ttok = tensor(wtok[0], 1, ts1, NULL, kDLInt, 64), to4 = tensor(wo[0], 4, wqs, NULL, kDLFloat, 32);
    CHECK(based_sliding_window_prefill(&tq, &tk, &tk, &tkc, &tvc, &ttok, &to4, &bad_wp) == BASED_STATUS_VALUE_ERROR,
          "window 0 accepted");

    CHECK(strcmp(based_status_str(BASED_STATUS_TYPE_ERROR), "type error") == 0, "status string");
    test_device_rule();

    /* build information and CUDA memory in a build without CUDA */
    const char *lin = based_cpu_kernel_isa("linear_attention"), *win = based_cpu_kernel_isa("sliding_window");
    CHECK(lin && (!strcmp(lin, "avx2+fma") || !strcmp(lin, "generic")), "linear kernels %s", lin ? lin : "NULL");
    CHECK(win && (!strcmp(win, "avx512") || !strcmp(win, "avx2") || !strcmp(win, "generic")), "window kernels %s",
          win ? win : "NULL");
    CHECK(based_cpu_kernel_isa("taylor_feature_map") == NULL && based_cpu_kernel_isa(NULL) == NULL, "other ops");
    CHECK(based_built_with_cuda() == 0 && strcmp(based_cuda_archs(), "") == 0 && based_cuda_device_count() == 0,
          "no CUDA");
    void *dev = &failures;
    CHECK(based_cuda_malloc_zeroed(&dev, 64, 0) == BASED_STATUS_NOT_IMPLEMENTED && dev == NULL, "malloc");
    CHECK(strcmp(based_last_error(), "based was built without CUDA (no nvcc at build time), so it cannot allocate "
                                     "CUDA memory") == 0,
          "message: %s", based_last_error());
    if (failures == 0) printf("test_c_api: all checks passed (based %s)\n", based_version());
    return failures != 0;
}
