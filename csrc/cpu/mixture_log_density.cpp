// Fused mixture-of-experts log-density on CPU (DESIGN.md section 3), forward and backward.
//   a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l])
//   lq[r, k, b]   = logsumexp_{m present in b} a[r, m, k, b] - log(#present in b)
// One pass per sample (r, k, b): M row loops over L and an online log-sum-exp over m. Nothing of
// size M*M*K*B*L exists; the forward keeps only lq, and the backward recomputes a row at a time:
//   G[r, m, k, b] = grad_lq[r, k, b] * pi[r, m, k, b] + grad_a[r, m, k, b],  pi = exp(a - lse)
//   grad_z[r, k, b]  = sum_m G * d/dz log f,   grad_loc/scale[m, b] = sum_{r,k} G * d/d(loc, scale) log f
#include <vector>

#include "mixture_rows.h"

namespace mmvae_fast {
namespace cpu {
namespace {

template <typename T>
struct FwdArgs {
  const T *z, *loc, *inv, *lss;  // lss: sum_l log scale [M, B]
  const uint8_t* present;        // [M, B]
  const int64_t* count;          // [B]
  T *lq, *a;                     // a may be null
  int64_t M, K, B, L;
};

template <int F, typename T>
MMVAE_ALWAYS_INLINE void fwd_rows_t(const FwdArgs<T>& p, int64_t begin, int64_t end) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L, KB = K * B;
  for (int64_t i = begin; i < end; ++i) {  // i = (r * K + k) * B + b
    const int64_t b = i % B, r = i / KB, kb = i % KB;
    const T* zrow = p.z + i * L;
    LseState<T> st = lse_init<T>();
    for (int64_t m = 0; m < M; ++m) {
      const bool on = p.present[m * B + b];
      if (!on && p.a == nullptr) continue;  // absent and not asked for: skip the work
      const int64_t o = (m * B + b) * L;
      const T am = row_log_density<F>(zrow, p.loc + o, p.inv + o, L) - p.lss[m * B + b];
      if (p.a != nullptr) p.a[(r * M + m) * KB + kb] = am;
      if (on) st = lse_push(st, am);
    }
    p.lq[i] = mixture_lq(st, p.count[b]);
  }
}

template <typename T>
MMVAE_ALWAYS_INLINE void fwd_rows(int family, const FwdArgs<T>& p, int64_t begin, int64_t end) {
  if (family == kNormal) fwd_rows_t<kNormal>(p, begin, end);
  else fwd_rows_t<kLaplace>(p, begin, end);
}
MMVAE_CPU_CLONES void fwd_rows_f32(int family, const FwdArgs<float>& p, int64_t begin, int64_t end) {
  fwd_rows(family, p, begin, end);
}
MMVAE_CPU_CLONES void fwd_rows_f64(int family, const FwdArgs<double>& p, int64_t begin, int64_t end) {
  fwd_rows(family, p, begin, end);
}
void run_fwd(int family, const FwdArgs<float>& p, int64_t b, int64_t e) { fwd_rows_f32(family, p, b, e); }
void run_fwd(int family, const FwdArgs<double>& p, int64_t b, int64_t e) { fwd_rows_f64(family, p, b, e); }

template <typename T>
struct BwdArgs {
  const T *z, *loc, *inv, *lss, *lq;
  const T *glq, *ga;  // incoming gradients, each may be null
  const uint8_t* present;
  const int64_t* count;
  T *gz, *gloc, *gscale;  // gz may be null; gloc/gscale: [chunks, M, B, L] or null
  int64_t M, K, B, L, chunks;
};

// One task: batch entry b, samples [k0, k1) of every group r.
template <int F, bool GX, bool GP, typename T>
MMVAE_ALWAYS_INLINE void bwd_task_t(const BwdArgs<T>& p, int64_t b, int64_t c, T* G) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L, KB = K * B;
  const int64_t k0 = c * K / p.chunks, k1 = (c + 1) * K / p.chunks;
  const T log_n = log_expert_count<T>(p.count[b]);
  T* gloc = GP ? p.gloc + c * M * B * L : nullptr;
  T* gscale = GP ? p.gscale + c * M * B * L : nullptr;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = (r * K + k) * B + b, kb = k * B + b;
      const T* zrow = p.z + i * L;
      if (p.glq != nullptr) {
        const T g = p.glq[i], lq = p.lq[i];
        for (int64_t m = 0; m < M; ++m) {
          const int64_t o = (m * B + b) * L;
          G[m] = p.present[m * B + b] && g != T(0)
                     ? g * responsibility(row_log_density<F>(zrow, p.loc + o, p.inv + o, L) - p.lss[m * B + b], lq, log_n)
                     : T(0);
        }
      } else {
        for (int64_t m = 0; m < M; ++m) G[m] = T(0);
      }
      if (p.ga != nullptr)
        for (int64_t m = 0; m < M; ++m) G[m] += p.ga[(r * M + m) * KB + kb];
      T* gzrow = GX ? p.gz + i * L : nullptr;
      for (int64_t m = 0; m < M; ++m) {
        if (G[m] == T(0)) continue;  // absent experts, zero incoming gradient
        const int64_t o = (m * B + b) * L;
        row_grad<F, GX, GP>(G[m], zrow, p.loc + o, p.inv + o, gzrow, GP ? gloc + o : nullptr,
                            GP ? gscale + o : nullptr, L);
      }
    }
  }
}

template <typename T>
MMVAE_ALWAYS_INLINE void bwd_tasks(int family, const BwdArgs<T>& p, int64_t begin, int64_t end) {
  std::vector<T> G(p.M);  // G[m] of the current sample
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t % p.B, c = t / p.B;
    const bool gx = p.gz != nullptr, gp = p.gloc != nullptr;
#define MMVAE_BWD_CASE(FAM, GX, GP) \
  if (family == FAM && gx == GX && gp == GP) bwd_task_t<FAM, GX, GP>(p, b, c, G.data());
    MMVAE_BWD_CASE(kNormal, true, true)
    MMVAE_BWD_CASE(kNormal, true, false)
    MMVAE_BWD_CASE(kNormal, false, true)
    MMVAE_BWD_CASE(kLaplace, true, true)
    MMVAE_BWD_CASE(kLaplace, true, false)
    MMVAE_BWD_CASE(kLaplace, false, true)
#undef MMVAE_BWD_CASE
  }
}
MMVAE_CPU_CLONES void bwd_tasks_f32(int family, const BwdArgs<float>& p, int64_t begin, int64_t end) {
  bwd_tasks(family, p, begin, end);
}
MMVAE_CPU_CLONES void bwd_tasks_f64(int family, const BwdArgs<double>& p, int64_t begin, int64_t end) {
  bwd_tasks(family, p, begin, end);
}
void run_bwd(int family, const BwdArgs<float>& p, int64_t b, int64_t e) { bwd_tasks_f32(family, p, b, e); }
void run_bwd(int family, const BwdArgs<double>& p, int64_t b, int64_t e) { bwd_tasks_f64(family, p, b, e); }

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                                const std::string& family, const c10::optional<at::Tensor>& mask,
                                                bool pairwise) {
  const char* op = "mmvae_fast::mixture_log_density";
  const int fam = parse_family(family);
  const Experts e = prepare_experts(z, loc, scale, op);
  const auto [present, count] = prepare_mask(mask, e.M, e.B, op);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  at::Tensor lq = at::empty({M, K, B}, e.z.options());
  at::Tensor a = pairwise ? at::empty({M, M, K, B}, e.z.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(e.z.scalar_type(), "mixture_log_density_cpu", [&] {
    const FwdArgs<scalar_t> p{e.z.data_ptr<scalar_t>(), e.loc.data_ptr<scalar_t>(), e.inv.data_ptr<scalar_t>(),
                              e.log_scale_sum.data_ptr<scalar_t>(), present.data_ptr<uint8_t>(),
                              count.data_ptr<int64_t>(), lq.data_ptr<scalar_t>(),
                              pairwise ? a.data_ptr<scalar_t>() : nullptr, M, K, B, L};
    const int64_t grain = row_grain(M * L);
    at::parallel_for(0, M * K * B, grain, [&](int64_t begin, int64_t end) { run_fwd(fam, p, begin, end); });
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
  const int fam = parse_family(std::string(family));
  const Experts e = prepare_experts(z, loc, scale, op);
  const auto [present, count] = prepare_mask(mask, e.M, e.B, op);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  const auto acc = e.z.scalar_type();
  const bool gx = output_mask[0], gp = output_mask[1] || output_mask[2];
  const at::Tensor lqc = lq.to(acc).contiguous();
  TORCH_CHECK(lqc.sizes() == at::IntArrayRef({M, K, B}), op, ": lq must have shape [M, K, B]");
  at::Tensor glq, ga;
  if (grad_lq.has_value() && grad_lq->defined()) glq = grad_lq->to(acc).contiguous();
  if (grad_a.has_value() && grad_a->defined()) ga = grad_a->to(acc).contiguous();
  if (glq.defined()) TORCH_CHECK(glq.sizes() == lqc.sizes(), op, ": grad_lq must have shape [M, K, B]");
  if (ga.defined()) TORCH_CHECK(ga.sizes() == at::IntArrayRef({M, M, K, B}), op, ": grad_a must have shape [M, M, K, B]");
  const int64_t chunks = sample_chunks(B, K);
  at::Tensor gz = gx ? at::zeros_like(e.z) : at::Tensor();
  at::Tensor gloc = gp ? at::zeros({chunks, M, B, L}, e.z.options()) : at::Tensor();
  at::Tensor gscale = gp ? at::zeros({chunks, M, B, L}, e.z.options()) : at::Tensor();
  if ((gx || gp) && (glq.defined() || ga.defined())) {
    AT_DISPATCH_FLOATING_TYPES(acc, "mixture_log_density_backward_cpu", [&] {
      using T = scalar_t;
      const BwdArgs<T> p{e.z.data_ptr<T>(), e.loc.data_ptr<T>(), e.inv.data_ptr<T>(),
                         e.log_scale_sum.data_ptr<T>(), lqc.data_ptr<T>(),
                         glq.defined() ? glq.data_ptr<T>() : nullptr, ga.defined() ? ga.data_ptr<T>() : nullptr,
                         present.data_ptr<uint8_t>(), count.data_ptr<int64_t>(), gx ? gz.data_ptr<T>() : nullptr,
                         gp ? gloc.data_ptr<T>() : nullptr, gp ? gscale.data_ptr<T>() : nullptr,
                         M, K, B, L, chunks};
      at::parallel_for(0, B * chunks, row_grain(M * M * L * K / chunks), [&](int64_t begin, int64_t end) { run_bwd(fam, p, begin, end); });
    });
  }
  const auto empty = at::empty({0}, z.options());
  at::Tensor out_z = gx ? gz.to(z.scalar_type()) : empty;
  at::Tensor out_loc = output_mask[1] ? gloc.sum(0).to(loc.scalar_type()) : empty;
  at::Tensor out_scale = output_mask[2] ? gscale.sum(0).to(scale.scalar_type()) : empty;
  return {out_z, out_loc, out_scale};
}

}  // namespace cpu
}  // namespace mmvae_fast
