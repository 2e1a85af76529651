"""importance_ratios on every backend: the grid against torch.distributions, then the C++
kernels' gradcheck and the Triton kernels (under the interpreter) against the reference."""
import math

import pytest
import torch
from helpers import (
    DIST,
    FAMILIES,
    NAMESPACES,
    T,
    assert_grads,
    check_close,
    cpu_experts,
    cpu_test,
    experts,
    library,
    opcheck,
    rand,
    triton_experts,
    triton_test,
)

from mmvae_fast import ops
from mmvae_fast import reference as ref

import numerics

# ------------------------------------------------------------------ every backend


@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("M,K,B,L", [(2, 3, 4, 5), (3, 1, 2, 1), (1, 2, 2, 3)])
def test_importance_ratios_match_direct(backend, family, M, K, B, L):
    g = torch.Generator().manual_seed(11 + M)
    z, loc, scale = experts(M, K, B, L, g)
    ratio = ops.importance_ratios(z, loc, scale, family=family, backend=backend)
    q = [DIST[family](loc[m], scale[m]) for m in range(M)]
    ref = torch.stack([
        torch.stack([
            torch.ones(K, B, dtype=torch.float64) if r == d
            else torch.exp(q[r].log_prob(z[d].detach()).sum(-1) - q[d].log_prob(z[d].detach()).sum(-1).detach())
            for d in range(M)
        ])
        for r in range(M)
    ])
    torch.testing.assert_close(ratio, ref)
    cot = rand(M, M, K, B, gen=g)
    gr = torch.autograd.grad(ratio, (z, loc, scale), cot, allow_unused=True)
    if M == 1:  # only the constant diagonal: no gradient anywhere
        assert all(t is None or t.abs().max() == 0 for t in gr)
        return
    gref = torch.autograd.grad(ref, (z, loc, scale), cot, allow_unused=True)
    assert gr[0] is None or gr[0].abs().max() == 0  # z never gets a gradient
    check_close(gr[1:], gref[1:])


# ------------------------------------------------------------------ cpu


@cpu_test
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_gradcheck_ratios(family):
    """Row r of the ratios depends on expert r's parameters only through its numerators (its own
    denominators are a stop-gradient): finite differences in loc[r], scale[r] of row r check it."""
    z, loc, scale = (t.detach() for t in cpu_experts(3, 2, 3, 4, seed=2))
    for r in range(3):
        def row(loc_r, scale_r):
            lo, sc = loc.clone(), scale.clone()
            lo[r], sc[r] = loc_r, scale_r
            return ops.importance_ratios(z, lo, sc, family=family, backend="cpu")[r]

        assert torch.autograd.gradcheck(row, (loc[r].clone().requires_grad_(), scale[r].clone().requires_grad_()))


# ------------------------------------------------------------------ triton


@NAMESPACES
@pytest.mark.parametrize("family", FAMILIES)
def test_opcheck_importance_ratios(family, ns):
    lib = library(ns, "importance_ratios")
    d = [t.detach() for t in cpu_experts(2, 3, 4, 5, seed=5)]
    opcheck(lib.importance_ratios.default, tuple(d) + (family,))
    ratio = lib.importance_ratios(*d, family)
    opcheck(lib.importance_ratios_backward.default, (torch.randn_like(ratio), ratio, *d, family))


@triton_test
@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("M,K,B,L", [(3, 3, 5, 3), (1, 2, 2, 3), (2, 1, 1, 1)])
def test_triton_ratios_values_and_grads(family, M, K, B, L):
    g = torch.Generator().manual_seed(10 + M)
    z, loc, scale = triton_experts(M, K, B, L, g)
    ratio = ops.importance_ratios(z, loc, scale, family=family, **T)
    assert_grads((ratio,), (ref.importance_ratios(z, loc, scale, family),), (z, loc, scale), g)
    assert (torch.diagonal(ratio, 0, 0, 1) == 1).all()


@triton_test
def test_triton_ratios_half_inputs_and_nan():
    g = torch.Generator().manual_seed(12)
    z, loc, scale = triton_experts(2, 3, 3, 4, g, torch.bfloat16)
    ratio = ops.importance_ratios(z, loc, scale, family="laplace", **T)
    assert ratio.dtype == torch.float32
    assert_grads((ratio,), (ref.importance_ratios(z, loc, scale, "laplace"),), (z, loc, scale), g, rtol=1e-4, atol=1e-4)
    zn = z.detach().double().clone()
    zn[1, 0, 1, 2] = math.nan
    r = ops.importance_ratios(zn, loc.detach().double(), scale.detach().double(), **T)
    assert torch.isnan(r[0, 1, 0, 1]) and r[1, 1, 0, 1] == 1 and torch.isfinite(r[:, 0]).all()


# issue 16: second-order gradients (the reference gives them, the fused backends refuse clearly)
# and docs/design.md section 2's NaN / inf policy at extreme inputs, on every backend
def test_importance_ratios_second_order(backend):
    numerics.check_second_order("importance_ratios", backend)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", numerics.RATIOS_EXTREME_CASES)
def test_importance_ratios_extreme_inputs_follow_the_nan_policy(backend, case, family):
    numerics.check_ratios_extreme(case, family, backend)
