// Host code of the moe_estimator op shared by the CPU and CUDA kernel files: the string arguments'
// codes, the argument checks, and the switch that turns the two families into template constants.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mmvae_fast/host.h"
#include "mmvae_fast/moe_estimator.h"

namespace mmvae_fast {

inline int moe_bound_code(c10::string_view b) {
  if (b == "looser") return kLooser;
  if (b == "stratified") return kStratified;
  TORCH_CHECK(false, "moe_estimator: bound must be 'looser' or 'stratified', got '", std::string(b), "'");
}

inline int moe_estimator_code(c10::string_view e) {
  if (e == "iwae") return kIwae;
  if (e == "eq8") return kEq8;
  if (e == "mixture") return kMixture;
  if (e == "mixture-centred") return kMixtureCentred;
  if (e == "released") return kReleased;
  TORCH_CHECK(false, "moe_estimator: unknown estimator '", std::string(e), "'");
}

// Whether the forward makes the z path's per-sample weight (the DReG estimators but `released`).
inline bool moe_wants_z_weight(int estimator) {
  return estimator == kEq8 || estimator == kMixture || estimator == kMixtureCentred;
}

// z: the experts' samples, z[r] [K, B, L] each where the model made them (never stacked: the op
// reads each expert's rows in place).
inline void moe_check_samples(at::TensorList z) {
  TORCH_CHECK(!z.empty() && z[0].dim() == 3, "moe_estimator: z must hold the experts' samples, [K, B, L] each");
  for (const auto& t : z)
    TORCH_CHECK(t.sizes() == z[0].sizes() && t.scalar_type() == z[0].scalar_type() && t.device() == z[0].device(),
                "moe_estimator: the experts' samples must share one shape [K, B, L], dtype and device");
}

inline std::vector<at::Tensor> contiguous_samples(at::TensorList z) {
  std::vector<at::Tensor> out;
  out.reserve(z.size());
  for (const auto& t : z) out.push_back(t.contiguous());
  return out;
}

inline void moe_check_inputs(at::TensorList zs, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& ploc,
                             const at::Tensor& pscale, const at::Tensor& lpx, const c10::optional<at::Tensor>& mask) {
  moe_check_samples(zs);
  const at::Tensor& z = zs[0];
  const int64_t M = static_cast<int64_t>(zs.size()), K = z.size(0), B = z.size(1), L = z.size(2);
  TORCH_CHECK(loc.sizes() == at::IntArrayRef({M, B, L}) && scale.sizes() == loc.sizes(),
              "moe_estimator: loc and scale must be [M, B, L]");
  TORCH_CHECK(ploc.sizes() == at::IntArrayRef({B, L}) && pscale.sizes() == ploc.sizes(),
              "moe_estimator: the prior's loc and scale must be [B, L]");
  TORCH_CHECK(lpx.sizes() == at::IntArrayRef({M, K, B}), "moe_estimator: lpx must be [M, K, B]");
  TORCH_CHECK(lpx.scalar_type() == acc_type(z), "moe_estimator: lpx must be in the accumulation dtype");
  for (const auto* t : {&loc, &scale, &ploc, &pscale})
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), "moe_estimator: z, loc, scale and the prior share one dtype");
  if (mask.has_value())
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == at::IntArrayRef({M, B}),
                "moe_estimator: mask must be bool [M, B]");
}

// fn(F, PF) with the experts' and the prior's family as std::integral_constant.
template <typename Fn>
void moe_dispatch_families(int fam, int pfam, Fn&& fn) {
  using N = std::integral_constant<int, kNormal>;
  using La = std::integral_constant<int, kLaplace>;
  if (fam == kNormal) {
    if (pfam == kNormal) fn(N{}, N{});
    else fn(N{}, La{});
  } else {
    if (pfam == kNormal) fn(La{}, N{});
    else fn(La{}, La{});
  }
}

// The forward's inputs made contiguous, its codes and sizes, and its outputs, allocated:
//   bound [B], lw [M, K, B], z_weight [M, K, B] ([0] for iwae / released), lq [M, K, B],
//   stats [S, 2] (each softmax's (max, log-sum); S = M B looser, B stratified).
struct MoEForward {
  std::vector<at::Tensor> z;                            // the experts' samples, [K, B, L] each
  at::Tensor loc, scale, ploc, pscale, lpx, mask, lse;  // mask, lse undefined when not given
  at::Tensor bound, lw, zw, lq, stats;
  int fam, pfam, bound_kind, estimator;
  bool want_zw;
  int64_t M, K, B, L, Kc;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {bound, lw, zw, lq, stats};
  }
};

inline MoEForward moe_forward_setup(at::TensorList z, const at::Tensor& loc, const at::Tensor& scale,
                                    const at::Tensor& ploc, const at::Tensor& pscale, const at::Tensor& lpx,
                                    c10::string_view family, c10::string_view prior_family, c10::string_view bound,
                                    c10::string_view estimator, const c10::optional<at::Tensor>& mask,
                                    const c10::optional<at::Tensor>& lse, c10::optional<int64_t> num_samples) {
  moe_check_inputs(z, loc, scale, ploc, pscale, lpx, mask);
  MoEForward f;
  f.fam = parse_family(family, "family"), f.pfam = parse_family(prior_family, "prior_family");
  f.bound_kind = moe_bound_code(bound), f.estimator = moe_estimator_code(estimator);
  f.z = contiguous_samples(z), f.loc = loc.contiguous(), f.scale = scale.contiguous();
  f.ploc = ploc.contiguous(), f.pscale = pscale.contiguous(), f.lpx = lpx.contiguous();
  f.M = static_cast<int64_t>(z.size()), f.K = z[0].size(0), f.B = z[0].size(1), f.L = z[0].size(2);
  f.Kc = num_samples.has_value() ? *num_samples : f.K;
  const int64_t S = f.bound_kind == kLooser ? f.M * f.B : f.B;
  if (mask.has_value()) f.mask = mask->contiguous();
  if (lse.has_value()) {
    TORCH_CHECK(lse->device() == z[0].device(), "moe_estimator: lse must be on z's device");
    TORCH_CHECK(lse->numel() == 2 * S,
                "moe_estimator: lse must be the softmaxes' (max, log-sum) pairs, [M, B, 2] (looser) or [B, 2] "
                "(stratified)");
    f.lse = lse->to(acc_type(z[0])).contiguous();
  }
  const auto acc = z[0].options().dtype(acc_type(z[0]));
  f.want_zw = moe_wants_z_weight(f.estimator);
  f.bound = at::empty({f.B}, acc), f.lw = at::empty({f.M, f.K, f.B}, acc), f.lq = at::empty({f.M, f.K, f.B}, acc);
  f.zw = f.want_zw ? at::empty({f.M, f.K, f.B}, acc) : at::empty({0}, acc);
  f.stats = at::empty({S, 2}, acc);
  return f;
}

// The backward's inputs made contiguous (grad in the accumulation dtype), its codes and sizes, and
// its outputs, allocated: the gradients of z, loc, scale, the prior's loc and scale [B, L], and lpx.
struct MoEBackward {
  std::vector<at::Tensor> z;  // the experts' samples, [K, B, L] each
  at::Tensor grad, loc, scale, ploc, pscale, mask, lw, lq, stats;
  // gz: one tensor [K, B, L] per expert (own storage each, so autograd can add the decoders' share
  // into it in place), or for a kernel that writes one [M, K, B, L] buffer, that buffer's rows
  std::vector<at::Tensor> gz;
  at::Tensor gloc, gscale, gploc, gpscale, glpx;
  int fam, pfam, bound_kind, estimator;
  int64_t M, K, B, L, Kc;

  using Outputs = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  Outputs outputs() const { return {gz, gloc, gscale, gploc, gpscale, glpx}; }
};

inline MoEBackward moe_backward_setup(const at::Tensor& grad, at::TensorList z, const at::Tensor& loc,
                                      const at::Tensor& scale, const at::Tensor& ploc, const at::Tensor& pscale,
                                      const c10::optional<at::Tensor>& mask, const at::Tensor& lw, const at::Tensor& lq,
                                      const at::Tensor& stats, c10::string_view family, c10::string_view prior_family,
                                      c10::string_view bound, c10::string_view estimator,
                                      c10::optional<int64_t> num_samples) {
  MoEBackward p;
  p.fam = parse_family(family, "family"), p.pfam = parse_family(prior_family, "prior_family");
  p.bound_kind = moe_bound_code(bound), p.estimator = moe_estimator_code(estimator);
  moe_check_samples(z);
  p.z = contiguous_samples(z), p.loc = loc.contiguous(), p.scale = scale.contiguous();
  p.ploc = ploc.contiguous(), p.pscale = pscale.contiguous();
  p.lw = lw.contiguous(), p.lq = lq.contiguous(), p.stats = stats.contiguous();
  p.M = static_cast<int64_t>(z.size()), p.K = z[0].size(0), p.B = z[0].size(1), p.L = z[0].size(2);
  TORCH_CHECK(p.lw.sizes() == at::IntArrayRef({p.M, p.K, p.B}) && p.lq.sizes() == p.lw.sizes(),
              "moe_estimator_backward: lw and lq must be [M, K, B]");
  TORCH_CHECK(p.stats.numel() == (p.bound_kind == kLooser ? p.M * p.B : p.B) * 2,
              "moe_estimator_backward: stats has the wrong size");
  p.Kc = num_samples.has_value() ? *num_samples : p.K;
  p.grad = grad.to(acc_type(z[0])).contiguous();
  if (mask.has_value()) p.mask = mask->contiguous();
  for (int64_t r = 0; r < p.M; ++r) p.gz.push_back(at::empty({p.K, p.B, p.L}, z[0].options()));
  p.gloc = at::empty_like(p.loc), p.gscale = at::empty_like(p.scale);
  p.gploc = at::empty_like(p.ploc), p.gpscale = at::empty_like(p.pscale), p.glpx = at::empty_like(p.lw);
  return p;
}

}  // namespace mmvae_fast
