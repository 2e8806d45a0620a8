// CUDA kernels of token_logprobs: per-row log-prob of the target token, entropy and softmax statistics
// (forward), and the gradient with respect to the logits (backward). All the math goes through the helpers of
// token_logprobs_math.h, shared with the CPU twin (token_logprobs_cpu.cpp).
//
// Forward: one block per row, a single pass over the row with 16-byte loads (4 x fp32 or 8 x bf16/fp16),
// per-thread online statistics, then a warp-shuffle + shared-memory merge. A row whose start is not 16-byte
// aligned (row strides that are not a multiple of the vector width, sliced views) gets a scalar head up to
// the first aligned element, and the scalar tail after the last full vector.
// Backward: a 2-D grid (row, column chunk), 16-byte loads and stores; when the logits row and the gradient
// row have different misalignments the row falls back to scalar accesses.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common.h"
#include "token_logprobs_math.h"

namespace lacot {
namespace {

using namespace lacot::tlp;

// ---- element types ------------------------------------------------------------------------------

template <typename T>
struct DevIO;
template <>
struct DevIO<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct DevIO<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct DevIO<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte access

// Unpack a 16-byte word into kVecOf<T> floats / pack floats into one.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&f)[kVecOf<T>]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < kVecOf<T>; ++j) f[j] = DevIO<T>::load(e[j]);
}
template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[kVecOf<T>]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int j = 0; j < kVecOf<T>; ++j) e[j] = DevIO<T>::store(f[j]);
  return raw;
}

// Elements before the first 16-byte aligned element of a row starting at p (T-aligned).
template <typename T>
__device__ __forceinline__ int misalignment(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % kVecOf<T>);
}

// ---- block reduction of the online statistics ---------------------------------------------------

template <bool kEnt>
__device__ __forceinline__ OnlineStats warp_reduce(OnlineStats st, float t) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    OnlineStats o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.sd = kEnt ? __shfl_xor_sync(0xffffffffu, st.sd, off) : 0.0f;
    st = stats_merge<kEnt>(st, o, t);
  }
  return st;
}

// The merged statistics of the whole block, valid in thread 0.
template <int kThreads, bool kEnt>
__device__ __forceinline__ OnlineStats block_reduce(OnlineStats st, float t) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32, at most 1024");
  constexpr int kWarps = kThreads / 32;
  __shared__ float sh_m[kWarps], sh_s[kWarps], sh_sd[kWarps];
  st = warp_reduce<kEnt>(st, t);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh_m[warp] = st.m;
    sh_s[warp] = st.s;
    sh_sd[warp] = st.sd;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? OnlineStats{sh_m[lane], sh_s[lane], sh_sd[lane]} : stats_empty();
    st = warp_reduce<kEnt>(st, t);
  }
  return st;
}

// ---- forward ------------------------------------------------------------------------------------

template <typename T, int kThreads, bool kEnt>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, int64_t ld, const int64_t* __restrict__ targets,
                              int V, float t, int64_t ignore_index, const float* __restrict__ tau_ptr,
                              float* __restrict__ logp, float* __restrict__ entropy, float* __restrict__ stats) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kUnroll = kVec == 4 ? 4 : 2;  // 16 values per thread and iteration
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t y = targets[row];
  const int kind = classify_row(y, ignore_index, V);
  if (kind != kRowNormal) {  // uniform over the block: the row is not read
    if (tid == 0) {
      const RowResult r = kind == kRowIgnored ? row_ignored() : row_invalid();
      logp[row] = r.logp;
      if (kEnt) entropy[row] = r.entropy;
      stats[2 * row] = r.m;
      stats[2 * row + 1] = r.logs;
    }
    return;
  }

  const T* x = logits + row * ld;
  const float tau = tau_ptr ? tau_ptr[row] : neg_inf();
  const int mis = misalignment(x);
  const int head = min(V, mis == 0 ? 0 : kVec - mis);
  const int nvec = (V - head) / kVec;
  const int tail0 = head + nvec * kVec;

  OnlineStats st = stats_empty();
  if (tid < head) stats_update<kEnt>(st, keep_above(DevIO<T>::load(x[tid]), tau), t);
  if (tid < V - tail0) stats_update<kEnt>(st, keep_above(DevIO<T>::load(x[tail0 + tid]), tau), t);

  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  int k = tid;
  for (; k + (kUnroll - 1) * kThreads < nvec; k += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(xv + k + u * kThreads);
    float f[kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float g[kVec];
      unpack<T>(raw[u], g);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[u * kVec + j] = keep_above(g[j], tau);
    }
    stats_update_n<kEnt>(st, f, t);
  }
  for (; k < nvec; k += kThreads) {
    float f[kVec];
    unpack<T>(__ldg(xv + k), f);
#pragma unroll
    for (int j = 0; j < kVec; ++j) f[j] = keep_above(f[j], tau);
    stats_update_n<kEnt>(st, f, t);
  }

  st = block_reduce<kThreads, kEnt>(st, t);
  if (tid == 0) {
    const RowResult r = stats_finalize(st, keep_above(DevIO<T>::load(x[y]), tau), t);
    logp[row] = r.logp;
    if (kEnt) entropy[row] = r.entropy;
    stats[2 * row] = r.m;
    stats[2 * row + 1] = r.logs;
  }
}

// ---- backward -----------------------------------------------------------------------------------

constexpr int kBwdThreads = 256;
constexpr int kBwdItems = 4;  // 16-byte words per thread and block

template <typename T, bool kEnt>
__global__ void __launch_bounds__(kBwdThreads)
    token_logprobs_bwd_kernel(const float* __restrict__ grad_logp, int64_t gl_stride,
                              const float* __restrict__ grad_entropy, int64_t ge_stride,
                              const T* __restrict__ logits, int64_t ld, const int64_t* __restrict__ targets,
                              const float* __restrict__ stats, const float* __restrict__ entropy, int V,
                              float t, int64_t ignore_index, const float* __restrict__ tau_ptr,
                              T* __restrict__ grad) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kWordsPerChunk = kBwdThreads * kBwdItems;
  const int64_t row = blockIdx.x;
  const int chunk = blockIdx.y;
  const bool last_chunk = chunk == static_cast<int>(gridDim.y) - 1;
  const int tid = threadIdx.x;
  const int64_t y = targets[row];
  const int kind = classify_row(y, ignore_index, V);
  const T* x = logits + row * ld;
  T* out = grad + row * static_cast<int64_t>(V);

  if (kind != kRowNormal) {  // exactly 0 (ignored) or NaN (invalid target): the logits are not read
    const float fill_value = kind == kRowIgnored ? 0.0f : quiet_nan();
    const T fill = DevIO<T>::store(fill_value);
    const int mis = misalignment(out);
    const int head = min(V, mis == 0 ? 0 : kVec - mis);
    const int nvec = (V - head) / kVec;
    const int tail0 = head + nvec * kVec;
    if (chunk == 0 && tid < head) out[tid] = fill;
    if (last_chunk && tid < V - tail0) out[tail0 + tid] = fill;
    float f[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) f[j] = fill_value;
    const uint4 word = pack<T>(f);
    uint4* ov = reinterpret_cast<uint4*>(out + head);
    const int w1 = min(nvec, (chunk + 1) * kWordsPerChunk);
    for (int w = chunk * kWordsPerChunk + tid; w < w1; w += kBwdThreads) ov[w] = word;
    return;
  }

  GradRow r;
  r.m = stats[2 * row];
  r.logs = stats[2 * row + 1];
  r.t = t;
  r.g_logp = grad_logp[row * gl_stride];
  r.g_ent = kEnt ? grad_entropy[row * ge_stride] : 0.0f;
  r.H = kEnt ? entropy[row] : 0.0f;
  r.tau = tau_ptr ? tau_ptr[row] : neg_inf();
  const int yi = static_cast<int>(y);
  auto elem = [&](float xv, int col) -> float {
    return col == yi ? grad_target<kEnt>(xv, r) : grad_elem<kEnt>(xv, r);
  };

  const int mis = misalignment(x);
  if (mis != misalignment(out)) {  // the two rows cannot both be accessed by aligned words: scalar row
    const int64_t c0 = static_cast<int64_t>(chunk) * kWordsPerChunk * kVec;
    const int64_t c1 = min(static_cast<int64_t>(V), c0 + static_cast<int64_t>(kWordsPerChunk) * kVec);
    const int64_t c_end = last_chunk ? static_cast<int64_t>(V) : c1;
    for (int64_t c = c0 + tid; c < c_end; c += kBwdThreads) {
      out[c] = DevIO<T>::store(elem(DevIO<T>::load(x[c]), static_cast<int>(c)));
    }
    return;
  }

  const int head = min(V, mis == 0 ? 0 : kVec - mis);
  const int nvec = (V - head) / kVec;
  const int tail0 = head + nvec * kVec;
  if (chunk == 0 && tid < head) out[tid] = DevIO<T>::store(elem(DevIO<T>::load(x[tid]), tid));
  if (last_chunk && tid < V - tail0) {
    const int c = tail0 + tid;
    out[c] = DevIO<T>::store(elem(DevIO<T>::load(x[c]), c));
  }

  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  uint4* ov = reinterpret_cast<uint4*>(out + head);
  const int w0 = chunk * kWordsPerChunk + tid;
  uint4 raw[kBwdItems];
#pragma unroll
  for (int it = 0; it < kBwdItems; ++it) {
    const int w = w0 + it * kBwdThreads;
    if (w < nvec) raw[it] = __ldg(xv + w);
  }
#pragma unroll
  for (int it = 0; it < kBwdItems; ++it) {
    const int w = w0 + it * kBwdThreads;
    if (w < nvec) {
      float f[kVec];
      unpack<T>(raw[it], f);
      const int c = head + w * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = elem(f[j], c + j);
      ov[w] = pack<T>(f);
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------

template <class F>
void dispatch_cuda_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    default:
      TORCH_CHECK(false, "lacot: unsupported logits dtype ", st);
  }
}

template <typename T, int kThreads>
void launch_fwd(const at::Tensor& logits, const at::Tensor& targets, float t, int64_t ignore_index, bool ent,
                const float* tau, at::Tensor& logp, at::Tensor& entropy, at::Tensor& stats, cudaStream_t stream) {
  const int64_t N = logits.size(0);
  const int V = static_cast<int>(logits.size(1));
  const T* x = reinterpret_cast<const T*>(logits.const_data_ptr());
  const dim3 grid(static_cast<unsigned>(N));
  if (ent) {
    token_logprobs_fwd_kernel<T, kThreads, true><<<grid, kThreads, 0, stream>>>(
        x, logits.stride(0), targets.const_data_ptr<int64_t>(), V, t, ignore_index, tau,
        logp.mutable_data_ptr<float>(), entropy.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>());
  } else {
    token_logprobs_fwd_kernel<T, kThreads, false><<<grid, kThreads, 0, stream>>>(
        x, logits.stride(0), targets.const_data_ptr<int64_t>(), V, t, ignore_index, tau,
        logp.mutable_data_ptr<float>(), nullptr, stats.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cuda(const at::Tensor& logits,
                                                                       const at::Tensor& targets,
                                                                       double temperature,
                                                                       int64_t ignore_index,
                                                                       bool compute_entropy,
                                                                       const std::optional<at::Tensor>& tau) {
  const RowShape shape = check_fwd_args(logits, targets, temperature, c10::DeviceType::CUDA);
  check_tau(tau, logits, "lacot::token_logprobs_fwd_native");
  const float* tau_ptr = tau ? tau->const_data_ptr<float>() : nullptr;
  const int64_t N = shape.N, V = shape.V;
  TORCH_CHECK(N < (int64_t(1) << 31), "lacot::token_logprobs_fwd_native: at most 2^31 - 1 rows, got ", N);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto fopts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, fopts);
  at::Tensor entropy = at::empty({compute_entropy ? N : 0}, fopts);
  at::Tensor stats = at::empty({N, 2}, fopts);
  if (N == 0) return {logp, entropy, stats};
  const float t = static_cast<float>(1.0 / temperature);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda_dtype(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // Long rows get more threads per row; short ones more rows per SM.
    if (V / kVecOf<T> >= 4096) {
      launch_fwd<T, 512>(logits, targets, t, ignore_index, compute_entropy, tau_ptr, logp, entropy, stats, stream);
    } else {
      launch_fwd<T, 256>(logits, targets, t, ignore_index, compute_entropy, tau_ptr, logp, entropy, stats, stream);
    }
  });
  return {logp, entropy, stats};
}

at::Tensor token_logprobs_bwd_cuda(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                   const at::Tensor& logits, const at::Tensor& targets,
                                   const at::Tensor& stats, const at::Tensor& entropy, double temperature,
                                   int64_t ignore_index, const std::optional<at::Tensor>& tau) {
  const RowShape shape = check_bwd_args(grad_logp, grad_entropy, logits, targets, stats, entropy, temperature,
                                        c10::DeviceType::CUDA);
  check_tau(tau, logits, "lacot::token_logprobs_bwd_native");
  const float* tau_ptr = tau ? tau->const_data_ptr<float>() : nullptr;
  const int64_t N = shape.N, V = shape.V;
  TORCH_CHECK(N < (int64_t(1) << 31), "lacot::token_logprobs_bwd_native: at most 2^31 - 1 rows, got ", N);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({N, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return grad;
  const float t = static_cast<float>(1.0 / temperature);
  const bool ent = grad_entropy.has_value();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda_dtype(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t kElemsPerChunk = int64_t(kBwdThreads) * kBwdItems * kVecOf<T>;
    const int64_t chunks = (V + kElemsPerChunk - 1) / kElemsPerChunk;
    TORCH_CHECK(chunks <= 65535, "lacot::token_logprobs_bwd_native: vocabulary too large (", V, ")");
    const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(chunks));
    const T* x = reinterpret_cast<const T*>(logits.const_data_ptr());
    T* g = reinterpret_cast<T*>(grad.mutable_data_ptr());
    const float* ge = ent ? grad_entropy->const_data_ptr<float>() : nullptr;
    const float* h = ent ? entropy.const_data_ptr<float>() : nullptr;
    if (ent) {
      token_logprobs_bwd_kernel<T, true><<<grid, kBwdThreads, 0, stream>>>(
          grad_logp.const_data_ptr<float>(), grad_logp.stride(0), ge, grad_entropy->stride(0), x,
          logits.stride(0), targets.const_data_ptr<int64_t>(), stats.const_data_ptr<float>(), h,
          static_cast<int>(V), t, ignore_index, tau_ptr, g);
    } else {
      token_logprobs_bwd_kernel<T, false><<<grid, kBwdThreads, 0, stream>>>(
          grad_logp.const_data_ptr<float>(), grad_logp.stride(0), nullptr, 0, x, logits.stride(0),
          targets.const_data_ptr<int64_t>(), stats.const_data_ptr<float>(), nullptr, static_cast<int>(V), t,
          ignore_index, tau_ptr, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace lacot

// The schemas are defined in Python (lacot_kernels/_registry.py); only the CUDA kernels are registered here.
TORCH_LIBRARY_IMPL(lacot, CUDA, m) {
  m.impl("token_logprobs_fwd_native", &lacot::token_logprobs_fwd_cuda);
  m.impl("token_logprobs_bwd_native", &lacot::token_logprobs_bwd_cuda);
}
