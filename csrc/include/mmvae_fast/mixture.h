// Mixture-of-experts maths shared by the CPU and CUDA kernels of mixture_log_density and
// importance_ratios (docs/design.md section 2):
//   a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l])
//   lq[r, k, b]   = logsumexp_{m present} a[r, m, k, b] - log(#present)
//   ratio[r, d]   = exp(a[d, r] - a[d, d])                       (appendix B, r != d)
#pragma once

#include <cstdint>
#include <cstring>

#include "mmvae_fast/densities.h"
#include "mmvae_fast/fastmath.h"

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

// The log-sum-exp over experts in two passes (max, then sum of exp) for kernels that hold all M
// values of a sample at once, vectorised across samples. NaN-propagating max: once a NaN is
// seen it stays.
template <typename T>
MMVAE_HD T nan_max(T m, T x) {
  return ((x > m) | (x != x)) ? x : m;  // |, not ||: a branch would keep SIMD loops scalar
}
// The shift used for the sum: the max, or 0 when every term is -inf (the sum is then 0).
template <typename T>
MMVAE_HD T lse_shift(T max) {
  return max == -std::numeric_limits<T>::infinity() ? T(0) : max;
}
// lq from the shift and the sum of exp(a - shift) over the n_present experts; none present or
// all -inf -> -inf; NaN propagates.
template <typename T>
MMVAE_HD T mixture_lq_from_sum(T shift, T sum, int64_t n_present) {
  if (n_present == 0 || sum == T(0)) return -std::numeric_limits<T>::infinity();
  return shift + std::log(sum) - log_expert_count<T>(n_present);
}

// Appendix B's importance ratio of expert r on the samples of expert d: exp(a[d, r] - a[d, d]).
template <typename T>
MMVAE_HD T importance_ratio(T a_num, T a_own) {
  return fast_exp(a_num - a_own);
}

}  // namespace mmvae_fast
