// CUDA building blocks of the mixture kernels (mirrors csrc/cpu/mixture_rows.h): a warp per
// sample (r, k, b), lanes over the latent dim L; argument packing in mmvae_fast/mixture_args.h.
#pragma once

#include "mmvae_fast/mixture.h"
#include "mmvae_fast/mixture_args.h"
#include "reduce.cuh"

namespace mmvae_fast {
namespace cuda {

constexpr int kMixBlock = 256;
constexpr int kSamplesPerBlock = kMixBlock / kWarp;

// sum_l log f(z_l; loc_l, 1/inv_l) without the -sum_l log(scale_l) term, over a warp's lanes;
// every lane gets the total.
template <int F, typename T>
__device__ __forceinline__ T warp_row_log_density(const T* z, const T* loc, const T* inv, int64_t L, int lane) {
  T s = T(0);
  for (int64_t l = lane; l < L; l += kWarp) s += log_density_unscaled<F, T>(z[l], loc[l], inv[l]);
  return warp_sum(s);
}

}  // namespace cuda
}  // namespace mmvae_fast
