"""mixture_log_density: log q_mix(z) of a mixture of experts, without the pairwise table in memory.

The public op, and the wiring of the backends' ops <ns>::mixture_log_density and
mixture_log_density_pairwise (the C++ ops of csrc/cpu and csrc/cuda, and the Triton ops of
mmvae_fast/kernels, one schema): the C++ ops' fake kernels, the autograd formula, one adapter.
Forward saves (z, loc, scale, lq), never the pairwise table; the backward op recomputes it a row at
a time, so neither direction keeps anything of size M*M*K*B*L.
"""
import torch

from . import _dispatch, _extension, _validate
from ._autograd import first_order_only
from .._numerics import acc_dtype


def mixture_log_density(z, loc, scale, *, family="normal", mask=None, return_pairwise=False, backend=None):
    """log q_mix(z) of the mixture of M experts with diagonal Normal/Laplace components.

    z[r, k, b, :] is sample k from expert r; loc, scale[m, b, :] parametrise expert m.
        a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l])
        lq[r, k, b]   = logsumexp_{m present} a[r, m, k, b] - log(#present)
    mask: optional bool [M] or [M, B], True where expert m is present for batch entry b.
    Returns lq [M, K, B], or (lq, a) with a [M, M, K, B] (raw, unmasked) if return_pairwise.
    Differentiable in z, loc and scale; accumulates in float32 (float64 for float64 input).
    """
    _validate.experts(z, loc, scale, family)
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


# ---- the backends' ops <ns>::mixture_log_density(_pairwise) (ns: mmvae_fast, the C++ ops of the
# cpu and cuda backends; mmvae_fast_triton, the Triton ops): one schema, so one adapter; the autograd
# formula below serves the Triton ops, and csrc/autograd/mixture_log_density.cpp is the same formula
# in C++ for the C++ ops


def formula(lib):
    """(setup_context, backward) of the op's autograd; lib: where its backward op is called."""
    def setup_context(ctx, inputs, output):
        z, loc, scale, family, mask = inputs
        lq = output[0] if isinstance(output, (tuple, list)) else output
        ctx.save_for_backward(z, loc, scale, lq, mask)
        ctx.family = family
        # an unused output (a, or lq when only a is used) arrives as None: no zero tensor is made
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_lq, grad_a=None):
        z, loc, scale, lq, mask = ctx.saved_tensors
        want = [bool(w) for w in ctx.needs_input_grad[:3]]
        if not any(want) or (grad_lq is None and grad_a is None):
            return None, None, None, None, None
        gz, gl, gs = lib.mixture_log_density_backward(
            grad_lq, grad_a, z, loc, scale, lq, ctx.family, mask, want
        )
        return gz if want[0] else None, gl if want[1] else None, gs if want[2] else None, None, None

    return setup_context, backward


def register_autograd(ns: str) -> None:
    setup_context, backward = formula(getattr(torch.ops, ns))
    for name in ("mixture_log_density", "mixture_log_density_pairwise"):
        torch.library.register_autograd(f"{ns}::{name}", backward, setup_context=setup_context)
    first_order_only(f"{ns}::mixture_log_density_backward", "mixture_log_density")


def backend(lib):
    """The backend entry (z, loc, scale, family, mask, pairwise) over lib.mixture_log_density (torch.ops.<ns>, or _autograd.EagerLibrary)."""

    def mixture_log_density_(z, loc, scale, family, mask, pairwise):
        if pairwise:
            return lib.mixture_log_density_pairwise(z, loc, scale, family, mask)
        return lib.mixture_log_density(z, loc, scale, family, mask)

    return mixture_log_density_


def _register_fake():  # the C++ ops' shapes (a triton_op traces its own)
    @torch.library.register_fake("mmvae_fast::mixture_log_density")
    def _(z, loc, scale, family, mask):
        M, K, B, _L = z.shape
        return z.new_empty((M, K, B), dtype=acc_dtype(z.dtype))

    @torch.library.register_fake("mmvae_fast::mixture_log_density_pairwise")
    def _(z, loc, scale, family, mask):
        M, K, B, _L = z.shape
        dt = acc_dtype(z.dtype)
        return z.new_empty((M, K, B), dtype=dt), z.new_empty((M, M, K, B), dtype=dt)

    @torch.library.register_fake("mmvae_fast::mixture_log_density_backward")
    def _(grad_lq, grad_a, z, loc, scale, lq, family, mask, output_mask):
        return tuple(t.new_empty(t.shape) if w else t.new_empty((0,)) for t, w in zip((z, loc, scale), output_mask))


if _extension.built("mixture_log_density"):
    _register_fake()
    # the C++ op's autograd is C++ (csrc/autograd/mixture_log_density.cpp: no Python frame in eager); its backward
    # op gets the first-order guard
    first_order_only("mmvae_fast::mixture_log_density_backward", "mixture_log_density")
_extension.register("mixture_log_density", backend(torch.ops.mmvae_fast))
