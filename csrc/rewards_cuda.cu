// CUDA kernels of the reward ops: GRPO group advantages, LaCoT reward interpolation and the sub-trajectory
// balance loss (forward and backward of each). All the math goes through rewards_math.h, shared with the CPU
// twins (rewards_cpu.cpp) that the CPU-only test suite checks against fp64 references.
//
// group advantages: one launch. "group" / "none": a warp per group (grid-stride over groups), lane-strided
//   compensated partial sums reduced by shuffles; two passes (mean, centred squares) re-read the group from
//   L1. "batch": a single block of 1024 threads (every advantage needs the std of the whole batch):
//   block-wide moments first, then the warps walk the groups.
// interpolation: a block per row. The row's anchors are listed in order (a block-wide prefix count and a
// scatter
//   into a global scratch row), then a warp per gap writes the lerp (forward) or a warp per anchor sums the
//   weighted gradients of its two gaps (backward): deterministic, no atomics.
// subtb: a block per row, 256 threads x 4 states per chunk of 1024 states. Each thread folds its 4 states
// into a
//   run summary; cub::BlockScan (order-preserving, so the non-commutative combine is safe) scans the thread
//   summaries, carrying the summary of the previous chunks through its prefix callback. Backward: a suffix
//   pass (states visited right to left, operands flipped) stores (l0, l1) of S(t+1) per state in a scratch
//   row, then a prefix pass forms every gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <limits>
#include <tuple>

#include "common.h"
#include "rewards_checks.h"
#include "rewards_math.h"

namespace lacot {
namespace {

using namespace lacot::rw;

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ T warp_min(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmin(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Min and max over the block (every thread gets them), through the same one-slot-per-warp buffer.
template <class T>
__device__ __forceinline__ void block_min_max(T& lo, T& hi, T* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  const T inf = std::numeric_limits<T>::infinity();
  lo = warp_min(lo);
  hi = warp_max(hi);
  __syncthreads();
  if (lane == 0) red[warp] = lo;
  __syncthreads();
  lo = warp_min(lane < nwarps ? red[lane] : inf);
  __syncthreads();
  if (lane == 0) red[warp] = hi;
  __syncthreads();
  hi = warp_max(lane < nwarps ? red[lane] : -inf);
}

// Sum over the block; every thread gets the result. `red` holds one slot per warp.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read from the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T t = lane < nwarps ? red[lane] : T(0);
  return warp_sum(t);
}

template <class acc_t>
struct LaneMoments {
  acc_t mean, count, m2;
};

// Moments of n rewards at x[0..n) with the calling warp (lane-strided).
template <class scalar_t, class acc_t>
__device__ __forceinline__ LaneMoments<acc_t> warp_moments(const scalar_t* x, int64_t n, int lane) {
  KahanSum<acc_t> s;
  acc_t c = 0;
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = lane; j < n; j += kWarp) {
    const acc_t v = static_cast<acc_t>(x[j]);
    if (present(v)) {
      s.add(v);
      c += acc_t(1);
      adv_range_add(v, lo, hi);
    }
  }
  const acc_t count = warp_sum(c);
  const acc_t mean = adv_mean(warp_sum(s.value()), count, warp_min(lo), warp_max(hi));
  KahanSum<acc_t> m2;
  for (int64_t j = lane; j < n; j += kWarp) {
    const acc_t v = static_cast<acc_t>(x[j]);
    if (present(v)) m2.add((v - mean) * (v - mean));
  }
  return {mean, count, warp_sum(m2.value())};
}

// Moments of all N rewards with the whole block.
template <class scalar_t, class acc_t>
__device__ __forceinline__ LaneMoments<acc_t> block_moments(const scalar_t* x, int64_t n, acc_t* red) {
  KahanSum<acc_t> s;
  acc_t c = 0;
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[j]);
    if (present(v)) {
      s.add(v);
      c += acc_t(1);
      adv_range_add(v, lo, hi);
    }
  }
  const acc_t count = block_sum(c, red);
  const acc_t sum = block_sum(s.value(), red);
  block_min_max(lo, hi, red);
  const acc_t mean = adv_mean(sum, count, lo, hi);
  KahanSum<acc_t> m2;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[j]);
    if (present(v)) m2.add((v - mean) * (v - mean));
  }
  return {mean, count, block_sum(m2.value(), red)};
}

// ---- group advantages
// ----------------------------------------------------------------------------------------

constexpr int kAdvThreads = 256;
constexpr int kAdvBatchThreads = 1024;

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kAdvBatchThreads)
    group_adv_fwd_kernel(const scalar_t* __restrict__ r, acc_t* __restrict__ out, int64_t n_groups, int64_t G,
                         int scale, acc_t eps, bool unbiased) {
  __shared__ acc_t red[kAdvBatchThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  acc_t batch_std = 0;
  if (scale == kScaleBatch) {  // launched as a single block
    const LaneMoments<acc_t> bm = block_moments<scalar_t, acc_t>(r, n_groups * G, red);
    batch_std = adv_std(bm.m2, bm.count, unbiased);
  }
  for (int64_t g = int64_t(blockIdx.x) * nwarps + warp; g < n_groups; g += int64_t(gridDim.x) * nwarps) {
    const scalar_t* rg = r + g * G;
    const LaneMoments<acc_t> m = warp_moments<scalar_t, acc_t>(rg, G, lane);
    acc_t d = acc_t(1);
    if (scale == kScaleGroup) d = adv_std(m.m2, m.count, unbiased) + eps;
    if (scale == kScaleBatch) d = batch_std + eps;
    const acc_t inv = safe_inv(d);
    for (int64_t j = lane; j < G; j += kWarp)
      out[g * G + j] = adv_value(static_cast<acc_t>(rg[j]), m.mean, inv);
  }
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kAdvBatchThreads)
    group_adv_bwd_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ r,
                         scalar_t* __restrict__ out, int64_t n_groups, int64_t G, int scale, acc_t eps,
                         bool unbiased) {
  __shared__ acc_t red[kAdvBatchThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  LaneMoments<acc_t> bm{0, 0, 0};
  acc_t b_std = 0, p_tot = 0;
  if (scale == kScaleBatch) {  // launched as a single block
    bm = block_moments<scalar_t, acc_t>(r, n_groups * G, red);
    b_std = adv_std(bm.m2, bm.count, unbiased);
    KahanSum<acc_t> p;  // sum over the batch of g_i (r_i - mean of i's group)
    for (int64_t g = warp; g < n_groups; g += nwarps) {
      const scalar_t* rg = r + g * G;
      const acc_t mean = warp_moments<scalar_t, acc_t>(rg, G, lane).mean;
      for (int64_t j = lane; j < G; j += kWarp) {
        const acc_t x = static_cast<acc_t>(rg[j]);
        if (present(x)) p.add(grad[g * G + j] * (x - mean));
      }
    }
    p_tot = block_sum(p.value(), red);
  }
  for (int64_t g = int64_t(blockIdx.x) * nwarps + warp; g < n_groups; g += int64_t(gridDim.x) * nwarps) {
    const scalar_t* rg = r + g * G;
    const acc_t* gg = grad + g * G;
    const LaneMoments<acc_t> m = warp_moments<scalar_t, acc_t>(rg, G, lane);
    KahanSum<acc_t> sg, sgc;
    for (int64_t j = lane; j < G; j += kWarp) {
      const acc_t x = static_cast<acc_t>(rg[j]);
      if (present(x)) {
        sg.add(gg[j]);
        sgc.add(gg[j] * (x - m.mean));
      }
    }
    const acc_t g_bar = adv_mean(warp_sum(sg.value()), m.count);
    const acc_t p_grp = warp_sum(sgc.value());
    acc_t std = 0, d = 1, p = 0, ref = m.mean, count = m.count;
    if (scale == kScaleGroup) {
      std = adv_std(m.m2, m.count, unbiased);
      d = std + eps;
      p = p_grp;
    } else if (scale == kScaleBatch) {
      std = b_std;
      d = b_std + eps;
      p = p_tot;
      ref = bm.mean;
      count = bm.count;
    }
    const acc_t inv = safe_inv(d);
    const acc_t coef = adv_std_coef(p, inv, std, count, unbiased);
    for (int64_t j = lane; j < G; j += kWarp) {
      out[g * G + j] =
          static_cast<scalar_t>(adv_grad(static_cast<acc_t>(rg[j]), gg[j], g_bar, inv, coef, ref));
    }
  }
}

// One launch: a grid of warps over the groups, or (batch std) a single block.
void adv_launch_shape(int64_t n_groups, int64_t scale, dim3& grid, dim3& block) {
  if (scale == kScaleBatch) {
    grid = dim3(1);
    block = dim3(kAdvBatchThreads);
    return;
  }
  const int64_t warps = kAdvThreads / kWarp;
  const int64_t blocks = std::min<int64_t>((n_groups + warps - 1) / warps, 65535);
  grid = dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)));
  block = dim3(kAdvThreads);
}

at::Tensor group_advantages_fwd_cuda(const at::Tensor& rewards, int64_t group_size, int64_t scale, double eps,
                                     bool unbiased) {
  const char* op = "lacot::group_advantages_fwd_native";
  check_adv_args(rewards, group_size, scale, eps, op, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t N = rewards.numel();
  at::Tensor out = at::empty({N}, rewards.options().dtype(acc_dtype(rewards.scalar_type())));
  if (N == 0) return out;
  const int64_t n_groups = N / group_size;
  dim3 grid, block;
  adv_launch_shape(n_groups, scale, grid, block);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, rewards.scalar_type(), "group_advantages_fwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        group_adv_fwd_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
            rewards.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), n_groups, group_size,
            static_cast<int>(scale), static_cast<acc_t>(eps), unbiased);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor group_advantages_bwd_cuda(const at::Tensor& grad, const at::Tensor& rewards, int64_t group_size,
                                     int64_t scale, double eps, bool unbiased) {
  const char* op = "lacot::group_advantages_bwd_native";
  check_adv_args(rewards, group_size, scale, eps, op, c10::DeviceType::CUDA);
  const int64_t N = rewards.numel();
  check_device(grad, op, "grad", c10::DeviceType::CUDA);
  check_vector(grad, op, "grad", N, acc_dtype(rewards.scalar_type()));
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor out = at::empty({N}, rewards.options());
  if (N == 0) return out;
  const int64_t n_groups = N / group_size;
  dim3 grid, block;
  adv_launch_shape(n_groups, scale, grid, block);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, rewards.scalar_type(), "group_advantages_bwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        group_adv_bwd_kernel<scalar_t, acc_t>
            <<<grid, block, 0, stream>>>(grad.const_data_ptr<acc_t>(), rewards.const_data_ptr<scalar_t>(),
                                         out.mutable_data_ptr<scalar_t>(), n_groups, group_size,
                                         static_cast<int>(scale), static_cast<acc_t>(eps), unbiased);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

// ---- interpolation
// -------------------------------------------------------------------------------------------

constexpr int kInterpThreads = 256;

// Lists the anchors of the row in order into `list`; returns their number (the same in every thread). Ends
// with a barrier, so the list (and anything written to global memory before the call) is visible to the
// block.
__device__ __forceinline__ int build_anchor_list(const bool* __restrict__ m, int64_t S,
                                                 int32_t* __restrict__ list) {
  using BlockScan = cub::BlockScan<int, kInterpThreads>;
  __shared__ typename BlockScan::TempStorage tmp;
  int carry = 0;
  for (int64_t c0 = 0; c0 < S; c0 += kInterpThreads) {
    const int64_t s = c0 + threadIdx.x;
    const int a = (s < S && m[s]) ? 1 : 0;
    int rank, chunk_total;
    BlockScan(tmp).ExclusiveSum(a, rank, chunk_total);
    if (a) list[carry + rank] = static_cast<int32_t>(s);
    carry += chunk_total;
    __syncthreads();
  }
  return carry;
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kInterpThreads)
    interp_fwd_kernel(const scalar_t* __restrict__ v, int64_t ldv, const bool* __restrict__ m, int64_t ldm,
                      int32_t* __restrict__ list, acc_t* __restrict__ out, int64_t S) {
  const int64_t b = blockIdx.x;
  const scalar_t* vr = v + b * ldv;
  acc_t* orow = out + b * S;
  int32_t* lr = list + b * S;
  for (int64_t s = threadIdx.x; s < S; s += kInterpThreads) orow[s] = acc_t(0);
  const int total = build_anchor_list(m + b * ldm, S, lr);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  constexpr int kWarps = kInterpThreads / kWarp;
  for (int k = warp; k + 1 < total; k += kWarps) {  // gap [p, q): p keeps its value, the inside is a lerp
    const int64_t p = lr[k], q = lr[k + 1];
    const acc_t vp = static_cast<acc_t>(vr[p]), vq = static_cast<acc_t>(vr[q]);
    for (int64_t s = p + lane; s < q; s += kWarp) {
      orow[s] = s == p ? vp : interp_value(vp, vq, interp_weight<acc_t>(s, p, q));
    }
  }
  if (threadIdx.x == 0 && total > 0) {
    const int64_t a = lr[total - 1];
    orow[a] = static_cast<acc_t>(vr[a]);
  }
}

template <class acc_t>
__global__ void __launch_bounds__(kInterpThreads)
    interp_bwd_kernel(const acc_t* __restrict__ g, int64_t ldg, const bool* __restrict__ m, int64_t ldm,
                      int32_t* __restrict__ list, acc_t* __restrict__ out, int64_t S) {
  const int64_t b = blockIdx.x;
  const acc_t* gr = g + b * ldg;
  acc_t* orow = out + b * S;
  int32_t* lr = list + b * S;
  for (int64_t s = threadIdx.x; s < S; s += kInterpThreads) orow[s] = acc_t(0);
  const int total = build_anchor_list(m + b * ldm, S, lr);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  constexpr int kWarps = kInterpThreads / kWarp;
  for (int k = warp; k < total;
       k += kWarps) {  // anchor a: w g over its left gap, (1 - w) g over its right gap
    const int64_t a = lr[k];
    KahanSum<acc_t> acc;
    if (k > 0) {
      const int64_t p = lr[k - 1];
      for (int64_t s = p + 1 + lane; s < a; s += kWarp) acc.add(interp_weight<acc_t>(s, p, a) * gr[s]);
    }
    if (k + 1 < total) {
      const int64_t q = lr[k + 1];
      for (int64_t s = a + 1 + lane; s < q; s += kWarp)
        acc.add((acc_t(1) - interp_weight<acc_t>(s, a, q)) * gr[s]);
    }
    const acc_t sum = warp_sum(acc.value());
    if (lane == 0) orow[a] = gr[a] + sum;
  }
}

at::Tensor interpolate_rewards_fwd_cuda(const at::Tensor& values, const at::Tensor& anchor_mask) {
  const char* op = "lacot::interpolate_rewards_fwd_native";
  check_interp_args(values, anchor_mask, op, "values", c10::DeviceType::CUDA);
  TORCH_CHECK(is_reward_dtype(values.scalar_type()), op, ": `values` must be float32, bfloat16, float16 or ",
              "float64, got ", values.scalar_type());
  const int64_t B = values.size(0), S = values.size(1);
  TORCH_CHECK(S < (int64_t(1) << 31), op, ": rows longer than 2^31 - 1 are not supported, got ", S);
  TORCH_CHECK(B <= std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 rows, got ", B);
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({B, S}, values.options().dtype(acc_dtype(values.scalar_type())));
  if (B * S == 0) return out;
  at::Tensor list = at::empty({B, S}, values.options().dtype(at::kInt));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, values.scalar_type(), "interpolate_rewards_fwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        interp_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kInterpThreads, 0, stream>>>(
            values.const_data_ptr<scalar_t>(), values.stride(0), anchor_mask.const_data_ptr<bool>(),
            anchor_mask.stride(0), list.mutable_data_ptr<int32_t>(), out.mutable_data_ptr<acc_t>(), S);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor interpolate_rewards_bwd_cuda(const at::Tensor& grad, const at::Tensor& anchor_mask) {
  const char* op = "lacot::interpolate_rewards_bwd_native";
  check_interp_args(grad, anchor_mask, op, "grad", c10::DeviceType::CUDA);
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble, op,
              ": `grad` must be float32 or float64, got ", grad.scalar_type());
  const int64_t B = grad.size(0), S = grad.size(1);
  TORCH_CHECK(S < (int64_t(1) << 31), op, ": rows longer than 2^31 - 1 are not supported, got ", S);
  TORCH_CHECK(B <= std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 rows, got ", B);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty({B, S}, grad.options());
  if (B * S == 0) return out;
  at::Tensor list = at::empty({B, S}, grad.options().dtype(at::kInt));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "interpolate_rewards_bwd", [&] {
    interp_bwd_kernel<scalar_t><<<static_cast<unsigned>(B), kInterpThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), grad.stride(0), anchor_mask.const_data_ptr<bool>(),
        anchor_mask.stride(0), list.mutable_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- sub-trajectory balance
// ----------------------------------------------------------------------------------

constexpr int kSubtbThreads = 256;
constexpr int kSubtbItems = 4;
constexpr int64_t kSubtbChunk = int64_t(kSubtbThreads) * kSubtbItems;

// cub block-prefix callback: hands out the summary of everything scanned so far and folds in each chunk.
template <class Agg, class Op>
struct RunningPrefix {
  Agg running;
  Op op;
  __device__ Agg operator()(const Agg& block_aggregate) {
    const Agg old = running;
    running = op(running, block_aggregate);
    return old;
  }
};

template <class scalar_t, class acc_t>
struct DeviceRow {
  const scalar_t *pf, *lt, *lr;
  __device__ __forceinline__ acc_t delta(int64_t t) const {  // delta_t, 0 <= t < n
    return subtb_delta(static_cast<acc_t>(lr[t]), static_cast<acc_t>(lr[t + 1]), static_cast<acc_t>(lt[t]),
                       static_cast<acc_t>(lt[t + 1]), static_cast<acc_t>(pf[t]));
  }
};

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kSubtbThreads)
    subtb_fwd_kernel(const scalar_t* __restrict__ pf, const scalar_t* __restrict__ lt,
                     const scalar_t* __restrict__ lr, int64_t ld_pf, int64_t ld_t, int64_t ld_r,
                     const int64_t* __restrict__ lengths, int64_t T, acc_t decay, acc_t* __restrict__ loss,
                     acc_t* __restrict__ weight) {
  using Agg = SubtbAgg<acc_t>;
  using BlockScan = cub::BlockScan<Agg, kSubtbThreads>;
  __shared__ typename BlockScan::TempStorage tmp;
  const int64_t b = blockIdx.x;
  const int64_t n = lengths[b];
  if (n < 0 || n > T) {  // uniform over the block
    if (threadIdx.x == 0) loss[b] = weight[b] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  const DeviceRow<scalar_t, acc_t> row{pf + b * ld_pf, lt + b * ld_t, lr + b * ld_r};
  Agg carry = subtb_identity<acc_t>();
  for (int64_t c0 = 0; c0 <= n; c0 += kSubtbChunk) {
    Agg th = subtb_identity<acc_t>();
#pragma unroll
    for (int j = 0; j < kSubtbItems; ++j) {
      const int64_t t = c0 + int64_t(threadIdx.x) * kSubtbItems + j;
      if (t <= n) th = subtb_combine(th, subtb_element(decay, t == 0 ? acc_t(0) : row.delta(t - 1)));
    }
    Agg incl, chunk;
    BlockScan(tmp).InclusiveScan(th, incl, SubtbCombineOp{}, chunk);
    carry = subtb_combine(carry, chunk);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    loss[b] = carry.i;
    weight[b] = carry.w;
  }
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kSubtbThreads)
    subtb_bwd_kernel(const acc_t* __restrict__ grad_loss, const scalar_t* __restrict__ pf,
                     const scalar_t* __restrict__ lt, const scalar_t* __restrict__ lr, int64_t ld_pf,
                     int64_t ld_t, int64_t ld_r, const int64_t* __restrict__ lengths, int64_t T, acc_t decay,
                     acc_t* __restrict__ scratch, scalar_t* __restrict__ g_pf, scalar_t* __restrict__ g_t,
                     scalar_t* __restrict__ g_r) {
  using Pre = PrefixAgg<acc_t>;
  using Suf = SuffixAgg<acc_t>;
  using PreScan = cub::BlockScan<Pre, kSubtbThreads>;
  using SufScan = cub::BlockScan<Suf, kSubtbThreads>;
  __shared__ union {
    typename PreScan::TempStorage pre;
    typename SufScan::TempStorage suf;
  } tmp;
  const int64_t b = blockIdx.x;
  const int64_t n = lengths[b];
  scalar_t* opf = g_pf + b * T;
  scalar_t* ot = g_t + b * (T + 1);
  scalar_t* orw = g_r + b * (T + 1);
  if (n < 0 || n > T) {  // uniform over the block
    const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t t = threadIdx.x; t <= T; t += kSubtbThreads) {
      ot[t] = nan;
      orw[t] = nan;
      if (t < T) opf[t] = nan;
    }
    return;
  }
  const DeviceRow<scalar_t, acc_t> row{pf + b * ld_pf, lt + b * ld_t, lr + b * ld_r};
  acc_t* sc_l0 = scratch + b * 2 * (T + 1);
  acc_t* sc_l1 = sc_l0 + (T + 1);

  // Pass 1: visit k holds state t = n - k; its element is state t+1's (delta_t), none for t = n. The
  // inclusive flipped scan at visit k is the suffix summary S(t+1) of states t+1..n.
  RunningPrefix<Suf, SuffixCombineFlippedOp> sfx_carry{suffix_identity<acc_t>(), SuffixCombineFlippedOp{}};
  for (int64_t c0 = 0; c0 <= n; c0 += kSubtbChunk) {
    Suf u[kSubtbItems];
    Suf th = suffix_identity<acc_t>();
#pragma unroll
    for (int j = 0; j < kSubtbItems; ++j) {
      const int64_t t = n - (c0 + int64_t(threadIdx.x) * kSubtbItems + j);
      u[j] = (t >= 0 && t < n) ? suffix_element(decay, row.delta(t)) : suffix_identity<acc_t>();
      th = SuffixCombineFlippedOp{}(th, u[j]);
    }
    Suf run;
    SufScan(tmp.suf).ExclusiveScan(th, run, SuffixCombineFlippedOp{}, sfx_carry);
#pragma unroll
    for (int j = 0; j < kSubtbItems; ++j) {
      const int64_t t = n - (c0 + int64_t(threadIdx.x) * kSubtbItems + j);
      run = SuffixCombineFlippedOp{}(run, u[j]);
      if (t >= 0) {
        sc_l0[t] = run.l0;
        sc_l1[t] = run.l1;
      }
    }
    __syncthreads();
  }
  __syncthreads();  // pass 2 reads the scratch row written by other threads

  // Pass 2: states in order; the exclusive prefix P(t-1) of each state, then its gradients.
  const acc_t g = grad_loss[b];
  RunningPrefix<Pre, PrefixCombineOp> pre_carry{prefix_identity<acc_t>(), PrefixCombineOp{}};
  for (int64_t c0 = 0; c0 <= T; c0 += kSubtbChunk) {
    acc_t din[kSubtbItems];
    Pre th = prefix_identity<acc_t>();
#pragma unroll
    for (int j = 0; j < kSubtbItems; ++j) {
      const int64_t t = c0 + int64_t(threadIdx.x) * kSubtbItems + j;
      din[j] = (t >= 1 && t <= n) ? row.delta(t - 1) : acc_t(0);
      if (t <= n) th = prefix_combine(th, prefix_element(decay, din[j]));
    }
    Pre run;
    PreScan(tmp.pre).ExclusiveScan(th, run, PrefixCombineOp{}, pre_carry);
#pragma unroll
    for (int j = 0; j < kSubtbItems; ++j) {
      const int64_t t = c0 + int64_t(threadIdx.x) * kSubtbItems + j;
      if (t > T) break;
      acc_t g_c = 0, g_d = 0;
      if (t <= n) {
        subtb_state_grads(run, decay, din[j], sc_l0[t], sc_l1[t], g_c, g_d);
        run = prefix_combine(run, prefix_element(decay, din[j]));
        g_c *= g;
        g_d = t < n ? g * g_d : acc_t(0);
      }
      ot[t] = static_cast<scalar_t>(g_c);
      orw[t] = static_cast<scalar_t>(-g_c);
      if (t < T) opf[t] = static_cast<scalar_t>(g_d);
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> subtb_fwd_cuda(const at::Tensor& log_pf, const at::Tensor& log_term,
                                                  const at::Tensor& log_reward, const at::Tensor& lengths,
                                                  double decay) {
  const char* op = "lacot::subtb_fwd_native";
  const SubtbShape sh =
      check_subtb_args(log_pf, log_term, log_reward, lengths, decay, op, c10::DeviceType::CUDA);
  TORCH_CHECK(sh.B <= std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 rows, got ", sh.B);
  const c10::cuda::CUDAGuard guard(log_pf.device());
  const auto opts = log_pf.options().dtype(acc_dtype(log_pf.scalar_type()));
  at::Tensor loss = at::empty({sh.B}, opts), weight = at::empty({sh.B}, opts);
  if (sh.B == 0) return {loss, weight};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, log_pf.scalar_type(), "subtb_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    subtb_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(sh.B), kSubtbThreads, 0, stream>>>(
        log_pf.const_data_ptr<scalar_t>(), log_term.const_data_ptr<scalar_t>(),
        log_reward.const_data_ptr<scalar_t>(), log_pf.stride(0), log_term.stride(0), log_reward.stride(0),
        lengths.const_data_ptr<int64_t>(), sh.T, static_cast<acc_t>(decay), loss.mutable_data_ptr<acc_t>(),
        weight.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subtb_bwd_cuda(const at::Tensor& grad_loss,
                                                              const at::Tensor& log_pf,
                                                              const at::Tensor& log_term,
                                                              const at::Tensor& log_reward,
                                                              const at::Tensor& lengths, double decay) {
  const char* op = "lacot::subtb_bwd_native";
  const SubtbShape sh =
      check_subtb_args(log_pf, log_term, log_reward, lengths, decay, op, c10::DeviceType::CUDA);
  TORCH_CHECK(sh.B <= std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 rows, got ", sh.B);
  check_device(grad_loss, op, "grad_loss", c10::DeviceType::CUDA);
  check_vector(grad_loss, op, "grad_loss", sh.B, acc_dtype(log_pf.scalar_type()));
  const c10::cuda::CUDAGuard guard(log_pf.device());
  const int64_t B = sh.B, T = sh.T;
  at::Tensor g_pf = at::empty({B, T}, log_pf.options());
  at::Tensor g_t = at::empty({B, T + 1}, log_term.options());
  at::Tensor g_r = at::empty({B, T + 1}, log_reward.options());
  if (B == 0) return {g_pf, g_t, g_r};
  at::Tensor scratch = at::empty({B, 2, T + 1}, log_pf.options().dtype(acc_dtype(log_pf.scalar_type())));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, log_pf.scalar_type(), "subtb_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    subtb_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kSubtbThreads, 0, stream>>>(
        grad_loss.const_data_ptr<acc_t>(), log_pf.const_data_ptr<scalar_t>(),
        log_term.const_data_ptr<scalar_t>(), log_reward.const_data_ptr<scalar_t>(), log_pf.stride(0),
        log_term.stride(0), log_reward.stride(0), lengths.const_data_ptr<int64_t>(), T,
        static_cast<acc_t>(decay), scratch.mutable_data_ptr<acc_t>(), g_pf.mutable_data_ptr<scalar_t>(),
        g_t.mutable_data_ptr<scalar_t>(), g_r.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_pf, g_t, g_r};
}

}  // namespace
}  // namespace lacot

// The schemas are defined in Python (lacot_kernels/_registry.py); only the CUDA kernels are registered here.
TORCH_LIBRARY_IMPL(lacot, CUDA, m) {
  m.impl("group_advantages_fwd_native", &lacot::group_advantages_fwd_cuda);
  m.impl("group_advantages_bwd_native", &lacot::group_advantages_bwd_cuda);
  m.impl("interpolate_rewards_fwd_native", &lacot::interpolate_rewards_fwd_cuda);
  m.impl("interpolate_rewards_bwd_native", &lacot::interpolate_rewards_bwd_cuda);
  m.impl("subtb_fwd_native", &lacot::subtb_fwd_cuda);
  m.impl("subtb_bwd_native", &lacot::subtb_bwd_cuda);
}
