// Host-side helpers shared by the CPU and CUDA kernel files.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "mmvae_fast/densities.h"

namespace mmvae_fast {

// The accumulation (and output) dtype of every op: float64 stays float64, the rest is float32.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The code of a location-scale family's name, for the argument `arg` of an op.
inline int parse_family(c10::string_view family, const char* arg = "family") {
  if (family == "normal") return kNormal;
  if (family == "laplace") return kLaplace;
  TORCH_CHECK(false, "argument '", arg, "' must be 'normal' or 'laplace', got '", std::string(family), "'");
}

}  // namespace mmvae_fast
