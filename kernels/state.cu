// state.cu -- the state helpers on CUDA: zero rows, copy, gather rows along axis 0 (any
// dtype, any strides, ndim <= 16), and the linear state's layout conversion between the
// compact (F rows) and the paper code's expanded (1 + Dk + Dk^2 rows) order.
//
// These run outside the decode loop (resets, beam reordering, checkpoints), so they are
// written for clarity and robustness: one strided element-wise kernel, coalesced along
// the innermost axis after merging the axes both tensors lay out densely. A copy between
// devices (host <-> GPU, or two GPUs) is staged through the host and synchronises; every
// other path is asynchronous on the caller's stream.
#include <stdlib.h>
#include <string.h>

#include "strided.cuh"

namespace {

using based::PairWalk;

// Row indices travel to the kernel by value (2 KiB of its parameters); more rows take
// more launches of this many each.
constexpr int kRowsPerLaunch = 256;

// Which rows of dst and src the launch's gridDim.y rows y = 0..count-1 address: dst row
// index[y] or base + y, likewise src. The identity copy of whole tensors collapses the
// batch axis into the walk and uses one row with zero row strides.
struct Rows {
    int64_t dst_row_stride, src_row_stride;
    int64_t base;
    int32_t count;
    int32_t dst_indexed, src_indexed;
    int64_t index[kRowsPerLaunch];
};

// ---- element operations: dst[di] = f(src[si]) --------------------------------------------

template <typename W>
struct ZeroOp {
    __host__ __device__ static void apply(char *dst, int64_t di, const char *, int64_t) {
        reinterpret_cast<W *>(dst)[di] = W(0);
    }
};

template <typename W>
struct MoveOp {  // the same dtype: the element's bytes
    __host__ __device__ static void apply(char *dst, int64_t di, const char *src, int64_t si) {
        reinterpret_cast<W *>(dst)[di] = reinterpret_cast<const W *>(src)[si];
    }
};

template <typename D, typename S>
struct ConvertOp {  // float dtypes: round to nearest even, as the C core does
    __host__ __device__ static void apply(char *dst, int64_t di, const char *src, int64_t si) {
        reinterpret_cast<D *>(dst)[di] = based::hd::convert<D>(reinterpret_cast<const S *>(src)[si]);
    }
};

// Element e of launch row y (the walk w: a = dst, b = src, over one row).
template <typename Op>
__host__ __device__ inline void walk_element(const PairWalk &w, const Rows &r, int32_t y, int64_t e, char *dst,
                                             const char *src) {
    const int64_t drow = r.dst_indexed ? r.index[y] : r.base + y;
    const int64_t srow = r.src_indexed ? r.index[y] : r.base + y;
    int64_t di, si;
    based::pair_offsets(w, e, &di, &si);
    Op::apply(dst, drow * r.dst_row_stride + di, src, srow * r.src_row_stride + si);
}

template <typename Op>
struct WalkBody {
    PairWalk w;
    Rows r;
    char *dst;
    const char *src;
    __host__ __device__ void operator()(int32_t y, int64_t e) const { walk_element<Op>(w, r, y, e, dst, src); }
};

// ---- dtype dispatch ---------------------------------------------------------------------

template <typename Op>
struct Tag {
    using type = Op;
};

// Runs fn(value of the element type) for a float dtype; int64 never converts (checked).
template <typename F>
based_status dispatch_float_any(based_dtype dtype, const char *op, F &&fn) {
    switch (dtype) {
    case BASED_DTYPE_FLOAT32: return fn(float{});
    case BASED_DTYPE_FLOAT64: return fn(double{});
    case BASED_DTYPE_FLOAT16: return fn(__half{});
    case BASED_DTYPE_BFLOAT16: return fn(__nv_bfloat16{});
    default:
        return based_fail(BASED_STATUS_INTERNAL_ERROR, "%s: a conversion from or to dtype %d reached the CUDA kernel",
                          op, (int)dtype);
    }
}

// Runs fn(Tag<Op>{}) for the element operation that writes dst: zeros, the same dtype's
// bytes, or a float conversion.
template <typename F>
based_status dispatch_op(bool zero, based_dtype dd, int32_t dsize, based_dtype sd, const char *op, F &&fn) {
    if (zero || dd == sd) {
        switch (dsize) {
        case 2: return zero ? fn(Tag<ZeroOp<uint16_t>>{}) : fn(Tag<MoveOp<uint16_t>>{});
        case 4: return zero ? fn(Tag<ZeroOp<uint32_t>>{}) : fn(Tag<MoveOp<uint32_t>>{});
        case 8: return zero ? fn(Tag<ZeroOp<uint64_t>>{}) : fn(Tag<MoveOp<uint64_t>>{});
        default:
            return based_fail(BASED_STATUS_INTERNAL_ERROR, "%s: element size %d reached the CUDA kernel", op,
                              (int)dsize);
        }
    }
    return dispatch_float_any(dd, op, [&](auto d) {
        return dispatch_float_any(sd, op, [&](auto s) { return fn(Tag<ConvertOp<decltype(d), decltype(s)>>{}); });
    });
}

// One launch of the walk over r.count rows of row_numel elements each.
based_status launch_walk(bool zero, based_dtype dd, int32_t dsize, based_dtype sd, const PairWalk &w,
                         int64_t row_numel, const Rows &r, char *dst, const char *src, cudaStream_t stream,
                         const char *op) {
    return dispatch_op(zero, dd, dsize, sd, op, [&](auto tag) {
        using Op = typename decltype(tag)::type;
        return based::launch_elements(WalkBody<Op>{w, r, dst, src}, row_numel, r.count, stream, op);
    });
}

// Row-major element strides of `shape`.
void dense_strides(int32_t ndim, const int64_t *shape, int64_t *st) {
    int64_t s = 1;
    for (int32_t d = ndim - 1; d >= 0; d--) {
        st[d] = s;
        s *= shape[d] > 0 ? shape[d] : 1;
    }
}

bool tensor_is_dense(const based_state_tensor &t) {
    int64_t n;
    return based::is_dense(based::collapse_axes(t.ndim, t.shape, t.strides, t.strides, 0, &n));
}

// Byte ranges of the two tensors intersect (a conservative test for "dst may be src").
bool may_overlap(const based_state_tensor &a, const based_state_tensor &b) {
    if (a.numel == 0 || b.numel == 0) return false;
    auto range = [](const based_state_tensor &t, intptr_t *lo, intptr_t *hi) {
        int64_t l = 0, h = 0;
        for (int32_t d = 0; d < t.ndim; d++) {
            const int64_t span = (t.shape[d] - 1) * t.strides[d];
            (span < 0 ? l : h) += span;
        }
        *lo = (intptr_t)t.data + (intptr_t)(l * t.itemsize);
        *hi = (intptr_t)t.data + (intptr_t)((h + 1) * t.itemsize);
    };
    intptr_t alo, ahi, blo, bhi;
    range(a, &alo, &ahi);
    range(b, &blo, &bhi);
    return alo < bhi && blo < ahi;
}

bool same_device(const based_device &a, const based_device &b) {
    return a.kind == b.kind && (a.kind != BASED_DEVICE_CUDA || a.id == b.id);
}

// dst[...] = src[...] (or zeros) over whole tensors of one shape on the current device:
// one cudaMemsetAsync / cudaMemcpyAsync when both are dense, else one kernel.
based_status whole_tensor(bool zero, const based_state_tensor &dst, const char *src_data, based_dtype src_dtype,
                          const int64_t *src_strides, cudaStream_t stream, const char *op) {
    int64_t n;
    const PairWalk w = based::collapse_axes(dst.ndim, dst.shape, dst.strides, zero ? nullptr : src_strides, 0, &n);
    if (n == 0) return BASED_STATUS_OK;
    if (based::is_dense(w) && (zero || src_dtype == dst.dtype)) {
        const size_t bytes = (size_t)n * (size_t)dst.itemsize;
        const cudaError_t err = zero ? cudaMemsetAsync(dst.data, 0, bytes, stream)
                                     : cudaMemcpyAsync(dst.data, src_data, bytes, cudaMemcpyDeviceToDevice, stream);
        return err == cudaSuccess ? BASED_STATUS_OK
                                  : based::cuda_fail(err, op, zero ? "cudaMemsetAsync" : "cudaMemcpyAsync");
    }
    Rows r{};
    r.count = 1;
    return launch_walk(zero, dst.dtype, dst.itemsize, src_dtype, w, n, r, dst.data, src_data, stream, op);
}

// Rows along axis 0: zero (dst row index[i]) or gather (dst row i = src row index[i]), in
// launches of kRowsPerLaunch rows.
based_status indexed_rows(bool zero, const based_state_tensor &dst, const char *src_data, based_dtype src_dtype,
                          const int64_t *src_strides, const int64_t *index, int64_t n, cudaStream_t stream,
                          const char *op) {
    int64_t row_numel;
    const PairWalk w = based::collapse_axes(dst.ndim, dst.shape, dst.strides, zero ? nullptr : src_strides, 1,
                                            &row_numel);
    if (row_numel == 0 || n == 0) return BASED_STATUS_OK;
    Rows r{};
    r.dst_row_stride = dst.strides[0];
    r.src_row_stride = zero ? 0 : src_strides[0];
    r.dst_indexed = zero ? 1 : 0;
    r.src_indexed = zero ? 0 : 1;
    for (int64_t first = 0; first < n; first += kRowsPerLaunch) {
        const int64_t count = n - first < kRowsPerLaunch ? n - first : kRowsPerLaunch;
        r.base = first;
        r.count = (int32_t)count;
        memcpy(r.index, index + first, (size_t)count * sizeof(int64_t));
        const based_status st = launch_walk(zero, dst.dtype, dst.itemsize, src_dtype, w, row_numel, r, dst.data,
                                            src_data, stream, op);
        if (st != BASED_STATUS_OK) return st;
    }
    return BASED_STATUS_OK;
}


// ---- copies between devices, staged through the host ------------------------------------

// The stream for work on `device` (current): the caller's when it belongs to that device or
// is a handle valid on every device (NULL, cudaStreamLegacy, cudaStreamPerThread); else the
// legacy default stream after a device synchronise, so that work queued on the tensor's
// device is finished before the copy touches it (a copy across devices synchronises anyway).
cudaError_t stream_for(int device, cudaStream_t stream, cudaStream_t *out) {
    *out = stream;
    if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread) return cudaSuccess;
    int owner = -1;
    const cudaError_t err = cudaStreamGetDevice(stream, &owner);
    if (err != cudaSuccess) return err;
    if (owner == device) return cudaSuccess;
    *out = nullptr;
    return cudaDeviceSynchronize();
}

// dst[...] = src[...] for host tensors of one shape, with the kernels' element code.
based_status host_copy(char *dst, based_dtype dd, int32_t dsize, const int64_t *dst_st, const char *src,
                       based_dtype sd, const int64_t *src_st, int32_t ndim, const int64_t *shape, const char *op) {
    int64_t n;
    const PairWalk w = based::collapse_axes(ndim, shape, dst_st, src_st, 0, &n);
    if (n == 0) return BASED_STATUS_OK;
    if (dd == sd && based::is_dense(w)) {
        memcpy(dst, src, (size_t)n * (size_t)dsize);
        return BASED_STATUS_OK;
    }
    Rows r{};
    r.count = 1;
    return dispatch_op(false, dd, dsize, sd, op, [&](auto tag) {
        const WalkBody<typename decltype(tag)::type> body{w, r, dst, src};
        for (int64_t e = 0; e < n; e++) body(0, e);
        return BASED_STATUS_OK;
    });
}

// A dense (row-major) view of t's shape and dtype at `data`.
based_state_tensor dense_like(const based_state_tensor &t, char *data) {
    based_state_tensor d = t;
    d.data = data;
    dense_strides(t.ndim, t.shape, d.strides);
    return d;
}

// src (on a GPU) -> `host`, a dense buffer of src's dtype; finished when this returns.
based_status download(const based_state_tensor &src, void *host, cudaStream_t stream, const char *op) {
    BASED_CUDA_DEVICE(src.device.id, op);
    cudaStream_t s;
    cudaError_t err = stream_for(src.device.id, stream, &s);
    if (err != cudaSuccess) return based::cuda_fail(err, op, "picking the stream of the device-to-host copy");
    const size_t bytes = (size_t)src.numel * (size_t)src.itemsize;
    const char *from = src.data;
    char *packed = nullptr;
    based_status st = BASED_STATUS_OK;
    if (!tensor_is_dense(src)) {  // gather the strided tensor into a dense device buffer first
        err = cudaMallocAsync(reinterpret_cast<void **>(&packed), bytes, s);
        if (err != cudaSuccess) return based::cuda_fail(err, op, "cudaMallocAsync (staging buffer)");
        st = whole_tensor(false, dense_like(src, packed), src.data, src.dtype, src.strides, s, op);
        from = packed;
    }
    if (st == BASED_STATUS_OK && (err = cudaMemcpyAsync(host, from, bytes, cudaMemcpyDeviceToHost, s)) != cudaSuccess)
        st = based::cuda_fail(err, op, "cudaMemcpyAsync (device to host)");
    if (packed != nullptr && (err = cudaFreeAsync(packed, s)) != cudaSuccess && st == BASED_STATUS_OK)
        st = based::cuda_fail(err, op, "cudaFreeAsync (staging buffer)");
    if ((err = cudaStreamSynchronize(s)) != cudaSuccess && st == BASED_STATUS_OK)
        st = based::cuda_fail(err, op, "cudaStreamSynchronize");
    return st;
}

// `host`, a dense buffer of dst's dtype -> dst (on a GPU); finished when this returns.
based_status upload(const based_state_tensor &dst, const void *host, cudaStream_t stream, const char *op) {
    BASED_CUDA_DEVICE(dst.device.id, op);
    cudaStream_t s;
    cudaError_t err = stream_for(dst.device.id, stream, &s);
    if (err != cudaSuccess) return based::cuda_fail(err, op, "picking the stream of the host-to-device copy");
    const size_t bytes = (size_t)dst.numel * (size_t)dst.itemsize;
    based_status st = BASED_STATUS_OK;
    if (tensor_is_dense(dst)) {
        if ((err = cudaMemcpyAsync(dst.data, host, bytes, cudaMemcpyHostToDevice, s)) != cudaSuccess)
            st = based::cuda_fail(err, op, "cudaMemcpyAsync (host to device)");
    } else {  // into a dense device buffer, then scatter into the strided tensor
        char *packed = nullptr;
        err = cudaMallocAsync(reinterpret_cast<void **>(&packed), bytes, s);
        if (err != cudaSuccess) return based::cuda_fail(err, op, "cudaMallocAsync (staging buffer)");
        if ((err = cudaMemcpyAsync(packed, host, bytes, cudaMemcpyHostToDevice, s)) != cudaSuccess)
            st = based::cuda_fail(err, op, "cudaMemcpyAsync (host to device)");
        if (st == BASED_STATUS_OK) {
            const based_state_tensor d = dense_like(dst, packed);
            st = whole_tensor(false, dst, packed, dst.dtype, d.strides, s, op);
        }
        if ((err = cudaFreeAsync(packed, s)) != cudaSuccess && st == BASED_STATUS_OK)
            st = based::cuda_fail(err, op, "cudaFreeAsync (staging buffer)");
    }
    if ((err = cudaStreamSynchronize(s)) != cudaSuccess && st == BASED_STATUS_OK)
        st = based::cuda_fail(err, op, "cudaStreamSynchronize");
    return st;
}

// dst[...] = src[...] with dst and src on different devices (host <-> GPU, or two GPUs):
// GPU data comes to the host densely in its own dtype; the host converts into dst's dtype
// and layout (a host dst) or into a dense buffer of dst's dtype that goes up to dst.
based_status copy_across(const based_state_tensor &dst, const based_state_tensor &src, cudaStream_t stream,
                         const char *op) {
    const bool src_gpu = src.device.kind == BASED_DEVICE_CUDA, dst_gpu = dst.device.kind == BASED_DEVICE_CUDA;
    const int64_t n = dst.numel;
    int64_t dense_st[BASED_ARGS_MAX_NDIM];
    dense_strides(dst.ndim, dst.shape, dense_st);
    if (src_gpu && !dst_gpu && dst.dtype == src.dtype && tensor_is_dense(dst))
        return download(src, dst.data, stream, op);  // straight into dst
    char *src_stage = nullptr, *dst_stage = nullptr;
    const char *hsrc = src.data;
    const int64_t *hsrc_st = src.strides;
    bool hsrc_dense = tensor_is_dense(src);
    based_status st = BASED_STATUS_OK;
    if (src_gpu) {
        src_stage = static_cast<char *>(malloc((size_t)n * (size_t)src.itemsize));
        if (src_stage == nullptr)
            return based_fail(BASED_STATUS_OUT_OF_MEMORY, "%s: out of memory for a %lld-byte host staging buffer", op,
                              (long long)(n * src.itemsize));
        st = download(src, src_stage, stream, op);
        hsrc = src_stage;
        hsrc_st = dense_st;
        hsrc_dense = true;
    }
    if (st == BASED_STATUS_OK && !dst_gpu) {
        st = host_copy(dst.data, dst.dtype, dst.itemsize, dst.strides, hsrc, src.dtype, hsrc_st, dst.ndim, dst.shape,
                       op);
    } else if (st == BASED_STATUS_OK) {
        const char *up = hsrc;
        if (!(hsrc_dense && src.dtype == dst.dtype)) {
            dst_stage = static_cast<char *>(malloc((size_t)n * (size_t)dst.itemsize));
            if (dst_stage == nullptr)
                st = based_fail(BASED_STATUS_OUT_OF_MEMORY, "%s: out of memory for a %lld-byte host staging buffer",
                                op, (long long)(n * dst.itemsize));
            else
                st = host_copy(dst_stage, dst.dtype, dst.itemsize, dense_st, hsrc, src.dtype, hsrc_st, dst.ndim,
                               dst.shape, op);
            up = dst_stage;
        }
        if (st == BASED_STATUS_OK) st = upload(dst, up, stream, op);
    }
    free(src_stage);
    free(dst_stage);
    return st;
}

// dst[i] = src[index[i]]: straight when they share no memory, else through a dense
// device buffer (an in-place reorder).
based_status gather_rows(const based_state_tensor &dst, const based_state_tensor &src, const int64_t *index,
                         int64_t n, cudaStream_t stream, const char *op) {
    if (!may_overlap(dst, src)) return indexed_rows(false, dst, src.data, src.dtype, src.strides, index, n, stream, op);
    based_state_tensor staged = dense_like(dst, nullptr);
    staged.dtype = src.dtype;
    staged.itemsize = src.itemsize;
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void **>(&staged.data),
                                      (size_t)dst.numel * (size_t)src.itemsize, stream);
    if (err != cudaSuccess) return based::cuda_fail(err, op, "cudaMallocAsync (staging buffer)");
    based_status st = indexed_rows(false, staged, src.data, src.dtype, src.strides, index, n, stream, op);
    if (st == BASED_STATUS_OK) st = whole_tensor(false, dst, staged.data, staged.dtype, staged.strides, stream, op);
    if ((err = cudaFreeAsync(staged.data, stream)) != cudaSuccess && st == BASED_STATUS_OK)
        st = based::cuda_fail(err, op, "cudaFreeAsync (staging buffer)");
    return st;
}

based_status not_on_gpu(const char *op, const char *what) {
    return based_fail(BASED_STATUS_INTERNAL_ERROR, "%s: %s reached the CUDA kernel", op, what);
}

// ---- linear state: compact <-> expanded rows ---------------------------------------------

struct LinearStateArgs {
    based_tensor in_kv, in_ksum, out_kv, out_ksum;  // (B, H, rows, Dv) and (B, H, rows)
    int64_t heads, dk, dv, out_rows;
    int32_t from_expanded;
    float r2;  // 1/sqrt(2) in float32
};

// Output element e: over (b, h, out row, column), column Dv being ksum's.
template <typename TI, typename TO>
__host__ __device__ inline void linear_state_element(const LinearStateArgs &a, int64_t e) {
    const int64_t cols = a.dv + 1;
    const int64_t col = e % cols;
    int64_t t = e / cols;
    const int64_t row = t % a.out_rows;
    t /= a.out_rows;
    const int64_t h = t % a.heads, b = t / a.heads;
    const bool sum = col == a.dv;
    const based_tensor &in = sum ? a.in_ksum : a.in_kv;
    const based_tensor &out = sum ? a.out_ksum : a.out_kv;
    const TI *ip = reinterpret_cast<const TI *>(in.data) +
                   (b * in.strides[0] + h * in.strides[1] + (sum ? 0 : col * in.strides[3]));
    const int64_t is = in.strides[2], dk = a.dk;
    float v;
    if (row <= dk) {  // the constant and linear rows are the same in both layouts
        v = based::hd::to_f32(ip[row * is]);
    } else if (!a.from_expanded) {  // expanded (i, j) <- compact (min, max), / sqrt(2) off the diagonal
        const int64_t g = row - 1 - dk, i = g / dk, j = g - i * dk;
        v = based::hd::to_f32(ip[based::compact_row(dk, i < j ? i : j, i < j ? j : i) * is]);
        if (i != j) v *= a.r2;
    } else {  // compact (i, j), i <= j <- e(i, i), or (e(i, j) + e(j, i)) / sqrt(2)
        int64_t i, j;
        based::triangle_pair(row - 1 - dk, dk, &i, &j);
        v = based::hd::to_f32(ip[based::expanded_row(dk, i, j) * is]);
        if (i != j) v = (v + based::hd::to_f32(ip[based::expanded_row(dk, j, i) * is])) * a.r2;
    }
    TO *op = reinterpret_cast<TO *>(out.data) +
             (b * out.strides[0] + h * out.strides[1] + row * out.strides[2] + (sum ? 0 : col * out.strides[3]));
    *op = based::hd::from_f32<TO>(v);
}

template <typename TI, typename TO>
struct LinearStateBody {
    LinearStateArgs a;
    __host__ __device__ void operator()(int32_t, int64_t e) const { linear_state_element<TI, TO>(a, e); }
};

}  // namespace

// ---- entry points (kernels/based_cuda.h) ---------------------------------------------------

extern "C" based_status based_cuda_state_zero(const based_state_args *args, cudaStream_t stream) {
    const char *op = "reset";
    const based_state_tensor &t = args->dst;
    if (t.numel == 0 || (args->indices != nullptr && args->n_indices == 0)) return BASED_STATUS_OK;
    if (t.device.kind != BASED_DEVICE_CUDA) return not_on_gpu(op, "a host tensor");
    BASED_CUDA_DEVICE(t.device.id, op);
    if (args->indices == nullptr) return whole_tensor(true, t, nullptr, t.dtype, nullptr, stream, op);
    return indexed_rows(true, t, nullptr, t.dtype, nullptr, args->indices, args->n_indices, stream, op);
}

extern "C" based_status based_cuda_state_copy(const based_state_args *args, cudaStream_t stream) {
    const char *op = "copy_";
    const based_state_tensor &dst = args->dst, &src = args->src;
    if (dst.numel == 0) return BASED_STATUS_OK;
    if (args->indices != nullptr) return not_on_gpu(op, "a copy with batch indices");
    if (!same_device(dst.device, src.device)) return copy_across(dst, src, stream, op);
    if (dst.device.kind != BASED_DEVICE_CUDA) return not_on_gpu(op, "a copy between host tensors");
    if (dst.data == src.data && dst.dtype == src.dtype &&
        memcmp(dst.strides, src.strides, sizeof(int64_t) * (size_t)dst.ndim) == 0)
        return BASED_STATUS_OK;  // the same tensor
    BASED_CUDA_DEVICE(dst.device.id, op);
    return whole_tensor(false, dst, src.data, src.dtype, src.strides, stream, op);
}

extern "C" based_status based_cuda_state_gather(const based_state_args *args, cudaStream_t stream) {
    const char *op = "index_select";
    const based_state_tensor &dst = args->dst, &src = args->src;
    if (dst.numel == 0 || args->n_indices == 0) return BASED_STATUS_OK;
    if (args->indices == nullptr) return not_on_gpu(op, "a gather without batch indices");
    if (!same_device(dst.device, src.device) || dst.device.kind != BASED_DEVICE_CUDA)
        return not_on_gpu(op, "a gather between devices");
    BASED_CUDA_DEVICE(dst.device.id, op);
    return gather_rows(dst, src, args->indices, args->n_indices, stream, op);
}

extern "C" based_status based_cuda_linear_state_convert(const based_linear_state_args *args, cudaStream_t stream) {
    const int from = args->from_expanded != 0;
    const char *op = from ? "linear_state_from_expanded" : "linear_state_to_expanded";
    LinearStateArgs a{};
    a.in_kv = from ? args->kv_exp : args->kv;
    a.in_ksum = from ? args->ksum_exp : args->ksum;
    a.out_kv = from ? args->kv : args->kv_exp;
    a.out_ksum = from ? args->ksum : args->ksum_exp;
    a.heads = args->heads;
    a.dk = args->feature_dim;
    a.dv = args->value_dim;
    a.out_rows = from ? args->feature_count : args->expanded_count;
    a.from_expanded = from;
    a.r2 = (float)sqrt(0.5);
    const int64_t total = args->batch * args->heads * a.out_rows * (a.dv + 1);
    if (total == 0) return BASED_STATUS_OK;
    if (args->device.kind != BASED_DEVICE_CUDA) return not_on_gpu(op, "a host tensor");
    BASED_CUDA_DEVICE(args->device.id, op);
    return based::dispatch_float(a.in_kv.dtype, op, [&](auto ti) {
        return based::dispatch_float(a.out_kv.dtype, op, [&](auto to) {
            return based::launch_elements(LinearStateBody<decltype(ti), decltype(to)>{a}, total, 1, stream, op);
        });
    });
}
