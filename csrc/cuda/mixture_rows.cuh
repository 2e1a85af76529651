// CUDA building blocks of the mixture kernels (mirrors csrc/cpu/mixture_rows.h): a warp per
// sample (r, k, b), lanes over the latent dim L, and the argument packing common to both ops.
#pragma once

#include <string>
#include <utility>

#include "mmvae_fast/mixture.h"
#include "reduce.cuh"

namespace mmvae_fast {
namespace cuda {

constexpr int kMixBlock = 256;
constexpr int kSamplesPerBlock = kMixBlock / kWarp;

inline int parse_family(const std::string& family) {
  if (family == "normal") return kNormal;
  if (family == "laplace") return kLaplace;
  TORCH_CHECK(false, "argument 'family' must be 'normal' or 'laplace', got '", family, "'");
}

// sum_l log f(z_l; loc_l, 1/inv_l) without the -sum_l log(scale_l) term, over a warp's lanes;
// every lane gets the total.
template <int F, typename T>
__device__ __forceinline__ T warp_row_log_density(const T* z, const T* loc, const T* inv, int64_t L, int lane) {
  T s = T(0);
  for (int64_t l = lane; l < L; l += kWarp) s += log_density_unscaled<F, T>(z[l], loc[l], inv[l]);
  return warp_sum(s);
}

// The experts' parameters in the accumulation dtype: z [M, K, B, L], loc and 1/scale [M, B, L],
// sum_l log(scale) [M, B], all contiguous on the device.
struct Experts {
  at::Tensor z, loc, inv, log_scale_sum;
  int64_t M, K, B, L;
};

inline Experts prepare_experts(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, const char* op) {
  TORCH_CHECK(z.dim() == 4, op, ": argument 'z' must have shape [M, K, B, L], got ", z.sizes());
  const int64_t M = z.size(0), K = z.size(1), B = z.size(2), L = z.size(3);
  TORCH_CHECK(loc.sizes() == at::IntArrayRef({M, B, L}), op, ": argument 'loc' must have shape [M, B, L] = ",
              at::IntArrayRef({M, B, L}), ", got ", loc.sizes());
  TORCH_CHECK(scale.sizes() == loc.sizes(), op, ": argument 'scale' must have shape ", loc.sizes(), ", got ", scale.sizes());
  TORCH_CHECK(z.is_cuda() && loc.device() == z.device() && scale.device() == z.device(), op,
              ": expected z, loc and scale on one CUDA device");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && z.scalar_type() == loc.scalar_type() &&
                  z.scalar_type() == scale.scalar_type(),
              op, ": z, loc and scale must share one floating dtype");
  const auto acc = acc_type(z);
  const at::Tensor s = scale.to(acc);
  return {z.to(acc).contiguous(), loc.to(acc).contiguous(), s.reciprocal().contiguous(), s.log().sum(-1).contiguous(),
          M, K, B, L};
}

// Present-expert mask as uint8 [M, B] (all ones when absent) and the count per batch entry.
inline std::pair<at::Tensor, at::Tensor> prepare_mask(const c10::optional<at::Tensor>& mask, int64_t M, int64_t B,
                                                      const at::Device& device, const char* op) {
  const auto opts = at::TensorOptions().device(device);
  if (!mask.has_value() || !mask->defined()) {
    return {at::ones({M, B}, opts.dtype(at::kByte)), at::full({B}, M, opts.dtype(at::kLong))};
  }
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": argument 'mask' must be a bool tensor");
  TORCH_CHECK(mask->sizes() == at::IntArrayRef({M, B}), op, ": argument 'mask' must have shape [M, B] = ",
              at::IntArrayRef({M, B}), ", got ", mask->sizes());
  TORCH_CHECK(mask->device() == device, op, ": argument 'mask' must be on ", device, ", got ", mask->device());
  return {mask->to(at::kByte).contiguous(), mask->sum(0).to(at::kLong).contiguous()};
}

}  // namespace cuda
}  // namespace mmvae_fast
