// Log-densities of the location-scale families and their gradients, shared by every kernel
// (CPU and CUDA). Family codes match the Python strings: "normal" -> kNormal, "laplace" -> kLaplace.
#pragma once

#include "mmvae_fast/fastmath.h"
#include "mmvae_fast/math.h"

namespace mmvae_fast {

enum Family : int { kNormal = 0, kLaplace = 1 };

// Both families in one form: with u = (x - loc) / scale,
//   log f = -phi(u) - log scale - log_const,  phi(u) = u^2/2 (Normal) or |u| (Laplace),
// and with dphi = phi'(u):
//   d log f / dx = -dphi / scale,  d log f / dloc = dphi / scale,  d log f / dscale = (u dphi - 1) / scale.
template <int F, typename T>
MMVAE_HD T phi(T u) {
  return F == kNormal ? T(0.5) * u * u : std::abs(u);
}

template <int F, typename T>
MMVAE_HD T dphi(T u) {
  return F == kNormal ? u : T((u > T(0)) - (u < T(0)));  // sign(0) = 0, as torch's abs backward
}

// The log-density's constant per coordinate: 0.5 log(2 pi) (Normal) or log 2 (Laplace).
template <typename T>
MMVAE_HD T log_const(int family) {
  return family == kNormal ? T(kHalfLog2Pi) : T(kLog2);
}

// log f(x; loc, scale), given inv_scale = 1/scale and log_scale = log(scale) precomputed per
// (b, l) so the inner loops over samples pay one multiply instead of a divide and a log.
template <typename T>
MMVAE_HD T log_density(int family, T x, T loc, T inv_scale, T log_scale) {
  const T u = (x - loc) * inv_scale;
  return -(family == kNormal ? phi<kNormal>(u) : phi<kLaplace>(u)) - log_scale - log_const<T>(family);
}

// G * d for a cotangent G and a local derivative d, with G == 0 contributing exactly 0: a term of
// zero weight (an expert whose density underflowed to -inf, say) can have an infinite derivative,
// and 0 * inf would be NaN (docs/design.md section 2: -inf is legal, with zero gradients). A NaN G
// still propagates.
template <typename T>
MMVAE_HD T weighted_grad(T G, T d) {
  return G == T(0) ? T(0) : G * d;
}

// Gradients of log f(x; loc, scale) with respect to x, loc and scale.
template <typename T>
struct DensityGrad {
  T dx;
  T dloc;
  T dscale;
};

// Where phi(u) overflows the density is -inf, with zero gradients (docs/design.md section 2), as
// every -inf log-density: a tiny scale far from x gives 0, not an infinite or NaN gradient.
template <typename T>
MMVAE_HD DensityGrad<T> log_density_grad(int family, T x, T loc, T inv_scale) {
  const T u = (x - loc) * inv_scale;
  const bool normal = family == kNormal;
  const bool overflow = std::isinf(normal ? phi<kNormal>(u) : phi<kLaplace>(u));
  const T d = overflow ? T(0) : normal ? dphi<kNormal>(u) : dphi<kLaplace>(u);
  const T dx = -d * inv_scale;
  return {dx, -dx, overflow ? T(0) : (u * d - T(1)) * inv_scale};
}

}  // namespace mmvae_fast

// ------------------------------------------------------------------------------------------------
// Likelihoods on logits (the decoder outputs), elementwise; the CPU kernels sum them over the event
// dims. fast_exp / fast_log1p are vectorisable on the CPU and CUDA's expf / log1pf on the device.
// ------------------------------------------------------------------------------------------------

namespace mmvae_fast {

enum Likelihood : int { kLikNormal = kNormal, kLikLaplace = kLaplace, kLikBernoulli = 2, kLikCategorical = 3 };

// Bernoulli on logits l, x in [0, 1] (soft targets allowed):
//   log p(x | l) = -(1 - x) softplus(l) - x softplus(-l),  softplus(l) = max(l, 0) + log1p(exp(-|l|)),
// (= x l - softplus(l)) with a term whose weight is 0 dropped, so infinite logits give the limits:
// l = +inf gives 0 at x = 1 and -inf below, l = -inf gives 0 at x = 0 and -inf above, never
// inf - inf = NaN.
template <typename T>
MMVAE_HD T bernoulli_log_prob(T x, T l) {
  const T lp = fast_log1p(fast_exp(-std::abs(l)));
  const T sp_pos = (l > T(0) ? l : T(0)) + lp, sp_neg = (l < T(0) ? -l : T(0)) + lp;
  return -((x != T(1) ? (T(1) - x) * sp_pos : T(0)) + (x != T(0) ? x * sp_neg : T(0)));  // NaN x: NaN
}

// d/dl log p(x | l) = x - sigmoid(l), sigmoid from the same exp(-|l|) (no overflow either side).
template <typename T>
MMVAE_HD T bernoulli_log_prob_grad(T x, T l) {
  const T e = fast_exp(-std::abs(l));
  const T sig = (l >= T(0) ? T(1) : e) / (T(1) + e);
  return x - sig;
}

// Categorical on logits l[0..V): log p(x | l) = l[x] - logsumexp(l); its gradient in l[v] is
// [v == x] - softmax(l)[v] = [v == x] - exp(l[v] - lse). The kernels get lse from LseState (math.h).
template <typename T>
MMVAE_HD T categorical_log_prob(T l_x, T lse) {
  return l_x - lse;
}

template <typename T>
MMVAE_HD T categorical_log_prob_grad(T l_v, T lse, bool is_x) {
  return (is_x ? T(1) : T(0)) - fast_exp(l_v - lse);
}

}  // namespace mmvae_fast
