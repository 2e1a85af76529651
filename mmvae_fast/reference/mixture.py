"""Mixture-of-experts posterior density and the cross-modal importance ratios of appendix B.

Layout: z[r, k, b, l] is sample k of group r (drawn from expert r); loc, scale[m, b, l] are the
parameters of expert m. The pairwise table a[r, m, k, b] = sum_l log q_m(z[r, k, b, l]).
"""
import math

import torch

from .densities import log_density
from .weights import safe_logsumexp


def pairwise_log_density(z, loc, scale, family: str):
    """a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l]).

    Materialises an M*M*K*B*L tensor: exactly what the fused kernels avoid.
    """
    return log_density(z[:, None], loc[None, :, None], scale[None, :, None], family).sum(-1)


def mixture_log_density(z, loc, scale, family: str, mask=None, return_pairwise: bool = False):
    """lq[r, k, b] = log (1/n_b) sum_{m present in b} q_m(z[r, k, b]), n_b experts present.

    mask: bool [M, B] (True = present) or None for all present. A batch entry with no expert
    present has lq = -inf. With return_pairwise, also returns the raw table a (mask not applied).
    """
    a = pairwise_log_density(z, loc, scale, family)
    M = a.shape[1]
    if mask is None:
        lse, _ = safe_logsumexp(a, (1,))
        lq = lse.squeeze(1) - math.log(M)
    else:
        present = mask[None, :, None, :]
        lse, _ = safe_logsumexp(a.masked_fill(~present, -math.inf), (1,))
        n = mask.sum(0).to(a.dtype)  # [B]
        log_n = torch.where(n > 0, torch.log(n.clamp_min(1)), torch.zeros_like(n))
        lq = lse.squeeze(1) - log_n
    return (lq, a) if return_pairwise else lq


def importance_ratios(z, loc, scale, family: str):
    """ratio[r, d, k, b] = exp(log q_r(z_d) - stopgrad log q_d(z_d)) with z_d = z[d] detached.

    The diagonal r == d is the constant 1 (no gradient), as in appendix B; off the diagonal the
    gradient reaches only expert r's parameters.
    """
    return ratios_from_pairwise(pairwise_log_density(z.detach(), loc, scale, family))


def ratios_from_pairwise(a):
    """Appendix B's ratios from a pairwise table a[d, r, k, b] = log q_r(z_d) computed at detached z."""
    own = torch.diagonal(a, 0, 0, 1).permute(2, 0, 1)  # [d, K, B] = log q_d(z_d)
    ratio = torch.exp(a.transpose(0, 1) - own.detach()[None])
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)[:, :, None, None]
    return torch.where(eye, torch.ones_like(ratio), ratio)
