// Appendix B's cross-modal importance ratios on CUDA, mirroring csrc/cpu/importance_ratios.cpp:
//   ratio[r, d, k, b] = exp(a[d, r, k, b] - a[d, d, k, b])  (r != d),  1 on the diagonal,
// with z_d = z[d] detached. A warp per sample (d, k, b): lanes over L, the own density a[d, d]
// first, then one warp sum per expert r. Backward: gradients reach only expert r's loc and scale,
//   grad_loc/scale[r, b, :] += grad[r, d, k, b] ratio[r, d, k, b] d/d(loc, scale) log f_r(z_d)
// accumulated with atomics (shared over d and k). The maths is mixture.h / densities.h.
#include "mixture_rows.cuh"

namespace mmvae_fast {
namespace cuda {
namespace {

template <int F, typename T>
__global__ void forward_kernel(const T* __restrict__ z, const T* __restrict__ loc, const T* __restrict__ inv,
                               const T* __restrict__ lss, T* __restrict__ ratio, int64_t M, int64_t K, int64_t B,
                               int64_t L) {
  const int lane = threadIdx.x % kWarp;
  const int64_t KB = K * B, n = M * KB;
  for (int64_t i = blockIdx.x * int64_t(kSamplesPerBlock) + threadIdx.x / kWarp; i < n;
       i += int64_t(gridDim.x) * kSamplesPerBlock) {  // i = (d * K + k) * B + b
    const int64_t b = i % B, d = i / KB, kb = i % KB;
    const T* zrow = z + i * L;
    const int64_t od = (d * B + b) * L;
    const T own = warp_row_log_density<F>(zrow, loc + od, inv + od, L, lane) - lss[d * B + b];
    for (int64_t r = 0; r < M; ++r) {
      T v = T(1);
      if (r != d) {
        const int64_t o = (r * B + b) * L;
        v = importance_ratio(warp_row_log_density<F>(zrow, loc + o, inv + o, L, lane) - lss[r * B + b], own);
      }
      if (lane == 0) ratio[(r * M + d) * KB + kb] = v;
    }
  }
}

template <int F, typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ ratio, const T* __restrict__ z,
                                const T* __restrict__ loc, const T* __restrict__ inv, T* __restrict__ gloc,
                                T* __restrict__ gscale, int64_t M, int64_t K, int64_t B, int64_t L) {
  const int lane = threadIdx.x % kWarp;
  const int64_t KB = K * B, n = M * KB;
  for (int64_t i = blockIdx.x * int64_t(kSamplesPerBlock) + threadIdx.x / kWarp; i < n;
       i += int64_t(gridDim.x) * kSamplesPerBlock) {
    const int64_t b = i % B, d = i / KB, kb = i % KB;
    const T* zrow = z + i * L;
    for (int64_t r = 0; r < M; ++r) {
      if (r == d) continue;  // the constant diagonal
      const int64_t j = (r * M + d) * KB + kb;
      const T G = grad[j] * ratio[j];  // d ratio / d a[d, r] = ratio
      if (G == T(0)) continue;
      const int64_t o = (r * B + b) * L;
      for (int64_t l = lane; l < L; l += kWarp) {
        const DensityGrad<T> g = log_density_grad<T>(F, zrow[l], loc[o + l], inv[o + l]);
        atomicAdd(gloc + o + l, G * g.dloc);
        atomicAdd(gscale + o + l, G * g.dscale);
      }
    }
  }
}

}  // namespace

at::Tensor importance_ratios_cuda(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                  c10::string_view family) {
  const char* op = "mmvae_fast::importance_ratios";
  const int fam = parse_family(family);
  const c10::cuda::CUDAGuard guard(z.device());
  const Experts e = prepare_experts(z, loc, scale, op, at::kCUDA);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  at::Tensor ratio = at::empty({M, M, K, B}, e.z.options());
  if (ratio.numel() == 0) return ratio;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(e.z.scalar_type(), "importance_ratios_cuda", [&] {
    using T = scalar_t;
    auto launch = [&](auto kernel) {
      kernel<<<grid_for(M * K * B, kSamplesPerBlock), kMixBlock, 0, stream>>>(
          e.z.const_data_ptr<T>(), e.loc.const_data_ptr<T>(), e.inv.const_data_ptr<T>(),
          e.log_scale_sum.const_data_ptr<T>(), ratio.data_ptr<T>(), M, K, B, L);
    };
    if (fam == kNormal) launch(forward_kernel<kNormal, T>);
    else launch(forward_kernel<kLaplace, T>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ratio;
}

std::tuple<at::Tensor, at::Tensor> importance_ratios_backward_cuda(const at::Tensor& grad, const at::Tensor& ratio,
                                                                   const at::Tensor& z, const at::Tensor& loc,
                                                                   const at::Tensor& scale, c10::string_view family) {
  const char* op = "mmvae_fast::importance_ratios_backward";
  const int fam = parse_family(family);
  const c10::cuda::CUDAGuard guard(z.device());
  const Experts e = prepare_experts(z, loc, scale, op, at::kCUDA);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  const auto acc = e.z.scalar_type();
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({M, M, K, B}) && ratio.sizes() == grad.sizes(), op,
              ": grad and ratio must have shape [M, M, K, B]");
  const at::Tensor g = grad.to(acc).contiguous(), rt = ratio.to(acc).contiguous();
  at::Tensor gloc = at::zeros({M, B, L}, e.z.options()), gscale = at::zeros({M, B, L}, e.z.options());
  if (g.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(acc, "importance_ratios_backward_cuda", [&] {
      using T = scalar_t;
      auto launch = [&](auto kernel) {
        kernel<<<grid_for(M * K * B, kSamplesPerBlock), kMixBlock, 0, stream>>>(
            g.const_data_ptr<T>(), rt.const_data_ptr<T>(), e.z.const_data_ptr<T>(), e.loc.const_data_ptr<T>(),
            e.inv.const_data_ptr<T>(), gloc.data_ptr<T>(), gscale.data_ptr<T>(), M, K, B, L);
      };
      if (fam == kNormal) launch(backward_kernel<kNormal, T>);
      else launch(backward_kernel<kLaplace, T>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gloc.to(loc.scalar_type()), gscale.to(scale.scalar_type())};
}

}  // namespace cuda
}  // namespace mmvae_fast
