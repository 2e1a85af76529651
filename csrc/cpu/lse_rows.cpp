// A small real op that proves the build path (header + OpenMP + registration):
// logsumexp over the last dim of a 2-D tensor with the shared online log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "mmvae_fast/math.h"

namespace mmvae_fast {

at::Tensor lse_rows_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "lse_rows: expected a 2-D tensor [rows, n], got ", x_in.dim(), " dims");
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.to(acc).contiguous();
  const int64_t R = x.size(0), N = x.size(1);
  at::Tensor out = at::empty({R}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lse_rows_cpu", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        LseState<scalar_t> st = lse_init<scalar_t>();
        for (int64_t j = 0; j < N; ++j) st = lse_push(st, px[r * N + j]);
        po[r] = lse_value(st);
      }
    });
  });
  return out;
}

}  // namespace mmvae_fast
