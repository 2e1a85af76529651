// The MoE estimator's per-sample maths, shared by the CPU and CUDA kernels (docs/design.md 2, 2a).
//
// Codes match the Python strings of mmvae_fast.reference.moe_estimator:
//   bound:     "looser" -> kLooser, "stratified" -> kStratified
//   estimator: "iwae", "eq8", "mixture", "mixture-centred", "released"
// With u = (z - loc) / scale, log f = -phi(u) - log scale - const, phi(u) = u^2/2 (Normal) or |u|
// (Laplace), and dphi = phi'(u):
//   d log f / dz = -dphi / scale,  d log f / dloc = dphi / scale,  d log f / dscale = (u dphi - 1) / scale.
#pragma once

#include <cstdint>
#include <string>

#include "mmvae_fast/densities.h"
#include "mmvae_fast/math.h"

namespace mmvae_fast {

enum MoEBound : int { kLooser = 0, kStratified = 1 };
enum MoEEstimator : int { kIwae = 0, kEq8 = 1, kMixture = 2, kMixtureCentred = 3, kReleased = 4 };

template <int F, typename T>
MMVAE_HD T moe_phi(T u) {
  return F == kNormal ? T(0.5) * u * u : std::abs(u);
}

template <int F, typename T>
MMVAE_HD T moe_dphi(T u) {
  return F == kNormal ? u : T((u > T(0)) - (u < T(0)));  // sign(0) = 0, as torch's abs backward
}

// The log-density's constant per coordinate: 0.5 log(2 pi) (Normal) or log 2 (Laplace).
template <typename T>
MMVAE_HD T moe_log_const(int family) {
  return family == kNormal ? T(kHalfLog2Pi) : T(kLog2);
}

// Per sample: the weight of its lw in the bound's softmax, from the slice's (max, log-sum) pair;
// lw - mx is exact for lw near mx, so the weight keeps its accuracy for any |lw| (a single rounded
// lse would not). An all -inf slice (mx = -inf) gives 0; NaN propagates.
template <typename T>
MMVAE_HD T moe_wbar(T lw, T mx, T ls) {
  if (mx == -std::numeric_limits<T>::infinity()) return T(0);
  return std::exp((lw - mx) - ls);
}

// The estimators' coefficients for sample (r, k) of item b, given s (the upstream gradient of the
// item's bound, divided by n_b for the looser bound), wbar and c (the centring constant):
//   omega       weight of dlw/dz, of the prior and of lpx (the z path's per-sample weight is applied
//               by the caller where the samples are made)
//   score(m)    weight of -pi_m d log q_m / dphi_m: all experts (iwae), the others (mixture*)
//   alias       weight of -pi_r(z) through z = loc + scale eps (mixture*)
template <typename T>
struct MoECoef {
  T omega, score_own, score_other, alias;
};

template <typename T>
MMVAE_HD MoECoef<T> moe_coef(int estimator, T s, T wbar, T c) {
  const T om = s * wbar;
  switch (estimator) {
    case kIwae:
      return {om, om, om, T(0)};
    case kMixture:
      return {om, T(0), om, om};
    case kMixtureCentred:
      return {om, T(0), s * (wbar - c), s * (wbar - c)};
    default:  // eq8, released
      return {om, T(0), T(0), T(0)};
  }
}

}  // namespace mmvae_fast
