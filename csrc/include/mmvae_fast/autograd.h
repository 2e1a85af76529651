// The C++ autograd of the extension's ops (csrc/autograd/<op>.cpp), shared plumbing. Each op's
// forward runs its kernel below the autograd keys; its backward calls the op's backward op.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <utility>

namespace mmvae_fast::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = c10::optional<at::Tensor>;

// An optional tensor argument from a tensor that may be undefined (an unused output's gradient).
inline Opt given(const at::Tensor& t) { return t.defined() ? Opt(t) : c10::nullopt; }

// mmvae_fast::<name>, typed, looked up once per call site.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("mmvae_fast::") + name).c_str(), "").typed<Sig>();
}

// A backward op's call. Under create_graph (grad mode on) it goes through the backward op's own
// autograd formula, ops/_autograd.py's first_order_only, so a second derivative raises
// DoubleBackwardError; otherwise (every first-order backward) straight to the kernel.
template <typename Sig, typename... Args>
auto backward_call(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

}  // namespace mmvae_fast::autograd
