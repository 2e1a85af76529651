// The MoE bound and its gradient estimators on CPU, forward and backward (docs/design.md 2, 2a;
// the oracle: mmvae_fast/reference/moe_estimator.py). One pass over the K x M samples of each item:
//   a[r, m]  = sum_l log q_m(z[r, k, b, l]),   lq = logsumexp_{m present} a - log n_b
//   lw       = log p(z) + lpx - lq,            bound from the per-slice (max, log-sum) of lw
// saving lw, lq and the slices' (max, log-sum): O(M K B). The backward recomputes a[r, :] per sample
// and writes the gradients of z, loc, scale, the prior's loc and scale and lpx directly. Items are
// independent (each owns its rows of every gradient), so both passes run in parallel over b.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "mmvae_fast/host.h"
#include "mmvae_fast/moe_estimator.h"

namespace mmvae_fast::cpu {
namespace {

int family_code(c10::string_view f) {
  if (f == "normal") return kNormal;
  if (f == "laplace") return kLaplace;
  TORCH_CHECK(false, "moe_estimator: family must be 'normal' or 'laplace', got '", std::string(f), "'");
}

int bound_code(c10::string_view b) {
  if (b == "looser") return kLooser;
  if (b == "stratified") return kStratified;
  TORCH_CHECK(false, "moe_estimator: bound must be 'looser' or 'stratified', got '", std::string(b), "'");
}

int estimator_code(c10::string_view e) {
  if (e == "iwae") return kIwae;
  if (e == "eq8") return kEq8;
  if (e == "mixture") return kMixture;
  if (e == "mixture-centred") return kMixtureCentred;
  if (e == "released") return kReleased;
  TORCH_CHECK(false, "moe_estimator: unknown estimator '", std::string(e), "'");
}

// One item's experts and prior, with 1/scale and the log-normalisers precomputed.
template <typename T>
struct Item {
  std::vector<int64_t> present;  // expert indices present in this item
  std::vector<T> mu, inv, norm;  // [M * L], [M * L], [M]: sum_l log scale + L const
  std::vector<T> pmu, pinv;      // [L]
  T pnorm = T(0), log_n = T(0);
};

template <typename T, typename S>
void load_item(Item<T>& it, int64_t b, int64_t M, int64_t B, int64_t L, const S* loc, const S* scale, const S* ploc,
               const S* pscale, const bool* mask, int fam, int pfam) {
  it.present.clear();
  it.mu.assign(M * L, T(0));
  it.inv.assign(M * L, T(1));
  it.norm.assign(M, T(0));
  for (int64_t m = 0; m < M; ++m) {
    if (mask != nullptr && !mask[m * B + b]) continue;
    it.present.push_back(m);
    T n = T(L) * moe_log_const<T>(fam);
    for (int64_t l = 0; l < L; ++l) {
      const T s = T(scale[(m * B + b) * L + l]);
      it.mu[m * L + l] = T(loc[(m * B + b) * L + l]);
      it.inv[m * L + l] = T(1) / s;
      n += std::log(s);
    }
    it.norm[m] = n;
  }
  it.log_n = std::log(T(it.present.empty() ? 1 : it.present.size()));
  it.pmu.resize(L);
  it.pinv.resize(L);
  it.pnorm = T(L) * moe_log_const<T>(pfam);
  for (int64_t l = 0; l < L; ++l) {
    const T s = T(pscale[b * L + l]);
    it.pmu[l] = T(ploc[b * L + l]);
    it.pinv[l] = T(1) / s;
    it.pnorm += std::log(s);
  }
}

// sum_l log f(z_l; mu_l, 1/inv_l) = -sum_l phi(u_l) - norm
template <int F, typename T, typename S>
inline T row_log_density(const S* z, const T* mu, const T* inv, T norm, int64_t L) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t l = 0; l < L; ++l) acc += moe_phi<F>((T(z[l]) - mu[l]) * inv[l]);
  return -acc - norm;
}

template <int F, int PF, typename T, typename S>
void forward_kernel(const S* z, const S* loc, const S* scale, const S* ploc, const S* pscale, const T* lpx,
                    const bool* mask, const T* lse_in, int bound, int estimator, int64_t M, int64_t K, int64_t B,
                    int64_t L, int64_t Kc, T* out_bound, T* lw, T* zw, T* lq, T* stats) {
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Item<T> it;
    std::vector<T> a(M), pi_own(M * K);
    for (int64_t b = b0; b < b1; ++b) {
      load_item(it, b, M, B, L, loc, scale, ploc, pscale, mask, F, PF);
      const auto& P = it.present;
      for (int64_t r = 0; r < M; ++r)
        if (mask != nullptr && !mask[r * B + b])
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = (r * K + k) * B + b;
            lw[i] = ninf;
            lq[i] = T(0);
            if (zw != nullptr) zw[i] = T(0);
          }
      for (int64_t r : P)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = (r * K + k) * B + b;
          const S* zr = z + i * L;
          T mx = ninf;
          for (int64_t m : P) {
            a[m] = row_log_density<F>(zr, it.mu.data() + m * L, it.inv.data() + m * L, it.norm[m], L);
            mx = a[m] > mx || a[m] != a[m] ? a[m] : mx;
          }
          const T shift = std::isfinite(mx) ? mx : T(0);
          T s = T(0);
          for (int64_t m : P) s += std::exp(a[m] - shift);
          const T lse = shift + std::log(s);
          const T lpz = row_log_density<PF>(zr, it.pmu.data(), it.pinv.data(), it.pnorm, L);
          lq[i] = lse - it.log_n;
          lw[i] = lpz + lpx[i] - lq[i];
          pi_own[r * K + k] = std::exp(a[r] - lse);
        }
      // the slices' (max, log-sum): per group (looser) or over all present groups (stratified)
      auto slice_stats = [&](int64_t r_lo, int64_t r_hi, T* st) {
        T mx = ninf;
        for (int64_t r = r_lo; r < r_hi; ++r)
          if (mask == nullptr || mask[r * B + b])
            for (int64_t k = 0; k < K; ++k) {
              const T v = lw[(r * K + k) * B + b];
              mx = v > mx || v != v ? v : mx;
            }
        T s = T(0);
        if (mx != ninf)
          for (int64_t r = r_lo; r < r_hi; ++r)
            if (mask == nullptr || mask[r * B + b])
              for (int64_t k = 0; k < K; ++k) s += std::exp(lw[(r * K + k) * B + b] - mx);
        st[0] = mx;
        st[1] = mx == ninf ? T(0) : std::log(s);
      };
      const T n = T(P.empty() ? 1 : P.size());
      T value = T(0);
      if (bound == kLooser) {
        for (int64_t r = 0; r < M; ++r) {
          T* st = stats + (r * B + b) * 2;
          if (lse_in != nullptr) {
            st[0] = lse_in[r * B + b];
            st[1] = T(0);
          } else {
            slice_stats(r, r + 1, st);
          }
        }
        for (int64_t r : P) value += stats[(r * B + b) * 2] + stats[(r * B + b) * 2 + 1];
        value = value / n - std::log(T(Kc));
      } else {
        T* st = stats + b * 2;
        if (lse_in != nullptr) {
          st[0] = lse_in[b];
          st[1] = T(0);
        } else {
          slice_stats(0, M, st);
        }
        value = st[0] + st[1] - std::log(n * T(Kc));
      }
      out_bound[b] = P.empty() ? T(0) : value;
      if (zw != nullptr)
        for (int64_t r : P) {
          const T* st = stats + (bound == kLooser ? r * B + b : b) * 2;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = (r * K + k) * B + b;
            const T w = moe_wbar(lw[i], st[0], st[1]);
            zw[i] = estimator == kEq8 ? w : T(1) - pi_own[r * K + k] * (T(1) - w);
          }
        }
    }
  });
}

template <int F, int PF, typename T, typename S>
void backward_kernel(const T* g, const S* z, const S* loc, const S* scale, const S* ploc, const S* pscale,
                     const bool* mask, const T* lw, const T* lq, const T* stats, int bound, int estimator, int64_t M,
                     int64_t K, int64_t B, int64_t L, int64_t Kc, S* gz, S* gloc, S* gscale, S* gploc, S* gpscale,
                     T* glpx) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Item<T> it;
    std::vector<T> a(M), pi(M), sum_dA(L), dA_own(L), u_own(L), gl(M * L), gs(M * L), gpl(L), gps(L), gzr(L);
    for (int64_t b = b0; b < b1; ++b) {
      load_item(it, b, M, B, L, loc, scale, ploc, pscale, mask, F, PF);
      const auto& P = it.present;
      const T n = T(P.empty() ? 1 : P.size());
      const T s = g[b] / (bound == kLooser ? n : T(1));
      const T c = T(1) / (T(Kc) * (bound == kLooser ? T(1) : n));
      std::fill(gl.begin(), gl.end(), T(0));
      std::fill(gs.begin(), gs.end(), T(0));
      std::fill(gpl.begin(), gpl.end(), T(0));
      std::fill(gps.begin(), gps.end(), T(0));
      for (int64_t r = 0; r < M; ++r)
        if (mask != nullptr && !mask[r * B + b])
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = (r * K + k) * B + b;
            glpx[i] = T(0);
            for (int64_t l = 0; l < L; ++l) gz[i * L + l] = S(0);
          }
      for (int64_t r : P) {
        const T* st = stats + (bound == kLooser ? r * B + b : b) * 2;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = (r * K + k) * B + b;
          const S* zr = z + i * L;
          const T w = moe_wbar(lw[i], st[0], st[1]);
          const MoECoef<T> cf = moe_coef(estimator, s, w, c);
          glpx[i] = cf.omega;
          const T base = lq[i] + it.log_n;
          for (int64_t m : P)
            pi[m] = std::exp(row_log_density<F>(zr, it.mu.data() + m * L, it.inv.data() + m * L, it.norm[m], L) - base);
          std::fill(sum_dA.begin(), sum_dA.end(), T(0));
          for (int64_t m : P) {
            const T* mu = it.mu.data() + m * L;
            const T* inv = it.inv.data() + m * L;
            const T pm = pi[m];
            const T sc = -(m == r ? cf.score_own : cf.score_other) * pm;
            T* glm = gl.data() + m * L;
            T* gsm = gs.data() + m * L;
            T* sdA = sum_dA.data();
            const bool own = m == r;
            T* dAo = dA_own.data();
            T* uo = u_own.data();
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) {
              const T u = (T(zr[l]) - mu[l]) * inv[l];
              const T d = moe_dphi<F>(u);
              const T dA = -d * inv[l];
              sdA[l] += pm * dA;
              glm[l] += sc * d * inv[l];
              gsm[l] += sc * (u * d - T(1)) * inv[l];
              if (own) {
                dAo[l] = dA;
                uo[l] = u;
              }
            }
          }
          const T om = cf.omega;
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) {
            const T u = (T(zr[l]) - it.pmu[l]) * it.pinv[l];
            const T d = moe_dphi<PF>(u);
            gzr[l] = om * (-d * it.pinv[l] - sum_dA[l]);
            gpl[l] += om * d * it.pinv[l];
            gps[l] += om * (u * d - T(1)) * it.pinv[l];
          }
          for (int64_t l = 0; l < L; ++l) gz[i * L + l] = S(gzr[l]);
          if (cf.alias != T(0)) {  // -alias pi_r (dA_r - sum_m pi_m dA_m), through loc_r + scale_r eps
            const T beta = -cf.alias * pi[r];
            T* glr = gl.data() + r * L;
            T* gsr = gs.data() + r * L;
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) {
              const T ga = beta * (dA_own[l] - sum_dA[l]);
              glr[l] += ga;
              gsr[l] += ga * u_own[l];
            }
          }
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t l = 0; l < L; ++l) {
          gloc[(m * B + b) * L + l] = S(gl[m * L + l]);
          gscale[(m * B + b) * L + l] = S(gs[m * L + l]);
        }
      for (int64_t l = 0; l < L; ++l) {
        gploc[b * L + l] = S(gpl[l]);
        gpscale[b * L + l] = S(gps[l]);
      }
    }
  });
}

void check_inputs(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& ploc,
                  const at::Tensor& pscale, const at::Tensor& lpx, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(z.dim() == 4, "moe_estimator: z must be [M, K, B, L]");
  const int64_t M = z.size(0), K = z.size(1), B = z.size(2), L = z.size(3);
  TORCH_CHECK(loc.sizes() == at::IntArrayRef({M, B, L}) && scale.sizes() == loc.sizes(),
              "moe_estimator: loc and scale must be [M, B, L]");
  TORCH_CHECK(ploc.sizes() == at::IntArrayRef({B, L}) && pscale.sizes() == ploc.sizes(),
              "moe_estimator: the prior's loc and scale must be [B, L]");
  TORCH_CHECK(lpx.sizes() == at::IntArrayRef({M, K, B}), "moe_estimator: lpx must be [M, K, B]");
  TORCH_CHECK(lpx.scalar_type() == acc_type(z), "moe_estimator: lpx must be in the accumulation dtype");
  for (const auto* t : {&loc, &scale, &ploc, &pscale})
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), "moe_estimator: z, loc, scale and the prior share one dtype");
  if (mask.has_value())
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == at::IntArrayRef({M, B}),
                "moe_estimator: mask must be bool [M, B]");
}

template <typename Fn>
void dispatch_families(int fam, int pfam, Fn&& fn) {
  if (fam == kNormal) {
    if (pfam == kNormal) fn(std::integral_constant<int, kNormal>{}, std::integral_constant<int, kNormal>{});
    else fn(std::integral_constant<int, kNormal>{}, std::integral_constant<int, kLaplace>{});
  } else {
    if (pfam == kNormal) fn(std::integral_constant<int, kLaplace>{}, std::integral_constant<int, kNormal>{});
    else fn(std::integral_constant<int, kLaplace>{}, std::integral_constant<int, kLaplace>{});
  }
}

}  // namespace

// -> (bound [B], lw [M, K, B], z_weight [M, K, B] or [0], lq [M, K, B], stats [S, 2])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_estimator_cpu(
    const at::Tensor& z_, const at::Tensor& loc_, const at::Tensor& scale_, const at::Tensor& ploc_,
    const at::Tensor& pscale_, const at::Tensor& lpx_, c10::string_view family, c10::string_view prior_family,
    c10::string_view bound_s, c10::string_view estimator_s, const c10::optional<at::Tensor>& mask_,
    const c10::optional<at::Tensor>& lse_, c10::optional<int64_t> num_samples) {
  check_inputs(z_, loc_, scale_, ploc_, pscale_, lpx_, mask_);
  const int fam = family_code(family), pfam = family_code(prior_family);
  const int bound = bound_code(bound_s), estimator = estimator_code(estimator_s);
  const auto z = z_.contiguous(), loc = loc_.contiguous(), scale = scale_.contiguous();
  const auto ploc = ploc_.contiguous(), pscale = pscale_.contiguous(), lpx = lpx_.contiguous();
  const int64_t M = z.size(0), K = z.size(1), B = z.size(2), L = z.size(3);
  const int64_t Kc = num_samples.has_value() ? *num_samples : K;
  const auto acc = z.options().dtype(acc_type(z));
  auto out_bound = at::empty({B}, acc), lw = at::empty({M, K, B}, acc), lq = at::empty({M, K, B}, acc);
  const bool want_zw = estimator == kEq8 || estimator == kMixture || estimator == kMixtureCentred;
  auto zw = want_zw ? at::empty({M, K, B}, acc) : at::empty({0}, acc);
  auto stats = at::empty({bound == kLooser ? M * B : B, 2}, acc);
  at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  at::Tensor lse;
  if (lse_.has_value()) lse = lse_->to(acc_type(z)).contiguous();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "moe_estimator_cpu", [&] {
    using T = scalar_t;  // float or double: the accumulation dtype is the input's
    dispatch_families(fam, pfam, [&](auto F, auto PF) {
      forward_kernel<decltype(F)::value, decltype(PF)::value, T, scalar_t>(
          z.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), ploc.data_ptr<scalar_t>(),
          pscale.data_ptr<scalar_t>(), lpx.data_ptr<T>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
          lse.defined() ? lse.data_ptr<T>() : nullptr, bound, estimator, M, K, B, L, Kc, out_bound.data_ptr<T>(),
          lw.data_ptr<T>(), want_zw ? zw.data_ptr<T>() : nullptr, lq.data_ptr<T>(), stats.data_ptr<T>());
    });
  });
  return {out_bound, lw, zw, lq, stats};
}

// -> (grad z, grad loc, grad scale, grad prior loc [B, L], grad prior scale [B, L], grad lpx)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_estimator_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& z_, const at::Tensor& loc_, const at::Tensor& scale_,
    const at::Tensor& ploc_, const at::Tensor& pscale_, const c10::optional<at::Tensor>& mask_, const at::Tensor& lw_,
    const at::Tensor& lq_, const at::Tensor& stats_, c10::string_view family, c10::string_view prior_family,
    c10::string_view bound_s, c10::string_view estimator_s, c10::optional<int64_t> num_samples) {
  const int fam = family_code(family), pfam = family_code(prior_family);
  const int bound = bound_code(bound_s), estimator = estimator_code(estimator_s);
  const auto z = z_.contiguous(), loc = loc_.contiguous(), scale = scale_.contiguous();
  const auto ploc = ploc_.contiguous(), pscale = pscale_.contiguous();
  const auto lw = lw_.contiguous(), lq = lq_.contiguous(), stats = stats_.contiguous();
  const int64_t M = z.size(0), K = z.size(1), B = z.size(2), L = z.size(3);
  const int64_t Kc = num_samples.has_value() ? *num_samples : K;
  const auto grad = grad_.to(acc_type(z)).contiguous();
  auto gz = at::empty_like(z), gloc = at::empty_like(loc), gscale = at::empty_like(scale);
  auto gploc = at::empty_like(ploc), gpscale = at::empty_like(pscale), glpx = at::empty_like(lw);
  at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "moe_estimator_backward_cpu", [&] {
    using T = scalar_t;  // float or double: the accumulation dtype is the input's
    dispatch_families(fam, pfam, [&](auto F, auto PF) {
      backward_kernel<decltype(F)::value, decltype(PF)::value, T, scalar_t>(
          grad.data_ptr<T>(), z.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
          ploc.data_ptr<scalar_t>(), pscale.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
          lw.data_ptr<T>(), lq.data_ptr<T>(), stats.data_ptr<T>(), bound, estimator, M, K, B, L, Kc,
          gz.data_ptr<scalar_t>(), gloc.data_ptr<scalar_t>(), gscale.data_ptr<scalar_t>(), gploc.data_ptr<scalar_t>(),
          gpscale.data_ptr<scalar_t>(), glpx.data_ptr<T>());
    });
  });
  return {gz, gloc, gscale, gploc, gpscale, glpx};
}

}  // namespace mmvae_fast::cpu
