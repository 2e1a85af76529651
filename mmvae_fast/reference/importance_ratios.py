"""Appendix B's cross-modal importance ratios.

Layout as in mixture_log_density: z[r, k, b, l] is sample k of group r; loc, scale[m, b, l] expert m.
"""
import torch

from .mixture_log_density import pairwise_log_density


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
