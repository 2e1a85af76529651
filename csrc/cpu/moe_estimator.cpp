// The MoE bound and its gradient estimators on CPU, forward and backward (docs/design.md 2, 2a;
// the oracle: mmvae_fast/reference/moe_estimator.py). One pass over the K x M samples of each item:
//   a[r, m]  = sum_l log q_m(z[r, k, b, l]),   lq = logsumexp_{m present} a - log n_b
//   lw       = log p(z) + lpx - lq,            bound from the per-slice (max, log-sum) of lw
// saving lw, lq and the slices' (max, log-sum): O(M K B). The backward recomputes a[r, :] per sample
// and writes the gradients of z, loc, scale, the prior's loc and scale and lpx directly.
//
// Both passes work on tiles of kSampleTile samples of one item (mixture_rows.h), transposed to [L][kSampleTile]
// so every loop over L runs over whole SIMD registers of samples, with the vectorisable exp / log1p
// of fastmath.h; loc, scale and the prior's parameter gradients are per-lane partial sums reduced
// once per item. Items are independent (each owns its rows of every gradient): both passes run in
// parallel over b.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "mixture_rows.h"
#include "mmvae_fast/moe_estimator_args.h"

namespace mmvae_fast::cpu {
namespace {

template <typename T>
struct Args {
  const T *z, *loc, *scale, *ploc, *pscale, *lpx, *lse_in;  // lse_in: the chunked path's (max, log-sum) pairs, or null
  const bool* mask;                                         // [M, B] or null
  const T* g;                                               // backward: the bound's gradient [B]
  const T *lw_in, *lq_in, *stats_in;                        // backward: the forward's saved tensors
  T *bound, *lw, *zw, *lq, *stats;                          // forward outputs (zw may be null)
  T *gz, *gloc, *gscale, *gploc, *gpscale, *glpx;           // backward outputs
  int bound_kind, estimator;
  int64_t M, K, B, L, Kc;
};

template <typename T>
MMVAE_ALWAYS_INLINE bool present(const Args<T>& p, int64_t m, int64_t b) {
  return p.mask == nullptr || p.mask[m * p.B + b];
}

// One item's present experts and the prior, with 1/scale and sum_l log scale precomputed.
template <typename T>
struct Item {
  std::vector<int64_t> present;  // expert indices present in this item
  std::vector<T> mu, inv, lss;   // [M * L], [M * L], [M]: sum_l log scale
  std::vector<T> pmu, pinv;      // [L]
  T plss = T(0), log_n = T(0);
};

template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void load_item(Item<T>& it, const Args<T>& p, int64_t b) {
  const int64_t M = p.M, B = p.B, L = p.L;
  it.present.clear();
  it.mu.assign(M * L, T(0));
  it.inv.assign(M * L, T(1));
  it.lss.assign(M, T(0));
  for (int64_t m = 0; m < M; ++m) {
    if (!present(p, m, b)) continue;
    it.present.push_back(m);
    T n = T(0);
    for (int64_t l = 0; l < L; ++l) {
      const T s = p.scale[(m * B + b) * L + l];
      it.mu[m * L + l] = p.loc[(m * B + b) * L + l];
      it.inv[m * L + l] = T(1) / s;
      n += std::log(s);
    }
    it.lss[m] = n;
  }
  it.log_n = std::log(T(it.present.empty() ? 1 : it.present.size()));
  it.pmu.resize(L);
  it.pinv.resize(L);
  it.plss = T(0);
  for (int64_t l = 0; l < L; ++l) {
    const T s = p.pscale[b * L + l];
    it.pmu[l] = p.ploc[b * L + l];
    it.pinv[l] = T(1) / s;
    it.plss += std::log(s);
  }
}

// x - x is 0 exactly for finite x (NaN for +-inf and NaN): a branch-free isfinite for SIMD loops.
template <typename T>
MMVAE_ALWAYS_INLINE bool finite(T x) {
  return x - x == T(0);
}

// The weight of lw in its slice's softmax from the slice's (max, log-sum): moe_wbar, vectorisable.
template <typename T>
MMVAE_ALWAYS_INLINE T wbar(T lw, T mx, T ls) {
  return mx == -std::numeric_limits<T>::infinity() ? T(0) : fast_exp((lw - mx) - ls);
}

// Per-thread scratch: a tile of z, the experts' log-densities of a tile, and the item's own lw, lq
// and pi_own rows (contiguous copies of the strided [M, K, B] rows).
template <typename T>
struct FwdScratch {
  std::vector<T> zt, a, lw, lq, pi_own;
  FwdScratch(int64_t M, int64_t K, int64_t L)
      : zt(L * kSampleTile), a((M + 1) * kSampleTile), lw(M * K), lq(M * K), pi_own(M * K) {}
};

template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void forward_item(const Args<T>& p, int64_t b, Item<T>& it, FwdScratch<T>& s) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L;
  const T ninf = -std::numeric_limits<T>::infinity();
  load_item<F, PF>(it, p, b);
  const auto& P = it.present;
  for (int64_t r = 0; r < M; ++r)
    if (!present(p, r, b))
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = (r * K + k) * B + b;
        p.lw[i] = ninf;
        p.lq[i] = T(0);
        if (p.zw != nullptr) p.zw[i] = T(0);
      }
  T* lpz = s.a.data() + M * kSampleTile;
  for (int64_t r : P)
    for (int64_t j0 = 0; j0 < K; j0 += kSampleTile) {
      const int64_t n = std::min(kSampleTile, K - j0);
      if (j0 + kSampleTile < K)
        prefetch_tile(p.z, r * K + j0 + kSampleTile, std::min(kSampleTile, K - j0 - kSampleTile), B, b, L);
      load_tile(p.z, r * K + j0, n, B, b, L, s.zt.data());
      for (int64_t m : P)
        tile_log_density<F>(s.zt.data(), &it.mu[m * L], &it.inv[m * L], it.lss[m], L, &s.a[m * kSampleTile]);
      tile_log_density<PF>(s.zt.data(), it.pmu.data(), it.pinv.data(), it.plss, L, lpz);
      T mx[kSampleTile], sum[kSampleTile], lse[kSampleTile];
#pragma omp simd
      for (int64_t j = 0; j < kSampleTile; ++j) mx[j] = ninf;
      for (int64_t m : P) {
        const T* am = &s.a[m * kSampleTile];
#pragma omp simd
        for (int64_t j = 0; j < kSampleTile; ++j) mx[j] = am[j] > mx[j] || am[j] != am[j] ? am[j] : mx[j];
      }
#pragma omp simd
      for (int64_t j = 0; j < kSampleTile; ++j) sum[j] = T(0);
      for (int64_t m : P) {
        const T* am = &s.a[m * kSampleTile];
#pragma omp simd
        for (int64_t j = 0; j < kSampleTile; ++j) sum[j] += fast_exp(am[j] - (finite(mx[j]) ? mx[j] : T(0)));
      }
      const T* ar = &s.a[r * kSampleTile];
      T* lw = &s.lw[r * K + j0];
      T* lq = &s.lq[r * K + j0];
      T* po = &s.pi_own[r * K + j0];
      T lpx[kSampleTile];
      for (int64_t j = 0; j < n; ++j) lpx[j] = p.lpx[((r * K + j0 + j) * B + b)];
    // the sum is >= 1 when the max is finite (its own term is 1); otherwise the lse is the max
#pragma omp simd
      for (int64_t j = 0; j < kSampleTile; ++j) lse[j] = finite(mx[j]) ? mx[j] + fast_log1p(sum[j] - T(1)) : mx[j];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        lq[j] = lse[j] - it.log_n;
        lw[j] = lpz[j] + lpx[j] - lq[j];
        po[j] = fast_exp(ar[j] - lse[j]);
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = (r * K + j0 + j) * B + b;
        p.lw[i] = lw[j];
        p.lq[i] = lq[j];
      }
    }
  // the slices' (max, log-sum): per group (looser) or over all present groups (stratified)
  auto slice_stats = [&](int64_t r_lo, int64_t r_hi, T* st) {
    T mx = ninf;
    for (int64_t r = r_lo; r < r_hi; ++r)
      if (present(p, r, b))
        for (int64_t k = 0; k < K; ++k) {
          const T v = s.lw[r * K + k];
          mx = v > mx || v != v ? v : mx;
        }
    // an infinite max gives (max, 0): all -inf, weights 0; +inf, the bound +inf and NaN weights
    T sum = T(0);
    if (!std::isinf(mx))
      for (int64_t r = r_lo; r < r_hi; ++r)
        if (present(p, r, b)) {
          const T* lw = &s.lw[r * K];
#pragma omp simd reduction(+ : sum)
          for (int64_t k = 0; k < K; ++k) sum += fast_exp(lw[k] - mx);
        }
    st[0] = mx;
    st[1] = std::isinf(mx) ? T(0) : std::log(sum);
  };
  const T n = T(P.empty() ? 1 : P.size());
  T value = T(0);
  if (p.bound_kind == kLooser) {
    for (int64_t r = 0; r < M; ++r) {
      T* st = p.stats + (r * B + b) * 2;
      if (p.lse_in != nullptr) {
        st[0] = p.lse_in[(r * B + b) * 2];
        st[1] = p.lse_in[(r * B + b) * 2 + 1];
      } else {
        slice_stats(r, r + 1, st);
      }
    }
    // the mean over experts as a sum of quotients: a sum of log-normalisers near -3e38 would overflow
    for (int64_t r : P) value += (p.stats[(r * B + b) * 2] + p.stats[(r * B + b) * 2 + 1]) / n;
    value -= std::log(T(p.Kc));
  } else {
    T* st = p.stats + b * 2;
    if (p.lse_in != nullptr) {
      st[0] = p.lse_in[b * 2];
      st[1] = p.lse_in[b * 2 + 1];
    } else {
      slice_stats(0, M, st);
    }
    value = st[0] + st[1] - std::log(n * T(p.Kc));
  }
  p.bound[b] = P.empty() ? T(0) : value;
  if (p.zw == nullptr) return;
  const bool eq8 = p.estimator == kEq8;
  for (int64_t r : P) {
    const T* st = p.stats + (p.bound_kind == kLooser ? r * B + b : b) * 2;
    const T mx = st[0], ls = st[1];
    T* lw = &s.lw[r * K];
    const T* po = &s.pi_own[r * K];
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {  // lw's row becomes z_weight's
      const T w = wbar(lw[k], mx, ls);
      lw[k] = eq8 ? w : T(1) - po[k] * (T(1) - w);
    }
    for (int64_t k = 0; k < K; ++k) p.zw[(r * K + k) * B + b] = lw[k];
  }
}

// Per-thread scratch of the backward: a tile of z and of its gradient, per-lane coefficients, and
// per-lane partial sums of the item's loc / scale gradients [M][L][kSampleTile] and the prior's [L][kSampleTile].
template <typename T>
struct BwdScratch {
  std::vector<T> zt, gzt, a, sc, gl, gs, gpl, gps;
  BwdScratch(int64_t M, int64_t L)
      : zt(L * kSampleTile),
        gzt(L * kSampleTile),
        a(M * kSampleTile),
        sc(M * kSampleTile),
        gl(M * L * kSampleTile),
        gs(M * L * kSampleTile),
        gpl(L * kSampleTile),
        gps(L * kSampleTile) {}
};

template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void backward_item(const Args<T>& p, int64_t b, Item<T>& it, BwdScratch<T>& s) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L;
  load_item<F, PF>(it, p, b);
  const auto& P = it.present;
  const bool looser = p.bound_kind == kLooser;
  const T n_b = T(P.empty() ? 1 : P.size());
  const T sg = p.g[b] / (looser ? n_b : T(1));
  const T c = T(1) / (T(p.Kc) * (looser ? T(1) : n_b));
  const int est = p.estimator;
  const bool alias = est == kMixture || est == kMixtureCentred;
  std::fill(s.gl.begin(), s.gl.end(), T(0));
  std::fill(s.gs.begin(), s.gs.end(), T(0));
  std::fill(s.gpl.begin(), s.gpl.end(), T(0));
  std::fill(s.gps.begin(), s.gps.end(), T(0));
  for (int64_t r = 0; r < M; ++r)
    if (!present(p, r, b))
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = (r * K + k) * B + b;
        p.glpx[i] = T(0);
        for (int64_t l = 0; l < L; ++l) p.gz[i * L + l] = T(0);
      }
  for (int64_t r : P) {
    const T* st = p.stats_in + (looser ? r * B + b : b) * 2;
    const T mx = st[0], ls = st[1];
    for (int64_t j0 = 0; j0 < K; j0 += kSampleTile) {
      const int64_t n = std::min(kSampleTile, K - j0);
      if (j0 + kSampleTile < K)
        prefetch_tile(p.z, r * K + j0 + kSampleTile, std::min(kSampleTile, K - j0 - kSampleTile), B, b, L);
      load_tile(p.z, r * K + j0, n, B, b, L, s.zt.data());
      T lw[kSampleTile], base[kSampleTile];
      for (int64_t j = 0; j < kSampleTile; ++j) {
        const int64_t i = (r * K + j0 + j) * B + b;
        lw[j] = j < n ? p.lw_in[i] : T(0);
        base[j] = j < n ? p.lq_in[i] + it.log_n : T(0);
      }
      // the estimator's coefficients per sample (moe_coef), 0 in the padding lanes
      T om[kSampleTile], s_own[kSampleTile], s_other[kSampleTile], al[kSampleTile];
#pragma omp simd
      for (int64_t j = 0; j < kSampleTile; ++j) {
        const T w = wbar(lw[j], mx, ls);
        const bool on = j < n;
        const T o = on ? sg * w : T(0);
        const T centred = on ? sg * (w - c) : T(0);
        om[j] = o;
        s_own[j] = est == kIwae ? o : T(0);
        s_other[j] = est == kIwae || est == kMixture ? o : est == kMixtureCentred ? centred : T(0);
        al[j] = est == kMixture ? o : est == kMixtureCentred ? centred : T(0);
      }
      for (int64_t j = 0; j < n; ++j) p.glpx[(r * K + j0 + j) * B + b] = om[j];
      // pi_m = q_m(z) / sum_m' q_m'(z) from the saved lq; sc_m = -score_m pi_m
      for (int64_t m : P) {
        T* am = &s.a[m * kSampleTile];
        T* scm = &s.sc[m * kSampleTile];
        tile_log_density<F>(s.zt.data(), &it.mu[m * L], &it.inv[m * L], it.lss[m], L, am);
        const T* sm = m == r ? s_own : s_other;
#pragma omp simd
        for (int64_t j = 0; j < kSampleTile; ++j) {
          am[j] = j < n ? fast_exp(am[j] - base[j]) : T(0);  // a becomes pi
          scm[j] = -sm[j] * am[j];
        }
      }
      T beta[kSampleTile];
      const T* pir = &s.a[r * kSampleTile];
#pragma omp simd
      for (int64_t j = 0; j < kSampleTile; ++j) beta[j] = -al[j] * pir[j];
      for (int64_t l = 0; l < L; ++l) {
        const T* zl = &s.zt[l * kSampleTile];
        // weighted_grad: a zero weight contributes 0, not 0 * inf = NaN (a collapsed expert's
        // derivative overflows at the samples it gives no mass)
        T sdA[kSampleTile];  // sum_m pi_m d log q_m / dz
#pragma omp simd
        for (int64_t j = 0; j < kSampleTile; ++j) sdA[j] = T(0);
        for (int64_t m : P) {
          const T lo = it.mu[m * L + l], iv = it.inv[m * L + l];
          const T* pim = &s.a[m * kSampleTile];
          const T* scm = &s.sc[m * kSampleTile];
          T* glm = &s.gl[(m * L + l) * kSampleTile];
          T* gsm = &s.gs[(m * L + l) * kSampleTile];
#pragma omp simd
          for (int64_t j = 0; j < kSampleTile; ++j) {
            const T u = (zl[j] - lo) * iv;
            const T d = dphi<F>(u);
            sdA[j] += weighted_grad(pim[j], -d * iv);
            glm[j] += weighted_grad(scm[j], d * iv);
            gsm[j] += weighted_grad(scm[j], (u * d - T(1)) * iv);
          }
        }
        if (alias) {  // -alias pi_r (dA_r - sum_m pi_m dA_m), through loc_r + scale_r eps
          const T lo = it.mu[r * L + l], iv = it.inv[r * L + l];
          T* glr = &s.gl[(r * L + l) * kSampleTile];
          T* gsr = &s.gs[(r * L + l) * kSampleTile];
#pragma omp simd
          for (int64_t j = 0; j < kSampleTile; ++j) {
            const T u = (zl[j] - lo) * iv;
            const T ga = weighted_grad(beta[j], -dphi<F>(u) * iv - sdA[j]);
            glr[j] += ga;
            gsr[j] += weighted_grad(ga, u);
          }
        }
        const T plo = it.pmu[l], piv = it.pinv[l];
        T* gzl = &s.gzt[l * kSampleTile];
        T* gpl = &s.gpl[l * kSampleTile];
        T* gps = &s.gps[l * kSampleTile];
#pragma omp simd
        for (int64_t j = 0; j < kSampleTile; ++j) {
          const T u = (zl[j] - plo) * piv;
          const T d = dphi<PF>(u);
          gzl[j] = weighted_grad(om[j], -d * piv - sdA[j]);
          gpl[j] += weighted_grad(om[j], d * piv);
          gps[j] += weighted_grad(om[j], (u * d - T(1)) * piv);
        }
      }
      store_tile(s.gzt.data(), r * K + j0, n, B, b, L, p.gz);
    }
  }
  auto lane_sum = [](const T* v) {
    T acc = T(0);
    for (int64_t j = 0; j < kSampleTile; ++j) acc += v[j];
    return acc;
  };
  for (int64_t m = 0; m < M; ++m)
    for (int64_t l = 0; l < L; ++l) {
      p.gloc[(m * B + b) * L + l] = lane_sum(&s.gl[(m * L + l) * kSampleTile]);
      p.gscale[(m * B + b) * L + l] = lane_sum(&s.gs[(m * L + l) * kSampleTile]);
    }
  for (int64_t l = 0; l < L; ++l) {
    p.gploc[b * L + l] = lane_sum(&s.gpl[l * kSampleTile]);
    p.gpscale[b * L + l] = lane_sum(&s.gps[l * kSampleTile]);
  }
}

template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void forward_range_t(const Args<T>& p, int64_t b0, int64_t b1) {
  Item<T> it;
  FwdScratch<T> s(p.M, p.K, p.L);
  for (int64_t b = b0; b < b1; ++b) forward_item<F, PF>(p, b, it, s);
}

template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void backward_range_t(const Args<T>& p, int64_t b0, int64_t b1) {
  Item<T> it;
  BwdScratch<T> s(p.M, p.L);
  for (int64_t b = b0; b < b1; ++b) backward_item<F, PF>(p, b, it, s);
}

// The families as template constants, expanded inside each per-ISA clone (a lambda would be
// compiled once, for the baseline ISA).
#define MMVAE_MOE_RUN(FN) MMVAE_DISPATCH_FAMILY(f, F, MMVAE_DISPATCH_FAMILY(pf, PF, FN<F, PF>(p, b0, b1)))

MMVAE_CPU_MULTIVERSION void fwd_f32(int f, int pf, const Args<float>& p, int64_t b0, int64_t b1) {
  MMVAE_MOE_RUN(forward_range_t);
}
MMVAE_CPU_MULTIVERSION void fwd_f64(int f, int pf, const Args<double>& p, int64_t b0, int64_t b1) {
  MMVAE_MOE_RUN(forward_range_t);
}
MMVAE_CPU_MULTIVERSION void bwd_f32(int f, int pf, const Args<float>& p, int64_t b0, int64_t b1) {
  MMVAE_MOE_RUN(backward_range_t);
}
MMVAE_CPU_MULTIVERSION void bwd_f64(int f, int pf, const Args<double>& p, int64_t b0, int64_t b1) {
  MMVAE_MOE_RUN(backward_range_t);
}
#undef MMVAE_MOE_RUN
void run_fwd(int f, int pf, const Args<float>& p, int64_t b0, int64_t b1) { fwd_f32(f, pf, p, b0, b1); }
void run_fwd(int f, int pf, const Args<double>& p, int64_t b0, int64_t b1) { fwd_f64(f, pf, p, b0, b1); }
void run_bwd(int f, int pf, const Args<float>& p, int64_t b0, int64_t b1) { bwd_f32(f, pf, p, b0, b1); }
void run_bwd(int f, int pf, const Args<double>& p, int64_t b0, int64_t b1) { bwd_f64(f, pf, p, b0, b1); }

// Items per thread chunk: about 1e5 density terms per chunk, so small problems stay on one thread.
int64_t item_grain(int64_t M, int64_t K, int64_t L) { return task_grain((M + 1) * M * K * L); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_estimator_cpu(
    const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& ploc,
    const at::Tensor& pscale, const at::Tensor& lpx, c10::string_view family, c10::string_view prior_family,
    c10::string_view bound, c10::string_view estimator, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& lse, c10::optional<int64_t> num_samples) {
  const MoEForward f = moe_forward_setup(z, loc, scale, ploc, pscale, lpx, family, prior_family, bound, estimator, mask,
                                         lse, num_samples);
  AT_DISPATCH_FLOATING_TYPES(f.z.scalar_type(), "moe_estimator_cpu", [&] {
    using T = scalar_t;  // float or double: the accumulation dtype is the input's
    Args<T> p{};
    p.z = f.z.data_ptr<T>(), p.loc = f.loc.data_ptr<T>(), p.scale = f.scale.data_ptr<T>();
    p.ploc = f.ploc.data_ptr<T>(), p.pscale = f.pscale.data_ptr<T>(), p.lpx = f.lpx.data_ptr<T>();
    p.lse_in = f.lse.defined() ? f.lse.data_ptr<T>() : nullptr;
    p.mask = f.mask.defined() ? f.mask.data_ptr<bool>() : nullptr;
    p.bound = f.bound.data_ptr<T>(), p.lw = f.lw.data_ptr<T>(), p.lq = f.lq.data_ptr<T>();
    p.zw = f.want_zw ? f.zw.data_ptr<T>() : nullptr, p.stats = f.stats.data_ptr<T>();
    p.bound_kind = f.bound_kind, p.estimator = f.estimator;
    p.M = f.M, p.K = f.K, p.B = f.B, p.L = f.L, p.Kc = f.Kc;
    at::parallel_for(0, f.B, item_grain(f.M, f.K, f.L),
                     [&](int64_t b0, int64_t b1) { run_fwd(f.fam, f.pfam, p, b0, b1); });
  });
  return f.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_estimator_backward_cpu(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& ploc,
    const at::Tensor& pscale, const c10::optional<at::Tensor>& mask, const at::Tensor& lw, const at::Tensor& lq,
    const at::Tensor& stats, c10::string_view family, c10::string_view prior_family, c10::string_view bound,
    c10::string_view estimator, c10::optional<int64_t> num_samples) {
  const MoEBackward q = moe_backward_setup(grad, z, loc, scale, ploc, pscale, mask, lw, lq, stats, family, prior_family,
                                           bound, estimator, num_samples);
  AT_DISPATCH_FLOATING_TYPES(q.z.scalar_type(), "moe_estimator_backward_cpu", [&] {
    using T = scalar_t;
    Args<T> p{};
    p.g = q.grad.data_ptr<T>(), p.z = q.z.data_ptr<T>(), p.loc = q.loc.data_ptr<T>(), p.scale = q.scale.data_ptr<T>();
    p.ploc = q.ploc.data_ptr<T>(), p.pscale = q.pscale.data_ptr<T>();
    p.mask = q.mask.defined() ? q.mask.data_ptr<bool>() : nullptr;
    p.lw_in = q.lw.data_ptr<T>(), p.lq_in = q.lq.data_ptr<T>(), p.stats_in = q.stats.data_ptr<T>();
    p.gz = q.gz.data_ptr<T>(), p.gloc = q.gloc.data_ptr<T>(), p.gscale = q.gscale.data_ptr<T>();
    p.gploc = q.gploc.data_ptr<T>(), p.gpscale = q.gpscale.data_ptr<T>(), p.glpx = q.glpx.data_ptr<T>();
    p.bound_kind = q.bound_kind, p.estimator = q.estimator;
    p.M = q.M, p.K = q.K, p.B = q.B, p.L = q.L, p.Kc = q.Kc;
    at::parallel_for(0, q.B, item_grain(q.M, q.K, q.L),
                     [&](int64_t b0, int64_t b1) { run_bwd(q.fam, q.pfam, p, b0, b1); });
  });
  return q.outputs();
}

}  // namespace mmvae_fast::cpu
