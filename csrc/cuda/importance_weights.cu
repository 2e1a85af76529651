// Importance weights on CUDA, mirroring csrc/cpu/importance_weights.cpp (same op schema): the
// middle dim of lw [P, N, Q] is reduced,
//   lse[p, q] = logsumexp_n lw[p, n, q],  wbar = exp(lw - lse),  wbar_sq = wbar^2  (bound = lse - log N in Python)
// Each (p, q) row is folded into an LseState (math.h) by a group of threads:
//   kThread: one thread per row, adjacent threads on adjacent q (coalesced), for Q >= 32;
//   kWarp:   a warp per row, lanes over n, for N up to kWarpRowMax;
//   kBlock:  a 256-thread block per longer row.
// Groups merge their states with shuffles (reduce.cuh); a second sweep writes the weights
// exp((lw - lse) - lse_lo), lse_lo the rounding residual of lse (math.h lse_split: right however large
// |lw| is). Only lse and lse_lo are saved. Backward recomputes wbar so and, for the incoming gb, gw, gw2 (any absent),
//   d/dlw_i = w_i (gb + gw_i - A + 2 w_i gw2_i - 2 C),   A = sum_j gw_j w_j,  C = sum_j gw2_j w_j^2.
// As on the CPU, fp16 / bf16 lw is widened to float once; outputs and gradient are float (double
// for double).
#include <optional>

#include "reduce.cuh"

namespace mmvae_fast {
namespace cuda {
namespace {

constexpr int kBlockThreads = 256;
constexpr int64_t kWarpRowMax = 2048;
enum Group : int { kThread = 0, kWarpGroup = 1, kBlockGroup = 2 };

// The rows handled by this thread's group, and its rank / size in the group.
template <int G>
struct RowIter {
  int64_t first, stride;
  int rank, size;
  __device__ RowIter() {
    if (G == kThread) {
      first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
      rank = 0, size = 1;
    } else if (G == kWarpGroup) {
      const int64_t per_block = blockDim.x / kWarp;
      first = blockIdx.x * per_block + threadIdx.x / kWarp, stride = int64_t(gridDim.x) * per_block;
      rank = threadIdx.x % kWarp, size = kWarp;
    } else {
      first = blockIdx.x, stride = gridDim.x;  // uniform per block: __syncthreads is safe
      rank = threadIdx.x, size = blockDim.x;
    }
  }
};

template <int G, typename T>
__device__ __forceinline__ LseState<T> group_lse(LseState<T> st, T* sm, T* ss) {
  if (G == kThread) return st;
  if (G == kWarpGroup) return warp_lse(st);
  return block_lse(st, sm, ss);
}

template <int G, typename T>
__device__ __forceinline__ T group_sum(T v, T* scratch) {
  if (G == kThread) return v;
  if (G == kWarpGroup) return warp_sum(v);
  return block_sum(v, scratch);
}

template <int G, typename T>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ lse, T* __restrict__ lse_lo, T* __restrict__ w,
                               T* __restrict__ w2, int64_t P, int64_t N, int64_t Q) {
  __shared__ T sm[kBlockThreads / kWarp], ss[kBlockThreads / kWarp];
  const RowIter<G> it;
  for (int64_t r = it.first; r < P * Q; r += it.stride) {  // r = p * Q + q
    const int64_t base = (r / Q) * N * Q + r % Q;          // element n at base + n * Q
    LseState<T> st = lse_init<T>();
    for (int64_t n = it.rank; n < N; n += it.size) st = lse_push(st, x[base + n * Q]);
    st = group_lse<G>(st, sm, ss);
    const LseSplit<T> l = lse_split(st);
    if (it.rank == 0) lse[r] = l.hi, lse_lo[r] = l.lo;
    // an all -inf row has weights 0; NaN propagates through l.hi
    for (int64_t n = it.rank; n < N; n += it.size) {
      const T v = weight_from_split(x[base + n * Q], l.hi, l.lo);
      w[base + n * Q] = v;
      w2[base + n * Q] = v * v;
    }
  }
}

template <int G, typename T>
__global__ void backward_kernel(const T* __restrict__ x, const T* __restrict__ lse, const T* __restrict__ lse_lo,
                                const T* __restrict__ gb, const T* __restrict__ gw, const T* __restrict__ gw2,
                                T* __restrict__ gx, int64_t P, int64_t N, int64_t Q) {
  __shared__ T sa[kBlockThreads / kWarp], sc[kBlockThreads / kWarp];
  const RowIter<G> it;
  for (int64_t r = it.first; r < P * Q; r += it.stride) {
    const int64_t base = (r / Q) * N * Q + r % Q;
    const T l = lse[r], lo = lse_lo[r];  // an all -inf row (l = -inf) has w = 0: zero gradient
    T A = 0, C = 0;
    if (gw || gw2) {
      for (int64_t n = it.rank; n < N; n += it.size) {
        const int64_t j = base + n * Q;
        const T wj = weight_from_split(x[j], l, lo);
        if (gw) A += gw[j] * wj;
        if (gw2) C += gw2[j] * wj * wj;
      }
      A = group_sum<G>(A, sa);
      C = group_sum<G>(C, sc);
    }
    const T b0 = (gb ? gb[r] : T(0)) - A - T(2) * C;
    for (int64_t n = it.rank; n < N; n += it.size) {
      const int64_t j = base + n * Q;
      const T wj = weight_from_split(x[j], l, lo);
      T g = b0;
      if (gw) g += gw[j];
      if (gw2) g += T(2) * wj * gw2[j];
      gx[j] = wj * g;
    }
  }
}

void check_lw(const at::Tensor& lw, const char* op) {
  TORCH_CHECK(lw.is_cuda(), op, ": expected a CUDA tensor 'lw', got ", lw.device());
  TORCH_CHECK(lw.is_floating_point(), op, ": 'lw' must be floating point, got ", lw.scalar_type());
  TORCH_CHECK(lw.dim() == 3, op, ": 'lw' must be 3-D [P, N, Q] (reduced over N), got ", lw.dim(), " dims");
  TORCH_CHECK(lw.size(1) > 0, op, ": 'lw' needs at least one sample (N > 0)");
}

// Launches kernel<G> with the group kind that suits the shape.
template <typename Launch>
void by_shape(int64_t P, int64_t N, int64_t Q, Launch&& launch) {
  const int64_t rows = P * Q;
  if (Q >= kWarp) launch(std::integral_constant<int, kThread>{}, grid_for(rows, kBlockThreads));
  else if (N <= kWarpRowMax) launch(std::integral_constant<int, kWarpGroup>{}, grid_for(rows, kBlockThreads / kWarp));
  else launch(std::integral_constant<int, kBlockGroup>{}, grid_for(rows, 1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> importance_weights_cuda(const at::Tensor& lw_in) {
  check_lw(lw_in, "importance_weights");
  const c10::cuda::CUDAGuard guard(lw_in.device());
  const at::Tensor lw = lw_in.to(acc_type(lw_in)).contiguous();
  const int64_t P = lw.size(0), N = lw.size(1), Q = lw.size(2);
  at::Tensor lse = at::empty({P, Q}, lw.options()), lse_lo = at::empty({P, Q}, lw.options()),
             w = at::empty(lw.sizes(), lw.options()), w2 = at::empty(lw.sizes(), lw.options());
  if (P * Q == 0) return {lse, w, w2, lse_lo};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(lw.scalar_type(), "importance_weights_cuda", [&] {
    using T = scalar_t;
    by_shape(P, N, Q, [&](auto group, unsigned grid) {
      forward_kernel<decltype(group)::value, T><<<grid, kBlockThreads, 0, stream>>>(
          lw.const_data_ptr<T>(), lse.data_ptr<T>(), lse_lo.data_ptr<T>(), w.data_ptr<T>(), w2.data_ptr<T>(), P, N, Q);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lse, w, w2, lse_lo};
}

at::Tensor importance_weights_backward_cuda(const at::Tensor& lw_in, const at::Tensor& lse_in,
                                            const at::Tensor& lse_lo_in, const std::optional<at::Tensor>& g_lse,
                                            const std::optional<at::Tensor>& g_wbar,
                                            const std::optional<at::Tensor>& g_wbar_sq) {
  check_lw(lw_in, "importance_weights_backward");
  const c10::cuda::CUDAGuard guard(lw_in.device());
  const auto acc = acc_type(lw_in);
  const at::Tensor lw = lw_in.to(acc).contiguous();
  const int64_t P = lw.size(0), N = lw.size(1), Q = lw.size(2);
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({P, Q}), "importance_weights_backward: 'lse' must have shape [", P,
              ", ", Q, "]");
  TORCH_CHECK(lse_lo_in.sizes() == lse_in.sizes(),
              "importance_weights_backward: 'lse_lo' must have the shape of 'lse'");
  const at::Tensor lse = lse_in.to(acc).contiguous(), lse_lo = lse_lo_in.to(acc).contiguous();
  auto prep = [&](const std::optional<at::Tensor>& g, at::IntArrayRef shape, const char* name) -> at::Tensor {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK(g->sizes() == shape, "importance_weights_backward: '", name, "' must have shape ", shape, ", got ",
                g->sizes());
    return g->to(acc).contiguous();
  };
  const at::Tensor gb = prep(g_lse, {P, Q}, "g_lse");
  const at::Tensor gw = prep(g_wbar, lw.sizes(), "g_wbar");
  const at::Tensor gw2 = prep(g_wbar_sq, lw.sizes(), "g_wbar_sq");
  at::Tensor gx = at::empty(lw.sizes(), lw.options());
  if (P * Q == 0) return gx;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "importance_weights_backward_cuda", [&] {
    using T = scalar_t;
    by_shape(P, N, Q, [&](auto group, unsigned grid) {
      backward_kernel<decltype(group)::value, T><<<grid, kBlockThreads, 0, stream>>>(
          lw.const_data_ptr<T>(), lse.const_data_ptr<T>(), lse_lo.const_data_ptr<T>(),
          gb.defined() ? gb.const_data_ptr<T>() : nullptr, gw.defined() ? gw.const_data_ptr<T>() : nullptr,
          gw2.defined() ? gw2.const_data_ptr<T>() : nullptr, gx.data_ptr<T>(), P, N, Q);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace cuda
}  // namespace mmvae_fast
