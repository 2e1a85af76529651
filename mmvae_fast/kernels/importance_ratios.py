"""importance_ratios in Triton, with the schemas of the C++ ops (csrc/ops.cpp):

    importance_ratios(z, loc, scale, family) -> ratio [M, M, K, B]
    importance_ratios_backward(grad, ratio, z, loc, scale, family) -> (dloc, dscale)

ratio[r, d, k, b] = exp(log q_r(z_d) - stopgrad log q_d(z_d)), 1 on the diagonal. The kernels
live in kernels/_mixture_rows.py (shared with mixture_log_density); backward uses the saved
ratios (d ratio / d a = ratio) and recomputes the log-densities' derivatives.
"""
import torch
from torch.library import triton_op, wrap_triton

from . import _mixture_rows as R
from ._common import acc_dtype


@triton_op("mmvae_fast_triton::importance_ratios", mutates_args=())
def importance_ratios(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: str) -> torch.Tensor:
    M, K, B, L, n_kc, BL = R.shape(z, R.K_CHUNK_FWD)
    ratio = torch.empty(M, M, K, B, dtype=acc_dtype(z.dtype), device=z.device)
    wrap_triton(R.ratios_fwd)[R.grid(M, n_kc, B)](
        z.contiguous(), loc.contiguous(), scale.contiguous(), ratio, M, K, B, L,
        NORMAL=family == "normal", K_CHUNK=R.K_CHUNK_FWD, BLOCK_L=BL,
    )
    return ratio


@triton_op("mmvae_fast_triton::importance_ratios_backward", mutates_args=())
def importance_ratios_backward(
    grad: torch.Tensor, ratio: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dloc, dscale); z_d is detached, so no dz."""
    _, dloc, dscale = R.pairwise_backward(
        z.contiguous(), loc.contiguous(), scale.contiguous(), None, ratio.contiguous(), grad.contiguous(), None,
        family == "normal", True,
    )
    return dloc, dscale
