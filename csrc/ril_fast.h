/* ril_fast CUDA library: plain C ABI, loaded from Python with ctypes (no torch headers).
 *
 * Conventions
 *   - every function is `ril_<op>_<dtype>` with dtype f32 | f16 | bf16 (the I/O element type);
 *     accumulation is always fp32;
 *   - raw device pointers, then sizes and strides in elements (int64), then scales, and the
 *     cudaStream_t last; nothing synchronises with the host;
 *   - the return value is a status: RIL_OK, RIL_ERR_* below, or RIL_ERR_CUDA_BASE + cudaError_t;
 *     ril_status_string() turns it into text;
 *   - bump RIL_ABI_VERSION whenever a signature or a semantic changes; the loader refuses a
 *     library whose ril_abi_version() differs from the one it was written for.
 */
#ifndef RIL_FAST_H
#define RIL_FAST_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#define RIL_ABI_VERSION 1

#define RIL_OK 0
#define RIL_ERR_INVALID_ARGUMENT 1 /* null pointer, negative size, bad stride or prediction type */
#define RIL_ERR_UNSUPPORTED 2      /* valid but beyond what the kernels handle (e.g. grid too large) */
#define RIL_ERR_CUDA_BASE 1000     /* + cudaError_t from the launch */

#if defined(__GNUC__)
#define RIL_API __attribute__((visibility("default")))
#else
#define RIL_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

RIL_API int ril_abi_version(void);
RIL_API const char* ril_status_string(int status);

/* ---- LoRA group linear ------------------------------------------------------------------------
 * Stacked layout: A_cat (R x d_in) = [A_1; ...; A_k], B_cat (d_out x R) = [B_1 | ... | B_k], both
 * contiguous; rank_scale (R, fp32) holds s_i repeated r_i times. W (d_out x d_in) contiguous.
 *   S = (X A_cat^T) * rank_scale          (M x R, contiguous, saved for backward)
 *   Y = X W^T + S B_cat^T + bias           (M x d_out, row stride ldy)
 * x has row stride ldx (unit column stride). bias may be NULL. R may be 0. */
#define RIL_DECLARE_LORA(SUFFIX)                                                                     \
  RIL_API int ril_lora_group_fwd_##SUFFIX(const void* x, int64_t ldx, const void* w, const void* bias,     \
                                  const void* a_cat, const void* b_cat, const float* rank_scale,    \
                                  void* s_out, void* y, int64_t ldy, int64_t M, int64_t d_in,       \
                                  int64_t d_out, int64_t R, cudaStream_t stream);                   \
  /* dS = (dY B_cat) * rank_scale into ds_out (M x R, contiguous); dX = dY W + dS A_cat if dx. */   \
  RIL_API int ril_lora_group_bwd_##SUFFIX(const void* dy, int64_t lddy, const void* w, const void* a_cat,  \
                                  const void* b_cat, const float* rank_scale, void* ds_out,         \
                                  void* dx, int64_t lddx, int64_t M, int64_t d_in, int64_t d_out,   \
                                  int64_t R, cudaStream_t stream);                                  \
  /* Grads of the rank slice [off, off + r): dB = dY^T S[:, slice] (d_out x r) if db,             \
   * dA = dS[:, slice]^T X (r x d_in) if da; both contiguous. s and ds as from fwd / bwd. */       \
  RIL_API int ril_lora_group_slice_grads_##SUFFIX(const void* dy, int64_t lddy, const void* x,             \
                                          int64_t ldx, const void* s, const void* ds, int64_t M,   \
                                          int64_t d_in, int64_t d_out, int64_t R, int64_t off,     \
                                          int64_t r, void* da, void* db, cudaStream_t stream);     \
  /* C = alpha * (A B^T) * col_scale + bias, with A (M x K), B (N x K) and C (M x N) addressed  \
   * by arbitrary element strides; col_scale (fp32) and bias may be NULL. */                      \
  RIL_API int ril_gemm_##SUFFIX(int64_t M, int64_t N, int64_t K, const void* a, int64_t sam, int64_t sak, \
                        const void* b, int64_t sbn, int64_t sbk, void* c, int64_t scm,             \
                        int64_t scn, float alpha, const float* col_scale, const void* bias,        \
                        cudaStream_t stream);

RIL_DECLARE_LORA(f32)
RIL_DECLARE_LORA(f16)
RIL_DECLARE_LORA(bf16)

/* ---- Last-step distillation MSE ---------------------------------------------------------------
 * student, teacher: (B x N) contiguous; alpha_bar, weight (NULL = 1): (B) fp32 device arrays;
 * pred: 0 epsilon, 1 v_prediction, 2 sample. x0_s - x0_t = c_b (s - t), so x_t is not needed.
 *   loss = mean_b(w_b c_b^2 mean_i (s - t)^2)  -> out (one fp32)
 * workspace: ril_distill_mse_workspace_floats(B, N) fp32 elements (one partial per block).
 * The forward is one launch: the last block to finish (atomic ticket on a library-internal counter,
 * one per (device, stream)) sums all partials in a fixed order, so the loss is bitwise reproducible
 * and CUDA-graph capturable. Concurrent forwards on different streams are fine; two forwards must not
 * run at once on one stream's counter (e.g. a graph captured on stream S replayed on another stream
 * while S runs an eager forward). RIL_ERR_UNSUPPORTED past 1024 distinct streams per device. */
RIL_API int64_t ril_distill_mse_workspace_floats(int64_t B, int64_t N);
#define RIL_DECLARE_DISTILL(SUFFIX)                                                                  \
  RIL_API int ril_distill_mse_fwd_##SUFFIX(const void* student, const void* teacher,                       \
                                   const float* alpha_bar, const float* weight, float* workspace,  \
                                   float* out, int64_t B, int64_t N, int pred,                     \
                                   cudaStream_t stream);                                           \
  /* d_student = grad * 2 w_b c_b^2 (s - t) / (B N); grad is one fp32 on the device. */            \
  RIL_API int ril_distill_mse_bwd_##SUFFIX(const float* grad, const void* student, const void* teacher,    \
                                   const float* alpha_bar, const float* weight, void* d_student,   \
                                   int64_t B, int64_t N, int pred, cudaStream_t stream);

RIL_DECLARE_DISTILL(f32)
RIL_DECLARE_DISTILL(f16)
RIL_DECLARE_DISTILL(bf16)

#ifdef __cplusplus
}
#endif

#endif /* RIL_FAST_H */
