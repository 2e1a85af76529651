"""Exactness of the DReG estimators: their expectations by quadrature, and a paired sampling test.

Quadrature (tests/quadrature.py): the batch axis of a drop-in model is a Gauss-Hermite grid of
the M*K reparameterisation noise variables, so an objective's gradient is its estimator's exact
expectation up to a quadrature error that shrinks geometrically as the grid refines, and the
IWAE gradient is the true gradient of the bound. A sampling test cannot see a 10% bias under
IWAE's variance; this can see 1e-3.
"""
import math

import pytest
import torch

import mmvae_fast.objectives as obj
import toy
from quadrature import PARAMS, GridMMVAE, GridVAE, expected_gradient, grid, rel_err

BOUNDS = {False: (obj.m_dreg, obj.m_iwae), True: (obj.m_dreg_looser, obj.m_iwae_looser)}
# A second model: both experts near the prior, weak decoders, a wide likelihood.
PARAMS_2 = {
    "x": (0.9, -0.6),
    "enc": ((0.7, 0.1, math.log(0.8)), (0.4, -0.3, math.log(1.0))),
    "dec": ((0.6, 0.0), (0.5, 0.2)),
}
SIGMA_2 = 1.5


def test_grid_integrates_gaussian_moments():
    eps, w = grid(5, 2)
    assert eps.shape == (2, 25) and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    # Gauss-Hermite with 5 nodes is exact up to degree 9: E[e1^4 e2^2] = 3, E[e1^3] = 0
    assert abs(float((w * eps[0] ** 4 * eps[1] ** 2).sum()) - 3.0) < 1e-12
    assert abs(float((w * eps[0] ** 3).sum())) < 1e-12
    epsq, wq = grid(4, 1, "quantile")
    assert torch.allclose(wq, torch.full((4,), 0.25, dtype=wq.dtype)) and abs(float(epsq.sum())) < 1e-12


def _errors(make, grads, looser, ns):
    """Relative error of each estimator's expected encoder gradient against the true one, per n;
    and the largest deviation of its expected decoder gradient from the true one."""
    f, f_true = BOUNDS[looser]
    errs, dec_dev = {g: [] for g in grads}, 0.0
    for n in ns:
        model = make(n)
        enc_true, dec_true = expected_gradient(model, f_true)
        for g in grads:
            enc, dec = expected_gradient(model, f, grad=g)
            errs[g].append(rel_err(enc, enc_true))
            dec_dev = max(dec_dev, float((dec - dec_true).abs().max()))
    return errs, dec_dev


def test_dreg_single_modality_is_exact_and_released_is_not():
    errs = {}
    for n in (6, 10, 14):
        model = GridVAE(K=2, n=n)
        enc_true, _ = expected_gradient(model, obj.iwae)
        for g in ("eq8", "released"):
            errs.setdefault(g, []).append(rel_err(expected_gradient(model, obj.dreg, grad=g)[0], enc_true))
    e = errs["eq8"]
    assert e[-1] < 1e-4 and e[0] > e[1] > e[2], e
    assert min(errs["released"]) > 0.2, errs["released"]


@pytest.mark.parametrize("looser", [False, True], ids=["stratified", "looser"])
def test_mixture_dreg_is_exact_eq8_and_released_are_biased(looser):
    grads = ("mixture", "mixture-centred", "eq8", "released")
    errs, dec_dev = _errors(lambda n: GridMMVAE(M=2, K=2, n=n), grads, looser, (8, 12, 16))
    for g in ("mixture", "mixture-centred"):
        e = errs[g]
        assert e[-1] < 0.01, (g, e)  # measured 3.4e-3 stratified, 9.8e-4 looser at 16^4
        assert e[0] > e[1] > e[2] and e[2] < e[0] / 4, (g, e)  # shrinks as the grid refines
    # eq. 8 converges to a bias (measured 16.7% stratified, 14.5% looser): a documented property
    e = errs["eq8"]
    assert e[-1] > 0.04 and abs(e[-1] - e[-2]) < 0.01, e
    assert errs["released"][-1] > 0.3, errs["released"]  # measured 297% stratified, 71% looser
    # every DReG variant gives the decoder IWAE's gradient, sample by sample
    assert dec_dev < 1e-12


@pytest.mark.parametrize("looser", [False, True], ids=["stratified", "looser"])
def test_mixture_dreg_is_exact_on_a_second_model(looser):
    make = lambda n: GridMMVAE(M=2, K=2, n=n, params=PARAMS_2, sigma=SIGMA_2)  # noqa: E731
    errs, _ = _errors(make, ("mixture", "mixture-centred"), looser, (8, 16))
    for g, e in errs.items():
        assert e[-1] < 0.005 and e[-1] < e[0] / 4, (g, e)


def test_mixture_estimators_equal_eq8_with_one_expert_on_the_grid():
    model = GridMMVAE(M=1, K=2, n=10, params={k: v[:1] for k, v in PARAMS.items()})
    for f, _ in BOUNDS.values():
        ref, _ = expected_gradient(model, f, grad="eq8")
        for g in ("mixture", "mixture-centred"):
            torch.testing.assert_close(expected_gradient(model, f, grad=g)[0], ref)


# ------------------------------------------------------------------------------------------
# Paired Monte-Carlo test on a small MMVAE with networks and Laplace experts
# ------------------------------------------------------------------------------------------


def _paired_z(model, x, K, grad, looser, reps):
    """Per encoder coordinate: z = mean / standard error of g_grad - g_iwae over `reps` draws,
    each pair computed on the same noise."""
    f, f_true = BOUNDS[looser]
    enc = [p for n, p in model.named_parameters() if ".enc." in n]
    diffs = []
    for seed in range(reps):
        gs = []
        for fn, kw in ((f, {"grad": grad}), (f_true, {})):
            torch.manual_seed(seed)
            gs.append(torch.cat([g.flatten() for g in torch.autograd.grad(fn(model, x, K, **kw), enc)]))
        diffs.append(gs[0] - gs[1])
    d = torch.stack(diffs)
    return d.mean(0) / (d.std(0) / math.sqrt(reps))


@pytest.mark.parametrize("looser", [False, True], ids=["stratified", "looser"])
def test_paired_sampling_mixture_unbiased_biased_flagged(looser):
    torch.manual_seed(0)
    model = toy.make_mmvae(2, "laplace", ["laplace", "normal"], L=2)
    x = [xi.repeat(4, *[1] * (xi.dim() - 1)) for xi in toy.sample_batch(model, B=16)]  # 4 draws per point
    reps = 150
    # the biased one this test must flag: eq. 8 on the looser bound (z up to 8 here); on the
    # stratified bound eq. 8's bias on this model is below a sampling test's resolution (z ~ 3),
    # which is why exactness is proven by quadrature above, so there it must flag "released".
    biased = "eq8" if looser else "released"
    zs = {g: _paired_z(model, x, 4, g, looser, reps) for g in ("mixture", "mixture-centred", biased)}
    # Bonferroni over the coordinates at family-wise level 1e-3 (z ~ N(0, 1) without bias)
    P = zs[biased].numel()
    crit = float(torch.special.ndtri(torch.tensor(1 - 1e-3 / (2 * P), dtype=torch.float64)))
    for g in ("mixture", "mixture-centred"):
        assert zs[g].abs().max() < crit, (g, float(zs[g].abs().max()), crit)
    assert zs[biased].abs().max() > crit + 2, (biased, float(zs[biased].abs().max()), crit)  # it has power


# ------------------------------------------------------------------------------------------
# The implementation computes the documented formula, sample by sample
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("looser", [False, True], ids=["stratified", "looser"])
@pytest.mark.parametrize("grad", ["mixture", "mixture-centred"])
@pytest.mark.parametrize("M", [2, 3])
def test_mixture_dreg_equals_per_sample_formula(looser, grad, M):
    """mixture_dreg_estimator's docstring, term by term, with torch.distributions log_prob."""
    model = toy.make_mmvae(M, "laplace", ["laplace", "bernoulli", "normal"][:M])
    x = toy.sample_batch(model, B=3)
    K = 4
    torch.manual_seed(5)
    qz_xs, px_zs, zss = model(x, K)
    pz = model.pz(*model.pz_params)
    q_det = [v.qz_x(*[p.detach() for p in v.qz_x_params]) for v in model.vaes]
    a = [torch.stack([q.log_prob(zss[r]).sum(-1) for q in q_det]) for r in range(M)]  # a[r][m]: z live
    lw = torch.stack([
        pz.log_prob(zss[r]).sum(-1)
        + sum(px.log_prob(x[d]).reshape(K, 3, -1).sum(-1) * model.vaes[d].llik_scaling for d, px in enumerate(px_zs[r]))
        - (torch.logsumexp(a[r], 0) - math.log(M))
        for r in range(M)
    ])
    if looser:
        wbar = torch.softmax(lw.detach(), 1)
        W = wbar / M  # the weight of sample (r, k) in the bound (mean over groups outside)
    else:
        wbar = torch.softmax(lw.detach().flatten(0, 1), 0).reshape(lw.shape)
        W = wbar
    c = 1 / (M * K) if grad == "mixture-centred" else 0.0  # in units of W, for both bounds
    pi_own = torch.stack([torch.softmax(a[r], 0)[r] for r in range(M)])  # pi_r(z_rk), z live
    enc = [p for n, p in model.named_parameters() if ".enc." in n]
    dec = [p for n, p in model.named_parameters() if ".enc." not in n and p.requires_grad]
    dlw_dz = torch.autograd.grad(lw.sum(), zss, retain_graph=True)
    dpi_dz = torch.autograd.grad(pi_own.sum(), zss, retain_graph=True)
    cot = [
        (W[r] * (1 - pi_own[r].detach() * (1 - wbar[r]))).unsqueeze(-1) * dlw_dz[r]
        - (W[r] - c).unsqueeze(-1) * dpi_dz[r]
        for r in range(M)
    ]
    g_z = torch.autograd.grad(zss, enc, cot, retain_graph=True)
    # direct: - (W - c) sum_{m != r} pi_m(z) d/dphi log q_m(z) at fixed z
    direct = 0
    for r in range(M):
        zr = zss[r].detach()
        pis = torch.softmax(torch.stack([q.log_prob(zr).sum(-1) for q in q_det]), 0)
        for m in range(M):
            if m != r:
                direct = direct - ((W[r] - c) * pis[m] * qz_xs[m].log_prob(zr).sum(-1)).sum()
    g_direct = torch.autograd.grad(direct, enc, retain_graph=True)
    g_dec = torch.autograd.grad(lw, dec, W, allow_unused=True)
    model.zero_grad()
    torch.manual_seed(5)
    f = obj.m_dreg_looser if looser else obj.m_dreg
    f(model, x, K, grad=grad).backward()
    for p, g1, g2 in zip(enc, g_z, g_direct):
        torch.testing.assert_close(p.grad, g1 + g2)
    for p, g in zip(dec, g_dec):
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if p.grad is None else p.grad, zero if g is None else g)


@pytest.mark.parametrize("looser", [False, True], ids=["stratified", "looser"])
def test_centred_mixture_dreg_is_zero_at_exact_mixture_posterior(looser):
    from test_estimators import ExactMMVAE, enc_grads

    torch.manual_seed(0)
    model = ExactMMVAE()
    x = [torch.randn(6, 2, dtype=torch.float64) for _ in range(2)]
    f = BOUNDS[looser][0]
    assert enc_grads(model, f(model, x, 5, grad="mixture-centred")).abs().max() < 1e-12
    # the plain mixture estimator keeps the other experts' scores: zero only on average
    assert enc_grads(model, f(model, x, 5, grad="mixture")).abs().max() > 1e-3


def _tensor_problem(seed=0, M=2, K=3, B=4, L=2, family="laplace"):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(M, B, L, generator=g, dtype=torch.float64).requires_grad_()
    log_scale = (0.3 * torch.randn(M, B, L, generator=g, dtype=torch.float64)).requires_grad_()
    theta = torch.randn(L, generator=g, dtype=torch.float64).requires_grad_()
    eps = torch.randn(M, K, B, L, generator=g, dtype=torch.float64)
    return loc, log_scale, theta, eps


@pytest.mark.parametrize("dim", [1, (0, 1)])
def test_mixture_dreg_estimator_tensor_forms_agree(dim):
    """zs as one [M, K, B, L] tensor or as M tensors [K, B, L]: same value, same gradients."""
    loc, log_scale, theta, eps = _tensor_problem()
    out = []
    for as_tensor in (True, False):
        scale = log_scale.exp()
        z = loc[:, None] + scale[:, None] * eps
        zs = z if as_tensor else list(z.unbind(0))
        zz = zs if as_tensor else torch.stack(zs)
        log_joint = -0.5 * (zz**2).sum(-1) - ((zz * theta).sum(-1) - 1.0).abs()
        est = obj.mixture_dreg_estimator(log_joint, zs, loc, scale, dim, family="laplace")
        out.append((est.detach(), torch.autograd.grad(est.sum(), (loc, log_scale, theta))))
    torch.testing.assert_close(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b)
    # its value is the bound of lw = log_joint - log q_mix(z)
    assert out[0][0].shape == ((2, 4) if dim == 1 else (4,))


def test_mixture_dreg_estimator_rejects_bad_arguments():
    loc, log_scale, _, eps = _tensor_problem()
    z = loc[:, None] + log_scale.exp()[:, None] * eps
    with pytest.raises(ValueError, match="log_joint"):
        obj.mixture_dreg_estimator(torch.zeros(2, 3), z, loc, log_scale.exp())
    with pytest.raises(ValueError, match="dim"):
        obj.mixture_dreg_estimator(torch.zeros(2, 3, 4), z, loc, log_scale.exp(), 0)
