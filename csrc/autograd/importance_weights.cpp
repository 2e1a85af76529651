// The autograd of mmvae_fast::importance_weights (its CPU and CUDA kernels) in C++: an eager call
// runs forward and backward without a Python frame. The formula is ops/importance_weights.py's
// register_autograd (which serves the Triton op of the same schema): the backward recomputes the
// weights from lw and the saved (lse, lse_lo); an output nobody used arrives undefined and costs
// nothing.
#include "mmvae_fast/autograd.h"

namespace mmvae_fast::autograd {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct ImportanceWeights : torch::autograd::Function<ImportanceWeights> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& lw) {
    static auto op = typed_op<Outputs(const at::Tensor&)>("importance_weights");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [lse, wbar, wbar_sq, lse_lo] = op.call(lw);
    ctx->mark_non_differentiable({lse_lo});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({lw, lse, lse_lo});
    return {lse, wbar, wbar_sq, lse_lo};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return {at::Tensor()};
    static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&,
                                         const Opt&, const Opt&)>("importance_weights_backward");
    const auto s = ctx->get_saved_variables();
    return {backward_call(op, s[0], s[1], s[2], given(grads[0]), given(grads[1]), given(grads[2]))};
  }
};

Outputs importance_weights_autograd(const at::Tensor& lw) {
  auto r = ImportanceWeights::apply(lw);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace mmvae_fast::autograd

TORCH_LIBRARY_IMPL(mmvae_fast, Autograd, m) {
  m.impl("importance_weights", &mmvae_fast::autograd::importance_weights_autograd);
}
