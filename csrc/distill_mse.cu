// Last-step distillation MSE: loss = mean_b(w_b c_b^2 mean_i (s - t)^2), and its student gradient.
// Forward: ONE launch. Every block writes one fp32 partial per (chunk, sample), then draws a ticket
// (__threadfence + atomicAdd on a per-stream device counter); the block that draws the last ticket
// sums ALL partials in a fixed order (strided per-thread sums + block_sum's fixed tree), writes the
// loss and resets the counter to 0 for the next launch. The atomics decide only WHICH block sums,
// never the order, so the loss is bitwise reproducible; nothing syncs with the host, so it is
// CUDA-graph capturable. The counters live in this library (g_tickets, zero at module load), one
// slot per (device, stream): launches on different streams never share one, and the C ABI is the
// same as with the old two-launch forward. Backward: one elementwise launch that reads the upstream
// gradient on the device. 16-byte vector loads when the rows allow them.
#include <cstddef>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "common.cuh"

namespace ril {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 8192;  // elements per block: 32 per thread, enough bytes in flight for HBM
constexpr int kTicketSlots = 1024;  // distinct (device, stream) pairs the forward can run on

// Ticket counters of the forward, one per (device, stream) slot. Zero when the module loads; every
// forward launch leaves its slot at zero again (the last block resets it).
__device__ unsigned int g_tickets[kTicketSlots];

__device__ __forceinline__ float coef_sq(const float* alpha_bar, int64_t b, int pred) {
  const float ab = alpha_bar[b];
  float c = 1.f;
  if (pred == 0) c = sqrtf((1.f - ab) / ab);
  if (pred == 1) c = sqrtf(1.f - ab);
  return c * c;
}

template <typename T>
struct alignas(16) Vec {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    distill_fwd_kernel(const T* s, const T* t, const float* alpha_bar, const float* weight, float* partial,
                       float* out, unsigned int slot, int64_t N, float inv_nb, int pred) {
  const int64_t b = blockIdx.y, base = b * N + static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(static_cast<int64_t>(kChunk), N - static_cast<int64_t>(blockIdx.x) * kChunk);
  float acc = 0.f;
  if constexpr (kVec) {
    constexpr int kN = Vec<T>::kN;
    const Vec<T>* sv = reinterpret_cast<const Vec<T>*>(s + base);
    const Vec<T>* tv = reinterpret_cast<const Vec<T>*>(t + base);
    for (int64_t i = threadIdx.x; i < end / kN; i += kThreads) {
      const Vec<T> a = sv[i], c = tv[i];
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const float d = to_f32(a.v[j]) - to_f32(c.v[j]);
        acc = fmaf(d, d, acc);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < end; i += kThreads) {
      const float d = to_f32(s[base + i]) - to_f32(t[base + i]);
      acc = fmaf(d, d, acc);
    }
  }
  const float total = block_sum<kThreads>(acc);
  __shared__ bool am_last;
  if (threadIdx.x == 0) {
    float scale = coef_sq(alpha_bar, b, pred) * inv_nb;
    if (weight) scale *= weight[b];
    partial[b * gridDim.x + blockIdx.x] = total * scale;
    __threadfence();  // the partial is visible device-wide before the ticket is drawn
    am_last = atomicAdd(&g_tickets[slot], 1u) == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!am_last) return;
  // Last block: every other partial was published before its ticket. Sum them all in a fixed order
  // (thread i adds partials i, i + kThreads, ... then block_sum's fixed tree), whichever block this is.
  __threadfence();
  const int64_t P = static_cast<int64_t>(gridDim.x) * gridDim.y;
  float part = 0.f;
  for (int64_t i = threadIdx.x; i < P; i += kThreads) part += __ldcg(partial + i);  // L2, not a stale L1 line
  const float loss = block_sum<kThreads>(part);
  if (threadIdx.x == 0) {
    *out = loss;
    g_tickets[slot] = 0u;  // clean for the next launch on this stream
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    distill_bwd_kernel(const float* grad, const T* s, const T* t, const float* alpha_bar, const float* weight,
                       T* ds, int64_t N, float inv_nb, int pred) {
  const int64_t b = blockIdx.y, base = b * N + static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(static_cast<int64_t>(kChunk), N - static_cast<int64_t>(blockIdx.x) * kChunk);
  float scale = 2.f * coef_sq(alpha_bar, b, pred) * inv_nb * (*grad);
  if (weight) scale *= weight[b];
  if constexpr (kVec) {
    constexpr int kN = Vec<T>::kN;
    const Vec<T>* sv = reinterpret_cast<const Vec<T>*>(s + base);
    const Vec<T>* tv = reinterpret_cast<const Vec<T>*>(t + base);
    Vec<T>* dv = reinterpret_cast<Vec<T>*>(ds + base);
    for (int64_t i = threadIdx.x; i < end / kN; i += kThreads) {
      const Vec<T> a = sv[i], c = tv[i];
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < kN; ++j) o.v[j] = from_f32<T>((to_f32(a.v[j]) - to_f32(c.v[j])) * scale);
      dv[i] = o;
    }
  } else {
    for (int64_t i = threadIdx.x; i < end; i += kThreads)
      ds[base + i] = from_f32<T>((to_f32(s[base + i]) - to_f32(t[base + i])) * scale);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Vector path only when every row starts 16-byte aligned and holds whole vectors.
template <typename T>
bool use_vec(int64_t N, const void* a, const void* b, const void* c) {
  return N % Vec<T>::kN == 0 && aligned16(a) && aligned16(b) && (!c || aligned16(c));
}

int check(int64_t B, int64_t N, int pred, const void* s, const void* t, const float* alpha_bar) {
  if (!s || !t || !alpha_bar || B <= 0 || N <= 0 || pred < 0 || pred > 2) return RIL_ERR_INVALID_ARGUMENT;
  if (B > 65535 || cdiv(N, kChunk) > 2147483647LL) return RIL_ERR_UNSUPPORTED;
  return RIL_OK;
}

// The ticket slot of the current (device, stream). Slots are handed out once and kept, so a CUDA graph
// captured on a stream keeps using that stream's slot. cudaStreamPerThread is one stream per host
// thread, so it is keyed by the thread as well.
int ticket_slot(cudaStream_t stream, unsigned int* slot) {
  int dev = 0;
  const cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return RIL_ERR_CUDA_BASE + static_cast<int>(e);
  const size_t thread = stream == cudaStreamPerThread ? std::hash<std::thread::id>{}(std::this_thread::get_id()) : 0;
  static std::mutex mu;
  static std::map<std::tuple<int, cudaStream_t, size_t>, unsigned int> slots;
  static std::map<int, unsigned int> used;  // slots handed out per device
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dev, stream, thread);
  const auto it = slots.find(key);
  if (it != slots.end()) {
    *slot = it->second;
    return RIL_OK;
  }
  unsigned int& n = used[dev];
  if (n >= static_cast<unsigned int>(kTicketSlots)) return RIL_ERR_UNSUPPORTED;  // > kTicketSlots streams
  *slot = n++;
  slots.emplace(key, *slot);
  return RIL_OK;
}

template <typename T>
int distill_fwd(const void* s, const void* t, const float* alpha_bar, const float* weight, float* workspace,
                float* out, int64_t B, int64_t N, int pred, cudaStream_t stream) {
  if (int st = check(B, N, pred, s, t, alpha_bar)) return st;
  if (!workspace || !out) return RIL_ERR_INVALID_ARGUMENT;
  if (cdiv(N, kChunk) * B > 0xFFFFFFFFLL) return RIL_ERR_UNSUPPORTED;  // tickets are 32-bit
  unsigned int slot = 0;
  if (int st = ticket_slot(stream, &slot)) return st;
  const dim3 grid(static_cast<unsigned>(cdiv(N, kChunk)), static_cast<unsigned>(B));
  const float inv_nb = 1.f / (static_cast<float>(N) * static_cast<float>(B));
  const T* sp = static_cast<const T*>(s);
  const T* tp = static_cast<const T*>(t);
  if (use_vec<T>(N, s, t, nullptr))
    distill_fwd_kernel<T, true>
        <<<grid, kThreads, 0, stream>>>(sp, tp, alpha_bar, weight, workspace, out, slot, N, inv_nb, pred);
  else
    distill_fwd_kernel<T, false>
        <<<grid, kThreads, 0, stream>>>(sp, tp, alpha_bar, weight, workspace, out, slot, N, inv_nb, pred);
  return launch_status();
}

template <typename T>
int distill_bwd(const float* grad, const void* s, const void* t, const float* alpha_bar, const float* weight,
                void* ds, int64_t B, int64_t N, int pred, cudaStream_t stream) {
  if (int st = check(B, N, pred, s, t, alpha_bar)) return st;
  if (!grad || !ds) return RIL_ERR_INVALID_ARGUMENT;
  const dim3 grid(static_cast<unsigned>(cdiv(N, kChunk)), static_cast<unsigned>(B));
  const float inv_nb = 1.f / (static_cast<float>(N) * static_cast<float>(B));
  const T* sp = static_cast<const T*>(s);
  const T* tp = static_cast<const T*>(t);
  T* dp = static_cast<T*>(ds);
  if (use_vec<T>(N, s, t, ds))
    distill_bwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(grad, sp, tp, alpha_bar, weight, dp, N, inv_nb, pred);
  else
    distill_bwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(grad, sp, tp, alpha_bar, weight, dp, N, inv_nb, pred);
  return launch_status();
}

}  // namespace
}  // namespace ril

extern "C" int64_t ril_distill_mse_workspace_floats(int64_t B, int64_t N) {
  return B > 0 && N > 0 ? B * ril::cdiv(N, ril::kChunk) : 0;
}

#define RIL_DEFINE_DISTILL(SUFFIX, T)                                                                           \
  extern "C" int ril_distill_mse_fwd_##SUFFIX(const void* student, const void* teacher, const float* alpha_bar, \
                                              const float* weight, float* workspace, float* out, int64_t B,    \
                                              int64_t N, int pred, cudaStream_t stream) {                      \
    return ril::distill_fwd<T>(student, teacher, alpha_bar, weight, workspace, out, B, N, pred, stream);       \
  }                                                                                                            \
  extern "C" int ril_distill_mse_bwd_##SUFFIX(const float* grad, const void* student, const void* teacher,     \
                                              const float* alpha_bar, const float* weight, void* d_student,    \
                                              int64_t B, int64_t N, int pred, cudaStream_t stream) {           \
    return ril::distill_bwd<T>(grad, student, teacher, alpha_bar, weight, d_student, B, N, pred, stream);      \
  }

RIL_DEFINE_DISTILL(f32, float)
RIL_DEFINE_DISTILL(f16, __half)
RIL_DEFINE_DISTILL(bf16, __nv_bfloat16)
