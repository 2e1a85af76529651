// Appendix B's cross-modal importance ratios on CPU, forward and backward:
//   ratio[r, d, k, b] = exp(a[d, r, k, b] - sg a[d, d, k, b]),  1 on the diagonal r == d,
// with z detached: the gradient reaches only the numerator's expert r,
//   grad_loc/scale[r, b] = sum_{d != r, k} grad_ratio[r, d, k, b] * ratio[r, d, k, b] * d/d(loc, scale) a[d, r, k, b].
// One pass per sample (d, k, b) computes its M pairwise entries over L; nothing of size
// M*M*K*B*L exists. The backward reuses the saved ratios (the op's own output) and needs no exp.
#include <vector>

#include "mixture_rows.h"

namespace mmvae_fast {
namespace cpu {
namespace {

template <typename T>
struct RatioArgs {
  const T *z, *loc, *inv, *lss;
  const T *grad, *ratio;  // backward only
  T *out, *gloc, *gscale;  // out: forward; gloc/gscale: backward, [chunks, M, B, L]
  int64_t M, K, B, L, chunks;
};

template <int F, typename T>
MMVAE_ALWAYS_INLINE void fwd_rows_t(const RatioArgs<T>& p, int64_t begin, int64_t end, T* a) {
  const int64_t M = p.M, B = p.B, L = p.L, KB = p.K * B;
  for (int64_t i = begin; i < end; ++i) {  // i = (d * K + k) * B + b
    const int64_t b = i % B, d = i / KB, kb = i % KB;
    const T* zrow = p.z + i * L;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t o = (m * B + b) * L;
      a[m] = row_log_density<F>(zrow, p.loc + o, p.inv + o, L) - p.lss[m * B + b];
    }
    for (int64_t r = 0; r < M; ++r) p.out[(r * M + d) * KB + kb] = r == d ? T(1) : importance_ratio(a[r], a[d]);
  }
}

template <int F, typename T>
MMVAE_ALWAYS_INLINE void bwd_task_t(const RatioArgs<T>& p, int64_t b, int64_t c) {
  const int64_t M = p.M, K = p.K, B = p.B, L = p.L, KB = K * B;
  const int64_t k0 = c * K / p.chunks, k1 = (c + 1) * K / p.chunks;
  T* gloc = p.gloc + c * M * B * L;
  T* gscale = p.gscale + c * M * B * L;
  for (int64_t d = 0; d < M; ++d) {
    for (int64_t k = k0; k < k1; ++k) {
      const T* zrow = p.z + ((d * K + k) * B + b) * L;
      for (int64_t r = 0; r < M; ++r) {
        if (r == d) continue;  // the constant diagonal
        const int64_t j = (r * M + d) * KB + k * B + b;
        const T g = p.grad[j] * p.ratio[j];  // d ratio / d a[d, r] = ratio
        if (g == T(0)) continue;
        const int64_t o = (r * B + b) * L;
        row_grad<F, false, true>(g, zrow, p.loc + o, p.inv + o, static_cast<T*>(nullptr), gloc + o, gscale + o, L);
      }
    }
  }
}

template <typename T>
MMVAE_ALWAYS_INLINE void fwd_rows(int family, const RatioArgs<T>& p, int64_t begin, int64_t end) {
  std::vector<T> a(p.M);  // a[d, m] of the current sample
  if (family == kNormal) fwd_rows_t<kNormal>(p, begin, end, a.data());
  else fwd_rows_t<kLaplace>(p, begin, end, a.data());
}
template <typename T>
MMVAE_ALWAYS_INLINE void bwd_tasks(int family, const RatioArgs<T>& p, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    if (family == kNormal) bwd_task_t<kNormal>(p, t % p.B, t / p.B);
    else bwd_task_t<kLaplace>(p, t % p.B, t / p.B);
  }
}
MMVAE_CPU_CLONES void fwd_f32(int f, const RatioArgs<float>& p, int64_t b, int64_t e) { fwd_rows(f, p, b, e); }
MMVAE_CPU_CLONES void fwd_f64(int f, const RatioArgs<double>& p, int64_t b, int64_t e) { fwd_rows(f, p, b, e); }
MMVAE_CPU_CLONES void bwd_f32(int f, const RatioArgs<float>& p, int64_t b, int64_t e) { bwd_tasks(f, p, b, e); }
MMVAE_CPU_CLONES void bwd_f64(int f, const RatioArgs<double>& p, int64_t b, int64_t e) { bwd_tasks(f, p, b, e); }
void run_fwd(int f, const RatioArgs<float>& p, int64_t b, int64_t e) { fwd_f32(f, p, b, e); }
void run_fwd(int f, const RatioArgs<double>& p, int64_t b, int64_t e) { fwd_f64(f, p, b, e); }
void run_bwd(int f, const RatioArgs<float>& p, int64_t b, int64_t e) { bwd_f32(f, p, b, e); }
void run_bwd(int f, const RatioArgs<double>& p, int64_t b, int64_t e) { bwd_f64(f, p, b, e); }

}  // namespace

at::Tensor importance_ratios_cpu(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                 c10::string_view family) {
  const int fam = parse_family(std::string(family));
  const Experts e = prepare_experts(z, loc, scale, "mmvae_fast::importance_ratios");
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  at::Tensor out = at::empty({M, M, K, B}, e.z.options());
  AT_DISPATCH_FLOATING_TYPES(e.z.scalar_type(), "importance_ratios_cpu", [&] {
    using T = scalar_t;
    const RatioArgs<T> p{e.z.data_ptr<T>(), e.loc.data_ptr<T>(), e.inv.data_ptr<T>(), e.log_scale_sum.data_ptr<T>(),
                         nullptr, nullptr, out.data_ptr<T>(), nullptr, nullptr, M, K, B, L, 1};
    const int64_t grain = row_grain(M * L);
    at::parallel_for(0, M * K * B, grain, [&](int64_t begin, int64_t end) { run_fwd(fam, p, begin, end); });
  });
  return out;
}

// Gradients with respect to (loc, scale); z never gets one.
std::tuple<at::Tensor, at::Tensor> importance_ratios_backward_cpu(const at::Tensor& grad, const at::Tensor& ratio,
                                                                  const at::Tensor& z, const at::Tensor& loc,
                                                                  const at::Tensor& scale, c10::string_view family) {
  const char* op = "mmvae_fast::importance_ratios_backward";
  const int fam = parse_family(std::string(family));
  const Experts e = prepare_experts(z, loc, scale, op);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  const auto acc = e.z.scalar_type();
  const at::Tensor g = grad.to(acc).contiguous(), rt = ratio.to(acc).contiguous();
  TORCH_CHECK(g.sizes() == at::IntArrayRef({M, M, K, B}) && rt.sizes() == g.sizes(), op,
              ": grad and ratio must have shape [M, M, K, B]");
  const int64_t chunks = sample_chunks(B, K);
  at::Tensor gloc = at::zeros({chunks, M, B, L}, e.z.options());
  at::Tensor gscale = at::zeros({chunks, M, B, L}, e.z.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "importance_ratios_backward_cpu", [&] {
    using T = scalar_t;
    const RatioArgs<T> p{e.z.data_ptr<T>(), e.loc.data_ptr<T>(), e.inv.data_ptr<T>(), e.log_scale_sum.data_ptr<T>(),
                         g.data_ptr<T>(), rt.data_ptr<T>(), nullptr, gloc.data_ptr<T>(), gscale.data_ptr<T>(),
                         M, K, B, L, chunks};
    at::parallel_for(0, B * chunks, row_grain(M * M * L * K / chunks), [&](int64_t begin, int64_t end) { run_bwd(fam, p, begin, end); });
  });
  return {gloc.sum(0).to(loc.scalar_type()), gscale.sum(0).to(scale.scalar_type())};
}

}  // namespace cpu
}  // namespace mmvae_fast
