// What the CPU kernel files share (csrc/cpu/*.cpp; never included by CUDA code): function
// attributes, the per-ISA clones of the hot functions, the tile widths, and the switches that turn
// a runtime flag into a template parameter.
#pragma once

#include <cstdint>

#include "mmvae_fast/densities.h"  // kNormal, kLaplace

#define MMVAE_ALWAYS_INLINE inline __attribute__((always_inline))

// Compile the marked hot function once per x86-64 feature level (AVX-512, AVX2 + FMA, baseline)
// and pick the best at load time (GCC function multiversioning, needs ifunc: Linux/glibc), so the
// wheel stays portable and still runs 16-wide where the CPU allows. Elsewhere the baseline build
// runs, still vectorised (`omp simd`, no -ffast-math: no reordering) to the default ISA.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(MMVAE_FAST_NO_MULTIVERSION)
#define MMVAE_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMVAE_CPU_MULTIVERSION
#endif

namespace mmvae_fast {
// Tile widths, in elements of the accumulation type.
constexpr int64_t kColumnTile = 16;  // importance_weights (Q > 1): adjacent columns, one AVX-512 register of float
constexpr int64_t kSampleTile = 32;  // mixture rows: samples, 2 AVX-512 or 4 AVX2 registers per accumulator
}  // namespace mmvae_fast

// `body` once with the constant F = kNormal or kLaplace, whichever `family` is.
#define MMVAE_DISPATCH_FAMILY(family, F, ...)   \
  do {                                          \
    if ((family) == ::mmvae_fast::kNormal) {    \
      constexpr int F = ::mmvae_fast::kNormal;  \
      __VA_ARGS__;                              \
    } else {                                    \
      constexpr int F = ::mmvae_fast::kLaplace; \
      __VA_ARGS__;                              \
    }                                           \
  } while (0)

// `body` once with the constant B = true or false, whichever `flag` is.
#define MMVAE_DISPATCH_BOOL(flag, B, ...) \
  do {                                    \
    if (flag) {                           \
      constexpr bool B = true;            \
      __VA_ARGS__;                        \
    } else {                              \
      constexpr bool B = false;           \
      __VA_ARGS__;                        \
    }                                     \
  } while (0)
