// The autograd of mmvae_fast::likelihood_sum (its CPU and CUDA kernels) in C++: an eager call runs
// forward and backward without a Python frame. The formula is ops/likelihood_sum.py's
// register_autograd (which serves the Triton op of the same schema): x is data and gets no
// gradient; params and the scale get theirs from the backward op.
#include "mmvae_fast/autograd.h"

namespace mmvae_fast::autograd {
namespace {

struct LikelihoodSum : torch::autograd::Function<LikelihoodSum> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& params, const Opt& scale,
                            int64_t family) {
    static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&, int64_t)>("likelihood_sum");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = op.call(x, params, scale, family);
    ctx->save_for_backward({x, params, scale.value_or(at::Tensor())});
    ctx->saved_data["family"] = family;
    ctx->saved_data["has_scale"] = scale.has_value() && scale->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    const at::Tensor& g = grads[0];
    const bool has_scale = ctx->saved_data["has_scale"].toBool();
    // edges: x, params, then the scale where one was given
    const bool need_p = ctx->needs_input_grad(1), need_s = has_scale && ctx->needs_input_grad(2);
    if (!g.defined() || !(need_p || need_s)) return out;
    static auto op =
        typed_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&,
                                                    int64_t, bool, bool)>("likelihood_sum_backward");
    const auto s = ctx->get_saved_variables();
    const Opt scale = has_scale ? Opt(s[2]) : c10::nullopt;
    auto [gp, gs] = backward_call(op, g, s[0], s[1], scale, ctx->saved_data["family"].toInt(), need_p, need_s);
    if (need_p) out[1] = gp;
    if (need_s) out[2] = gs;
    return out;
  }
};

at::Tensor likelihood_sum_autograd(const at::Tensor& x, const at::Tensor& params, const Opt& scale, int64_t family) {
  return LikelihoodSum::apply(x, params, scale, family);
}

}  // namespace
}  // namespace mmvae_fast::autograd

TORCH_LIBRARY_IMPL(mmvae_fast, Autograd, m) {
  m.impl("likelihood_sum", &mmvae_fast::autograd::likelihood_sum_autograd);
}
