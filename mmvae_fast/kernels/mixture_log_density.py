"""mixture_log_density in Triton: lq[r, k, b] = log (1/n_b) sum_{m present} q_m(z[r, k, b]).

The kernels (mmvae_fast/kernels/_mixture_rows.py) fold the pairwise table a[r, m, k, b] into an
online log-sum-exp in registers: nothing of size M*M*K*B*L exists, and a only when asked for.
Backward recomputes a from z and the saved lse over the present experts.
"""
import torch
from torch.library import triton_op, wrap_triton

from . import _mixture_rows as R
from ._common import acc_dtype


@triton_op("mmvae_fast_triton::mixture_log_density", mutates_args=())
def mixture_fwd(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None, normal: bool, write_a: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lq [M,K,B], lse over present experts [M,K,B], a [M,M,K,B] or empty) for contiguous inputs."""
    M, K, B, L, n_kc, BL = R.shape(z, R.K_CHUNK_FWD)
    dt = acc_dtype(z.dtype)
    lq = torch.empty(M, K, B, dtype=dt, device=z.device)
    lse = torch.empty(M, K, B, dtype=dt, device=z.device)
    a = torch.empty((M, M, K, B) if write_a else (0,), dtype=dt, device=z.device)
    wrap_triton(R.mixture_fwd)[R.grid(M, n_kc, B)](
        z, loc, scale, z if mask is None else mask, lq, lse, lq if not write_a else a, M, K, B, L,
        NORMAL=normal, HAS_MASK=mask is not None, WRITE_A=write_a, K_CHUNK=R.K_CHUNK_FWD, BLOCK_L=BL,
    )
    return lq, lse, a


@triton_op("mmvae_fast_triton::mixture_log_density_backward", mutates_args=())
def mixture_bwd(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None, lse: torch.Tensor,
    g_lq: torch.Tensor | None, g_a: torch.Tensor | None, normal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dloc, dscale) from the cotangents of lq and of the pairwise table a."""
    return R.pairwise_backward(z, loc, scale, mask, lse, g_lq, g_a, normal, False)


def _mixture_setup(ctx, inputs, output):
    z, loc, scale, mask, normal, write_a = inputs
    ctx.normal = normal
    ctx.save_for_backward(z, loc, scale, mask, output[1])


def _mixture_backward(ctx, g_lq, _g_lse, g_a):
    z, loc, scale, mask, lse = ctx.saved_tensors
    c = lambda g: None if g is None or g.numel() == 0 else g.contiguous()  # noqa: E731
    dz, dloc, dscale = mixture_bwd(z, loc, scale, mask, lse, c(g_lq), c(g_a), ctx.normal)
    return dz, dloc, dscale, None, None, None


mixture_fwd.register_autograd(_mixture_backward, setup_context=_mixture_setup)


def mixture_log_density(z, loc, scale, family, mask, return_pairwise):
    """The backend entry of ops.mixture_log_density (mask: bool [M, B] or None)."""
    m8 = None if mask is None else mask.to(torch.int8).contiguous()
    lq, _, a = mixture_fwd(z.contiguous(), loc.contiguous(), scale.contiguous(), m8, family == "normal", bool(return_pairwise))
    return (lq, a) if return_pairwise else lq
