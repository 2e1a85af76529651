"""Numerics grids shared by the per-op tests (tests/test_<op>.py, on every backend; the Triton cases
run on the interpreter in the `pytest -m triton` process): each op's outputs and gradients against a
float64 truth at extreme inputs.
"""
import math

import torch

from mmvae_fast import ops

# Offsets of lw up to the float32 range. A trained digits model's log weights sit near -4e3 per datum.
LW_OFFSETS = (0.0, 5e3, -5e3, -1e5, 1e6, -1e7, -1e8, 1e20, -1e30, 3e38, -3e38)


def check_weights_at_offset(backend, offset, layout):
    """importance_weights of float32 lw = offset + N(0, 1): wbar, wbar_sq and the gradient of each
    output (alone, then all together) against float64 computed from the same float32 values."""
    g = torch.Generator().manual_seed(11)
    n = 300 if layout == "rows" else 7  # rows: several chunks of one row; cols: the reduced dim first
    shape, dim = ((3, n), 1) if layout == "rows" else ((n, 20), 0)
    dev = torch.get_default_device()
    rnd = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(dev)  # noqa: E731
    lw32 = (offset + rnd(*shape)).float()
    kept = tuple(lw32.sum(dim).shape)
    cots = [rnd(*kept), rnd(*shape), rnd(*shape)]
    lw64 = lw32.double().requires_grad_()
    c = lw64.detach().amax(dim, keepdim=True)  # shifted first: float64 cannot hold 3e38 + log n
    lse, wbar = torch.logsumexp(lw64 - c, dim, keepdim=True), torch.softmax(lw64 - c, dim)
    truth = ((lse + c - math.log(n)).squeeze(dim), wbar, wbar * wbar)
    lw = lw32.clone().requires_grad_()
    out = ops.importance_weights(lw, dim, backend=backend)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.wbar.double(), truth[1].detach(), **tol)
    torch.testing.assert_close(out.wbar_sq.double(), truth[2].detach(), **tol)
    for k in range(3):
        (want,) = torch.autograd.grad(truth[k], lw64, cots[k], retain_graph=True)
        (got,) = torch.autograd.grad(out[k], lw, cots[k].float(), retain_graph=True)
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"output {k}'s gradient: {m}")
    (want,) = torch.autograd.grad(truth, lw64, cots)
    (got,) = torch.autograd.grad(out, lw, [c.float() for c in cots])
    torch.testing.assert_close(got.double(), want, **tol)


# ---- second-order gradients: a scalar of w [6] (float64) through each op, nonlinear in w on both
# sides of the op, so that d/dw of the first gradient needs the op's own second derivative.
def _through(op, backend, w):
    g = torch.Generator().manual_seed(5)
    dev = w.device
    r = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(dev)  # noqa: E731
    if op == "importance_weights":
        lw = r(4, 6) * w + w**2
        out = ops.importance_weights(lw, 1, backend=backend)
        return out.bound.sum() + (out.wbar * r(4, 6)).sum() + (out.wbar_sq * r(4, 6)).sum()
    M, K, B = 2, 3, 2
    if op == "mixture_log_density":
        z = r(M, K, B, 6) * w
        loc, scale = r(M, B, 6) + w**2, torch.exp(0.3 * r(M, B, 6) + 0.1 * w)
        lq, a = ops.mixture_log_density(z, loc, scale, return_pairwise=True, backend=backend)
        return (lq * r(M, K, B)).sum() + (a * r(M, M, K, B)).sum()
    if op == "importance_ratios":
        z, loc, scale = r(M, K, B, 6), r(M, B, 6) * w, torch.exp(0.3 * r(M, B, 6) + 0.1 * w)
        return (ops.importance_ratios(z, loc, scale, backend=backend) * r(M, M, K, B)).sum()
    if op == "likelihood_sum":
        x, params = r(B, 6), r(K, B, 6) * w
        return (ops.likelihood_sum(x, params, family="normal", scale=torch.exp(0.1 * w), backend=backend) * r(K, B)).sum()
    raise ValueError(op)


SECOND_ORDER_OPS = ("importance_weights", "mixture_log_density", "importance_ratios", "likelihood_sum")


def check_second_order(op, backend):
    """The reference gives second derivatives (checked against finite differences); a fused backend
    gives the right first derivative under create_graph=True and refuses the second one clearly."""
    dev = torch.get_default_device()
    w = (torch.linspace(-1.0, 1.0, 6, dtype=torch.float64) + 0.3).to(dev).requires_grad_()
    first = lambda b: torch.autograd.grad(_through(op, b, w), w, create_graph=True)[0]  # noqa: E731
    if backend == "reference":
        if op == "importance_ratios":  # the stop-gradient in the ratios' denominators: not a function's
            (g,) = torch.autograd.grad(first(backend).square().sum(), w)  # derivative; it runs, finite
            assert torch.isfinite(g).all()
        else:
            assert torch.autograd.gradgradcheck(lambda v: _through(op, "reference", v), (w,))
        return
    g = first(backend)
    torch.testing.assert_close(g, first("reference"))
    try:
        torch.autograd.grad((g**2).sum(), w)
    except ops.DoubleBackwardError as e:
        msg = str(e)
        assert f"ops.{op}" in msg and "backend='reference'" in msg and "second-order" in msg, msg
    else:
        raise AssertionError(f"{op} on {backend}: a second-order gradient gave numbers instead of an error")


# ---- docs/design.md section 2's NaN / inf policy at extreme inputs, the same on every backend: -inf log
# densities are legal (zero weight, zero gradient, never NaN), NaN in gives NaN out, and an absent
# expert (masked out) is not part of the mixture at all, whatever its parameters hold.
def _grads(out, inputs):
    # cotangent 1 on every finite or -inf output (a -inf output gives zero gradients whatever its
    # cotangent), 0 on NaN and +inf (an overflowed ratio: no gradient to compare there)
    cot = torch.where(torch.isnan(out) | (out == math.inf), torch.zeros_like(out), torch.ones_like(out))
    return torch.autograd.grad(out, inputs, cot, allow_unused=True)


def _extreme_experts(case):
    """(z, loc, scale, mask) of a float32 problem M, K, B, L = 3, 4, 2, 5 at an extreme input."""
    g = torch.Generator().manual_seed(3)
    dev = torch.get_default_device()
    M, K, B, L = 3, 4, 2, 5
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    z, loc, scale, mask = r(M, K, B, L), r(M, B, L), torch.exp(0.3 * r(M, B, L)), None
    if case == "z_times_1e20":  # Normal: (z - loc)^2 / scale^2 overflows, every a = -inf; Laplace: a ~ -1e20
        z = z * 1e20
    elif case == "one_scale_1e-30":  # that expert's density is -inf (Normal) or ~ -1e30 (Laplace) away
        scale[1, 0, 2] = 1e-30  # from its loc: weight 0 and an infinite d/dscale there
    elif case == "one_scale_1e-20_near":  # every sample 0.05 from a scale-1e-20 expert's loc: a finite
        scale[1, 0, 2] = 1e-20  # (~ -1e37 or -5e18), weight 0, d/dscale = inf
        z[:, :, 0, 2] = loc[1, 0, 2] + 0.05
        z[1, :, 0, 2] = loc[1, 0, 2]  # expert 1's own samples at its loc (a collapsed expert's samples)
    elif case == "collapsed_expert":  # scale 1e-30 with its own samples at its loc: a = +69 there
        scale[1, 0, 2] = 1e-30
        z[1, :, 0, 2] = loc[1, 0, 2]
    elif case == "huge_scales":
        scale[2, 1, 3], scale[0, 0, 1] = 1e30, 1e20
    elif case == "far_expert":  # expert 0 and its samples 1e20 away from the others
        loc[0] += 1e20
        z[0] = loc[0]
    elif case == "absent_expert_nan_loc":  # expert 2 absent for batch entry 1, its loc NaN there
        loc[2, 1, 0] = float("nan")
        mask = torch.ones(M, B, dtype=torch.bool)
        mask[2, 1] = False
    else:
        raise ValueError(case)
    return (*(t.to(dev).requires_grad_() for t in (z, loc, scale)), None if mask is None else mask.to(dev))


def mixture_extreme_case(case, family, backend):
    """(lq, grads of z, loc, scale) of a float32 mixture at an extreme input."""
    z, loc, scale, mask = _extreme_experts(case)
    lq = ops.mixture_log_density(z, loc, scale, family=family, mask=mask, backend=backend)
    return (lq, *_grads(lq, (z, loc, scale)))


MIXTURE_EXTREME_CASES = ("z_times_1e20", "one_scale_1e-30", "one_scale_1e-20_near", "collapsed_expert",
                         "huge_scales", "far_expert", "absent_expert_nan_loc")


def _check_against_reference(what, got, want, names):
    for name, t in zip(names, got):
        assert not torch.isnan(t).any(), f"{what}: NaN in {name}"
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}, {name}: {m}")


def check_mixture_extreme(case, family, backend):
    got = mixture_extreme_case(case, family, backend)
    what = f"{family} {case} on {backend}"
    _check_against_reference(what, got, mixture_extreme_case(case, family, "reference"), ("lq", "dz", "dloc", "dscale"))
    if case == "z_times_1e20" and family == "normal":
        assert (got[0] == -math.inf).all() and all((t == 0).all() for t in got[1:])


# importance_ratios: z[d] are expert d's samples (its own density finite), the other experts' densities
# there extreme: ratios of 0 (weight 0: zero gradient, never NaN) and up to 1e30
RATIOS_EXTREME_CASES = ("one_scale_1e-30", "one_scale_1e-20_near", "collapsed_expert", "huge_scales", "far_expert")


def ratios_extreme_case(case, family, backend):
    """(ratio, grads of loc, scale) of float32 importance ratios at an extreme input."""
    z, loc, scale, _ = _extreme_experts(case)
    if case == "one_scale_1e-30":
        with torch.no_grad():
            z[1, :, 0, 2] = loc[1, 0, 2]  # a sample of expert 1 has a finite density under it
    ratio = ops.importance_ratios(z, loc, scale, family=family, backend=backend)
    return (ratio, *_grads(ratio, (loc, scale)))


def check_ratios_extreme(case, family, backend):
    got = ratios_extreme_case(case, family, backend)
    assert torch.isfinite(got[0]).all(), "the grid's ratios are all finite"
    what = f"{family} {case} on {backend}"
    _check_against_reference(what, got, ratios_extreme_case(case, family, "reference"), ("ratio", "dloc", "dscale"))


def check_bernoulli_infinite_logits(backend):
    """log p(x | l) and d/dl at l = +-inf for x in {0, 0.3, 1}: the limits, never NaN."""
    dev = torch.get_default_device()
    inf = math.inf
    x = torch.tensor([[0.0, 0.3, 1.0, 0.0, 0.3, 1.0]], device=dev)
    logits = torch.tensor([[[inf, inf, inf, -inf, -inf, -inf]]], device=dev)  # [S=1, B=1, E=6]
    for e in range(6):  # one event per call: the sum of an -inf and a 0 hides nothing then
        le = logits[..., e : e + 1].clone().requires_grad_()
        out = ops.likelihood_sum(x[:, e : e + 1], le, family="bernoulli", backend=backend)
        xe, pos = x[0, e].item(), e < 3
        want = 0.0 if (pos and xe == 1.0) or (not pos and xe == 0.0) else -inf
        assert out.item() == want, f"bernoulli x={xe} logit={'+' if pos else '-'}inf on {backend}: {out.item()}"
        (gl,) = torch.autograd.grad(out.sum(), le)
        torch.testing.assert_close(gl.item(), xe - (1.0 if pos else 0.0))
