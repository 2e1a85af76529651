// Likelihood sums on CUDA, mirroring csrc/cpu/likelihood_sum.cpp (same op schema):
//   out[s, b] = sum_e log p(x[b, e] | params[s, b, e(, :)])
//   family 0 normal / 1 laplace (params = location, compact scale [S|1, B|1, E|1]),
//          2 bernoulli (logits), 3 categorical (logits [S, B, E, V], int64 x)
// A warp per (s, b) row: lanes stride over e (and, for categorical, over the vocabulary with the
// online log-sum-exp of math.h, merged across lanes). x is read at x[b, :] by every sample s,
// never expanded. Backward: a thread per element (dense; scale gradient by atomics into the
// compact scale), a warp per (s, b, e) row for categorical (lse recomputed, as on the CPU).
// The elementwise maths is densities.h, shared with the CPU kernels.
#include <optional>

#include "mmvae_fast/densities.h"
#include "mmvae_fast/likelihood_args.h"
#include "reduce.cuh"

namespace mmvae_fast {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kRowsPerBlock = kBlock / kWarp;

template <typename scalar_t, typename acc_t>
__global__ void dense_forward_kernel(const acc_t* __restrict__ x, const scalar_t* __restrict__ p,
                                     const acc_t* __restrict__ inv, const acc_t* __restrict__ logs,
                                     acc_t* __restrict__ out, lik::Dims d, int family) {
  const int lane = threadIdx.x % kWarp;
  const int64_t SB = d.S * d.B, se = d.sE > 1 ? 1 : 0;
  for (int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp; row < SB;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t s = row / d.B, b = row % d.B;
    const acc_t* xr = x + b * d.E;
    const scalar_t* pr = p + row * d.E;
    acc_t acc = 0;
    if (family == kLikBernoulli) {
      for (int64_t e = lane; e < d.E; e += kWarp) acc += bernoulli_log_prob<acc_t>(xr[e], static_cast<acc_t>(pr[e]));
    } else {
      const int64_t so = d.scale_row(s, b);
      for (int64_t e = lane; e < d.E; e += kWarp)
        acc += log_density<acc_t>(family, xr[e], static_cast<acc_t>(pr[e]), inv[so + e * se], logs[so + e * se]);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[row] = acc;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_lse(const scalar_t* l, int64_t V, int lane) {
  LseState<acc_t> st = lse_init<acc_t>();
  for (int64_t v = lane; v < V; v += kWarp) st = lse_push(st, static_cast<acc_t>(l[v]));
  return lse_value(warp_lse(st));
}

template <typename scalar_t, typename acc_t>
__global__ void categorical_forward_kernel(const int64_t* __restrict__ x, const scalar_t* __restrict__ p,
                                           acc_t* __restrict__ out, lik::Dims d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t SB = d.S * d.B;
  for (int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp; row < SB;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t b = row % d.B;
    acc_t acc = 0;
    for (int64_t e = 0; e < d.E; ++e) {  // sequential over e: the sum stays deterministic
      const scalar_t* l = p + (row * d.E + e) * d.V;
      const acc_t lse = row_lse<scalar_t, acc_t>(l, d.V, lane);
      acc += categorical_log_prob<acc_t>(static_cast<acc_t>(l[x[b * d.E + e]]), lse);
    }
    if (lane == 0) out[row] = acc;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void dense_backward_kernel(const acc_t* __restrict__ x, const scalar_t* __restrict__ p,
                                      const acc_t* __restrict__ inv, const acc_t* __restrict__ g,
                                      scalar_t* __restrict__ gp, acc_t* __restrict__ gscale, lik::Dims d, int family) {
  const int64_t n = d.S * d.B * d.E, se = d.sE > 1 ? 1 : 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / d.E, e = i % d.E, s = row / d.B, b = row % d.B;
    const acc_t xv = x[b * d.E + e], pv = static_cast<acc_t>(p[i]), gr = g[row];
    if (family == kLikBernoulli) {
      if (gp) gp[i] = static_cast<scalar_t>(gr * bernoulli_log_prob_grad<acc_t>(xv, pv));
    } else {
      const int64_t so = d.scale_row(s, b) + e * se;
      const DensityGrad<acc_t> dg = log_density_grad<acc_t>(family, xv, pv, inv[so]);
      if (gp) gp[i] = static_cast<scalar_t>(weighted_grad(gr, dg.dloc));
      if (gscale) atomicAdd(gscale + so, weighted_grad(gr, dg.dscale));  // rows that share a scale entry
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void categorical_backward_kernel(const int64_t* __restrict__ x, const scalar_t* __restrict__ p,
                                            const acc_t* __restrict__ g, scalar_t* __restrict__ gp, lik::Dims d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = d.S * d.B * d.E;
  for (int64_t i = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp; i < rows;
       i += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = i / d.E, b = row % d.B, e = i % d.E;
    const scalar_t* l = p + i * d.V;
    const acc_t lse = row_lse<scalar_t, acc_t>(l, d.V, lane);
    const int64_t xi = x[b * d.E + e];
    const acc_t gr = g[row];
    for (int64_t v = lane; v < d.V; v += kWarp)
      gp[i * d.V + v] =
          static_cast<scalar_t>(gr * categorical_log_prob_grad<acc_t>(static_cast<acc_t>(l[v]), lse, v == xi));
  }
}

}  // namespace

at::Tensor likelihood_sum_cuda(const at::Tensor& x_in, const at::Tensor& params_in,
                               const std::optional<at::Tensor>& scale, int64_t family) {
  const lik::Dims d = lik::check_args(x_in, params_in, scale, family, "likelihood_sum", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(params_in.device());
  const at::Tensor x = x_in.contiguous(), params = params_in.contiguous();
  at::Tensor out = at::empty({d.S, d.B}, params.options().dtype(acc_type(params)));
  const int64_t SB = d.S * d.B;
  if (SB == 0) return out;
  if (d.E == 0) return out.zero_();
  if (family == kLikCategorical) lik::check_indices(x, d.V);
  at::Tensor inv, logs;
  if (family == kLikNormal || family == kLikLaplace) {
    const at::Tensor sc = scale->contiguous();
    inv = sc.reciprocal();
    logs = sc.log();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "likelihood_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const unsigned grid = grid_for(SB, kRowsPerBlock);
    if (family == kLikCategorical) {
      categorical_forward_kernel<scalar_t, acc_t><<<grid, kBlock, 0, stream>>>(
          x.const_data_ptr<int64_t>(), params.const_data_ptr<scalar_t>(), out.data_ptr<acc_t>(), d);
    } else {
      dense_forward_kernel<scalar_t, acc_t><<<grid, kBlock, 0, stream>>>(
          x.const_data_ptr<acc_t>(), params.const_data_ptr<scalar_t>(),
          inv.defined() ? inv.const_data_ptr<acc_t>() : nullptr,
          logs.defined() ? logs.const_data_ptr<acc_t>() : nullptr, out.data_ptr<acc_t>(), d, int(family));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> likelihood_sum_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                const at::Tensor& params_in,
                                                                const std::optional<at::Tensor>& scale, int64_t family,
                                                                bool params_grad, bool scale_grad) {
  const lik::Dims d = lik::check_backward_args(grad_in, x_in, params_in, scale, family, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(params_in.device());
  const auto acc = acc_type(params_in);
  const bool loc_family = family == kLikNormal || family == kLikLaplace;
  scale_grad = scale_grad && loc_family;
  const at::Tensor x = x_in.contiguous(), params = params_in.contiguous(), grad = grad_in.to(acc).contiguous();
  at::Tensor gparams = params_grad ? at::empty_like(params, at::MemoryFormat::Contiguous) : params.new_empty({0});
  at::Tensor gscale = scale_grad ? at::zeros_like(*scale, at::MemoryFormat::Contiguous)
                                 : params.new_empty({0}, params.options().dtype(acc));
  const int64_t SB = d.S * d.B;
  if (SB == 0 || d.E == 0 || !(params_grad || scale_grad)) return {gparams, gscale};
  if (family == kLikCategorical) lik::check_indices(x, d.V);
  at::Tensor inv;
  if (loc_family) inv = scale->contiguous().reciprocal();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "likelihood_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* pgp = params_grad ? gparams.data_ptr<scalar_t>() : nullptr;
    if (family == kLikCategorical) {
      if (!pgp) return;
      categorical_backward_kernel<scalar_t, acc_t><<<grid_for(SB * d.E, kRowsPerBlock), kBlock, 0, stream>>>(
          x.const_data_ptr<int64_t>(), params.const_data_ptr<scalar_t>(), grad.const_data_ptr<acc_t>(), pgp, d);
    } else {
      dense_backward_kernel<scalar_t, acc_t><<<grid_for(SB * d.E, kBlock), kBlock, 0, stream>>>(
          x.const_data_ptr<acc_t>(), params.const_data_ptr<scalar_t>(),
          inv.defined() ? inv.const_data_ptr<acc_t>() : nullptr, grad.const_data_ptr<acc_t>(), pgp,
          scale_grad ? gscale.data_ptr<acc_t>() : nullptr, d, int(family));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gparams, gscale};
}

}  // namespace cuda
}  // namespace mmvae_fast
