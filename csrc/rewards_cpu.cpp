// CPU twins of the reward kernels (rewards_cuda.cu): GRPO group advantages, LaCoT reward interpolation and
// the sub-trajectory balance loss. Every number goes through the helpers of rewards_math.h that the CUDA
// kernels use; only the parallel structure differs (here: groups / rows spread over OpenMP threads, each
// walked sequentially with compensated sums, and the SubTB summaries reduced and scanned as balanced trees,
// i.e. pairwise).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "rewards_checks.h"
#include "rewards_math.h"

namespace lacot {
namespace {

using namespace lacot::rw;

// Items (groups / rows) per parallel task, so that a task holds >= 256 Ki elements (about a millisecond of
// work): below that an OpenMP fork costs more than it saves, and far more when the cores are shared (a woken
// worker waits for a time slice).
inline int64_t grain_for(int64_t elems_per_item) {
  constexpr int64_t kMinElemsPerTask = int64_t(1) << 18;
  return std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(elems_per_item, 1));
}

// ---- group advantages
// ----------------------------------------------------------------------------------------

template <class acc_t>
struct Moments {
  acc_t mean, count, m2;
};

// Two passes (mean, then the centred sum of squares), both compensated.
template <class scalar_t, class acc_t>
Moments<acc_t> moments(const scalar_t* r, int64_t n) {
  KahanSum<acc_t> s;
  acc_t count = 0;
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = static_cast<acc_t>(r[j]);
    if (present(x)) {
      s.add(x);
      count += acc_t(1);
      adv_range_add(x, lo, hi);
    }
  }
  const acc_t mean = adv_mean(s.value(), count, lo, hi);
  KahanSum<acc_t> m2;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = static_cast<acc_t>(r[j]);
    if (present(x)) m2.add((x - mean) * (x - mean));
  }
  return {mean, count, m2.value()};
}

at::Tensor group_advantages_fwd_cpu(const at::Tensor& rewards, int64_t group_size, int64_t scale, double eps,
                                    bool unbiased) {
  const char* op = "lacot::group_advantages_fwd_native";
  check_adv_args(rewards, group_size, scale, eps, op, c10::DeviceType::CPU);
  const int64_t N = rewards.numel();
  at::Tensor out = at::empty({N}, rewards.options().dtype(acc_dtype(rewards.scalar_type())));
  if (N == 0) return out;
  const int64_t n_groups = N / group_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, rewards.scalar_type(), "group_advantages_fwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* r = rewards.const_data_ptr<scalar_t>();
        acc_t* a = out.mutable_data_ptr<acc_t>();
        acc_t batch_std = 0;
        if (scale == kScaleBatch) {
          const Moments<acc_t> m = moments<scalar_t, acc_t>(r, N);
          batch_std = adv_std(m.m2, m.count, unbiased);
        }
        const acc_t e = static_cast<acc_t>(eps);
        at::parallel_for(0, n_groups, grain_for(group_size), [&](int64_t g0, int64_t g1) {
          for (int64_t g = g0; g < g1; ++g) {
            const scalar_t* rg = r + g * group_size;
            const Moments<acc_t> m = moments<scalar_t, acc_t>(rg, group_size);
            acc_t d = acc_t(1);
            if (scale == kScaleGroup) d = adv_std(m.m2, m.count, unbiased) + e;
            if (scale == kScaleBatch) d = batch_std + e;
            const acc_t inv = safe_inv(d);
            for (int64_t j = 0; j < group_size; ++j)
              a[g * group_size + j] = adv_value(acc_t(rg[j]), m.mean, inv);
          }
        });
      });
  return out;
}

at::Tensor group_advantages_bwd_cpu(const at::Tensor& grad, const at::Tensor& rewards, int64_t group_size,
                                    int64_t scale, double eps, bool unbiased) {
  const char* op = "lacot::group_advantages_bwd_native";
  check_adv_args(rewards, group_size, scale, eps, op, c10::DeviceType::CPU);
  const int64_t N = rewards.numel();
  check_device(grad, op, "grad", c10::DeviceType::CPU);
  check_vector(grad, op, "grad", N, acc_dtype(rewards.scalar_type()));
  at::Tensor out = at::empty({N}, rewards.options());
  if (N == 0) return out;
  const int64_t n_groups = N / group_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, rewards.scalar_type(), "group_advantages_bwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* r = rewards.const_data_ptr<scalar_t>();
        const acc_t* gr = grad.const_data_ptr<acc_t>();
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        const acc_t e = static_cast<acc_t>(eps);
        Moments<acc_t> bm{0, 0, 0};
        acc_t b_std = 0, p_tot = 0;
        if (scale == kScaleBatch) {
          bm = moments<scalar_t, acc_t>(r, N);
          b_std = adv_std(bm.m2, bm.count, unbiased);
          KahanSum<acc_t> p;  // sum over the batch of g_i (r_i - mean of i's group)
          for (int64_t g = 0; g < n_groups; ++g) {
            const scalar_t* rg = r + g * group_size;
            const acc_t mean = moments<scalar_t, acc_t>(rg, group_size).mean;
            for (int64_t j = 0; j < group_size; ++j) {
              const acc_t x = acc_t(rg[j]);
              if (present(x)) p.add(gr[g * group_size + j] * (x - mean));
            }
          }
          p_tot = p.value();
        }
        at::parallel_for(0, n_groups, grain_for(group_size), [&](int64_t g0, int64_t g1) {
          for (int64_t g = g0; g < g1; ++g) {
            const scalar_t* rg = r + g * group_size;
            const acc_t* gg = gr + g * group_size;
            const Moments<acc_t> m = moments<scalar_t, acc_t>(rg, group_size);
            KahanSum<acc_t> sg, sgc;
            for (int64_t j = 0; j < group_size; ++j) {
              const acc_t x = acc_t(rg[j]);
              if (present(x)) {
                sg.add(gg[j]);
                sgc.add(gg[j] * (x - m.mean));
              }
            }
            const acc_t g_bar = adv_mean(sg.value(), m.count);
            acc_t std = 0, d = 1, p = 0, ref = m.mean, count = m.count;
            if (scale == kScaleGroup) {
              std = adv_std(m.m2, m.count, unbiased);
              d = std + e;
              p = sgc.value();
            } else if (scale == kScaleBatch) {
              std = b_std;
              d = b_std + e;
              p = p_tot;
              ref = bm.mean;
              count = bm.count;
            }
            const acc_t inv = safe_inv(d);
            const acc_t coef = adv_std_coef(p, inv, std, count, unbiased);
            for (int64_t j = 0; j < group_size; ++j) {
              o[g * group_size + j] =
                  static_cast<scalar_t>(adv_grad(acc_t(rg[j]), gg[j], g_bar, inv, coef, ref));
            }
          }
        });
      });
  return out;
}

// ---- interpolation
// -------------------------------------------------------------------------------------------

void anchors_of(const bool* m, int64_t S, std::vector<int64_t>& list) {
  list.clear();
  for (int64_t s = 0; s < S; ++s)
    if (m[s]) list.push_back(s);
}

at::Tensor interpolate_rewards_fwd_cpu(const at::Tensor& values, const at::Tensor& anchor_mask) {
  const char* op = "lacot::interpolate_rewards_fwd_native";
  check_interp_args(values, anchor_mask, op, "values", c10::DeviceType::CPU);
  TORCH_CHECK(is_reward_dtype(values.scalar_type()), op, ": `values` must be float32, bfloat16, float16 or ",
              "float64, got ", values.scalar_type());
  const int64_t B = values.size(0), S = values.size(1);
  at::Tensor out = at::zeros({B, S}, values.options().dtype(acc_dtype(values.scalar_type())));
  if (B * S == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, values.scalar_type(), "interpolate_rewards_fwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* v = values.const_data_ptr<scalar_t>();
        const bool* m = anchor_mask.const_data_ptr<bool>();
        acc_t* o = out.mutable_data_ptr<acc_t>();
        const int64_t ldv = values.stride(0), ldm = anchor_mask.stride(0);
        at::parallel_for(0, B, grain_for(S), [&](int64_t b0, int64_t b1) {
          std::vector<int64_t> list;
          for (int64_t b = b0; b < b1; ++b) {
            anchors_of(m + b * ldm, S, list);
            const scalar_t* vr = v + b * ldv;
            acc_t* orow = o + b * S;
            const int64_t K = static_cast<int64_t>(list.size());
            for (int64_t k = 0; k + 1 < K; ++k) {  // each gap [p, q): p keeps its value, the inside is a lerp
              const int64_t p = list[k], q = list[k + 1];
              const acc_t vp = acc_t(vr[p]), vq = acc_t(vr[q]);
              orow[p] = vp;
              for (int64_t s = p + 1; s < q; ++s)
                orow[s] = interp_value(vp, vq, interp_weight<acc_t>(s, p, q));
            }
            if (K > 0) orow[list[K - 1]] = acc_t(vr[list[K - 1]]);
          }
        });
      });
  return out;
}

at::Tensor interpolate_rewards_bwd_cpu(const at::Tensor& grad, const at::Tensor& anchor_mask) {
  const char* op = "lacot::interpolate_rewards_bwd_native";
  check_interp_args(grad, anchor_mask, op, "grad", c10::DeviceType::CPU);
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble, op,
              ": `grad` must be float32 or float64, got ", grad.scalar_type());
  const int64_t B = grad.size(0), S = grad.size(1);
  at::Tensor out = at::zeros({B, S}, grad.options());
  if (B * S == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "interpolate_rewards_bwd", [&] {
    using acc_t = scalar_t;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const bool* m = anchor_mask.const_data_ptr<bool>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const int64_t ldg = grad.stride(0), ldm = anchor_mask.stride(0);
    at::parallel_for(0, B, grain_for(S), [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> list;
      for (int64_t b = b0; b < b1; ++b) {
        anchors_of(m + b * ldm, S, list);
        const acc_t* gr = g + b * ldg;
        const int64_t K = static_cast<int64_t>(list.size());
        for (int64_t k = 0; k < K;
             ++k) {  // each anchor: itself, w g over its left gap, (1 - w) g over its right
          const int64_t a = list[k];
          KahanSum<acc_t> acc;
          acc.add(gr[a]);
          if (k > 0) {
            const int64_t p = list[k - 1];
            for (int64_t s = p + 1; s < a; ++s) acc.add(interp_weight<acc_t>(s, p, a) * gr[s]);
          }
          if (k + 1 < K) {
            const int64_t q = list[k + 1];
            for (int64_t s = a + 1; s < q; ++s) acc.add((acc_t(1) - interp_weight<acc_t>(s, a, q)) * gr[s]);
          }
          o[b * S + a] = acc.value();
        }
      }
    });
  });
  return out;
}

// ---- sub-trajectory balance
// ----------------------------------------------------------------------------------

// Exclusive scan of a power-of-two array in place (Blelloch): element k becomes a_0 + ... + a_{k-1} in order,
// evaluated as a balanced tree.
template <class A, class Op>
void exclusive_scan_tree(std::vector<A>& a, const A& identity, Op op) {
  const size_t N = a.size();
  for (size_t step = 1; step < N; step <<= 1)
    for (size_t i = 2 * step - 1; i < N; i += 2 * step) a[i] = op(a[i - step], a[i]);
  a[N - 1] = identity;
  for (size_t step = N / 2; step >= 1; step >>= 1) {
    for (size_t i = 2 * step - 1; i < N; i += 2 * step) {
      const A left = a[i - step];
      a[i - step] = a[i];
      a[i] = op(a[i], left);
    }
  }
}

size_t pow2_at_least(size_t n) {
  size_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

template <class scalar_t, class acc_t>
struct RowView {
  const scalar_t *pf, *lt, *lr;
  // delta_t, 0 <= t < n
  acc_t delta(int64_t t) const {
    return subtb_delta(acc_t(lr[t]), acc_t(lr[t + 1]), acc_t(lt[t]), acc_t(lt[t + 1]), acc_t(pf[t]));
  }
};

std::tuple<at::Tensor, at::Tensor> subtb_fwd_cpu(const at::Tensor& log_pf, const at::Tensor& log_term,
                                                 const at::Tensor& log_reward, const at::Tensor& lengths,
                                                 double decay) {
  const char* op = "lacot::subtb_fwd_native";
  const SubtbShape sh =
      check_subtb_args(log_pf, log_term, log_reward, lengths, decay, op, c10::DeviceType::CPU);
  const int64_t B = sh.B, T = sh.T;
  const auto opts = log_pf.options().dtype(acc_dtype(log_pf.scalar_type()));
  at::Tensor loss = at::empty({B}, opts), weight = at::empty({B}, opts);
  if (B == 0) return {loss, weight};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, log_pf.scalar_type(), "subtb_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* len = lengths.const_data_ptr<int64_t>();
    acc_t* lo = loss.mutable_data_ptr<acc_t>();
    acc_t* wo = weight.mutable_data_ptr<acc_t>();
    const acc_t w = static_cast<acc_t>(decay);
    at::parallel_for(0, B, grain_for(T + 1), [&](int64_t b0, int64_t b1) {
      std::vector<SubtbAgg<acc_t>> e;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = len[b];
        if (n < 0 || n > T) {
          lo[b] = wo[b] = std::numeric_limits<acc_t>::quiet_NaN();
          continue;
        }
        const RowView<scalar_t, acc_t> row{log_pf.const_data_ptr<scalar_t>() + b * log_pf.stride(0),
                                           log_term.const_data_ptr<scalar_t>() + b * log_term.stride(0),
                                           log_reward.const_data_ptr<scalar_t>() + b * log_reward.stride(0)};
        e.resize(static_cast<size_t>(n + 1));
        e[0] = subtb_element(w, acc_t(0));
        for (int64_t t = 1; t <= n; ++t) e[t] = subtb_element(w, row.delta(t - 1));
        // Pairwise reduction, in order.
        for (size_t size = e.size(); size > 1; size = (size + 1) / 2) {
          for (size_t i = 0; i < size / 2; ++i) e[i] = subtb_combine(e[2 * i], e[2 * i + 1]);
          if (size % 2) e[size / 2] = e[size - 1];
        }
        lo[b] = e[0].i;
        wo[b] = e[0].w;
      }
    });
  });
  return {loss, weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subtb_bwd_cpu(const at::Tensor& grad_loss,
                                                             const at::Tensor& log_pf,
                                                             const at::Tensor& log_term,
                                                             const at::Tensor& log_reward,
                                                             const at::Tensor& lengths, double decay) {
  const char* op = "lacot::subtb_bwd_native";
  const SubtbShape sh =
      check_subtb_args(log_pf, log_term, log_reward, lengths, decay, op, c10::DeviceType::CPU);
  const int64_t B = sh.B, T = sh.T;
  check_device(grad_loss, op, "grad_loss", c10::DeviceType::CPU);
  check_vector(grad_loss, op, "grad_loss", B, acc_dtype(log_pf.scalar_type()));
  at::Tensor g_pf = at::empty({B, T}, log_pf.options());
  at::Tensor g_t = at::empty({B, T + 1}, log_term.options());
  at::Tensor g_r = at::empty({B, T + 1}, log_reward.options());
  if (B == 0) return {g_pf, g_t, g_r};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, log_pf.scalar_type(), "subtb_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* len = lengths.const_data_ptr<int64_t>();
    const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
    const acc_t w = static_cast<acc_t>(decay);
    at::parallel_for(0, B, grain_for(T + 1), [&](int64_t b0, int64_t b1) {
      std::vector<PrefixAgg<acc_t>> pre;
      std::vector<SuffixAgg<acc_t>> suf;
      std::vector<acc_t> delta;
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* opf = g_pf.mutable_data_ptr<scalar_t>() + b * T;
        scalar_t* ot = g_t.mutable_data_ptr<scalar_t>() + b * (T + 1);
        scalar_t* orw = g_r.mutable_data_ptr<scalar_t>() + b * (T + 1);
        const int64_t n = len[b];
        if (n < 0 || n > T) {
          const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
          std::fill(opf, opf + T, nan);
          std::fill(ot, ot + T + 1, nan);
          std::fill(orw, orw + T + 1, nan);
          continue;
        }
        const RowView<scalar_t, acc_t> row{log_pf.const_data_ptr<scalar_t>() + b * log_pf.stride(0),
                                           log_term.const_data_ptr<scalar_t>() + b * log_term.stride(0),
                                           log_reward.const_data_ptr<scalar_t>() + b * log_reward.stride(0)};
        delta.resize(static_cast<size_t>(n));
        for (int64_t t = 0; t < n; ++t) delta[t] = row.delta(t);
        const size_t P = pow2_at_least(static_cast<size_t>(n + 1));
        // Exclusive prefix summaries P(t-1) at t.
        pre.assign(P, prefix_identity<acc_t>());
        for (int64_t t = 0; t <= n; ++t) pre[t] = prefix_element(w, t == 0 ? acc_t(0) : delta[t - 1]);
        exclusive_scan_tree(pre, prefix_identity<acc_t>(), PrefixCombineOp{});
        // Suffix summaries S(t+1): state t+1's element (delta_t) visited right to left, combined flipped; the
        // inclusive value at visit k (state t = n - k) covers states t+1..n.
        suf.assign(P, suffix_identity<acc_t>());
        for (int64_t k = 0; k <= n; ++k) {
          const int64_t t = n - k;
          if (t < n) suf[k] = suffix_element(w, delta[t]);
        }
        std::vector<SuffixAgg<acc_t>> elems(suf.begin(), suf.begin() + (n + 1));
        exclusive_scan_tree(suf, suffix_identity<acc_t>(), SuffixCombineFlippedOp{});
        const acc_t g = gl[b];
        for (int64_t t = 0; t <= T; ++t) {
          acc_t g_c = 0, g_d = 0;
          if (t <= n) {
            const int64_t k = n - t;
            const SuffixAgg<acc_t> s = SuffixCombineFlippedOp{}(suf[k], elems[k]);
            subtb_state_grads(pre[t], w, t == 0 ? acc_t(0) : delta[t - 1], s.l0, s.l1, g_c, g_d);
            g_c *= g;
            g_d = t < n ? g * g_d : acc_t(0);
          }
          ot[t] = static_cast<scalar_t>(g_c);
          orw[t] = static_cast<scalar_t>(-g_c);
          if (t < T) opf[t] = static_cast<scalar_t>(g_d);
        }
      }
    });
  });
  return {g_pf, g_t, g_r};
}

}  // namespace
}  // namespace lacot

// The schemas are defined in Python (lacot_kernels/_registry.py); only the CPU kernels are registered here.
TORCH_LIBRARY_IMPL(lacot, CPU, m) {
  m.impl("group_advantages_fwd_native", &lacot::group_advantages_fwd_cpu);
  m.impl("group_advantages_bwd_native", &lacot::group_advantages_bwd_cpu);
  m.impl("interpolate_rewards_fwd_native", &lacot::interpolate_rewards_fwd_cpu);
  m.impl("interpolate_rewards_bwd_native", &lacot::interpolate_rewards_bwd_cpu);
  m.impl("subtb_fwd_native", &lacot::subtb_fwd_cpu);
  m.impl("subtb_bwd_native", &lacot::subtb_bwd_cpu);
}
