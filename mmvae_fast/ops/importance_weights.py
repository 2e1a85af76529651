"""importance_weights: the bound, the normalised weights and their squares in one pass.

The public op, and the wiring of the backends' op <ns>::importance_weights (the C++ op of
csrc/cpu and csrc/cuda, and the Triton op of mmvae_fast/kernels, one schema): the C++ op's fake
kernel, the autograd formula and the adapter that views lw as [P, N, Q]. The op reduces the
middle dim of lw [P, N, Q] -> (lse [P, Q], wbar, wbar_sq [P, N, Q], lse_lo [P, Q]), lse_lo the
rounding residual of lse, so that exp((lw - lse) - lse_lo) stays exact when |lw| is large (a
float32 lse near -1e7 is off by up to 0.5, which would scale the weights by e^0.5). Reduced dims
that are adjacent (the objectives' (0, 1) or 1 of lw [M, K, B]) are viewed as N in place, so
nothing is transposed and the outputs keep lw's layout; other dims sets are moved last (Q = 1).
bound = lse - log N.
"""
import math
from typing import NamedTuple

import torch

from . import _dispatch, _extension, _validate
from ._autograd import first_order_only
from .._numerics import acc_dtype
from ..reference.importance_weights import normalize_dims


class ImportanceWeights(NamedTuple):
    bound: torch.Tensor  # logmeanexp of lw over dim (dim removed)
    wbar: torch.Tensor  # softmax of lw over dim (shape of lw)
    wbar_sq: torch.Tensor  # wbar**2, DReG's encoder weights


def importance_weights(lw, dim=0, *, backend=None) -> ImportanceWeights:
    """Normalised importance weights of log weights `lw` over `dim` (int or tuple of ints).

    bound   = log (1/N) sum_dim exp(lw)       (the IWAE bound of each slice)
    wbar    = exp(lw - logsumexp_dim lw)      (d bound / d lw)
    wbar_sq = wbar**2                         (DReG's weights on the z path)

    Accumulates and returns float32 (float64 for float64 input). A slice of all -inf gives
    bound -inf, weights 0 and zero gradients; NaN propagates. All three outputs are
    differentiable.
    """
    _validate.tensor("lw", lw)
    dims = normalize_dims(dim, lw.dim())
    for d in dims:
        if lw.shape[d] == 0:
            raise ValueError(f"argument 'lw' has size 0 along reduced dim {d}: need at least one sample")
    b = _dispatch.resolve("importance_weights", backend, lw.device.type)
    return ImportanceWeights(*_dispatch.impl("importance_weights", b)(lw, dims))


# ---- the backends' op <ns>::importance_weights (ns: mmvae_fast, the C++ op of the cpu and cuda
# backends; mmvae_fast_triton, the Triton op): one schema, so one adapter; the autograd formula below
# serves the Triton op, and csrc/autograd/importance_weights.cpp is the same formula in C++ for the C++ op


def formula(lib):
    """(setup_context, backward) of the op's autograd; lib: where its backward op is called."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[0], output[3])  # lw, lse, lse_lo: backward recomputes the weights
        ctx.mark_non_differentiable(output[3])
        ctx.set_materialize_grads(False)  # an output nobody used costs nothing in backward

    def backward(ctx, g_lse, g_wbar, g_wbar_sq, _g_lse_lo):
        lw, lse, lse_lo = ctx.saved_tensors
        if g_lse is None and g_wbar is None and g_wbar_sq is None:
            return None
        return lib.importance_weights_backward(lw, lse, lse_lo, g_lse, g_wbar, g_wbar_sq)

    return setup_context, backward


def register_autograd(ns: str) -> None:
    setup_context, backward = formula(getattr(torch.ops, ns))
    torch.library.register_autograd(f"{ns}::importance_weights", backward, setup_context=setup_context)
    first_order_only(f"{ns}::importance_weights_backward", "importance_weights")


def backend(lib):
    """The backend entry (lw, dims) -> (bound, wbar, wbar_sq) over lib.importance_weights (torch.ops.<ns>, or _autograd.EagerLibrary)."""

    def importance_weights_(lw, dims):
        op = lib.importance_weights
        shape = tuple(lw.shape)
        kept_shape = tuple([n for d, n in enumerate(shape) if d not in dims])
        N = math.prod([shape[d] for d in dims])
        if dims == tuple(range(dims[0], dims[-1] + 1)):  # adjacent: a view [P, N, Q]
            lse, wbar, wbar_sq, _ = op(lw.reshape(math.prod(shape[: dims[0]]), N, math.prod(shape[dims[-1] + 1:])))
            return (lse - math.log(N)).reshape(kept_shape), wbar.reshape(shape), wbar_sq.reshape(shape)
        kept = [d for d in range(lw.dim()) if d not in dims]
        perm = kept + list(dims)
        x = lw.permute(perm)
        lse, wbar, wbar_sq, _ = op(x.reshape(-1, N, 1))
        inv = [perm.index(d) for d in range(len(perm))]
        back = lambda t: t.reshape(x.shape).permute(inv)  # noqa: E731
        return (lse - math.log(N)).reshape(kept_shape), back(wbar), back(wbar_sq)

    return importance_weights_


def _register_fake():  # the C++ op's shapes (a triton_op traces its own)
    @torch.library.register_fake("mmvae_fast::importance_weights")
    def _(lw):
        P, N, Q = lw.shape
        acc = acc_dtype(lw.dtype)
        lse, w = lw.new_empty((P, Q), dtype=acc), lw.new_empty((P, N, Q), dtype=acc)
        return lse, w, torch.empty_like(w), torch.empty_like(lse)

    @torch.library.register_fake("mmvae_fast::importance_weights_backward")
    def _(lw, lse, lse_lo, g_lse, g_wbar, g_wbar_sq):
        return torch.empty_like(lw, memory_format=torch.contiguous_format)


if _extension.built("importance_weights"):
    _register_fake()
    # the C++ op's autograd is C++ (csrc/autograd/importance_weights.cpp: no Python frame in eager); its backward
    # op gets the first-order guard
    first_order_only("mmvae_fast::importance_weights_backward", "importance_weights")
_extension.register("importance_weights", backend(torch.ops.mmvae_fast))
