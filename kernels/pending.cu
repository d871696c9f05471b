// pending.cu -- the ops of based_cuda.h whose CUDA kernels are not in this tree yet, so that
// a CUDA build links and imports. Each answers a call that passed the C core's checks with
// BASED_STATUS_NOT_IMPLEMENTED, before touching the device. Delete a function here when its
// kernel file (named above its declaration in based_cuda.h) lands, and this file with the last.
#include "based_cuda.h"

namespace {

based_status pending(const char *op) {
    return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "%s: the CUDA kernel is not in this build yet", op);
}

}  // namespace

extern "C" based_status based_cuda_linear_attention_prefill(const based_linear_attention_args *, cudaStream_t) {
    return pending("linear_attention_prefill");
}

extern "C" based_status based_cuda_linear_attention_decode(const based_linear_attention_args *, cudaStream_t) {
    return pending("linear_attention_decode");
}

extern "C" based_status based_cuda_sliding_window_prefill(const based_sliding_window_args *, cudaStream_t) {
    return pending("sliding_window_prefill");
}

extern "C" based_status based_cuda_sliding_window_decode(const based_sliding_window_args *, cudaStream_t) {
    return pending("sliding_window_decode");
}

