"""The `cpu` backend of mixture_log_density and importance_ratios: the fused C++ kernels
(csrc/cpu/mixture_log_density.cpp, csrc/cpu/importance_ratios.cpp) wired into autograd.

Each op is a torch.library op with a fake (meta) implementation and a registered autograd
formula, so torch.compile(fullgraph=True) traces it as one node. The backward ops recompute the
pairwise table a row at a time from (z, loc, scale) and the saved lq; neither direction keeps
anything of size M*M*K*B*L.
"""
import torch

from .. import _ext
from . import _dispatch

_ops = torch.ops.mmvae_fast if _ext.AVAILABLE else None


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_or(t, like, want):
    return t.new_empty(like.shape) if want else t.new_empty((0,))


def _register():
    # ---- fake implementations: shapes and dtypes only
    @torch.library.register_fake("mmvae_fast::mixture_log_density")
    def _(z, loc, scale, family, mask):
        M, K, B, _L = z.shape
        return z.new_empty((M, K, B), dtype=_acc(z.dtype))

    @torch.library.register_fake("mmvae_fast::mixture_log_density_pairwise")
    def _(z, loc, scale, family, mask):
        M, K, B, _L = z.shape
        dt = _acc(z.dtype)
        return z.new_empty((M, K, B), dtype=dt), z.new_empty((M, M, K, B), dtype=dt)

    @torch.library.register_fake("mmvae_fast::mixture_log_density_backward")
    def _(grad_lq, grad_a, z, loc, scale, lq, family, mask, output_mask):
        return tuple(_empty_or(t, t, w) for t, w in zip((z, loc, scale), output_mask))

    @torch.library.register_fake("mmvae_fast::importance_ratios")
    def _(z, loc, scale, family):
        M, K, B, _L = z.shape
        return z.new_empty((M, M, K, B), dtype=_acc(z.dtype))

    @torch.library.register_fake("mmvae_fast::importance_ratios_backward")
    def _(grad, ratio, z, loc, scale, family):
        return loc.new_empty(loc.shape), scale.new_empty(scale.shape)

    # ---- autograd: forward saves (z, loc, scale, lq), never the pairwise table
    def setup_mixture(ctx, inputs, output):
        z, loc, scale, family, mask = inputs
        lq = output[0] if isinstance(output, (tuple, list)) else output
        ctx.save_for_backward(z, loc, scale, lq, mask)
        ctx.family = family
        # an unused output (a, or lq when only a is used) arrives as None: no zero tensor is made
        ctx.set_materialize_grads(False)

    def backward_mixture(ctx, grad_lq, grad_a=None):
        z, loc, scale, lq, mask = ctx.saved_tensors
        want = [bool(w) for w in ctx.needs_input_grad[:3]]
        if not any(want) or (grad_lq is None and grad_a is None):
            return None, None, None, None, None
        gz, gl, gs = _ops.mixture_log_density_backward(grad_lq, grad_a, z, loc, scale, lq, ctx.family, mask, want)
        return gz if want[0] else None, gl if want[1] else None, gs if want[2] else None, None, None

    torch.library.register_autograd("mmvae_fast::mixture_log_density", backward_mixture, setup_context=setup_mixture)
    torch.library.register_autograd(
        "mmvae_fast::mixture_log_density_pairwise", backward_mixture, setup_context=setup_mixture
    )

    def setup_ratios(ctx, inputs, output):
        z, loc, scale, family = inputs
        ctx.save_for_backward(z, loc, scale, output)  # the ratios: d ratio / d a = ratio
        ctx.family = family

    def backward_ratios(ctx, grad):
        z, loc, scale, ratio = ctx.saved_tensors
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return None, None, None, None
        gl, gs = _ops.importance_ratios_backward(grad, ratio, z, loc, scale, ctx.family)
        return None, gl if ctx.needs_input_grad[1] else None, gs if ctx.needs_input_grad[2] else None, None

    torch.library.register_autograd("mmvae_fast::importance_ratios", backward_ratios, setup_context=setup_ratios)


def mixture_log_density(z, loc, scale, family, mask, pairwise):
    if pairwise:
        lq, a = _ops.mixture_log_density_pairwise(z, loc, scale, family, mask)
        return lq, a
    return _ops.mixture_log_density(z, loc, scale, family, mask)


def importance_ratios(z, loc, scale, family):
    # z is detached by contract: the ratios' gradient reaches only loc and scale
    return _ops.importance_ratios(z.detach(), loc, scale, family)


if _ext.AVAILABLE:
    _register()
    _dispatch.register("mixture_log_density", "cpu", mixture_log_density, devices=("cpu",))
    _dispatch.register("importance_ratios", "cpu", importance_ratios, devices=("cpu",))
