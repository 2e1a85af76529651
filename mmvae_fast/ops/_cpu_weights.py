"""The cpu backend of `importance_weights`: the fused C++ kernel (csrc/cpu/importance_weights.cpp).

The op works on rows: lw [R, N] -> (lse [R], wbar [R, N], wbar_sq [R, N]). This adapter moves the
reduced dims last, flattens to rows, and undoes it on the outputs; bound = lse - log N. Autograd
and the fake (meta) kernels are registered here with torch.library so torch.compile traces the op.
"""
import math

import torch

from . import _dispatch
from .. import _ext

_NS = "mmvae_fast"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_op():
    @torch.library.register_fake(f"{_NS}::importance_weights")
    def _(lw):
        R, N = lw.shape
        acc = _acc(lw.dtype)
        return lw.new_empty((R,), dtype=acc), lw.new_empty((R, N), dtype=acc), lw.new_empty((R, N), dtype=acc)

    @torch.library.register_fake(f"{_NS}::importance_weights_backward")
    def _(lw, lse, g_lse, g_wbar, g_wbar_sq):
        return torch.empty_like(lw, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[0])  # lw and lse: backward recomputes the weights
        ctx.set_materialize_grads(False)  # an output nobody used costs nothing in backward

    def backward(ctx, g_lse, g_wbar, g_wbar_sq):
        lw, lse = ctx.saved_tensors
        if g_lse is None and g_wbar is None and g_wbar_sq is None:
            return None
        return torch.ops.mmvae_fast.importance_weights_backward(lw, lse, g_lse, g_wbar, g_wbar_sq)

    torch.library.register_autograd(f"{_NS}::importance_weights", backward, setup_context=setup_context)


def importance_weights(lw, dims):
    """bound, wbar, wbar_sq of lw over the sorted, distinct dims (validated by the public op)."""
    kept = [d for d in range(lw.dim()) if d not in dims]
    perm = kept + list(dims)
    x = lw.permute(perm)
    kept_shape = x.shape[: len(kept)]
    n = math.prod(x.shape[len(kept):])
    lse, wbar, wbar_sq = torch.ops.mmvae_fast.importance_weights(x.reshape(-1, n))
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    back = lambda t: t.reshape(x.shape).permute(inv)  # noqa: E731
    return (lse - math.log(n)).reshape(kept_shape), back(wbar), back(wbar_sq)


def _ops_built() -> bool:
    return hasattr(torch.ops.mmvae_fast, "importance_weights")


if _ext.AVAILABLE and _ops_built():
    _register_op()
    _dispatch.register("importance_weights", "cpu", importance_weights, devices=("cpu",))
elif _ext.AVAILABLE:
    _dispatch.mark_unavailable("cpu", "the built extension predates the importance_weights kernel: rebuild it")
