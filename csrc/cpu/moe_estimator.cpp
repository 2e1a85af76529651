// The MoE bound and its gradient estimators on CPU, forward and backward (docs/design.md 2, 2a;
// the oracle: mmvae_fast/reference/moe_estimator.py). One pass over the K x M samples of each item:
//   a[r, m]  = sum_l log q_m(z[r, k, b, l]),   lq = logsumexp_{m present} a - log n_b
//   lw       = log p(z) + lpx - lq,            bound from the per-slice (max, log-sum) of lw
// saving lw, lq and the slices' (max, log-sum): O(M K B). The backward recomputes a[r, :] per sample
// and writes the gradients of z, loc, scale, the prior's loc and scale and lpx directly.
//
// Both passes walk z in its own layout: a block of `span` adjacent items, one sample row at a time
// (z[r, k, b0:b0 + span, :], span * L contiguous numbers, and likewise the rows of lw, lq, lpx and
// every gradient), with SIMD loops over l and the vectorisable exp / log1p of fastmath.h. Walking
// one item's samples instead reads rows B * L apart (8 KB at B = 64, L = 32), a cache line and a
// page per sample: 2-3x slower. The parameter gradients accumulate in loc's layout over the
// samples, so nothing is transposed or reduced across lanes. (A backward with one (sample, item)
// pair per SIMD lane, each tile transposed to [l][pair], runs the same number of vector iterations
// at L = 32 and took 1.56x the instructions at (M, K, B, L) = (5, 300, 64, 32): the transposes in
// and out cost about 6 instructions a number, and per-lane weights replace per-item broadcasts and
// skips.) Blocks are independent (each owns its items' rows of every gradient): both passes run in
// parallel over them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
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
  const T* const* z;  // the experts' samples where the model made them: z[r] [K, B, L]
  const T *loc, *scale, *ploc, *pscale, *lpx, *lse_in;  // lse_in: the chunked path's (max, log-sum) pairs, or null
  const bool* mask;                                     // [M, B] or null
  const T* g;                                           // backward: the bound's gradient [B]
  const T *lw_in, *stats_in;        // backward: the forward's saved lw and stats (not lq: pi comes from each row's a)
  T *bound, *lw, *zw, *lq, *stats;  // forward outputs (zw may be null)
  T* const* gz;                     // backward: the z gradient per expert, gz[r] [K, B, L]
  T *gloc, *gscale, *gploc, *gpscale, *glpx;  // backward outputs
  int bound_kind, estimator;
  int64_t M, K, B, L, Kc;
  int64_t span;  // items per block

  const T* z_row(int64_t r, int64_t k, int64_t b) const { return z[r] + (k * B + b) * L; }  // z[r, k, b, :]
};

template <typename T>
MMVAE_ALWAYS_INLINE bool present(const Args<T>& p, int64_t m, int64_t b) {
  return p.mask == nullptr || p.mask[m * p.B + b];
}

// x - x is 0 exactly for finite x (NaN for +-inf and NaN): a branch-free isfinite for SIMD loops.
template <typename T>
MMVAE_ALWAYS_INLINE bool finite(T x) {
  return x - x == T(0);
}

// The weight of lw in its slice's softmax from the slice's (max, log-sum): moe_wbar, vectorisable.
// The exp is taken unconditionally (a select, not a branch, so loops over items vectorise).
template <typename T>
MMVAE_ALWAYS_INLINE T wbar(T lw, T mx, T ls) {
  const T e = fast_exp((lw - mx) - ls);
  return mx == -std::numeric_limits<T>::infinity() ? T(0) : e;
}

// A block of items [b0, b0 + nb) and their parameters in z's row layout ([item][l]), with 1/scale
// and sum_l log scale precomputed. Experts absent from an item get loc 0, scale 1 here and weight 0
// in every result (selects, not products: the caller's values there may be NaN).
template <typename T>
struct Block {
  int64_t b0 = 0, nb = 0;
  std::vector<T> mu, inv, lss;                 // [M][span][L], [M][span][L], [M][span]
  std::vector<char> on;                        // [M][span]: expert m present in item i
  std::vector<T> pmu, pinv, plss, log_n, n_b;  // [span][L], [span][L], [span], [span], [span]
  Block(int64_t M, int64_t S, int64_t L)
      : mu(M * S * L), inv(M * S * L), lss(M * S), on(M * S), pmu(S * L), pinv(S * L), plss(S), log_n(S), n_b(S) {}
};

template <typename T>
MMVAE_ALWAYS_INLINE void load_block(Block<T>& blk, const Args<T>& p, int64_t b0) {
  const int64_t M = p.M, B = p.B, L = p.L, S = p.span;
  blk.b0 = b0;
  blk.nb = std::min(S, B - b0);
  for (int64_t i = 0; i < blk.nb; ++i) {
    const int64_t b = b0 + i;
    int64_t n = 0;
    for (int64_t m = 0; m < M; ++m) {
      const bool on = present(p, m, b);
      blk.on[m * S + i] = on;
      n += on;
      T ls = T(0);
      for (int64_t l = 0; l < L; ++l) {
        const T s = on ? p.scale[(m * B + b) * L + l] : T(1);
        blk.mu[(m * S + i) * L + l] = on ? p.loc[(m * B + b) * L + l] : T(0);
        blk.inv[(m * S + i) * L + l] = T(1) / s;
        ls += std::log(s);
      }
      blk.lss[m * S + i] = ls;
    }
    blk.n_b[i] = T(n == 0 ? 1 : n);
    blk.log_n[i] = std::log(blk.n_b[i]);
    T ls = T(0);
    for (int64_t l = 0; l < L; ++l) {
      const T s = p.pscale[b * L + l];
      blk.pmu[i * L + l] = p.ploc[b * L + l];
      blk.pinv[i * L + l] = T(1) / s;
      ls += std::log(s);
    }
    blk.plss[i] = ls;
  }
}

// a[i] = sum_l log f(z[i][l]; mu[i][l], 1 / inv[i][l]) - lss[i] for the nb rows of one sample.
template <int F, typename T>
MMVAE_ALWAYS_INLINE void rows_log_density(const T* z, const T* mu, const T* inv, const T* lss, int64_t nb, int64_t L,
                                          T* a) {
  for (int64_t i = 0; i < nb; ++i) {
    const T *zi = z + i * L, *lo = mu + i * L, *iv = inv + i * L;
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t l = 0; l < L; ++l) acc += log_density_unscaled<F, T>(zi[l], lo[l], iv[l]);
    a[i] = acc - lss[i];
  }
}

// Forward tiles: kt adjacent samples of the block's nb items, kt * nb >= kTilePairs (sample, item)
// pairs, so the per-pair logsumexp runs over whole SIMD registers even at small B (at nb = B the
// tile's rows are one contiguous run).
constexpr int64_t kTilePairs = kSampleTile;

template <typename T>
struct FwdScratch {
  std::vector<T> a;          // [M + 1][pairs]: the experts' and the prior's log-densities of a tile
  std::vector<int64_t> row;  // [pairs]: the pair's row in [M, K, B]
  std::vector<T> zt;         // B = 1: the tile's samples transposed, [L][kSampleTile]
  int64_t pairs;
  FwdScratch(int64_t M, int64_t S, int64_t L, int64_t B) : pairs(std::max<int64_t>(S, kTilePairs / S * S)) {
    a.resize((M + 1) * pairs);
    row.resize(pairs);
    if (B == 1) zt.resize(L * kSampleTile);
  }
};

// Samples [k0, k0 + kt) of expert r for the block's items: lw and lq, and pi_own into zw's rows
// (made the weights by forward_finish). Pair j is sample k0 + j / nb of item j % nb.
template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void forward_tile(const Args<T>& p, const Block<T>& blk, FwdScratch<T>& s, int64_t r, int64_t k0,
                                      int64_t kt) {
  const int64_t M = p.M, L = p.L, S = p.span, nb = blk.nb, P = s.pairs, n = kt * nb;
  const T ninf = -std::numeric_limits<T>::infinity();
  int64_t* row = s.row.data();
  for (int64_t q = 0; q < kt; ++q)
    for (int64_t i = 0; i < nb; ++i) row[q * nb + i] = (r * p.K + k0 + q) * p.B + blk.b0 + i;
  if (p.B == 1) {
    // One item: a row is then one sample's L numbers, and its sum would end in a horizontal add.
    // The tile's kt <= kSampleTile samples are transposed instead (mixture_rows.h), so the sums
    // over l run across SIMD registers of samples. (B only, not the block: the numbers must not
    // depend on the thread count.)
    T* zt = s.zt.data();
    load_tile(p.z[r], k0, kt, p.B, blk.b0, L, zt);
    for (int64_t m = 0; m < M; ++m)
      tile_log_density<F>(zt, &blk.mu[m * S * L], &blk.inv[m * S * L], blk.lss[m * S], L, &s.a[m * P]);
    tile_log_density<PF>(zt, blk.pmu.data(), blk.pinv.data(), blk.plss[0], L, &s.a[M * P]);
  } else {
    for (int64_t q = 0; q < kt; ++q) {
      const T* z = p.z_row(r, k0 + q, blk.b0);
      for (int64_t m = 0; m < M; ++m)
        rows_log_density<F>(z, &blk.mu[m * S * L], &blk.inv[m * S * L], &blk.lss[m * S], nb, L, &s.a[m * P + q * nb]);
      rows_log_density<PF>(z, blk.pmu.data(), blk.pinv.data(), blk.plss.data(), nb, L, &s.a[M * P + q * nb]);
    }
  }
  T mx[kTilePairs], sum[kTilePairs], lse[kTilePairs];
  for (int64_t j0 = 0; j0 < n; j0 += kTilePairs) {  // more than kTilePairs pairs only when nb > kTilePairs
    const int64_t w = std::min(kTilePairs, n - j0);
    for (int64_t m = 0; p.mask != nullptr && m < M; ++m) {  // absent experts (a mask): no mass
      T* am = &s.a[m * P + j0];
      const char* on = &blk.on[m * S];
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) am[j] = on[(j0 + j) % nb] ? am[j] : ninf;
    }
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) mx[j] = ninf, sum[j] = T(0);
    for (int64_t m = 0; m < M; ++m) {
      const T* am = &s.a[m * P + j0];
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) mx[j] = nan_max(mx[j], am[j]);
    }
    for (int64_t m = 0; m < M; ++m) {
      const T* am = &s.a[m * P + j0];
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) sum[j] += fast_exp(am[j] - lse_shift(mx[j]));
    }
    // the sum is >= 1 when the max is finite (its own term is 1); otherwise the lse is the max
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) lse[j] = finite(mx[j]) ? mx[j] + fast_log1p(sum[j] - T(1)) : mx[j];
    const T* ar = &s.a[r * P + j0];
    const T* lpz = &s.a[M * P + j0];
    const char* own = &blk.on[r * S];
    for (int64_t j = 0; j < w; ++j) {
      const int64_t i = (j0 + j) % nb, at = row[j0 + j];
      const T lq = own[i] ? lse[j] - blk.log_n[i] : T(0);
      p.lq[at] = lq;
      p.lw[at] = own[i] ? lpz[j] + p.lpx[at] - lq : ninf;
      // pi_own = exp(a_r - max) / sum: exact at any |a| (exp(a_r - lse) is not: a float32 lse ~ -5e7
      // cannot hold max + log 2)
      const T pi = finite(mx[j]) ? fast_exp(ar[j] - mx[j]) / sum[j] : fast_exp(ar[j] - lse[j]);
      if (p.zw != nullptr) p.zw[at] = own[i] ? pi : T(0);
    }
  }
}

// The block's slices' (max, log-sum), its items' bounds, and their z weights (from pi_own, left in
// zw by the tiles). Absent experts' rows hold lw = -inf, which moves neither a max nor a sum.
template <typename T>
MMVAE_ALWAYS_INLINE void forward_finish(const Args<T>& p, const Block<T>& blk) {
  const int64_t M = p.M, K = p.K, B = p.B, S = p.span, b0 = blk.b0, nb = blk.nb;
  const T ninf = -std::numeric_limits<T>::infinity();
  const bool looser = p.bound_kind == kLooser;
  const int64_t slices = looser ? M : 1;
  std::vector<T> mx(slices * S, ninf), ls(slices * S, T(0));  // [slice][item]
  if (p.lse_in != nullptr) {
    for (int64_t q = 0; q < slices; ++q)
      for (int64_t i = 0; i < nb; ++i) {
        mx[q * S + i] = p.lse_in[(q * B + b0 + i) * 2];
        ls[q * S + i] = p.lse_in[(q * B + b0 + i) * 2 + 1];
      }
  } else {
    for (int64_t r = 0; r < M; ++r) {
      T* m = &mx[(looser ? r : 0) * S];
      for (int64_t k = 0; k < K; ++k) {
        const T* row = p.lw + (r * K + k) * B + b0;
#pragma omp simd
        for (int64_t i = 0; i < nb; ++i) m[i] = nan_max(m[i], row[i]);
      }
    }
    // an infinite max gives (max, 0): all -inf, weights 0; +inf, the bound +inf and NaN weights
    std::vector<T> shift(slices * S);
    for (int64_t q = 0; q < slices * S; ++q) shift[q] = lse_shift(mx[q]);
    for (int64_t r = 0; r < M; ++r) {
      const T* c = &shift[(looser ? r : 0) * S];
      T* sm = &ls[(looser ? r : 0) * S];
      for (int64_t k = 0; k < K; ++k) {
        const T* row = p.lw + (r * K + k) * B + b0;
#pragma omp simd
        for (int64_t i = 0; i < nb; ++i) sm[i] += fast_exp(row[i] - c[i]);
      }
    }
    for (int64_t q = 0; q < slices * S; ++q) ls[q] = std::isinf(mx[q]) ? T(0) : std::log(ls[q]);
  }
  for (int64_t q = 0; q < slices; ++q)
    for (int64_t i = 0; i < nb; ++i) {
      p.stats[(q * B + b0 + i) * 2] = mx[q * S + i];
      p.stats[(q * B + b0 + i) * 2 + 1] = ls[q * S + i];
    }
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t b = b0 + i;
    int64_t n_present = 0;
    for (int64_t r = 0; r < M; ++r) n_present += blk.on[r * S + i];
    const T n = T(n_present == 0 ? 1 : n_present);
    T value = T(0);
    if (looser) {
      // the mean over experts as a sum of quotients: a sum of log-normalisers near -3e38 would overflow
      for (int64_t r = 0; r < M; ++r)
        if (blk.on[r * S + i]) value += (mx[r * S + i] + ls[r * S + i]) / n;
      value -= std::log(T(p.Kc));
    } else {
      value = mx[i] + ls[i] - std::log(n * T(p.Kc));
    }
    p.bound[b] = n_present == 0 ? T(0) : value;
  }
  if (p.zw == nullptr) return;
  const bool eq8 = p.estimator == kEq8;
  for (int64_t r = 0; r < M; ++r) {
    const T* m = &mx[(looser ? r : 0) * S];
    const T* sm = &ls[(looser ? r : 0) * S];
    const char* own = &blk.on[r * S];
    for (int64_t k = 0; k < K; ++k) {
      const T* lw = p.lw + (r * K + k) * B + b0;
      T* zw = p.zw + (r * K + k) * B + b0;  // holds pi_own
      if (eq8) {  // two loops: a select on the loop-invariant eq8 kept GCC from vectorising one
#pragma omp simd
        for (int64_t i = 0; i < nb; ++i) {
          const T w = wbar(lw[i], m[i], sm[i]);
          zw[i] = own[i] ? w : T(0);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < nb; ++i) {
          const T w = wbar(lw[i], m[i], sm[i]);
          zw[i] = own[i] ? T(1) - zw[i] * (T(1) - w) : T(0);
        }
      }
    }
  }
}

// Per-thread scratch of the backward: per-item densities, responsibilities and coefficients of one
// sample row, and the block's parameter gradients in loc's layout, accumulated over the samples.
template <typename T>
struct BwdScratch {
  std::vector<T> pi, sc, coef, gdiv, cc, zero, sdA, gl, gs, gpl, gps;
  BwdScratch(int64_t M, int64_t S, int64_t L)
      : pi(M * S),
        sc(M * S),
        coef(4 * S),
        gdiv(S),
        cc(S),
        zero(S),
        sdA(L),
        gl(M * S * L),
        gs(M * S * L),
        gpl(S * L),
        gps(S * L) {}
};

// Sample k of expert r for the block's items: its rows of the z and lpx gradients, and its terms of
// the parameter gradients.
template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void backward_row(const Args<T>& p, const Block<T>& blk, BwdScratch<T>& s, int64_t r, int64_t k) {
  const int64_t M = p.M, B = p.B, L = p.L, S = p.span, nb = blk.nb;
  const int64_t row = (r * p.K + k) * B + blk.b0;
  const T* z = p.z_row(r, k, blk.b0);
  const bool looser = p.bound_kind == kLooser;
  const int est = p.estimator;
  const bool alias = est == kMixture || est == kMixtureCentred;
  const char* own = &blk.on[r * S];
  // the estimator's coefficients per item (moe_coef), 0 where expert r is absent: o = g wbar and
  // its centred form g (wbar - c). Every loop over the block's items below is branch-free (selects
  // on per-item values: a select on a loop-invariant flag, or a load under a condition, kept GCC
  // from vectorising them), so it runs over SIMD registers of items.
  T* om = &s.coef[0];
  T* ce = &s.coef[S];
  T* amax = &s.coef[2 * S];  // per item: the max log-density over the present experts
  T* norm = &s.coef[3 * S];  // per item: sum_m exp(a_m - max), then its inverse
  const T* zero = s.zero.data();
  const T* al = est == kMixture ? om : est == kMixtureCentred ? ce : zero;  // the own alias's weight
  const T* s_own = est == kIwae ? om : zero;                                // the experts' score weights
  const T* s_other = est == kIwae || est == kMixture ? om : est == kMixtureCentred ? ce : zero;
  const T* st = p.stats_in + (looser ? r * B : 0) * 2;
  const T* lw = p.lw_in + row;
  const T* g = p.g + blk.b0;
  const T *gdiv = s.gdiv.data(), *cc = s.cc.data();
#pragma omp simd
  for (int64_t i = 0; i < nb; ++i) {
    const T* sti = st + (blk.b0 + i) * 2;
    const T wv = wbar(lw[i], sti[0], sti[1]), gi = g[i] / gdiv[i];
    const bool on = own[i] != 0;
    const T w = on ? wv : T(0), sg = on ? gi : T(0);
    const T o = sg * w;
    om[i] = o;
    ce[i] = sg * (w - cc[i]);
    p.glpx[row + i] = o;
  }
  // pi_m = q_m(z) / sum_m' q_m'(z) over the present experts, as exp(a_m - max) / sum_m' exp(a_m' - max)
  // from this row's log-densities: exact at any |a| (a single rounded log-sum-exp, the saved lq
  // or one recomputed, cannot hold a + log 2 at |a| ~ 5e7 in float32, and made two tied experts'
  // pi 1 each); sc_m = -score_m pi_m
  for (int64_t m = 0; m < M; ++m)
    rows_log_density<F>(z, &blk.mu[m * S * L], &blk.inv[m * S * L], &blk.lss[m * S], nb, L, &s.pi[m * S]);
  const T ninf = -std::numeric_limits<T>::infinity();
#pragma omp simd
  for (int64_t i = 0; i < nb; ++i) amax[i] = ninf, norm[i] = T(0);
  for (int64_t m = 0; m < M; ++m) {
    const T* am = &s.pi[m * S];
    const char* on = &blk.on[m * S];
#pragma omp simd
    for (int64_t i = 0; i < nb; ++i) amax[i] = nan_max(amax[i], on[i] ? am[i] : ninf);
  }
  for (int64_t m = 0; m < M; ++m) {  // a becomes exp(a - max) (exp(a - max) alone where the max is infinite)
    T* pim = &s.pi[m * S];
    const char* on = &blk.on[m * S];
#pragma omp simd
    for (int64_t i = 0; i < nb; ++i) {
      const T e = fast_exp(pim[i] - amax[i]);
      const T v = (own[i] & on[i]) ? e : T(0);  // &, not &&: no branch in the SIMD loop
      pim[i] = v;
      norm[i] += v;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < nb; ++i)  // 0 where r is absent (all 0); unnormalised where the max is not finite
    norm[i] = !finite(amax[i]) ? T(1) : norm[i] > T(0) ? T(1) / norm[i] : T(0);
  for (int64_t m = 0; m < M; ++m) {
    T* pim = &s.pi[m * S];
    T* scm = &s.sc[m * S];
    const T* score = m == r ? s_own : s_other;
#pragma omp simd
    for (int64_t i = 0; i < nb; ++i) {
      pim[i] *= norm[i];
      scm[i] = -score[i] * pim[i];
    }
  }
  T* gz = p.gz[r] + (k * B + blk.b0) * L;
  T* sdA = s.sdA.data();  // sum_m pi_m d log q_m / dz over one item's row
  for (int64_t i = 0; i < nb; ++i) {
    const T* zi = z + i * L;
    // A zero weight contributes exactly 0, not 0 * inf = NaN (weighted_grad: a collapsed expert's
    // derivative overflows at the samples it gives no mass). These weights are per item, so a zero
    // one skips its loop and a nonzero (or NaN) one multiplies.
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) sdA[l] = T(0);
    for (int64_t m = 0; m < M; ++m) {
      const T* lo = &blk.mu[(m * S + i) * L];
      const T* iv = &blk.inv[(m * S + i) * L];
      const T pim = s.pi[m * S + i], scm = s.sc[m * S + i];
      T* glm = &s.gl[(m * S + i) * L];
      T* gsm = &s.gs[(m * S + i) * L];
      if (scm == T(0)) {  // no score term (the own expert of the mixture estimators, eq8, released)
        if (pim == T(0)) continue;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) sdA[l] += pim * (-dphi<F>((zi[l] - lo[l]) * iv[l]) * iv[l]);
        continue;
      }
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const T u = (zi[l] - lo[l]) * iv[l];
        const T d = dphi<F>(u);
        if (pim != T(0)) sdA[l] += pim * (-d * iv[l]);  // pi 0 with a score weight: a NaN upstream
        glm[l] += scm * (d * iv[l]);
        gsm[l] += scm * ((u * d - T(1)) * iv[l]);
      }
    }
    const T beta = -al[i] * s.pi[r * S + i];
    if (alias && beta != T(0)) {  // -alias pi_r (dA_r - sum_m pi_m dA_m), through loc_r + scale_r eps
      const T* lo = &blk.mu[(r * S + i) * L];
      const T* iv = &blk.inv[(r * S + i) * L];
      T* glr = &s.gl[(r * S + i) * L];
      T* gsr = &s.gs[(r * S + i) * L];
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const T u = (zi[l] - lo[l]) * iv[l];
        const T ga = beta * (-dphi<F>(u) * iv[l] - sdA[l]);
        glr[l] += ga;
        gsr[l] += weighted_grad(ga, u);
      }
    }
    const T* plo = &blk.pmu[i * L];
    const T* piv = &blk.pinv[i * L];
    T* gzi = gz + i * L;
    T* gpl = &s.gpl[i * L];
    T* gps = &s.gps[i * L];
    const T o = om[i];
    if (o == T(0)) {
      std::fill_n(gzi, L, T(0));
      continue;
    }
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const T u = (zi[l] - plo[l]) * piv[l];
      const T d = dphi<PF>(u);
      gzi[l] = o * (-d * piv[l] - sdA[l]);
      gpl[l] += o * (d * piv[l]);
      gps[l] += o * ((u * d - T(1)) * piv[l]);
    }
  }
}

// The blocks [q0, q1) of span items each. (No lambdas around the rows: a lambda's body is compiled
// once, for the baseline ISA, not per clone.)
template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void forward_range_t(const Args<T>& p, int64_t q0, int64_t q1) {
  Block<T> blk(p.M, p.span, p.L);
  FwdScratch<T> s(p.M, p.span, p.L, p.B);
  for (int64_t q = q0; q < q1; ++q) {
    load_block(blk, p, q * p.span);
    const int64_t kt = s.pairs / blk.nb;  // samples per tile
    for (int64_t r = 0; r < p.M; ++r)
      for (int64_t k0 = 0; k0 < p.K; k0 += kt) forward_tile<F, PF>(p, blk, s, r, k0, std::min(kt, p.K - k0));
    forward_finish(p, blk);
  }
}

template <int F, int PF, typename T>
MMVAE_ALWAYS_INLINE void backward_range_t(const Args<T>& p, int64_t q0, int64_t q1) {
  const int64_t M = p.M, B = p.B, L = p.L, S = p.span;
  Block<T> blk(M, S, L);
  BwdScratch<T> s(M, S, L);
  for (int64_t q = q0; q < q1; ++q) {
    load_block(blk, p, q * S);
    // per item: the bound's gradient is divided by gdiv (the looser bound's mean over the present
    // experts), and the centred estimators subtract c = 1 / (samples in the item's softmax)
    const bool looser = p.bound_kind == kLooser;
    for (int64_t i = 0; i < blk.nb; ++i) {
      s.gdiv[i] = looser ? blk.n_b[i] : T(1);
      s.cc[i] = T(1) / (T(p.Kc) * (looser ? T(1) : blk.n_b[i]));
    }
    std::fill(s.gl.begin(), s.gl.end(), T(0));
    std::fill(s.gs.begin(), s.gs.end(), T(0));
    std::fill(s.gpl.begin(), s.gpl.end(), T(0));
    std::fill(s.gps.begin(), s.gps.end(), T(0));
    for (int64_t r = 0; r < M; ++r)
      for (int64_t k = 0; k < p.K; ++k) backward_row<F, PF>(p, blk, s, r, k);
    // the accumulators are in loc's layout: the block's items are nb * L contiguous numbers
    const int64_t n = blk.nb * L;
    for (int64_t m = 0; m < M; ++m) {
      std::copy_n(&s.gl[m * S * L], n, p.gloc + (m * B + blk.b0) * L);
      std::copy_n(&s.gs[m * S * L], n, p.gscale + (m * B + blk.b0) * L);
    }
    std::copy_n(s.gpl.data(), n, p.gploc + blk.b0 * L);
    std::copy_n(s.gps.data(), n, p.gpscale + blk.b0 * L);
  }
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

// Items per block: about kBlockRow numbers per sample row (a few KB, contiguous), fewer where
// that leaves a thread without a block. The results do not depend on it: every item's sums run
// over its samples in order.
constexpr int64_t kBlockRow = 1024;
int64_t item_span(int64_t B, int64_t L) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t span = std::max<int64_t>(1, kBlockRow / std::max<int64_t>(1, L));
  return std::max<int64_t>(1, std::min({span, B, (B + threads - 1) / threads}));
}

// Blocks per thread chunk: about 1e5 density terms per chunk, so small problems stay on one thread.
int64_t block_grain(int64_t M, int64_t K, int64_t L, int64_t span) {
  return std::max<int64_t>(1, task_grain((M + 1) * M * K * L) / span);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_estimator_cpu(
    at::TensorList z, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& ploc, const at::Tensor& pscale,
    const at::Tensor& lpx, c10::string_view family, c10::string_view prior_family, c10::string_view bound,
    c10::string_view estimator, const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& lse,
    c10::optional<int64_t> num_samples) {
  const MoEForward f = moe_forward_setup(z, loc, scale, ploc, pscale, lpx, family, prior_family, bound, estimator, mask,
                                         lse, num_samples);
  AT_DISPATCH_FLOATING_TYPES(f.z[0].scalar_type(), "moe_estimator_cpu", [&] {
    using T = scalar_t;  // float or double: the accumulation dtype is the input's
    Args<T> p{};
    std::vector<const T*> zr;
    for (const auto& t : f.z) zr.push_back(t.const_data_ptr<T>());
    p.z = zr.data(), p.loc = f.loc.data_ptr<T>(), p.scale = f.scale.data_ptr<T>();
    p.ploc = f.ploc.data_ptr<T>(), p.pscale = f.pscale.data_ptr<T>(), p.lpx = f.lpx.data_ptr<T>();
    p.lse_in = f.lse.defined() ? f.lse.data_ptr<T>() : nullptr;
    p.mask = f.mask.defined() ? f.mask.data_ptr<bool>() : nullptr;
    p.bound = f.bound.data_ptr<T>(), p.lw = f.lw.data_ptr<T>(), p.lq = f.lq.data_ptr<T>();
    p.zw = f.want_zw ? f.zw.data_ptr<T>() : nullptr, p.stats = f.stats.data_ptr<T>();
    p.bound_kind = f.bound_kind, p.estimator = f.estimator;
    p.M = f.M, p.K = f.K, p.B = f.B, p.L = f.L, p.Kc = f.Kc, p.span = item_span(f.B, f.L);
    at::parallel_for(0, (p.B + p.span - 1) / p.span, block_grain(p.M, p.K, p.L, p.span),
                     [&](int64_t b0, int64_t b1) { run_fwd(f.fam, f.pfam, p, b0, b1); });
  });
  return f.outputs();
}

MoEBackward::Outputs moe_estimator_backward_cpu(const at::Tensor& grad, at::TensorList z, const at::Tensor& loc,
                                                const at::Tensor& scale, const at::Tensor& ploc,
                                                const at::Tensor& pscale, const c10::optional<at::Tensor>& mask,
                                                const at::Tensor& lw, const at::Tensor& lq, const at::Tensor& stats,
                                                c10::string_view family, c10::string_view prior_family,
                                                c10::string_view bound, c10::string_view estimator,
                                                c10::optional<int64_t> num_samples) {
  const MoEBackward q = moe_backward_setup(grad, z, loc, scale, ploc, pscale, mask, lw, lq, stats, family, prior_family,
                                           bound, estimator, num_samples);
  AT_DISPATCH_FLOATING_TYPES(q.z[0].scalar_type(), "moe_estimator_backward_cpu", [&] {
    using T = scalar_t;
    Args<T> p{};
    std::vector<const T*> zr;
    for (const auto& t : q.z) zr.push_back(t.const_data_ptr<T>());
    p.g = q.grad.data_ptr<T>(), p.z = zr.data(), p.loc = q.loc.data_ptr<T>(), p.scale = q.scale.data_ptr<T>();
    p.ploc = q.ploc.data_ptr<T>(), p.pscale = q.pscale.data_ptr<T>();
    p.mask = q.mask.defined() ? q.mask.data_ptr<bool>() : nullptr;
    p.lw_in = q.lw.data_ptr<T>(), p.stats_in = q.stats.data_ptr<T>();
    std::vector<T*> gzr;
    for (const auto& t : q.gz) gzr.push_back(t.data_ptr<T>());
    p.gz = gzr.data(), p.gloc = q.gloc.data_ptr<T>(), p.gscale = q.gscale.data_ptr<T>();
    p.gploc = q.gploc.data_ptr<T>(), p.gpscale = q.gpscale.data_ptr<T>(), p.glpx = q.glpx.data_ptr<T>();
    p.bound_kind = q.bound_kind, p.estimator = q.estimator;
    p.M = q.M, p.K = q.K, p.B = q.B, p.L = q.L, p.Kc = q.Kc, p.span = item_span(q.B, q.L);
    at::parallel_for(0, (p.B + p.span - 1) / p.span, block_grain(p.M, p.K, p.L, p.span),
                     [&](int64_t b0, int64_t b1) { run_bwd(q.fam, q.pfam, p, b0, b1); });
  });
  return q.outputs();
}

}  // namespace mmvae_fast::cpu
