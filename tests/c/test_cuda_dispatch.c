/*
 * test_cuda_dispatch.c -- the seam between the C core and its CUDA side, with neither a GPU
 * nor nvcc: csrc/ is compiled as for a CUDA build (-DBASED_WITH_CUDA) and linked with this
 * file, which stands in for kernels/: every function of kernels/based_cuda.h records its
 * call (the checked arguments, the stream) and touches no memory.
 *
 * Checks that each op of based.h reaches its CUDA function with the arguments the kernels
 * rely on (device, stream, sizes, decode tensors seen as (B, 1, H, d) with strides[1] = 0,
 * byte offsets applied, batch indices read and normalised on the host), that the state
 * helpers go to CUDA when either tensor is there, that whatever the CUDA side returns
 * reaches the caller, and that refused calls (float64, a row with a non-unit last stride,
 * mixed devices, a reference twin) never get there. Every CUDA tensor's memory is an
 * address no host access may touch, so reading a token counter on the host would crash.
 * Built and run by tests/test_c_api.py.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "based.h"
#include "based_cuda.h"

#include "check.h"

/* ---- the stand-in CUDA side ----------------------------------------------------------- */

static struct {
    int calls;
    const char *fn;
    cudaStream_t stream;
    based_linear_attention_args linear;
    based_sliding_window_args window;
    based_feature_map_args feature_map;
    based_linear_state_args linear_state;
    based_state_args state;
    int64_t indices[8]; /* the batch indices, copied: they live only during the call */
    based_status answer; /* what the next call returns */
} seen;

#define RECORD(field)                                                                                      \
    do {                                                                                                   \
        seen.calls++;                                                                                      \
        seen.fn = __func__;                                                                                \
        seen.stream = stream;                                                                              \
        seen.field = *args;                                                                                \
        if (seen.answer != BASED_STATUS_OK) return based_fail(seen.answer, "%s: answered by the test", __func__); \
        return BASED_STATUS_OK;                                                                            \
    } while (0)

based_status based_cuda_linear_attention_prefill(const based_linear_attention_args *args, cudaStream_t stream) {
    RECORD(linear);
}
based_status based_cuda_linear_attention_decode(const based_linear_attention_args *args, cudaStream_t stream) {
    RECORD(linear);
}
based_status based_cuda_sliding_window_prefill(const based_sliding_window_args *args, cudaStream_t stream) {
    RECORD(window);
}
based_status based_cuda_sliding_window_decode(const based_sliding_window_args *args, cudaStream_t stream) {
    RECORD(window);
}
based_status based_cuda_taylor_feature_map(const based_feature_map_args *args, cudaStream_t stream) {
    RECORD(feature_map);
}
based_status based_cuda_linear_state_convert(const based_linear_state_args *args, cudaStream_t stream) {
    RECORD(linear_state);
}

static void copy_indices(const based_state_args *args) {
    for (int64_t i = 0; i < args->n_indices && i < 8 && args->indices; i++) seen.indices[i] = args->indices[i];
}
based_status based_cuda_state_zero(const based_state_args *args, cudaStream_t stream) {
    copy_indices(args);
    RECORD(state);
}
based_status based_cuda_state_copy(const based_state_args *args, cudaStream_t stream) {
    copy_indices(args);
    RECORD(state);
}
based_status based_cuda_state_gather(const based_state_args *args, cudaStream_t stream) {
    copy_indices(args);
    RECORD(state);
}

static int runtime_error = 100; /* what the runtime's malloc returns: cudaErrorNoDevice */
int based_cuda_runtime_device_count(void) { return 0; }
int based_cuda_runtime_malloc_zeroed(void **ptr, size_t nbytes, int device) {
    (void)nbytes, (void)device;
    *ptr = NULL;
    return runtime_error;
}
int based_cuda_runtime_free(void *ptr, int device) { return (void)ptr, (void)device, 0; }
int based_cuda_runtime_memcpy(void *dst, const void *src, size_t nbytes, int device) {
    return (void)dst, (void)src, (void)nbytes, (void)device, 100;
}
const char *based_cuda_runtime_error_string(int err) {
    return err == 2 ? "out of memory" : err ? "no CUDA-capable device is detected" : "no error";
}
int based_cuda_runtime_capability(int device) { return (void)device, -1; }

/* ---- tensors -------------------------------------------------------------------------- */

/* An address no host access may touch (far from anything mapped). */
static char *device_address(int i) { return (char *)(((uintptr_t)1 << 44) + ((uintptr_t)i << 32)); }

/* A tensor of `code`/`bits` on cuda:`id` at device_address(i), row-major unless strides. */
static DLTensor cuda(int i, int id, int ndim, int64_t *shape, int64_t *strides, uint8_t code, uint8_t bits) {
    return dl_tensor(device_address(i), kDLCUDA, id, ndim, shape, strides, code, bits);
}

static int same_strides(const based_tensor *t, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
    return t->strides[0] == s0 && t->strides[1] == s1 && t->strides[2] == s2 && t->strides[3] == s3;
}

/* call must fail with `status` and a message containing `words`, without reaching CUDA. */
#define CHECK_REFUSED(call, status, words)                                                                 \
    do {                                                                                                   \
        const int calls_ = seen.calls;                                                                     \
        const based_status st_ = (call);                                                                   \
        CHECK(st_ == (status), "%s: status %s (%s)", #call, based_status_str(st_), based_last_error());    \
        CHECK(strstr(based_last_error(), (words)) != NULL, "%s: message %s", #call, based_last_error());   \
        CHECK(seen.calls == calls_, "%s reached %s", #call, seen.fn);                                      \
    } while (0)

int main(void) {
    cudaStream_t stream = (cudaStream_t)(uintptr_t)0x5eed;

    /* ---- linear attention: prefill (B=2, T=3, H=2, Dk=4, Dv=5) on cuda:1 ---------------- */
    int64_t q4[4] = {2, 3, 2, 4}, v4[4] = {2, 3, 2, 5}, kv4[4] = {2, 2, 15, 5}, ks3[3] = {2, 2, 15}, b1[1] = {2};
    DLTensor q = cuda(0, 1, 4, q4, NULL, kDLBfloat, 16), k = cuda(1, 1, 4, q4, NULL, kDLBfloat, 16);
    DLTensor v = cuda(2, 1, 4, v4, NULL, kDLBfloat, 16), out = cuda(3, 1, 4, v4, NULL, kDLBfloat, 16);
    DLTensor kv = cuda(4, 1, 4, kv4, NULL, kDLFloat, 32), ksum = cuda(5, 1, 3, ks3, NULL, kDLFloat, 32);
    DLTensor tokens = cuda(6, 1, 1, b1, NULL, kDLInt, 64);
    q.byte_offset = 64;
    based_linear_attention_params lp = based_linear_attention_params_default(4);
    lp.stream = stream;
    lp.chunk_size = 32;
    CHECK(based_linear_attention_prefill(&q, &k, &v, &kv, &ksum, &tokens, &out, &lp) == BASED_STATUS_OK, "%s",
          based_last_error());
    CHECK(seen.calls == 1 && strcmp(seen.fn, "based_cuda_linear_attention_prefill") == 0, "reached %s", seen.fn);
    const based_linear_attention_args *la = &seen.linear;
    CHECK(seen.stream == stream, "stream %p", (void *)seen.stream);
    CHECK(la->phase == BASED_PHASE_PREFILL && la->device.kind == BASED_DEVICE_CUDA && la->device.id == 1,
          "phase %d, device %d:%d", (int)la->phase, (int)la->device.kind, (int)la->device.id);
    CHECK(la->q.data == device_address(0) + 64 && la->tokens.data == device_address(6), "data pointers");
    CHECK(same_strides(&la->q, 24, 8, 4, 1) && same_strides(&la->v, 30, 10, 5, 1), "q/v strides");
    CHECK(same_strides(&la->kv, 150, 75, 5, 1) && same_strides(&la->ksum, 30, 15, 1, 0), "state strides");
    CHECK(la->q.dtype == BASED_DTYPE_BFLOAT16 && la->q.itemsize == 2 && la->kv.dtype == BASED_DTYPE_FLOAT32,
          "dtypes");
    CHECK(la->batch == 2 && la->seqlen == 3 && la->heads == 2 && la->feature_dim == 4 && la->value_dim == 5 &&
              la->feature_count == 15,
          "sizes");
    CHECK(la->compute == BASED_DTYPE_FLOAT32 && la->scale == 0.5 && la->eps == 1e-6 && la->normalize == 1 &&
              la->chunk == 32,
          "settings");

    /* decode: (B, H, d) tensors seen as (B, 1, H, d); the CUDA side's status reaches the caller */
    int64_t q3[3] = {2, 2, 4}, v3[3] = {2, 2, 5};
    DLTensor dq = cuda(0, 1, 3, q3, NULL, kDLBfloat, 16), dk = cuda(1, 1, 3, q3, NULL, kDLBfloat, 16);
    DLTensor dv = cuda(2, 1, 3, v3, NULL, kDLBfloat, 16), dout = cuda(3, 1, 3, v3, NULL, kDLBfloat, 16);
    seen.answer = BASED_STATUS_CUDA_ERROR;
    CHECK(based_linear_attention_decode(&dq, &dk, &dv, &kv, &ksum, &tokens, &dout, &lp) == BASED_STATUS_CUDA_ERROR,
          "decode status");
    CHECK(strcmp(based_last_error(), "based_cuda_linear_attention_decode: answered by the test") == 0, "message %s",
          based_last_error());
    seen.answer = BASED_STATUS_OK;
    CHECK(seen.calls == 2 && strcmp(seen.fn, "based_cuda_linear_attention_decode") == 0, "reached %s", seen.fn);
    CHECK(la->phase == BASED_PHASE_DECODE && la->seqlen == 1 && same_strides(&la->q, 8, 0, 4, 1) &&
              same_strides(&la->out, 10, 0, 5, 1),
          "decode layout: seqlen %lld, q strides %lld %lld %lld %lld", (long long)la->seqlen,
          (long long)la->q.strides[0], (long long)la->q.strides[1], (long long)la->q.strides[2],
          (long long)la->q.strides[3]);

    /* refused in the checks, whatever the build */
    DLTensor q64 = q, k64 = k, v64 = v, out64 = out;
    q64.dtype.code = k64.dtype.code = v64.dtype.code = out64.dtype.code = kDLFloat;
    q64.dtype.bits = k64.dtype.bits = v64.dtype.bits = out64.dtype.bits = 64;
    CHECK_REFUSED(based_linear_attention_prefill(&q64, &k64, &v64, &kv, &ksum, &tokens, &out64, &lp),
                  BASED_STATUS_TYPE_ERROR,
                  "linear_attention_prefill: q is float64 on cuda:1; the CUDA kernels compute in float32, float16 and "
                  "bfloat16");
    int64_t v_strided[4] = {60, 20, 10, 2};
    DLTensor vs = v;
    vs.strides = v_strided;
    CHECK_REFUSED(based_linear_attention_prefill(&q, &k, &vs, &kv, &ksum, &tokens, &out, &lp),
                  BASED_STATUS_VALUE_ERROR,
                  "linear_attention_prefill: on CUDA, v must have unit stride along its last dim (of size 5), got "
                  "stride 2; pass .contiguous()");
    DLTensor other = out;
    other.device.device_id = 0;
    CHECK_REFUSED(based_linear_attention_prefill(&q, &k, &v, &kv, &ksum, &tokens, &other, &lp),
                  BASED_STATUS_VALUE_ERROR,
                  "out is on cuda:0 but q is on cuda:1: all tensors of one call must be on one device");
    CHECK_REFUSED(based_linear_attention_prefill_ref(&q, &k, &v, &kv, &ksum, &tokens, &out, &lp),
                  BASED_STATUS_NOT_IMPLEMENTED, "the reference twins run on the CPU");
    DLTensor rocm = q;
    rocm.device.device_type = kDLROCM;
    DLTensor rocm_all[7] = {rocm, k, v, kv, ksum, tokens, out};
    for (int i = 1; i < 7; i++) rocm_all[i].device = rocm.device;
    CHECK_REFUSED(based_linear_attention_prefill(&rocm_all[0], &rocm_all[1], &rocm_all[2], &rocm_all[3],
                                                 &rocm_all[4], &rocm_all[5], &rocm_all[6], &lp),
                  BASED_STATUS_VALUE_ERROR, "linear_attention_prefill: q is on device type 10 id 1; expected a CPU or "
                                            "CUDA tensor");

    /* ---- sliding window decode: GQA H=4 over Hkv=2, D=8, W=5 ------------------------- */
    int64_t wq3[3] = {2, 4, 8}, wk3[3] = {2, 2, 8}, cache4[4] = {2, 2, 5, 8};
    DLTensor wq = cuda(10, 0, 3, wq3, NULL, kDLFloat, 16), wk = cuda(11, 0, 3, wk3, NULL, kDLFloat, 16);
    DLTensor wv = cuda(12, 0, 3, wk3, NULL, kDLFloat, 16), wo = cuda(13, 0, 3, wq3, NULL, kDLFloat, 16);
    DLTensor kc = cuda(14, 0, 4, cache4, NULL, kDLFloat, 16), vc = cuda(15, 0, 4, cache4, NULL, kDLFloat, 16);
    DLTensor wtok = cuda(16, 0, 1, b1, NULL, kDLInt, 64);
    based_sliding_window_params wp = {5, 0.25, stream};
    CHECK(based_sliding_window_decode(&wq, &wk, &wv, &kc, &vc, &wtok, &wo, &wp) == BASED_STATUS_OK, "%s",
          based_last_error());
    const based_sliding_window_args *wa = &seen.window;
    CHECK(strcmp(seen.fn, "based_cuda_sliding_window_decode") == 0 && seen.stream == stream, "reached %s", seen.fn);
    CHECK(wa->phase == BASED_PHASE_DECODE && wa->device.kind == BASED_DEVICE_CUDA && wa->device.id == 0, "device");
    CHECK(same_strides(&wa->q, 32, 0, 8, 1) && same_strides(&wa->k, 16, 0, 8, 1) &&
              same_strides(&wa->k_cache, 80, 40, 8, 1),
          "window layout");
    CHECK(wa->batch == 2 && wa->seqlen == 1 && wa->heads == 4 && wa->kv_heads == 2 && wa->head_dim == 8 &&
              wa->window == 5 && wa->scale == 0.25,
          "window sizes");
    CHECK_REFUSED(based_sliding_window_decode_ref(&wq, &wk, &wv, &kc, &vc, &wtok, &wo, &wp),
                  BASED_STATUS_NOT_IMPLEMENTED,
                  "sliding_window_decode_ref: q is on cuda:0; the reference twins run on the CPU, so pass CPU tensors");

    /* ---- feature map and the linear state's layouts ---------------------------------- */
    int64_t x3[3] = {2, 3, 4}, phi3[3] = {2, 3, 15};
    DLTensor x = cuda(20, 0, 3, x3, NULL, kDLFloat, 32), phi = cuda(21, 0, 3, phi3, NULL, kDLFloat, 32);
    CHECK(based_taylor_feature_map(&x, &phi, 0.5, stream) == BASED_STATUS_OK, "%s", based_last_error());
    const based_feature_map_args *fa = &seen.feature_map;
    CHECK(strcmp(seen.fn, "based_cuda_taylor_feature_map") == 0 && seen.stream == stream, "reached %s", seen.fn);
    CHECK(fa->x == device_address(20) && fa->out == device_address(21) && fa->ndim == 3 && fa->rows == 6 &&
              fa->feature_dim == 4 && fa->feature_count == 15 && fa->out_strides[1] == 15 && fa->scale == 0.5,
          "feature map args");
    int64_t e4[4] = {2, 2, 21, 5}, e3[3] = {2, 2, 21};
    DLTensor kv_e = cuda(22, 1, 4, e4, NULL, kDLFloat, 32), ksum_e = cuda(23, 1, 3, e3, NULL, kDLFloat, 32);
    CHECK(based_linear_state_from_expanded(&kv_e, &ksum_e, &kv, &ksum, stream) == BASED_STATUS_OK, "%s",
          based_last_error());
    const based_linear_state_args *sa = &seen.linear_state;
    CHECK(strcmp(seen.fn, "based_cuda_linear_state_convert") == 0 && seen.stream == stream && sa->from_expanded == 1 &&
              sa->feature_count == 15 && sa->expanded_count == 21 && sa->device.id == 1 &&
              same_strides(&sa->ksum_exp, 42, 21, 1, 0),
          "linear state args");

    /* ---- state helpers: host batch indices, normalised; CUDA when either tensor is ------ */
    int64_t idx[2] = {-1, 0}, n2[1] = {2};
    DLTensor tidx;
    memset(&tidx, 0, sizeof tidx);
    tidx.data = idx;
    tidx.device.device_type = kDLCPU;
    tidx.ndim = 1;
    tidx.dtype.code = kDLInt;
    tidx.dtype.bits = 64;
    tidx.dtype.lanes = 1;
    tidx.shape = n2;
    CHECK(based_state_gather(&kv, &kv, &tidx, stream) == BASED_STATUS_OK, "%s", based_last_error());
    CHECK(strcmp(seen.fn, "based_cuda_state_gather") == 0 && seen.stream == stream && seen.state.n_indices == 2 &&
              seen.indices[0] == 1 &&
              seen.indices[1] == 0,
          "gather indices");
    CHECK(based_state_zero(&kv, NULL, stream) == BASED_STATUS_OK && strcmp(seen.fn, "based_cuda_state_zero") == 0 &&
              seen.stream == stream && seen.state.indices == NULL && seen.state.dst.numel == 300,
          "zero all: %s", based_last_error());
    static float host[2][2][15][5];
    DLTensor hkv = kv;
    hkv.data = host;
    hkv.device.device_type = kDLCPU;
    hkv.device.device_id = 0;
    CHECK(based_state_copy(&hkv, &kv, stream) == BASED_STATUS_OK, "%s", based_last_error());
    CHECK(strcmp(seen.fn, "based_cuda_state_copy") == 0 && seen.stream == stream &&
              seen.state.dst.device.kind == BASED_DEVICE_CPU &&
              seen.state.src.device.kind == BASED_DEVICE_CUDA && seen.state.src.device.id == 1 &&
              seen.state.dst.data == (char *)host,
          "copy to the host goes to CUDA");
    DLTensor kv64 = kv;
    kv64.dtype.bits = 64;
    CHECK(based_state_copy(&kv64, &hkv, NULL) == BASED_STATUS_OK && seen.state.dst.dtype == BASED_DTYPE_FLOAT64,
          "the state helpers move float64 too: %s", based_last_error());

    /* ---- CUDA memory for based.Buffer: the runtime's errors as a status and a message ---- */
    void *ptr = &failures;
    CHECK(based_cuda_malloc_zeroed(&ptr, 64, 1) == BASED_STATUS_CUDA_ERROR && ptr == NULL, "malloc");
    CHECK(strcmp(based_last_error(), "based: cannot allocate 64 bytes on cuda:1: no CUDA-capable device is detected") ==
              0,
          "message %s", based_last_error());
    runtime_error = 2; /* cudaErrorMemoryAllocation */
    CHECK(based_cuda_malloc_zeroed(&ptr, 1 << 20, 0) == BASED_STATUS_OUT_OF_MEMORY, "%s", based_last_error());
    CHECK(based_built_with_cuda() == 1 && strcmp(based_cuda_archs(), "") == 0, "built with CUDA, no archs macro");

    if (failures == 0) printf("test_cuda_dispatch: all checks passed (%d CUDA calls)\n", seen.calls);
    return failures != 0;
}
