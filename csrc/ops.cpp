// Registration of every mmvae_fast op with the dispatcher (TORCH_LIBRARY), CPU and CUDA kernels.
// The Python module `mmvae_fast._C` is empty: importing it loads this library and its ops,
// which are then reachable as torch.ops.mmvae_fast.<name>.
#include <Python.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace mmvae_fast {
// ---- begin: importance weights and likelihood sums (csrc/cpu/importance_weights.cpp, likelihood_sum.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> importance_weights_cpu(const at::Tensor& lw);
at::Tensor importance_weights_backward_cpu(const at::Tensor& lw, const at::Tensor& lse, const at::Tensor& lse_lo,
                                           const std::optional<at::Tensor>& g_lse,
                                           const std::optional<at::Tensor>& g_wbar,
                                           const std::optional<at::Tensor>& g_wbar_sq);
at::Tensor likelihood_sum_cpu(const at::Tensor& x, const at::Tensor& params, const std::optional<at::Tensor>& scale,
                              int64_t family);
std::tuple<at::Tensor, at::Tensor> likelihood_sum_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& params,
                                                               const std::optional<at::Tensor>& scale, int64_t family,
                                                               bool params_grad, bool scale_grad);
// ---- end: importance weights and likelihood sums
}  // namespace mmvae_fast

// ---- mixture log-density and importance ratios (csrc/cpu/mixture_log_density.cpp, importance_ratios.cpp)
namespace mmvae_fast::cpu {
at::Tensor mixture_log_density_cpu(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                   c10::string_view family, const c10::optional<at::Tensor>& mask);
std::tuple<at::Tensor, at::Tensor> mixture_log_density_pairwise_cpu(const at::Tensor& z, const at::Tensor& loc,
                                                                    const at::Tensor& scale, c10::string_view family,
                                                                    const c10::optional<at::Tensor>& mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_log_density_backward_cpu(
    const c10::optional<at::Tensor>& grad_lq, const c10::optional<at::Tensor>& grad_a, const at::Tensor& z,
    const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& lq, c10::string_view family,
    const c10::optional<at::Tensor>& mask, std::array<bool, 3> output_mask);
at::Tensor importance_ratios_cpu(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                 c10::string_view family);
std::tuple<at::Tensor, at::Tensor> importance_ratios_backward_cpu(const at::Tensor& grad, const at::Tensor& ratio,
                                                                  const at::Tensor& z, const at::Tensor& loc,
                                                                  const at::Tensor& scale, c10::string_view family);
}  // namespace mmvae_fast::cpu
// ---- end mixture log-density and importance ratios

// ---- MoE estimator (csrc/cpu/moe_estimator.cpp)
namespace mmvae_fast::cpu {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_estimator_cpu(
    at::TensorList z, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& prior_loc,
    const at::Tensor& prior_scale, const at::Tensor& lpx, c10::string_view family, c10::string_view prior_family,
    c10::string_view bound, c10::string_view estimator, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& lse, c10::optional<int64_t> num_samples);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_estimator_backward_cpu(const at::Tensor& grad, at::TensorList z, const at::Tensor& loc, const at::Tensor& scale,
                           const at::Tensor& prior_loc, const at::Tensor& prior_scale,
                           const c10::optional<at::Tensor>& mask, const at::Tensor& lw, const at::Tensor& lq,
                           const at::Tensor& stats, c10::string_view family, c10::string_view prior_family,
                           c10::string_view bound, c10::string_view estimator, c10::optional<int64_t> num_samples);
}  // namespace mmvae_fast::cpu
// ---- end MoE estimator

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mmvae_fast, m) {
  // ---- begin: importance weights and likelihood sums
  // lw [P, N, Q] -> (lse [P, Q], wbar [P, N, Q], wbar_sq [P, N, Q]) over the middle dim, in float32 (float64 for
  // float64). outputs: lse, wbar, wbar_sq, and lse_lo, the rounding residual of lse (math.h lse_split)
  m.def("importance_weights(Tensor lw) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "importance_weights_backward(Tensor lw, Tensor lse, Tensor lse_lo, Tensor? g_lse, Tensor? g_wbar, Tensor? "
      "g_wbar_sq) -> Tensor");
  // out[s, b] = sum_e log p(x[b, e] | params[s, b, e(, :)]); family 0 normal, 1 laplace (scale
  // [S|1, B|1, E|1]), 2 bernoulli logits, 3 categorical logits [S, B, E, V] with int64 x.
  m.def("likelihood_sum(Tensor x, Tensor params, Tensor? scale, int family) -> Tensor");
  m.def(
      "likelihood_sum_backward(Tensor grad, Tensor x, Tensor params, Tensor? scale, int family, bool params_grad, "
      "bool scale_grad) -> (Tensor, Tensor)");
  // ---- end: importance weights and likelihood sums
  // ---- mixture log-density and importance ratios (family: "normal" | "laplace"; mask: bool [M, B])
  m.def("mixture_log_density(Tensor z, Tensor loc, Tensor scale, str family, Tensor? mask) -> Tensor");
  m.def(
      "mixture_log_density_pairwise(Tensor z, Tensor loc, Tensor scale, str family, Tensor? mask) -> (Tensor, Tensor)");
  m.def(
      "mixture_log_density_backward(Tensor? grad_lq, Tensor? grad_a, Tensor z, Tensor loc, Tensor scale, "
      "Tensor lq, str family, Tensor? mask, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("importance_ratios(Tensor z, Tensor loc, Tensor scale, str family) -> Tensor");
  m.def(
      "importance_ratios_backward(Tensor grad, Tensor ratio, Tensor z, Tensor loc, Tensor scale, str family) "
      "-> (Tensor, Tensor)");
  // ---- end mixture log-density and importance ratios
  // ---- MoE estimator: the bound [B], lw, z_weight ([0] for iwae/released), and for backward lq [M, K, B]
  // and the slices' (max, log-sum) [M*B or B, 2]; the maths: mmvae_fast/reference/moe_estimator.py
  m.def(
      "moe_estimator(Tensor[] z, Tensor loc, Tensor scale, Tensor prior_loc, Tensor prior_scale, Tensor lpx, "
      "str family, str prior_family, str bound, str estimator, Tensor? mask, Tensor? lse, int? num_samples) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "moe_estimator_backward(Tensor grad, Tensor[] z, Tensor loc, Tensor scale, Tensor prior_loc, "
      "Tensor prior_scale, Tensor? mask, Tensor lw, Tensor lq, Tensor stats, str family, str prior_family, "
      "str bound, str estimator, int? num_samples) -> (Tensor[], Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- end MoE estimator
}

TORCH_LIBRARY_IMPL(mmvae_fast, CPU, m) {
  // ---- begin: importance weights and likelihood sums
  m.impl("importance_weights", &mmvae_fast::importance_weights_cpu);
  m.impl("importance_weights_backward", &mmvae_fast::importance_weights_backward_cpu);
  m.impl("likelihood_sum", &mmvae_fast::likelihood_sum_cpu);
  m.impl("likelihood_sum_backward", &mmvae_fast::likelihood_sum_backward_cpu);
  // ---- end: importance weights and likelihood sums
  // ---- mixture log-density and importance ratios
  m.impl("mixture_log_density", &mmvae_fast::cpu::mixture_log_density_cpu);
  m.impl("mixture_log_density_pairwise", &mmvae_fast::cpu::mixture_log_density_pairwise_cpu);
  m.impl("mixture_log_density_backward", &mmvae_fast::cpu::mixture_log_density_backward_cpu);
  m.impl("importance_ratios", &mmvae_fast::cpu::importance_ratios_cpu);
  m.impl("importance_ratios_backward", &mmvae_fast::cpu::importance_ratios_backward_cpu);
  // ---- end mixture log-density and importance ratios
  m.impl("moe_estimator", &mmvae_fast::cpu::moe_estimator_cpu);
  m.impl("moe_estimator_backward", &mmvae_fast::cpu::moe_estimator_backward_cpu);
}

#ifdef MMVAE_FAST_WITH_CUDA
// ---- CUDA kernels (csrc/cuda/*.cu): the same ops and schemas as the CPU kernels above
#include <array>
#include <optional>
#include <tuple>

namespace mmvae_fast::cuda {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> importance_weights_cuda(const at::Tensor& lw);
at::Tensor importance_weights_backward_cuda(const at::Tensor& lw, const at::Tensor& lse, const at::Tensor& lse_lo,
                                            const std::optional<at::Tensor>& g_lse,
                                            const std::optional<at::Tensor>& g_wbar,
                                            const std::optional<at::Tensor>& g_wbar_sq);
at::Tensor likelihood_sum_cuda(const at::Tensor& x, const at::Tensor& params, const std::optional<at::Tensor>& scale,
                               int64_t family);
std::tuple<at::Tensor, at::Tensor> likelihood_sum_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                const at::Tensor& params,
                                                                const std::optional<at::Tensor>& scale, int64_t family,
                                                                bool params_grad, bool scale_grad);
at::Tensor mixture_log_density_cuda(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                    c10::string_view family, const c10::optional<at::Tensor>& mask);
std::tuple<at::Tensor, at::Tensor> mixture_log_density_pairwise_cuda(const at::Tensor& z, const at::Tensor& loc,
                                                                     const at::Tensor& scale, c10::string_view family,
                                                                     const c10::optional<at::Tensor>& mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_log_density_backward_cuda(
    const c10::optional<at::Tensor>& grad_lq, const c10::optional<at::Tensor>& grad_a, const at::Tensor& z,
    const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& lq, c10::string_view family,
    const c10::optional<at::Tensor>& mask, std::array<bool, 3> output_mask);
at::Tensor importance_ratios_cuda(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                  c10::string_view family);
std::tuple<at::Tensor, at::Tensor> importance_ratios_backward_cuda(const at::Tensor& grad, const at::Tensor& ratio,
                                                                   const at::Tensor& z, const at::Tensor& loc,
                                                                   const at::Tensor& scale, c10::string_view family);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_estimator_cuda(
    at::TensorList z, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& prior_loc,
    const at::Tensor& prior_scale, const at::Tensor& lpx, c10::string_view family, c10::string_view prior_family,
    c10::string_view bound, c10::string_view estimator, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& lse, c10::optional<int64_t> num_samples);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_estimator_backward_cuda(const at::Tensor& grad, at::TensorList z, const at::Tensor& loc, const at::Tensor& scale,
                            const at::Tensor& prior_loc, const at::Tensor& prior_scale,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& lw, const at::Tensor& lq,
                            const at::Tensor& stats, c10::string_view family, c10::string_view prior_family,
                            c10::string_view bound, c10::string_view estimator, c10::optional<int64_t> num_samples);
}  // namespace mmvae_fast::cuda

TORCH_LIBRARY_IMPL(mmvae_fast, CUDA, m) {
  m.impl("importance_weights", &mmvae_fast::cuda::importance_weights_cuda);
  m.impl("importance_weights_backward", &mmvae_fast::cuda::importance_weights_backward_cuda);
  m.impl("likelihood_sum", &mmvae_fast::cuda::likelihood_sum_cuda);
  m.impl("likelihood_sum_backward", &mmvae_fast::cuda::likelihood_sum_backward_cuda);
  m.impl("mixture_log_density", &mmvae_fast::cuda::mixture_log_density_cuda);
  m.impl("mixture_log_density_pairwise", &mmvae_fast::cuda::mixture_log_density_pairwise_cuda);
  m.impl("mixture_log_density_backward", &mmvae_fast::cuda::mixture_log_density_backward_cuda);
  m.impl("importance_ratios", &mmvae_fast::cuda::importance_ratios_cuda);
  m.impl("importance_ratios_backward", &mmvae_fast::cuda::importance_ratios_backward_cuda);
  m.impl("moe_estimator", &mmvae_fast::cuda::moe_estimator_cuda);
  m.impl("moe_estimator_backward", &mmvae_fast::cuda::moe_estimator_backward_cuda);
}
// ---- end CUDA kernels
#endif  // MMVAE_FAST_WITH_CUDA
