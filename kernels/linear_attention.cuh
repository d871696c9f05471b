// linear_attention.cuh -- what the two CUDA linear-attention files share.
#ifndef BASED_LINEAR_ATTENTION_CUH
#define BASED_LINEAR_ATTENTION_CUH

#include "common.cuh"

namespace based {

// tokens[b] += n for every sequence b < batch: the launch of a call with H == 0 (the
// attention kernels advance the counters themselves otherwise).
static __global__ void tokens_add_kernel(based_tensor tokens, int64_t batch, int64_t n) {
    const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (b < batch) reinterpret_cast<int64_t *>(tokens.data)[b * tokens.strides[0]] += n;
}

}  // namespace based

#endif  // BASED_LINEAR_ATTENTION_CUH
