// The MoE estimator's per-sample maths, shared by the CPU and CUDA kernels (docs/design.md 2, 2a).
//
// Codes match the Python strings of mmvae_fast.reference.moe_estimator:
//   bound:     "looser" -> kLooser, "stratified" -> kStratified
//   estimator: "iwae", "eq8", "mixture", "mixture-centred", "released"
// The densities' phi, dphi and log_const: densities.h.
#pragma once

#include <cstdint>
#include <string>

#include "mmvae_fast/densities.h"
#include "mmvae_fast/math.h"

namespace mmvae_fast {

enum MoEBound : int { kLooser = 0, kStratified = 1 };
enum MoEEstimator : int { kIwae = 0, kEq8 = 1, kMixture = 2, kMixtureCentred = 3, kReleased = 4 };

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
