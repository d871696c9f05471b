/*
 * native.c -- machine baselines for the benchmarks, compiled by benchmarks/common.py at
 * run time (cc -O3 -march=native -fopenmp -shared) and called through ctypes:
 *
 *   bench_fma_peak(threads, iters)     float32 FMA throughput in GFLOP/s: each thread runs 12
 *                                      independent chains of 256-bit FMAs (enough to cover
 *                                      the FMA latency on every x86-64 core with two FMA pipes);
 *                                      the portable mul+add fallback runs without AVX2+FMA.
 *   bench_stream(x, n, threads, reps)  seconds per in-place pass x[i] = x[i] * a + b over n
 *                                      floats: reading and writing every byte once, the
 *                                      least any decode step must do to its state.
 */
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static double now(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return 0.0;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static float fma_chains_avx2(int64_t iters) {
    __m256 a0 = _mm256_set1_ps(0.f), a1 = _mm256_set1_ps(1.f), a2 = _mm256_set1_ps(2.f), a3 = _mm256_set1_ps(3.f);
    __m256 a4 = _mm256_set1_ps(4.f), a5 = _mm256_set1_ps(5.f), a6 = _mm256_set1_ps(6.f), a7 = _mm256_set1_ps(7.f);
    __m256 a8 = _mm256_set1_ps(8.f), a9 = _mm256_set1_ps(9.f), a10 = _mm256_set1_ps(10.f), a11 = _mm256_set1_ps(11.f);
    const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (int64_t i = 0; i < iters; i++) {
        a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c); a2 = _mm256_fmadd_ps(a2, m, c);
        a3 = _mm256_fmadd_ps(a3, m, c); a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
        a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c); a8 = _mm256_fmadd_ps(a8, m, c);
        a9 = _mm256_fmadd_ps(a9, m, c); a10 = _mm256_fmadd_ps(a10, m, c); a11 = _mm256_fmadd_ps(a11, m, c);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0];
}

static int have_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static float fma_chains_avx2(int64_t iters) { (void)iters; return 0.f; }
static int have_avx2_fma(void) { return 0; }
#endif

/* 12 chains of 8 floats in plain C (mul + add: 2 flops per element and step). */
static float fma_chains_portable(int64_t iters) {
    float a[12][8];
    for (int j = 0; j < 12; j++)
        for (int l = 0; l < 8; l++) a[j][l] = (float)(j + l);
    for (int64_t i = 0; i < iters; i++)
        for (int j = 0; j < 12; j++)
            for (int l = 0; l < 8; l++) a[j][l] = a[j][l] * 0.999999f + 1e-7f;
    float s = 0.f;
    for (int j = 0; j < 12; j++) s += a[j][0];
    return s;
}

double bench_fma_peak(int threads, int64_t iters) {
    const int avx2 = have_avx2_fma();
    volatile float sink = 0.f;
    double t0 = now();
#pragma omp parallel num_threads(threads)
    {
        float s = avx2 ? fma_chains_avx2(iters) : fma_chains_portable(iters);
#pragma omp atomic
        sink += s;
    }
    double t = now() - t0;
    (void)sink;
    return (double)threads * (double)iters * 12.0 * 8.0 * 2.0 / t / 1e9;
}

int bench_fma_is_avx2(void) { return have_avx2_fma(); }

double bench_stream(float *x, int64_t n, int threads, int reps) {
    volatile float one = 1.0f, zero = 0.0f; /* opaque to the optimiser: the pass must happen */
    const float a = one, b = zero;
    double t0 = now();
    for (int r = 0; r < reps; r++) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < n; i++) x[i] = x[i] * a + b;
    }
    return (now() - t0) / reps;
}
