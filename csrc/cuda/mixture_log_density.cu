// Fused mixture-of-experts log-density on CUDA, mirroring csrc/cpu/mixture_log_density.cpp:
//   a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l])
//   lq[r, k, b]   = logsumexp_{m present in b} a[r, m, k, b] - log(#present in b)
// A warp per sample (r, k, b): lanes over L, a warp sum per expert, the online log-sum-exp of
// math.h over m (every lane holds the same state). Nothing of size M*M*K*B*L exists; forward keeps
// only lq. Backward recomputes a one expert at a time:
//   G[r, m, k, b] = grad_lq * pi[r, m, k, b] + grad_a[r, m, k, b],  pi = exp(a - max) / sum (recomputed)
//   grad_z  += G d/dz log f      (the warp owns its sample: plain read-modify-write)
//   grad_loc, grad_scale[m, b, :] += G d/d(loc, scale) log f   (shared over r, k: atomics)
#include <array>

#include "mixture_rows.cuh"

namespace mmvae_fast {
namespace cuda {
namespace {

template <int F, typename T>
__global__ void forward_kernel(const T* __restrict__ z, const T* __restrict__ loc, const T* __restrict__ inv,
                               const T* __restrict__ lss, const uint8_t* __restrict__ present,
                               const int64_t* __restrict__ count, T* __restrict__ lq, T* __restrict__ a, int64_t M,
                               int64_t K, int64_t B, int64_t L) {
  const int lane = threadIdx.x % kWarp;
  const int64_t KB = K * B, n = M * KB;
  for (int64_t i = blockIdx.x * int64_t(kSamplesPerBlock) + threadIdx.x / kWarp; i < n;
       i += int64_t(gridDim.x) * kSamplesPerBlock) {  // i = (r * K + k) * B + b
    const int64_t b = i % B, r = i / KB, kb = i % KB;
    const T* zrow = z + i * L;
    LseState<T> st = lse_init<T>();
    for (int64_t m = 0; m < M; ++m) {
      const bool on = present[m * B + b];
      if (!on && a == nullptr) continue;  // absent and not asked for: skip the work
      const int64_t o = (m * B + b) * L;
      const T am = warp_row_log_density<F>(zrow, loc + o, inv + o, L, lane) - lss[m * B + b];
      if (a != nullptr && lane == 0) a[(r * M + m) * KB + kb] = am;
      if (on) st = lse_push(st, am);
    }
    // lq = lse over the present experts - log(#present); -inf when none is present; NaN propagates
    if (lane == 0)
      lq[i] = count[b] == 0 ? -std::numeric_limits<T>::infinity() : lse_value(st) - log_expert_count<T>(count[b]);
  }
}

template <int F, typename T>
__global__ void backward_kernel(const T* __restrict__ z, const T* __restrict__ loc, const T* __restrict__ inv,
                                const T* __restrict__ lss, const T* __restrict__ lq, const T* __restrict__ glq,
                                const T* __restrict__ ga, const uint8_t* __restrict__ present,
                                const int64_t* __restrict__ count, T* __restrict__ gz, T* __restrict__ gloc,
                                T* __restrict__ gscale, int64_t M, int64_t K, int64_t B, int64_t L) {
  const int lane = threadIdx.x % kWarp;
  const int64_t KB = K * B, n = M * KB;
  for (int64_t i = blockIdx.x * int64_t(kSamplesPerBlock) + threadIdx.x / kWarp; i < n;
       i += int64_t(gridDim.x) * kSamplesPerBlock) {
    const int64_t b = i % B, r = i / KB, kb = i % KB;
    const T* zrow = z + i * L;
    // the log-sum-exp's (max, sum) recomputed: pi_m = exp(a_m - max) / sum is exact at any |a| (the
    // saved lq is rounded: at |a| ~ 1e20, lq + log M is lq and M tied experts would each get 1)
    LseState<T> st = lse_init<T>();
    if (glq)
      for (int64_t m = 0; m < M; ++m)
        if (present[m * B + b]) {
          const int64_t o = (m * B + b) * L;
          st = lse_push(st, warp_row_log_density<F>(zrow, loc + o, inv + o, L, lane) - lss[m * B + b]);
        }
    for (int64_t m = 0; m < M; ++m) {
      const int64_t o = (m * B + b) * L;
      T G = ga ? ga[(r * M + m) * KB + kb] : T(0);
      if (glq && present[m * B + b] && st.m != -std::numeric_limits<T>::infinity()) {
        const T am = warp_row_log_density<F>(zrow, loc + o, inv + o, L, lane) - lss[m * B + b];
        G += weighted_grad(glq[i], std::exp(am - st.m) / st.s);
      }
      if (G == T(0)) continue;  // warp-uniform: nothing flows to this expert (NaN does go on)
      for (int64_t l = lane; l < L; l += kWarp) {
        const DensityGrad<T> d = log_density_grad<T>(F, zrow[l], loc[o + l], inv[o + l]);
        if (gz) gz[i * L + l] += G * d.dx;
        if (gloc) {
          atomicAdd(gloc + o + l, G * d.dloc);
          atomicAdd(gscale + o + l, G * d.dscale);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                                const std::string& family, const c10::optional<at::Tensor>& mask,
                                                bool pairwise) {
  const char* op = "mmvae_fast::mixture_log_density";
  const int fam = parse_family(family);
  const c10::cuda::CUDAGuard guard(z.device());
  const Experts e = prepare_experts(z, loc, scale, op, at::kCUDA);
  const auto [present, count] = prepare_mask(mask, e.M, e.B, z.device(), op);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  at::Tensor lq = at::empty({M, K, B}, e.z.options());
  at::Tensor a = pairwise ? at::empty({M, M, K, B}, e.z.options()) : at::Tensor();
  if (lq.numel() == 0) return {lq, a};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(e.z.scalar_type(), "mixture_log_density_cuda", [&] {
    using T = scalar_t;
    auto launch = [&](auto kernel) {
      kernel<<<grid_for(M * K * B, kSamplesPerBlock), kMixBlock, 0, stream>>>(
          e.z.const_data_ptr<T>(), e.loc.const_data_ptr<T>(), e.inv.const_data_ptr<T>(),
          e.log_scale_sum.const_data_ptr<T>(), present.const_data_ptr<uint8_t>(), count.const_data_ptr<int64_t>(),
          lq.data_ptr<T>(), pairwise ? a.data_ptr<T>() : nullptr, M, K, B, L);
    };
    if (fam == kNormal) launch(forward_kernel<kNormal, T>);
    else launch(forward_kernel<kLaplace, T>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lq, a};
}

}  // namespace

at::Tensor mixture_log_density_cuda(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
                                    c10::string_view family, const c10::optional<at::Tensor>& mask) {
  return std::get<0>(forward_impl(z, loc, scale, std::string(family), mask, false));
}

std::tuple<at::Tensor, at::Tensor> mixture_log_density_pairwise_cuda(const at::Tensor& z, const at::Tensor& loc,
                                                                     const at::Tensor& scale, c10::string_view family,
                                                                     const c10::optional<at::Tensor>& mask) {
  return forward_impl(z, loc, scale, std::string(family), mask, true);
}

// Gradients with respect to (z, loc, scale); an entry of output_mask that is false gives an
// empty tensor (the caller returns None for it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_log_density_backward_cuda(
    const c10::optional<at::Tensor>& grad_lq, const c10::optional<at::Tensor>& grad_a, const at::Tensor& z,
    const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& lq, c10::string_view family,
    const c10::optional<at::Tensor>& mask, std::array<bool, 3> output_mask) {
  const char* op = "mmvae_fast::mixture_log_density_backward";
  const int fam = parse_family(family);
  const c10::cuda::CUDAGuard guard(z.device());
  const Experts e = prepare_experts(z, loc, scale, op, at::kCUDA);
  const auto [present, count] = prepare_mask(mask, e.M, e.B, z.device(), op);
  const int64_t M = e.M, K = e.K, B = e.B, L = e.L;
  const auto acc = e.z.scalar_type();
  const bool gx = output_mask[0], gp = output_mask[1] || output_mask[2];
  const auto [lqc, glq, ga] = prepare_mixture_cotangents(grad_lq, grad_a, lq, e, op);
  at::Tensor gz = gx ? at::zeros_like(e.z) : at::Tensor();
  at::Tensor gloc = gp ? at::zeros({M, B, L}, e.z.options()) : at::Tensor();
  at::Tensor gscale = gp ? at::zeros({M, B, L}, e.z.options()) : at::Tensor();
  if ((gx || gp) && (glq.defined() || ga.defined()) && lqc.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(acc, "mixture_log_density_backward_cuda", [&] {
      using T = scalar_t;
      auto launch = [&](auto kernel) {
        kernel<<<grid_for(M * K * B, kSamplesPerBlock), kMixBlock, 0, stream>>>(
            e.z.const_data_ptr<T>(), e.loc.const_data_ptr<T>(), e.inv.const_data_ptr<T>(),
            e.log_scale_sum.const_data_ptr<T>(), lqc.const_data_ptr<T>(),
            glq.defined() ? glq.const_data_ptr<T>() : nullptr, ga.defined() ? ga.const_data_ptr<T>() : nullptr,
            present.const_data_ptr<uint8_t>(), count.const_data_ptr<int64_t>(), gx ? gz.data_ptr<T>() : nullptr,
            gp ? gloc.data_ptr<T>() : nullptr, gp ? gscale.data_ptr<T>() : nullptr, M, K, B, L);
      };
      if (fam == kNormal) launch(backward_kernel<kNormal, T>);
      else launch(backward_kernel<kLaplace, T>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return mixture_gradients(gz, gloc, gscale, z, loc, scale, output_mask);
}

}  // namespace cuda
}  // namespace mmvae_fast
