"""The cpu backend of `likelihood_sum`: the fused C++ kernel (csrc/cpu/likelihood_sum.cpp).

The op sees flattened shapes: x [B, E], params [S, B, E] (categorical: [S, B, E, V]) and, for
normal / laplace, the scale compacted to [S|1, B|1, E|1]: a dim group the scale broadcasts over
stays of size 1, so a scalar or per-pixel scale is never expanded over samples or batch.
Autograd (the scale gets its gradient when it requires one) and the fake kernels are registered
with torch.library so torch.compile traces the op.
"""
import math

import torch

from . import _dispatch
from .. import _ext

_NS = "mmvae_fast"
FAMILY_CODES = {"normal": 0, "laplace": 1, "bernoulli": 2, "categorical": 3}  # densities.h codes


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_op():
    @torch.library.register_fake(f"{_NS}::likelihood_sum")
    def _(x, params, scale, family):
        return params.new_empty(params.shape[:2], dtype=_acc(params.dtype))

    @torch.library.register_fake(f"{_NS}::likelihood_sum_backward")
    def _(grad, x, params, scale, family, params_grad, scale_grad):
        gp = torch.empty_like(params, memory_format=torch.contiguous_format) if params_grad else params.new_empty((0,))
        acc = _acc(params.dtype)
        gs = torch.empty_like(scale, memory_format=torch.contiguous_format) if scale_grad and scale is not None else params.new_empty((0,), dtype=acc)
        return gp, gs

    def setup_context(ctx, inputs, output):
        x, params, scale, family = inputs
        ctx.save_for_backward(x, params, scale)
        ctx.family = family

    def backward(ctx, grad):
        x, params, scale = ctx.saved_tensors
        need_p, need_s = ctx.needs_input_grad[1], scale is not None and ctx.needs_input_grad[2]
        if grad is None or not (need_p or need_s):
            return None, None, None, None
        gp, gs = torch.ops.mmvae_fast.likelihood_sum_backward(grad, x, params, scale, ctx.family, need_p, need_s)
        return None, gp if need_p else None, gs if need_s else None, None

    torch.library.register_autograd(f"{_NS}::likelihood_sum", backward, setup_context=setup_context)


def _compact_scale(scale, params_shape, n_sample, n_event, dtype):
    """scale broadcast to params [*S, B, *E] as [S|1, B|1, E|1]."""
    s = scale.to(dtype)
    s = s.reshape((1,) * (len(params_shape) - s.dim()) + tuple(s.shape))
    groups = [(0, n_sample), (n_sample, n_sample + 1), (n_sample + 1, len(params_shape))]
    target, flat = [], []
    for lo, hi in groups:
        varies = any(s.shape[i] != 1 for i in range(lo, hi))
        target += list(params_shape[lo:hi]) if varies else [1] * (hi - lo)
        flat.append(math.prod(params_shape[lo:hi]) if varies else 1)
    return s.expand(target).reshape(flat)


def likelihood_sum(x, params, family, scale=None):
    """out[*S, b] = sum_e log p(x[b, e] | params[*S, b, e]) (shapes validated by the public op)."""
    x = x.detach()
    cat = family == "categorical"
    B, event = x.shape[0], tuple(x.shape[1:])
    E = math.prod(event)
    sample = tuple(params.shape[: params.dim() - x.dim() - cat])
    S = math.prod(sample)
    acc = _acc(params.dtype)
    if cat:
        p = params.reshape(S, B, E, params.shape[-1])
        xx = x.reshape(B, E).long()
    else:
        p = params.reshape(S, B, E)
        xx = x.reshape(B, E).to(acc)
    sc = None
    if family in ("normal", "laplace"):
        sc = _compact_scale(torch.as_tensor(scale, device=params.device), params.shape, len(sample), len(event), acc)
    out = torch.ops.mmvae_fast.likelihood_sum(xx, p, sc, FAMILY_CODES[family])
    return out.reshape(*sample, B)


def _ops_built() -> bool:
    return hasattr(torch.ops.mmvae_fast, "likelihood_sum")


if _ext.AVAILABLE and _ops_built():
    _register_op()
    _dispatch.register("likelihood_sum", "cpu", likelihood_sum, devices=("cpu",))
elif _ext.AVAILABLE:
    _dispatch.mark_unavailable("cpu", "the built extension predates the likelihood_sum kernel: rebuild it")
