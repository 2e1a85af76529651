"""importance_ratios in Triton: ratio[r, d, k, b] = exp(log q_r(z_d) - stopgrad log q_d(z_d)).

The kernels live in mmvae_fast/kernels/_mixture_rows.py (shared with mixture_log_density).
Forward also returns the own log-density log q_d(z_d), saved for backward.
"""
import torch
from torch.library import triton_op, wrap_triton

from . import _mixture_rows as R
from ._common import acc_dtype


@triton_op("mmvae_fast_triton::importance_ratios", mutates_args=())
def ratios_fwd(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, normal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio [M,M,K,B], own log-density log q_d(z_d) [M,K,B]) for contiguous inputs."""
    M, K, B, L, n_kc, BL = R.shape(z, R.K_CHUNK_FWD)
    dt = acc_dtype(z.dtype)
    ratio = torch.empty(M, M, K, B, dtype=dt, device=z.device)
    own = torch.empty(M, K, B, dtype=dt, device=z.device)
    wrap_triton(R.ratios_fwd)[R.grid(M, n_kc, B)](
        z, loc, scale, ratio, own, M, K, B, L, NORMAL=normal, K_CHUNK=R.K_CHUNK_FWD, BLOCK_L=BL,
    )
    return ratio, own


@triton_op("mmvae_fast_triton::importance_ratios_backward", mutates_args=())
def ratios_bwd(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, own: torch.Tensor, g_ratio: torch.Tensor | None, normal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dloc, dscale) from the ratios' cotangent; z_d is detached, so no dz."""
    _, dloc, dscale = R.pairwise_backward(z, loc, scale, None, own, g_ratio, None, normal, True)
    return dloc, dscale


def _ratios_setup(ctx, inputs, output):
    z, loc, scale, normal = inputs
    ctx.normal = normal
    ctx.save_for_backward(z, loc, scale, output[1])


def _ratios_backward(ctx, g_ratio, _g_own):
    z, loc, scale, own = ctx.saved_tensors
    g = None if g_ratio is None else g_ratio.contiguous()
    dloc, dscale = ratios_bwd(z, loc, scale, own, g, ctx.normal)
    return None, dloc, dscale, None  # z_d is detached: no gradient to z


ratios_fwd.register_autograd(_ratios_backward, setup_context=_ratios_setup)


def importance_ratios(z, loc, scale, family):
    """The backend entry of ops.importance_ratios."""
    ratio, _ = ratios_fwd(z.detach().contiguous(), loc.contiguous(), scale.contiguous(), family == "normal")
    return ratio
