// CPU building blocks of the mixture kernels: SIMD loops over the latent dim L of one sample
// against one expert, and the argument packing common to both ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>

#include "mmvae_fast/mixture.h"

// The row loops are vectorised by `omp simd` (reductions need it without -ffast-math). x86-64
// builds compile each kernel three times (AVX-512, AVX2+FMA, baseline) and pick one at load
// time, so the wheel stays portable and still runs 16-wide where the CPU allows.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MMVAE_FAST_NO_CLONES)
#define MMVAE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMVAE_CPU_CLONES
#endif
#define MMVAE_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace mmvae_fast {
namespace cpu {

inline int parse_family(const std::string& family) {
  if (family == "normal") return kNormal;
  if (family == "laplace") return kLaplace;
  TORCH_CHECK(false, "argument 'family' must be 'normal' or 'laplace', got '", family, "'");
}

// sum_l log f(x_l; loc_l, 1/inv_l) + sum_l log(scale_l): one entry of a before its scale term.
template <int F, typename T>
MMVAE_ALWAYS_INLINE T row_log_density(const T* x, const T* loc, const T* inv, int64_t L) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t l = 0; l < L; ++l) s += log_density_unscaled<F, T>(x[l], loc[l], inv[l]);
  return s;
}

// Adds g * d/d(x, loc, scale) log f(x_l; loc_l, scale_l) into gx, gloc, gscale (each if wanted).
template <int F, bool GX, bool GP, typename T>
MMVAE_ALWAYS_INLINE void row_grad(T g, const T* x, const T* loc, const T* inv, T* gx, T* gloc, T* gscale,
                                  int64_t L) {
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) {
    const DensityGrad<T> d = log_density_grad<T>(F, x[l], loc[l], inv[l]);
    if (GX) gx[l] += g * d.dx;
    if (GP) {
      gloc[l] += g * d.dloc;
      gscale[l] += g * d.dscale;
    }
  }
}

// The experts' parameters in the accumulation dtype: loc, 1/scale [M, B, L] and
// sum_l log(scale) [M, B], plus z [M, K, B, L], all contiguous.
struct Experts {
  at::Tensor z, loc, inv, log_scale_sum;
  int64_t M, K, B, L;
};

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Experts prepare_experts(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, const char* op) {
  TORCH_CHECK(z.dim() == 4, op, ": argument 'z' must have shape [M, K, B, L], got ", z.sizes());
  const int64_t M = z.size(0), K = z.size(1), B = z.size(2), L = z.size(3);
  TORCH_CHECK(loc.sizes() == at::IntArrayRef({M, B, L}), op, ": argument 'loc' must have shape [M, B, L] = ",
              at::IntArrayRef({M, B, L}), ", got ", loc.sizes());
  TORCH_CHECK(scale.sizes() == loc.sizes(), op, ": argument 'scale' must have shape ", loc.sizes(), ", got ",
              scale.sizes());
  TORCH_CHECK(z.device().is_cpu() && loc.device().is_cpu() && scale.device().is_cpu(), op,
              ": expected CPU tensors");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && z.scalar_type() == loc.scalar_type() &&
                  z.scalar_type() == scale.scalar_type(),
              op, ": z, loc and scale must share one floating dtype");
  const auto acc = acc_type(z);
  const at::Tensor s = scale.to(acc);
  return {z.to(acc).contiguous(), loc.to(acc).contiguous(), s.reciprocal().contiguous(),
          s.log().sum(-1).contiguous(), M, K, B, L};
}

// Present-expert mask as uint8 [M, B] (all ones when absent) and the count per batch entry.
inline std::pair<at::Tensor, at::Tensor> prepare_mask(const c10::optional<at::Tensor>& mask, int64_t M, int64_t B,
                                                      const char* op) {
  if (!mask.has_value()) {
    return {at::ones({M, B}, at::kByte), at::full({B}, M, at::kLong)};
  }
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": argument 'mask' must be a bool tensor");
  TORCH_CHECK(mask->sizes() == at::IntArrayRef({M, B}), op, ": argument 'mask' must have shape [M, B] = ",
              at::IntArrayRef({M, B}), ", got ", mask->sizes());
  const at::Tensor m = mask->to(at::kByte).contiguous();
  return {m, m.sum(0, /*keepdim=*/false, at::kLong).contiguous()};
}

// Work split of the backward passes over (batch entry, chunk of samples): each task owns the
// parameter gradients of its batch entry in its own chunk buffer, so there are no races; with
// few batch entries K is split too, and the chunk buffers are summed afterwards.
// Tasks per thread chunk for a task of `work` density terms: ~1e5 terms (tens of microseconds),
// so small problems run on one thread instead of paying for a fork and join.
inline int64_t row_grain(int64_t work) {
  return std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, work));
}

inline int64_t sample_chunks(int64_t B, int64_t K) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  if (B >= want) return 1;
  return std::min(K, (want + B - 1) / B);
}

}  // namespace cpu
}  // namespace mmvae_fast
