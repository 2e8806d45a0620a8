// Shared math of the token_logprobs kernels: the CUDA kernels (token_logprobs_cuda.cu) and their CPU twin
// (token_logprobs_cpu.cpp) both compute every number through the helpers below, so that the CPU twin, which
// the CPU-only test suite checks against an fp64 reference, exercises the same formulas as the GPU kernels.
//
// Notation, for one row x (raw logits), temperature T, t = 1 / T, target y:
//   m    = max_v x_v                      (raw logit space: no scaling before the difference is formed)
//   d_v  = (x_v - m) * t                  (exact for huge logits: x_v - m is formed first)
//   s    = sum_v exp(d_v),  logs = log(s)
//   sd   = sum_v exp(d_v) * d_v           (for the entropy, accumulated in this shifted form)
//   logp = d_y - logs,  H = logs - sd / s
// Online form: when the running max moves from m to m' >= m, with delta = (m - m') * t <= 0,
//   s' = s * e^delta,  sd' = e^delta * (sd + delta * s).
// An "empty" state has s == 0 (m == -inf); -inf logits contribute exactly nothing (they never produce
// 0 * -inf). NaN logits propagate to NaN results; +inf logits give NaN (as torch.log_softmax does).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define LACOT_HD __host__ __device__ __forceinline__
#else
#define LACOT_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDACC__)
#define LACOT_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define LACOT_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define LACOT_UNROLL _Pragma("GCC unroll 16")
#else
#define LACOT_UNROLL
#endif

namespace lacot {
namespace tlp {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so that n * kLn2Hi is exact for |n| < 2^11
constexpr float kLn2Lo = 1.428606765330187e-06f;

LACOT_HD float neg_inf() { return -INFINITY; }
LACOT_HD float quiet_nan() { return NAN; }

LACOT_HD uint32_t float_as_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LACOT_HD float bits_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Branch-free fp32 exp (vectorizes: only multiplies, adds, compares/selects and integer bit operations).
// e^x = 2^n * e^r with n = rint(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite, two-part ln 2),
// e^r by its degree-7 Taylor polynomial (truncation < 6e-9 relative), 2^n built in the exponent field.
// Relative error about 1 ulp (< 2e-7) for x <= 88.3 (the kernels only evaluate x <= 0). x < -87.33 (e^x
// below FLT_MIN) and x = -inf give exactly 0, x > 88.72 gives +inf, NaN gives NaN.
LACOT_HD float exp_poly(float x) {
  // Clamp so that n stays in [-126, 127]; NaN passes both compares. (Every select below chooses between
  // values that are already computed, so that the compiler if-converts and vectorizes without masking.)
  const bool lo = x < -87.33654475f;
  const bool hi = x > 88.3f;
  float xc = lo ? -87.33654475f : x;
  xc = hi ? 88.3f : xc;
  // rint(xc * log2 e) by the 1.5 * 2^23 trick: afterwards the low mantissa bits of `big` hold n.
  const float big = xc * kLog2e + 12582912.0f;
  const float n = big - 12582912.0f;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n: the low 9 bits of big's pattern are n mod 512 (n in [-126, 127]); (n + 127) << 23 is the exponent.
  const float scale = bits_as_float((float_as_bits(big) + 127u) << 23);
  const float e = p * scale;
  const bool under = x < -87.33654475f;  // below FLT_MIN (and -inf): 0, no denormals
  const bool over = x > 88.72283935f;
  const float e0 = under ? 0.0f : e;
  return over ? INFINITY : e0;
}

// The exp of the kernels: the MUFU ex2 path on the GPU, the portable polynomial on the CPU.
LACOT_HD float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return exp_poly(x);
#endif
}

LACOT_HD float fast_log(float x) {
#ifdef __CUDA_ARCH__
  return __logf(x);
#else
  return std::log(x);
#endif
}

// Sampler truncation (token_logprobs(top_k / top_p / min_p)): a logit below the row's threshold tau is dropped,
// i.e. read as -inf, which every helper below already treats as contributing exactly nothing. With tau = -inf
// this is the identity for every x, NaN included (NaN < tau is false), so the plain kernels are unchanged.
LACOT_HD float keep_above(float x, float tau) { return x < tau ? neg_inf() : x; }

// ---- online softmax statistics ------------------------------------------------------------------

struct OnlineStats {
  float m;   // running max of the raw logits
  float s;   // sum exp((x - m) * t)
  float sd;  // sum exp((x - m) * t) * (x - m) * t   (only maintained when the entropy is wanted)
};

LACOT_HD OnlineStats stats_empty() { return OnlineStats{neg_inf(), 0.0f, 0.0f}; }

// The contribution of one logit x relative to a max m >= x: e = exp(d), ed = e * d with d = (x - m) * t.
// -inf logits contribute exactly 0 (also when m == -inf, where d would be NaN).
LACOT_HD void stats_term(float x, float m, float t, float& e, float& ed) {
  const float d = (x - m) * t;
  const bool live = x != neg_inf();  // true for NaN: NaN propagates
  const float ex = fast_exp(d);
  const float exd = ex * d;
  e = live ? ex : 0.0f;
  ed = live ? exd : 0.0f;
}

// Move the reference max of `st` to m_new >= st.m (no-op when equal).
template <bool kEnt>
LACOT_HD void stats_rescale(OnlineStats& st, float m_new, float t) {
  if (st.s == 0.0f) {  // empty: nothing to rescale (and avoids (-inf) - (-inf))
    st.m = m_new;
    return;
  }
  if (m_new == st.m) return;
  const float delta = (st.m - m_new) * t;
  const float e = fast_exp(delta);
  if (kEnt) st.sd = e * (st.sd + delta * st.s);
  st.s *= e;
  st.m = m_new;
}

// Start a group of logits whose max is mx: afterwards st.m >= every logit of the group, and each logit is
// added with stats_term relative to st.m (one rescale per group, one exp per logit).
template <bool kEnt>
LACOT_HD void stats_begin_group(OnlineStats& st, float mx, float t) {
  if (mx > st.m) stats_rescale<kEnt>(st, mx, t);
}

// Add a group of logits (any values) to the state.
template <bool kEnt, int kN>
LACOT_HD void stats_update_n(OnlineStats& st, const float (&x)[kN], float t) {
  float mx = x[0];
  LACOT_UNROLL
  for (int k = 1; k < kN; ++k) mx = x[k] > mx ? x[k] : mx;
  stats_begin_group<kEnt>(st, mx, t);
  LACOT_UNROLL
  for (int k = 0; k < kN; ++k) {
    float e, ed;
    stats_term(x[k], st.m, t, e, ed);
    st.s += e;
    if (kEnt) st.sd += ed;
  }
}

// Add one logit.
template <bool kEnt>
LACOT_HD void stats_update(OnlineStats& st, float x, float t) {
  const float one[1] = {x};
  stats_update_n<kEnt>(st, one, t);
}

// Combine two partial states (of disjoint sets of logits).
template <bool kEnt>
LACOT_HD OnlineStats stats_merge(const OnlineStats& a, const OnlineStats& b, float t) {
  if (b.s == 0.0f) return a;
  if (a.s == 0.0f) return b;
  const float m = a.m > b.m ? a.m : b.m;
  const float da = (a.m - m) * t;  // <= 0, one of da / db is 0
  const float db = (b.m - m) * t;
  const float ea = fast_exp(da);
  const float eb = fast_exp(db);
  OnlineStats r;
  r.m = m;
  r.s = a.s * ea + b.s * eb;
  r.sd = kEnt ? ea * (a.sd + da * a.s) + eb * (b.sd + db * b.s) : 0.0f;
  return r;
}

struct RowResult {
  float logp;     // log p_y
  float entropy;  // H
  float m;        // stats[0]
  float logs;     // stats[1]
};

// x_y: the target's raw logit.
LACOT_HD RowResult stats_finalize(const OnlineStats& st, float x_y, float t) {
  RowResult r;
  r.m = st.m;
  r.logs = fast_log(st.s);
  r.logp = (x_y - st.m) * t - r.logs;
  r.entropy = r.logs - st.sd / st.s;
  return r;
}

// Outputs of an ignored row (not read) and of a row whose target is out of range (not read either).
LACOT_HD RowResult row_ignored() { return RowResult{0.0f, 0.0f, 0.0f, 0.0f}; }
LACOT_HD RowResult row_invalid() { return RowResult{quiet_nan(), quiet_nan(), quiet_nan(), quiet_nan()}; }

// Row classification shared by forward and backward.
enum RowKind : int { kRowNormal = 0, kRowIgnored = 1, kRowInvalid = 2 };

LACOT_HD int classify_row(int64_t y, int64_t ignore_index, int64_t V) {
  if (y == ignore_index) return kRowIgnored;
  if (y < 0 || y >= V) return kRowInvalid;
  return kRowNormal;
}

// ---- backward -----------------------------------------------------------------------------------

// Per-row constants of the gradient. With log p_v = (x_v - m) t - logs and p_v = exp(log p_v):
//   g_v = (g_logp (1[v == y] - p_v) - g_ent p_v (log p_v + H)) t.
struct GradRow {
  float m, logs, t;
  float g_logp;  // upstream gradient of log p_y
  float g_ent;   // upstream gradient of H (0 when absent)
  float H;       // forward entropy (0 when absent)
  float tau;     // sampler threshold: logits below it are dropped (-inf: nothing is)
};

// Gradient of a non-target element (the target adds g_logp * t: see grad_target).
template <bool kEnt>
LACOT_HD float grad_elem(float x_raw, const GradRow& r) {
  const float x = keep_above(x_raw, r.tau);
  const float lp = (x - r.m) * r.t - r.logs;
  const float p = fast_exp(lp);
  float g = -r.g_logp * p;
  if (kEnt) {
    const float plp_all = p * (lp + r.H);
    const float plp = p > 0.0f ? plp_all : 0.0f;  // p == 0 (x = -inf): no 0 * -inf
    g -= r.g_ent * plp;
  }
  return g * r.t;
}

template <bool kEnt>
LACOT_HD float grad_target(float x_raw, const GradRow& r) {
  const float x_y = keep_above(x_raw, r.tau);
  const float lp = (x_y - r.m) * r.t - r.logs;
  const float p = fast_exp(lp);
  float g = r.g_logp * (1.0f - p);
  if (kEnt) {
    const float plp = p > 0.0f ? p * (lp + r.H) : 0.0f;
    g -= r.g_ent * plp;
  }
  return g * r.t;
}

}  // namespace tlp
}  // namespace lacot
