// The autograd of mmvae_fast::mixture_log_density and mixture_log_density_pairwise (their CPU and
// CUDA kernels) in C++: an eager call runs forward and backward without a Python frame. The
// formula is ops/mixture_log_density.py's register_autograd (which serves the Triton ops of the
// same schemas): one backward op takes the gradients of lq and of the pairwise table a (an unused
// output arrives undefined: no zero tensor is made) and writes those of z, loc and scale.
#include "mmvae_fast/autograd.h"

namespace mmvae_fast::autograd {
namespace {

using Str = c10::string_view;

struct MixtureLogDensity : torch::autograd::Function<MixtureLogDensity> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& loc,
                               const at::Tensor& scale, Str family, const Opt& mask, bool pairwise) {
    at::AutoDispatchBelowADInplaceOrView below;
    variable_list out;
    if (pairwise) {
      static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, Str, const Opt&)>("mixture_log_density_pairwise");
      auto [lq, a] = op.call(z, loc, scale, family, mask);
      out = {lq, a};
    } else {
      static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, Str, const Opt&)>(
          "mixture_log_density");
      out = {op.call(z, loc, scale, family, mask)};
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({z, loc, scale, out[0], mask.value_or(at::Tensor())});
    ctx->saved_data["family"] = std::string(family);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    const std::array<bool, 3> want = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    const at::Tensor g_a = grads.size() > 1 ? grads[1] : at::Tensor();
    if (!(want[0] || want[1] || want[2]) || (!grads[0].defined() && !g_a.defined())) return out;
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const Opt&, const Opt&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, Str,
        const Opt&, std::array<bool, 3>)>("mixture_log_density_backward");
    const auto s = ctx->get_saved_variables();
    const std::string family = ctx->saved_data["family"].toStringRef();
    auto [gz, gl, gs] =
        backward_call(op, given(grads[0]), given(g_a), s[0], s[1], s[2], s[3], family, given(s[4]), want);
    if (want[0]) out[0] = gz;
    if (want[1]) out[1] = gl;
    if (want[2]) out[2] = gs;
    return out;
  }
};

at::Tensor mixture_log_density_autograd(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, Str family,
                                        const Opt& mask) {
  return MixtureLogDensity::apply(z, loc, scale, family, mask, false)[0];
}

std::tuple<at::Tensor, at::Tensor> mixture_log_density_pairwise_autograd(const at::Tensor& z, const at::Tensor& loc,
                                                                         const at::Tensor& scale, Str family,
                                                                         const Opt& mask) {
  auto r = MixtureLogDensity::apply(z, loc, scale, family, mask, true);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace mmvae_fast::autograd

TORCH_LIBRARY_IMPL(mmvae_fast, Autograd, m) {
  m.impl("mixture_log_density", &mmvae_fast::autograd::mixture_log_density_autograd);
  m.impl("mixture_log_density_pairwise", &mmvae_fast::autograd::mixture_log_density_pairwise_autograd);
}
