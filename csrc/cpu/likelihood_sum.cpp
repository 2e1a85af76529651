// Likelihood sums: out[s, b] = sum_e log p(x[b, e] | params[s, b, e]) for the decoder outputs of S
// samples (the Python adapter flattens the sample dims to S and the event dims to E):
//   normal / laplace  params = location [S, B, E], fixed scale [S|1, B|1, E|1] (compacted broadcast)
//   bernoulli         params = logits [S, B, E], x in [0, 1]
//   categorical       params = logits [S, B, E, V], x int64 class indices
// x is read once per sample row and never expanded over S; no S*B*E log-prob tensor exists:
// each (s, b) row is reduced on the fly in float (double for double params), and backward
// recomputes the elementwise gradient from x and params. The log-densities and their gradients
// come from csrc/include/mmvae_fast/densities.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "mmvae_fast/cpu.h"
#include "mmvae_fast/densities.h"
#include "mmvae_fast/fastmath.h"
#include "mmvae_fast/likelihood_args.h"
#include "mmvae_fast/math.h"

namespace mmvae_fast {
namespace {

// ------------------------------------------------------------------------------------ row kernels
// inv / logs: 1/scale and log(scale) of this row's scale, stepping by se (0: one scale for the row).

template <int F, typename T>
MMVAE_ALWAYS_INLINE T loc_forward_impl(const T* x, const T* mu, const T* inv, const T* logs, int64_t se, int64_t E) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < E; ++e) s += log_density<T>(F, x[e], mu[e], inv[e * se], logs[e * se]);
  return s;
}

// gmu[e] = g d/dmu log f (if gmu); gscale[e * se] += g d/dscale log f (if gscale).
template <int F, typename T>
MMVAE_ALWAYS_INLINE void loc_backward_impl(const T* x, const T* mu, const T* inv, int64_t se, int64_t E, T g, T* gmu,
                                           T* gscale) {
  if (gmu) {
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) gmu[e] = weighted_grad(g, log_density_grad<T>(F, x[e], mu[e], inv[e * se]).dloc);
  }
  if (!gscale) return;
  if (se == 0) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t e = 0; e < E; ++e) s += log_density_grad<T>(F, x[e], mu[e], inv[0]).dscale;
    gscale[0] += weighted_grad(g, s);
  } else {
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) gscale[e] += weighted_grad(g, log_density_grad<T>(F, x[e], mu[e], inv[e]).dscale);
  }
}

template <typename T>
MMVAE_ALWAYS_INLINE T bernoulli_forward_impl(const T* x, const T* l, int64_t E) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < E; ++e) s += bernoulli_log_prob(x[e], l[e]);
  return s;
}

template <typename T>
MMVAE_ALWAYS_INLINE void bernoulli_backward_impl(const T* x, const T* l, int64_t E, T g, T* gl) {
#pragma omp simd
  for (int64_t e = 0; e < E; ++e) gl[e] = g * bernoulli_log_prob_grad(x[e], l[e]);
}

// logsumexp of one row of V logits: its max (an all -inf row uses 0, as the reference), then the
// sum of exp(l - max), optionally stored in ebuf for the backward pass. NaN reaches the sum.
template <typename T>
MMVAE_ALWAYS_INLINE LseState<T> logit_row_state(const T* l, int64_t V, T* ebuf) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) m = l[v] > m ? l[v] : m;
  m = m == -std::numeric_limits<T>::infinity() ? T(0) : m;
  T s = 0;
  if (ebuf) {
#pragma omp simd reduction(+ : s)
    for (int64_t v = 0; v < V; ++v) {
      const T ev = fast_exp(l[v] - m);
      ebuf[v] = ev;
      s += ev;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t v = 0; v < V; ++v) s += fast_exp(l[v] - m);
  }
  return {m, s};
}

// The multiversioned entry points: one clone per x86-64 ISA level, chosen at load time.
#define MMVAE_LIK_ROWS(T)                                                                                           \
  MMVAE_CPU_MULTIVERSION T loc_forward_row(int f, const T* x, const T* mu, const T* inv, const T* logs, int64_t se, \
                                           int64_t E) {                                                             \
    MMVAE_DISPATCH_FAMILY(f, F, return loc_forward_impl<F>(x, mu, inv, logs, se, E));                               \
  }                                                                                                                 \
  MMVAE_CPU_MULTIVERSION void loc_backward_row(int f, const T* x, const T* mu, const T* inv, int64_t se, int64_t E, \
                                               T g, T* gmu, T* gscale) {                                            \
    MMVAE_DISPATCH_FAMILY(f, F, loc_backward_impl<F>(x, mu, inv, se, E, g, gmu, gscale));                           \
  }                                                                                                                 \
  MMVAE_CPU_MULTIVERSION T bernoulli_forward_row(const T* x, const T* l, int64_t E) {                               \
    return bernoulli_forward_impl(x, l, E);                                                                         \
  }                                                                                                                 \
  MMVAE_CPU_MULTIVERSION void bernoulli_backward_row(const T* x, const T* l, int64_t E, T g, T* gl) {               \
    bernoulli_backward_impl(x, l, E, g, gl);                                                                        \
  }                                                                                                                 \
  MMVAE_CPU_MULTIVERSION T categorical_forward_row(const T* l, int64_t V, int64_t xi) {                             \
    return categorical_log_prob(l[xi], lse_value(logit_row_state<T>(l, V, nullptr)));                               \
  }                                                                                                                 \
  /* gl[v] = g ([v == x] - softmax(l)[v]), softmax from the stored exp(l - max) / sum: one exp each */              \
  MMVAE_CPU_MULTIVERSION void categorical_backward_row(const T* l, int64_t V, int64_t xi, T g, T* gl) {             \
    const LseState<T> st = logit_row_state<T>(l, V, gl);                                                            \
    const T c = -g / st.s;                                                                                          \
    _Pragma("omp simd") for (int64_t v = 0; v < V; ++v) gl[v] *= c;                                                 \
    gl[xi] += g;                                                                                                    \
  }

MMVAE_LIK_ROWS(float)
MMVAE_LIK_ROWS(double)
#undef MMVAE_LIK_ROWS

// Few event dims (E = 4, say): a SIMD loop over one row's E numbers is mostly its remainder and
// its horizontal add. When the scale is one number, or one per (b, e) (so that a sample's rows of
// x, params and scale are all contiguous), the rows of one sample are instead walked as one flat
// run of numbers, kFlatTile rows at a time: the elementwise terms over the whole run, then each
// row's sum in order over its e.
constexpr int64_t kFlatMaxE = 16, kFlatTile = 128;

// The scale's step per flat element: 0 (one number) or 1 (one per (b, e)); -1: no flat walk.
MMVAE_ALWAYS_INLINE int64_t flat_scale_step(const lik::Dims& d) {
  if (d.E > kFlatMaxE) return -1;
  if (d.sB == 1 && d.sE == 1) return 0;
  return d.sB == d.B && d.sE == d.E ? 1 : -1;
}

// Between n rows of E numbers (flat) and one number per row: kSum, dst[i] = the sum of src's row i
// in order over e; else dst[i][e] = src[i] for every e. With E a compile-time constant (EC > 0)
// the inner loop unrolls and the compiler vectorises over rows.
template <bool kSum, int EC, typename T>
MMVAE_ALWAYS_INLINE void per_row_e(const T* src, T* dst, int64_t n, int64_t E_) {
  const int64_t E = EC > 0 ? EC : E_;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kSum) {
      T acc = T(0);
      for (int64_t e = 0; e < E; ++e) acc += src[i * E + e];
      dst[i] = acc;
    } else {
      for (int64_t e = 0; e < E; ++e) dst[i * E + e] = src[i];
    }
  }
}

// per_row_e with E at its common small values as a compile-time constant, else at run time.
template <bool kSum, typename T>
MMVAE_ALWAYS_INLINE void per_row(const T* src, T* dst, int64_t n, int64_t E) {
  // clang-format off
  switch (E) {
    case 1: return per_row_e<kSum, 1>(src, dst, n, E);
    case 2: return per_row_e<kSum, 2>(src, dst, n, E);
    case 3: return per_row_e<kSum, 3>(src, dst, n, E);
    case 4: return per_row_e<kSum, 4>(src, dst, n, E);
    case 8: return per_row_e<kSum, 8>(src, dst, n, E);
    default: return per_row_e<kSum, 0>(src, dst, n, E);
  }
  // clang-format on
}

template <int F, typename T>
MMVAE_ALWAYS_INLINE void loc_forward_flat(const lik::Dims& d, int64_t st, const T* x, const T* p, const T* inv,
                                          const T* logs, int64_t begin, int64_t end, T* out) {
  const int64_t E = d.E;
  T t[kFlatMaxE * kFlatTile];
  for (int64_t row = begin, n; row < end; row += n) {  // runs of at most kFlatTile rows of one sample s
    const int64_t s = row / d.B, b0 = row % d.B;
    n = std::min({kFlatTile, d.B - b0, end - row});
    const int64_t so = st * ((d.sS > 1 ? s : 0) * d.B + b0) * E;
    const T *xr = x + b0 * E, *pr = p + row * E, *iv = inv + so, *ls = logs + so;
    if (st == 0) {
#pragma omp simd
      for (int64_t j = 0; j < n * E; ++j) t[j] = log_density<T>(F, xr[j], pr[j], iv[0], ls[0]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n * E; ++j) t[j] = log_density<T>(F, xr[j], pr[j], iv[j], ls[j]);
    }
    per_row<true>(t, out + row, n, E);  // each row's sum
  }
}

// The flat walk's backward: g spread over each row's E numbers, then elementwise.
template <int F, typename T>
MMVAE_ALWAYS_INLINE void loc_backward_flat(const lik::Dims& d, int64_t st, const T* x, const T* p, const T* inv,
                                           const T* g, int64_t begin, int64_t end, T* gp, T* gs) {
  const int64_t E = d.E;
  T gt[kFlatMaxE * kFlatTile];
  for (int64_t row = begin, n; row < end; row += n) {  // runs of at most kFlatTile rows of one sample s
    const int64_t s = row / d.B, b0 = row % d.B;
    n = std::min({kFlatTile, d.B - b0, end - row});
    const int64_t so = st * ((d.sS > 1 ? s : 0) * d.B + b0) * E, ne = n * E;
    const T *xr = x + b0 * E, *pr = p + row * E, *iv = inv + so;
    per_row<false>(g + row, gt, n, E);  // each row's g over its E numbers
    if (gp) {
      T* gr = gp + row * E;
#pragma omp simd
      for (int64_t j = 0; j < ne; ++j)
        gr[j] = weighted_grad(gt[j], log_density_grad<T>(F, xr[j], pr[j], iv[j * st]).dloc);
    }
    if (!gs) continue;
    if (st == 0) {
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < ne; ++j) acc += weighted_grad(gt[j], log_density_grad<T>(F, xr[j], pr[j], iv[0]).dscale);
      gs[0] += acc;
    } else {
      T* gr = gs + so;
#pragma omp simd
      for (int64_t j = 0; j < ne; ++j)
        gr[j] += weighted_grad(gt[j], log_density_grad<T>(F, xr[j], pr[j], iv[j]).dscale);
    }
  }
}

// Whole ranges of (s, b) rows in one call, for params already in the accumulation dtype: with a
// few event dims (E = 4, say) a call and two integer divisions per row cost more than the row.
template <int F, typename T>
MMVAE_ALWAYS_INLINE void loc_forward_range_impl(const lik::Dims& d, const T* x, const T* p, const T* inv, const T* logs,
                                                int64_t begin, int64_t end, T* out) {
  if (const int64_t st = flat_scale_step(d); st >= 0)
    return loc_forward_flat<F>(d, st, x, p, inv, logs, begin, end, out);
  const int64_t E = d.E, se = d.sE > 1 ? 1 : 0;
  int64_t s = begin / d.B, b = begin % d.B;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t so = d.scale_row(s, b);
    out[row] = loc_forward_impl<F>(x + b * E, p + row * E, inv + so, logs + so, se, E);
    if (++b == d.B) b = 0, ++s;
  }
}

template <int F, typename T>
MMVAE_ALWAYS_INLINE void loc_backward_range_impl(const lik::Dims& d, const T* x, const T* p, const T* inv, const T* g,
                                                 int64_t begin, int64_t end, T* gp, T* gs) {
  if (const int64_t st = flat_scale_step(d); st >= 0)
    return loc_backward_flat<F>(d, st, x, p, inv, g, begin, end, gp, gs);
  const int64_t E = d.E, se = d.sE > 1 ? 1 : 0;
  int64_t s = begin / d.B, b = begin % d.B;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t so = d.scale_row(s, b);
    loc_backward_impl<F>(x + b * E, p + row * E, inv + so, se, E, g[row], gp ? gp + row * E : nullptr,
                         gs ? gs + so : nullptr);
    if (++b == d.B) b = 0, ++s;
  }
}

#define MMVAE_LIK_RANGES(T)                                                                                       \
  MMVAE_CPU_MULTIVERSION void loc_forward_range(int f, const lik::Dims& d, const T* x, const T* p, const T* inv,  \
                                                const T* logs, int64_t begin, int64_t end, T* out) {              \
    MMVAE_DISPATCH_FAMILY(f, F, loc_forward_range_impl<F>(d, x, p, inv, logs, begin, end, out));                  \
  }                                                                                                               \
  MMVAE_CPU_MULTIVERSION void loc_backward_range(int f, const lik::Dims& d, const T* x, const T* p, const T* inv, \
                                                 const T* g, int64_t begin, int64_t end, T* gp, T* gs) {          \
    MMVAE_DISPATCH_FAMILY(f, F, loc_backward_range_impl<F>(d, x, p, inv, g, begin, end, gp, gs));                 \
  }

MMVAE_LIK_RANGES(float)
MMVAE_LIK_RANGES(double)
#undef MMVAE_LIK_RANGES

// ------------------------------------------------------------------------------------ helpers

// A row of params as acc_t: the tensor's memory when it already is acc_t, else widened into buf.
template <typename acc_t, typename scalar_t>
MMVAE_ALWAYS_INLINE const acc_t* widen(const scalar_t* p, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
    return buf.data();
  }
}

// Where to write a row of acc_t gradients: the output itself when it is acc_t, else buf.
template <typename acc_t, typename scalar_t>
MMVAE_ALWAYS_INLINE acc_t* acc_row(scalar_t* p, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) return p;
  else return buf.data();
}

// Narrows a row written by acc_row into the output (nothing to do when it is acc_t).
template <typename acc_t, typename scalar_t>
MMVAE_ALWAYS_INLINE void narrow_row(scalar_t* p, int64_t n, const std::vector<acc_t>& buf) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  }
}

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_item, 1)); }

}  // namespace

// ------------------------------------------------------------------------------------ forward

at::Tensor likelihood_sum_cpu(const at::Tensor& x_in, const at::Tensor& params_in,
                              const std::optional<at::Tensor>& scale, int64_t family) {
  const lik::Dims d = lik::check_args(x_in, params_in, scale, family, "likelihood_sum", c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous(), params = params_in.contiguous();
  const auto acc = acc_type(params);
  at::Tensor out = at::empty({d.S, d.B}, params.options().dtype(acc));
  const int64_t SB = d.S * d.B, E = d.E, V = d.V;
  if (SB == 0) return out;
  if (family == kLikCategorical) lik::check_indices(x, V);
  // 1 / scale and log scale: two numbers for a one-number scale (the common fixed likelihood
  // scale: no tensor ops per call), else tensors
  const bool loc_family = family == kLikNormal || family == kLikLaplace;
  const bool one_scale = loc_family && scale->numel() == 1;
  at::Tensor inv, logs;
  if (loc_family && !one_scale) {
    const at::Tensor sc = scale->contiguous();
    inv = sc.reciprocal();
    logs = sc.log();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "likelihood_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = params.const_data_ptr<scalar_t>();
    acc_t* po = out.data_ptr<acc_t>();
    constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;
    if (family == kLikCategorical) {
      // Parallel over (s, b, e) rows of V logits (a tiny batch can still have huge rows); each
      // thread sums into its own slice of `partial`, reduced at the end.
      const int64_t* px = x.const_data_ptr<int64_t>();
      const int64_t n_threads = at::get_num_threads();
      at::Tensor partial = at::zeros({n_threads, SB}, out.options());
      acc_t* ppart = partial.data_ptr<acc_t>();
      at::parallel_for(0, SB * E, grain_for(V), [&](int64_t begin, int64_t end) {
        const FlushDenormals ftz;
        acc_t* mine = ppart + at::get_thread_num() * SB;
        std::vector<acc_t> buf(kWide ? 0 : V);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t row = i / E, b = row % d.B, e = i % E;
          const acc_t* l = widen<acc_t>(pp + i * V, V, buf);
          mine[row] += categorical_forward_row(l, V, px[b * E + e]);
        }
      });
      out.view({SB}).copy_(partial.sum(0));
      return;
    }
    const acc_t* px = x.const_data_ptr<acc_t>();
    const acc_t s1 = one_scale ? *scale->const_data_ptr<acc_t>() : acc_t(1), inv1 = acc_t(1) / s1, logs1 = std::log(s1);
    const acc_t* pinv = one_scale ? &inv1 : inv.defined() ? inv.const_data_ptr<acc_t>() : nullptr;
    const acc_t* plogs = one_scale ? &logs1 : logs.defined() ? logs.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, SB, grain_for(E), [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz;
      if constexpr (kWide) {
        if (family != kLikBernoulli) {
          // kWide: scalar_t is acc_t (the casts only let the other dtypes' branch compile)
          loc_forward_range(int(family), d, px, reinterpret_cast<const acc_t*>(pp), pinv, plogs, begin, end, po);
          return;
        }
      }
      std::vector<acc_t> buf(kWide ? 0 : E);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t s = row / d.B, b = row % d.B;
        const acc_t* p = widen<acc_t>(pp + row * E, E, buf);
        const acc_t* xr = px + b * E;
        if (family == kLikBernoulli) {
          po[row] = bernoulli_forward_row(xr, p, E);
        } else {
          const int64_t so = d.scale_row(s, b);
          po[row] = loc_forward_row(int(family), xr, p, pinv + so, plogs + so, d.sE > 1 ? 1 : 0, E);
        }
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------ backward

std::tuple<at::Tensor, at::Tensor> likelihood_sum_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                               const at::Tensor& params_in,
                                                               const std::optional<at::Tensor>& scale, int64_t family,
                                                               bool params_grad, bool scale_grad) {
  const lik::Dims d = lik::check_backward_args(grad_in, x_in, params_in, scale, family, c10::DeviceType::CPU);
  const auto acc = acc_type(params_in);
  const bool loc_family = family == kLikNormal || family == kLikLaplace;
  scale_grad = scale_grad && loc_family;
  const at::Tensor x = x_in.contiguous(), params = params_in.contiguous(), grad = grad_in.to(acc).contiguous();
  at::Tensor gparams = params_grad ? at::empty_like(params, at::MemoryFormat::Contiguous) : params.new_empty({0});
  at::Tensor gscale = scale_grad ? at::zeros_like(*scale, at::MemoryFormat::Contiguous)
                                 : params.new_empty({0}, params.options().dtype(acc));
  const int64_t SB = d.S * d.B, E = d.E, V = d.V;
  if (SB == 0 || !(params_grad || scale_grad)) return {gparams, gscale};
  if (family == kLikCategorical) lik::check_indices(x, V);
  const bool one_scale = loc_family && scale->numel() == 1;  // 1 / scale as a number, as the forward
  at::Tensor inv;
  if (loc_family && !one_scale) inv = scale->contiguous().reciprocal();
  // The scale gradient sums over the rows that share a scale row. When every sample row has its
  // own, rows write directly; otherwise each thread accumulates into its own copy.
  const bool own_scale_rows = d.sS * d.sB == SB;
  const int64_t n_threads = at::get_num_threads();
  at::Tensor gscale_partial;
  if (scale_grad && !own_scale_rows) gscale_partial = at::zeros({n_threads, gscale.numel()}, gscale.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "likelihood_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;
    const scalar_t* pp = params.const_data_ptr<scalar_t>();
    const acc_t* pg = grad.const_data_ptr<acc_t>();
    scalar_t* pgp = params_grad ? gparams.data_ptr<scalar_t>() : nullptr;
    if (family == kLikCategorical) {
      const int64_t* px = x.const_data_ptr<int64_t>();
      at::parallel_for(0, SB * E, grain_for(V), [&](int64_t begin, int64_t end) {
        const FlushDenormals ftz;
        std::vector<acc_t> buf(kWide ? 0 : V), gbuf(kWide ? 0 : V);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t row = i / E, b = row % d.B, e = i % E;
          const acc_t* l = widen<acc_t>(pp + i * V, V, buf);
          categorical_backward_row(l, V, px[b * E + e], pg[row], acc_row<acc_t>(pgp + i * V, gbuf));
          narrow_row<acc_t>(pgp + i * V, V, gbuf);
        }
      });
      return;
    }
    const acc_t* px = x.const_data_ptr<acc_t>();
    const acc_t inv1 = acc_t(1) / (one_scale ? *scale->const_data_ptr<acc_t>() : acc_t(1));
    const acc_t* pinv = one_scale ? &inv1 : inv.defined() ? inv.const_data_ptr<acc_t>() : nullptr;
    acc_t* pgs = scale_grad ? gscale.data_ptr<acc_t>() : nullptr;
    acc_t* pgs_part = gscale_partial.defined() ? gscale_partial.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, SB, grain_for(E), [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz;
      std::vector<acc_t> buf(kWide ? 0 : E), gbuf(kWide ? 0 : E);
      acc_t* gs_base = pgs_part ? pgs_part + at::get_thread_num() * gscale.numel() : pgs;
      if constexpr (kWide) {
        if (family != kLikBernoulli) {
          loc_backward_range(int(family), d, px, reinterpret_cast<const acc_t*>(pp), pinv, pg, begin, end,
                             reinterpret_cast<acc_t*>(pgp), gs_base);
          return;
        }
      }
      for (int64_t row = begin; row < end; ++row) {
        const int64_t s = row / d.B, b = row % d.B;
        const acc_t* p = widen<acc_t>(pp + row * E, E, buf);
        const acc_t* xr = px + b * E;
        acc_t* gr = params_grad ? acc_row<acc_t>(pgp + row * E, gbuf) : nullptr;
        if (family == kLikBernoulli) {
          bernoulli_backward_row(xr, p, E, pg[row], gr);
        } else {
          const int64_t so = d.scale_row(s, b);
          loc_backward_row(int(family), xr, p, pinv + so, d.sE > 1 ? 1 : 0, E, pg[row], gr,
                           gs_base ? gs_base + so : nullptr);
        }
        if (params_grad) narrow_row<acc_t>(pgp + row * E, E, gbuf);
      }
    });
  });
  if (gscale_partial.defined()) gscale.copy_(gscale_partial.sum(0).view(gscale.sizes()));
  return {gparams, gscale};
}

}  // namespace mmvae_fast
