// The autograd of mmvae_fast::moe_estimator (its CPU and CUDA kernels) in C++: an eager call runs
// forward and backward without a Python frame. The formula is ops/moe_estimator.py's
// register_autograd (which serves the Triton op of the same schema): the backward op writes the
// gradients of z, loc, scale, the prior's loc and scale and lpx; lw, z_weight, lq and the stats
// are not differentiable. z is the list of the experts' samples, and the backward op returns their
// gradients as a list too.
#include "mmvae_fast/autograd.h"

namespace mmvae_fast::autograd {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Str = c10::string_view;

struct MoEEstimator : torch::autograd::Function<MoEEstimator> {
  static variable_list forward(AutogradContext* ctx, at::TensorList z, const at::Tensor& loc, const at::Tensor& scale,
                               const at::Tensor& ploc, const at::Tensor& pscale, const at::Tensor& lpx, Str family,
                               Str prior_family, Str bound, Str estimator, const Opt& mask, const Opt& lse,
                               c10::optional<int64_t> num_samples) {
    static auto op =
        typed_op<Outputs(at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, Str, Str, Str, Str, const Opt&, const Opt&, c10::optional<int64_t>)>(
            "moe_estimator");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [b, lw, zw, lq, stats] =
        op.call(z, loc, scale, ploc, pscale, lpx, family, prior_family, bound, estimator, mask, lse, num_samples);
    ctx->mark_non_differentiable({lw, zw, lq, stats});
    variable_list saved{loc, scale, ploc, pscale, mask.value_or(at::Tensor()), lw, lq, stats};
    saved.insert(saved.end(), z.begin(), z.end());  // the samples last: saved[8:] = z
    ctx->save_for_backward(saved);
    ctx->saved_data["family"] = std::string(family);
    ctx->saved_data["prior_family"] = std::string(prior_family);
    ctx->saved_data["bound"] = std::string(bound);
    ctx->saved_data["estimator"] = std::string(estimator);
    ctx->saved_data["num_samples"] = num_samples;
    return {b, lw, zw, lq, stats};
  }

  // Inputs as autograd counts them: z[0..M), then loc, scale, prior loc, prior scale, lpx at M..M+4,
  // then the 7 arguments that take no gradient.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t M = static_cast<int64_t>(s.size()) - 8;
    variable_list out(M + 12);
    const at::Tensor& g = grads[0];
    if (!g.defined() || !ctx->needs_input_grad({{0, static_cast<size_t>(M + 5)}})) return out;
    static auto op =
        typed_op<Grads(const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&, const at::Tensor&, Str, Str,
                       Str, Str, c10::optional<int64_t>)>("moe_estimator_backward");
    const std::vector<at::Tensor> z(s.begin() + 8, s.end());
    const std::string family = ctx->saved_data["family"].toStringRef(),
                      prior_family = ctx->saved_data["prior_family"].toStringRef(),
                      bound = ctx->saved_data["bound"].toStringRef(),
                      estimator = ctx->saved_data["estimator"].toStringRef();
    const auto num_samples = ctx->saved_data["num_samples"].toOptional<int64_t>();
    const Opt mask = given(s[4]);
    auto gs = backward_call(op, g, at::TensorList(z), s[0], s[1], s[2], s[3], mask, s[5], s[6], s[7], family,
                            prior_family, bound, estimator, num_samples);
    const std::vector<at::Tensor>& gz = std::get<0>(gs);
    for (int64_t r = 0; r < M; ++r)
      if (ctx->needs_input_grad(r)) out[r] = gz[r];
    const at::Tensor rest[5] = {std::get<1>(gs), std::get<2>(gs), std::get<3>(gs), std::get<4>(gs), std::get<5>(gs)};
    for (int64_t i = 0; i < 5; ++i)
      if (ctx->needs_input_grad(M + i)) out[M + i] = rest[i];
    return out;
  }
};

Outputs moe_estimator_autograd(at::TensorList z, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& ploc,
                               const at::Tensor& pscale, const at::Tensor& lpx, Str family, Str prior_family, Str bound,
                               Str estimator, const Opt& mask, const Opt& lse, c10::optional<int64_t> num_samples) {
  auto r = MoEEstimator::apply(z, loc, scale, ploc, pscale, lpx, family, prior_family, bound, estimator, mask, lse,
                               num_samples);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace
}  // namespace mmvae_fast::autograd

TORCH_LIBRARY_IMPL(mmvae_fast, Autograd, m) { m.impl("moe_estimator", &mmvae_fast::autograd::moe_estimator_autograd); }
