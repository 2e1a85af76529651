"""importance_ratios: appendix B's cross-modal importance ratios.

The public op, and the wiring of the backends' op <ns>::importance_ratios (the C++ op of csrc/cpu
and csrc/cuda, and the Triton op of mmvae_fast/kernels, one schema): the C++ op's fake kernel,
the autograd formula and the adapter. Forward saves the ratios (d ratio / d a = ratio); the
backward op recomputes the pairwise log-densities a row at a time.
"""
import torch

from . import _dispatch, _extension, _validate
from ._autograd import first_order_only
from .._numerics import acc_dtype


def importance_ratios(z, loc, scale, *, family="normal", backend=None):
    """Appendix B's cross-modal importance ratios.

        ratio[r, d, k, b] = exp(log q_r(z_d) - stopgrad(log q_d(z_d))),   z_d = z[d, k, b] detached

    with the diagonal r == d the constant 1. Returns [M, M, K, B]; gradients reach loc and scale
    of expert r only (never z, never the denominators).
    """
    _validate.experts(z, loc, scale, family)
    b = _dispatch.resolve("importance_ratios", backend, z.device.type)
    return _dispatch.impl("importance_ratios", b)(z, loc, scale, family)


# ---- the backends' op <ns>::importance_ratios (ns: mmvae_fast, the C++ op of the cpu and cuda
# backends; mmvae_fast_triton, the Triton op): one schema, so one adapter; the autograd formula below
# serves the Triton op, and csrc/autograd/importance_ratios.cpp is the same formula in C++ for the C++ op


def formula(lib):
    """(setup_context, backward) of the op's autograd; lib: where its backward op is called."""
    def setup_context(ctx, inputs, output):
        z, loc, scale, family = inputs
        ctx.save_for_backward(z, loc, scale, output)  # the ratios: d ratio / d a = ratio
        ctx.family = family

    def backward(ctx, grad):
        z, loc, scale, ratio = ctx.saved_tensors
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return None, None, None, None
        gl, gs = lib.importance_ratios_backward(grad, ratio, z, loc, scale, ctx.family)
        return None, gl if ctx.needs_input_grad[1] else None, gs if ctx.needs_input_grad[2] else None, None

    return setup_context, backward


def register_autograd(ns: str) -> None:
    setup_context, backward = formula(getattr(torch.ops, ns))
    torch.library.register_autograd(f"{ns}::importance_ratios", backward, setup_context=setup_context)
    first_order_only(f"{ns}::importance_ratios_backward", "importance_ratios")


def backend(lib):
    """The backend entry (z, loc, scale, family) over lib.importance_ratios (torch.ops.<ns>, or _autograd.EagerLibrary)."""

    def importance_ratios_(z, loc, scale, family):
        # z is detached by contract: the ratios' gradient reaches only loc and scale
        return lib.importance_ratios(z.detach(), loc, scale, family)

    return importance_ratios_


def _register_fake():  # the C++ op's shapes (a triton_op traces its own)
    @torch.library.register_fake("mmvae_fast::importance_ratios")
    def _(z, loc, scale, family):
        M, K, B, _L = z.shape
        return z.new_empty((M, M, K, B), dtype=acc_dtype(z.dtype))

    @torch.library.register_fake("mmvae_fast::importance_ratios_backward")
    def _(grad, ratio, z, loc, scale, family):
        return loc.new_empty(loc.shape), scale.new_empty(scale.shape)


if _extension.built("importance_ratios"):
    _register_fake()
    # the C++ op's autograd is C++ (csrc/autograd/importance_ratios.cpp: no Python frame in eager); its backward
    # op gets the first-order guard
    first_order_only("mmvae_fast::importance_ratios_backward", "importance_ratios")
_extension.register("importance_ratios", backend(torch.ops.mmvae_fast))
