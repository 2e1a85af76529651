// The autograd of mmvae_fast::importance_ratios (its CPU and CUDA kernels) in C++: an eager call
// runs forward and backward without a Python frame. The formula is ops/importance_ratios.py's
// register_autograd (which serves the Triton op of the same schema): z is detached by contract,
// loc and scale get their gradients from the ratios (d ratio / d a = ratio).
#include "mmvae_fast/autograd.h"

namespace mmvae_fast::autograd {
namespace {

using Str = c10::string_view;

struct ImportanceRatios : torch::autograd::Function<ImportanceRatios> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                            Str family) {
    static auto op =
        typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, Str)>("importance_ratios");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor ratio = op.call(z, loc, scale, family);
    ctx->save_for_backward({z, loc, scale, ratio});
    ctx->saved_data["family"] = std::string(family);
    return ratio;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    const bool need_l = ctx->needs_input_grad(1), need_s = ctx->needs_input_grad(2);
    if (!grads[0].defined() || !(need_l || need_s)) return out;
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, Str)>(
        "importance_ratios_backward");
    const auto s = ctx->get_saved_variables();
    const std::string family = ctx->saved_data["family"].toStringRef();
    auto [gl, gs] = backward_call(op, grads[0], s[3], s[0], s[1], s[2], family);
    if (need_l) out[1] = gl;
    if (need_s) out[2] = gs;
    return out;
  }
};

at::Tensor importance_ratios_autograd(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, Str family) {
  return ImportanceRatios::apply(z, loc, scale, family);
}

}  // namespace
}  // namespace mmvae_fast::autograd

TORCH_LIBRARY_IMPL(mmvae_fast, Autograd, m) {
  m.impl("importance_ratios", &mmvae_fast::autograd::importance_ratios_autograd);
}
