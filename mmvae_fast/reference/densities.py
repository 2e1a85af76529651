"""Log-densities of the location-scale families used for priors and posteriors."""
import math

import torch

from .._numerics import FAMILIES, acc_dtype

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


def log_density(x, loc, scale, family: str):
    """Elementwise log f(x; loc, scale) for f Normal or Laplace, in the accumulation dtype.

    Where |x - loc| / scale overflows (its square, for the Normal) the density is -inf with zero
    gradients (docs/design.md section 2), not the 0 * inf = NaN that autograd would give: those entries
    are computed from a harmless stand-in (u = 0) and then set to -inf. NaN still propagates."""
    dt = acc_dtype(torch.promote_types(torch.promote_types(x.dtype, loc.dtype), scale.dtype))
    x, loc, scale = x.to(dt), loc.to(dt), scale.to(dt)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    d = x - loc
    with torch.no_grad():
        u0 = d / scale
        overflow = torch.isinf(u0 * u0 if family == "normal" else u0)
    d, scale = torch.where(overflow, 0.0, d), torch.where(overflow, 1.0, scale)  # no branch: no host sync
    u = d / scale
    if family == "normal":
        out = -0.5 * u * u - torch.log(scale) - _HALF_LOG_2PI
    else:
        out = -torch.abs(u) - torch.log(scale) - _LOG_2
    return torch.where(overflow, -math.inf, out)


def log_density_sum(x, loc, scale, family: str):
    """sum_l log f(x[..., l]; loc[..., l], scale[..., l]): a diagonal density over the last dim."""
    return log_density(x, loc, scale, family).sum(-1)


def kl_divergence(loc_q, scale_q, loc_p, scale_p, family: str):
    """Closed-form KL(q || p) per coordinate for two members of the same family."""
    dt = acc_dtype(loc_q.dtype)
    loc_q, scale_q, loc_p, scale_p = (t.to(dt) for t in (loc_q, scale_q, loc_p, scale_p))
    if family == "normal":
        var_ratio = (scale_q / scale_p) ** 2
        t1 = ((loc_q - loc_p) / scale_p) ** 2
        return 0.5 * (var_ratio + t1 - 1 - torch.log(var_ratio))
    if family == "laplace":
        # E_q|z - m_p| for z ~ Laplace(m_q, b_q) is |d| + b_q exp(-|d|/b_q)
        d = torch.abs(loc_q - loc_p)
        return -torch.log(scale_q / scale_p) - 1 + (d + scale_q * torch.exp(-d / scale_q)) / scale_p
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
