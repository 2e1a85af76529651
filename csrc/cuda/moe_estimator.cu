// The MoE bound and its gradient estimators on CUDA, forward and backward, with the contract of
// csrc/cpu/moe_estimator.cpp (same outputs, same saved tensors, same masks, -inf and NaN rules; the
// maths: mmvae_fast/reference/moe_estimator.py and mmvae_fast/moe_estimator.h).
//
// Forward, four launches on the current stream, no host sync:
//   prep    a warp per row of the experts [M, B] and the prior [B]: 1/scale and
//           norm = sum_l log scale + L const (absent experts: not read)
//   sample  a warp per sample i = (r K + k) B + b (lanes over L; adjacent warps read adjacent z
//           rows): a[r, m] for the present m by warp sums, their log-sum-exp, lq, lw, pi_own
//   stats   a block (32 items x 8 k-lanes) per 32 items and slice (r for looser, all r for
//           stratified): the slice's (max, log-sum) in two passes, as the CPU kernel
//   finish  elementwise: the bound per item, z_weight from pi_own (parked in z_weight) and wbar
// Backward, three launches:
//   prep    as above
//   sample  a warp per (item b, k-chunk c): for its samples (every r, k in the chunk) it writes
//           grad z and grad lpx (its own rows) and accumulates the item's loc, scale and prior
//           gradients in a private [2M + 2, L] slab (shared memory when it fits, else its slice of
//           the partials buffer); lanes own columns l, so no atomics and no races
//   reduce  partials [C, B, 2M + 2, L] summed over c in a fixed order: deterministic
// Memory: O(M K B) saved, scratch O((M + 1) B L) and C B (2M + 2) L with C B about 2048 warps.
#include <string>
#include <tuple>

#include "mmvae_fast/mixture.h"
#include "mmvae_fast/moe_estimator.h"
#include "mmvae_fast/moe_estimator_args.h"
#include "reduce.cuh"

namespace mmvae_fast {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr int kStatItems = 32;  // stats block: items along x (coalesced lw reads) ...
constexpr int kStatLanes = 8;   // ... and k-lanes along y
constexpr int kBwdWarps = 4;    // backward: warps per block (each its own (b, chunk))
constexpr int64_t kBwdTargetWarps = 2048;
constexpr size_t kSmemBudget = 48 * 1024;
constexpr int kMaxSampleTensors = 16;  // experts whose samples the kernels address in place (more: one stacked copy)

// The experts' samples (and their gradients) as the kernels address them: sample i = (r K + k) B + b
// of expert r at p[i / per] + (i % per) L. Each expert's own tensor (per = K B), or for more than
// kMaxSampleTensors experts one stacked buffer (per = M K B).
template <typename P>
struct Rows {
  P p[kMaxSampleTensors];
  int64_t per;
  __device__ __forceinline__ P row(int64_t i, int64_t L) const { return p[i / per] + (i % per) * L; }
};
template <typename T>
using Samples = Rows<const T*>;

__device__ __forceinline__ bool present(const bool* mask, int64_t m, int64_t b, int64_t B) {
  return mask == nullptr || mask[m * B + b];
}

__device__ __forceinline__ int64_t count_present(const bool* mask, int64_t M, int64_t b, int64_t B) {
  int64_t n = 0;
  for (int64_t m = 0; m < M; ++m) n += present(mask, m, b, B);
  return n;
}

// Rows j < M B: expert (m, b) = (j / B, j % B); rows M B + b: the prior of item b.
// inv[j, l] = 1 / scale, norm[j] = L const + sum_l log scale. Absent experts keep 1 and 0 (unread).
template <typename T>
__global__ void prep_kernel(const T* __restrict__ scale, const T* __restrict__ pscale, const bool* __restrict__ mask,
                            int fam, int pfam, int64_t M, int64_t B, int64_t L, T* __restrict__ inv,
                            T* __restrict__ norm) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = (M + 1) * B;
  for (int64_t j = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; j < rows;
       j += int64_t(gridDim.x) * kWarpsPerBlock) {
    const bool prior = j >= M * B;
    const T* s = prior ? pscale + (j - M * B) * L : scale + j * L;
    if (!prior && !present(mask, j / B, j % B, B)) {
      for (int64_t l = lane; l < L; l += kWarp) inv[j * L + l] = T(1);
      if (lane == 0) norm[j] = T(0);
      continue;
    }
    T acc = T(0);
    for (int64_t l = lane; l < L; l += kWarp) {
      const T sl = s[l];
      inv[j * L + l] = T(1) / sl;
      acc += std::log(sl);
    }
    acc = warp_sum(acc);
    if (lane == 0) norm[j] = T(L) * log_const<T>(prior ? pfam : fam) + acc;
  }
}

// sum_l log f(z_l; mu_l, 1/inv_l) = -sum_l phi(u_l) - norm, every lane gets it
template <int F, typename T>
__device__ __forceinline__ T warp_log_density(const T* z, const T* mu, const T* inv, T norm, int64_t L, int lane) {
  T acc = T(0);
  for (int64_t l = lane; l < L; l += kWarp) acc += phi<F>((z[l] - mu[l]) * inv[l]);
  return -warp_sum(acc) - norm;
}

// A warp per sample: lw, lq and pi_own = pi_r(z[r, k, b]) (into zw, finished by finish_kernel).
// Absent r: lw = -inf, lq = 0, zw = 0, as the CPU kernel.
template <int F, int PF, typename T>
__global__ void sample_forward_kernel(const Samples<T> z, const T* __restrict__ loc, const T* __restrict__ ploc,
                                      const T* __restrict__ inv, const T* __restrict__ norm, const T* __restrict__ lpx,
                                      const bool* __restrict__ mask, int64_t M, int64_t K, int64_t B, int64_t L,
                                      T* __restrict__ lw, T* __restrict__ lq, T* __restrict__ pi_own) {
  const int lane = threadIdx.x % kWarp;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t KB = K * B, n = M * KB;
  for (int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t b = i % B, r = i / KB;
    if (!present(mask, r, b, B)) {
      if (lane == 0) {
        lw[i] = ninf;
        lq[i] = T(0);
        if (pi_own != nullptr) pi_own[i] = T(0);
      }
      continue;
    }
    const T* zr = z.row(i, L);
    LseState<T> st = lse_init<T>();  // over the present experts; the same value as the CPU's max-shifted sum
    T ar = T(0);
    int64_t cnt = 0;
    for (int64_t m = 0; m < M; ++m) {
      if (!present(mask, m, b, B)) continue;
      ++cnt;
      const int64_t o = m * B + b;
      const T am = warp_log_density<F>(zr, loc + o * L, inv + o * L, norm[o], L, lane);
      if (m == r) ar = am;
      st = lse_push(st, am);
    }
    const T lse = lse_value(st);
    const int64_t po = M * B + b;
    const T lpz = warp_log_density<PF>(zr, ploc + b * L, inv + po * L, norm[po], L, lane);
    if (lane == 0) {
      const T lqi = lse - std::log(T(cnt));
      lq[i] = lqi;
      lw[i] = lpz + lpx[i] - lqi;
      // pi_own = exp(a_r - max) / sum: exact at any |a| (exp(a_r - lse) is not: a float32 lse ~ -5e7
      // cannot hold max + log 2); as the CPU kernel
      const bool fin = st.m - st.m == T(0);
      if (pi_own != nullptr) pi_own[i] = fin ? std::exp(ar - st.m) / st.s : std::exp(ar - lse);
    }
  }
}

// The slices' (max, log-sum) of lw, as the CPU's slice_stats: the NaN-propagating max, then the sum
// of exp(lw - max) unless max = -inf. Block (kStatItems, kStatLanes); grid (item tiles, M or 1).
template <typename T>
__global__ void stats_kernel(const T* __restrict__ lw, const bool* __restrict__ mask, const T* __restrict__ lse_in,
                             int bound, int64_t M, int64_t K, int64_t B, T* __restrict__ stats) {
  __shared__ T red[kStatLanes][kStatItems];
  const T ninf = -std::numeric_limits<T>::infinity();
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.x * int64_t(kStatItems) + tx;
  const bool active = b < B;
  const int64_t r_lo = bound == kLooser ? int64_t(blockIdx.y) : 0, r_hi = bound == kLooser ? r_lo + 1 : M;
  const int64_t si = bound == kLooser ? r_lo * B + b : b;
  if (lse_in != nullptr) {  // given (max, log-sum) pairs (uniform over the block: no barrier is skipped)
    if (active && ty == 0) {
      stats[si * 2] = lse_in[si * 2];
      stats[si * 2 + 1] = lse_in[si * 2 + 1];
    }
    return;
  }
  T mx = ninf;
  if (active)
    for (int64_t r = r_lo; r < r_hi; ++r)
      if (present(mask, r, b, B))
        for (int64_t k = ty; k < K; k += kStatLanes) {
          const T v = lw[(r * K + k) * B + b];
          mx = v > mx || v != v ? v : mx;
        }
  red[ty][tx] = mx;
  __syncthreads();
  if (ty == 0) {
    for (int y = 1; y < kStatLanes; ++y) {
      const T v = red[y][tx];
      mx = v > mx || v != v ? v : mx;
    }
    red[0][tx] = mx;
  }
  __syncthreads();
  mx = red[0][tx];
  __syncthreads();  // every thread has read red[0] before it is overwritten
  T s = T(0);
  if (active && !isinf(mx))  // an infinite max gives (max, 0), as on the CPU
    for (int64_t r = r_lo; r < r_hi; ++r)
      if (present(mask, r, b, B))
        for (int64_t k = ty; k < K; k += kStatLanes) s += std::exp(lw[(r * K + k) * B + b] - mx);
  red[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && active) {
    for (int y = 1; y < kStatLanes; ++y) s += red[y][tx];
    stats[si * 2] = mx;
    stats[si * 2 + 1] = isinf(mx) ? T(0) : std::log(s);
  }
}

// The bound per item and z_weight (zw holds pi_own on entry for the mixture estimators).
template <typename T>
__global__ void finish_kernel(const T* __restrict__ lw, const T* __restrict__ stats, const bool* __restrict__ mask,
                              int bound, int estimator, int64_t M, int64_t K, int64_t B, int64_t Kc,
                              T* __restrict__ out_bound, T* __restrict__ zw) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, t0 = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t b = t0; b < B; b += stride) {
    const int64_t cnt = count_present(mask, M, b, B);
    const T n = T(cnt == 0 ? 1 : cnt);
    T value;
    if (bound == kLooser) {
      value = T(0);
      for (int64_t r = 0; r < M; ++r)
        if (present(mask, r, b, B)) value += (stats[(r * B + b) * 2] + stats[(r * B + b) * 2 + 1]) / n;
      value -= std::log(T(Kc));  // a sum of quotients: near -3e38 a sum of log-normalisers would overflow
    } else {
      value = stats[b * 2] + stats[b * 2 + 1] - std::log(n * T(Kc));
    }
    out_bound[b] = cnt == 0 ? T(0) : value;
  }
  if (zw == nullptr) return;
  const int64_t KB = K * B, total = M * KB;
  for (int64_t i = t0; i < total; i += stride) {
    const int64_t b = i % B, r = i / KB;
    if (!present(mask, r, b, B)) continue;  // zw = 0 from the sample kernel
    const T* st = stats + (bound == kLooser ? r * B + b : b) * 2;
    const T w = moe_wbar(lw[i], st[0], st[1]);
    zw[i] = estimator == kEq8 ? w : T(1) - zw[i] * (T(1) - w);
  }
}

// A warp per (item b, k-chunk c): the CPU backward's per-sample loop over its samples, with the
// item's gradients of loc, scale (rows m, M + m) and of the prior (rows 2M, 2M + 1) accumulated in
// acc [2M + 2, L]; lane owns the columns l = lane + 32 j of every row.
template <int F, int PF, typename T>
__global__ void sample_backward_kernel(const T* __restrict__ g, const Samples<T> z, const T* __restrict__ loc,
                                       const T* __restrict__ ploc, const T* __restrict__ inv,
                                       const T* __restrict__ norm, const bool* __restrict__ mask,
                                       const T* __restrict__ lw, const T* __restrict__ stats, int bound, int estimator,
                                       int64_t M, int64_t K, int64_t B, int64_t L, int64_t Kc, int64_t C, int64_t kc,
                                       bool acc_in_smem, const Rows<T*> gz, T* __restrict__ glpx,
                                       T* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, W = blockDim.x / kWarp;
  const int64_t task = blockIdx.x * int64_t(W) + warp;
  if (task >= B * C) return;  // whole warps only; no block barrier below
  const int64_t b = task % B, c = task / B;
  const int64_t R = 2 * M + 2;
  T* pi = smem + warp * M;  // the responsibilities of the current sample, [M]
  T* acc = acc_in_smem ? smem + W * M + warp * R * L : partial + task * R * L;
  for (int64_t row = 0; row < R; ++row)
    for (int64_t l = lane; l < L; l += kWarp) acc[row * L + l] = T(0);

  const int64_t cnt = count_present(mask, M, b, B);
  const T n = T(cnt == 0 ? 1 : cnt);
  const T s = g[b] / (bound == kLooser ? n : T(1));
  const T cc = T(1) / (T(Kc) * (bound == kLooser ? T(1) : n));
  const T* pmu = ploc + b * L;
  const T* pinv = inv + (M * B + b) * L;
  const int64_t k0 = c * kc, k1 = k0 + kc < K ? k0 + kc : K;
  for (int64_t r = 0; r < M; ++r) {
    const bool on = present(mask, r, b, B);
    const T* st = stats + (bound == kLooser ? r * B + b : b) * 2;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = (r * K + k) * B + b;
      if (!on) {
        if (lane == 0) glpx[i] = T(0);
        for (int64_t l = lane; l < L; l += kWarp) gz.row(i, L)[l] = T(0);
        continue;
      }
      const T* zr = z.row(i, L);
      const T w = moe_wbar(lw[i], st[0], st[1]);
      const MoECoef<T> cf = moe_coef(estimator, s, w, cc);
      if (lane == 0) glpx[i] = cf.omega;
      __syncwarp();  // the previous sample's reads of pi are done
      for (int64_t m = 0; m < M; ++m) {
        if (!present(mask, m, b, B)) continue;
        const int64_t o = m * B + b;
        const T am = warp_log_density<F>(zr, loc + o * L, inv + o * L, norm[o], L, lane);
        if (lane == 0) pi[m] = am;
      }
      // pi_m = exp(a_m - max) / sum_m' exp(a_m' - max) over the present experts: exact at any |a|.
      // exp(a_m - lse) from the saved float32 lq is not: at |a| ~ 5e7 lq cannot hold a + log 2, and
      // two tied experts got pi 1 each (as the CPU kernel; exp(a - max) alone where the max is not finite).
      if (lane == 0) {
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t m = 0; m < M; ++m)
          if (present(mask, m, b, B)) mx = nan_max(mx, pi[m]);
        T sum = T(0);
        for (int64_t m = 0; m < M; ++m)
          if (present(mask, m, b, B)) sum += (pi[m] = std::exp(pi[m] - mx));
        const T inv_sum = mx - mx == T(0) && sum > T(0) ? T(1) / sum : T(1);
        for (int64_t m = 0; m < M; ++m)
          if (present(mask, m, b, B)) pi[m] *= inv_sum;
      }
      __syncwarp();
      const T om = cf.omega;
      const bool alias = cf.alias != T(0);  // NaN goes on, as on the CPU
      const T beta = alias ? -cf.alias * pi[r] : T(0);
      for (int64_t l = lane; l < L; l += kWarp) {
        const T zl = zr[l];
        T sum_dA = T(0), dA_own = T(0), u_own = T(0);
        for (int64_t m = 0; m < M; ++m) {
          if (!present(mask, m, b, B)) continue;
          const int64_t o = (m * B + b) * L + l;
          const T iv = inv[o];
          const T u = (zl - loc[o]) * iv;
          const T d = dphi<F>(u);
          const T dA = -d * iv;
          const T pm = pi[m];
          const T sc = -(m == r ? cf.score_own : cf.score_other) * pm;
          // weighted_grad: a zero weight contributes 0, not 0 * inf = NaN (a collapsed expert's
          // derivative overflows at the samples it gives no mass)
          sum_dA += weighted_grad(pm, dA);
          acc[m * L + l] += weighted_grad(sc, d * iv);
          acc[(M + m) * L + l] += weighted_grad(sc, (u * d - T(1)) * iv);
          if (m == r) {
            dA_own = dA;
            u_own = u;
          }
        }
        const T pu = (zl - pmu[l]) * pinv[l];
        const T pd = dphi<PF>(pu);
        gz.row(i, L)[l] = weighted_grad(om, -pd * pinv[l] - sum_dA);
        acc[2 * M * L + l] += weighted_grad(om, pd * pinv[l]);
        acc[(2 * M + 1) * L + l] += weighted_grad(om, (pu * pd - T(1)) * pinv[l]);
        if (alias) {  // -alias pi_r (dA_r - sum_m pi_m dA_m), through loc_r + scale_r eps
          const T ga = weighted_grad(beta, dA_own - sum_dA);
          acc[r * L + l] += ga;
          acc[(M + r) * L + l] += weighted_grad(ga, u_own);
        }
      }
    }
  }
  if (acc_in_smem) {
    T* out = partial + task * R * L;
    for (int64_t row = 0; row < R; ++row)
      for (int64_t l = lane; l < L; l += kWarp) out[row * L + l] = acc[row * L + l];
  }
}

// grad loc, scale [M, B, L] and prior loc, scale [B, L]: the partials summed over the chunks c in order.
template <typename T>
__global__ void reduce_backward_kernel(const T* __restrict__ partial, int64_t M, int64_t B, int64_t L, int64_t C,
                                       T* __restrict__ gloc, T* __restrict__ gscale, T* __restrict__ gploc,
                                       T* __restrict__ gpscale) {
  const int64_t R = 2 * M + 2, RL = R * L, total = B * RL;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < total; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = j / RL, rem = j % RL, row = rem / L, l = rem % L;
    T sum = T(0);
    for (int64_t c = 0; c < C; ++c) sum += partial[(c * B + b) * RL + rem];
    if (row < M) gloc[(row * B + b) * L + l] = sum;
    else if (row < 2 * M) gscale[((row - M) * B + b) * L + l] = sum;
    else if (row == 2 * M) gploc[b * L + l] = sum;
    else gpscale[b * L + l] = sum;
  }
}

// The samples' pointers (stacking them into `keep` when there are more than kMaxSampleTensors).
template <typename T>
Samples<T> samples(const std::vector<at::Tensor>& z, at::Tensor& keep) {
  Samples<T> s{};
  const int64_t M = static_cast<int64_t>(z.size());
  if (M <= kMaxSampleTensors) {
    for (int64_t r = 0; r < M; ++r) s.p[r] = z[r].const_data_ptr<T>();
    s.per = z[0].size(0) * z[0].size(1);
  } else {
    keep = at::stack(z);
    s.p[0] = keep.const_data_ptr<T>();
    s.per = keep.size(0) * keep.size(1) * keep.size(2);
  }
  return s;
}

// The gradients' pointers (into a stacked buffer `keep`, copied out by the caller, when there are
// more than kMaxSampleTensors experts).
template <typename T>
Rows<T*> grad_rows(const std::vector<at::Tensor>& gz, at::Tensor& keep) {
  Rows<T*> s{};
  const int64_t M = static_cast<int64_t>(gz.size());
  if (M <= kMaxSampleTensors) {
    for (int64_t r = 0; r < M; ++r) s.p[r] = gz[r].data_ptr<T>();
    s.per = gz[0].size(0) * gz[0].size(1);
  } else {
    keep = at::empty({M, gz[0].size(0), gz[0].size(1), gz[0].size(2)}, gz[0].options());
    s.p[0] = keep.data_ptr<T>();
    s.per = M * gz[0].size(0) * gz[0].size(1);
  }
  return s;
}

// The device checks (the rest: moe_forward_setup).
void check_devices(at::TensorList zs, const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& ploc,
                   const at::Tensor& pscale, const at::Tensor& lpx, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(!zs.empty(), "moe_estimator: z must hold the experts' samples, [K, B, L] each");
  const at::Tensor& z = zs[0];
  for (const auto& t : zs)
    TORCH_CHECK(t.is_cuda() && t.device() == z.device(), "moe_estimator: every tensor on z's CUDA device");
  for (const auto* t : {&loc, &scale, &ploc, &pscale, &lpx})
    TORCH_CHECK(t->is_cuda() && t->device() == z.device(), "moe_estimator: every tensor on z's CUDA device");
  if (mask.has_value()) TORCH_CHECK(mask->device() == z.device(), "moe_estimator: mask must be on z's device");
}

// 1/scale and the log-normalisers of the experts and the prior: ([(M + 1) B, L], [(M + 1) B]).
template <typename T>
std::tuple<at::Tensor, at::Tensor> prepare(const at::Tensor& scale, const at::Tensor& pscale, const bool* mask, int fam,
                                           int pfam, int64_t M, int64_t B, int64_t L, cudaStream_t stream) {
  auto inv = at::empty({(M + 1) * B, L}, scale.options());
  auto norm = at::empty({(M + 1) * B}, scale.options());
  prep_kernel<T><<<grid_for((M + 1) * B, kWarpsPerBlock), kBlock, 0, stream>>>(
      scale.const_data_ptr<T>(), pscale.const_data_ptr<T>(), mask, fam, pfam, M, B, L, inv.data_ptr<T>(),
      norm.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {inv, norm};
}

}  // namespace

// -> (bound [B], lw [M, K, B], z_weight [M, K, B] or [0], lq [M, K, B], stats [S, 2])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_estimator_cuda(
    at::TensorList z_, const at::Tensor& loc_, const at::Tensor& scale_, const at::Tensor& ploc_,
    const at::Tensor& pscale_, const at::Tensor& lpx_, c10::string_view family, c10::string_view prior_family,
    c10::string_view bound_s, c10::string_view estimator_s, const c10::optional<at::Tensor>& mask_,
    const c10::optional<at::Tensor>& lse_, c10::optional<int64_t> num_samples) {
  check_devices(z_, loc_, scale_, ploc_, pscale_, lpx_, mask_);
  const c10::cuda::CUDAGuard guard(z_[0].device());
  const MoEForward f = moe_forward_setup(z_, loc_, scale_, ploc_, pscale_, lpx_, family, prior_family, bound_s,
                                         estimator_s, mask_, lse_, num_samples);
  const auto& z = f.z;
  const auto &loc = f.loc, &scale = f.scale, &ploc = f.ploc, &pscale = f.pscale, &lpx = f.lpx;
  const auto &mask = f.mask, &lse = f.lse;
  const auto &out_bound = f.bound, &lw = f.lw, &zw = f.zw, &lq = f.lq, &stats = f.stats;
  const int fam = f.fam, pfam = f.pfam, bound = f.bound_kind, estimator = f.estimator;
  const bool want_zw = f.want_zw;
  const int64_t M = f.M, K = f.K, B = f.B, L = f.L, Kc = f.Kc;
  if (M == 0 || B == 0) {
    out_bound.zero_();
    return f.outputs();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* mk = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(z[0].scalar_type(), "moe_estimator_cuda", [&] {
    using T = scalar_t;  // float or double: the accumulation dtype is the input's
    const auto [inv, norm] = prepare<T>(scale, pscale, mk, fam, pfam, M, B, L, stream);
    at::Tensor stacked;
    const Samples<T> zs = samples<T>(z, stacked);
    moe_dispatch_families(fam, pfam, [&](auto F, auto PF) {
      sample_forward_kernel<decltype(F)::value, decltype(PF)::value, T>
          <<<grid_for(M * K * B, kWarpsPerBlock), kBlock, 0, stream>>>(
              zs, loc.const_data_ptr<T>(), ploc.const_data_ptr<T>(), inv.const_data_ptr<T>(), norm.const_data_ptr<T>(),
              lpx.const_data_ptr<T>(), mk, M, K, B, L, lw.data_ptr<T>(), lq.data_ptr<T>(),
              want_zw ? zw.data_ptr<T>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const dim3 sgrid(static_cast<unsigned>(ceil_div(B, kStatItems)), static_cast<unsigned>(bound == kLooser ? M : 1));
    stats_kernel<T><<<sgrid, dim3(kStatItems, kStatLanes), 0, stream>>>(
        lw.const_data_ptr<T>(), mk, lse.defined() ? lse.const_data_ptr<T>() : nullptr, bound, M, K, B,
        stats.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_kernel<T><<<grid_for(std::max(B, want_zw ? M * K * B : int64_t(0)), kBlock), kBlock, 0, stream>>>(
        lw.const_data_ptr<T>(), stats.const_data_ptr<T>(), mk, bound, estimator, M, K, B, Kc, out_bound.data_ptr<T>(),
        want_zw ? zw.data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return f.outputs();
}

// -> (grad z, grad loc, grad scale, grad prior loc [B, L], grad prior scale [B, L], grad lpx)
MoEBackward::Outputs moe_estimator_backward_cuda(const at::Tensor& grad_, at::TensorList z_, const at::Tensor& loc_,
                                                 const at::Tensor& scale_, const at::Tensor& ploc_,
                                                 const at::Tensor& pscale_, const c10::optional<at::Tensor>& mask_,
                                                 const at::Tensor& lw_, const at::Tensor& lq_, const at::Tensor& stats_,
                                                 c10::string_view family, c10::string_view prior_family,
                                                 c10::string_view bound_s, c10::string_view estimator_s,
                                                 c10::optional<int64_t> num_samples) {
  moe_check_samples(z_);
  const c10::cuda::CUDAGuard guard(z_[0].device());
  const MoEBackward q = moe_backward_setup(grad_, z_, loc_, scale_, ploc_, pscale_, mask_, lw_, lq_, stats_, family,
                                           prior_family, bound_s, estimator_s, num_samples);
  const auto& z = q.z;
  const auto &grad = q.grad, &loc = q.loc, &ploc = q.ploc, &mask = q.mask;
  const auto &lw = q.lw, &stats = q.stats, &scale = q.scale, &pscale = q.pscale;  // lq: not read (pi from a)
  const auto& gz = q.gz;
  const auto &gloc = q.gloc, &gscale = q.gscale, &gploc = q.gploc, &gpscale = q.gpscale, &glpx = q.glpx;
  const int fam = q.fam, pfam = q.pfam, bound = q.bound_kind, estimator = q.estimator;
  const int64_t M = q.M, K = q.K, B = q.B, L = q.L, Kc = q.Kc;
  if (M == 0 || B == 0) {
    for (const auto& t : gz) t.zero_();
    for (const auto* t : {&gloc, &gscale, &gploc, &gpscale, &glpx}) t->zero_();
    return q.outputs();
  }
  // (item, k-chunk) tasks, a warp each: about kBwdTargetWarps of them, every chunk non-empty
  int64_t C = std::max<int64_t>(1, std::min<int64_t>(K, ceil_div(kBwdTargetWarps, B)));
  const int64_t kc = std::max<int64_t>(1, ceil_div(K, C));
  C = std::max<int64_t>(1, ceil_div(K, kc));
  const int64_t R = 2 * M + 2;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* mk = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(z[0].scalar_type(), "moe_estimator_backward_cuda", [&] {
    using T = scalar_t;
    const auto [inv, norm] = prepare<T>(scale, pscale, mk, fam, pfam, M, B, L, stream);
    at::Tensor stacked, gz_stacked;
    const Samples<T> zs = samples<T>(z, stacked);
    const Rows<T*> gzs = grad_rows<T>(gz, gz_stacked);
    auto partial = at::empty({C, B, R, L}, z[0].options());
    // the accumulators in shared memory when a block of >= 1 warp fits the default budget
    const size_t per_warp = size_t(R * L + M) * sizeof(T);
    int W = kBwdWarps;
    while (W > 1 && size_t(W) * per_warp > kSmemBudget) W /= 2;
    const bool in_smem = size_t(W) * per_warp <= kSmemBudget;
    if (!in_smem) W = kBwdWarps;
    const size_t smem = size_t(W) * (in_smem ? per_warp : size_t(M) * sizeof(T));
    TORCH_CHECK(smem <= kSmemBudget, "moe_estimator_backward: too many experts (M = ", M, ")");
    moe_dispatch_families(fam, pfam, [&](auto F, auto PF) {
      sample_backward_kernel<decltype(F)::value, decltype(PF)::value, T>
          <<<static_cast<unsigned>(ceil_div(B * C, W)), W * kWarp, smem, stream>>>(
              grad.const_data_ptr<T>(), zs, loc.const_data_ptr<T>(), ploc.const_data_ptr<T>(), inv.const_data_ptr<T>(),
              norm.const_data_ptr<T>(), mk, lw.const_data_ptr<T>(), stats.const_data_ptr<T>(), bound, estimator, M, K,
              B, L, Kc, C, kc, in_smem, gzs, glpx.data_ptr<T>(), partial.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    reduce_backward_kernel<T><<<grid_for(B * R * L, kBlock), kBlock, 0, stream>>>(
        partial.const_data_ptr<T>(), M, B, L, C, gloc.data_ptr<T>(), gscale.data_ptr<T>(), gploc.data_ptr<T>(),
        gpscale.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (gz_stacked.defined())
      for (size_t r = 0; r < gz.size(); ++r) gz[r].copy_(gz_stacked[r]);
  });
  return q.outputs();
}

}  // namespace cuda
}  // namespace mmvae_fast
