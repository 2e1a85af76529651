"""The cpu backend of `importance_weights`: the fused C++ kernel (csrc/cpu/importance_weights.cpp).

The op reduces the middle dim of lw [P, N, Q] -> (lse [P, Q], wbar, wbar_sq [P, N, Q]). Reduced
dims that are adjacent (the objectives' (0, 1) or 1 of lw [M, K, B]) are viewed as N in place, so
nothing is transposed and the outputs keep lw's layout; other dims sets are moved last (Q = 1).
bound = lse - log N. Autograd
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
        P, N, Q = lw.shape
        acc = _acc(lw.dtype)
        return lw.new_empty((P, Q), dtype=acc), lw.new_empty((P, N, Q), dtype=acc), lw.new_empty((P, N, Q), dtype=acc)

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
    shape = tuple(lw.shape)
    kept_shape = tuple([n for d, n in enumerate(shape) if d not in dims])
    N = math.prod([shape[d] for d in dims])
    if dims == tuple(range(dims[0], dims[-1] + 1)):  # adjacent: a view [P, N, Q]
        x = lw.reshape(math.prod(shape[: dims[0]]), N, math.prod(shape[dims[-1] + 1:]))
        lse, wbar, wbar_sq = torch.ops.mmvae_fast.importance_weights(x)
        return (lse - math.log(N)).reshape(kept_shape), wbar.reshape(shape), wbar_sq.reshape(shape)
    kept = [d for d in range(lw.dim()) if d not in dims]
    perm = kept + list(dims)
    x = lw.permute(perm)
    lse, wbar, wbar_sq = torch.ops.mmvae_fast.importance_weights(x.reshape(-1, N, 1))
    inv = [perm.index(d) for d in range(len(perm))]
    back = lambda t: t.reshape(x.shape).permute(inv)  # noqa: E731
    return (lse - math.log(N)).reshape(kept_shape), back(wbar), back(wbar_sq)


def _ops_built() -> bool:
    return hasattr(torch.ops.mmvae_fast, "importance_weights")


if _ext.AVAILABLE and _ops_built():
    _register_op()
    _dispatch.register("importance_weights", "cpu", importance_weights, devices=("cpu",))
elif _ext.AVAILABLE:
    _dispatch.mark_unavailable("cpu", "the built extension predates the importance_weights kernel: rebuild it")
