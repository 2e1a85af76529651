// Argument checks and sizes of the likelihood-sum ops, shared by the CPU and CUDA kernels (host
// code; Dims is also read on the device).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "mmvae_fast/densities.h"
#include "mmvae_fast/host.h"

namespace mmvae_fast {
namespace lik {

struct Dims {
  int64_t S, B, E, V;  // V = 1 unless categorical
  int64_t sS, sB, sE;  // compact scale sizes (1 or S, B, E)
  MMVAE_HD int64_t row_elems() const { return E * V; }
  // Offset of the scale row of sample row (s, b) in the compact scale.
  MMVAE_HD int64_t scale_row(int64_t s, int64_t b) const { return ((sS > 1 ? s : 0) * sB + (sB > 1 ? b : 0)) * sE; }
};

// params [S, B, E] (categorical [S, B, E, V]), x [B, E], scale [S|1, B|1, E|1] (normal/laplace),
// all on one device of type `device`.
inline Dims check_args(const at::Tensor& x, const at::Tensor& params, const std::optional<at::Tensor>& scale,
                       int64_t family, const char* op, c10::DeviceType device) {
  TORCH_CHECK(family >= 0 && family <= 3, op,
              ": family must be 0 (normal), 1 (laplace), 2 (bernoulli) or 3 (categorical), got ", family);
  TORCH_CHECK(params.device().type() == device && x.device() == params.device(), op,
              ": expected 'x' and 'params' on one ", c10::DeviceTypeName(device), " device");
  TORCH_CHECK(params.is_floating_point(), op, ": 'params' must be floating point, got ", params.scalar_type());
  const auto acc = acc_type(params);
  const bool cat = family == kLikCategorical;
  TORCH_CHECK(params.dim() == (cat ? 4 : 3), op, ": 'params' must be ", cat ? "[S, B, E, V]" : "[S, B, E]", ", got ",
              params.sizes());
  Dims d{params.size(0), params.size(1), params.size(2), cat ? params.size(3) : 1, 1, 1, 1};
  TORCH_CHECK(x.dim() == 2 && x.size(0) == d.B && x.size(1) == d.E, op, ": 'x' must be [B, E] = [", d.B, ", ", d.E,
              "], got ", x.sizes());
  if (cat) {
    TORCH_CHECK(x.scalar_type() == at::kLong, op, ": 'x' must hold int64 class indices, got ", x.scalar_type());
    TORCH_CHECK(d.V > 0, op, ": the vocabulary (last dim of 'params') is empty");
  } else {
    TORCH_CHECK(x.scalar_type() == acc, op, ": 'x' must be ", acc, ", got ", x.scalar_type());
  }
  if (family == kLikNormal || family == kLikLaplace) {
    TORCH_CHECK(scale.has_value() && scale->defined(), op, ": 'scale' is required for normal / laplace");
    const at::Tensor& sc = *scale;
    TORCH_CHECK(sc.dim() == 3 && sc.scalar_type() == acc && sc.device() == params.device(), op,
                ": 'scale' must be a 3-D ", acc, " tensor [S|1, B|1, E|1] on the device of 'params', got ", sc.sizes(),
                " ", sc.scalar_type());
    d.sS = sc.size(0), d.sB = sc.size(1), d.sE = sc.size(2);
    TORCH_CHECK((d.sS == 1 || d.sS == d.S) && (d.sB == 1 || d.sB == d.B) && (d.sE == 1 || d.sE == d.E), op,
                ": 'scale' of shape ", sc.sizes(), " must be [S|1, B|1, E|1] with [S, B, E] = [", d.S, ", ", d.B, ", ",
                d.E, "]");
  }
  return d;
}

// Class indices must lie in [0, V): an out-of-range index would read outside the logits row.
// The backward's arguments: the forward's, and its incoming gradient [S, B].
inline Dims check_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& params,
                                const std::optional<at::Tensor>& scale, int64_t family, c10::DeviceType device) {
  const char* op = "likelihood_sum_backward";
  const Dims d = check_args(x, params, scale, family, op, device);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == d.S && grad.size(1) == d.B, op, ": 'grad' must be [S, B] = [", d.S,
              ", ", d.B, "], got ", grad.sizes());
  return d;
}

inline void check_indices(const at::Tensor& x, int64_t V) {
  if (x.numel() == 0) return;
  const int64_t lo = x.min().item<int64_t>(), hi = x.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < V, "likelihood_sum: 'x' holds class index ", lo < 0 ? lo : hi,
              " outside the vocabulary [0, ", V, ")");
}

}  // namespace lik
}  // namespace mmvae_fast
