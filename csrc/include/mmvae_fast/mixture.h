// Mixture-of-experts maths shared by the CPU and CUDA kernels of mixture_log_density and
// importance_ratios (DESIGN.md section 2):
//   a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l])
//   lq[r, k, b]   = logsumexp_{m present} a[r, m, k, b] - log(#present)
//   ratio[r, d]   = exp(a[d, r] - a[d, d])                       (appendix B, r != d)
#pragma once

#include <cstdint>

#include "mmvae_fast/densities.h"

namespace mmvae_fast {

// One term of a: log f without its -log(scale) part, which depends on (m, b) only and is
// added once per row as -sum_l log(scale[m, b, l]) instead of once per element.
template <int F, typename T>
MMVAE_HD T log_density_unscaled(T x, T loc, T inv_scale) {
  return log_density<T>(F, x, loc, inv_scale, T(0));
}

// log of the number of present experts (0 when none: lq is then -inf, set by the caller).
template <typename T>
MMVAE_HD T log_expert_count(int64_t n) {
  return n > 0 ? std::log(T(n)) : T(0);
}

// lq from the online log-sum-exp over the present experts; none present -> -inf.
template <typename T>
MMVAE_HD T mixture_lq(LseState<T> st, int64_t n_present) {
  if (n_present == 0) return -std::numeric_limits<T>::infinity();
  return lse_value(st) - log_expert_count<T>(n_present);
}

// Responsibility pi_m = exp(a_m - lse) of expert m for one sample, lse = lq + log(#present).
// A sample no present expert can explain (lq = -inf) has pi = 0 and so zero gradients, as the
// reference's safe log-sum-exp; NaN propagates.
template <typename T>
MMVAE_HD T responsibility(T a, T lq, T log_count) {
  if (lq == -std::numeric_limits<T>::infinity()) return T(0);
  return std::exp(a - (lq + log_count));
}

// Appendix B's importance ratio of expert r on the samples of expert d: exp(a[d, r] - a[d, d]).
template <typename T>
MMVAE_HD T importance_ratio(T a_num, T a_own) {
  return std::exp(a_num - a_own);
}

}  // namespace mmvae_fast
