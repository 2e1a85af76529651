// Fused mixture-of-experts log-density on CPU (docs/design.md section 3), forward and backward.
//   a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l])
//   lq[r, k, b]   = logsumexp_{m present in b} a[r, m, k, b] - log(#present in b)
// One pass over z in tiles of 32 samples of one batch entry (mixture_rows.h): per tile, M expert
// loops over L vectorised across the samples, then a log-sum-exp over m per sample. Nothing of
// size M*M*K*B*L exists; the forward keeps only lq, and the backward recomputes a tile at a time:
//   G[r, m, k, b] = grad_lq[r, k, b] * pi[r, m, k, b] + grad_a[r, m, k, b],  pi = exp(a - lse)
//   grad_z[r, k, b]  = sum_m G * d/dz log f,   grad_loc/scale[m, b] = sum_{r,k} G * d/d(loc, scale) log f
#include <vector>

#include "mixture_rows.h"

namespace mmvae_fast {
namespace cpu {
namespace {

template <typename T>
struct Args {
  const T *z, *loc, *inv, *lss;  // lss: sum_l log scale [M, B]
  const uint8_t* present;        // [M, B]
  const int64_t* count;          // [B]
  T *lq, *a;                     // forward outputs (a may be null)
  const T *glq, *ga;             // backward: incoming gradients, each may be null
  T *gz, *gloc, *gscale;         // backward: gz may be null; gloc/gscale [chunks, M, B, L] or null
  int64_t M, K, B, L, chunks;
};

// Forward of one tile (batch entry b, samples rk in [j0, j0 + n)); A: [M][kSampleTile] scratch.
template <int F, typename T>
MMVAE_ALWAYS_INLINE void fwd_tile_t(const Args<T>& p, int64_t b, int64_t j0, int64_t n, T* zt, T* A) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L, KB = K * B;
  load_tile(p.z, j0, n, B, b, L, zt);
  T mx[kSampleTile], sum[kSampleTile];
#pragma omp simd
  for (int64_t j = 0; j < kSampleTile; ++j) mx[j] = -std::numeric_limits<T>::infinity();
  for (int64_t m = 0; m < M; ++m) {
    const bool on = p.present[m * B + b];
    if (!on && p.a == nullptr) continue;  // absent and not asked for: skip the work
    const int64_t o = (m * B + b) * L;
    T* am = A + m * kSampleTile;
    tile_log_density<F>(zt, p.loc + o, p.inv + o, p.lss[m * B + b], L, am);
    if (on) {
#pragma omp simd
      for (int64_t j = 0; j < kSampleTile; ++j) mx[j] = nan_max(mx[j], am[j]);
    }
    if (p.a != nullptr)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t rk = j0 + j;
        p.a[((rk / K) * M + m) * KB + (rk % K) * B + b] = am[j];
      }
  }
#pragma omp simd
  for (int64_t j = 0; j < kSampleTile; ++j) {
    mx[j] = lse_shift(mx[j]);
    sum[j] = T(0);
  }
  for (int64_t m = 0; m < M; ++m) {
    if (!p.present[m * B + b]) continue;
    const T* am = A + m * kSampleTile;
#pragma omp simd
    for (int64_t j = 0; j < kSampleTile; ++j) sum[j] += fast_exp(am[j] - mx[j]);
  }
  for (int64_t j = 0; j < n; ++j) p.lq[(j0 + j) * B + b] = mixture_lq_from_sum(mx[j], sum[j], p.count[b]);
}

template <typename T>
MMVAE_ALWAYS_INLINE void fwd_tasks(int family, const Args<T>& p, int64_t begin, int64_t end) {
  const int64_t rows = p.M * p.K;
  std::vector<T> buf((p.L + p.M) * kSampleTile);
  for (int64_t t = begin; t < end; ++t) {  // t = tile * B + b: neighbouring tasks read neighbouring rows of z
    const int64_t b = t % p.B, j0 = (t / p.B) * kSampleTile, n = std::min(kSampleTile, rows - j0);
    MMVAE_DISPATCH_FAMILY(family, F, fwd_tile_t<F>(p, b, j0, n, buf.data(), buf.data() + p.L * kSampleTile));
  }
}

// Backward of one task: batch entry b, tiles [t0, t1) of chunk c. Scratch: zt, gzt [L][kSampleTile],
// A (then G) [M][kSampleTile], lanes of grad_loc and grad_scale [M][L][kSampleTile] each.
template <int F, bool GX, bool GP, typename T>
MMVAE_ALWAYS_INLINE void bwd_task_t(const Args<T>& p, int64_t b, int64_t c, T* scratch) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L, KB = K * B, rows = M * K, tiles = num_tiles(rows);
  const int64_t t0 = c * tiles / p.chunks, t1 = (c + 1) * tiles / p.chunks;
  T *zt = scratch, *gzt = zt + L * kSampleTile, *G = gzt + L * kSampleTile, *gl = G + M * kSampleTile,
    *gs = gl + M * L * kSampleTile;
  if (GP) std::fill(gl, gl + 2 * M * L * kSampleTile, T(0));
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = t * kSampleTile, n = std::min(kSampleTile, rows - j0);
    load_tile(p.z, j0, n, B, b, L, zt);
    if (t + 1 < t1) {
      const int64_t n1 = std::min(kSampleTile, rows - j0 - kSampleTile);
      prefetch_tile(p.z, j0 + kSampleTile, n1, B, b, L);
      if (GX) prefetch_tile(p.gz, j0 + kSampleTile, n1, B, b, L);
      if (p.glq != nullptr)
        for (int64_t j = 0; j < n1; ++j) __builtin_prefetch(p.glq + (j0 + kSampleTile + j) * B + b);
    }
    // G[m][j] = grad_lq * pi_m + grad_a[m] for the samples of the tile (0 in unused lanes), with
    // pi_m = exp(a_m - max) / sum_m' exp(a_m' - max) over the present experts from the tile's own
    // (max, sum): exact at any |a| (the saved lq is rounded: at |a| ~ 1e20, lq + log M is lq)
    T g[kSampleTile], mx[kSampleTile], sum[kSampleTile];
    for (int64_t j = 0; j < kSampleTile; ++j) {
      g[j] = (p.glq != nullptr && j < n) ? p.glq[(j0 + j) * B + b] : T(0);
      mx[j] = -std::numeric_limits<T>::infinity();
      sum[j] = T(0);
    }
    for (int64_t m = 0; m < M; ++m) {
      T* Gm = G + m * kSampleTile;
      if (p.glq != nullptr && p.present[m * B + b]) {
        const int64_t o = (m * B + b) * L;
        tile_log_density<F>(zt, p.loc + o, p.inv + o, p.lss[m * B + b], L, Gm);
#pragma omp simd
        for (int64_t j = 0; j < kSampleTile; ++j) mx[j] = nan_max(mx[j], Gm[j]);
      } else {
        for (int64_t j = 0; j < kSampleTile; ++j) Gm[j] = -std::numeric_limits<T>::infinity();
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      T* Gm = G + m * kSampleTile;
#pragma omp simd
      for (int64_t j = 0; j < kSampleTile; ++j) {
        Gm[j] = fast_exp(Gm[j] - lse_shift(mx[j]));  // NaN stays NaN
        sum[j] += Gm[j];
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      T* Gm = G + m * kSampleTile;
#pragma omp simd
      for (int64_t j = 0; j < kSampleTile; ++j)
        Gm[j] = g[j] != T(0) && mx[j] != -std::numeric_limits<T>::infinity() ? g[j] * (Gm[j] / sum[j]) : T(0);
      if (p.ga != nullptr)
        for (int64_t j = 0; j < n; ++j) {
          const int64_t rk = j0 + j;
          Gm[j] += p.ga[((rk / K) * M + m) * KB + (rk % K) * B + b];
        }
    }
    if (GX) std::fill(gzt, gzt + L * kSampleTile, T(0));
    for (int64_t m = 0; m < M; ++m) {
      if (!(p.ga != nullptr || (p.glq != nullptr && p.present[m * B + b]))) continue;  // absent, no grad_a
      const int64_t o = (m * B + b) * L;
      tile_grad<F, GX, GP>(G + m * kSampleTile, zt, p.loc + o, p.inv + o, L, gzt, gl + m * L * kSampleTile,
                           gs + m * L * kSampleTile);
    }
    if (GX) store_tile(gzt, j0, n, B, b, L, p.gz);
  }
  if (GP) {
    reduce_lanes(gl, M, B, b, L, p.gloc + c * M * B * L);
    reduce_lanes(gs, M, B, b, L, p.gscale + c * M * B * L);
  }
}

template <typename T>
MMVAE_ALWAYS_INLINE void bwd_tasks(int family, const Args<T>& p, int64_t begin, int64_t end) {
  std::vector<T> scratch((2 * p.L + p.M + 2 * p.M * p.L) * kSampleTile);
  const bool gx = p.gz != nullptr, gp = p.gloc != nullptr;
  for (int64_t t = begin; t < end; ++t) {  // t = c * B + b
    const int64_t b = t % p.B, c = t / p.B;
    if (!gx && !gp) continue;  // nothing wanted
    MMVAE_DISPATCH_FAMILY(
        family, F,
        MMVAE_DISPATCH_BOOL(gx, GX, MMVAE_DISPATCH_BOOL(gp, GP, bwd_task_t<F, GX, GP>(p, b, c, scratch.data()))));
  }
}

MMVAE_CPU_MULTIVERSION void fwd_f32(int f, const Args<float>& p, int64_t b, int64_t e) { fwd_tasks(f, p, b, e); }
MMVAE_CPU_MULTIVERSION void fwd_f64(int f, const Args<double>& p, int64_t b, int64_t e) { fwd_tasks(f, p, b, e); }
MMVAE_CPU_MULTIVERSION void bwd_f32(int f, const Args<float>& p, int64_t b, int64_t e) { bwd_tasks(f, p, b, e); }
MMVAE_CPU_MULTIVERSION void bwd_f64(int f, const Args<double>& p, int64_t b, int64_t e) { bwd_tasks(f, p, b, e); }
void run_fwd(int f, const Args<float>& p, int64_t b, int64_t e) { fwd_f32(f, p, b, e); }
void run_fwd(int f, const Args<double>& p, int64_t b, int64_t e) { fwd_f64(f, p, b, e); }
void run_bwd(int f, const Args<float>& p, int64_t b, int64_t e) { bwd_f32(f, p, b, e); }
void run_bwd(int f, const Args<double>& p, int64_t b, int64_t e) { bwd_f64(f, p, b, e); }

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                                const std::string& family, const c10::optional<at::Tensor>& mask,
                                                bool pairwise) {
  const char* op = "mmvae_fast::mixture_log_density";
  const int fam = parse_family(family);
  const Experts e = prepare_experts(z, loc, scale, op, at::kCPU);
  const auto [present, count] = prepare_mask(mask, e.M, e.B, z.device(), op);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  at::Tensor lq = at::empty({M, K, B}, e.z.options());
  at::Tensor a = pairwise ? at::empty({M, M, K, B}, e.z.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(e.z.scalar_type(), "mixture_log_density_cpu", [&] {
    using T = scalar_t;
    const Args<T> p{e.z.data_ptr<T>(),
                    e.loc.data_ptr<T>(),
                    e.inv.data_ptr<T>(),
                    e.log_scale_sum.data_ptr<T>(),
                    present.data_ptr<uint8_t>(),
                    count.data_ptr<int64_t>(),
                    lq.data_ptr<T>(),
                    pairwise ? a.data_ptr<T>() : nullptr,
                    nullptr,
                    nullptr,
                    nullptr,
                    nullptr,
                    nullptr,
                    M,
                    K,
                    B,
                    L,
                    1};
    at::parallel_for(0, B * num_tiles(M * K), task_grain(kSampleTile * M * L),
                     [&](int64_t begin, int64_t end) { run_fwd(fam, p, begin, end); });
  });
  return {lq, a};
}

}  // namespace

at::Tensor mixture_log_density_cpu(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                   c10::string_view family, const c10::optional<at::Tensor>& mask) {
  return std::get<0>(forward_impl(z, loc, scale, std::string(family), mask, false));
}

std::tuple<at::Tensor, at::Tensor> mixture_log_density_pairwise_cpu(const at::Tensor& z, const at::Tensor& loc,
                                                                    const at::Tensor& scale, c10::string_view family,
                                                                    const c10::optional<at::Tensor>& mask) {
  return forward_impl(z, loc, scale, std::string(family), mask, true);
}

// Gradients with respect to (z, loc, scale); an entry of output_mask that is false gives an
// empty tensor (the caller returns None for it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_log_density_backward_cpu(
    const c10::optional<at::Tensor>& grad_lq, const c10::optional<at::Tensor>& grad_a, const at::Tensor& z,
    const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& lq, c10::string_view family,
    const c10::optional<at::Tensor>& mask, std::array<bool, 3> output_mask) {
  const char* op = "mmvae_fast::mixture_log_density_backward";
  const int fam = parse_family(family);
  const Experts e = prepare_experts(z, loc, scale, op, at::kCPU);
  const auto [present, count] = prepare_mask(mask, e.M, e.B, z.device(), op);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  const auto acc = e.z.scalar_type();
  const bool gx = output_mask[0], gp = output_mask[1] || output_mask[2];
  const auto [lqc, glq, ga] = prepare_mixture_cotangents(grad_lq, grad_a, lq, e, op);
  const int64_t chunks = tile_chunks(B, num_tiles(M * K));
  const bool run = (gx || gp) && (glq.defined() || ga.defined());
  // every row of grad_z is written by exactly one tile when the kernel runs: no zero fill
  at::Tensor gz = gx ? (run ? at::empty_like(e.z) : at::zeros_like(e.z)) : at::Tensor();
  at::Tensor gloc = gp ? at::zeros({chunks, M, B, L}, e.z.options()) : at::Tensor();
  at::Tensor gscale = gp ? at::zeros({chunks, M, B, L}, e.z.options()) : at::Tensor();
  if (run) {
    AT_DISPATCH_FLOATING_TYPES(acc, "mixture_log_density_backward_cpu", [&] {
      using T = scalar_t;
      const Args<T> p{e.z.data_ptr<T>(),
                      e.loc.data_ptr<T>(),
                      e.inv.data_ptr<T>(),
                      e.log_scale_sum.data_ptr<T>(),
                      present.data_ptr<uint8_t>(),
                      count.data_ptr<int64_t>(),
                      const_cast<T*>(lqc.data_ptr<T>()),
                      nullptr,
                      glq.defined() ? glq.data_ptr<T>() : nullptr,
                      ga.defined() ? ga.data_ptr<T>() : nullptr,
                      gx ? gz.data_ptr<T>() : nullptr,
                      gp ? gloc.data_ptr<T>() : nullptr,
                      gp ? gscale.data_ptr<T>() : nullptr,
                      M,
                      K,
                      B,
                      L,
                      chunks};
      at::parallel_for(0, B * chunks, task_grain(M * M * K * L / chunks),
                       [&](int64_t begin, int64_t end) { run_bwd(fam, p, begin, end); });
    });
  }
  // the per-chunk partial sums of grad_loc and grad_scale, summed
  return mixture_gradients(gz, gp ? gloc.sum(0) : gloc, gp ? gscale.sum(0) : gscale, z, loc, scale, output_mask);
}

}  // namespace cpu
}  // namespace mmvae_fast
