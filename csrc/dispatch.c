/*
 * dispatch.c -- every public entry point of based.h that runs an op, in one shape:
 *
 *   1. the op's check (csrc/<op>.c, ops.h): every check of SPEC 4, the same for both
 *      backends, so that the CPU and CUDA refuse exactly the same calls with the same
 *      messages; nothing is written before it passes;
 *   2. the device of the checked arguments picks the backend: CUDA tensors run
 *      based_cuda_<op>_<phase>(&args, stream) (kernels/based_cuda.h), anything else
 *      based_cpu_<op>_<phase>(&args) (csrc/<op>.c).
 *
 * The reference twins (_ref) run on the CPU only. A build without nvcc (no BASED_WITH_CUDA)
 * answers CUDA tensors with NOT_IMPLEMENTED once they have passed the checks. Also here:
 * based_cpu_kernel_isa, which CPU kernels an op runs.
 */
#include "internal.h"
#include "linear_attention.h"
#include "ops.h"
#include "sliding_window.h"

#include "../kernels/based_cuda.h"

/* ON_CUDA(call, ...): the CUDA function of an op, or, in a build without it, the
 * NOT_IMPLEMENTED of no_cuda() (call is then compiled, for its types, but neither run nor
 * linked). `name` is the op's first tensor on CUDA, for the message. */
#ifdef BASED_WITH_CUDA
#define ON_CUDA(call, op, name, device) ((void)(op), (void)(name), (call))
#else
#define ON_CUDA(call, op, name, device) ((void)sizeof(call), no_cuda(op, name, device))

static based_status no_cuda(const char *op, const char *name, based_device device) {
    return based_fail(BASED_STATUS_NOT_IMPLEMENTED,
                      "%s: %s is on cuda:%d, and this build of based has no CUDA kernel for %s (it was built without "
                      "nvcc); use CPU tensors",
                      op, name, (int)device.id, op);
}
#endif

/* based.h: the CPU kernels of the ops that pick theirs at run time. */
const char *based_cpu_kernel_isa(const char *op) {
    if (op != NULL && strcmp(op, "linear_attention") == 0) return based_lin_kernels_pick()->name;
    if (op != NULL && strcmp(op, "sliding_window") == 0) return based_window_kernel_isa();
    return NULL;
}

static based_status ref_on_cuda(const char *op, const char *name, based_device device) {
    return based_fail(BASED_STATUS_NOT_IMPLEMENTED,
                      "%s: %s is on cuda:%d; the reference twins run on the CPU, so pass CPU tensors", op, name,
                      (int)device.id);
}

/* ---- taylor_feature_map -------------------------------------------------------------- */

based_status based_taylor_feature_map(const DLTensor *x, DLTensor *out, double scale, void *stream) {
    static const char op[] = "taylor_feature_map";
    based_feature_map_args a;
    BASED_TRY(based_taylor_feature_map_check(&a, x, out, scale));
    return a.device.kind == BASED_DEVICE_CUDA
               ? ON_CUDA(based_cuda_taylor_feature_map(&a, (cudaStream_t)stream), op, "x", a.device)
               : based_cpu_taylor_feature_map(&a);
}

/* ---- linear_attention ---------------------------------------------------------------- */

based_status based_linear_attention_prefill(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                            DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                            const based_linear_attention_params *params) {
    static const char op[] = "linear_attention_prefill";
    based_linear_attention_args a;
    BASED_TRY(based_linear_attention_check(&a, q, k, v, kv, ksum, tokens, out, params, BASED_PHASE_PREFILL, op));
    return a.device.kind == BASED_DEVICE_CUDA
               ? ON_CUDA(based_cuda_linear_attention_prefill(&a, (cudaStream_t)params->stream), op, "q", a.device)
               : based_cpu_linear_attention_prefill(&a);
}

based_status based_linear_attention_decode(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                           DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                           const based_linear_attention_params *params) {
    static const char op[] = "linear_attention_decode";
    based_linear_attention_args a;
    BASED_TRY(based_linear_attention_check(&a, q, k, v, kv, ksum, tokens, out, params, BASED_PHASE_DECODE, op));
    return a.device.kind == BASED_DEVICE_CUDA
               ? ON_CUDA(based_cuda_linear_attention_decode(&a, (cudaStream_t)params->stream), op, "q", a.device)
               : based_cpu_linear_attention_decode(&a);
}

based_status based_linear_attention_prefill_ref(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                                DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                                const based_linear_attention_params *params) {
    static const char op[] = "linear_attention_prefill_ref";
    based_linear_attention_args a;
    BASED_TRY(based_linear_attention_check(&a, q, k, v, kv, ksum, tokens, out, params, BASED_PHASE_PREFILL, op));
    return a.device.kind == BASED_DEVICE_CUDA ? ref_on_cuda(op, "q", a.device)
                                              : based_cpu_linear_attention_prefill_ref(&a);
}

based_status based_linear_attention_decode_ref(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                               DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                               const based_linear_attention_params *params) {
    static const char op[] = "linear_attention_decode_ref";
    based_linear_attention_args a;
    BASED_TRY(based_linear_attention_check(&a, q, k, v, kv, ksum, tokens, out, params, BASED_PHASE_DECODE, op));
    return a.device.kind == BASED_DEVICE_CUDA ? ref_on_cuda(op, "q", a.device)
                                              : based_cpu_linear_attention_decode_ref(&a);
}

/* ---- linear_state -------------------------------------------------------------------- */

based_status based_linear_state_to_expanded(const DLTensor *kv, const DLTensor *ksum, DLTensor *kv_exp,
                                            DLTensor *ksum_exp, void *stream) {
    static const char op[] = "linear_state_to_expanded";
    based_linear_state_args a;
    BASED_TRY(based_linear_state_check(&a, kv, ksum, kv_exp, ksum_exp, 0, op));
    return a.device.kind == BASED_DEVICE_CUDA
               ? ON_CUDA(based_cuda_linear_state_convert(&a, (cudaStream_t)stream), op, "kv", a.device)
               : based_cpu_linear_state_convert(&a);
}

based_status based_linear_state_from_expanded(const DLTensor *kv_exp, const DLTensor *ksum_exp, DLTensor *kv,
                                              DLTensor *ksum, void *stream) {
    static const char op[] = "linear_state_from_expanded";
    based_linear_state_args a;
    BASED_TRY(based_linear_state_check(&a, kv, ksum, kv_exp, ksum_exp, 1, op));
    return a.device.kind == BASED_DEVICE_CUDA
               ? ON_CUDA(based_cuda_linear_state_convert(&a, (cudaStream_t)stream), op, "kv", a.device)
               : based_cpu_linear_state_convert(&a);
}

/* ---- sliding_window ------------------------------------------------------------------ */

based_status based_sliding_window_prefill(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                          DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                          const based_sliding_window_params *params) {
    static const char op[] = "sliding_window_prefill";
    based_sliding_window_args a;
    BASED_TRY(based_sliding_window_check(&a, q, k, v, k_cache, v_cache, tokens, out, params, BASED_PHASE_PREFILL, op));
    return a.device.kind == BASED_DEVICE_CUDA
               ? ON_CUDA(based_cuda_sliding_window_prefill(&a, (cudaStream_t)params->stream), op, "q", a.device)
               : based_cpu_sliding_window_prefill(&a);
}

based_status based_sliding_window_decode(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                         DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                         const based_sliding_window_params *params) {
    static const char op[] = "sliding_window_decode";
    based_sliding_window_args a;
    BASED_TRY(based_sliding_window_check(&a, q, k, v, k_cache, v_cache, tokens, out, params, BASED_PHASE_DECODE, op));
    return a.device.kind == BASED_DEVICE_CUDA
               ? ON_CUDA(based_cuda_sliding_window_decode(&a, (cudaStream_t)params->stream), op, "q", a.device)
               : based_cpu_sliding_window_decode(&a);
}

based_status based_sliding_window_prefill_ref(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                              DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                              const based_sliding_window_params *params) {
    static const char op[] = "sliding_window_prefill_ref";
    based_sliding_window_args a;
    BASED_TRY(based_sliding_window_check(&a, q, k, v, k_cache, v_cache, tokens, out, params, BASED_PHASE_PREFILL, op));
    return a.device.kind == BASED_DEVICE_CUDA ? ref_on_cuda(op, "q", a.device)
                                              : based_cpu_sliding_window_prefill_ref(&a);
}

based_status based_sliding_window_decode_ref(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                             DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                             const based_sliding_window_params *params) {
    static const char op[] = "sliding_window_decode_ref";
    based_sliding_window_args a;
    BASED_TRY(based_sliding_window_check(&a, q, k, v, k_cache, v_cache, tokens, out, params, BASED_PHASE_DECODE, op));
    return a.device.kind == BASED_DEVICE_CUDA ? ref_on_cuda(op, "q", a.device)
                                              : based_cpu_sliding_window_decode_ref(&a);
}

/* ---- state helpers: on CUDA when either tensor is (a copy between devices is the CUDA
 * side's to stage); the batch indices are freed whatever the backend did ----------------- */

/* The tensor of a state call that is on CUDA (dst first), for messages. */
static const char *cuda_side(const based_state_args *a, based_device *device) {
    const int dst = a->dst.device.kind == BASED_DEVICE_CUDA;
    *device = dst ? a->dst.device : a->src.device;
    return dst ? "dst" : "src";
}

based_status based_state_zero(DLTensor *t, const DLTensor *batch_indices, void *stream) {
    based_state_args a;
    BASED_TRY(based_state_zero_check(&a, t, batch_indices));
    const cudaStream_t s = (cudaStream_t)stream;
    const based_status st = a.dst.device.kind == BASED_DEVICE_CUDA
                                ? ON_CUDA(based_cuda_state_zero(&a, s), "reset", "state", a.dst.device)
                                : based_cpu_state_zero(&a);
    based_state_args_free(&a);
    return st;
}

based_status based_state_copy(DLTensor *dst, const DLTensor *src, void *stream) {
    based_state_args a;
    BASED_TRY(based_state_copy_check(&a, dst, src));
    based_device device;
    const char *name = cuda_side(&a, &device);
    const cudaStream_t s = (cudaStream_t)stream;
    const based_status st = device.kind == BASED_DEVICE_CUDA
                                ? ON_CUDA(based_cuda_state_copy(&a, s), "copy_", name, device)
                                : based_cpu_state_copy(&a);
    based_state_args_free(&a);
    return st;
}

based_status based_state_gather(DLTensor *dst, const DLTensor *src, const DLTensor *indices, void *stream) {
    based_state_args a;
    BASED_TRY(based_state_gather_check(&a, dst, src, indices));
    based_device device;
    const char *name = cuda_side(&a, &device);
    const cudaStream_t s = (cudaStream_t)stream;
    const based_status st = device.kind == BASED_DEVICE_CUDA
                                ? ON_CUDA(based_cuda_state_gather(&a, s), "index_select", name, device)
                                : based_cpu_state_gather(&a);
    based_state_args_free(&a);
    return st;
}
