// harness.cpp -- the emulated CUDA sliding-window kernels against a float64 reference (see
// README.md): prefill then decode steps per case, checking outputs (tolerance by dtype), NaN
// for invalid counters, the cache bits (never-valid slots hold NaN so a read of one shows),
// the counters, and that nothing around out or the cache is written.
// Usage: harness [-v] [f32|f16|bf16] [case indices...]
#include "emu.h"

#include <cinttypes>
#include <map>
#include <set>
#include <string>
#include <tuple>

static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}
static double rnd(int kind, int64_t b, int64_t pos, int64_t head, int64_t d, uint64_t seed) {
    uint64_t h = mix(seed ^ mix((uint64_t)kind * 1000003ULL ^
                                mix((uint64_t)b ^ mix((uint64_t)pos ^ mix((uint64_t)head * 7919ULL ^ mix((uint64_t)d))))));
    return ((double)(h >> 11) * 0x1.0p-53 - 0.5) * 3.0;
}

template <typename T> T to_t(double x);
template <> float to_t<float>(double x) { return (float)x; }
template <> __half to_t<__half>(double x) { return __float2half_rn((float)x); }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(double x) { return __float2bfloat16_rn((float)x); }
template <typename T> double to_d(T x);
template <> double to_d<float>(float x) { return x; }
template <> double to_d<__half>(__half x) { return __half2float(x); }
template <> double to_d<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> based_dtype dt();
template <> based_dtype dt<float>() { return BASED_DTYPE_FLOAT32; }
template <> based_dtype dt<__half>() { return BASED_DTYPE_FLOAT16; }
template <> based_dtype dt<__nv_bfloat16>() { return BASED_DTYPE_BFLOAT16; }
template <typename T> const char *dname();
template <> const char *dname<float>() { return "f32"; }
template <> const char *dname<__half>() { return "f16"; }
template <> const char *dname<__nv_bfloat16>() { return "bf16"; }

template <typename T> static bool same_bits(T a, T b) { return memcmp(&a, &b, sizeof(T)) == 0; }

struct Injection {
    int kind;  // 1 k, 2 v
    int64_t b, pos, head, d;
    double value;
};

struct Case {
    std::string name;
    int64_t B, T, H, Hkv, D, W;
    std::vector<int64_t> n0;
    int layout = 0;        // q/k/v/out: 0 contiguous, 1 (B,H,T,D) transposed, 2 step 2 along T, 3 misaligned, 4 last stride 2
    int cache_layout = 0;  // 0 row-major, 1 key slot-contiguous, 2 both slot-contiguous
    int decode_steps = 0;
    int tokens_stride = 1;
    std::vector<Injection> inject;
    uint64_t seed = 1;
};

static int g_fail = 0;
#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            if (g_fail < 40) {                             \
                printf("    FAIL: " __VA_ARGS__);          \
                printf("\n");                              \
            }                                              \
            g_fail++;                                      \
        }                                                  \
    } while (0)

// A 4-d view into a buffer with margins.
template <typename T>
struct View {
    std::vector<T> mem;
    size_t off = 0;  // element offset of [0,0,0,0]
    int64_t shape[4], strides[4];
    size_t used_lo = 0, used_hi = 0;  // span [lo, hi) of elements the view may touch
    T *at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        return mem.data() + off + i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + i3 * strides[3];
    }
    based_tensor tensor() {
        based_tensor t;
        t.data = (char *)(mem.data() + off);
        for (int i = 0; i < 4; i++) t.strides[i] = strides[i];
        t.dtype = dt<T>();
        t.itemsize = sizeof(T);
        return t;
    }
};

static const int64_t kMargin = 40;

// (A, Bdim, C, D) activations in a layout; margins of kMargin elements each side, filled with fill.
template <typename T>
View<T> make_act(int64_t A, int64_t Tn, int64_t Hh, int64_t D, int layout, T fill) {
    View<T> v;
    v.shape[0] = A; v.shape[1] = Tn; v.shape[2] = Hh; v.shape[3] = D;
    int64_t n = A * Tn * Hh * D;
    int64_t extra = 0;
    switch (layout) {
    case 0: case 3:
        v.strides[0] = Tn * Hh * D; v.strides[1] = Hh * D; v.strides[2] = D; v.strides[3] = 1;
        if (layout == 3) extra = 1;
        break;
    case 1:
        v.strides[0] = Hh * Tn * D; v.strides[1] = D; v.strides[2] = Tn * D; v.strides[3] = 1;
        break;
    case 2:
        v.strides[0] = 2 * Tn * Hh * D; v.strides[1] = 2 * Hh * D; v.strides[2] = D; v.strides[3] = 1;
        n *= 2;
        break;
    case 4:
        v.strides[0] = Tn * Hh * D * 2; v.strides[1] = Hh * D * 2; v.strides[2] = D * 2; v.strides[3] = 2;
        n *= 2;
        break;
    }
    v.mem.assign(n + extra + 2 * kMargin, fill);
    v.off = kMargin + extra;
    v.used_lo = kMargin;
    v.used_hi = kMargin + extra + n;
    return v;
}

template <typename T>
View<T> make_cache(int64_t B, int64_t Hkv, int64_t W, int64_t D, bool slot_contiguous, T fill) {
    View<T> v;
    v.shape[0] = B; v.shape[1] = Hkv; v.shape[2] = W; v.shape[3] = D;
    if (slot_contiguous) {
        v.strides[0] = Hkv * D * W; v.strides[1] = D * W; v.strides[2] = 1; v.strides[3] = W;
    } else {
        v.strides[0] = Hkv * W * D; v.strides[1] = W * D; v.strides[2] = D; v.strides[3] = 1;
    }
    const int64_t n = B * Hkv * W * D;
    v.mem.assign(n + 2 * kMargin, fill);
    v.off = kMargin;
    v.used_lo = kMargin;
    v.used_hi = kMargin + n;
    return v;
}

template <typename T>
struct Runner {
    Case c;
    double scale;
    std::map<std::tuple<int, int64_t, int64_t, int64_t, int64_t>, double> inj;
    View<T> kc, vc;
    std::vector<int64_t> tok;  // strided tokens storage
    std::vector<int64_t> n;    // counters as the reference tracks them

    explicit Runner(const Case &cs) : c(cs) {
        scale = 1.0 / std::sqrt((double)c.D);
        for (auto &i : c.inject) inj[{i.kind, i.b, i.pos, i.head, i.d}] = i.value;
    }
    T val_t(int kind, int64_t b, int64_t pos, int64_t head, int64_t d) {
        auto it = inj.find({kind, b, pos, head, d});
        if (it != inj.end()) return to_t<T>(it->second);
        return to_t<T>(rnd(kind, b, pos, head, d, c.seed));
    }
    double val(int kind, int64_t b, int64_t pos, int64_t head, int64_t d) { return to_d(val_t(kind, b, pos, head, d)); }
    bool valid(int64_t nn, int64_t Tn) { return nn >= 0 && nn <= ((int64_t)1 << 62) - Tn; }

    void ref_row(int64_t b, int64_t p, int64_t h, std::vector<double> &o, bool &nonfinite) {
        const int64_t G = c.H / c.Hkv, kh = h / G, lo = std::max<int64_t>(0, p - c.W + 1);
        std::vector<double> s;
        double m = -INFINITY;
        nonfinite = false;
        for (int64_t u = lo; u <= p; u++) {
            double acc = 0;
            for (int64_t d = 0; d < c.D; d++) acc += val(0, b, p, h, d) * val(1, b, u, kh, d);
            s.push_back(scale * acc);
            if (!std::isfinite(s.back())) nonfinite = true;
            m = std::max(m, s.back());
        }
        o.assign(c.D, 0.0);
        double l = 0;
        for (int64_t u = lo; u <= p; u++) {
            const double e = std::exp(s[u - lo] - m);
            l += e;
            for (int64_t d = 0; d < c.D; d++) {
                const double vv = val(2, b, u, kh, d);
                if (!std::isfinite(vv)) nonfinite = true;
                o[d] += e * vv;
            }
        }
        for (auto &x : o) x /= l;
    }

    double atol() {
        if (std::is_same<T, float>::value) return 2e-5;
        if (std::is_same<T, __half>::value) return 6e-3;
        return 3e-2;
    }

    void init_cache() {
        const T nan = to_t<T>(NAN);
        const T sentinel = to_t<T>(-12345.0);
        const int kl = c.cache_layout;
        kc = make_cache<T>(c.B, c.Hkv, c.W, c.D, kl >= 1, sentinel);
        vc = make_cache<T>(c.B, c.Hkv, c.W, c.D, kl >= 2, sentinel);
        for (int64_t b = 0; b < c.B; b++)
            for (int64_t kh = 0; kh < c.Hkv; kh++)
                for (int64_t s = 0; s < c.W; s++)
                    for (int64_t d = 0; d < c.D; d++) {
                        const int64_t nn = c.n0[b];
                        T kv = nan, vv = nan;
                        if (!valid(nn, 0)) {
                            kv = to_t<T>(rnd(5, b, s, kh, d, c.seed));
                            vv = to_t<T>(rnd(6, b, s, kh, d, c.seed));
                        } else {
                            // the position held by slot s: the largest u < nn with u % W == s, if u >= 0 and u >= nn - W
                            const int64_t last = nn - 1;
                            if (last >= 0) {
                                int64_t u = last - ((last % c.W) - s + c.W) % c.W;
                                if (u >= 0 && u >= nn - c.W) {
                                    kv = val_t(1, b, u, kh, d);
                                    vv = val_t(2, b, u, kh, d);
                                }
                            }
                        }
                        *kc.at(b, kh, s, d) = kv;
                        *vc.at(b, kh, s, d) = vv;
                    }
        tok.assign(c.B * c.tokens_stride + 2, -777);
        for (int64_t b = 0; b < c.B; b++) tok[1 + b * c.tokens_stride] = c.n0[b];
        n = c.n0;
    }

    // expected cache after positions [from, to) were stored for sequence b (valid only)
    void check_cache(const std::vector<T> &kc_before, const std::vector<T> &vc_before, const std::vector<int64_t> &stored_lo,
                     const std::vector<int64_t> &stored_hi, const char *what) {
        for (size_t i = 0; i < kc.mem.size(); i++) {
            if (i < kc.used_lo || i >= kc.used_hi) CHECK(same_bits(kc.mem[i], kc_before[i]), "%s: k cache margin %zu changed", what, i);
        }
        for (size_t i = 0; i < vc.mem.size(); i++) {
            if (i < vc.used_lo || i >= vc.used_hi) CHECK(same_bits(vc.mem[i], vc_before[i]), "%s: v cache margin %zu changed", what, i);
        }
        View<T> kb = kc, vb = vc;
        kb.mem = kc_before;
        vb.mem = vc_before;
        for (int64_t b = 0; b < c.B; b++)
            for (int64_t kh = 0; kh < c.Hkv; kh++)
                for (int64_t s = 0; s < c.W; s++) {
                    int64_t u = -1;  // position expected in slot s from this call
                    for (int64_t p = stored_lo[b]; p < stored_hi[b]; p++)
                        if (p % c.W == s) u = p;
                    for (int64_t d = 0; d < c.D; d++) {
                        const T ek = u >= 0 ? val_t(1, b, u, kh, d) : *kb.at(b, kh, s, d);
                        const T ev = u >= 0 ? val_t(2, b, u, kh, d) : *vb.at(b, kh, s, d);
                        CHECK(same_bits(*kc.at(b, kh, s, d), ek), "%s: k cache b=%" PRId64 " kh=%" PRId64 " slot=%" PRId64
                              " d=%" PRId64 " (pos %" PRId64 ")", what, b, kh, s, d, u);
                        CHECK(same_bits(*vc.at(b, kh, s, d), ev), "%s: v cache b=%" PRId64 " kh=%" PRId64 " slot=%" PRId64
                              " d=%" PRId64, what, b, kh, s, d);
                    }
                }
    }

    void check_tokens(const char *what) {
        for (size_t i = 0; i < tok.size(); i++) {
            const bool is_slot = i >= 1 && (int64_t)(i - 1) % c.tokens_stride == 0 && (int64_t)(i - 1) / c.tokens_stride < c.B;
            if (!is_slot) CHECK(tok[i] == -777, "%s: tokens margin changed", what);
        }
        for (int64_t b = 0; b < c.B; b++)
            CHECK(tok[1 + b * c.tokens_stride] == n[b], "%s: tokens[%" PRId64 "] = %" PRId64 ", want %" PRId64, what, b,
                  tok[1 + b * c.tokens_stride], n[b]);
    }

    based_sliding_window_args base_args() {
        based_sliding_window_args a;
        memset(&a, 0, sizeof a);
        a.device.kind = BASED_DEVICE_CUDA;
        a.device.id = 0;
        a.k_cache = kc.tensor();
        a.v_cache = vc.tensor();
        a.tokens.data = (char *)(tok.data() + 1);
        a.tokens.strides[0] = c.tokens_stride;
        a.tokens.dtype = BASED_DTYPE_INT64;
        a.tokens.itemsize = 8;
        a.batch = c.B;
        a.heads = c.H;
        a.kv_heads = c.Hkv;
        a.head_dim = c.D;
        a.window = c.W;
        a.scale = scale;
        return a;
    }

    // compares out rows (b, t, h) for positions n_before[b] + t
    void check_out(View<T> &out, int64_t Tn, const std::vector<int64_t> &n_before, bool decode, const char *what) {
        for (size_t i = 0; i < out.mem.size(); i++)
            if (i < out.used_lo || i >= out.used_hi) CHECK(std::isnan(to_d(out.mem[i])), "%s: out margin %zu written", what, i);
        double worst = 0;
        for (int64_t b = 0; b < c.B; b++) {
            const bool ok = valid(n_before[b], decode ? 1 : Tn);
            for (int64_t t = 0; t < Tn; t++)
                for (int64_t h = 0; h < c.H; h++) {
                    std::vector<double> o;
                    bool nonfinite = false;
                    if (ok) ref_row(b, n_before[b] + t, h, o, nonfinite);
                    bool row_nonfinite = false;
                    for (int64_t d = 0; d < c.D; d++) {
                        const double got = to_d(*out.at(b, t, h, d));
                        if (!ok) {
                            CHECK(std::isnan(got), "%s: invalid sequence %" PRId64 " got %g", what, b, got);
                            continue;
                        }
                        if (!std::isfinite(got)) row_nonfinite = true;
                        if (nonfinite) continue;
                        const double err = std::fabs(got - o[d]);
                        worst = std::max(worst, err);
                        CHECK(err <= atol() * (1 + std::fabs(o[d])), "%s: b=%" PRId64 " t=%" PRId64 " h=%" PRId64 " d=%" PRId64
                              " got %.6g want %.6g", what, b, t, h, d, got, o[d]);
                    }
                    if (ok) CHECK(row_nonfinite == nonfinite, "%s: b=%" PRId64 " t=%" PRId64 " h=%" PRId64
                                  " non-finite output %d, reference %d", what, b, t, h, (int)row_nonfinite, (int)nonfinite);
                }
        }
        if (g_emu_verbose) printf("    %s worst err %.3g\n", what, worst);
    }

    void run() {
        init_cache();
        const T nan = to_t<T>(NAN);
        // ---- prefill ----
        {
            const int64_t Tn = c.T;
            View<T> q = make_act<T>(c.B, Tn, c.H, c.D, c.layout, nan);
            View<T> k = make_act<T>(c.B, Tn, c.Hkv, c.D, c.layout, nan);
            View<T> v = make_act<T>(c.B, Tn, c.Hkv, c.D, c.layout, nan);
            View<T> out = make_act<T>(c.B, Tn, c.H, c.D, c.layout, nan);
            for (int64_t b = 0; b < c.B; b++)
                for (int64_t t = 0; t < Tn; t++) {
                    const int64_t p = c.n0[b] + t;
                    for (int64_t h = 0; h < c.H; h++)
                        for (int64_t d = 0; d < c.D; d++) *q.at(b, t, h, d) = val_t(0, b, p, h, d);
                    for (int64_t h = 0; h < c.Hkv; h++)
                        for (int64_t d = 0; d < c.D; d++) {
                            *k.at(b, t, h, d) = val_t(1, b, p, h, d);
                            *v.at(b, t, h, d) = val_t(2, b, p, h, d);
                        }
                }
            based_sliding_window_args a = base_args();
            a.phase = BASED_PHASE_PREFILL;
            a.q = q.tensor(); a.k = k.tensor(); a.v = v.tensor(); a.out = out.tensor();
            a.seqlen = Tn;
            const std::vector<T> kb = kc.mem, vb = vc.mem;
            const based_status st = based_cuda_sliding_window_prefill(&a, nullptr);
            CHECK(st == BASED_STATUS_OK, "prefill status %d: %s", (int)st, g_last_error);
            std::vector<int64_t> before = n, slo(c.B), shi(c.B);
            for (int64_t b = 0; b < c.B; b++) {
                if (valid(n[b], Tn)) {
                    slo[b] = n[b] + std::max<int64_t>(0, Tn - c.W);
                    shi[b] = n[b] + Tn;
                    n[b] += Tn;
                } else {
                    slo[b] = shi[b] = 0;
                }
            }
            check_out(out, Tn, before, false, "prefill");
            check_cache(kb, vb, slo, shi, "prefill");
            check_tokens("prefill");
        }
        // ---- decode steps ----
        for (int step = 0; step < c.decode_steps; step++) {
            View<T> q = make_act<T>(c.B, 1, c.H, c.D, c.layout == 1 ? 0 : c.layout, nan);
            View<T> k = make_act<T>(c.B, 1, c.Hkv, c.D, c.layout == 1 ? 0 : c.layout, nan);
            View<T> v = make_act<T>(c.B, 1, c.Hkv, c.D, c.layout == 1 ? 0 : c.layout, nan);
            View<T> out = make_act<T>(c.B, 1, c.H, c.D, c.layout == 1 ? 0 : c.layout, nan);
            for (auto *x : {&q, &k, &v, &out}) x->strides[1] = 0;  // (B, H, D) seen as (B, 1, H, D)
            for (int64_t b = 0; b < c.B; b++) {
                const int64_t p = n[b];
                for (int64_t h = 0; h < c.H; h++)
                    for (int64_t d = 0; d < c.D; d++) *q.at(b, 0, h, d) = val_t(0, b, p, h, d);
                for (int64_t h = 0; h < c.Hkv; h++)
                    for (int64_t d = 0; d < c.D; d++) {
                        *k.at(b, 0, h, d) = val_t(1, b, p, h, d);
                        *v.at(b, 0, h, d) = val_t(2, b, p, h, d);
                    }
            }
            based_sliding_window_args a = base_args();
            a.phase = BASED_PHASE_DECODE;
            a.q = q.tensor(); a.k = k.tensor(); a.v = v.tensor(); a.out = out.tensor();
            a.seqlen = 1;
            const std::vector<T> kb = kc.mem, vb = vc.mem;
            const based_status st = based_cuda_sliding_window_decode(&a, nullptr);
            CHECK(st == BASED_STATUS_OK, "decode status %d: %s", (int)st, g_last_error);
            std::vector<int64_t> before = n, slo(c.B), shi(c.B);
            for (int64_t b = 0; b < c.B; b++) {
                if (valid(n[b], 1)) {
                    slo[b] = n[b];
                    shi[b] = n[b] + 1;
                    n[b] += 1;
                } else {
                    slo[b] = shi[b] = 0;
                }
            }
            char what[64];
            snprintf(what, sizeof what, "decode step %d", step);
            check_out(out, 1, before, true, what);
            check_cache(kb, vb, slo, shi, what);
            check_tokens(what);
        }
    }
};

template <typename T>
void run_case(const Case &c) {
    const int before = g_fail;
    Runner<T> r(c);
    r.run();
    printf("%-5s %-40s %s\n", dname<T>(), c.name.c_str(), g_fail == before ? "ok" : "FAILED");
    fflush(stdout);
}

int main(int argc, char **argv) {
    const int64_t big = ((int64_t)1 << 62);
    std::vector<Case> cases;
    auto add = [&](Case c) { cases.push_back(c); };
    // name, B, T, H, Hkv, D, W, n0, layout, cache_layout, decode_steps
    add({"basic T=5 W=7 D=16", 1, 5, 2, 1, 16, 7, {0}, 0, 0, 3});
    add({"T=65 W=64 D=64 gqa2 n0=0,3", 2, 65, 4, 2, 64, 64, {0, 3}, 0, 0, 2});
    add({"continued T=130 W=65 D=64 n0=100", 1, 130, 2, 2, 64, 65, {100}, 0, 1, 3});
    add({"D=100 W=300 gqa6 n0=0,250", 2, 70, 6, 1, 100, 300, {0, 250}, 0, 1, 2});
    add({"D=256 W=20 n0=17", 1, 40, 2, 1, 256, 20, {17}, 0, 0, 2});
    add({"D=112 W=1", 1, 33, 2, 2, 112, 1, {5}, 0, 0, 3});
    add({"D=128 W=64 invalid -5, wrap 60", 2, 20, 4, 4, 128, 64, {-5, 60}, 0, 2, 5});
    add({"near 2^62 valid / invalid", 2, 10, 2, 1, 64, 8, {big - 10, big - 9}, 0, 0, 0});
    add({"decode at 2^62-1", 1, 1, 2, 1, 32, 8, {big - 3}, 0, 0, 3});
    add({"transposed layout D=64 W=64", 1, 100, 2, 1, 64, 64, {30}, 1, 0, 2});
    add({"T step 2 D=48", 1, 50, 3, 1, 48, 16, {7}, 2, 1, 2});
    add({"misaligned D=64", 1, 70, 2, 2, 64, 64, {0}, 3, 0, 2});
    add({"last stride 2 D=40", 1, 30, 2, 1, 40, 9, {12}, 4, 2, 2});
    add({"D=1 W=3", 2, 9, 2, 1, 1, 3, {0, 4}, 0, 0, 4});
    add({"D=7 T=1", 3, 1, 2, 2, 7, 4, {0, 1, 9}, 0, 1, 2});
    add({"H=0 (cache only)", 2, 6, 0, 1, 16, 4, {0, 3}, 0, 0, 2});
    add({"G=16 D=32 decode groups", 1, 3, 16, 1, 32, 12, {20}, 0, 0, 2});
    add({"G=12 D=64 decode 2 groups", 1, 2, 12, 1, 64, 130, {140}, 0, 1, 2});
    add({"W=200 decode chunks D=16", 1, 4, 2, 1, 16, 200, {300}, 0, 0, 2});
    {
        Case c{"tokens stride 2", 2, 17, 2, 1, 16, 5, {3, 0}, 0, 0, 1};
        c.tokens_stride = 2;
        add(c);
    }
    {
        Case c{"nonfinite v inf @3, k nan @7", 1, 20, 4, 2, 64, 5, {0}, 0, 0, 2};
        c.inject = {{2, 0, 3, 0, 5, INFINITY}, {1, 0, 7, 1, 9, NAN}};
        add(c);
    }
    {
        Case c{"nonfinite in cache and decode", 1, 12, 2, 1, 64, 6, {10}, 0, 1, 4};
        c.inject = {{2, 0, 8, 0, 1, -INFINITY}, {2, 0, 23, 0, 2, INFINITY}};
        add(c);
    }
    std::set<std::string> only;
    int dtypes = 7;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "-v") g_emu_verbose = true;
        else if (a == "f32") dtypes = 1;
        else if (a == "f16") dtypes = 2;
        else if (a == "bf16") dtypes = 4;
        else only.insert(a);
    }
    for (size_t i = 0; i < cases.size(); i++) {
        if (!only.empty() && !only.count(std::to_string(i))) continue;
        if (dtypes & 1) run_case<float>(cases[i]);
        if (dtypes & 2) run_case<__half>(cases[i]);
        if (dtypes & 4) run_case<__nv_bfloat16>(cases[i]);
    }
    printf("%d failures\n", g_fail);
    return g_fail != 0;
}
