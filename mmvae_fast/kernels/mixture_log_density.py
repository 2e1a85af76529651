"""mixture_log_density in Triton, with the schemas of the C++ ops (csrc/ops.cpp):

    mixture_log_density(z, loc, scale, family, mask?) -> lq [M, K, B]
    mixture_log_density_pairwise(z, loc, scale, family, mask?) -> (lq, a [M, M, K, B])
    mixture_log_density_backward(grad_lq?, grad_a?, z, loc, scale, lq, family, mask?, output_mask)
        -> (dz, dloc, dscale)

The kernels (kernels/_mixture_rows.py) fold the pairwise table a[r, m, k, b] into an online
log-sum-exp in registers: nothing of size M*M*K*B*L exists, and a only when asked for. Backward
recomputes a from z, and the log-sum-exp over the present experts from the saved lq.
"""
import torch
from torch.library import triton_op, wrap_triton

from . import _mixture_rows as R
from ._common import acc_dtype


def _mask8(mask):
    return None if mask is None else mask.to(torch.int8).contiguous()


def _forward(z, loc, scale, family, mask, write_a, stats=False):
    """(lq, a); stats: (the log-sum-exp's max, its sum of exp(a - max)) per sample instead."""
    M, K, B, L, n_kc, BL = R.shape(z, R.K_CHUNK_FWD)
    dt = acc_dtype(z.dtype)
    lq = torch.empty(M, K, B, dtype=dt, device=z.device)
    a = torch.empty((M, M, K, B) if write_a else (0,), dtype=dt, device=z.device)
    total = torch.empty(M, K, B, dtype=dt, device=z.device) if stats else lq
    m8 = _mask8(mask)
    z = z.contiguous()
    wrap_triton(R.mixture_fwd)[R.grid(M, n_kc, B)](
        z, loc.contiguous(), scale.contiguous(), z if m8 is None else m8, lq, a if write_a else lq, total, M, K, B, L,
        NORMAL=family == "normal", HAS_MASK=m8 is not None, WRITE_A=write_a, STATS=stats, K_CHUNK=R.K_CHUNK_FWD,
        BLOCK_L=BL,
    )
    return (lq, total) if stats else (lq, a)


@triton_op("mmvae_fast_triton::mixture_log_density", mutates_args=())
def mixture_log_density(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: str, mask: torch.Tensor | None
) -> torch.Tensor:
    return _forward(z, loc, scale, family, mask, False)[0]


@triton_op("mmvae_fast_triton::mixture_log_density_pairwise", mutates_args=())
def mixture_log_density_pairwise(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: str, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(z, loc, scale, family, mask, True)


@triton_op("mmvae_fast_triton::mixture_log_density_backward", mutates_args=())
def mixture_log_density_backward(
    grad_lq: torch.Tensor | None, grad_a: torch.Tensor | None, z: torch.Tensor, loc: torch.Tensor,
    scale: torch.Tensor, lq: torch.Tensor, family: str, mask: torch.Tensor | None, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dloc, dscale), each empty where output_mask does not ask for it."""
    # the responsibilities exp(a - max) / sum from the log-sum-exp's (max, sum) recomputed here: the
    # saved lq is rounded (at |a| ~ 1e20, lq + log M is lq, and M tied experts would each get weight 1)
    mx, total = _forward(z, loc, scale, family, mask, False, stats=True) if grad_lq is not None else (lq, None)
    c = lambda g: None if g is None else g.contiguous()  # noqa: E731
    grads = R.pairwise_backward(
        z.contiguous(), loc.contiguous(), scale.contiguous(), _mask8(mask), mx, c(grad_lq), c(grad_a),
        family == "normal", False, total,
    )
    return tuple(g if want else g.new_empty((0,)) for g, want in zip(grads, output_mask))
