"""The mixture-of-experts posterior density log q_mix(z) and its pairwise table.

Layout: z[r, k, b, l] is sample k of group r (drawn from expert r); loc, scale[m, b, l] are the
parameters of expert m. The pairwise table a[r, m, k, b] = sum_l log q_m(z[r, k, b, l]).
"""
import math

import torch

from .densities import log_density
from .importance_weights import safe_logsumexp


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
    M = loc.shape[0]
    a = pairwise_log_density(z, loc, scale, family) if mask is None or return_pairwise else None
    if mask is None:
        lse, _ = safe_logsumexp(a, (1,))
        lq = lse.squeeze(1) - math.log(M)
    else:
        present = mask[None, :, None, :]
        # an absent expert is no part of lq, whatever its parameters hold (NaN, say): its table entries
        # come from stand-in parameters, so not even a zero gradient times NaN reaches z
        keep = mask[:, :, None]
        a_present = pairwise_log_density(z, torch.where(keep, loc, 0.0), torch.where(keep, scale, 1.0), family)
        lse, _ = safe_logsumexp(a_present.masked_fill(~present, -math.inf), (1,))
        n = mask.sum(0).to(a_present.dtype)  # [B]
        log_n = torch.where(n > 0, torch.log(n.clamp_min(1)), torch.zeros_like(n))
        lq = lse.squeeze(1) - log_n
    return (lq, a) if return_pairwise else lq
