// Host-side helpers shared by the CPU and CUDA kernel files.
#pragma once

#include <ATen/ATen.h>

namespace mmvae_fast {

// The accumulation (and output) dtype of every op: float64 stays float64, the rest is float32.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mmvae_fast
