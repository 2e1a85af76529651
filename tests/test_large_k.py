"""Large K: the chunked path equals the unchunked objective on the same noise (values and
gradients), and the chunked log-likelihood equals the unchunked one.

The toy models here draw their noise eps from torch's RNG and record it; replaying the chunks'
noise, concatenated, through one unchunked call gives the unchunked objective on exactly the
samples the chunked path used."""
import math

import pytest
import torch
import torch.distributions as D

import mmvae_fast.objectives as obj
from mmvae_fast import large_k
import toy


class NoiseVAE(toy.TinyVAE):
    """TinyVAE whose reparameterisation noise is recorded (or replayed when `replay` is set)."""

    def forward(self, x, K=1):
        self._qz_x_params = loc, scale = self.encode(x)
        if self.replay is not None:
            eps = self.replay
            assert eps.shape[0] == K
        else:
            eps = self.qz_x(torch.zeros_like(loc), torch.ones_like(loc)).sample((K,))
            self.noise.append(eps)
            self.autocast.append(torch.is_autocast_enabled("cpu"))
        zs = loc + scale * eps
        return self.qz_x(loc, scale), self.px_z(zs), zs


def noisy(vae):
    vae.__class__, vae.noise, vae.replay, vae.autocast = NoiseVAE, [], None, []
    return vae


def make_mm(M, family, liks):
    model = toy.make_mmvae(M, family, liks)
    for v in model.vaes:
        noisy(v)
    return model


def make_single(family, lik):
    torch.manual_seed(0)
    shape = (4,) if lik == "categorical" else (2, 3)
    return noisy(toy.TinyVAE(shape, 3, family, lik, llik_scaling=1.7).double())


def vaes(model):
    return list(model.vaes) if hasattr(model, "vaes") else [model]


def run(fn, model, x, scale=-1.0):
    """Value, and the gradients of scale * value (a training loss: grad_output is not 1)."""
    model.zero_grad()
    val = fn(model, x)
    (scale * val).backward()
    return val.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-9, atol=1e-10):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def chunked_vs_unchunked(fn, model, x, K, k_chunk):
    """Run fn chunked (noise recorded), then unchunked on the concatenated noise of the chunks."""
    for v in vaes(model):
        v.noise, v.replay = [], None
    torch.manual_seed(3)
    chunked = run(lambda m, x: fn(m, x, K, k_chunk=k_chunk), model, x)
    n = math.ceil(K / k_chunk)
    for v in vaes(model):
        # forward pass n chunks, backward recompute n chunks: the same noise, chunk by chunk
        assert len(v.noise) == 2 * n
        assert [e.shape[0] for e in v.noise[:n]] == [min(k_chunk, K - s) for s in range(0, K, k_chunk)]
        for e1, e2 in zip(v.noise[:n], v.noise[n:]):
            assert torch.equal(e1, e2)
        v.replay = torch.cat(v.noise[n:])
    unchunked = run(lambda m, x: fn(m, x, K), model, x)
    for v in vaes(model):
        v.replay = None
    return chunked, unchunked


MM = [(2, "laplace", ["laplace", "bernoulli"]), (3, "normal", ["categorical", "normal", "laplace"])]
MM_OBJECTIVES = [
    ("m_iwae", obj.m_iwae, None),
    ("m_iwae_looser", obj.m_iwae_looser, None),
    *[(f"m_dreg-{g}", obj.m_dreg, g) for g in obj.GRADS],
    *[(f"m_dreg_looser-{g}", obj.m_dreg_looser, g) for g in obj.GRADS],
]


def with_grad(fn, grad):
    return fn if grad is None else (lambda m, x, K, **kw: fn(m, x, K, grad=grad, **kw))


@pytest.mark.parametrize("k_chunk", [2, 4], ids=["divides", "ragged"])
@pytest.mark.parametrize("M,family,liks", MM)
@pytest.mark.parametrize("name,fn,grad", MM_OBJECTIVES, ids=[o[0] for o in MM_OBJECTIVES])
def test_multimodal_chunked_equals_unchunked(name, fn, grad, M, family, liks, k_chunk):
    model = make_mm(M, family, liks)
    x = toy.sample_batch(model, B=3)
    chunked, unchunked = chunked_vs_unchunked(with_grad(fn, grad), model, x, K=6, k_chunk=k_chunk)
    assert_same(chunked, unchunked)


SINGLE_OBJECTIVES = [("iwae", obj.iwae, None), *[(f"dreg-{g}", obj.dreg, g) for g in obj.GRADS]]


@pytest.mark.parametrize("k_chunk", [1, 2, 5], ids=["one", "divides", "ragged"])
@pytest.mark.parametrize("family,lik", [("laplace", "laplace"), ("normal", "categorical")])
@pytest.mark.parametrize("name,fn,grad", SINGLE_OBJECTIVES, ids=[o[0] for o in SINGLE_OBJECTIVES])
def test_single_chunked_equals_unchunked(name, fn, grad, family, lik, k_chunk):
    model = make_single(family, lik)
    x = toy.sample_batch(model, B=4)
    chunked, unchunked = chunked_vs_unchunked(with_grad(fn, grad), model, x, K=6, k_chunk=k_chunk)
    assert_same(chunked, unchunked)


def test_chunked_dreg_differs_from_chunked_iwae():
    """The estimators stay distinct through the chunked path (the comparison above can fail)."""
    model = make_mm(2, "laplace", ["laplace", "bernoulli"])
    x = toy.sample_batch(model, B=3)
    torch.manual_seed(0)
    v1, g1 = run(lambda m, x: obj.m_iwae(m, x, 6, k_chunk=4), model, x)
    torch.manual_seed(0)
    v2, g2 = run(lambda m, x: obj.m_dreg(m, x, 6, k_chunk=4), model, x)
    torch.testing.assert_close(v1, v2)
    enc = "vaes.0.enc.weight"
    assert not torch.allclose(g1[enc], g2[enc])
    torch.testing.assert_close(g1["vaes.0.dec.weight"], g2["vaes.0.dec.weight"])  # decoder: same sg(wbar) lw


def test_gradient_reaches_x_that_requires_grad():
    model = make_mm(2, "normal", ["normal", "laplace"])
    x0 = [t.clone().requires_grad_() for t in toy.sample_batch(model, B=3)]
    x = [2.0 * x0[0], x0[1]]  # one non-leaf input, one leaf

    def fn(m, x, K, **kw):
        return obj.m_dreg_looser(m, [2.0 * x0[0], x0[1]], K, grad="mixture", **kw)

    for v in model.vaes:
        v.noise, v.replay = [], None
    torch.manual_seed(0)
    obj.m_dreg_looser(model, x, 6, grad="mixture", k_chunk=4).backward()
    gx = [t.grad.clone() for t in x0]
    for v in model.vaes:
        v.replay = torch.cat(v.noise[2:])
        x0[0].grad = x0[1].grad = None
    obj.m_dreg_looser(model, [2.0 * x0[0], x0[1]], 6, grad="mixture").backward()
    for a, b in zip(gx, x0):
        torch.testing.assert_close(a, b.grad, rtol=1e-9, atol=1e-10)
        assert a.abs().sum() > 0


def test_foreign_tensor_requiring_grad_is_an_error():
    model = make_mm(2, "laplace", ["laplace", "bernoulli"])
    x = toy.sample_batch(model, B=3)
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)  # not a parameter of the model
    px_z = model.vaes[0].px_z
    model.vaes[0].px_z = lambda z: px_z(z * t)
    loss = obj.m_iwae(model, x, 6, k_chunk=4)
    with pytest.raises(RuntimeError, match="neither parameters of `model` nor tensors of `x`"):
        loss.backward()


def test_value_only_under_no_grad_and_rng_untouched_by_backward():
    model = make_mm(2, "laplace", ["laplace", "bernoulli"])
    x = toy.sample_batch(model, B=3)
    torch.manual_seed(5)
    with torch.no_grad():
        v0 = obj.m_iwae(model, x, 6, k_chunk=4)
    assert not v0.requires_grad
    torch.manual_seed(5)
    v1 = obj.m_iwae(model, x, 6, k_chunk=4)
    after_forward = torch.get_rng_state()
    v1.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.testing.assert_close(v0, v1.detach())


class _Counted:
    """A tensor saved for backward, counted while its graph holds it."""

    def __init__(self, t, live):
        self.t, self.n, self.live = t, t.numel() * t.element_size(), live
        live["now"] += self.n
        live["peak"] = max(live["peak"], live["now"])

    def __del__(self):
        self.live["now"] -= self.n


def peak_saved_bytes(fn):
    live = {"now": 0, "peak": 0}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Counted(t, live), lambda c: c.t):
        fn().backward()
    return live["peak"]


def test_chunk_graphs_are_freed():
    """No chunk's graph outlives its backward: the bytes saved for backward peak at one chunk's,
    whatever K; the unchunked objective's grow with K."""
    model = make_mm(2, "laplace", ["laplace", "laplace"])
    x = toy.sample_batch(model, B=3)
    for v in model.vaes:
        v.noise, v.replay = [], None
    chunked = [peak_saved_bytes(lambda: obj.m_dreg(model, x, K, k_chunk=4)) for K in (8, 64)]
    unchunked = [peak_saved_bytes(lambda: obj.m_dreg(model, x, K)) for K in (8, 64)]
    assert chunked[0] == chunked[1] > 0
    assert unchunked[1] > 4 * unchunked[0]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_k_chunk(bad):
    model = make_mm(2, "laplace", ["laplace", "bernoulli"])
    x = toy.sample_batch(model, B=2)
    with pytest.raises(ValueError, match="k_chunk"):
        obj.m_iwae(model, x, 6, k_chunk=bad)


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def lme(v, dims):
    n = math.prod(v.shape[d] for d in ((dims,) if isinstance(dims, int) else dims))
    return torch.logsumexp(v, dims) - math.log(n)


def oracle_log_likelihood(model, x, K, llik_scaling):
    """Every estimate from one unchunked call, with log_prob, the research code's way."""
    qz_xs, px_zs, zss = model(x, K)
    M = len(qz_xs)
    s = [v.llik_scaling if llik_scaling else 1.0 for v in model.vaes]
    pz = model.pz(*model.pz_params)
    lpz = torch.stack([pz.log_prob(z).sum(-1) for z in zss])  # [M, K, B]
    lpx = torch.stack([torch.stack([toy._lpx(px_zs[r][d], x[d], s[d]) for d in range(M)]) for r in range(M)])
    a = torch.stack([torch.stack([q.log_prob(zss[r]).sum(-1) for q in qz_xs]) for r in range(M)])
    lq = torch.logsumexp(a, 1) - math.log(M)
    joint = lme(lpz + lpx.sum(1) - lq, (0, 1))
    marginal = torch.stack([lme(lpz + lpx[:, d] - lq, (0, 1)) for d in range(M)])
    cross = torch.stack([torch.stack([lme(lpz[n] + lpx[n, m] - a[n, n], 0) for m in range(M)]) for n in range(M)])
    cond = torch.stack([
        torch.stack([
            lme(lpz[n] + lpx[n, m] + lpx[n, n] - a[n, n], 0) - lme(lpz[n] + lpx[n, n] - a[n, n], 0)
            for m in range(M)
        ])
        for n in range(M)
    ])
    return joint, marginal, cross, cond


@pytest.mark.parametrize("llik_scaling", [False, True])
@pytest.mark.parametrize("M,family,liks", MM)
def test_log_likelihood_chunked_equals_unchunked_oracle(M, family, liks, llik_scaling):
    model = make_mm(M, family, liks)
    x = toy.sample_batch(model, B=4)
    K, k_chunk = 10, 4
    torch.manual_seed(0)
    ll = large_k.iwae_log_likelihood(model, x, K, k_chunk, llik_scaling=llik_scaling)
    for v in model.vaes:
        assert len(v.noise) == 3
        v.replay = torch.cat(v.noise)
    with torch.no_grad():
        joint, marginal, cross, cond = oracle_log_likelihood(model, x, K, llik_scaling)
    torch.testing.assert_close(ll.joint, joint)
    torch.testing.assert_close(ll.marginal, marginal)
    torch.testing.assert_close(ll.cross, cross)
    off = ~torch.eye(M, dtype=torch.bool)
    torch.testing.assert_close(ll.conditional[off], cond[off])
    assert ll.conditional.diagonal(0, 0, 1).isnan().all()
    if llik_scaling:  # the joint estimate is the stratified training bound on the same samples
        torch.testing.assert_close(ll.joint.sum(), obj.m_iwae(model, x, K))
    for v in model.vaes:
        v.replay = None


def test_single_modality_log_likelihood():
    model = make_single("normal", "categorical")
    x = toy.sample_batch(model, B=5)
    torch.manual_seed(0)
    ll = large_k.iwae_log_likelihood(model, x, K=7, k_chunk=3, llik_scaling=True)
    assert ll.marginal is None and ll.joint.shape == (5,)
    model.replay = torch.cat(model.noise)
    torch.testing.assert_close(ll.joint.sum(), toy.o_iwae(model, x, 7))


def test_log_likelihood_converges_to_exact_marginal():
    """Linear-Gaussian model: log p(x) is known in closed form; a large-K estimate is close."""
    torch.manual_seed(0)
    model = make_single("normal", "normal")
    model.replay = None
    with torch.no_grad():
        model.dec.weight.mul_(0.5)
        model._pz_params[1].zero_()  # prior N(0, I)
    x = toy.sample_batch(model, B=3)
    W, b = model.dec.weight, model.dec.bias
    cov = W @ W.T + 0.25 * torch.eye(W.shape[0], dtype=W.dtype)
    exact = D.MultivariateNormal(b, cov).log_prob(x.reshape(3, -1))
    torch.manual_seed(1)
    est = large_k.iwae_log_likelihood(model, x, K=4000, k_chunk=1000).joint
    assert (est <= exact + 0.05).all() and (exact - est < 0.5).all()


def test_recompute_under_the_forward_autocast():
    """loss under autocast, backward outside it (the usual AMP loop): the chunks are recomputed
    under the forward's autocast, and the gradients match the unchunked bfloat16 ones to
    bfloat16 rounding (the chunks' sums round differently from one sum over K)."""
    model = make_mm(2, "normal", ["normal", "laplace"]).float()
    x = [t.float() for t in toy.sample_batch(model, B=3)]

    def fn(m, x, K, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return obj.m_dreg(m, x, K, **kw)

    for v in model.vaes:
        v.autocast = []
    chunked, unchunked = chunked_vs_unchunked(fn, model, x, K=6, k_chunk=4)
    assert all(v.autocast == [True] * 4 for v in model.vaes)  # forward and recompute, 2 chunks each
    assert_same(chunked, unchunked, rtol=2e-2, atol=4e-3)


def test_surrogate_with_minus_inf_log_weights():
    """A sample of weight zero (lw = -inf) adds nothing to the chunk surrogate's gradient, as in
    the unchunked bound; NaN still propagates."""
    lw = torch.tensor([[0.5, -1.0], [-math.inf, 2.0], [1.0, -math.inf]], dtype=torch.float64, requires_grad=True)
    full = obj.iwae_bound(lw, 0).sum()
    (g_full,) = torch.autograd.grad(full, lw)
    iw = obj.ops.importance_weights(lw.detach(), 0)
    g_chunks = torch.zeros_like(lw)
    for start, k in ((0, 2), (2, 1)):
        part = lw.detach()[start:start + k].requires_grad_()
        w = obj.ops.ImportanceWeights(iw.bound, iw.wbar[start:start + k], iw.wbar_sq[start:start + k])
        est = obj.dreg_estimator(part, None, 0, z_weight="one", weights=w).sum()
        torch.testing.assert_close(est, full.detach())
        g_chunks[start:start + k] = torch.autograd.grad(est, part)[0]
    torch.testing.assert_close(g_chunks, g_full)
    assert not g_chunks.isnan().any()
    lw_nan = lw.detach().clone()
    lw_nan[0, 0] = math.nan
    part = lw_nan.clone().requires_grad_()
    est = obj.dreg_estimator(part, None, 0, z_weight="one").sum()
    assert est.isnan() and torch.autograd.grad(est, part)[0][:, 0].isnan().all()
