"""Public ops: mixture-of-experts log-density and the cross-modal importance ratios."""
import torch

from . import _dispatch, _validate


def _check_experts(z, loc, scale, family):
    for n, t in (("z", z), ("loc", loc), ("scale", scale)):
        _validate.tensor(n, t)
    _validate.same_device(z=z, loc=loc, scale=scale)
    _validate.same_dtype(z=z, loc=loc, scale=scale)
    _validate.family("family", family)
    if z.dim() != 4:
        raise ValueError(f"argument 'z' must have shape [M, K, B, L] (groups, samples, batch, latent), got {tuple(z.shape)}")
    M, K, B, L = z.shape
    if min(M, K, B, L) < 1:
        raise ValueError(f"argument 'z' must have non-empty dims [M, K, B, L], got {tuple(z.shape)}")
    _validate.shape("loc", loc, (M, B, L), "experts, batch, latent: one expert per group of z")
    _validate.shape("scale", scale, (M, B, L), "experts, batch, latent")
    _validate.positive("scale", scale)


def mixture_log_density(z, loc, scale, *, family="normal", mask=None, return_pairwise=False, backend=None):
    """log q_mix(z) of the mixture of M experts with diagonal Normal/Laplace components.

    z[r, k, b, :] is sample k from expert r; loc, scale[m, b, :] parametrise expert m.
        a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l])
        lq[r, k, b]   = logsumexp_{m present} a[r, m, k, b] - log(#present)
    mask: optional bool [M] or [M, B], True where expert m is present for batch entry b.
    Returns lq [M, K, B], or (lq, a) with a [M, M, K, B] (raw, unmasked) if return_pairwise.
    Differentiable in z, loc and scale; accumulates in float32 (float64 for float64 input).
    """
    _check_experts(z, loc, scale, family)
    M, K, B, L = z.shape
    if mask is not None:
        _validate.tensor("mask", mask, floating=False)
        if mask.dtype != torch.bool:
            raise TypeError(f"argument 'mask' must be a bool tensor, got {mask.dtype}")
        _validate.same_device(z=z, mask=mask)
        if mask.dim() == 1:
            mask = mask[:, None]
        if mask.dim() != 2 or mask.shape[0] != M or mask.shape[1] not in (1, B):
            raise ValueError(f"argument 'mask' must have shape [M] or [M, B] = [{M}] or [{M}, {B}], got {tuple(mask.shape)}")
        mask = mask.expand(M, B)
    b = _dispatch.resolve("mixture_log_density", backend, z.device.type)
    return _dispatch.impl("mixture_log_density", b)(z, loc, scale, family, mask, bool(return_pairwise))


def importance_ratios(z, loc, scale, *, family="normal", backend=None):
    """Appendix B's cross-modal importance ratios.

        ratio[r, d, k, b] = exp(log q_r(z_d) - stopgrad(log q_d(z_d))),   z_d = z[d, k, b] detached

    with the diagonal r == d the constant 1. Returns [M, M, K, B]; gradients reach loc and scale
    of expert r only (never z, never the denominators).
    """
    _check_experts(z, loc, scale, family)
    b = _dispatch.resolve("importance_ratios", backend, z.device.type)
    return _dispatch.impl("importance_ratios", b)(z, loc, scale, family)
