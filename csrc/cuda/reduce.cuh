// Warp- and block-level reductions for the CUDA kernels: sums and the online log-sum-exp merge of
// mmvae_fast/math.h (the same LseState the CPU kernels fold element by element).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "mmvae_fast/host.h"
#include "mmvae_fast/math.h"

namespace mmvae_fast {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the total
}

template <typename T>
__device__ __forceinline__ LseState<T> warp_lse(LseState<T> st) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    LseState<T> other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
    st = lse_merge(st, other);
  }
  return st;  // every lane holds the merged state
}

// Block-wide versions: warps reduce, warp 0 merges the per-warp results, all threads get it.
// `scratch` holds blockDim.x / 32 entries; the block must not diverge around the call.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : T(0);
  return warp_sum(v);
}

template <typename T>
__device__ __forceinline__ LseState<T> block_lse(LseState<T> st, T* scratch_m, T* scratch_s) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  st = warp_lse(st);
  __syncthreads();
  if (lane == 0) {
    scratch_m[warp] = st.m;
    scratch_s[warp] = st.s;
  }
  __syncthreads();
  st = lane < n_warps ? LseState<T>{scratch_m[lane], scratch_s[lane]} : lse_init<T>();
  return warp_lse(st);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n items with `per_block` items per block.
inline unsigned grid_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, per_block), 65535 * 16)));
}

}  // namespace cuda
}  // namespace mmvae_fast
