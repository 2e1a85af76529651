// Shared maths of mmvae_fast: host/device inline functions used unchanged by the CPU (C++) and
// CUDA kernels, so the CPU tests exercise the same formulas the GPU runs.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMVAE_HD __host__ __device__ __forceinline__
#else
#define MMVAE_HD inline
#endif

namespace mmvae_fast {

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // 0.5 * log(2 pi)
constexpr double kLog2 = 0.69314718055994530942;

// Online log-sum-exp state: the running max m and the sum s of exp(x - m).
// An empty state (or one that saw only -inf) has m = -inf, s = 0 and logsumexp -inf.
// NaN inputs make m NaN, and NaN then propagates through every merge.
template <typename T>
struct LseState {
  T m;
  T s;
};

template <typename T>
MMVAE_HD LseState<T> lse_init() {
  return {-std::numeric_limits<T>::infinity(), T(0)};
}

template <typename T>
MMVAE_HD T lse_rescale(T from_max, T to_max) {
  // exp(from_max - to_max) with exp(-inf - -inf) defined as 1 (both empty)
  return from_max == to_max ? T(1) : std::exp(from_max - to_max);
}

// Add one value x to the state.
template <typename T>
MMVAE_HD LseState<T> lse_push(LseState<T> a, T x) {
  if (x != x || a.m != a.m) return {x + a.m, T(0)};  // NaN in, NaN out
  if (x <= a.m) return {a.m, a.s + lse_rescale(x, a.m)};
  return {x, a.s * lse_rescale(a.m, x) + T(1)};
}

// Merge two states (associative): for tree reductions across threads/warps.
template <typename T>
MMVAE_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  if (a.m != a.m || b.m != b.m) return {a.m + b.m, T(0)};
  if (b.m <= a.m) return {a.m, a.s + b.s * lse_rescale(b.m, a.m)};
  return {b.m, b.s + a.s * lse_rescale(a.m, b.m)};
}

template <typename T>
MMVAE_HD T lse_value(LseState<T> a) {
  if (a.m != a.m) return a.m;
  if (a.s <= T(0)) return -std::numeric_limits<T>::infinity();
  return a.m + std::log(a.s);
}

// The rounding error of s = fl(a + b): a + b - s exactly (Knuth's TwoSum; needs IEEE arithmetic,
// no -ffast-math), or 0 when s is not finite.
template <typename T>
MMVAE_HD T two_sum_err(T a, T b, T s) {
  if (!(s - s == T(0))) return T(0);  // inf or NaN
  const T bb = s - a;
  return (a - (s - bb)) + (b - bb);
}

// logsumexp as hi + lo: hi = lse_value (rounded to T), lo its rounding residual. With |lse| large
// (log weights near -1e7, say) hi alone is off by up to half an ulp of |lse| (0.5 at 1e7, 2e31 at
// 3e38), and exp(x - hi) would be off by that factor; exp((x - hi) - lo) is right to T's precision:
// x - hi is exact for the x that matter (Sterbenz), lo is small.
template <typename T>
struct LseSplit {
  T hi;
  T lo;
};

template <typename T>
MMVAE_HD LseSplit<T> lse_split(LseState<T> a) {
  const T hi = lse_value(a);
  if (!(hi - hi == T(0))) return {hi, T(0)};  // -inf (empty), +inf, NaN: no residual
  return {hi, two_sum_err(a.m, std::log(a.s), hi)};
}

// exp(x - (hi + lo)) with hi = -inf (an all -inf slice, whose x are all -inf) giving 0, not NaN.
template <typename T>
MMVAE_HD T weight_from_split(T x, T hi, T lo) {
  return hi == -std::numeric_limits<T>::infinity() ? T(0) : std::exp((x - hi) - lo);
}

}  // namespace mmvae_fast
