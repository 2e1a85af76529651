// CPU building blocks of the mixture kernels (mixture_log_density, importance_ratios): tiles of
// samples with SIMD loops across the samples, and the argument checks and packing of both ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "mmvae_fast/cpu.h"
#include "mmvae_fast/mixture.h"
#include "mmvae_fast/mixture_args.h"

namespace mmvae_fast {
namespace cpu {

// The kernels work on tiles of kSampleTile samples of one batch entry b, transposed to [L][kSampleTile] so
// that the loops over L run over whole SIMD registers of samples (loc and 1/scale of one expert
// are broadcast): no horizontal reductions, no remainder lanes for L = 20, and each tile is
// loaded once for all M experts. Samples of a tile: rows rk = r * K + k in [j0, j0 + n).

template <typename T>
MMVAE_ALWAYS_INLINE void load_tile(const T* z, int64_t j0, int64_t n, int64_t B, int64_t b, int64_t L, T* zt) {
  for (int64_t j = 0; j < n; ++j) {
    const T* row = z + ((j0 + j) * B + b) * L;
    for (int64_t l = 0; l < L; ++l) zt[l * kSampleTile + j] = row[l];
  }
  for (int64_t j = n; j < kSampleTile; ++j)
    for (int64_t l = 0; l < L; ++l) zt[l * kSampleTile + j] = T(0);
}

// Prefetch the rows of the tile [j0, j0 + n) of batch entry b (rows are B * L apart, so the
// hardware prefetcher does not see them coming); the backward passes walk tiles of one b.
template <typename T>
MMVAE_ALWAYS_INLINE void prefetch_tile(const T* z, int64_t j0, int64_t n, int64_t B, int64_t b, int64_t L) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = 0; j < n; ++j) {
    const T* row = z + ((j0 + j) * B + b) * L;
    for (int64_t l = 0; l < L; l += kLine) __builtin_prefetch(row + l);
    __builtin_prefetch(row + L - 1);
  }
}

template <typename T>
MMVAE_ALWAYS_INLINE void store_tile(const T* zt, int64_t j0, int64_t n, int64_t B, int64_t b, int64_t L, T* z) {
  for (int64_t j = 0; j < n; ++j) {
    T* row = z + ((j0 + j) * B + b) * L;
    for (int64_t l = 0; l < L; ++l) row[l] = zt[l * kSampleTile + j];
  }
}

// a[j] = sum_l log f(zt[l][j]; loc[l], 1/inv[l]) for the kSampleTile samples of a tile against one
// expert; log_scale_sum = sum_l log scale[l] is subtracted once.
template <int F, typename T>
MMVAE_ALWAYS_INLINE void tile_log_density(const T* zt, const T* loc, const T* inv, T log_scale_sum, int64_t L, T* a) {
  T acc[kSampleTile];
#pragma omp simd
  for (int64_t j = 0; j < kSampleTile; ++j) acc[j] = T(0);
  for (int64_t l = 0; l < L; ++l) {
    const T lo = loc[l], iv = inv[l];
    const T* zl = zt + l * kSampleTile;
#pragma omp simd
    for (int64_t j = 0; j < kSampleTile; ++j) acc[j] += log_density_unscaled<F, T>(zl[j], lo, iv);
  }
#pragma omp simd
  for (int64_t j = 0; j < kSampleTile; ++j) a[j] = acc[j] - log_scale_sum;
}

// For one expert: gzt[l][j] += G[j] * d/dz, glt[l][j] += G[j] * d/dloc, gst[l][j] += G[j] * d/dscale
// of log f(zt[l][j]; loc[l], scale[l]). glt, gst are per-lane partial sums (reduced over j once
// per task), so nothing is reduced across lanes in the inner loop.
template <int F, bool GX, bool GP, typename T>
MMVAE_ALWAYS_INLINE void tile_grad(const T* G, const T* zt, const T* loc, const T* inv, int64_t L, T* gzt, T* glt,
                                   T* gst) {
  for (int64_t l = 0; l < L; ++l) {
    const T lo = loc[l], iv = inv[l];
    const T* zl = zt + l * kSampleTile;
#pragma omp simd
    for (int64_t j = 0; j < kSampleTile; ++j) {
      const DensityGrad<T> d = log_density_grad<T>(F, zl[j], lo, iv);
      if (GX) gzt[l * kSampleTile + j] += weighted_grad(G[j], d.dx);
      if (GP) {
        glt[l * kSampleTile + j] += weighted_grad(G[j], d.dloc);
        gst[l * kSampleTile + j] += weighted_grad(G[j], d.dscale);
      }
    }
  }
}

// Adds the per-lane partial sums lanes[m][l][j] into out[m, b, l] ([M, B, L]).
template <typename T>
MMVAE_ALWAYS_INLINE void reduce_lanes(const T* lanes, int64_t M, int64_t B, int64_t b, int64_t L, T* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t l = 0; l < L; ++l) {
      const T* v = lanes + (m * L + l) * kSampleTile;
      T s = T(0);
      for (int64_t j = 0; j < kSampleTile; ++j) s += v[j];
      out[(m * B + b) * L + l] += s;
    }
}

// Tasks per thread chunk for a task of `work` density terms: ~1e5 terms (tens of microseconds),
// so small problems run on one thread instead of paying for a fork and join.
inline int64_t task_grain(int64_t work) {
  return std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, work));
}

inline int64_t num_tiles(int64_t rows) { return (rows + kSampleTile - 1) / kSampleTile; }

// Work split of the backward passes over (batch entry, chunk of tiles): each task owns the
// parameter gradients of its batch entry in its own chunk buffer, so there are no races; with
// few batch entries the tiles are split too, and the chunk buffers are summed afterwards.
inline int64_t tile_chunks(int64_t B, int64_t tiles) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  if (B >= want) return 1;
  return std::min(tiles, (want + B - 1) / B);
}

}  // namespace cpu
}  // namespace mmvae_fast
