// Vectorisable exp / log1p for the hot loops, shared by the CPU and CUDA kernels.
//
// On the CPU the kernels are exp-bound: a loop calling std::exp stays scalar (libm call per
// element), several times slower than a SIMD loop. These are branch-free polynomial versions
// (Cephes coefficients, about 1 ulp in float32) that the compiler vectorises inside
// `#pragma omp simd` loops. double stays on std::exp / std::log1p (the float64 path is for
// gradient checks, not speed). On the device they map to CUDA's expf / log1pf.
//
// Vectorising them needs -fno-trapping-math (set in setup.py / CMakeLists.txt): otherwise GCC
// turns the range clamps into branches and gives up on the loop.
#pragma once

#include <cstdint>
#include <cstring>

#include "mmvae_fast/math.h"

namespace mmvae_fast {

#if !defined(__CUDA_ARCH__)
MMVAE_HD int32_t float_bits(float x) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(int32_t, x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
#endif
}

MMVAE_HD float bits_float(int32_t i) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, i);
#else
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
#endif
}

// exp(x) for float: exact 0 for x = -inf (and graceful underflow through the denormals),
// +inf above ~88.7, NaN for NaN.
MMVAE_HD float exp_poly(float x) {
  float xc = x < -110.f ? -110.f : x;  // exp(-110) rounds to 0; keeps the exponent in range
  xc = xc > 89.f ? 89.f : xc;          // exp(89) overflows to +inf, as it should
  const float shift = 12582912.0f;     // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + shift;
  const float n = t - shift;  // round(x / log 2)
  const int32_t ni = float_bits(t) - float_bits(shift);
  float r = xc - n * 0.693359375f;  // x - n log 2, in two parts (Cody-Waite)
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as two factors so that n in [-159, 128] needs no special cases.
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  return p * bits_float((n1 + 127) << 23) * bits_float((n2 + 127) << 23);
}

// log(u) for float u positive, normal and finite (the callers guarantee it).
MMVAE_HD float log_poly(float u) {
  const int32_t b = float_bits(u);
  float e = float((b >> 23) - 126);
  float m = bits_float((b & 0x007fffff) | 0x3f000000);  // u = m 2^e, m in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;  // m in [sqrt(1/2) - 1, sqrt(2) - 1)
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// log(1 + y) for float y >= 0, accurate for tiny y (Goldberg's correction of log(1 + y)).
MMVAE_HD float log1p_poly(float y) {
  const float u = 1.0f + y;
  const float d = u - 1.0f;
  return d == 0.0f ? y : log_poly(u) * (y / d);
}
#endif

template <typename T>
MMVAE_HD T fast_exp(T x) {
  return std::exp(x);
}
template <typename T>
MMVAE_HD T fast_log1p(T x) {
  return std::log1p(x);
}
#if defined(__CUDA_ARCH__)
template <>
MMVAE_HD float fast_exp<float>(float x) {
  return expf(x);
}
template <>
MMVAE_HD float fast_log1p<float>(float x) {
  return log1pf(x);
}
#else
template <>
MMVAE_HD float fast_exp<float>(float x) {
  return exp_poly(x);
}
template <>
MMVAE_HD float fast_log1p<float>(float x) {
  return log1p_poly(x);
}
#endif

}  // namespace mmvae_fast

#if !defined(__CUDACC__) && (defined(__SSE__) || defined(_M_X64))
#include <xmmintrin.h>
#define MMVAE_HAS_MXCSR 1
#endif

namespace mmvae_fast {
// CPU kernels run their loops under flush-to-zero / denormals-are-zero: tiny weights (w^2 of a
// weight below 1e-19, exp of a log weight 88 nats under the max) would otherwise be denormal
// floats, whose arithmetic is ~100x slower on x86 and turned a 1 ms kernel into 20 ms; flushed,
// they are 0, an absolute change below 1.2e-38 (2.2e-308 for double). Restores the caller's mode.
struct FlushDenormals {
#if defined(MMVAE_HAS_MXCSR)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};
}  // namespace mmvae_fast
