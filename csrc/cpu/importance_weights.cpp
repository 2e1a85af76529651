// Importance weights of the rows of log weights lw [R, N] (the Python adapter moves the reduced
// dims last):
//   lse[r] = logsumexp_j lw[r, j]   (bound = lse - log N, taken in Python)
//   wbar   = exp(lw - lse),  wbar_sq = wbar^2
// Forward: one pass per row over chunks of kChunk values, each chunk's max then exp(x - max) into
// the wbar buffer, the chunk states merged with the online log-sum-exp of math.h; then a cheap
// rescale of each chunk by exp(max_c - lse). One exp per element, the row read once from memory.
// Only lse is saved for backward. Backward recomputes wbar = exp(lw - lse) and, for incoming
// gradients gb (bound), gw (wbar) and gw2 (wbar_sq), any of them absent,
//   d/dlw_i = w_i (gb + gw_i - A + 2 w_i gw2_i - 2 C),   A = sum_j gw_j w_j,  C = sum_j gw2_j w_j^2.
// Accumulation in float (double for double input); fp16 / bf16 rows are widened first.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "mmvae_fast/fastmath.h"
#include "mmvae_fast/math.h"

#define MMVAE_ALWAYS_INLINE inline __attribute__((always_inline))

namespace mmvae_fast {
namespace {

constexpr int64_t kChunk = 256;

template <typename T>
MMVAE_ALWAYS_INLINE T forward_row_impl(const T* x, int64_t n, T* w, T* w2, T* chunk_max, T* chunk_sum) {
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
    // An all -inf chunk: exp(x - 0) = 0 (as the reference). A NaN shows up in the sum below.
    m = m == kNegInf ? T(0) : m;
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
  const T lse = lse_value(st);
  const bool nan_row = lse != lse;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t lo = c * kChunk, len = std::min(kChunk, n - lo);
    const T f = (chunk_sum[c] == T(0) && !nan_row) ? T(0) : std::exp(chunk_max[c] - lse);
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
MMVAE_ALWAYS_INLINE void backward_row_impl(const T* x, int64_t n, T lse, T gb, const T* gw, const T* gw2, T* gx) {
  if (lse == -std::numeric_limits<T>::infinity()) {  // all -inf row: zero gradient
    std::fill(gx, gx + n, T(0));
    return;
  }
  if (!kHasW && !kHasW2) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gx[j] = gb * fast_exp(x[j] - lse);
    return;
  }
  T A = 0, C = 0;
#pragma omp simd reduction(+ : A, C)
  for (int64_t j = 0; j < n; ++j) {
    const T w = fast_exp(x[j] - lse);
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

// The multiversioned entry points (one clone per ISA level, chosen at load time).
MMVAE_CPU_MULTIVERSION float forward_row(const float* x, int64_t n, float* w, float* w2, float* cm, float* cs) {
  return forward_row_impl(x, n, w, w2, cm, cs);
}
MMVAE_CPU_MULTIVERSION double forward_row(const double* x, int64_t n, double* w, double* w2, double* cm, double* cs) {
  return forward_row_impl(x, n, w, w2, cm, cs);
}

template <typename T>
MMVAE_ALWAYS_INLINE void backward_row_dispatch(const T* x, int64_t n, T lse, T gb, const T* gw, const T* gw2, T* gx) {
  if (gw && gw2) backward_row_impl<T, true, true>(x, n, lse, gb, gw, gw2, gx);
  else if (gw) backward_row_impl<T, true, false>(x, n, lse, gb, gw, gw2, gx);
  else if (gw2) backward_row_impl<T, false, true>(x, n, lse, gb, gw, gw2, gx);
  else backward_row_impl<T, false, false>(x, n, lse, gb, gw, gw2, gx);
}
MMVAE_CPU_MULTIVERSION void backward_row(const float* x, int64_t n, float lse, float gb, const float* gw, const float* gw2, float* gx) {
  backward_row_dispatch(x, n, lse, gb, gw, gw2, gx);
}
MMVAE_CPU_MULTIVERSION void backward_row(const double* x, int64_t n, double lse, double gb, const double* gw, const double* gw2, double* gx) {
  backward_row_dispatch(x, n, lse, gb, gw, gw2, gx);
}

// A row as acc_t: the tensor's own memory when it already is acc_t, else widened into buf.
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

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_lw(const at::Tensor& lw, const char* op) {
  TORCH_CHECK(lw.device().is_cpu(), op, ": expected a CPU tensor 'lw', got ", lw.device());
  TORCH_CHECK(lw.is_floating_point(), op, ": 'lw' must be floating point, got ", lw.scalar_type());
  TORCH_CHECK(lw.dim() == 2, op, ": 'lw' must be 2-D [rows, samples], got ", lw.dim(), " dims");
  TORCH_CHECK(lw.size(1) > 0, op, ": 'lw' needs at least one sample per row");
}

// Rows wide enough that a chunk of them is worth a thread.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> importance_weights_cpu(const at::Tensor& lw_in) {
  check_lw(lw_in, "importance_weights");
  const at::Tensor lw = lw_in.contiguous();
  const int64_t R = lw.size(0), N = lw.size(1);
  const auto opts = lw.options().dtype(acc_type(lw));
  at::Tensor lse = at::empty({R}, opts), w = at::empty({R, N}, opts), w2 = at::empty({R, N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lw.scalar_type(), "importance_weights_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = lw.const_data_ptr<scalar_t>();
    acc_t* plse = lse.data_ptr<acc_t>();
    acc_t* pw = w.data_ptr<acc_t>();
    acc_t* pw2 = w2.data_ptr<acc_t>();
    at::parallel_for(0, R, grain_rows(N), [&](int64_t begin, int64_t end) {
      const int64_t n_chunks = (N + kChunk - 1) / kChunk;
      std::vector<acc_t> cm(n_chunks), cs(n_chunks);
      std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : N);
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* xr = widen<acc_t>(px + r * N, N, xbuf);
        plse[r] = forward_row(xr, N, pw + r * N, pw2 + r * N, cm.data(), cs.data());
      }
    });
  });
  return {lse, w, w2};
}

at::Tensor importance_weights_backward_cpu(const at::Tensor& lw_in, const at::Tensor& lse_in,
                                           const std::optional<at::Tensor>& g_lse,
                                           const std::optional<at::Tensor>& g_wbar,
                                           const std::optional<at::Tensor>& g_wbar_sq) {
  check_lw(lw_in, "importance_weights_backward");
  const at::Tensor lw = lw_in.contiguous();
  const int64_t R = lw.size(0), N = lw.size(1);
  const auto acc = acc_type(lw);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == R, "importance_weights_backward: 'lse' must have shape [", R, "]");
  const at::Tensor lse = lse_in.to(acc).contiguous();
  auto prep = [&](const std::optional<at::Tensor>& g, at::IntArrayRef shape, const char* name) -> at::Tensor {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK(g->sizes() == shape, "importance_weights_backward: '", name, "' must have shape ", shape, ", got ", g->sizes());
    return g->to(acc).contiguous();
  };
  const at::Tensor gb = prep(g_lse, {R}, "g_lse");
  const at::Tensor gw = prep(g_wbar, {R, N}, "g_wbar");
  const at::Tensor gw2 = prep(g_wbar_sq, {R, N}, "g_wbar_sq");
  at::Tensor gx = at::empty({R, N}, lw.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lw.scalar_type(), "importance_weights_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = lw.const_data_ptr<scalar_t>();
    const acc_t* plse = lse.const_data_ptr<acc_t>();
    const acc_t* pgb = gb.defined() ? gb.const_data_ptr<acc_t>() : nullptr;
    const acc_t* pgw = gw.defined() ? gw.const_data_ptr<acc_t>() : nullptr;
    const acc_t* pgw2 = gw2.defined() ? gw2.const_data_ptr<acc_t>() : nullptr;
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain_rows(N), [&](int64_t begin, int64_t end) {
      constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;
      std::vector<acc_t> xbuf(kWide ? 0 : N), gbuf(kWide ? 0 : N);
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* xr = widen<acc_t>(px + r * N, N, xbuf);
        acc_t* gr = acc_row<acc_t>(pgx + r * N, gbuf);
        backward_row(xr, N, plse[r], pgb ? pgb[r] : acc_t(0), pgw ? pgw + r * N : nullptr,
                     pgw2 ? pgw2 + r * N : nullptr, gr);
        narrow_row<acc_t>(pgx + r * N, N, gbuf);
      }
    });
  });
  return gx;
}

}  // namespace mmvae_fast
