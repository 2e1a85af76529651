"""Public op: per-sample log-likelihood sums over event dims, without expanding x over samples."""
import torch

from . import _dispatch, _validate


def likelihood_sum(x, params, *, family, scale=None, backend=None):
    """out[*S, b] = sum_e log p(x[b, e] | params[*S, b, e]) for x of shape [B, *E].

    family 'laplace' | 'normal': params is the location [*S, B, *E], `scale` a positive float or
        tensor broadcastable to params (required).
    family 'bernoulli': params are logits [*S, B, *E]; x in [0, 1].
    family 'categorical': params are logits [*S, B, *E, V]; x holds class indices in [0, V).
    x is data: it is never expanded over S and receives no gradient. Returns [*S, B] in float32
    (float64 for float64 params).
    """
    _validate.likelihood("family", family)
    _validate.tensor("params", params)
    _validate.tensor("x", x, floating=False)
    _validate.same_device(x=x, params=params)
    if x.dim() < 1:
        raise ValueError("argument 'x' must have a leading batch dim: shape [B, *event]")
    trailing = params.shape[params.dim() - x.dim() - (family == "categorical"):]
    event = trailing[:-1] if family == "categorical" else trailing
    if params.dim() < x.dim() + (family == "categorical") or tuple(event) != tuple(x.shape):
        what = "[*S, B, *E, V]" if family == "categorical" else "[*S, B, *E]"
        raise ValueError(
            f"argument 'params' must have shape {what} with x of shape [B, *E] = {tuple(x.shape)}, got {tuple(params.shape)}"
        )
    if family in ("laplace", "normal"):
        if scale is None:
            raise ValueError(f"argument 'scale' is required for family {family!r}")
        scale = torch.as_tensor(scale, dtype=params.dtype, device=params.device)
        _validate.tensor("scale", scale)
        _validate.positive("scale", scale)
        try:
            torch.broadcast_shapes(scale.shape, params.shape)
        except RuntimeError:
            raise ValueError(f"argument 'scale' of shape {tuple(scale.shape)} does not broadcast to params {tuple(params.shape)}") from None
    elif family == "categorical":
        if x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"argument 'x' must hold integer class indices for 'categorical', got {x.dtype}")
    elif not x.is_floating_point():
        x = x.to(params.dtype)
    b = _dispatch.resolve("likelihood_sum", backend, params.device.type)
    return _dispatch.impl("likelihood_sum", b)(x, params, family, scale)
