// Host-side argument checks of the reward kernels, shared by the CPU twins (rewards_cpu.cpp) and the CUDA
// kernels (rewards_cuda.cu). The Python wrappers validate user input with named errors; these guard direct
// calls of the `*_native` ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "common.h"
#include "rewards_math.h"

namespace lacot {
namespace rw {

inline bool is_reward_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble;
}
inline at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_rows(const at::Tensor& t, const char* op, const char* name, int64_t B, int64_t S) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == S, op, ": `", name, "` must have shape (", B,
              ", ", S, "), got ", t.sizes());
  TORCH_CHECK(S <= 1 || t.stride(1) == 1, op, ": `", name,
              "` must have unit stride along its last dimension, got ", t.strides());
}

inline void check_adv_args(const at::Tensor& rewards, int64_t group_size, int64_t scale, double eps,
                           const char* op, c10::DeviceType dev) {
  check_device(rewards, op, "rewards", dev);
  TORCH_CHECK(is_reward_dtype(rewards.scalar_type()), op,
              ": `rewards` must be float32, bfloat16, float16 or ", "float64, got ", rewards.scalar_type());
  check_vector(rewards, op, "rewards", rewards.numel(), rewards.scalar_type());
  TORCH_CHECK(group_size >= 1, op, ": `group_size` must be >= 1, got ", group_size);
  TORCH_CHECK(rewards.numel() % group_size == 0, op, ": `group_size` (", group_size,
              ") must divide the number of rewards (", rewards.numel(), ")");
  TORCH_CHECK(scale >= kScaleGroup && scale <= kScaleNone, op, ": `scale` must be 0 (group), 1 (batch) or ",
              "2 (none), got ", scale);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": `eps` must be finite and >= 0, got ", eps);
}

inline void check_interp_args(const at::Tensor& x, const at::Tensor& mask, const char* op, const char* name,
                              c10::DeviceType dev) {
  check_device(x, op, name, dev);
  TORCH_CHECK(x.dim() == 2, op, ": `", name, "` must be 2-D (B, S), got shape ", x.sizes());
  check_rows(x, op, name, x.size(0), x.size(1));
  check_device(mask, op, "anchor_mask", dev);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": `anchor_mask` must be bool, got ", mask.scalar_type());
  check_rows(mask, op, "anchor_mask", x.size(0), x.size(1));
}

struct SubtbShape {
  int64_t B, T;
};

inline SubtbShape check_subtb_args(const at::Tensor& log_pf, const at::Tensor& log_term,
                                   const at::Tensor& log_reward, const at::Tensor& lengths, double decay,
                                   const char* op, c10::DeviceType dev) {
  check_device(log_pf, op, "log_pf", dev);
  check_device(log_term, op, "log_term", dev);
  check_device(log_reward, op, "log_reward", dev);
  check_device(lengths, op, "lengths", dev);
  TORCH_CHECK(is_reward_dtype(log_pf.scalar_type()), op, ": `log_pf` must be float32, bfloat16, float16 or ",
              "float64, got ", log_pf.scalar_type());
  TORCH_CHECK(
      log_term.scalar_type() == log_pf.scalar_type() && log_reward.scalar_type() == log_pf.scalar_type(), op,
      ": `log_term` and `log_reward` must have the dtype of `log_pf` (", log_pf.scalar_type(), ")");
  TORCH_CHECK(log_pf.dim() == 2, op, ": `log_pf` must be 2-D (B, T), got shape ", log_pf.sizes());
  const int64_t B = log_pf.size(0), T = log_pf.size(1);
  check_rows(log_pf, op, "log_pf", B, T);
  check_rows(log_term, op, "log_term", B, T + 1);
  check_rows(log_reward, op, "log_reward", B, T + 1);
  check_vector(lengths, op, "lengths", B, at::kLong);
  TORCH_CHECK(std::isfinite(decay) && decay >= 0.0, op, ": `decay` must be finite and >= 0, got ", decay);
  return {B, T};
}

}  // namespace rw
}  // namespace lacot
