// Appendix B's cross-modal importance ratios on CPU, forward and backward:
//   ratio[r, d, k, b] = exp(a[d, r, k, b] - sg a[d, d, k, b]),  1 on the diagonal r == d,
// with z detached: the gradient reaches only the numerator's expert r,
//   grad_loc/scale[r, b] = sum_{d != r, k} grad_ratio[r, d, k, b] * ratio[r, d, k, b] * d/d(loc, scale) a[d, r, k, b].
// One pass over z in tiles of 32 samples of one batch entry computes their M pairwise entries
// (mixture_rows.h); nothing of size M*M*K*B*L exists. The backward reuses the saved ratios (the
// op's own output) and needs no exp.
#include <vector>

#include "mixture_rows.h"

namespace mmvae_fast {
namespace cpu {
namespace {

template <typename T>
struct RatioArgs {
  const T *z, *loc, *inv, *lss;
  const T *grad, *ratio;   // backward only
  T *out, *gloc, *gscale;  // out: forward; gloc/gscale: backward, [chunks, M, B, L]
  int64_t M, K, B, L, chunks;
};

// Forward of one tile (batch entry b, samples dk = d * K + k in [j0, j0 + n)); A: [M][kSampleTile].
template <int F, typename T>
MMVAE_ALWAYS_INLINE void fwd_tile_t(const RatioArgs<T>& p, int64_t b, int64_t j0, int64_t n, T* zt, T* A) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L, KB = K * B;
  load_tile(p.z, j0, n, B, b, L, zt);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t o = (m * B + b) * L;
    tile_log_density<F>(zt, p.loc + o, p.inv + o, p.lss[m * B + b], L, A + m * kSampleTile);
  }
  T own[kSampleTile], ratio[kSampleTile];
  for (int64_t j = 0; j < kSampleTile; ++j) own[j] = j < n ? A[((j0 + j) / K) * kSampleTile + j] : T(0);  // a[d, d]
  for (int64_t r = 0; r < M; ++r) {
    const T* ar = A + r * kSampleTile;
#pragma omp simd
    for (int64_t j = 0; j < kSampleTile; ++j) ratio[j] = importance_ratio(ar[j], own[j]);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t dk = j0 + j, d = dk / K;
      p.out[(r * M + d) * KB + (dk % K) * B + b] = r == d ? T(1) : ratio[j];
    }
  }
}

// Backward of one task: batch entry b, tiles [t0, t1) of chunk c. Scratch: zt [L][kSampleTile],
// G [kSampleTile], lanes of grad_loc and grad_scale [M][L][kSampleTile] each.
template <int F, typename T>
MMVAE_ALWAYS_INLINE void bwd_task_t(const RatioArgs<T>& p, int64_t b, int64_t c, T* scratch) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L, KB = K * B, rows = M * K, tiles = num_tiles(rows);
  const int64_t t0 = c * tiles / p.chunks, t1 = (c + 1) * tiles / p.chunks;
  T *zt = scratch, *G = zt + L * kSampleTile, *gl = G + kSampleTile, *gs = gl + M * L * kSampleTile;
  std::fill(gl, gl + 2 * M * L * kSampleTile, T(0));
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = t * kSampleTile, n = std::min(kSampleTile, rows - j0);
    load_tile(p.z, j0, n, B, b, L, zt);
    if (t + 1 < t1) prefetch_tile(p.z, j0 + kSampleTile, std::min(kSampleTile, rows - j0 - kSampleTile), B, b, L);
    for (int64_t r = 0; r < M; ++r) {
      bool any = false;
      for (int64_t j = 0; j < kSampleTile; ++j) {
        const int64_t dk = j0 + j, d = dk / K;
        G[j] = T(0);
        if (j < n && d != r) {  // the diagonal is the constant 1
          const int64_t idx = (r * M + d) * KB + (dk % K) * B + b;
          G[j] = p.grad[idx] * p.ratio[idx];  // d ratio / d a[d, r] = ratio
          any = true;
        }
      }
      if (!any) continue;
      const int64_t o = (r * B + b) * L;
      tile_grad<F, false, true>(G, zt, p.loc + o, p.inv + o, L, static_cast<T*>(nullptr), gl + r * L * kSampleTile,
                                gs + r * L * kSampleTile);
    }
  }
  reduce_lanes(gl, M, B, b, L, p.gloc + c * M * B * L);
  reduce_lanes(gs, M, B, b, L, p.gscale + c * M * B * L);
}

template <typename T>
MMVAE_ALWAYS_INLINE void fwd_rows(int family, const RatioArgs<T>& p, int64_t begin, int64_t end) {
  const int64_t rows = p.M * p.K;
  std::vector<T> buf((p.L + p.M) * kSampleTile);
  for (int64_t t = begin; t < end; ++t) {  // t = tile * B + b: neighbouring tasks read neighbouring rows of z
    const int64_t b = t % p.B, j0 = (t / p.B) * kSampleTile, n = std::min(kSampleTile, rows - j0);
    MMVAE_DISPATCH_FAMILY(family, F, fwd_tile_t<F>(p, b, j0, n, buf.data(), buf.data() + p.L * kSampleTile));
  }
}
template <typename T>
MMVAE_ALWAYS_INLINE void bwd_tasks(int family, const RatioArgs<T>& p, int64_t begin, int64_t end) {
  std::vector<T> scratch((p.L + 1 + 2 * p.M * p.L) * kSampleTile);
  for (int64_t t = begin; t < end; ++t) {  // t = c * B + b
    MMVAE_DISPATCH_FAMILY(family, F, bwd_task_t<F>(p, t % p.B, t / p.B, scratch.data()));
  }
}
MMVAE_CPU_MULTIVERSION void fwd_f32(int f, const RatioArgs<float>& p, int64_t b, int64_t e) { fwd_rows(f, p, b, e); }
MMVAE_CPU_MULTIVERSION void fwd_f64(int f, const RatioArgs<double>& p, int64_t b, int64_t e) { fwd_rows(f, p, b, e); }
MMVAE_CPU_MULTIVERSION void bwd_f32(int f, const RatioArgs<float>& p, int64_t b, int64_t e) { bwd_tasks(f, p, b, e); }
MMVAE_CPU_MULTIVERSION void bwd_f64(int f, const RatioArgs<double>& p, int64_t b, int64_t e) { bwd_tasks(f, p, b, e); }
void run_fwd(int f, const RatioArgs<float>& p, int64_t b, int64_t e) { fwd_f32(f, p, b, e); }
void run_fwd(int f, const RatioArgs<double>& p, int64_t b, int64_t e) { fwd_f64(f, p, b, e); }
void run_bwd(int f, const RatioArgs<float>& p, int64_t b, int64_t e) { bwd_f32(f, p, b, e); }
void run_bwd(int f, const RatioArgs<double>& p, int64_t b, int64_t e) { bwd_f64(f, p, b, e); }

}  // namespace

at::Tensor importance_ratios_cpu(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                 c10::string_view family) {
  const int fam = parse_family(family);
  const Experts e = prepare_experts(z, loc, scale, "mmvae_fast::importance_ratios", at::kCPU);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  at::Tensor out = at::empty({M, M, K, B}, e.z.options());
  AT_DISPATCH_FLOATING_TYPES(e.z.scalar_type(), "importance_ratios_cpu", [&] {
    using T = scalar_t;
    // clang-format off
    const RatioArgs<T> p{e.z.data_ptr<T>(), e.loc.data_ptr<T>(), e.inv.data_ptr<T>(), e.log_scale_sum.data_ptr<T>(),
                         nullptr, nullptr, out.data_ptr<T>(), nullptr, nullptr, M, K, B, L, 1};
    // clang-format on
    at::parallel_for(0, B * num_tiles(M * K), task_grain(kSampleTile * M * L),
                     [&](int64_t begin, int64_t end) { run_fwd(fam, p, begin, end); });
  });
  return out;
}

// Gradients with respect to (loc, scale); z never gets one.
std::tuple<at::Tensor, at::Tensor> importance_ratios_backward_cpu(const at::Tensor& grad, const at::Tensor& ratio,
                                                                  const at::Tensor& z, const at::Tensor& loc,
                                                                  const at::Tensor& scale, c10::string_view family) {
  const char* op = "mmvae_fast::importance_ratios_backward";
  const int fam = parse_family(family);
  const Experts e = prepare_experts(z, loc, scale, op, at::kCPU);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  const auto acc = e.z.scalar_type();
  const at::Tensor g = grad.to(acc).contiguous(), rt = ratio.to(acc).contiguous();
  TORCH_CHECK(g.sizes() == at::IntArrayRef({M, M, K, B}) && rt.sizes() == g.sizes(), op,
              ": grad and ratio must have shape [M, M, K, B]");
  const int64_t chunks = tile_chunks(B, num_tiles(M * K));
  at::Tensor gloc = at::zeros({chunks, M, B, L}, e.z.options());
  at::Tensor gscale = at::zeros({chunks, M, B, L}, e.z.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "importance_ratios_backward_cpu", [&] {
    using T = scalar_t;
    // clang-format off
    const RatioArgs<T> p{e.z.data_ptr<T>(), e.loc.data_ptr<T>(), e.inv.data_ptr<T>(), e.log_scale_sum.data_ptr<T>(),
                         g.data_ptr<T>(), rt.data_ptr<T>(), nullptr, gloc.data_ptr<T>(), gscale.data_ptr<T>(),
                         M, K, B, L, chunks};
    // clang-format on
    at::parallel_for(0, B * chunks, task_grain(M * M * K * L / chunks),
                     [&](int64_t begin, int64_t end) { run_bwd(fam, p, begin, end); });
  });
  return {gloc.sum(0).to(loc.scalar_type()), gscale.sum(0).to(scale.scalar_type())};
}

}  // namespace cpu
}  // namespace mmvae_fast
