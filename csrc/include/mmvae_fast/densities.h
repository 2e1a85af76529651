// Log-densities of the location-scale families and their gradients, shared by every kernel
// (CPU and CUDA). Family codes match the Python strings: "normal" -> kNormal, "laplace" -> kLaplace.
#pragma once

#include "mmvae_fast/math.h"

namespace mmvae_fast {

enum Family : int { kNormal = 0, kLaplace = 1 };

// log f(x; loc, scale), given inv_scale = 1/scale and log_scale = log(scale) precomputed per
// (b, l) so the inner loops over samples pay one multiply instead of a divide and a log.
template <typename T>
MMVAE_HD T log_density(int family, T x, T loc, T inv_scale, T log_scale) {
  const T u = (x - loc) * inv_scale;
  if (family == kNormal) return T(-0.5) * u * u - log_scale - T(kHalfLog2Pi);
  return -std::abs(u) - log_scale - T(kLog2);
}

// Gradients of log f(x; loc, scale) with respect to x, loc and scale.
template <typename T>
struct DensityGrad {
  T dx;
  T dloc;
  T dscale;
};

template <typename T>
MMVAE_HD DensityGrad<T> log_density_grad(int family, T x, T loc, T inv_scale) {
  const T u = (x - loc) * inv_scale;
  if (family == kNormal) {
    const T dx = -u * inv_scale;                      // -(x - loc) / scale^2
    return {dx, -dx, (u * u - T(1)) * inv_scale};     // ((x-loc)^2/scale^2 - 1) / scale
  }
  // Laplace: the subgradient sign(0) = 0 at x == loc, as torch's abs backward.
  const T s = T((u > T(0)) - (u < T(0)));
  const T dx = -s * inv_scale;
  return {dx, -dx, (std::abs(u) - T(1)) * inv_scale};
}

}  // namespace mmvae_fast
