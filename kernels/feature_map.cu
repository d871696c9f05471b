// feature_map.cu -- the Taylor feature map on CUDA (SPEC 1.1), compact order:
//   phi(x) = [1, sqrt(scale) x_i (i < Dk), scale/sqrt(2) x_i^2 (i == j), scale x_i x_j (i < j)]
// for x (..., Dk) -> out (..., F), F = 1 + Dk + Dk(Dk+1)/2, any leading dims and strides.
//
// One thread per output element, consecutive threads on consecutive features of a row, so
// the writes (F times the reads) are coalesced; the few x values of a row come through L1.
// Computed in float32 with the CPU's constants and operation order (csrc/feature_map.c),
// so both backends give the same bits; written in x's dtype (round to nearest even).
#include <math.h>

#include "strided.cuh"

namespace {

struct FeatureMapArgs {
    const char *x;
    char *out;
    based::PairWalk lead;        // the leading axes: a = out's strides, b = x's
    int64_t x_step, out_step;    // strides along Dk (x) and F (out)
    int64_t dk, features;        // Dk, F
    float c1, c2, c3;            // sqrt(scale), scale/sqrt(2), scale
};

template <typename T>
__host__ __device__ inline void feature_map_element(const FeatureMapArgs &a, int64_t e) {
    const int64_t row = e / a.features, f = e - row * a.features;
    int64_t oo, xo;
    based::pair_offsets(a.lead, row, &oo, &xo);
    const T *x = reinterpret_cast<const T *>(a.x) + xo;
    float v;
    if (f == 0) {
        v = 1.0f;
    } else if (f <= a.dk) {
        v = a.c1 * based::hd::to_f32(x[(f - 1) * a.x_step]);
    } else {
        int64_t i, j;
        based::triangle_pair(f - 1 - a.dk, a.dk, &i, &j);
        const float xi = based::hd::to_f32(x[i * a.x_step]);
        v = i == j ? (a.c2 * xi) * xi : (a.c3 * xi) * based::hd::to_f32(x[j * a.x_step]);
    }
    reinterpret_cast<T *>(a.out)[oo + f * a.out_step] = based::hd::from_f32<T>(v);
}

template <typename T>
struct FeatureMapBody {
    FeatureMapArgs a;
    __host__ __device__ void operator()(int32_t, int64_t e) const { feature_map_element<T>(a, e); }
};

}  // namespace

extern "C" based_status based_cuda_taylor_feature_map(const based_feature_map_args *args, cudaStream_t stream) {
    const char *op = "taylor_feature_map";
    const int32_t last = args->ndim - 1;
    FeatureMapArgs a{};
    a.x = args->x;
    a.out = args->out;
    int64_t rows;
    a.lead = based::collapse_axes(last, args->shape, args->out_strides, args->x_strides, 0, &rows);
    a.x_step = args->x_strides[last];
    a.out_step = args->out_strides[last];
    a.dk = args->feature_dim;
    a.features = args->feature_count;
    const float scale = (float)args->scale;  // the CPU's float32 constants, bit for bit
    a.c1 = sqrtf(scale);
    a.c2 = scale / sqrtf(2.0f);
    a.c3 = scale;
    const int64_t total = rows * a.features;
    if (total == 0) return BASED_STATUS_OK;
    if (args->device.kind != BASED_DEVICE_CUDA)
        return based_fail(BASED_STATUS_INTERNAL_ERROR, "%s: a host tensor reached the CUDA kernel", op);
    BASED_CUDA_DEVICE(args->device.id, op);
    return based::dispatch_float(args->dtype, op, [&](auto tag) {
        return based::launch_elements(FeatureMapBody<decltype(tag)>{a}, total, 1, stream, op);
    });
}
