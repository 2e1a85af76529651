"""likelihood_sum: per-sample log-likelihood sums over event dims, without expanding x over samples.

The public op, and the wiring of the backends' op <ns>::likelihood_sum (the C++ op of csrc/cpu and
csrc/cuda, and the Triton op of mmvae_fast/kernels, one schema). The op sees flattened shapes: x [B, E], params [S, B, E] (categorical:
[S, B, E, V]) and, for normal / laplace, the scale compacted to [S|1, B|1, E|1]: a dim group the
scale broadcasts over stays of size 1, so a scalar or per-pixel scale is never expanded over
samples or batch. The scale gets its gradient when it requires one.
"""
import math

import torch

from . import _dispatch, _extension, _validate
from ._autograd import first_order_only
from .._numerics import LIKELIHOOD_CODES, acc_dtype


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
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            _validate.positive("scale", scale)
            scale = torch.tensor(scale, dtype=params.dtype, device=params.device)
        else:
            scale = torch.as_tensor(scale, dtype=params.dtype, device=params.device)
            _validate.tensor("scale", scale)
            _validate.positive("scale", scale)
        _validate.broadcasts("scale", scale, "params", params)
    elif scale is not None:
        raise ValueError(f"argument 'scale' applies to 'normal' and 'laplace' only; family {family!r} takes logits "
                         "and no scale: pass scale=None")
    if family == "categorical":
        if x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"argument 'x' must hold integer class indices for 'categorical', got {x.dtype}")
        _validate.class_indices("x", x, params.shape[-1])
    elif family == "bernoulli":
        if not x.is_floating_point():
            x = x.to(params.dtype)
        _validate.unit_interval("x", x)
    b = _dispatch.resolve("likelihood_sum", backend, params.device.type)
    return _dispatch.impl("likelihood_sum", b)(x, params, family, scale)


# ---- the backends' op <ns>::likelihood_sum (ns: mmvae_fast, the C++ op of the cpu and cuda
# backends; mmvae_fast_triton, the Triton op): one schema, so one adapter; the autograd formula below
# serves the Triton op, and csrc/autograd/likelihood_sum.cpp is the same formula in C++ for the C++ op


def formula(lib):
    """(setup_context, backward) of the op's autograd; lib: where its backward op is called."""
    def setup_context(ctx, inputs, output):
        x, params, scale, family = inputs
        ctx.save_for_backward(x, params, scale)
        ctx.family = family

    def backward(ctx, grad):
        x, params, scale = ctx.saved_tensors
        need_p, need_s = ctx.needs_input_grad[1], scale is not None and ctx.needs_input_grad[2]
        if grad is None or not (need_p or need_s):
            return None, None, None, None
        gp, gs = lib.likelihood_sum_backward(grad, x, params, scale, ctx.family, need_p, need_s)
        return None, gp if need_p else None, gs if need_s else None, None

    return setup_context, backward


def register_autograd(ns: str) -> None:
    setup_context, backward = formula(getattr(torch.ops, ns))
    torch.library.register_autograd(f"{ns}::likelihood_sum", backward, setup_context=setup_context)
    first_order_only(f"{ns}::likelihood_sum_backward", "likelihood_sum")


def _compact_scale(scale, params_shape, n_sample, n_event, dtype):
    """scale broadcast to params [*S, B, *E] as [S|1, B|1, E|1]."""
    s = scale.to(dtype)
    if s.numel() == 1:  # a scalar scale, the common case: no broadcast to work out
        return s.reshape(1, 1, 1)
    s = s.reshape((1,) * (len(params_shape) - s.dim()) + tuple(s.shape))
    groups = [(0, n_sample), (n_sample, n_sample + 1), (n_sample + 1, len(params_shape))]
    target, flat = [], []
    for lo, hi in groups:
        varies = any(s.shape[i] != 1 for i in range(lo, hi))
        target += list(params_shape[lo:hi]) if varies else [1] * (hi - lo)
        flat.append(math.prod(params_shape[lo:hi]) if varies else 1)
    return s.expand(target).reshape(flat)


def backend(lib):
    """The backend entry (x, params, family, scale) -> [*S, B] over lib.likelihood_sum (torch.ops.<ns>, or _autograd.EagerLibrary)."""

    def likelihood_sum_(x, params, family, scale=None):
        x = x.detach()
        cat = family == "categorical"
        B, event = x.shape[0], tuple(x.shape[1:])
        E = math.prod(event)
        sample = tuple(params.shape[: params.dim() - x.dim() - cat])
        S = math.prod(sample)
        acc = acc_dtype(params.dtype)
        if cat:
            p = params.reshape(S, B, E, params.shape[-1])
            xx = x.reshape(B, E).long()
        else:
            p = params.reshape(S, B, E)
            xx = x.reshape(B, E).to(acc)
        sc = None
        if family in ("normal", "laplace"):
            sc = _compact_scale(torch.as_tensor(scale, device=params.device), params.shape, len(sample), len(event), acc)
        out = lib.likelihood_sum(xx, p, sc, LIKELIHOOD_CODES[family])
        return out.reshape(*sample, B)

    return likelihood_sum_


def _register_fake():  # the C++ op's shapes (a triton_op traces its own)
    @torch.library.register_fake("mmvae_fast::likelihood_sum")
    def _(x, params, scale, family):
        return params.new_empty(params.shape[:2], dtype=acc_dtype(params.dtype))

    @torch.library.register_fake("mmvae_fast::likelihood_sum_backward")
    def _(grad, x, params, scale, family, params_grad, scale_grad):
        gp = torch.empty_like(params, memory_format=torch.contiguous_format) if params_grad else params.new_empty((0,))
        acc = acc_dtype(params.dtype)
        want_s = scale_grad and scale is not None
        gs = torch.empty_like(scale, memory_format=torch.contiguous_format) if want_s else params.new_empty((0,), dtype=acc)
        return gp, gs


if _extension.built("likelihood_sum"):
    _register_fake()
    # the C++ op's autograd is C++ (csrc/autograd/likelihood_sum.cpp: no Python frame in eager); its backward
    # op gets the first-order guard
    first_order_only("mmvae_fast::likelihood_sum_backward", "likelihood_sum")
_extension.register("likelihood_sum", backend(torch.ops.mmvae_fast))
