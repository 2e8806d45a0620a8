// CPU twin of the token_logprobs CUDA kernels: the same math (token_logprobs_math.h), OpenMP over rows.
//
// Forward, per row: the vocabulary is processed in blocks of kBlock floats (L1-resident): block max, then one
// rescale of the running statistics (stats_begin_group) and a vectorized pass summing exp(d) and exp(d) d
// (stats_term: branch-free polynomial exp); as in the CUDA kernel, partial row states are finally combined
// with stats_merge. Backward, per row: one vectorized pass writing the gradient (grad_elem), then the target
// element is fixed up (grad_target). The hot row functions are compiled for AVX-512, AVX2+FMA and baseline
// x86-64 (gcc function multiversioning), the best one being picked when the library is loaded.
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common.h"

// Let gcc fuse multiply-adds in the AVX2/AVX-512 clones (-std=c++20 turns contraction off by default), and
// if-convert selects without caring about floating-point exception flags (never inspected here).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast", "no-trapping-math")
#endif

#include "token_logprobs_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LACOT_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define LACOT_CLONES
#endif
#define LACOT_INLINE inline __attribute__((always_inline))

namespace lacot {
namespace {

using namespace lacot::tlp;

constexpr int kBlock = 2048;  // floats per vocabulary block (8 KiB)
constexpr int kLanes = 4;     // partial row states, merged at the end of the row (a power of 2)

// ---- element conversions (branch-free, so that the loops vectorize) -----------------------------

struct F32IO {
  using storage = float;
  static constexpr bool kIsFloat = true;
  static LACOT_INLINE float load(float v) { return v; }
  static LACOT_INLINE float store(float v) { return v; }
};

struct BF16IO {
  using storage = uint16_t;
  static constexpr bool kIsFloat = false;
  static LACOT_INLINE float load(uint16_t b) { return bits_as_float(uint32_t(b) << 16); }
  static LACOT_INLINE uint16_t store(float f) {  // round to nearest even, NaN stays NaN
    const uint32_t u = float_as_bits(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? uint16_t(0x7FC0) : uint16_t(r);
  }
};

struct F16IO {
  using storage = uint16_t;
  static constexpr bool kIsFloat = false;
  static LACOT_INLINE float load(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu;
    uint32_t bits = (uint32_t(h & 0x7FFFu) << 13) + 0x38000000u;   // rebias the exponent: 15 -> 127
    bits = e == 0x1Fu ? bits + 0x38000000u : bits;                 // inf / NaN: exponent 255
    const float sub = float(h & 0x3FFu) * 5.9604644775390625e-8f;  // subnormal (and zero): m * 2^-24
    return bits_as_float(sign | (e == 0 ? float_as_bits(sub) : bits));
  }
  static LACOT_INLINE uint16_t store(float f) {  // round to nearest even, overflow to inf, NaN stays NaN
    const uint32_t x = float_as_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t a = x & 0x7FFFFFFFu;
    // Normal results: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
    uint32_t normal = ((a - 0x38000000u) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    normal = normal < 0x7C00u ? normal : 0x7C00u;
    // Subnormal results (|f| < 2^-14): adding 0.5 puts the fp32 ulp at 2^-24, the fp16 subnormal step.
    const uint32_t sub = float_as_bits(bits_as_float(a) + 0.5f) - 0x3F000000u;
    uint32_t h = a < 0x38800000u ? sub : normal;
    h = a > 0x7F800000u ? 0x7E00u : h;
    return uint16_t(sign | h);
  }
};

// ---- forward ------------------------------------------------------------------------------------

// One row. Like a CUDA block, the row is accumulated into several partial states (here block b goes to lane
// b % kLanes, as a GPU thread takes every kThreads-th vector), each block as one group (stats_begin_group,
// then stats_term relative to the lane's max), and the partial states are combined by a stats_merge tree.
template <class IO, bool kEnt>
LACOT_INLINE OnlineStats fwd_row(const typename IO::storage* row, int64_t V, float t, float tau) {
  alignas(64) float buf[IO::kIsFloat ? 1 : kBlock];
  OnlineStats lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = stats_empty();
  int lane = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock, lane = (lane + 1) % kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, V - b0));
    const float* p;
    if constexpr (IO::kIsFloat) {
      p = row + b0;
    } else {
      const typename IO::storage* src = row + b0;
#pragma omp simd
      for (int i = 0; i < n; ++i) buf[i] = IO::load(src[i]);
      p = buf;
    }
    float bm = neg_inf();
#pragma omp simd reduction(max : bm)
    for (int i = 0; i < n; ++i) {
      const float xi = keep_above(p[i], tau);
      bm = xi > bm ? xi : bm;
    }
    OnlineStats& st = lanes[lane];
    stats_begin_group<kEnt>(st, bm, t);
    const float m = st.m;
    float s = 0.0f, sd = 0.0f;
    if constexpr (kEnt) {
#pragma omp simd reduction(+ : s, sd)
      for (int i = 0; i < n; ++i) {
        float e, ed;
        stats_term(keep_above(p[i], tau), m, t, e, ed);
        s += e;
        sd += ed;
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int i = 0; i < n; ++i) {
        float e, ed;
        stats_term(keep_above(p[i], tau), m, t, e, ed);
        s += e;
      }
    }
    st.s += s;
    if (kEnt) st.sd += sd;
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] = stats_merge<kEnt>(lanes[l], lanes[l + width], t);
  }
  return lanes[0];
}

LACOT_CLONES OnlineStats fwd_row_f32(const float* row, int64_t V, float t, float tau, bool ent) {
  return ent ? fwd_row<F32IO, true>(row, V, t, tau) : fwd_row<F32IO, false>(row, V, t, tau);
}
LACOT_CLONES OnlineStats fwd_row_bf16(const uint16_t* row, int64_t V, float t, float tau, bool ent) {
  return ent ? fwd_row<BF16IO, true>(row, V, t, tau) : fwd_row<BF16IO, false>(row, V, t, tau);
}
LACOT_CLONES OnlineStats fwd_row_f16(const uint16_t* row, int64_t V, float t, float tau, bool ent) {
  return ent ? fwd_row<F16IO, true>(row, V, t, tau) : fwd_row<F16IO, false>(row, V, t, tau);
}

template <class IO>
struct FwdRowFn;
template <>
struct FwdRowFn<F32IO> {
  static OnlineStats run(const float* r, int64_t V, float t, float tau, bool e) {
    return fwd_row_f32(r, V, t, tau, e);
  }
};
template <>
struct FwdRowFn<BF16IO> {
  static OnlineStats run(const uint16_t* r, int64_t V, float t, float tau, bool e) {
    return fwd_row_bf16(r, V, t, tau, e);
  }
};
template <>
struct FwdRowFn<F16IO> {
  static OnlineStats run(const uint16_t* r, int64_t V, float t, float tau, bool e) {
    return fwd_row_f16(r, V, t, tau, e);
  }
};

// Rows are independent; small problems stay on the calling thread.
inline bool worth_parallel(int64_t N, int64_t V) { return N > 1 && N * V >= 32768; }
inline int num_threads(int64_t N) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N)));
}

template <class IO>
void fwd_cpu_impl(const typename IO::storage* logits, int64_t ld, const int64_t* targets, int64_t N,
                  int64_t V, float t, int64_t ignore_index, bool compute_entropy, const float* tau_ptr,
                  float* logp, float* entropy, float* stats) {
  const int nt = num_threads(N);
#pragma omp parallel for schedule(static) num_threads(nt) if (worth_parallel(N, V))
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = targets[i];
    const int kind = classify_row(y, ignore_index, V);
    RowResult r;
    if (kind == kRowIgnored) {
      r = row_ignored();
    } else if (kind == kRowInvalid) {
      r = row_invalid();
    } else {
      const typename IO::storage* row = logits + i * ld;
      const float tau = tau_ptr ? tau_ptr[i] : neg_inf();
      const OnlineStats st = FwdRowFn<IO>::run(row, V, t, tau, compute_entropy);
      r = stats_finalize(st, keep_above(IO::load(row[y]), tau), t);
    }
    logp[i] = r.logp;
    if (compute_entropy) entropy[i] = r.entropy;
    stats[2 * i] = r.m;
    stats[2 * i + 1] = r.logs;
  }
}

// ---- backward -----------------------------------------------------------------------------------

template <class IO, bool kEnt>
LACOT_INLINE void bwd_row(const typename IO::storage* row, typename IO::storage* out, int64_t V,
                          const GradRow& row_consts) {
  const GradRow r = row_consts;  // a local copy: the stores to `out` cannot alias it
  alignas(64) float buf[IO::kIsFloat ? 1 : kBlock];
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, V - b0));
    const typename IO::storage* src = row + b0;
    typename IO::storage* dst = out + b0;
    if constexpr (IO::kIsFloat) {
#pragma omp simd
      for (int i = 0; i < n; ++i) dst[i] = grad_elem<kEnt>(src[i], r);
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) buf[i] = grad_elem<kEnt>(IO::load(src[i]), r);
#pragma omp simd
      for (int i = 0; i < n; ++i) dst[i] = IO::store(buf[i]);
    }
  }
}

LACOT_CLONES void bwd_row_f32(const float* row, float* out, int64_t V, const GradRow& r, bool ent) {
  ent ? bwd_row<F32IO, true>(row, out, V, r) : bwd_row<F32IO, false>(row, out, V, r);
}
LACOT_CLONES void bwd_row_bf16(const uint16_t* row, uint16_t* out, int64_t V, const GradRow& r, bool ent) {
  ent ? bwd_row<BF16IO, true>(row, out, V, r) : bwd_row<BF16IO, false>(row, out, V, r);
}
LACOT_CLONES void bwd_row_f16(const uint16_t* row, uint16_t* out, int64_t V, const GradRow& r, bool ent) {
  ent ? bwd_row<F16IO, true>(row, out, V, r) : bwd_row<F16IO, false>(row, out, V, r);
}

template <class IO>
struct BwdRowFn;
template <>
struct BwdRowFn<F32IO> {
  static void run(const float* x, float* o, int64_t V, const GradRow& r, bool e) {
    bwd_row_f32(x, o, V, r, e);
  }
};
template <>
struct BwdRowFn<BF16IO> {
  static void run(const uint16_t* x, uint16_t* o, int64_t V, const GradRow& r, bool e) {
    bwd_row_bf16(x, o, V, r, e);
  }
};
template <>
struct BwdRowFn<F16IO> {
  static void run(const uint16_t* x, uint16_t* o, int64_t V, const GradRow& r, bool e) {
    bwd_row_f16(x, o, V, r, e);
  }
};

template <class IO>
void bwd_cpu_impl(const float* grad_logp, int64_t gl_stride, const float* grad_entropy, int64_t ge_stride,
                  const typename IO::storage* logits, int64_t ld, const int64_t* targets, const float* stats,
                  const float* entropy, int64_t N, int64_t V, float t, int64_t ignore_index,
                  const float* tau_ptr, typename IO::storage* grad) {
  const int nt = num_threads(N);
  const bool ent = grad_entropy != nullptr;
#pragma omp parallel for schedule(static) num_threads(nt) if (worth_parallel(N, V))
  for (int64_t i = 0; i < N; ++i) {
    typename IO::storage* out = grad + i * V;
    const int64_t y = targets[i];
    const int kind = classify_row(y, ignore_index, V);
    if (kind == kRowIgnored) {
      std::fill(out, out + V, IO::store(0.0f));
      continue;
    }
    if (kind == kRowInvalid) {
      std::fill(out, out + V, IO::store(quiet_nan()));
      continue;
    }
    GradRow r;
    r.m = stats[2 * i];
    r.logs = stats[2 * i + 1];
    r.t = t;
    r.g_logp = grad_logp[i * gl_stride];
    r.g_ent = ent ? grad_entropy[i * ge_stride] : 0.0f;
    r.H = ent ? entropy[i] : 0.0f;
    r.tau = tau_ptr ? tau_ptr[i] : neg_inf();
    const typename IO::storage* row = logits + i * ld;
    BwdRowFn<IO>::run(row, out, V, r, ent);
    const float xy = IO::load(row[y]);
    out[y] = IO::store(ent ? grad_target<true>(xy, r) : grad_target<false>(xy, r));
  }
}

// ---- dispatcher entry points --------------------------------------------------------------------

template <class F>
void dispatch_io(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(F32IO{});
      break;
    case at::kBFloat16:
      f(BF16IO{});
      break;
    case at::kHalf:
      f(F16IO{});
      break;
    default:
      TORCH_CHECK(false, "lacot: unsupported logits dtype ", st);
  }
}

template <class IO>
const typename IO::storage* data_as(const at::Tensor& t) {
  return reinterpret_cast<const typename IO::storage*>(t.const_data_ptr());
}
template <class IO>
typename IO::storage* mutable_data_as(at::Tensor& t) {
  return reinterpret_cast<typename IO::storage*>(t.mutable_data_ptr());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& targets,
                                                                      double temperature,
                                                                      int64_t ignore_index,
                                                                      bool compute_entropy,
                                                                      const std::optional<at::Tensor>& tau) {
  const RowShape shape = check_fwd_args(logits, targets, temperature, c10::DeviceType::CPU);
  check_tau(tau, logits, "lacot::token_logprobs_fwd_native");
  const int64_t N = shape.N, V = shape.V;
  const auto fopts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, fopts);
  at::Tensor entropy = at::empty({compute_entropy ? N : 0}, fopts);
  at::Tensor stats = at::empty({N, 2}, fopts);
  if (N == 0) return {logp, entropy, stats};
  const float t = static_cast<float>(1.0 / temperature);
  const int64_t ld = logits.stride(0);
  dispatch_io(logits.scalar_type(), [&](auto io) {
    using IO = decltype(io);
    fwd_cpu_impl<IO>(data_as<IO>(logits), ld, targets.const_data_ptr<int64_t>(), N, V, t, ignore_index,
                     compute_entropy, tau ? tau->const_data_ptr<float>() : nullptr, logp.mutable_data_ptr<float>(),
                     compute_entropy ? entropy.mutable_data_ptr<float>() : nullptr,
                     stats.mutable_data_ptr<float>());
  });
  return {logp, entropy, stats};
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& stats, const at::Tensor& entropy, double temperature,
                                  int64_t ignore_index, const std::optional<at::Tensor>& tau) {
  const RowShape shape = check_bwd_args(grad_logp, grad_entropy, logits, targets, stats, entropy, temperature,
                                        c10::DeviceType::CPU);
  check_tau(tau, logits, "lacot::token_logprobs_bwd_native");
  const int64_t N = shape.N, V = shape.V;
  at::Tensor grad = at::empty({N, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return grad;
  const float t = static_cast<float>(1.0 / temperature);
  const int64_t ld = logits.stride(0);
  const bool ent = grad_entropy.has_value();
  dispatch_io(logits.scalar_type(), [&](auto io) {
    using IO = decltype(io);
    bwd_cpu_impl<IO>(grad_logp.const_data_ptr<float>(), grad_logp.stride(0),
                     ent ? grad_entropy->const_data_ptr<float>() : nullptr, ent ? grad_entropy->stride(0) : 0,
                     data_as<IO>(logits), ld, targets.const_data_ptr<int64_t>(),
                     stats.const_data_ptr<float>(), ent ? entropy.const_data_ptr<float>() : nullptr, N, V, t,
                     ignore_index, tau ? tau->const_data_ptr<float>() : nullptr, mutable_data_as<IO>(grad));
  });
  return grad;
}

}  // namespace
}  // namespace lacot

// The schemas are defined in Python (lacot_kernels/_registry.py); only the CPU kernels are registered here.
TORCH_LIBRARY_IMPL(lacot, CPU, m) {
  m.impl("token_logprobs_fwd_native", &lacot::token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd_native", &lacot::token_logprobs_bwd_cpu);
}
