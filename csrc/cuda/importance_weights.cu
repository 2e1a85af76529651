// Importance weights on CUDA, mirroring csrc/cpu/importance_weights.cpp (same op schema):
//   lse[r] = logsumexp_j lw[r, j],  wbar = exp(lw - lse),  wbar_sq = wbar^2   (bound = lse - log N in Python)
// One group of threads per row: a warp for rows up to kWarpRowMax, a block of kBlock threads for
// longer ones. Each thread folds its strided elements into an LseState (math.h), the group merges
// the states with shuffles (reduce.cuh); a second sweep writes the weights. Only lse is saved.
// Backward recomputes wbar and, for the incoming gb, gw, gw2 (any absent),
//   d/dlw_i = w_i (gb + gw_i - A + 2 w_i gw2_i - 2 C),   A = sum_j gw_j w_j,  C = sum_j gw2_j w_j^2.
#include <optional>

#include "reduce.cuh"

namespace mmvae_fast {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kWarpRowMax = 2048;

// Threads [0, G) of a group cooperate on one row; G = 32 (a warp) or blockDim.x (the block).
template <typename scalar_t, typename acc_t, bool kBlockRow>
__global__ void forward_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ lse, acc_t* __restrict__ w,
                               acc_t* __restrict__ w2, int64_t R, int64_t N) {
  __shared__ acc_t sm[kBlock / kWarp], ss[kBlock / kWarp];
  const int G = kBlockRow ? blockDim.x : kWarp;
  const int t = kBlockRow ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t rows_per_block = kBlockRow ? 1 : blockDim.x / kWarp;
  const int64_t first = blockIdx.x * rows_per_block + (kBlockRow ? 0 : threadIdx.x / kWarp);
  const int64_t stride = int64_t(gridDim.x) * rows_per_block;
  for (int64_t r = first; r < R; r += stride) {  // uniform per group: the block never diverges
    const scalar_t* xr = x + r * N;
    LseState<acc_t> st = lse_init<acc_t>();
    for (int64_t j = t; j < N; j += G) st = lse_push(st, static_cast<acc_t>(xr[j]));
    st = kBlockRow ? block_lse(st, sm, ss) : warp_lse(st);
    const acc_t l = lse_value(st);
    if (t == 0) lse[r] = l;
    // an all -inf row has weights exp(-inf - 0) = 0; NaN propagates through l
    const acc_t shift = l == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : l;
    for (int64_t j = t; j < N; j += G) {
      const acc_t v = std::exp(static_cast<acc_t>(xr[j]) - shift);
      w[r * N + j] = v;
      w2[r * N + j] = v * v;
    }
  }
}

template <typename scalar_t, typename acc_t, bool kBlockRow>
__global__ void backward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ lse,
                                const acc_t* __restrict__ gb, const acc_t* __restrict__ gw,
                                const acc_t* __restrict__ gw2, scalar_t* __restrict__ gx, int64_t R, int64_t N) {
  __shared__ acc_t sa[kBlock / kWarp], sc[kBlock / kWarp];
  const int G = kBlockRow ? blockDim.x : kWarp;
  const int t = kBlockRow ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t rows_per_block = kBlockRow ? 1 : blockDim.x / kWarp;
  const int64_t first = blockIdx.x * rows_per_block + (kBlockRow ? 0 : threadIdx.x / kWarp);
  const int64_t stride = int64_t(gridDim.x) * rows_per_block;
  for (int64_t r = first; r < R; r += stride) {
    const acc_t l = lse[r];
    const bool empty = l == -std::numeric_limits<acc_t>::infinity();  // all -inf row: zero gradient
    const acc_t* gwr = gw ? gw + r * N : nullptr;
    const acc_t* gw2r = gw2 ? gw2 + r * N : nullptr;
    acc_t A = 0, C = 0;
    if (gw || gw2) {
      for (int64_t j = t; j < N; j += G) {
        const acc_t wj = empty ? acc_t(0) : std::exp(static_cast<acc_t>(x[r * N + j]) - l);
        if (gwr) A += gwr[j] * wj;
        if (gw2r) C += gw2r[j] * wj * wj;
      }
      A = kBlockRow ? block_sum(A, sa) : warp_sum(A);
      C = kBlockRow ? block_sum(C, sc) : warp_sum(C);
    }
    const acc_t base = (gb ? gb[r] : acc_t(0)) - A - acc_t(2) * C;
    for (int64_t j = t; j < N; j += G) {
      const acc_t wj = empty ? acc_t(0) : std::exp(static_cast<acc_t>(x[r * N + j]) - l);
      acc_t g = base;
      if (gwr) g += gwr[j];
      if (gw2r) g += acc_t(2) * wj * gw2r[j];
      gx[r * N + j] = static_cast<scalar_t>(wj * g);
    }
  }
}

void check_lw(const at::Tensor& lw, const char* op) {
  TORCH_CHECK(lw.is_cuda(), op, ": expected a CUDA tensor 'lw', got ", lw.device());
  TORCH_CHECK(lw.is_floating_point(), op, ": 'lw' must be floating point, got ", lw.scalar_type());
  TORCH_CHECK(lw.dim() == 2, op, ": 'lw' must be 2-D [rows, samples], got ", lw.dim(), " dims");
  TORCH_CHECK(lw.size(1) > 0, op, ": 'lw' needs at least one sample per row");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> importance_weights_cuda(const at::Tensor& lw_in) {
  check_lw(lw_in, "importance_weights");
  const c10::cuda::CUDAGuard guard(lw_in.device());
  const at::Tensor lw = lw_in.contiguous();
  const int64_t R = lw.size(0), N = lw.size(1);
  const auto opts = lw.options().dtype(acc_type(lw));
  at::Tensor lse = at::empty({R}, opts), w = at::empty({R, N}, opts), w2 = at::empty({R, N}, opts);
  if (R == 0) return {lse, w, w2};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lw.scalar_type(), "importance_weights_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = lw.const_data_ptr<scalar_t>();
    if (N <= kWarpRowMax) {
      forward_kernel<scalar_t, acc_t, false><<<grid_for(R, kBlock / kWarp), kBlock, 0, stream>>>(
          px, lse.data_ptr<acc_t>(), w.data_ptr<acc_t>(), w2.data_ptr<acc_t>(), R, N);
    } else {
      forward_kernel<scalar_t, acc_t, true><<<grid_for(R, 1), kBlock, 0, stream>>>(
          px, lse.data_ptr<acc_t>(), w.data_ptr<acc_t>(), w2.data_ptr<acc_t>(), R, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lse, w, w2};
}

at::Tensor importance_weights_backward_cuda(const at::Tensor& lw_in, const at::Tensor& lse_in,
                                            const std::optional<at::Tensor>& g_lse,
                                            const std::optional<at::Tensor>& g_wbar,
                                            const std::optional<at::Tensor>& g_wbar_sq) {
  check_lw(lw_in, "importance_weights_backward");
  const c10::cuda::CUDAGuard guard(lw_in.device());
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
  if (R == 0) return gx;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lw.scalar_type(), "importance_weights_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* pgb = gb.defined() ? gb.const_data_ptr<acc_t>() : nullptr;
    const acc_t* pgw = gw.defined() ? gw.const_data_ptr<acc_t>() : nullptr;
    const acc_t* pgw2 = gw2.defined() ? gw2.const_data_ptr<acc_t>() : nullptr;
    if (N <= kWarpRowMax) {
      backward_kernel<scalar_t, acc_t, false><<<grid_for(R, kBlock / kWarp), kBlock, 0, stream>>>(
          lw.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), pgb, pgw, pgw2, gx.data_ptr<scalar_t>(), R, N);
    } else {
      backward_kernel<scalar_t, acc_t, true><<<grid_for(R, 1), kBlock, 0, stream>>>(
          lw.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), pgb, pgw, pgw2, gx.data_ptr<scalar_t>(), R, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace cuda
}  // namespace mmvae_fast
