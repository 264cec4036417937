// LoRA group linear, forward and backward, built on one strided tile GEMM:
//   C = alpha * (A1 B1^T + A2 B2^T) * col_scale + bias
// with arbitrary element strides, so every product of the forward and backward (including the
// transposed ones) is the same kernel with different strides and no transposed copies.
// bf16/fp16 use tensor cores through WMMA (mma.sync, sm_80+); fp32 uses a SIMT inner loop.
// Tiles are 64x64x32 with 4 warps (2x2 warps of 32x32), fp32 accumulation.
#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace ril {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 32, kPad = 8, kThreads = 128;

struct Operand {
  const void* a;  // (M x K) via (sam, sak)
  int64_t sam, sak;
  const void* b;  // (N x K) via (sbn, sbk)
  int64_t sbn, sbk;
  int64_t K;
};

struct GemmParams {
  int64_t M, N;
  Operand op[2];
  int nops;
  void* c;
  int64_t scm, scn;
  float alpha;
  const float* col_scale;
  const void* bias;
};

// Loads a (rows x kBK) tile into shared memory, zero-padded; iterates along whichever of the two
// global strides is unit so a warp's loads coalesce.
template <typename T, int kRows>
__device__ __forceinline__ void load_tile(T (*dst)[kBK + kPad], const T* src, int64_t row0, int64_t rows,
                                          int64_t srow, int64_t k0, int64_t K, int64_t sk) {
  const bool row_fast = srow == 1 && sk != 1;
  for (int i = threadIdx.x; i < kRows * kBK; i += kThreads) {
    const int r = row_fast ? i % kRows : i / kBK;
    const int k = row_fast ? i / kRows : i % kBK;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[r][k] = (gr < rows && gk < K) ? src[gr * srow + gk * sk] : from_f32<T>(0.f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams p) {
  __shared__ __align__(32) T As[kBM][kBK + kPad];
  __shared__ __align__(32) T Bs[kBN][kBK + kPad];
  __shared__ __align__(32) float Cs[kBM][kBN + 4];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  constexpr bool kTensorCore = !std::is_same<T, float>::value;

  if constexpr (kTensorCore) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int o = 0; o < p.nops; ++o) {
      const Operand& op = p.op[o];
      for (int64_t k0 = 0; k0 < op.K; k0 += kBK) {
        load_tile<T, kBM>(As, static_cast<const T*>(op.a), m0, p.M, op.sam, k0, op.K, op.sak);
        load_tile<T, kBN>(Bs, static_cast<const T*>(op.b), n0, p.N, op.sbn, k0, op.K, op.sbk);
        __syncthreads();
        for (int kk = 0; kk < kBK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
          for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[wm * 32 + i * 16][kk], kBK + kPad);
          for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[wn * 32 + j * 16][kk], kBK + kPad);
          for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
      }
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Cs[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kBN + 4, wmma::mem_row_major);
  } else {
    // Each thread owns rows ty + 8i and columns tx + 16j of the tile.
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[8][4] = {};
    for (int o = 0; o < p.nops; ++o) {
      const Operand& op = p.op[o];
      for (int64_t k0 = 0; k0 < op.K; k0 += kBK) {
        load_tile<T, kBM>(As, static_cast<const T*>(op.a), m0, p.M, op.sam, k0, op.K, op.sak);
        load_tile<T, kBN>(Bs, static_cast<const T*>(op.b), n0, p.N, op.sbn, k0, op.K, op.sbk);
        __syncthreads();
        for (int k = 0; k < kBK; ++k) {
          float a[8], b[4];
          for (int i = 0; i < 8; ++i) a[i] = to_f32(As[ty + 8 * i][k]);
          for (int j = 0; j < 4; ++j) b[j] = to_f32(Bs[tx + 16 * j][k]);
          for (int i = 0; i < 8; ++i)
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
      }
    }
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) Cs[ty + 8 * i][tx + 16 * j] = acc[i][j];
  }
  __syncthreads();

  // Epilogue: alpha, per-column scale, bias, cast; walk the output along its unit stride.
  T* c = static_cast<T*>(p.c);
  const T* bias = static_cast<const T*>(p.bias);
  const bool m_fast = p.scm == 1 && p.scn != 1;
  for (int i = threadIdx.x; i < kBM * kBN; i += kThreads) {
    const int r = m_fast ? i % kBM : i / kBN;
    const int q = m_fast ? i / kBM : i % kBN;
    const int64_t m = m0 + r, n = n0 + q;
    if (m >= p.M || n >= p.N) continue;
    float v = Cs[r][q] * p.alpha;
    if (p.col_scale) v *= p.col_scale[n];
    if (bias) v += to_f32(bias[n]);
    c[m * p.scm + n * p.scn] = from_f32<T>(v);
  }
}

template <typename T>
int run_gemm(const GemmParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || !p.c) return RIL_ERR_INVALID_ARGUMENT;
  for (int o = 0; o < p.nops; ++o)
    if (p.op[o].K < 0 || (p.op[o].K > 0 && (!p.op[o].a || !p.op[o].b))) return RIL_ERR_INVALID_ARGUMENT;
  if (p.M == 0 || p.N == 0) return RIL_OK;
  const int64_t gm = cdiv(p.M, kBM), gn = cdiv(p.N, kBN);
  if (gm > 2147483647LL || gn > 65535) return RIL_ERR_UNSUPPORTED;
  gemm_kernel<T><<<dim3(static_cast<unsigned>(gm), static_cast<unsigned>(gn)), kThreads, 0, stream>>>(p);
  return launch_status();
}

GemmParams make_params(int64_t M, int64_t N, void* c, int64_t scm, int64_t scn) {
  GemmParams p{};
  p.M = M;
  p.N = N;
  p.c = c;
  p.scm = scm;
  p.scn = scn;
  p.alpha = 1.f;
  return p;
}

void add_op(GemmParams& p, const void* a, int64_t sam, int64_t sak, const void* b, int64_t sbn, int64_t sbk,
            int64_t K) {
  p.op[p.nops++] = Operand{a, sam, sak, b, sbn, sbk, K};
}

template <typename T>
int lora_fwd(const void* x, int64_t ldx, const void* w, const void* bias, const void* a_cat, const void* b_cat,
             const float* rank_scale, void* s_out, void* y, int64_t ldy, int64_t M, int64_t d_in, int64_t d_out,
             int64_t R, cudaStream_t stream) {
  if (!x || !w || !y || M < 0 || d_in < 0 || d_out < 0 || R < 0 || ldx < d_in || ldy < d_out)
    return RIL_ERR_INVALID_ARGUMENT;
  if (R > 0 && (!a_cat || !b_cat || !rank_scale || !s_out)) return RIL_ERR_INVALID_ARGUMENT;
  if (R > 0) {  // S = (X A^T) * scale
    GemmParams ps = make_params(M, R, s_out, R, 1);
    add_op(ps, x, ldx, 1, a_cat, d_in, 1, d_in);
    ps.col_scale = rank_scale;
    if (int st = run_gemm<T>(ps, stream)) return st;
  }
  GemmParams py = make_params(M, d_out, y, ldy, 1);  // Y = X W^T + S B^T + b
  add_op(py, x, ldx, 1, w, d_in, 1, d_in);
  if (R > 0) add_op(py, s_out, R, 1, b_cat, R, 1, R);
  py.bias = bias;
  return run_gemm<T>(py, stream);
}

template <typename T>
int lora_bwd(const void* dy, int64_t lddy, const void* w, const void* a_cat, const void* b_cat,
             const float* rank_scale, void* ds_out, void* dx, int64_t lddx, int64_t M, int64_t d_in, int64_t d_out,
             int64_t R, cudaStream_t stream) {
  if (!dy || !w || M < 0 || d_in < 0 || d_out < 0 || R < 0 || lddy < d_out || (dx && lddx < d_in))
    return RIL_ERR_INVALID_ARGUMENT;
  if (R > 0 && (!a_cat || !b_cat || !rank_scale || !ds_out)) return RIL_ERR_INVALID_ARGUMENT;
  if (R > 0) {  // dS = (dY B) * scale: B_cat read as (N=R x K=d_out)
    GemmParams ps = make_params(M, R, ds_out, R, 1);
    add_op(ps, dy, lddy, 1, b_cat, 1, R, d_out);
    ps.col_scale = rank_scale;
    if (int st = run_gemm<T>(ps, stream)) return st;
  }
  if (!dx) return RIL_OK;
  GemmParams px = make_params(M, d_in, dx, lddx, 1);  // dX = dY W + dS A
  add_op(px, dy, lddy, 1, w, 1, d_in, d_out);
  if (R > 0) add_op(px, ds_out, R, 1, a_cat, 1, d_in, R);
  return run_gemm<T>(px, stream);
}

template <typename T>
int lora_slice_grads(const void* dy, int64_t lddy, const void* x, int64_t ldx, const void* s, const void* ds,
                     int64_t M, int64_t d_in, int64_t d_out, int64_t R, int64_t off, int64_t r, void* da, void* db,
                     cudaStream_t stream) {
  if (!dy || !x || !s || !ds || M < 0 || off < 0 || r < 0 || off + r > R || lddy < d_out || ldx < d_in)
    return RIL_ERR_INVALID_ARGUMENT;
  if (db) {  // dB (d_out x r) = dY^T S[:, off:off+r]; reduction over M
    GemmParams p = make_params(d_out, r, db, r, 1);
    add_op(p, dy, 1, lddy, static_cast<const T*>(s) + off, 1, R, M);
    if (int st = run_gemm<T>(p, stream)) return st;
  }
  if (da) {  // dA (r x d_in) = dS[:, off:off+r]^T X
    GemmParams p = make_params(r, d_in, da, d_in, 1);
    add_op(p, static_cast<const T*>(ds) + off, 1, R, x, 1, ldx, M);
    if (int st = run_gemm<T>(p, stream)) return st;
  }
  return RIL_OK;
}

template <typename T>
int gemm(int64_t M, int64_t N, int64_t K, const void* a, int64_t sam, int64_t sak, const void* b, int64_t sbn,
         int64_t sbk, void* c, int64_t scm, int64_t scn, float alpha, const float* col_scale, const void* bias,
         cudaStream_t stream) {
  GemmParams p = make_params(M, N, c, scm, scn);
  add_op(p, a, sam, sak, b, sbn, sbk, K);
  p.alpha = alpha;
  p.col_scale = col_scale;
  p.bias = bias;
  return run_gemm<T>(p, stream);
}

}  // namespace
}  // namespace ril

#define RIL_DEFINE_LORA(SUFFIX, T)                                                                              \
  extern "C" int ril_lora_group_fwd_##SUFFIX(const void* x, int64_t ldx, const void* w, const void* bias,     \
                                             const void* a_cat, const void* b_cat, const float* rank_scale,    \
                                             void* s_out, void* y, int64_t ldy, int64_t M, int64_t d_in,       \
                                             int64_t d_out, int64_t R, cudaStream_t stream) {                  \
    return ril::lora_fwd<T>(x, ldx, w, bias, a_cat, b_cat, rank_scale, s_out, y, ldy, M, d_in, d_out, R,      \
                            stream);                                                                           \
  }                                                                                                            \
  extern "C" int ril_lora_group_bwd_##SUFFIX(const void* dy, int64_t lddy, const void* w, const void* a_cat,  \
                                             const void* b_cat, const float* rank_scale, void* ds_out,         \
                                             void* dx, int64_t lddx, int64_t M, int64_t d_in, int64_t d_out,   \
                                             int64_t R, cudaStream_t stream) {                                 \
    return ril::lora_bwd<T>(dy, lddy, w, a_cat, b_cat, rank_scale, ds_out, dx, lddx, M, d_in, d_out, R,       \
                            stream);                                                                           \
  }                                                                                                            \
  extern "C" int ril_lora_group_slice_grads_##SUFFIX(                                                          \
      const void* dy, int64_t lddy, const void* x, int64_t ldx, const void* s, const void* ds, int64_t M,      \
      int64_t d_in, int64_t d_out, int64_t R, int64_t off, int64_t r, void* da, void* db,                      \
      cudaStream_t stream) {                                                                                   \
    return ril::lora_slice_grads<T>(dy, lddy, x, ldx, s, ds, M, d_in, d_out, R, off, r, da, db, stream);      \
  }                                                                                                            \
  extern "C" int ril_gemm_##SUFFIX(int64_t M, int64_t N, int64_t K, const void* a, int64_t sam, int64_t sak,  \
                                   const void* b, int64_t sbn, int64_t sbk, void* c, int64_t scm,             \
                                   int64_t scn, float alpha, const float* col_scale, const void* bias,         \
                                   cudaStream_t stream) {                                                      \
    return ril::gemm<T>(M, N, K, a, sam, sak, b, sbn, sbk, c, scm, scn, alpha, col_scale, bias, stream);      \
  }

RIL_DEFINE_LORA(f32, float)
RIL_DEFINE_LORA(f16, __half)
RIL_DEFINE_LORA(bf16, __nv_bfloat16)
