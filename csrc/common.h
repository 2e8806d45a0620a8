// Host-side argument checks shared by the CPU twin and the CUDA kernels of lacot_kernels._C.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace lacot {

inline bool is_kernel_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf;
}

inline void check_device(const at::Tensor& t, const char* op, const char* name, c10::DeviceType dev) {
  TORCH_CHECK(t.device().type() == dev, op, ": `", name, "` must be a ", c10::DeviceTypeName(dev, true),
              " tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` must be on the same device as `logits` (",
              ref.device(), "), got ", t.device());
}

// A 1-D (N,) tensor of the given dtype, with unit stride unless any_stride (then any stride, 0 included:
// autograd often hands over expanded upstream gradients).
inline void check_vector(const at::Tensor& t, const char* op, const char* name, int64_t N,
                         at::ScalarType dtype, bool any_stride = false) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": `", name, "` must have shape (", N, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": `", name, "` must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(any_stride || N <= 1 || t.stride(0) == 1, op, ": `", name, "` must be contiguous, got stride ",
              t.strides());
}

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": `logits` must be 2-D (N, V), got shape ", logits.sizes());
  TORCH_CHECK(is_kernel_dtype(logits.scalar_type()), op,
              ": `logits` must be float32, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(N == 0 || V >= 1, op, ": `logits` must have at least one column (V >= 1), got shape ",
              logits.sizes());
  TORCH_CHECK(V <= 1 || logits.stride(1) == 1, op,
              ": `logits` must have unit stride along the vocabulary (stride(1) == 1), got strides ",
              logits.strides());
  TORCH_CHECK(V < (int64_t(1) << 31), op, ": the vocabulary size must be below 2^31, got ", V);
}

inline void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": `temperature` must be a finite positive number, got ", temperature);
}

struct RowShape {
  int64_t N, V;
};

inline RowShape check_fwd_args(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                               c10::DeviceType dev) {
  const char* op = "lacot::token_logprobs_fwd_native";
  check_device(logits, op, "logits", dev);
  check_logits(logits, op);
  check_temperature(temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_same_device(targets, logits, op, "targets");
  check_vector(targets, op, "targets", N, at::kLong);
  return {N, V};
}

// The optional per-row sampler threshold of the token_logprobs kernels: (N,) float32 contiguous, same device.
inline void check_tau(const std::optional<at::Tensor>& tau, const at::Tensor& logits, const char* op) {
  if (!tau.has_value()) return;
  check_same_device(*tau, logits, op, "tau");
  check_vector(*tau, op, "tau", logits.size(0), at::kFloat);
}

inline RowShape check_bwd_args(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                               const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& stats,
                               const at::Tensor& entropy, double temperature, c10::DeviceType dev) {
  const char* op = "lacot::token_logprobs_bwd_native";
  check_device(logits, op, "logits", dev);
  check_logits(logits, op);
  check_temperature(temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_same_device(targets, logits, op, "targets");
  check_vector(targets, op, "targets", N, at::kLong);
  check_same_device(grad_logp, logits, op, "grad_logp");
  check_vector(grad_logp, op, "grad_logp", N, at::kFloat, /*any_stride=*/true);
  check_same_device(stats, logits, op, "stats");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 2, op, ": `stats` must have shape (",
              N, ", 2), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat, op, ": `stats` must be float32, got ", stats.scalar_type());
  TORCH_CHECK(stats.is_contiguous(), op, ": `stats` must be contiguous, got strides ", stats.strides());
  if (grad_entropy.has_value()) {
    check_same_device(*grad_entropy, logits, op, "grad_entropy");
    check_vector(*grad_entropy, op, "grad_entropy", N, at::kFloat, /*any_stride=*/true);
    check_same_device(entropy, logits, op, "entropy");
    check_vector(entropy, op, "entropy (needed because grad_entropy is given)", N, at::kFloat);
  }
  return {N, V};
}

}  // namespace lacot
