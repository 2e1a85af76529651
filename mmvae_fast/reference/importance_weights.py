"""Importance weights: the bound log-mean-exp, the normalised weights and their squares."""
import math

import torch

from .._numerics import acc_dtype


def normalize_dims(dim, ndim: int) -> tuple:
    """A sorted tuple of distinct non-negative dims from an int or a sequence of ints."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        dims = (dim,)
    elif isinstance(dim, (tuple, list, torch.Size)):
        dims = tuple(dim)
    else:
        raise TypeError(f"argument 'dim' must be an int or a tuple of ints (the dims to reduce over), "
                        f"got {type(dim).__name__} {dim!r}")
    if len(dims) == 0:
        raise ValueError("dim must name at least one dimension to reduce over")
    out = []
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool):
            raise TypeError(f"argument 'dim' must hold ints, got {type(d).__name__} {d!r} in {dim!r}")
        if not -ndim <= d < ndim:
            raise ValueError(f"dim {d!r} is out of range for a tensor with {ndim} dims")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"dim has repeated entries: {dim!r}")
    return tuple(sorted(out))


def importance_weights(lw, dim=0):
    """bound = logmeanexp_dim lw, wbar = softmax_dim lw, wbar_sq = wbar**2.

    A slice whose entries are all -inf has bound -inf, weights 0 and zero gradients; NaN propagates.
    """
    dims = normalize_dims(dim, lw.dim())
    x = lw.to(acc_dtype(lw.dtype))
    n = math.prod(x.shape[d] for d in dims)
    lse, wbar = safe_logsumexp(x, dims)
    bound = (lse - math.log(n)).squeeze(dims)
    return bound, wbar, wbar * wbar


def safe_logsumexp(x, dims):
    """(logsumexp over dims keeping them, softmax over dims) with all -inf slices giving
    (-inf, 0) and zero gradients instead of NaN, and a +inf giving +inf (its weight and gradient
    NaN: the softmax is undefined there)."""
    m = x.detach().amax(dims, keepdim=True)
    # shift by 0 where the max is infinite: all -inf gives exp(x - 0) = 0; a +inf gives a sum of +inf
    # (not exp(inf - inf) = NaN), so the bound is +inf unless a NaN is in the slice
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    s = e.sum(dims, keepdim=True)
    empty = s == 0  # NaN is not empty: it must propagate
    s_safe = torch.where(empty, torch.ones_like(s), s)
    lse = torch.where(empty, torch.full_like(s, -math.inf), m + torch.log(s_safe))
    return lse, e / s_safe
