"""Log-densities of the location-scale families used for priors and posteriors."""
import math

import torch

from .._numerics import FAMILIES, acc_dtype

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


def _overflow(d, scale, normal: bool):
    """Where the density's phi(u), u = d / scale, overflows (0.5 u^2 for the Normal, computed as the
    kernels do, |u| for the Laplace): the density is -inf there. NaN is no overflow."""
    u = d / scale
    return torch.isinf(0.5 * u * u if normal else u)


def _weighted(g, d):
    """g * d with g == 0 giving exactly 0 (the kernels' weighted_grad): a term of zero weight can have
    an infinite derivative, and 0 * inf would be NaN. NaN g still propagates."""
    return g * torch.where(g == 0, torch.zeros_like(d), d)


class _LogDensity(torch.autograd.Function):
    """log f(x; loc, scale) = -phi(u) - log scale - log_const, u = (x - loc) / scale, with docs/design.md
    section 2's gradients, the same rule as the kernels (csrc/include/mmvae_fast/densities.h): an
    overflowed (-inf) density has zero gradients, and a zero cotangent gives exactly 0 even where the
    derivative is infinite (autograd's chain rule would give 0 * inf = NaN there). The backward is
    built from differentiable ops, so second derivatives still work."""

    @staticmethod
    def forward(x, loc, scale, normal):
        d = x - loc
        ovf = _overflow(d, scale, normal)
        d, scale = torch.where(ovf, 0.0, d), torch.where(ovf, 1.0, scale)  # harmless stand-ins, no host sync
        u = d / scale
        phi = 0.5 * u * u if normal else torch.abs(u)
        out = -phi - torch.log(scale) - (_HALF_LOG_2PI if normal else _LOG_2)
        return torch.where(ovf, -math.inf, out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, loc, scale, normal = inputs
        ctx.save_for_backward(x, loc, scale)
        ctx.normal = normal

    @staticmethod
    def backward(ctx, g):
        x, loc, scale = ctx.saved_tensors
        d = x - loc
        with torch.no_grad():
            ovf = _overflow(d, scale, ctx.normal)
        d, s = torch.where(ovf, 0.0, d), torch.where(ovf, 1.0, scale)
        u = d / s
        dphi = u if ctx.normal else torch.sign(u)  # sign(0) = 0, as torch's abs backward
        zero = torch.zeros_like(u)
        dx = torch.where(ovf, zero, -dphi / s)
        dscale = torch.where(ovf, zero, (u * dphi - 1) / s)
        need = ctx.needs_input_grad
        gx = _weighted(g, dx) if need[0] or need[1] else None
        return (gx.sum_to_size(x.shape) if need[0] else None, (-gx).sum_to_size(loc.shape) if need[1] else None,
                _weighted(g, dscale).sum_to_size(scale.shape) if need[2] else None, None)


def log_density(x, loc, scale, family: str):
    """Elementwise log f(x; loc, scale) for f Normal or Laplace, in the accumulation dtype.

    docs/design.md section 2: where phi(u) overflows (u = (x - loc) / scale) the density is -inf with
    zero gradients, and a term of zero weight (zero cotangent) gets exactly zero gradients even where
    its derivative is infinite (a tiny scale far from x), never NaN. NaN still propagates."""
    dt = acc_dtype(torch.promote_types(torch.promote_types(x.dtype, loc.dtype), scale.dtype))
    x, loc, scale = x.to(dt), loc.to(dt), scale.to(dt)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return _LogDensity.apply(x, loc, scale, family == "normal")


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
