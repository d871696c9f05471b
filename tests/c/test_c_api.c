/*
 * test_c_api.c -- csrc/based.h used from plain C, no Python: the feature map against a
 * direct formula, the error contract (status, message, nothing written), state helpers.
 * Built and run by tests/test_c_api.py (cc -std=c11 -fopenmp -Icsrc, with every csrc C file).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "based.h"

static int failures = 0;
#define CHECK(cond, ...)                                     \
    do {                                                     \
        if (!(cond)) {                                       \
            failures++;                                      \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                    \
            fprintf(stderr, "\n");                           \
        }                                                    \
    } while (0)

static DLTensor tensor(void *data, int ndim, int64_t *shape, int64_t *strides, uint8_t code, uint8_t bits) {
    DLTensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device.device_type = kDLCPU;
    t.ndim = ndim;
    t.dtype.code = code;
    t.dtype.bits = bits;
    t.dtype.lanes = 1;
    t.shape = shape;
    t.strides = strides;
    return t;
}

int main(void) {
    /* feature map of 2 rows, Dk = 3 -> F = 10, against the formula of SPEC 1.1 */
    float x[2][3] = {{1.f, 2.f, 3.f}, {-0.5f, 0.25f, 4.f}};
    float out[2][10];
    int64_t xs[2] = {2, 3}, os[2] = {2, 10};
    DLTensor tx = tensor(x, 2, xs, NULL, kDLFloat, 32), to = tensor(out, 2, os, NULL, kDLFloat, 32);
    double scale = 0.5;
    CHECK(based_taylor_feature_dim(3) == 10, "F(3) = %lld", (long long)based_taylor_feature_dim(3));
    CHECK(based_taylor_feature_map(&tx, &to, scale) == BASED_STATUS_OK, "%s", based_last_error());
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
    CHECK(based_taylor_feature_map(&tx, &tbad, scale) == BASED_STATUS_VALUE_ERROR, "bad shape status");
    CHECK(strstr(based_last_error(), "out must have shape") != NULL, "message: %s", based_last_error());
    CHECK(based_taylor_feature_map(&tx, &to, -1.0) == BASED_STATUS_VALUE_ERROR, "negative scale");
    CHECK(strstr(based_last_error(), "scale must be a finite number > 0") != NULL, "message: %s",
          based_last_error());
    DLTensor tint = tensor(x, 2, xs, NULL, kDLInt, 32);
    CHECK(based_taylor_feature_map(&tint, &to, scale) == BASED_STATUS_TYPE_ERROR, "int32 x");
    CHECK(based_taylor_feature_map(NULL, &to, scale) == BASED_STATUS_VALUE_ERROR, "NULL x");
    DLTensor tcuda = tx;
    tcuda.device.device_type = kDLCUDA;
    DLTensor tocuda = to;
    tocuda.device.device_type = kDLCUDA;
    CHECK(based_taylor_feature_map(&tcuda, &tocuda, scale) == BASED_STATUS_NOT_IMPLEMENTED, "CUDA tensors");
    CHECK(based_taylor_feature_map(&tcuda, &to, scale) == BASED_STATUS_VALUE_ERROR, "mixed devices");
    CHECK(strstr(based_last_error(), "one device") != NULL, "message: %s", based_last_error());
    for (int i = 0; i < 20; i++) CHECK(((float *)out)[i] == 7.f, "out[%d] was written by a failed call", i);

    /* state helpers: zero row 1 of a (3, 2) int64 tensor, then gather rows [2, 0, 0] */
    int64_t st[3][2] = {{1, 2}, {3, 4}, {5, 6}}, idx[3] = {2, 0, 0}, one[1] = {1};
    int64_t ss[2] = {3, 2}, is[1] = {3}, os1[1] = {1};
    DLTensor tst = tensor(st, 2, ss, NULL, kDLInt, 64), tidx = tensor(idx, 1, is, NULL, kDLInt, 64);
    DLTensor tone = tensor(one, 1, os1, NULL, kDLInt, 64);
    CHECK(based_state_zero(&tst, &tone) == BASED_STATUS_OK, "%s", based_last_error());
    CHECK(st[1][0] == 0 && st[1][1] == 0 && st[0][0] == 1, "state_zero");
    CHECK(based_state_gather(&tst, &tst, &tidx) == BASED_STATUS_OK, "%s", based_last_error());
    CHECK(st[0][0] == 5 && st[1][1] == 2 && st[2][0] == 1, "state_gather in place");

    CHECK(strcmp(based_status_str(BASED_STATUS_TYPE_ERROR), "type error") == 0, "status string");
    if (failures == 0) printf("test_c_api: all checks passed (based %s)\n", based_version());
    return failures != 0;
}
