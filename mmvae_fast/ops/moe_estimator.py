r"""Public op: the MoE bound and its gradient estimators in one pass over the K x M samples.

    est = moe_estimator(z, loc, scale, prior_loc, prior_scale, lpx, family="laplace",
                        bound="looser", estimator="mixture")
    est.bound      [B]        the bound per item; its gradient is the estimator's
    est.lw         [M, K, B]  log weights (no gradient)
    est.z_weight   [M, K, B]  the z path's per-sample weight, or None (iwae, released)

The maths and the meaning of every argument: `mmvae_fast.reference.moe_estimator` (the oracle).
z is [M, K, B, L] or the M experts' samples [K, B, L] as the model made them: the fused backends
read a list in place, so an objective never stacks the samples into a second [M, K, B, L] tensor.
The fused backends compute the mixture and prior log-densities, lw, the bound, wbar and the
responsibilities in one pass, save O(M K B) numbers, and write the gradients of z, loc, scale,
the prior's loc and scale and lpx directly: never an M*M*K*B*L table, never a second [M, K, B, L]
tensor. The z path's weight multiplies everything that reaches the model's samples, the decoders'
share included, so the caller applies it where the samples are made (`apply_z_weight`).
"""
import torch

from . import _dispatch, _extension, _validate
from ._autograd import first_order_only
from .._numerics import acc_dtype
from ..reference.moe_estimator import BOUNDS, ESTIMATORS, MoEEstimate, bound_from_lse, slice_stats

__all__ = ["BOUNDS", "ESTIMATORS", "MoEEstimate", "moe_estimator", "apply_z_weight", "bound_from_lse", "slice_stats"]


def moe_estimator(
    z, loc, scale, prior_loc, prior_scale, lpx, *, family="normal", prior_family=None, bound="looser",
    estimator="mixture", mask=None, lse=None, num_samples=None, backend=None,
) -> MoEEstimate:
    """The MoE bound [B] with the gradient of `estimator` (see the module docstring).

    z [M, K, B, L], or a list of the M experts' samples [K, B, L]: z[r] ~ expert r. loc, scale [M, B, L]: the experts (`family` Normal or
    Laplace). prior_loc, prior_scale: broadcastable to [B, L] (`prior_family`, default `family`).
    lpx [M, K, B]: the summed, scaled log-likelihoods at z. bound: "looser" (eq. 3) or "stratified"
    (eq. 5). estimator: one of ESTIMATORS. mask: bool [M, B], True where expert m of item b is present.
    lse, num_samples: the chunked large-K path's normalisers and its K per expert, given together:
    lse holds each softmax's (max, log-sum) pair over all K samples ([M, B, 2] looser, [B, 2]
    stratified: `slice_stats` of the full lw; the pair keeps the weights exact at any |lw|).
    """
    zs = _samples(z)
    for name, t in (("loc", loc), ("scale", scale), ("prior_loc", prior_loc), ("prior_scale", prior_scale),
                    ("lpx", lpx)):
        _validate.tensor(name, t)
    z0 = zs[0]
    _validate.same_device(z=z0, loc=loc, scale=scale, prior_loc=prior_loc, prior_scale=prior_scale, lpx=lpx)
    _validate.same_dtype(z=z0, loc=loc, scale=scale)
    _validate.family("family", family)
    prior_family = _validate.family("prior_family", prior_family or family)
    _validate.family("bound", bound, BOUNDS)
    _validate.family("estimator", estimator, ESTIMATORS)
    M, (K, B, L) = len(zs), z0.shape
    _validate.shape("loc", loc, (M, B, L), "experts, batch, latent: one expert per group of z")
    _validate.shape("scale", scale, (M, B, L), "experts, batch, latent")
    _validate.shape("lpx", lpx, (M, K, B), "the summed log-likelihoods at z, without L")
    try:
        prior_loc, prior_scale = (t.to(z0.dtype).broadcast_to(B, L) for t in (prior_loc, prior_scale))
    except RuntimeError:
        raise ValueError(f"arguments 'prior_loc' and 'prior_scale' must broadcast to [B, L] = [{B}, {L}], got "
                         f"{tuple(prior_loc.shape)} and {tuple(prior_scale.shape)}") from None
    if mask is not None:
        _validate.tensor("mask", mask, floating=False)
        if mask.dtype != torch.bool:
            raise TypeError(f"argument 'mask' must be a bool tensor [M, B], got {mask.dtype}")
        _validate.same_device(z=z0, mask=mask)
        _validate.shape("mask", mask, (M, B), "True where expert m of item b is present")
    if (lse is None) != (num_samples is None):  # a chunk's bound needs both: the normalisers and the total K
        raise ValueError("arguments 'lse' and 'num_samples' go together (the chunked path: the (max, log-sum) "
                         "pairs over all K samples, and that K); pass both or neither")
    if lse is not None:
        _validate.tensor("lse", lse)
        _validate.same_device(z=z0, lse=lse)
        _validate.shape("lse", lse, (M, B, 2) if bound == "looser" else (B, 2),
                        f"each {bound} softmax's (max, log-sum) pair: ops.slice_stats(lw, {bound!r})")
        lse = lse.to(acc_dtype(z0.dtype))
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < K:
            raise ValueError(f"argument 'num_samples' must be an integer >= K = {K} (the bound's samples per expert, "
                             f"of which these are a chunk), got {num_samples!r}")
    _validate.positive("scale", scale)
    _validate.positive("prior_scale", prior_scale)
    lpx = lpx.to(acc_dtype(z0.dtype))
    b = _dispatch.resolve("moe_estimator", backend, z0.device.type)
    return MoEEstimate(*_dispatch.impl("moe_estimator", b)(
        zs, loc, scale, prior_loc, prior_scale, lpx, family, prior_family, bound, estimator, mask, lse, num_samples
    ))


def _samples(z) -> list:
    """z [M, K, B, L] or M tensors [K, B, L] -> the list of the experts' samples (views, no copy)."""
    if isinstance(z, torch.Tensor):
        _validate.tensor("z", z)
        if z.dim() != 4 or min(z.shape) < 1:
            raise ValueError(f"argument 'z' must have non-empty shape [M, K, B, L] (groups, samples, batch, latent), "
                             f"got {tuple(z.shape)}")
        return list(z.unbind(0))
    if not isinstance(z, (list, tuple)) or not z:
        raise TypeError(f"argument 'z' must be a tensor [M, K, B, L] or a non-empty list of the experts' samples "
                        f"[K, B, L], got {type(z).__name__}")
    zs = list(z)
    for r, t in enumerate(zs):
        _validate.tensor(f"z[{r}]", t)
    shapes = {tuple(t.shape) for t in zs}
    if len(shapes) != 1 or zs[0].dim() != 3 or min(zs[0].shape) < 1:
        raise ValueError(f"argument 'z' must hold the experts' samples, one non-empty shape [K, B, L] for all, "
                         f"got {[tuple(t.shape) for t in zs]}")
    _validate.same_device(**{f"z[{r}]": t for r, t in enumerate(zs)})
    _validate.same_dtype(**{f"z[{r}]": t for r, t in enumerate(zs)})
    return zs


def _scale_hook(w):
    return lambda g: g * w.to(g.dtype)


def apply_z_weight(zs, z_weight):
    """Multiply the gradient reaching each sample of zs (a tensor [M, K, B, L] or M tensors [K, B, L])
    by z_weight [M, K, B]: the z path of the DReG estimators. No-op for z_weight None."""
    if z_weight is None:
        return
    w = z_weight.detach().unsqueeze(-1)
    if isinstance(zs, torch.Tensor):
        if zs.requires_grad:
            zs.register_hook(_scale_hook(w))
        return
    for r, z in enumerate(zs):
        if z.requires_grad:
            z.register_hook(_scale_hook(w[r]))



# ---- the backends' ops <ns>::moe_estimator (ns: mmvae_fast, the C++ ops of the cpu and cuda
# backends; mmvae_fast_triton, the Triton ops): one schema, so one adapter; the autograd formula below
# serves the Triton op, and csrc/autograd/moe_estimator.cpp is the same formula in C++ for the C++ op
#   <ns>::moe_estimator(...) -> (bound [B], lw, z_weight ([0] for iwae/released), lq [M, K, B],
#                               stats [M*B (looser) or B, 2]: each softmax's (max, log-sum))


def formula(lib):
    """(setup_context, backward) of the op's autograd; lib: where its backward op is called."""
    def setup_context(ctx, inputs, output):
        z, loc, scale, prior_loc, prior_scale, _lpx, family, prior_family, bound, estimator, mask, _lse, ns_ = inputs
        _bound, lw, zw, lq, stats = output
        ctx.mark_non_differentiable(lw, zw, lq, stats)
        ctx.save_for_backward(loc, scale, prior_loc, prior_scale, mask, lw, lq, stats, *z)
        ctx.args = (family, prior_family, bound, estimator, ns_)

    def backward(ctx, grad, *_unused):
        loc, scale, prior_loc, prior_scale, mask, lw, lq, stats, *z = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_z = list(need[0]) if isinstance(need[0], (list, tuple)) else [need[0]] * len(z)  # z: a list
        if grad is None or not (any(need_z) or any(need[1:6])):
            return ([None] * len(z),) + (None,) * 12
        gz, *grads = lib.moe_estimator_backward(
            grad, z, loc, scale, prior_loc, prior_scale, mask, lw, lq, stats, *ctx.args
        )
        return (([g if n else None for g, n in zip(gz, need_z)],)
                + tuple(g if n else None for g, n in zip(grads, need[1:6])) + (None,) * 7)

    return setup_context, backward


def register_autograd(ns: str) -> None:
    setup_context, backward = formula(getattr(torch.ops, ns))
    torch.library.register_autograd(f"{ns}::moe_estimator", backward, setup_context=setup_context)
    first_order_only(f"{ns}::moe_estimator_backward", "moe_estimator")


def backend(lib):
    """The backend entry over lib.moe_estimator (torch.ops.<ns>, or
    _autograd.EagerLibrary) -> (bound, lw, z_weight or None); z: the list of the experts' samples."""

    def moe_estimator_(z, loc, scale, prior_loc, prior_scale, lpx, family, prior_family, bound, estimator, mask, lse,
                       num_samples):
        if z[0].dtype not in (torch.float32, torch.float64):  # half inputs: the kernels read float32
            z = [t.float() for t in z]
            loc, scale, prior_loc, prior_scale = (t.float() for t in (loc, scale, prior_loc, prior_scale))
        bound_, lw, zw, _lq, _stats = lib.moe_estimator(
            z, loc, scale, prior_loc, prior_scale, lpx, family, prior_family, bound, estimator, mask, lse, num_samples
        )
        return bound_, lw, (zw if zw.numel() else None)

    return moe_estimator_


def _register_fake():  # the C++ ops' shapes (a triton_op traces its own)
    @torch.library.register_fake("mmvae_fast::moe_estimator")
    def _(z, loc, scale, prior_loc, prior_scale, lpx, family, prior_family, bound, estimator, mask, lse, num_samples):
        M, (K, B, _L) = len(z), z[0].shape
        z = z[0]
        acc = dict(dtype=acc_dtype(z.dtype))
        zw = (M, K, B) if estimator in ("eq8", "mixture", "mixture-centred") else (0,)
        S = M * B if bound == "looser" else B
        return (z.new_empty((B,), **acc), z.new_empty((M, K, B), **acc), z.new_empty(zw, **acc),
                z.new_empty((M, K, B), **acc), z.new_empty((S, 2), **acc))

    @torch.library.register_fake("mmvae_fast::moe_estimator_backward")
    def _(grad, z, loc, scale, prior_loc, prior_scale, mask, lw, lq, stats, family, prior_family, bound, estimator,
          num_samples):
        gz = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in z]  # one per expert
        return (gz, torch.empty_like(loc), torch.empty_like(scale), torch.empty_like(prior_loc),
                torch.empty_like(prior_scale), torch.empty_like(lw))


if _extension.built("moe_estimator"):
    _register_fake()
    # the C++ op's autograd is C++ (csrc/autograd/moe_estimator.cpp: no Python frame in eager); its backward
    # op gets the first-order guard
    first_order_only("mmvae_fast::moe_estimator_backward", "moe_estimator")
_extension.register("moe_estimator", backend(torch.ops.mmvae_fast))
