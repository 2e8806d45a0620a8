// Shared math of the reward kernels: GRPO group advantages, LaCoT reward interpolation and the sub-trajectory
// balance loss. The CUDA kernels (rewards_cuda.cu) and their CPU twins (rewards_cpu.cpp) compute every number
// through these helpers, so the CPU-only test suite, which checks the twins against fp64 references,
// exercises the formulas the GPU runs. The algebra is explained in lacot_kernels/ops/rewards.py and
// ops/subtb.py; the names below follow those files. T is the accumulation type: float, or double for float64
// inputs.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef LACOT_HD
#ifdef __CUDACC__
#define LACOT_HD __host__ __device__ __forceinline__
#else
#define LACOT_HD inline __attribute__((always_inline))
#endif
#endif

namespace lacot {
namespace rw {

// ---- compensated summation
// -----------------------------------------------------------------------------------

// Kahan-Babuska (Neumaier) sum: the rounding error of every addition is kept in `c`, also when the addend is
// larger than the running sum, so the result is as if accumulated in twice the precision.
template <class T>
struct KahanSum {
  T s = T(0), c = T(0);
  LACOT_HD void add(T x) {
    const T t = s + x;
    const T as = s < T(0) ? -s : s;
    const T ax = x < T(0) ? -x : x;
    c += as >= ax ? (s - t) + x : (x - t) + s;
    s = t;
  }
  LACOT_HD T value() const { return s + c; }
};

template <class T>
LACOT_HD T sqrt_of(T x) {
#ifdef __CUDA_ARCH__
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// ---- group advantages
// ----------------------------------------------------------------------------------------

enum AdvScale : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// A NaN reward is a missing one: left out of means and stds, advantage and gradient 0.
template <class T>
LACOT_HD bool present(T x) {
  return x == x;
}

// Bessel-corrected (or not) count; a std over fewer than two rewards (unbiased) or none is 0.
template <class T>
LACOT_HD T adv_dof(T count, bool unbiased) {
  return unbiased ? count - T(1) : count;
}
template <class T>
LACOT_HD T adv_std(T m2, T count, bool unbiased) {
  const T k = adv_dof(count, unbiased);
  return k > T(0) ? sqrt_of(m2 / k) : T(0);
}
template <class T>
LACOT_HD T adv_mean(T sum, T count) {
  return sum / (count > T(1) ? count : T(1));
}
// The same, kept inside [lo, hi] (min and max of the values), as the exact mean is: a group of equal rewards
// then has mean exactly their value, hence advantages exactly 0 rather than rounding noise over a tiny std.
template <class T>
LACOT_HD T adv_mean(T sum, T count, T lo, T hi) {
  const T m = adv_mean(sum, count);
  if (!(count > T(0))) return m;
  return m < lo ? lo : (m > hi ? hi : m);
}
// Running min / max of the present values (start from +inf / -inf).
template <class T>
LACOT_HD void adv_range_add(T x, T& lo, T& hi) {
  lo = x < lo ? x : lo;
  hi = x > hi ? x : hi;
}
// 1 / d, and 0 where d = 0 (eps = 0 and equal rewards): those advantages are exactly 0, not NaN.
template <class T>
LACOT_HD T safe_inv(T d) {
  return d > T(0) ? T(1) / d : T(0);
}
template <class T>
LACOT_HD T adv_value(T x, T mean, T inv) {
  return present(x) ? (x - mean) * inv : T(0);
}
// Coefficient of (r_j - ref) in dA/dr: P / (d^2 k std), 0 where the std is 0 (its subgradient) or d = 0.
template <class T>
LACOT_HD T adv_std_coef(T p, T inv, T std, T count, bool unbiased) {
  const T k = adv_dof(count, unbiased);
  return (std > T(0) && inv > T(0)) ? p * inv * inv / (k * std) : T(0);
}
template <class T>
LACOT_HD T adv_grad(T x, T g, T g_bar, T inv, T coef, T ref) {
  return present(x) ? (g - g_bar) * inv - coef * (x - ref) : T(0);
}

// ---- interpolation
// -------------------------------------------------------------------------------------------

// Position s strictly between consecutive anchors p < q: weight of q.
template <class T>
LACOT_HD T interp_weight(int64_t s, int64_t p, int64_t q) {
  return T(s - p) / T(q - p);
}
template <class T>
LACOT_HD T interp_value(T vp, T vq, T w) {
  return vp + w * (vq - vp);
}

// ---- sub-trajectory balance
// ----------------------------------------------------------------------------------

// delta_t from the five inputs around t: neighbouring rewards (|.| ~ 1e3) are subtracted first.
template <class T>
LACOT_HD T subtb_delta(T lr_t, T lr_t1, T lt_t, T lt_t1, T lpf_t) {
  return (lr_t - lr_t1) + (lt_t1 - lt_t) + lpf_t;
}

// Summary of a run of states (see ops/subtb.py): decay^len, the run's sum of deltas, right- and left-facing
// moments, the run's loss and pair weight.
template <class T>
struct SubtbAgg {
  T pw, d, r0, r1, r2, l0, l1, l2, i, w;
};

template <class T>
LACOT_HD SubtbAgg<T> subtb_identity() {
  return SubtbAgg<T>{T(1), T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
}
// State k with incoming delta (delta_{k-1}; 0 for state 0).
template <class T>
LACOT_HD SubtbAgg<T> subtb_element(T decay, T delta) {
  return SubtbAgg<T>{decay, delta, T(1), T(0), T(0), T(1), delta, delta * delta, T(0), T(0)};
}
// a is the run left of b (associative, not commutative).
template <class T>
LACOT_HD SubtbAgg<T> subtb_combine(const SubtbAgg<T>& a, const SubtbAgg<T>& b) {
  SubtbAgg<T> r;
  r.pw = a.pw * b.pw;
  r.d = a.d + b.d;
  r.r0 = b.r0 + b.pw * a.r0;
  r.r1 = b.r1 + b.pw * (a.r1 + b.d * a.r0);
  r.r2 = b.r2 + b.pw * (a.r2 + b.d * (T(2) * a.r1 + b.d * a.r0));
  r.l0 = a.l0 + a.pw * b.l0;
  r.l1 = a.l1 + a.pw * (b.l1 + a.d * b.l0);
  r.l2 = a.l2 + a.pw * (b.l2 + a.d * (T(2) * b.l1 + a.d * b.l0));
  r.i = a.i + b.i + (a.r0 * b.l2 + T(2) * a.r1 * b.l1 + a.r2 * b.l0);
  r.w = a.w + b.w + a.r0 * b.l0;
  return r;
}

// Prefix (forward-scan) part: pw, d, r0, r1.
template <class T>
struct PrefixAgg {
  T pw, d, r0, r1;
};
template <class T>
LACOT_HD PrefixAgg<T> prefix_identity() {
  return PrefixAgg<T>{T(1), T(0), T(0), T(0)};
}
template <class T>
LACOT_HD PrefixAgg<T> prefix_element(T decay, T delta) {
  return PrefixAgg<T>{decay, delta, T(1), T(0)};
}
template <class T>
LACOT_HD PrefixAgg<T> prefix_combine(const PrefixAgg<T>& a, const PrefixAgg<T>& b) {
  return PrefixAgg<T>{a.pw * b.pw, a.d + b.d, b.r0 + b.pw * a.r0, b.r1 + b.pw * (a.r1 + b.d * a.r0)};
}

// Suffix (backward-scan) part: pw, d, l0, l1; a is the run left of b.
template <class T>
struct SuffixAgg {
  T pw, d, l0, l1;
};
template <class T>
LACOT_HD SuffixAgg<T> suffix_identity() {
  return SuffixAgg<T>{T(1), T(0), T(0), T(0)};
}
template <class T>
LACOT_HD SuffixAgg<T> suffix_element(T decay, T delta) {
  return SuffixAgg<T>{decay, delta, T(1), delta};
}
template <class T>
LACOT_HD SuffixAgg<T> suffix_combine(const SuffixAgg<T>& a, const SuffixAgg<T>& b) {
  return SuffixAgg<T>{a.pw * b.pw, a.d + b.d, a.l0 + a.pw * b.l0, a.l1 + a.pw * (b.l1 + a.d * b.l0)};
}

// Functors for block scans (cub on the GPU, loops on the CPU). The suffix scan visits states right to left,
// so it combines with the operands swapped (the accumulated run is on the right).
struct SubtbCombineOp {
  template <class T>
  LACOT_HD SubtbAgg<T> operator()(const SubtbAgg<T>& a, const SubtbAgg<T>& b) const {
    return subtb_combine(a, b);
  }
};
struct PrefixCombineOp {
  template <class T>
  LACOT_HD PrefixAgg<T> operator()(const PrefixAgg<T>& a, const PrefixAgg<T>& b) const {
    return prefix_combine(a, b);
  }
};
struct SuffixCombineFlippedOp {
  template <class T>
  LACOT_HD SuffixAgg<T> operator()(const SuffixAgg<T>& acc, const SuffixAgg<T>& next_left) const {
    return suffix_combine(next_left, acc);
  }
};

// Gradients at state t from the exclusive prefix P(t-1), state t's incoming delta, and the suffix S(t+1):
//   dL/dC_t = 2 (S1_t - T1_t) with S1_t = r1_P(t-1) + delta_{t-1} r0_P(t-1), T1_t = l1_S(t+1);
//   dL/ddelta_t = 2 (r0_P(t) l1_S(t+1) + r1_P(t) l0_S(t+1)) with P(t) = P(t-1) + state t.
template <class T>
LACOT_HD void subtb_state_grads(const PrefixAgg<T>& excl, T decay, T delta_in, T sfx_l0, T sfx_l1, T& g_c,
                                T& g_delta) {
  const PrefixAgg<T> incl = prefix_combine(excl, prefix_element(decay, delta_in));
  g_c = T(2) * ((excl.r1 + delta_in * excl.r0) - sfx_l1);
  g_delta = T(2) * (incl.r0 * sfx_l1 + incl.r1 * sfx_l0);
}

}  // namespace rw
}  // namespace lacot
