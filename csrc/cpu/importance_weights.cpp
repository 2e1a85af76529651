// Importance weights of log weights lw viewed as [P, N, Q], reduced over the middle dim N (the
// Python adapter views the reduced dims, when adjacent, as that dim: no transpose, e.g. the
// stratified bound's lw [M, K, B] is [1, M*K, B]):
//   lse[p, q] = logsumexp_n lw[p, n, q]   (bound = lse - log N, taken in Python)
//   wbar      = exp(lw - lse),  wbar_sq = wbar^2
// Q == 1 (reduced dims last): one pass per row over chunks of kChunk values, each chunk's max then
// exp(x - max) into the wbar buffer, the chunk states merged with the online log-sum-exp of
// math.h; then a cheap rescale of each chunk by exp(max_c - lse). Q > 1: tiles of kColumnTile adjacent
// columns, vectorised across the columns: their max, then exp(x - max) and the sums, then the
// rescale by 1/sum. Either way one exp per element. lse comes with its rounding residual lse_lo
// (math.h's lse_split): the weights are exp((lw - lse) - lse_lo), right to float precision however
// large |lw| is. Only lse and lse_lo are saved for backward. Backward recomputes wbar that way and, for incoming
// gradients gb (bound), gw (wbar) and gw2 (wbar_sq), any of them absent,
//   d/dlw_i = w_i (gb + gw_i - A + 2 w_i gw2_i - 2 C),   A = sum_j gw_j w_j,  C = sum_j gw2_j w_j^2.
// Accumulation in float (double for double input); fp16 / bf16 lw is widened first.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "mmvae_fast/cpu.h"
#include "mmvae_fast/fastmath.h"
#include "mmvae_fast/host.h"
#include "mmvae_fast/math.h"

namespace mmvae_fast {
namespace {

constexpr int64_t kChunk = 256;

template <typename T>
MMVAE_ALWAYS_INLINE LseSplit<T> forward_row_impl(const T* x, int64_t n, T* w, T* w2, T* chunk_max, T* chunk_sum) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  LseState<T> st = lse_init<T>();
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t lo = c * kChunk, len = std::min(kChunk, n - lo);
    const T* xc = x + lo;
    T* wc = w + lo;
    T m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) m = xc[j] > m ? xc[j] : m;
    // An infinite max shifts by 0 (as the reference): an all -inf chunk sums exp(x - 0) = 0, one
    // with a +inf sums +inf (the bound is +inf), not exp(inf - inf) = NaN. A NaN shows up in the sum.
    m = std::isfinite(m) ? m : T(0);
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) {
      const T e = fast_exp(xc[j] - m);
      wc[j] = e;
      s += e;
    }
    chunk_max[c] = m;
    chunk_sum[c] = s;
    if (s != T(0)) st = lse_merge(st, LseState<T>{m, s});  // empty chunks must not move the max
  }
  const LseSplit<T> lse = lse_split(st);
  const bool nan_row = lse.hi != lse.hi;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t lo = c * kChunk, len = std::min(kChunk, n - lo);
    const T f = (chunk_sum[c] == T(0) && !nan_row) ? T(0) : std::exp((chunk_max[c] - lse.hi) - lse.lo);
    T* wc = w + lo;
    T* w2c = w2 + lo;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const T v = wc[j] * f;
      wc[j] = v;
      w2c[j] = v * v;
    }
  }
  return lse;
}

template <typename T, bool kHasW, bool kHasW2>
MMVAE_ALWAYS_INLINE void backward_row_impl(const T* x, int64_t n, T lse, T lse_lo, T gb, const T* gw, const T* gw2,
                                           T* gx) {
  if (lse == -std::numeric_limits<T>::infinity()) {  // all -inf row: zero gradient
    std::fill(gx, gx + n, T(0));
    return;
  }
  if (!kHasW && !kHasW2) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gx[j] = gb * fast_exp((x[j] - lse) - lse_lo);
    return;
  }
  T A = 0, C = 0;
#pragma omp simd reduction(+ : A, C)
  for (int64_t j = 0; j < n; ++j) {
    const T w = fast_exp((x[j] - lse) - lse_lo);
    gx[j] = w;
    if (kHasW) A += gw[j] * w;
    if (kHasW2) C += gw2[j] * w * w;
  }
  const T base = gb - A - T(2) * C;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T w = gx[j];
    T g = base;
    if (kHasW) g += gw[j];
    if (kHasW2) g += T(2) * w * gw2[j];
    gx[j] = w * g;
  }
}

// Columns: x[j * stride + t] for j < n, t < width <= kColumnTile; lse[t], lse_lo[t] out.
template <typename T>
MMVAE_ALWAYS_INLINE void forward_cols_impl(const T* x, int64_t n, int64_t stride, int64_t width, T* w, T* w2, T* lse,
                                           T* lse_lo) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T m[kColumnTile], s[kColumnTile], inv[kColumnTile];
  for (int64_t t = 0; t < kColumnTile; ++t) m[t] = kNegInf, s[t] = T(0);
  for (int64_t j = 0; j < n; ++j) {
    const T* xr = x + j * stride;
#pragma omp simd
    for (int64_t t = 0; t < width; ++t) m[t] = xr[t] > m[t] ? xr[t] : m[t];
  }
  for (int64_t t = 0; t < width; ++t) m[t] = std::isfinite(m[t]) ? m[t] : T(0);  // infinite: as forward_row_impl
  for (int64_t j = 0; j < n; ++j) {
    const T* xr = x + j * stride;
    T* wr = w + j * stride;
#pragma omp simd
    for (int64_t t = 0; t < width; ++t) {
      const T e = fast_exp(xr[t] - m[t]);
      wr[t] = e;
      s[t] += e;
    }
  }
  for (int64_t t = 0; t < width; ++t) {
    const LseSplit<T> l = lse_split(LseState<T>{m[t], s[t]});
    lse[t] = l.hi, lse_lo[t] = l.lo;
    inv[t] = s[t] == T(0) ? T(0) : T(1) / s[t];  // NaN sums stay NaN
  }
  for (int64_t j = 0; j < n; ++j) {
    T* wr = w + j * stride;
    T* w2r = w2 + j * stride;
#pragma omp simd
    for (int64_t t = 0; t < width; ++t) {
      const T v = wr[t] * inv[t];
      wr[t] = v;
      w2r[t] = v * v;
    }
  }
}

template <typename T, bool kHasW, bool kHasW2>
MMVAE_ALWAYS_INLINE void backward_cols_impl(const T* x, int64_t n, int64_t stride, int64_t width, const T* lse,
                                            const T* lse_lo, const T* gb, const T* gw, const T* gw2, T* gx) {
  T L[kColumnTile], Lo[kColumnTile], A[kColumnTile], C[kColumnTile], base[kColumnTile];
  for (int64_t t = 0; t < kColumnTile; ++t) {
    // An all -inf column (lse = -inf) has x = -inf everywhere: exp(x - 0) = 0 gives zero gradients.
    const bool live = t < width && lse[t] != -std::numeric_limits<T>::infinity();
    L[t] = live ? lse[t] : T(0);
    Lo[t] = live ? lse_lo[t] : T(0);
    A[t] = C[t] = T(0);
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* xr = x + j * stride;
    T* gr = gx + j * stride;
#pragma omp simd
    for (int64_t t = 0; t < width; ++t) {
      const T w = fast_exp((xr[t] - L[t]) - Lo[t]);
      gr[t] = w;
      if (kHasW) A[t] += gw[j * stride + t] * w;
      if (kHasW2) C[t] += gw2[j * stride + t] * w * w;
    }
  }
  for (int64_t t = 0; t < width; ++t) base[t] = (gb ? gb[t] : T(0)) - A[t] - T(2) * C[t];
  for (int64_t j = 0; j < n; ++j) {
    T* gr = gx + j * stride;
#pragma omp simd
    for (int64_t t = 0; t < width; ++t) {
      const T w = gr[t];
      T g = base[t];
      if (kHasW) g += gw[j * stride + t];
      if (kHasW2) g += T(2) * w * gw2[j * stride + t];
      gr[t] = w * g;
    }
  }
}

template <typename T>
MMVAE_ALWAYS_INLINE void backward_cols_dispatch(const T* x, int64_t n, int64_t stride, int64_t width, const T* lse,
                                                const T* lo, const T* gb, const T* gw, const T* gw2, T* gx) {
  if (gw && gw2) backward_cols_impl<T, true, true>(x, n, stride, width, lse, lo, gb, gw, gw2, gx);
  else if (gw) backward_cols_impl<T, true, false>(x, n, stride, width, lse, lo, gb, gw, gw2, gx);
  else if (gw2) backward_cols_impl<T, false, true>(x, n, stride, width, lse, lo, gb, gw, gw2, gx);
  else backward_cols_impl<T, false, false>(x, n, stride, width, lse, lo, gb, gw, gw2, gx);
}

// The multiversioned entry points (one clone per ISA level, chosen at load time). A full tile
// passes the constant kColumnTile so its inner loops compile to whole vectors.
MMVAE_CPU_MULTIVERSION LseSplit<float> forward_row(const float* x, int64_t n, float* w, float* w2, float* cm,
                                                   float* cs) {
  return forward_row_impl(x, n, w, w2, cm, cs);
}
MMVAE_CPU_MULTIVERSION LseSplit<double> forward_row(const double* x, int64_t n, double* w, double* w2, double* cm,
                                                    double* cs) {
  return forward_row_impl(x, n, w, w2, cm, cs);
}

#define MMVAE_COLS(T)                                                                                                 \
  MMVAE_CPU_MULTIVERSION void forward_cols(const T* x, int64_t n, int64_t stride, int64_t width, T* w, T* w2, T* lse, \
                                           T* lo) {                                                                   \
    if (width == kColumnTile) forward_cols_impl(x, n, stride, kColumnTile, w, w2, lse, lo);                           \
    else forward_cols_impl(x, n, stride, width, w, w2, lse, lo);                                                      \
  }                                                                                                                   \
  MMVAE_CPU_MULTIVERSION void backward_cols(const T* x, int64_t n, int64_t stride, int64_t width, const T* lse,       \
                                            const T* lo, const T* gb, const T* gw, const T* gw2, T* gx) {             \
    if (width == kColumnTile) backward_cols_dispatch(x, n, stride, kColumnTile, lse, lo, gb, gw, gw2, gx);            \
    else backward_cols_dispatch(x, n, stride, width, lse, lo, gb, gw, gw2, gx);                                       \
  }
MMVAE_COLS(float)
MMVAE_COLS(double)
#undef MMVAE_COLS

template <typename T>
MMVAE_ALWAYS_INLINE void backward_row_dispatch(const T* x, int64_t n, T lse, T lo, T gb, const T* gw, const T* gw2,
                                               T* gx) {
  if (gw && gw2) backward_row_impl<T, true, true>(x, n, lse, lo, gb, gw, gw2, gx);
  else if (gw) backward_row_impl<T, true, false>(x, n, lse, lo, gb, gw, gw2, gx);
  else if (gw2) backward_row_impl<T, false, true>(x, n, lse, lo, gb, gw, gw2, gx);
  else backward_row_impl<T, false, false>(x, n, lse, lo, gb, gw, gw2, gx);
}
MMVAE_CPU_MULTIVERSION void backward_row(const float* x, int64_t n, float lse, float lo, float gb, const float* gw,
                                         const float* gw2, float* gx) {
  backward_row_dispatch(x, n, lse, lo, gb, gw, gw2, gx);
}
MMVAE_CPU_MULTIVERSION void backward_row(const double* x, int64_t n, double lse, double lo, double gb, const double* gw,
                                         const double* gw2, double* gx) {
  backward_row_dispatch(x, n, lse, lo, gb, gw, gw2, gx);
}

void check_lw(const at::Tensor& lw, const char* op) {
  TORCH_CHECK(lw.device().is_cpu(), op, ": expected a CPU tensor 'lw', got ", lw.device());
  TORCH_CHECK(lw.is_floating_point(), op, ": 'lw' must be floating point, got ", lw.scalar_type());
  TORCH_CHECK(lw.dim() == 3, op, ": 'lw' must be 3-D [P, N, Q] (reduced over N), got ", lw.dim(), " dims");
  TORCH_CHECK(lw.size(1) > 0, op, ": 'lw' needs at least one sample (N > 0)");
}

// Work items: rows (Q == 1) or tiles of kColumnTile columns; enough per chunk to be worth a thread.
struct Items {
  int64_t P, N, Q, tiles, count, grain;
  Items(int64_t P_, int64_t N_, int64_t Q_) : P(P_), N(N_), Q(Q_) {
    tiles = Q == 1 ? 1 : (Q + kColumnTile - 1) / kColumnTile;
    count = P * tiles;
    grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N * std::min(Q, kColumnTile), 1));
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> importance_weights_cpu(const at::Tensor& lw_in) {
  check_lw(lw_in, "importance_weights");
  // fp16 / bf16 lw is widened once to float (log weights are small next to what made them).
  const at::Tensor lw = lw_in.to(acc_type(lw_in)).contiguous();
  const Items it(lw.size(0), lw.size(1), lw.size(2));
  const int64_t N = it.N, Q = it.Q;
  at::Tensor lse = at::empty({it.P, Q}, lw.options()), lse_lo = at::empty({it.P, Q}, lw.options()),
             w = at::empty(lw.sizes(), lw.options()), w2 = at::empty(lw.sizes(), lw.options());
  AT_DISPATCH_FLOATING_TYPES(lw.scalar_type(), "importance_weights_cpu", [&] {
    const scalar_t* px = lw.const_data_ptr<scalar_t>();
    scalar_t* plse = lse.data_ptr<scalar_t>();
    scalar_t* plo = lse_lo.data_ptr<scalar_t>();
    scalar_t* pw = w.data_ptr<scalar_t>();
    scalar_t* pw2 = w2.data_ptr<scalar_t>();
    at::parallel_for(0, it.count, it.grain, [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz;
      const int64_t n_chunks = (N + kChunk - 1) / kChunk;
      std::vector<scalar_t> cm(n_chunks), cs(n_chunks);
      for (int64_t i = begin; i < end; ++i) {
        if (Q == 1) {
          const auto l = forward_row(px + i * N, N, pw + i * N, pw2 + i * N, cm.data(), cs.data());
          plse[i] = l.hi, plo[i] = l.lo;
          continue;
        }
        const int64_t p = i / it.tiles, q0 = (i % it.tiles) * kColumnTile, width = std::min(kColumnTile, Q - q0);
        const int64_t off = p * N * Q + q0;
        forward_cols(px + off, N, Q, width, pw + off, pw2 + off, plse + p * Q + q0, plo + p * Q + q0);
      }
    });
  });
  return {lse, w, w2, lse_lo};
}

at::Tensor importance_weights_backward_cpu(const at::Tensor& lw_in, const at::Tensor& lse_in,
                                           const at::Tensor& lse_lo_in, const std::optional<at::Tensor>& g_lse,
                                           const std::optional<at::Tensor>& g_wbar,
                                           const std::optional<at::Tensor>& g_wbar_sq) {
  check_lw(lw_in, "importance_weights_backward");
  const auto acc = acc_type(lw_in);
  const at::Tensor lw = lw_in.to(acc).contiguous();
  const Items it(lw.size(0), lw.size(1), lw.size(2));
  const int64_t N = it.N, Q = it.Q;
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({it.P, Q}), "importance_weights_backward: 'lse' must have shape [",
              it.P, ", ", Q, "]");
  TORCH_CHECK(lse_lo_in.sizes() == lse_in.sizes(),
              "importance_weights_backward: 'lse_lo' must have the shape of 'lse'");
  const at::Tensor lse = lse_in.to(acc).contiguous(), lse_lo = lse_lo_in.to(acc).contiguous();
  auto prep = [&](const std::optional<at::Tensor>& g, at::IntArrayRef shape, const char* name) -> at::Tensor {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK(g->sizes() == shape, "importance_weights_backward: '", name, "' must have shape ", shape, ", got ",
                g->sizes());
    return g->to(acc).contiguous();
  };
  const at::Tensor gb = prep(g_lse, {it.P, Q}, "g_lse");
  const at::Tensor gw = prep(g_wbar, lw.sizes(), "g_wbar");
  const at::Tensor gw2 = prep(g_wbar_sq, lw.sizes(), "g_wbar_sq");
  at::Tensor gx = at::empty(lw.sizes(), lw.options());
  AT_DISPATCH_FLOATING_TYPES(lw.scalar_type(), "importance_weights_backward_cpu", [&] {
    const scalar_t* px = lw.const_data_ptr<scalar_t>();
    const scalar_t* plse = lse.const_data_ptr<scalar_t>();
    const scalar_t* plo = lse_lo.const_data_ptr<scalar_t>();
    const scalar_t* pgb = gb.defined() ? gb.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pgw = gw.defined() ? gw.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pgw2 = gw2.defined() ? gw2.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    at::parallel_for(0, it.count, it.grain, [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz;
      for (int64_t i = begin; i < end; ++i) {
        if (Q == 1) {
          backward_row(px + i * N, N, plse[i], plo[i], pgb ? pgb[i] : scalar_t(0), pgw ? pgw + i * N : nullptr,
                       pgw2 ? pgw2 + i * N : nullptr, pgx + i * N);
          continue;
        }
        const int64_t p = i / it.tiles, q0 = (i % it.tiles) * kColumnTile, width = std::min(kColumnTile, Q - q0);
        const int64_t off = p * N * Q + q0;
        backward_cols(px + off, N, Q, width, plse + p * Q + q0, plo + p * Q + q0, pgb ? pgb + p * Q + q0 : nullptr,
                      pgw ? pgw + off : nullptr, pgw2 ? pgw2 + off : nullptr, pgx + off);
      }
    });
  });
  return gx.to(lw_in.scalar_type());
}

}  // namespace mmvae_fast
