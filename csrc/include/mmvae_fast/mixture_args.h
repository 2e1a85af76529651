// Argument checks and packing of the mixture ops (mixture_log_density, importance_ratios), shared
// by the CPU and CUDA kernels (host code).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>
#include <utility>

#include "mmvae_fast/densities.h"
#include "mmvae_fast/host.h"

namespace mmvae_fast {

// The experts' parameters in the accumulation dtype: z [M, K, B, L], loc and 1/scale [M, B, L],
// sum_l log(scale) [M, B], all contiguous on z's device.
struct Experts {
  at::Tensor z, loc, inv, log_scale_sum;
  int64_t M, K, B, L;
};

inline Experts prepare_experts(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, const char* op,
                               c10::DeviceType device) {
  TORCH_CHECK(z.dim() == 4, op, ": argument 'z' must have shape [M, K, B, L], got ", z.sizes());
  const int64_t M = z.size(0), K = z.size(1), B = z.size(2), L = z.size(3);
  TORCH_CHECK(loc.sizes() == at::IntArrayRef({M, B, L}), op,
              ": argument 'loc' must have shape [M, B, L] = ", at::IntArrayRef({M, B, L}), ", got ", loc.sizes());
  TORCH_CHECK(scale.sizes() == loc.sizes(), op, ": argument 'scale' must have shape ", loc.sizes(), ", got ",
              scale.sizes());
  TORCH_CHECK(z.device().type() == device && loc.device() == z.device() && scale.device() == z.device(), op,
              ": expected z, loc and scale on one ", c10::DeviceTypeName(device), " device");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && z.scalar_type() == loc.scalar_type() &&
                  z.scalar_type() == scale.scalar_type(),
              op, ": z, loc and scale must share one floating dtype");
  const auto acc = acc_type(z);
  const at::Tensor s = scale.to(acc);
  return {z.to(acc).contiguous(),
          loc.to(acc).contiguous(),
          s.reciprocal().contiguous(),
          s.log().sum(-1).contiguous(),
          M,
          K,
          B,
          L};
}

// Present-expert mask as uint8 [M, B] (all ones when absent) and the count per batch entry, on device.
inline std::pair<at::Tensor, at::Tensor> prepare_mask(const c10::optional<at::Tensor>& mask, int64_t M, int64_t B,
                                                      const at::Device& device, const char* op) {
  const auto opts = at::TensorOptions().device(device);
  if (!mask.has_value() || !mask->defined()) {
    return {at::ones({M, B}, opts.dtype(at::kByte)), at::full({B}, M, opts.dtype(at::kLong))};
  }
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": argument 'mask' must be a bool tensor");
  TORCH_CHECK(mask->sizes() == at::IntArrayRef({M, B}), op,
              ": argument 'mask' must have shape [M, B] = ", at::IntArrayRef({M, B}), ", got ", mask->sizes());
  TORCH_CHECK(mask->device() == device, op, ": argument 'mask' must be on ", device, ", got ", mask->device());
  const at::Tensor m = mask->to(at::kByte).contiguous();
  return {m, m.sum(0, /*keepdim=*/false, at::kLong).contiguous()};
}

// The mixture backward's saved lq [M, K, B] and incoming gradients (either may be absent: an
// undefined tensor), in the accumulation dtype, contiguous and checked.
struct MixtureCotangents {
  at::Tensor lq, grad_lq, grad_a;
};

inline MixtureCotangents prepare_mixture_cotangents(const c10::optional<at::Tensor>& grad_lq,
                                                    const c10::optional<at::Tensor>& grad_a, const at::Tensor& lq,
                                                    const Experts& e, const char* op) {
  const auto acc = e.z.scalar_type();
  MixtureCotangents c;
  c.lq = lq.to(acc).contiguous();
  TORCH_CHECK(c.lq.sizes() == at::IntArrayRef({e.M, e.K, e.B}), op, ": lq must have shape [M, K, B]");
  if (grad_lq.has_value() && grad_lq->defined()) c.grad_lq = grad_lq->to(acc).contiguous();
  if (grad_a.has_value() && grad_a->defined()) c.grad_a = grad_a->to(acc).contiguous();
  if (c.grad_lq.defined()) TORCH_CHECK(c.grad_lq.sizes() == c.lq.sizes(), op, ": grad_lq must have shape [M, K, B]");
  if (c.grad_a.defined())
    TORCH_CHECK(c.grad_a.sizes() == at::IntArrayRef({e.M, e.M, e.K, e.B}), op, ": grad_a must have shape [M, M, K, B]");
  return c;
}

// The mixture backward's outputs in the inputs' dtypes, an empty tensor where output_mask says no.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_gradients(const at::Tensor& gz, const at::Tensor& gloc,
                                                                        const at::Tensor& gscale, const at::Tensor& z,
                                                                        const at::Tensor& loc, const at::Tensor& scale,
                                                                        std::array<bool, 3> output_mask) {
  const auto empty = at::empty({0}, z.options());
  return {output_mask[0] ? gz.to(z.scalar_type()) : empty, output_mask[1] ? gloc.to(loc.scalar_type()) : empty,
          output_mask[2] ? gscale.to(scale.scalar_type()) : empty};
}

}  // namespace mmvae_fast
