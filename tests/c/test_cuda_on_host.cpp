/*
 * test_cuda_on_host.cpp -- the CUDA layout kernels (kernels/state.cu, kernels/feature_map.cu)
 * checked without a GPU. Those files are compiled with a host C++ compiler and
 * BASED_KERNELS_ON_HOST (kernels/strided.cuh): each launch becomes the same loops over the
 * same per-element code on the CPU. The CUDA runtime calls they make are stood in for here:
 * device memory is host memory, a device is a number, a stream remembers its device, and
 * every call is recorded (which stream, which device was current, how many synchronisations).
 *
 * Checked against plain loops: the axis merging and strided offsets (permuted, padded and
 * reversed layouts; every untouched byte of each buffer stays as it was), the (i, j) pairs
 * of the compact Taylor rows, batch rows in chunks of launches, the in-place gather, the
 * staging of copies between host and GPU or two GPUs (with dtype conversion), the streams
 * used and the devices restored.
 * Built and run by tests/test_c_api.py (c++ -std=c++17 -DBASED_KERNELS_ON_HOST ...).
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <functional>
#include <random>
#include <set>
#include <vector>

#include "based_cuda.h"
#include "strided.cuh"

#include "check.h"

/* ---- stand-ins for the C core and the CUDA runtime -------------------------------------- */

static char last_error[1024];

extern "C" based_status based_fail(based_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

struct CUstream_st {
    int device;
};

namespace fake {
int current = 0;                  // the current device
int devices = 2;
std::set<void *> live;            // device allocations not yet freed
int stream_syncs = 0, device_syncs = 0, host_copies = 0, device_copies = 0, memsets = 0, mallocs = 0;
int wrong_device_calls = 0;       // a stream used while another device was current
std::vector<cudaStream_t> streams_used;

void reset_counts() {
    stream_syncs = device_syncs = host_copies = device_copies = memsets = mallocs = wrong_device_calls = 0;
    streams_used.clear();
}

void use(cudaStream_t s) {
    streams_used.push_back(s);
    if (s != nullptr && s != cudaStreamLegacy && s != cudaStreamPerThread && s->device != current)
        wrong_device_calls++;
}
}  // namespace fake

extern "C" {
cudaError_t cudaGetDevice(int *device) {
    *device = fake::current;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
    if (device < 0 || device >= fake::devices) return cudaErrorInvalidDevice;
    fake::current = device;
    return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t) { return "stand-in error"; }
const char *cudaGetErrorName(cudaError_t) { return "cudaErrorStandIn"; }
cudaError_t cudaStreamGetDevice(cudaStream_t s, int *device) {
    *device = s ? s->device : fake::current;
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) {
    fake::device_syncs++;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    fake::use(s);
    fake::stream_syncs++;
    return cudaSuccess;
}
cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t s) {
    fake::use(s);
    fake::mallocs++;
    *p = malloc(n ? n : 1);
    fake::live.insert(*p);
    return cudaSuccess;
}
cudaError_t cudaFreeAsync(void *p, cudaStream_t s) {
    fake::use(s);
    CHECK(fake::live.erase(p) == 1, "cudaFreeAsync of %p, which is not a live allocation", p);
    free(p);
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind, cudaStream_t s) {
    fake::use(s);
    if (kind == cudaMemcpyDeviceToDevice) fake::device_copies++;
    else fake::host_copies++;
    memcpy(dst, src, n);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t s) {
    fake::use(s);
    fake::memsets++;
    memset(p, value, n);
    return cudaSuccess;
}
}

/* ---- tensors with awkward layouts -------------------------------------------------------- */

static std::mt19937_64 rng(20240611);

static int itemsize_of(based_dtype dt) {
    return dt == BASED_DTYPE_FLOAT16 || dt == BASED_DTYPE_BFLOAT16 ? 2 : dt == BASED_DTYPE_FLOAT32 ? 4 : 8;
}

static const char *dtype_name(based_dtype dt) {
    static const char *names[] = {"float32", "float64", "float16", "bfloat16", "int64"};
    return names[dt];
}

static double load_value(based_dtype dt, const void *p) {
    switch (dt) {
    case BASED_DTYPE_FLOAT32: return *(const float *)p;
    case BASED_DTYPE_FLOAT64: return *(const double *)p;
    case BASED_DTYPE_FLOAT16: return based::hd::to_f64(*(const __half *)p);
    case BASED_DTYPE_BFLOAT16: return based::hd::to_f64(*(const __nv_bfloat16 *)p);
    default: return (double)*(const int64_t *)p;
    }
}

/* x stored in dtype dt as the C core stores a float64 (csrc/internal.h: based_store_f64). */
static void store_value(based_dtype dt, void *p, double x) {
    switch (dt) {
    case BASED_DTYPE_FLOAT32: *(float *)p = (float)x; break;
    case BASED_DTYPE_FLOAT64: *(double *)p = x; break;
    case BASED_DTYPE_FLOAT16: *(__half *)p = __float2half_rn((float)x); break;
    case BASED_DTYPE_BFLOAT16: *(__nv_bfloat16 *)p = __float2bfloat16_rn((float)x); break;
    default: *(int64_t *)p = (int64_t)x; break;
    }
}

struct Tensor {
    std::vector<unsigned char> mem;  // the whole buffer, gaps included
    based_state_tensor t;

    unsigned char *at(const int64_t *idx) const {
        int64_t o = 0;
        for (int d = 0; d < t.ndim; d++) o += idx[d] * t.strides[d];
        return (unsigned char *)t.data + o * t.itemsize;
    }
    /* the bytes at idx before the op (a snapshot of mem) */
    const unsigned char *was(const std::vector<unsigned char> &snapshot, const int64_t *idx) const {
        return snapshot.data() + (at(idx) - mem.data());
    }
    double get(const int64_t *idx) const { return load_value(t.dtype, at(idx)); }
    void set(const int64_t *idx, double x) const { store_value(t.dtype, at(idx), x); }
};

/* A tensor of `shape` whose axes are laid out in the order `perm` (outermost first), each
 * axis padded by `pad` elements (gaps between rows), axis `flip` reversed (-1: none);
 * every byte starts random, the elements hold random values of the dtype. */
static Tensor make_tensor(const std::vector<int64_t> &shape, based_dtype dt, std::vector<int> perm = {},
                          int64_t pad = 0, int flip = -1, based_device dev = {BASED_DEVICE_CUDA, 0}) {
    const int nd = (int)shape.size();
    if (perm.empty())
        for (int d = 0; d < nd; d++) perm.push_back(d);
    Tensor x;
    memset(&x.t, 0, sizeof x.t);
    x.t.dtype = dt;
    x.t.itemsize = itemsize_of(dt);
    x.t.device = dev;
    x.t.ndim = nd;
    int64_t running = 1, numel = 1;
    for (int k = nd - 1; k >= 0; k--) {
        const int a = perm[k];
        x.t.shape[a] = shape[a];
        x.t.strides[a] = running;
        running *= shape[a] + pad;
        numel *= shape[a];
    }
    x.t.numel = numel;
    x.mem.resize((size_t)(running + 1) * (size_t)x.t.itemsize);
    for (auto &b : x.mem) b = (unsigned char)rng();
    int64_t start = 0;
    if (flip >= 0 && shape[flip] > 0) {
        start = (shape[flip] - 1) * x.t.strides[flip];
        x.t.strides[flip] = -x.t.strides[flip];
    }
    x.t.data = numel ? (char *)x.mem.data() + start * x.t.itemsize : nullptr;
    std::uniform_real_distribution<double> u(-3.0, 3.0);
    std::vector<int64_t> idx(nd, 0);
    for (int64_t e = 0; e < numel; e++) {
        int64_t r = e;
        for (int d = nd - 1; d >= 0; d--) {
            idx[d] = r % shape[d];
            r /= shape[d];
        }
        x.set(idx.data(), dt == BASED_DTYPE_INT64 ? (double)(int64_t)(rng() % 100000) - 50000 : u(rng));
    }
    return x;
}

/* Calls fn(idx) for every multi-index of t's shape, row-major. */
static void for_each(const based_state_tensor &t, const std::function<void(const int64_t *)> &fn) {
    int64_t idx[BASED_ARGS_MAX_NDIM] = {0};
    for (int64_t e = 0; e < t.numel; e++) {
        int64_t r = e;
        for (int d = t.ndim - 1; d >= 0; d--) {
            idx[d] = r % t.shape[d];
            r /= t.shape[d];
        }
        fn(idx);
    }
}

/* Every byte of `after` outside t's elements equals `before`. */
static void check_gaps(const Tensor &x, const std::vector<unsigned char> &before, const char *what) {
    std::vector<char> mine(x.mem.size(), 0);
    for_each(x.t, [&](const int64_t *idx) {
        const size_t o = (size_t)(x.at(idx) - x.mem.data());
        for (int b = 0; b < x.t.itemsize; b++) mine[o + b] = 1;
    });
    int bad = 0;
    for (size_t i = 0; i < x.mem.size(); i++) bad += !mine[i] && x.mem[i] != before[i];
    CHECK(bad == 0, "%s: %d bytes outside the tensor were written", what, bad);
}

static bool same_bytes(const void *a, const void *b, int n) { return memcmp(a, b, (size_t)n) == 0; }

/* dst holds at di the value src holds at si, converted to dst's dtype as the C core converts. */
static void expect_converted(const Tensor &dst, const int64_t *di, const Tensor &src, const int64_t *si,
                             const char *what) {
    if (dst.t.dtype == src.t.dtype) {
        CHECK(same_bytes(dst.at(di), src.at(si), dst.t.itemsize), "%s: element differs (%s)", what,
              dtype_name(dst.t.dtype));
        return;
    }
    unsigned char want[8];
    store_value(dst.t.dtype, want, src.get(si));
    CHECK(same_bytes(dst.at(di), want, dst.t.itemsize), "%s: %s -> %s conversion of %.9g gives %.9g", what,
          dtype_name(src.t.dtype), dtype_name(dst.t.dtype), src.get(si), dst.get(di));
}

static based_state_args state_args(const Tensor *dst, const Tensor *src, const std::vector<int64_t> *idx) {
    based_state_args a;
    memset(&a, 0, sizeof a);
    a.dst = dst->t;
    if (src) a.src = src->t;
    a.indices = idx ? idx->data() : nullptr;
    a.n_indices = idx ? (int64_t)idx->size() : 0;
    return a;
}

static cudaStream_t stream_on(int device) { return new CUstream_st{device}; }

/* ---- the index math ------------------------------------------------------------------------ */

static void test_triangle_pairs() {
    for (int64_t dk = 1; dk <= 300; dk++) {
        int64_t g = 0;
        for (int64_t i = 0; i < dk; i++)
            for (int64_t j = i; j < dk; j++, g++) {
                int64_t pi, pj;
                based::triangle_pair(g, dk, &pi, &pj);
                CHECK(pi == i && pj == j, "triangle_pair(%lld, dk=%lld) = (%lld, %lld), want (%lld, %lld)",
                      (long long)g, (long long)dk, (long long)pi, (long long)pj, (long long)i, (long long)j);
                CHECK(based::compact_row(dk, i, j) == 1 + dk + g, "compact_row");
            }
    }
    for (int64_t dk : {1000LL, 4097LL, 100003LL, 3000000LL}) {  // where double rounding could bite
        const int64_t count = dk * (dk + 1) / 2;
        for (int k = 0; k < 2000; k++) {
            const int64_t g = k < 1000 ? (int64_t)(rng() % (uint64_t)count) : based::triangle_start(dk, k % dk) - (k & 1);
            if (g < 0) continue;
            int64_t i, j;
            based::triangle_pair(g, dk, &i, &j);
            CHECK(i >= 0 && i <= j && j < dk && based::triangle_start(dk, i) + (j - i) == g,
                  "triangle_pair(%lld, dk=%lld) = (%lld, %lld)", (long long)g, (long long)dk, (long long)i,
                  (long long)j);
        }
    }
}

static void test_collapse() {
    for (int trial = 0; trial < 300; trial++) {
        const int nd = 1 + (int)(rng() % 5);
        std::vector<int64_t> shape;
        for (int d = 0; d < nd; d++) shape.push_back(1 + (int64_t)(rng() % 4));
        std::vector<int> pa, pb;
        for (int d = 0; d < nd; d++) pa.push_back(d), pb.push_back(d);
        if (trial % 2) std::shuffle(pa.begin(), pa.end(), rng);
        if (trial % 3) std::shuffle(pb.begin(), pb.end(), rng);
        const Tensor a = make_tensor(shape, BASED_DTYPE_FLOAT32, pa, trial % 4 == 0, (int)(rng() % (nd + 1)) - 1);
        const Tensor b = make_tensor(shape, BASED_DTYPE_FLOAT32, pb, trial % 5 == 0, -1);
        const int first = (int)(rng() % 2);
        int64_t n;
        const based::PairWalk w = based::collapse_axes(nd, a.t.shape, a.t.strides, b.t.strides, first, &n);
        int64_t want_n = 1;
        for (int d = first; d < nd; d++) want_n *= shape[d];
        CHECK(n == want_n, "collapse numel %lld, want %lld", (long long)n, (long long)want_n);
        // row-major over axes [first, nd): the walk's offsets are the tensors'
        int64_t e = 0;
        for_each(a.t, [&](const int64_t *idx) {
            for (int d = 0; d < first; d++)
                if (idx[d] != 0) return;
            int64_t ao = 0, bo = 0, wa, wb;
            for (int d = first; d < nd; d++) ao += idx[d] * a.t.strides[d], bo += idx[d] * b.t.strides[d];
            based::pair_offsets(w, e++, &wa, &wb);
            CHECK(wa == ao && wb == bo, "pair_offsets(%lld) = (%lld, %lld), want (%lld, %lld)", (long long)(e - 1),
                  (long long)wa, (long long)wb, (long long)ao, (long long)bo);
        });
        // two row-major tensors of one shape merge into one dense axis
        const Tensor c = make_tensor(shape, BASED_DTYPE_FLOAT32), d = make_tensor(shape, BASED_DTYPE_INT64);
        CHECK(based::is_dense(based::collapse_axes(nd, c.t.shape, c.t.strides, d.t.strides, 0, &n)),
              "row-major pair not merged into one dense axis");
    }
}

/* ---- state helpers -------------------------------------------------------------------------- */

static const based_dtype kAllDtypes[] = {BASED_DTYPE_FLOAT32, BASED_DTYPE_FLOAT64, BASED_DTYPE_FLOAT16,
                                         BASED_DTYPE_BFLOAT16, BASED_DTYPE_INT64};
static const based_dtype kFloatDtypes[] = {BASED_DTYPE_FLOAT32, BASED_DTYPE_FLOAT64, BASED_DTYPE_FLOAT16,
                                           BASED_DTYPE_BFLOAT16};

/* a random layout of `shape`: permuted axes, gaps, a reversed axis */
static Tensor random_layout(const std::vector<int64_t> &shape, based_dtype dt, int trial,
                            based_device dev = {BASED_DEVICE_CUDA, 0}) {
    std::vector<int> perm;
    for (size_t d = 0; d < shape.size(); d++) perm.push_back((int)d);
    if (trial % 3 == 1) std::shuffle(perm.begin(), perm.end(), rng);
    const int flip = trial % 4 == 3 ? (int)(rng() % shape.size()) : -1;
    return make_tensor(shape, dt, perm, trial % 3 == 2 ? 1 : 0, flip, dev);
}

static void test_zero() {
    const std::vector<std::vector<int64_t>> shapes = {{5}, {4, 3, 7}, {3, 2, 5, 6}, {600, 3}, {2, 1, 4}};
    for (size_t s = 0; s < shapes.size(); s++)
        for (based_dtype dt : kAllDtypes)
            for (int trial = 0; trial < 4; trial++) {
                const Tensor x = random_layout(shapes[s], dt, trial);
                const std::vector<unsigned char> before = x.mem;
                std::vector<int64_t> idx;
                const int64_t B = x.t.shape[0];
                const bool all = trial == 0;
                if (!all)
                    for (int64_t k = 0; k < (B > 300 ? 300 : B); k++) idx.push_back((int64_t)(rng() % (uint64_t)B));
                if (!all && trial == 2 && B > 1) idx.push_back(idx[0]);  // a repeat
                std::set<int64_t> rows(idx.begin(), idx.end());
                fake::reset_counts();
                cudaStream_t s0 = stream_on(0);
                const based_state_args a = state_args(&x, nullptr, all ? nullptr : &idx);
                CHECK(based_cuda_state_zero(&a, s0) == BASED_STATUS_OK, "zero: %s", last_error);
                for_each(x.t, [&](const int64_t *i) {
                    static const unsigned char zeros[8] = {0};
                    if (all || rows.count(i[0]))
                        CHECK(same_bytes(x.at(i), zeros, x.t.itemsize), "zero: row %lld not zeroed (%s)",
                              (long long)i[0], dtype_name(dt));
                    else
                        CHECK(same_bytes(x.at(i), x.was(before, i), x.t.itemsize),
                              "zero: row %lld changed", (long long)i[0]);
                });
                check_gaps(x, before, "zero");
                CHECK(fake::stream_syncs == 0 && fake::device_syncs == 0 && fake::host_copies == 0 &&
                          fake::mallocs == 0, "zero: synchronised, copied to the host or allocated");
                for (cudaStream_t u : fake::streams_used) CHECK(u == s0, "zero: not on the caller's stream");
                delete s0;
            }
    // nothing to do: an empty index list, an empty tensor
    Tensor x = make_tensor({3, 4}, BASED_DTYPE_FLOAT32);
    const std::vector<unsigned char> before = x.mem;
    std::vector<int64_t> none;
    none.reserve(1);  // an empty list, not NULL (NULL means every row)
    based_state_args a = state_args(&x, nullptr, &none);
    CHECK(based_cuda_state_zero(&a, nullptr) == BASED_STATUS_OK && x.mem == before, "zero with no indices");
    Tensor empty = make_tensor({0, 4}, BASED_DTYPE_FLOAT32);
    a = state_args(&empty, nullptr, nullptr);
    CHECK(based_cuda_state_zero(&a, nullptr) == BASED_STATUS_OK, "zero of an empty tensor");
}

static void test_copy_same_device() {
    const std::vector<std::vector<int64_t>> shapes = {{5}, {4, 3, 7}, {3, 2, 5, 6}, {2, 1, 4}, {1}};
    for (size_t s = 0; s < shapes.size(); s++)
        for (based_dtype dd : kAllDtypes)
            for (based_dtype sd : kAllDtypes) {
                if ((dd == BASED_DTYPE_INT64) != (sd == BASED_DTYPE_INT64)) continue;
                for (int trial = 0; trial < 4; trial++) {
                    const Tensor dst = random_layout(shapes[s], dd, trial);
                    const Tensor src = random_layout(shapes[s], sd, trial + 1);
                    const std::vector<unsigned char> before = dst.mem, src_before = src.mem;
                    fake::reset_counts();
                    cudaStream_t s0 = stream_on(0);
                    const based_state_args a = state_args(&dst, &src, nullptr);
                    CHECK(based_cuda_state_copy(&a, s0) == BASED_STATUS_OK, "copy: %s", last_error);
                    for_each(dst.t, [&](const int64_t *i) { expect_converted(dst, i, src, i, "copy"); });
                    check_gaps(dst, before, "copy");
                    CHECK(src.mem == src_before, "copy wrote its source");
                    CHECK(fake::stream_syncs == 0 && fake::device_syncs == 0 && fake::host_copies == 0 &&
                              fake::mallocs == 0, "copy on one device: synchronised, copied to the host or allocated");
                    for (cudaStream_t u : fake::streams_used) CHECK(u == s0, "copy: not on the caller's stream");
                    delete s0;
                }
            }
}

static void test_gather() {
    const std::vector<std::vector<int64_t>> shapes = {{6}, {5, 3, 4}, {4, 2, 3, 5}, {300, 2}};
    for (size_t s = 0; s < shapes.size(); s++)
        for (based_dtype dt : kAllDtypes)
            for (int trial = 0; trial < 4; trial++) {
                const Tensor src = random_layout(shapes[s], dt, trial);
                const int64_t B = src.t.shape[0];
                std::vector<int64_t> idx;
                const int64_t n = trial == 3 ? B + 2 : B;  // repeats; n > 256 for the 300-row shape
                for (int64_t k = 0; k < n; k++) idx.push_back((int64_t)(rng() % (uint64_t)B));
                std::vector<int64_t> dshape = shapes[s];
                dshape[0] = n;
                const Tensor dst = random_layout(dshape, dt, trial + 2);
                const std::vector<unsigned char> before = dst.mem;
                fake::reset_counts();
                cudaStream_t s0 = stream_on(0);
                const based_state_args a = state_args(&dst, &src, &idx);
                CHECK(based_cuda_state_gather(&a, s0) == BASED_STATUS_OK, "gather: %s", last_error);
                for_each(dst.t, [&](const int64_t *i) {
                    int64_t si[BASED_ARGS_MAX_NDIM];
                    memcpy(si, i, sizeof si);
                    si[0] = idx[(size_t)i[0]];
                    expect_converted(dst, i, src, si, "gather");
                });
                check_gaps(dst, before, "gather");
                CHECK(fake::stream_syncs == 0 && fake::host_copies == 0 && fake::mallocs == 0,
                      "gather: synchronised, copied to the host or allocated");
                delete s0;

                // in place: dst is src (a permutation with repeats)
                const Tensor x = random_layout(shapes[s], dt, trial);
                std::vector<int64_t> order;
                for (int64_t k = 0; k < B; k++) order.push_back(trial == 0 ? B - 1 - k : (int64_t)(rng() % (uint64_t)B));
                const std::vector<unsigned char> xbefore = x.mem;
                fake::reset_counts();
                cudaStream_t s1 = stream_on(0);
                const based_state_args b = state_args(&x, &x, &order);
                CHECK(based_cuda_state_gather(&b, s1) == BASED_STATUS_OK, "gather in place: %s", last_error);
                for_each(x.t, [&](const int64_t *i) {
                    int64_t si[BASED_ARGS_MAX_NDIM];
                    memcpy(si, i, sizeof si);
                    si[0] = order[(size_t)i[0]];
                    CHECK(same_bytes(x.at(i), x.was(xbefore, si), x.t.itemsize), "gather in place: row %lld",
                          (long long)i[0]);
                });
                check_gaps(x, xbefore, "gather in place");
                CHECK(fake::mallocs == 1 && fake::live.empty() && fake::stream_syncs == 0 && fake::host_copies == 0,
                      "gather in place: %d allocations, %zu live, %d syncs", fake::mallocs, fake::live.size(),
                      fake::stream_syncs);
                for (cudaStream_t u : fake::streams_used) CHECK(u == s1, "gather in place: not on the caller's stream");
                delete s1;
            }
}

static void test_copy_across_devices() {
    const based_device cpu = {BASED_DEVICE_CPU, 0}, gpu0 = {BASED_DEVICE_CUDA, 0}, gpu1 = {BASED_DEVICE_CUDA, 1};
    struct Pair {
        based_device dst, src;
    };
    const Pair pairs[] = {{gpu0, cpu}, {cpu, gpu0}, {gpu1, gpu0}, {gpu0, gpu1}, {cpu, gpu1}};
    const std::vector<std::vector<int64_t>> shapes = {{4, 3, 5}, {2, 3, 1, 4}, {7}};
    for (const Pair &p : pairs)
        for (size_t s = 0; s < shapes.size(); s++)
            for (based_dtype dd : kFloatDtypes)
                for (based_dtype sd : kFloatDtypes)
                    for (int trial = 0; trial < 4; trial++) {
                        // float64 lives only on the host side (the checks refuse it on a GPU)
                        if ((dd == BASED_DTYPE_FLOAT64 && p.dst.kind == BASED_DEVICE_CUDA) ||
                            (sd == BASED_DTYPE_FLOAT64 && p.src.kind == BASED_DEVICE_CUDA))
                            continue;
                        const Tensor dst = random_layout(shapes[s], dd, trial, p.dst);
                        const Tensor src = random_layout(shapes[s], sd, trial / 2, p.src);
                        const std::vector<unsigned char> before = dst.mem, src_before = src.mem;
                        fake::reset_counts();
                        fake::current = 0;
                        // the caller's stream: on one of the two devices (the other side must
                        // then use its own device's default stream after a device sync)
                        cudaStream_t st = stream_on(trial % 2 ? 1 : 0);
                        const based_state_args a = state_args(&dst, &src, nullptr);
                        CHECK(based_cuda_state_copy(&a, st) == BASED_STATUS_OK, "copy across: %s", last_error);
                        for_each(dst.t, [&](const int64_t *i) { expect_converted(dst, i, src, i, "copy across"); });
                        check_gaps(dst, before, "copy across");
                        CHECK(src.mem == src_before, "copy across wrote its source");
                        CHECK(fake::live.empty(), "copy across: %zu device buffers not freed", fake::live.size());
                        CHECK(fake::stream_syncs >= 1, "copy across devices returned without synchronising");
                        CHECK(fake::wrong_device_calls == 0, "copy across: a stream used on another device");
                        CHECK(fake::current == 0, "copy across: the current device was not restored");
                        delete st;
                    }
    // int64 token counters across devices, dense and strided
    for (int trial = 0; trial < 4; trial++) {
        const Tensor dst = random_layout({9, 2}, BASED_DTYPE_INT64, trial, cpu);
        const Tensor src = random_layout({9, 2}, BASED_DTYPE_INT64, trial + 1, gpu1);
        const based_state_args a = state_args(&dst, &src, nullptr);
        fake::current = 0;
        CHECK(based_cuda_state_copy(&a, nullptr) == BASED_STATUS_OK, "int64 copy across: %s", last_error);
        for_each(dst.t, [&](const int64_t *i) { expect_converted(dst, i, src, i, "int64 copy across"); });
        CHECK(fake::current == 0, "int64 copy across: the current device was not restored");
    }
}

/* ---- linear state layouts ------------------------------------------------------------------- */

static based_tensor as_tensor(const Tensor &x) {
    based_tensor t;
    memset(&t, 0, sizeof t);
    t.data = x.t.data;
    t.dtype = x.t.dtype;
    t.itemsize = x.t.itemsize;
    for (int d = 0; d < x.t.ndim; d++) t.strides[d] = x.t.strides[d];
    return t;
}

static void test_linear_attention_state_convert() {
    const based_dtype dts[] = {BASED_DTYPE_FLOAT32, BASED_DTYPE_FLOAT16, BASED_DTYPE_BFLOAT16};
    const double r2 = sqrt(0.5);
    for (int64_t dk : {1, 2, 3, 5, 16})
        for (int64_t dv : {1, 4})
            for (based_dtype ci : dts)
                for (based_dtype co : dts)
                    for (int trial = 0; trial < 2; trial++) {
                        const int64_t B = 2, H = 3, F = 1 + dk + dk * (dk + 1) / 2, E = 1 + dk + dk * dk;
                        const Tensor kv = random_layout({B, H, F, dv}, ci, trial ? 1 : 0);
                        const Tensor ks = random_layout({B, H, F}, ci, trial ? 2 : 0);
                        const Tensor kve = random_layout({B, H, E, dv}, co, trial ? 2 : 0);
                        const Tensor kse = random_layout({B, H, E}, co, trial ? 1 : 0);
                        const std::vector<unsigned char> b1 = kve.mem, b2 = kse.mem;
                        based_linear_state_args a;
                        memset(&a, 0, sizeof a);
                        a.device = {BASED_DEVICE_CUDA, 0};
                        a.kv = as_tensor(kv);
                        a.ksum = as_tensor(ks);
                        a.kv_exp = as_tensor(kve);
                        a.ksum_exp = as_tensor(kse);
                        a.batch = B;
                        a.heads = H;
                        a.feature_dim = dk;
                        a.value_dim = dv;
                        a.feature_count = F;
                        a.expanded_count = E;
                        a.from_expanded = 0;
                        CHECK(based_cuda_linear_state_convert(&a, nullptr) == BASED_STATUS_OK, "to_expanded: %s",
                              last_error);
                        // tolerance: float32 math against float64, then one rounding to the output dtype
                        const double tol = co == BASED_DTYPE_FLOAT32 ? 4e-7 : co == BASED_DTYPE_FLOAT16 ? 1e-3 : 8e-3;
                        for (int64_t b = 0; b < B; b++)
                            for (int64_t h = 0; h < H; h++)
                                for (int64_t col = -1; col < dv; col++) {
                                    const Tensor &c = col < 0 ? ks : kv, &e = col < 0 ? kse : kve;
                                    auto cat = [&](int64_t r) {
                                        const int64_t i4[4] = {b, h, r, col};
                                        return c.get(i4);
                                    };
                                    auto eat = [&](int64_t r) {
                                        const int64_t i4[4] = {b, h, r, col};
                                        return e.get(i4);
                                    };
                                    for (int64_t r = 0; r <= dk; r++)
                                        CHECK(fabs(eat(r) - cat(r)) <= tol * fabs(cat(r)), "to_expanded row %lld",
                                              (long long)r);
                                    for (int64_t i = 0; i < dk; i++)
                                        for (int64_t j = 0; j < dk; j++) {
                                            const double want = cat(based::compact_row(dk, i < j ? i : j, i < j ? j : i)) *
                                                                (i == j ? 1.0 : r2);
                                            const double got = eat(based::expanded_row(dk, i, j));
                                            CHECK(fabs(got - want) <= tol * fabs(want) + 1e-30,
                                                  "to_expanded (%lld, %lld) dk=%lld: %.9g, want %.9g", (long long)i,
                                                  (long long)j, (long long)dk, got, want);
                                        }
                                }
                        check_gaps(kve, b1, "to_expanded kv");
                        check_gaps(kse, b2, "to_expanded ksum");

                        // and back: symmetrised, so an expanded state made above comes back as
                        // the compact one (within the two roundings)
                        const Tensor kv2 = random_layout({B, H, F, dv}, ci, trial ? 2 : 0);
                        const Tensor ks2 = random_layout({B, H, F}, ci, trial ? 1 : 0);
                        const std::vector<unsigned char> b3 = kv2.mem, b4 = ks2.mem;
                        a.kv = as_tensor(kv2);
                        a.ksum = as_tensor(ks2);
                        a.from_expanded = 1;
                        CHECK(based_cuda_linear_state_convert(&a, nullptr) == BASED_STATUS_OK, "from_expanded: %s",
                              last_error);
                        const double tol2 = ci == BASED_DTYPE_FLOAT32 ? 4e-7 : ci == BASED_DTYPE_FLOAT16 ? 1e-3 : 8e-3;
                        for (int64_t b = 0; b < B; b++)
                            for (int64_t h = 0; h < H; h++)
                                for (int64_t col = -1; col < dv; col++) {
                                    const Tensor &c = col < 0 ? ks2 : kv2, &e = col < 0 ? kse : kve;
                                    for (int64_t r = 0; r < F; r++) {
                                        const int64_t i4[4] = {b, h, r, col};
                                        double want;
                                        if (r <= dk) {
                                            want = e.get(i4);
                                        } else {
                                            int64_t i, j;
                                            based::triangle_pair(r - 1 - dk, dk, &i, &j);
                                            const int64_t a4[4] = {b, h, based::expanded_row(dk, i, j), col};
                                            const int64_t t4[4] = {b, h, based::expanded_row(dk, j, i), col};
                                            want = i == j ? e.get(a4) : (e.get(a4) + e.get(t4)) * r2;
                                        }
                                        CHECK(fabs(c.get(i4) - want) <= tol2 * fabs(want) + 1e-30,
                                              "from_expanded row %lld dk=%lld: %.9g, want %.9g", (long long)r,
                                              (long long)dk, c.get(i4), want);
                                    }
                                }
                        check_gaps(kv2, b3, "from_expanded kv");
                        check_gaps(ks2, b4, "from_expanded ksum");
                    }
}

/* ---- feature map ------------------------------------------------------------------------------ */

static void test_feature_map() {
    const based_dtype dts[] = {BASED_DTYPE_FLOAT32, BASED_DTYPE_FLOAT16, BASED_DTYPE_BFLOAT16};
    int trial = 0;
    for (int64_t dk : {1, 2, 3, 5, 7, 16, 17, 31, 32, 33})
        for (based_dtype dt : dts)
            for (const std::vector<int64_t> &lead : std::vector<std::vector<int64_t>>{{}, {3}, {2, 3}, {2, 1, 3, 2}}) {
                trial++;
                const int64_t F = 1 + dk + dk * (dk + 1) / 2;
                std::vector<int64_t> xs = lead, os = lead;
                xs.push_back(dk);
                os.push_back(F);
                // leading axes permuted / padded / reversed; the last axis innermost (unit stride,
                // as CUDA requires) except in every fifth case (the kernel takes any stride)
                std::vector<int> perm;
                for (size_t d = 0; d < lead.size(); d++) perm.push_back((int)d);
                if (trial % 2) std::shuffle(perm.begin(), perm.end(), rng);
                perm.insert(trial % 5 == 0 ? perm.begin() : perm.end(), (int)lead.size());
                const int flip = lead.empty() || trial % 3 ? -1 : 0;
                const Tensor x = make_tensor(xs, dt, perm, trial % 2, flip);
                const Tensor out = make_tensor(os, dt, perm, (trial / 2) % 2, -1);
                const std::vector<unsigned char> before = out.mem;
                based_feature_map_args a;
                memset(&a, 0, sizeof a);
                a.device = {BASED_DEVICE_CUDA, 0};
                a.x = x.t.data;
                a.out = out.t.data;
                a.dtype = dt;
                a.ndim = x.t.ndim;
                for (int d = 0; d < x.t.ndim; d++) {
                    a.shape[d] = x.t.shape[d];
                    a.x_strides[d] = x.t.strides[d];
                    a.out_strides[d] = out.t.strides[d];
                }
                a.rows = x.t.numel / dk;
                a.feature_dim = dk;
                a.feature_count = F;
                a.scale = 1.0 / sqrt((double)dk) * (trial % 2 ? 1.0 : 0.3);
                CHECK(based_cuda_taylor_feature_map(&a, nullptr) == BASED_STATUS_OK, "feature map: %s", last_error);
                // the CPU's float32 formula, operation for operation (csrc/feature_map.c)
                const float scale = (float)a.scale, c1 = sqrtf(scale), c2 = scale / sqrtf(2.0f), c3 = scale;
                for_each(out.t, [&](const int64_t *i) {
                    if (i[out.t.ndim - 1] != 0) return;
                    int64_t xi[BASED_ARGS_MAX_NDIM];
                    memcpy(xi, i, sizeof xi);
                    std::vector<float> v((size_t)dk);
                    for (int64_t k = 0; k < dk; k++) {
                        xi[x.t.ndim - 1] = k;
                        v[(size_t)k] = (float)x.get(xi);
                    }
                    std::vector<float> want;
                    want.push_back(1.0f);
                    for (int64_t k = 0; k < dk; k++) want.push_back(c1 * v[(size_t)k]);
                    for (int64_t p = 0; p < dk; p++) {
                        want.push_back(c2 * v[(size_t)p] * v[(size_t)p]);
                        for (int64_t q = p + 1; q < dk; q++) want.push_back(c3 * v[(size_t)p] * v[(size_t)q]);
                    }
                    int64_t oi[BASED_ARGS_MAX_NDIM];
                    memcpy(oi, i, sizeof oi);
                    for (int64_t f = 0; f < F; f++) {
                        oi[out.t.ndim - 1] = f;
                        unsigned char buf[8];
                        store_value(dt, buf, (double)want[(size_t)f]);
                        CHECK(same_bytes(out.at(oi), buf, out.t.itemsize), "phi[%lld] dk=%lld %s: %.9g, want %.9g",
                              (long long)f, (long long)dk, dtype_name(dt), out.get(oi), (double)want[(size_t)f]);
                    }
                });
                check_gaps(out, before, "feature map");
            }
}

int main() {
    test_triangle_pairs();
    test_collapse();
    test_zero();
    test_copy_same_device();
    test_gather();
    test_copy_across_devices();
    test_linear_attention_state_convert();
    test_feature_map();
    if (failures == 0) printf("test_cuda_on_host: all checks passed\n");
    else fprintf(stderr, "test_cuda_on_host: %d checks failed\n", failures);
    return failures != 0;
}
