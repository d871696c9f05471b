/*
 * sliding_window.h -- what the sliding-window kernels (sliding_window.c) and their
 * plain-loop twins (sliding_window_ref.c) share. Both run the arguments of one check
 * (based_sliding_window_check, ops.h), so they accept and reject exactly the same calls
 * and differ only in the arithmetic.
 *
 * Semantics (SPEC 1.2): query position p attends key positions u in (p - W, p]; query
 * head h reads kv head h / (H / Hkv). Ring cache: position u of sequence b lives in
 * slot u % W of k_cache/v_cache[b, kv_head]; tokens[b] counts positions seen.
 */
#ifndef BASED_SLIDING_WINDOW_H
#define BASED_SLIDING_WINDOW_H

#include "internal.h"
#include "ops.h"

/* Head dims the sliding-window ops accept (based.h; the CUDA kernels share the limit). */
#define BASED_WINDOW_MAX_HEAD_DIM BASED_MAX_HEAD_DIM

/* Positions (tokens + T) stay below this, so position arithmetic never nears int64's end. */
#define BASED_WINDOW_MAX_POSITION ((int64_t)1 << 62)

/* Name of the kernels this CPU runs ("avx512", "avx2" or "generic"): picked once, at the
 * first call, from the CPU and BASED_CPU_ISA. */
const char *based_window_kernel_isa(void);

/* Address of element [i0, i1, i2, 0] of a checked tensor. */
static inline char *based_window_row(const based_tensor *x, int64_t i0, int64_t i1, int64_t i2) {
    return x->data + BASED_AT3(*x, i0, i1, i2) * x->itemsize;
}

#endif /* BASED_SLIDING_WINDOW_H */
