/*
 * ops.h -- every op of based.h, phase by phase: the check that turns its DLTensor
 * arguments into checked arguments (args.h), and the CPU code that runs them. The public
 * entry points (csrc/dispatch.c) call the check, then the CPU function here or the CUDA
 * function of kernels/based_cuda.h with the same arguments.
 *
 *   op                   check, CPU kernel     reference twin           CUDA kernel
 *   taylor_feature_map   feature_map.c         -                        kernels/feature_map.cu
 *   linear_attention     linear_attention.c    linear_attention_ref.c   kernels/linear_attention_{prefill,decode}.cu
 *   sliding_window       sliding_window.c      sliding_window_ref.c     kernels/sliding_window_{prefill,decode}.cu
 *   linear_state         linear_state.c        -                        kernels/state.cu
 *   state zero/copy/...  state.c               -                        kernels/state.cu
 *   (the C files are in csrc/)
 *
 * Checks (SPEC 4) read the DLTensor descriptions; of tensor memory they read only the token
 * counters of CPU calls and the batch indices (host memory always), and they write only
 * *args. Messages name the op as the user called it (`op`, e.g. "linear_attention_decode_ref").
 * A check that passes leaves a call the kernels of either backend can run as given.
 */
#ifndef BASED_OPS_H
#define BASED_OPS_H

#include "args.h"

/* ---- taylor_feature_map ------------------------------------------------------------- */

based_status based_taylor_feature_map_check(based_feature_map_args *args, const DLTensor *x, const DLTensor *out,
                                            double scale);
based_status based_cpu_taylor_feature_map(const based_feature_map_args *args);

/* ---- linear_attention: prefill (q (B, T, H, Dk)) and decode (q (B, H, Dk)) ----------- */

based_status based_linear_attention_check(based_linear_attention_args *args, const DLTensor *q, const DLTensor *k,
                                          const DLTensor *v, const DLTensor *kv, const DLTensor *ksum,
                                          const DLTensor *tokens, const DLTensor *out,
                                          const based_linear_attention_params *params, based_phase phase,
                                          const char *op);
based_status based_cpu_linear_attention_prefill(const based_linear_attention_args *args);
based_status based_cpu_linear_attention_decode(const based_linear_attention_args *args);
based_status based_cpu_linear_attention_prefill_ref(const based_linear_attention_args *args);
based_status based_cpu_linear_attention_decode_ref(const based_linear_attention_args *args);

/* ---- sliding_window: prefill (q (B, T, H, D)) and decode (q (B, H, D)) --------------- */

based_status based_sliding_window_check(based_sliding_window_args *args, const DLTensor *q, const DLTensor *k,
                                        const DLTensor *v, const DLTensor *k_cache, const DLTensor *v_cache,
                                        const DLTensor *tokens, const DLTensor *out,
                                        const based_sliding_window_params *params, based_phase phase,
                                        const char *op);
based_status based_cpu_sliding_window_prefill(const based_sliding_window_args *args);
based_status based_cpu_sliding_window_decode(const based_sliding_window_args *args);
based_status based_cpu_sliding_window_prefill_ref(const based_sliding_window_args *args);
based_status based_cpu_sliding_window_decode_ref(const based_sliding_window_args *args);

/* ---- linear_state: compact <-> expanded layout of the linear-attention state ---------- */

/* from_expanded = 0: (kv, ksum) -> (kv_exp, ksum_exp); 1: the other way. */
based_status based_linear_state_check(based_linear_state_args *args, const DLTensor *kv, const DLTensor *ksum,
                                      const DLTensor *kv_exp, const DLTensor *ksum_exp, int from_expanded,
                                      const char *op);
based_status based_cpu_linear_state_convert(const based_linear_state_args *args);

/* ---- state helpers: zero / copy / gather along axis 0 --------------------------------
 * A check that passes may have allocated args->indices (the batch indices read on the
 * host, normalised); based_state_args_free() releases them, whatever the call did next. */

based_status based_state_zero_check(based_state_args *args, const DLTensor *t, const DLTensor *batch_indices);
based_status based_state_copy_check(based_state_args *args, const DLTensor *dst, const DLTensor *src);
based_status based_state_gather_check(based_state_args *args, const DLTensor *dst, const DLTensor *src,
                                      const DLTensor *indices);
void based_state_args_free(based_state_args *args);
based_status based_cpu_state_zero(const based_state_args *args);
based_status based_cpu_state_copy(const based_state_args *args);
based_status based_cpu_state_gather(const based_state_args *args);

#endif /* BASED_OPS_H */
