"""Every op on every available backend against direct torch.distributions computations:
values and gradients, edge shapes, -inf / NaN rows, large magnitudes, half-precision inputs.

Each test runs once per (device, backend) that can run its op here: CPU tensors on every CPU
backend and, where a CUDA device is present, CUDA tensors on every CUDA backend (triton, cuda,
reference). The `backend` fixture makes its device torch's default for the test; the tests draw
their random numbers on the CPU (seeded) and move them, so both devices see the same inputs."""
import math

import pytest
import torch
import torch.distributions as D

from mmvae_fast import ops

DIST = {"normal": D.Normal, "laplace": D.Laplace}
# Each op is tested on every backend that has it here (new backends join automatically).
OPS = ("importance_weights", "mixture_log_density", "importance_ratios", "likelihood_sum")


DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        op = next(o for o in OPS if metafunc.function.__name__.startswith("test_" + o))
        cases = [(d, b) for d in DEVICES for b in ops.available_backends(d, op=op)]
        metafunc.parametrize("backend", cases, ids=[f"{d}-{b}" for d, b in cases], indirect=True)


@pytest.fixture
def backend(request):
    device, name = request.param
    torch.set_default_device(device)
    try:
        yield name
    finally:
        torch.set_default_device(None)


def here(t):
    """t on the test's device (random numbers are drawn on the CPU, seeded, then moved)."""
    return t.to(torch.get_default_device())


def rand(*shape, dtype=torch.float64, gen=None, scale=1.0):
    return here((scale * torch.randn(tuple(shape), generator=gen, dtype=torch.float64, device="cpu")).to(dtype))


def urand(*shape, gen, dtype=torch.float64):
    return here(torch.rand(shape, generator=gen, dtype=dtype, device="cpu"))


def grads(outs, inputs, cots):
    return torch.autograd.grad(list(outs), inputs, cots, allow_unused=True, retain_graph=True)


def check_close(a, b, **kw):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None or (y is None and x.abs().max() == 0) or y is None
            continue
        torch.testing.assert_close(x, y, **kw)


# ------------------------------------------------------------------ importance weights


def direct_iw(lw, dims):
    lse = torch.logsumexp(lw, dims, keepdim=True)
    n = math.prod(lw.shape[d] for d in dims)
    w = torch.exp(lw - lse)
    return (lse - math.log(n)).squeeze(dims), w, w * w


@pytest.mark.parametrize(
    "shape,dim",
    [((7, 5), 0), ((1, 4), 0), ((6, 1), 0), ((2, 9, 3), (0, 1)), ((3, 5, 4), 1), ((4, 3, 2), -1), ((5,), 0), ((2, 3, 4, 5), (1, 3))],
)
def test_importance_weights_matches_direct(backend, shape, dim):
    g = torch.Generator().manual_seed(0)
    lw = rand(*shape, gen=g, scale=3.0).requires_grad_()
    dims = tuple(sorted(d % len(shape) for d in ((dim,) if isinstance(dim, int) else dim)))
    out = ops.importance_weights(lw, dim, backend=backend)
    ref = direct_iw(lw, dims)
    check_close(out, ref)
    cots = [rand(*o.shape, gen=g) for o in ref]
    check_close(grads(out, lw, cots), grads(ref, lw, cots))


def test_importance_weights_noncontiguous_and_broadcast(backend):
    g = torch.Generator().manual_seed(1)
    base = rand(6, 8, gen=g).requires_grad_()
    lw = base.t()[::2]  # [4, 6], non-contiguous
    out = ops.importance_weights(lw, 1, backend=backend)
    check_close(out, direct_iw(lw, (1,)))
    expanded = rand(1, 5, gen=g).expand(3, 5)  # stride-0 rows
    check_close(ops.importance_weights(expanded, 1, backend=backend), direct_iw(expanded, (1,)))


def test_importance_weights_neg_inf_rows(backend):
    lw = torch.tensor([[0.0, -math.inf, 1.0], [-math.inf, -math.inf, -math.inf], [2.0, 3.0, -math.inf]], dtype=torch.float64)
    lw.requires_grad_()
    bound, w, w2 = ops.importance_weights(lw, 1, backend=backend)
    assert bound[1] == -math.inf and torch.isfinite(bound[[0, 2]]).all()
    assert (w[1] == 0).all() and (w2[1] == 0).all() and w[0, 1] == 0 and w[2, 2] == 0
    check_close((bound[[0, 2]], w[[0, 2]]), direct_iw(lw.detach()[[0, 2]], (1,))[:2])
    (g,) = torch.autograd.grad(bound[torch.isfinite(bound)].sum() + w.sum() + w2.sum(), lw, retain_graph=True)
    assert torch.isfinite(g).all() and (g[1] == 0).all()
    (g,) = torch.autograd.grad(bound.sum(), lw)  # the -inf bound itself: zero gradient, no NaN
    assert not torch.isnan(g).any() and (g[1] == 0).all()


def test_importance_weights_nan_propagates(backend):
    lw = torch.tensor([[0.0, math.nan, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    bound, w, w2 = ops.importance_weights(lw, 1, backend=backend)
    assert torch.isnan(bound[0]) and torch.isnan(w[0]).all() and torch.isnan(w2[0]).all()
    assert torch.isfinite(bound[1]) and torch.isfinite(w[1]).all()


def test_importance_weights_large_magnitudes(backend):
    g = torch.Generator().manual_seed(2)
    lw = (rand(8, 30, gen=g) + 1e4).requires_grad_()
    lw2 = (rand(8, 30, gen=g) - 1e4)
    for x in (lw, lw2, torch.cat([lw.detach(), lw2], 1)):
        check_close(ops.importance_weights(x, 1, backend=backend), direct_iw(x, (1,)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_importance_weights_low_precision_accumulates_in_float32(backend, dtype):
    g = torch.Generator().manual_seed(3)
    lw = rand(4, 300, gen=g, scale=2.0).to(dtype).requires_grad_()
    bound, w, w2 = ops.importance_weights(lw, 1, backend=backend)
    assert bound.dtype == torch.float32 and w.dtype == torch.float32
    ref = direct_iw(lw.detach().double(), (1,))
    check_close((bound.double(), w.double(), w2.double()), ref, rtol=1e-5, atol=1e-6)
    (gl,) = torch.autograd.grad(bound.sum(), lw)
    assert gl.dtype == dtype
    torch.testing.assert_close(gl.double(), ref[1], rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------ mixture log-density


def direct_pairwise(z, loc, scale, family):
    M = z.shape[0]
    return torch.stack([
        torch.stack([DIST[family](loc[m], scale[m]).log_prob(z[r]).sum(-1) for m in range(M)]) for r in range(M)
    ])


def experts(M, K, B, L, gen, dtype=torch.float64):
    z = rand(M, K, B, L, gen=gen, dtype=dtype).requires_grad_()
    loc = rand(M, B, L, gen=gen, dtype=dtype).requires_grad_()
    scale = (0.3 + urand(M, B, L, gen=gen)).to(dtype).requires_grad_()
    return z, loc, scale


@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("M,K,B,L", [(2, 3, 4, 5), (1, 1, 1, 1), (3, 1, 2, 7), (2, 4, 1, 1), (5, 2, 3, 3)])
def test_mixture_log_density_matches_direct(backend, family, M, K, B, L):
    g = torch.Generator().manual_seed(M * 100 + K * 10 + L)
    z, loc, scale = experts(M, K, B, L, g)
    lq, a = ops.mixture_log_density(z, loc, scale, family=family, return_pairwise=True, backend=backend)
    a_ref = direct_pairwise(z, loc, scale, family)
    lq_ref = torch.logsumexp(a_ref, 1) - math.log(M)
    check_close((lq, a), (lq_ref, a_ref))
    cots = [rand(*lq.shape, gen=g), rand(*a.shape, gen=g)]
    check_close(grads((lq, a), (z, loc, scale), cots), grads((lq_ref, a_ref), (z, loc, scale), cots))
    lq_only = ops.mixture_log_density(z, loc, scale, family=family, backend=backend)
    check_close(grads((lq_only,), (z, loc, scale), cots[:1]), grads((lq_ref,), (z, loc, scale), cots[:1]))


@pytest.mark.parametrize("family", ["normal", "laplace"])
def test_mixture_log_density_mask(backend, family):
    g = torch.Generator().manual_seed(7)
    M, K, B, L = 3, 2, 4, 3
    z, loc, scale = experts(M, K, B, L, g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)  # b=3: none present
    lq = ops.mixture_log_density(z, loc, scale, family=family, mask=mask, backend=backend)
    a = direct_pairwise(z, loc, scale, family)
    for b in range(3):
        present = mask[:, b]
        ref = torch.logsumexp(a[:, present, :, b], 1) - math.log(int(present.sum()))
        torch.testing.assert_close(lq[:, :, b], ref)
    assert (lq[:, :, 3] == -math.inf).all()
    (gz, gl, gs) = torch.autograd.grad(lq[:, :, :3].sum(), (z, loc, scale))
    assert torch.isfinite(gz).all() and (gl[~mask] == 0).all() and (gs[~mask] == 0).all()
    # a 1-D mask means the same experts for every batch entry
    lq1 = ops.mixture_log_density(z, loc, scale, family=family, mask=torch.tensor([True, False, True]), backend=backend)
    torch.testing.assert_close(lq1, torch.logsumexp(a[:, [0, 2]], 1) - math.log(2))


def test_mixture_log_density_noncontiguous_and_low_precision(backend):
    g = torch.Generator().manual_seed(8)
    z, loc, scale = experts(2, 3, 4, 5, g)
    zt = z.detach().transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous view
    assert not zt.is_contiguous()
    ref = torch.logsumexp(direct_pairwise(zt, loc, scale, "laplace"), 1) - math.log(2)
    torch.testing.assert_close(ops.mixture_log_density(zt, loc, scale, family="laplace", backend=backend), ref)
    for dt in (torch.float16, torch.bfloat16):
        out = ops.mixture_log_density(z.to(dt), loc.to(dt), scale.to(dt), family="normal", backend=backend)
        assert out.dtype == torch.float32
        a = direct_pairwise(z.detach().to(dt).double(), loc.detach().to(dt).double(), scale.detach().to(dt).double(), "normal")
        torch.testing.assert_close(out.double(), torch.logsumexp(a, 1) - math.log(2), rtol=1e-5, atol=1e-4)


def test_mixture_log_density_nan_propagates(backend):
    g = torch.Generator().manual_seed(9)
    z, loc, scale = (t.detach().clone() for t in experts(2, 2, 3, 2, g))
    z[0, 1, 2, 0] = math.nan
    lq = ops.mixture_log_density(z, loc, scale, backend=backend)
    assert torch.isnan(lq[0, 1, 2]) and torch.isfinite(lq[1]).all() and torch.isfinite(lq[0, 0]).all()


# ------------------------------------------------------------------ importance ratios


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


# ------------------------------------------------------------------ likelihood sums


def direct_lik(x, params, family, scale):
    if family == "laplace":
        d = D.Laplace(params, scale)
    elif family == "normal":
        d = D.Normal(params, scale)
    elif family == "bernoulli":
        d = D.Bernoulli(logits=params, validate_args=False)  # soft targets are legal
    else:
        d = D.Categorical(logits=params)
    lp = d.log_prob(x)
    n_event = x.dim() - 1
    return lp.sum(tuple(range(lp.dim() - n_event, lp.dim()))) if n_event else lp


@pytest.mark.parametrize("family", ["laplace", "normal", "bernoulli", "categorical"])
@pytest.mark.parametrize("S,B,E", [((3,), 4, (5,)), ((1,), 1, (1,)), ((2, 3), 2, (3, 3)), ((), 5, (7,)), ((4,), 3, ())])
def test_likelihood_sum_matches_direct(backend, family, S, B, E):
    g = torch.Generator().manual_seed(21)
    V = 6
    if family == "categorical":
        x = here(torch.randint(0, V, (B, *E), generator=g, device="cpu"))
        params = rand(*S, B, *E, V, gen=g).requires_grad_()
    else:
        x = rand(B, *E, gen=g) if family != "bernoulli" else urand(B, *E, gen=g).round()
        params = rand(*S, B, *E, gen=g).requires_grad_()
    scale = torch.tensor(0.75, dtype=torch.float64) if family in ("laplace", "normal") else None
    out = ops.likelihood_sum(x, params, family=family, scale=scale, backend=backend)
    ref = direct_lik(x, params, family, scale)
    assert out.shape == (*S, B)
    torch.testing.assert_close(out, ref)
    cot = rand(*out.shape, gen=g)
    check_close(torch.autograd.grad(out, params, cot), torch.autograd.grad(ref, params, cot))


@pytest.mark.parametrize("family", ["laplace", "normal"])
def test_likelihood_sum_tensor_scale_gets_gradient(backend, family):
    g = torch.Generator().manual_seed(22)
    x = rand(3, 4, gen=g)
    params = rand(2, 3, 4, gen=g).requires_grad_()
    scale = (0.5 + urand(4, gen=g)).requires_grad_()
    out = ops.likelihood_sum(x, params, family=family, scale=scale, backend=backend)
    ref = direct_lik(x, params, family, scale)
    torch.testing.assert_close(out, ref)
    check_close(torch.autograd.grad(out.sum(), (params, scale)), torch.autograd.grad(ref.sum(), (params, scale)))


def test_likelihood_sum_low_precision_and_noncontiguous(backend):
    g = torch.Generator().manual_seed(23)
    x = urand(4, 6, gen=g)
    params = rand(3, 4, 6, gen=g)
    ref = direct_lik(x, params, "bernoulli", None)
    for dt in (torch.float16, torch.bfloat16):
        out = ops.likelihood_sum(x.to(dt), params.to(dt), family="bernoulli", backend=backend)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), direct_lik(x.to(dt).double(), params.to(dt).double(), "bernoulli", None), rtol=1e-5, atol=1e-4)
    pt = params.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(ops.likelihood_sum(x, pt, family="bernoulli", backend=backend), ref)


def test_likelihood_sum_nan_propagates(backend):
    x = torch.zeros(2, 3, dtype=torch.float64)
    params = torch.zeros(2, 2, 3, dtype=torch.float64)
    params[1, 0, 2] = math.nan
    out = ops.likelihood_sum(x, params, family="laplace", scale=1.0, backend=backend)
    assert torch.isnan(out[1, 0]) and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1])
