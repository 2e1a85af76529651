"""The fused C++ kernels of importance_weights and likelihood_sum (backend='cpu'): float64
gradcheck, torch.library.opcheck, torch.compile(fullgraph=True), large rows, float32 accuracy of
the vectorised exp/log, and objectives that agree with the reference backend.
tests/test_ops.py runs its whole grid on this backend too."""
import math

import pytest
import torch

import mmvae_fast.objectives as obj
import toy
from mmvae_fast import ops
from mmvae_fast.ops import _dispatch

HAS_CPU = all(_dispatch.available(op, "cpu", "cpu") for op in ("importance_weights", "likelihood_sum"))
pytestmark = pytest.mark.skipif(not HAS_CPU, reason="the C++ extension is not built")
LIK = ("normal", "laplace", "bernoulli", "categorical")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def lik_inputs(family, S, B, E, V=5, g=None, dtype=torch.float64):
    if family == "categorical":
        x = torch.randint(0, V, (B, *E), generator=g)
        params = torch.randn(*S, B, *E, V, generator=g, dtype=torch.float64)
    else:
        x = torch.rand(B, *E, generator=g, dtype=torch.float64)  # soft targets for bernoulli
        params = torch.randn(*S, B, *E, generator=g, dtype=torch.float64)
    return x.to(dtype) if x.is_floating_point() else x, params.to(dtype).requires_grad_()


# ------------------------------------------------------------------ gradcheck (float64)


@pytest.mark.parametrize(
    "shape,dim", [((5, 7), 1), ((3, 4, 2), (0, 1)), ((2, 3, 4), 1), ((300,), 0), ((3, 5, 21), (0, 1)), ((2, 3, 4, 5), (1, 3))]
)
def test_importance_weights_gradcheck(shape, dim):
    lw = torch.randn(shape, generator=gen(0), dtype=torch.float64).mul(2).requires_grad_()
    for i in range(3):  # each output alone, then all of them together
        torch.autograd.gradcheck(lambda t: ops.importance_weights(t, dim, backend="cpu")[i], (lw,))
    torch.autograd.gradcheck(lambda t: tuple(ops.importance_weights(t, dim, backend="cpu")), (lw,))


def test_importance_weights_any_subset_of_gradients_matches_reference():
    g = gen(1)
    lw = torch.randn(4, 9, generator=g, dtype=torch.float64).requires_grad_()
    cots = [torch.randn(4, generator=g, dtype=torch.float64)] + [torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(2)]
    out = ops.importance_weights(lw, 1, backend="cpu")
    ref = ops.importance_weights(lw, 1, backend="reference")
    for subset in ([0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]):
        (a,) = torch.autograd.grad([out[i] for i in subset], lw, [cots[i] for i in subset], retain_graph=True)
        (b,) = torch.autograd.grad([ref[i] for i in subset], lw, [cots[i] for i in subset], retain_graph=True)
        torch.testing.assert_close(a, b, msg=lambda m: f"outputs {subset}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_importance_weights_low_precision_column_tiles(dtype):
    """lw [M, K, B] over (0, 1): the column-tile kernel (B = 37: two full tiles and a partial one)."""
    lw = (3 * torch.randn(2, 50, 37, generator=gen(13))).to(dtype).requires_grad_()
    out = ops.importance_weights(lw, (0, 1), backend="cpu")
    ref = ops.importance_weights(lw.detach().double(), (0, 1), backend="reference")
    assert out.bound.dtype == torch.float32 and out.wbar.shape == lw.shape
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
    (g,) = torch.autograd.grad(out.bound.sum(), lw)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), ref.wbar, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("family", LIK)
def test_likelihood_sum_gradcheck(family):
    x, params = lik_inputs(family, (2,), 3, (4,), g=gen(2))
    scale = 0.7 if family in ("normal", "laplace") else None
    torch.autograd.gradcheck(lambda p: ops.likelihood_sum(x, p, family=family, scale=scale, backend="cpu"), (params,))


@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("scale_shape", [(), (1,), (4,), (3, 1), (3, 4), (2, 1, 4), (2, 3, 4)])
def test_likelihood_sum_gradcheck_scale(family, scale_shape):
    """Every way a scale can broadcast to params [S=2, B=3, E=4]: shared over samples, batch,
    events or none (the kernel's per-thread and per-row scale-gradient paths)."""
    g = gen(3)
    x, params = lik_inputs(family, (2,), 3, (4,), g=g)
    scale = (0.5 + torch.rand(scale_shape, generator=g, dtype=torch.float64)).requires_grad_()
    f = lambda p, s: ops.likelihood_sum(x, p, family=family, scale=s, backend="cpu")  # noqa: E731
    torch.autograd.gradcheck(f, (params, scale))
    ref = ops.likelihood_sum(x, params, family=family, scale=scale, backend="reference")
    torch.testing.assert_close(f(params, scale), ref)


# ------------------------------------------------------------------ opcheck


def test_opcheck_importance_weights():
    g = gen(4)
    for shape in ((4, 7, 1), (2, 7, 19)):  # rows, and column tiles (one full, one partial)
        lw = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.mmvae_fast.importance_weights.default, (lw,))
        lse = torch.logsumexp(lw.detach(), 1)
        gb, gw = torch.randn(lse.shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
        torch.library.opcheck(torch.ops.mmvae_fast.importance_weights_backward.default, (lw.detach(), lse, gb, None, gw))
    lw32 = torch.randn(3, 5, 2, generator=g).requires_grad_()
    torch.library.opcheck(torch.ops.mmvae_fast.importance_weights.default, (lw32,))


@pytest.mark.parametrize("family", LIK)
def test_opcheck_likelihood_sum(family):
    code = {"normal": 0, "laplace": 1, "bernoulli": 2, "categorical": 3}[family]
    x, params = lik_inputs(family, (2,), 3, (5,), g=gen(5))
    x = x.reshape(3, 5)
    scale = None
    if code < 2:
        scale = (0.5 + torch.rand(1, 1, 5, generator=gen(6), dtype=torch.float64)).requires_grad_()
    torch.library.opcheck(torch.ops.mmvae_fast.likelihood_sum.default, (x, params, scale, code))
    grad = torch.randn(2, 3, generator=gen(7), dtype=torch.float64)
    args = (grad, x, params.detach(), None if scale is None else scale.detach(), code, True, scale is not None)
    torch.library.opcheck(torch.ops.mmvae_fast.likelihood_sum_backward.default, args)


# ------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_matches_eager():
    g = gen(8)
    lw = torch.randn(2, 5, 3, generator=g).requires_grad_()
    x = torch.randn(3, 6, generator=g)
    loc = torch.randn(4, 3, 6, generator=g).requires_grad_()
    scale = (0.5 + torch.rand(6, generator=g)).requires_grad_()
    xb = torch.rand(3, 6, generator=g)
    xc = torch.randint(0, 7, (3, 2), generator=g)
    logits = torch.randn(4, 3, 2, 7, generator=g).requires_grad_()

    def f(lw, loc, scale, logits):
        iw = ops.importance_weights(lw, (0, 1), backend="cpu")
        n = ops.likelihood_sum(x, loc, family="normal", scale=scale, backend="cpu")
        la = ops.likelihood_sum(x, loc, family="laplace", scale=0.5, backend="cpu")
        b = ops.likelihood_sum(xb, loc, family="bernoulli", backend="cpu")
        c = ops.likelihood_sum(xc, logits, family="categorical", backend="cpu")
        return iw.bound.sum() + (iw.wbar.detach() * lw).sum() + iw.wbar_sq.sum() + (n * la).mean() + b.sum() + c.sum()

    inputs = (lw, loc, scale, logits)
    eager = f(*inputs)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, inputs), torch.autograd.grad(eager, inputs)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ large rows, float32 accuracy


EPS32 = 2.0**-23


def assert_weights_accurate(w, x, ref, power=1):
    """float32 weights against float64 ones: exp(power * (x - lse)) is conditioned by its
    argument, whose float32 rounding (of x - lse, and of lse itself) alone costs
    (|x - lse| + |lse|) * eps relative: allow that and 4 ulp."""
    lse = torch.logsumexp(x.double(), -1, keepdim=True)
    tol = (4 + 2 * power * ((x.double() - lse).abs() + lse.abs())) * EPS32 * ref.abs()
    normal = ref > 1.2e-38
    err = (w.double() - ref).abs()
    assert (err[normal] <= tol[normal]).all(), f"max relative error {(err / ref)[normal].max():.3g}"
    assert (w[~normal] <= 2e-38).all()


def test_importance_weights_large_rows_float32():
    lw = torch.randn(3, 5000, generator=gen(9)) * 20
    cot = torch.randn(3, 5000, generator=gen(10))
    lw_c, lw_r = lw.clone().requires_grad_(), lw.double().requires_grad_()
    out = ops.importance_weights(lw_c, 1, backend="cpu")
    ref = ops.importance_weights(lw_r, 1, backend="reference")
    torch.testing.assert_close(out.bound.double(), ref.bound, rtol=4 * EPS32, atol=0)
    assert_weights_accurate(out.wbar, lw, ref.wbar)
    assert_weights_accurate(out.wbar_sq, lw, ref.wbar_sq, power=2)
    (ga,) = torch.autograd.grad([out.bound, out.wbar, out.wbar_sq], lw_c, [torch.ones(3), cot, cot])
    (gb,) = torch.autograd.grad([ref.bound, ref.wbar, ref.wbar_sq], lw_r, [torch.ones(3, dtype=torch.float64), cot.double(), cot.double()])
    torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-6 * gb.abs().max().item())


def test_fast_exp_over_its_whole_range():
    """exp(x - lse) for x from the max down to underflow: accurate where the result is a normal
    float, exact 0 for -inf; results below the smallest normal float are flushed to 0."""
    x = torch.cat([torch.zeros(1), torch.linspace(-87.0, 0.0, 4001), torch.linspace(-120.0, -87.0, 100), torch.tensor([-math.inf])])
    w = ops.importance_weights(x[None], 1, backend="cpu").wbar[0]
    ref = torch.softmax(x.double(), 0)
    assert_weights_accurate(w, x, ref)
    lse = torch.logsumexp(x.double(), 0)
    assert w[-1] == 0 and (w[x < -104] == 0).all() and (w[x - lse > -87] > 0).all()


@pytest.mark.parametrize("family", LIK)
def test_likelihood_sum_float32_accuracy(family):
    g = gen(11)
    x, params = lik_inputs(family, (3,), 4, (50,), V=11, g=g)
    if family == "bernoulli":
        params = (params.detach() * 30).requires_grad_()  # saturated logits: log1p(exp(-|l|)) tiny
    scale = 0.3 if family in ("normal", "laplace") else None
    x32 = x.float() if x.is_floating_point() else x
    p32 = params.detach().float().requires_grad_()
    out = ops.likelihood_sum(x32, p32, family=family, scale=scale, backend="cpu")
    ref = ops.likelihood_sum(x32.double() if x.is_floating_point() else x, p32.detach().double().requires_grad_(), family=family, scale=scale, backend="reference")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-4)
    cot = torch.randn(out.shape, generator=g)
    (ga,) = torch.autograd.grad(out, p32, cot)
    p64 = p32.detach().double().requires_grad_()
    ref = ops.likelihood_sum(x32.double() if x.is_floating_point() else x, p64, family=family, scale=scale, backend="reference")
    (gb,) = torch.autograd.grad(ref, p64, cot.double())
    torch.testing.assert_close(ga.double(), gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("V", [1590, 2**15])
def test_categorical_large_vocabulary(V):
    g = gen(12)
    x = torch.randint(0, V, (2, 3), generator=g)
    logits = (torch.randn(2, 2, 3, V, generator=g) * 3).requires_grad_()
    out = ops.likelihood_sum(x, logits, family="categorical", backend="cpu")
    l64 = logits.detach().double().requires_grad_()
    ref = ops.likelihood_sum(x, l64, family="categorical", backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-4)
    cot = torch.randn(2, 2, generator=g)
    (ga,) = torch.autograd.grad(out, logits, cot)
    (gb,) = torch.autograd.grad(ref, l64, cot.double())
    torch.testing.assert_close(ga.double(), gb, rtol=1e-5, atol=1e-8)


def test_categorical_index_out_of_range_is_a_clear_error():
    logits = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="'x' holds class index 5 outside the vocabulary"):
        ops.likelihood_sum(torch.full((3, 4), 5), logits, family="categorical", backend="cpu")


# ------------------------------------------------------------------ objectives


def values_and_grads(fn, model, x, K, backend, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)
    val = fn(model, x, K, backend=backend)
    val.backward()
    return val.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("liks", [["laplace", "bernoulli", "categorical"], ["normal", "categorical"]])
@pytest.mark.parametrize("fn", [obj.m_iwae, obj.m_iwae_looser, obj.m_dreg_looser], ids=["m_iwae", "m_iwae_looser", "m_dreg_looser"])
def test_mm_objectives_cpu_equals_reference(fn, liks, monkeypatch):
    """backend=None picks the cpu kernels for these two ops (the others as available)."""
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert _dispatch.resolve("importance_weights", None, "cpu") == "cpu"
    assert _dispatch.resolve("likelihood_sum", None, "cpu") == "cpu"
    model = toy.make_mmvae(len(liks), "laplace", liks)
    x = toy.sample_batch(model, B=4)
    (va, ga), (vb, gb) = values_and_grads(fn, model, x, 6, None), values_and_grads(fn, model, x, 6, "reference")
    torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-10)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-9, atol=1e-10, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("family,lik", [("normal", "bernoulli"), ("laplace", "categorical"), ("laplace", "normal")])
@pytest.mark.parametrize("fn", [obj.iwae, obj.dreg], ids=["iwae", "dreg"])
def test_single_objectives_cpu_equals_reference(fn, family, lik, monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    torch.manual_seed(0)
    model = toy.TinyVAE((2, 3) if lik != "categorical" else (4,), 3, family, lik, llik_scaling=1.7).double()
    x = toy.sample_batch(model, B=5)
    (va, ga), (vb, gb) = values_and_grads(fn, model, x, 7, None), values_and_grads(fn, model, x, 7, "reference")
    torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-10)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-9, atol=1e-10)


def test_float32_objective_cpu_close_to_reference(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    model = toy.make_mmvae(2, "laplace", ["laplace", "bernoulli"], dtype=torch.float32)
    x = [t.float() if t.is_floating_point() else t for t in toy.sample_batch(model, B=4)]
    (va, ga), (vb, gb) = values_and_grads(obj.m_iwae, model, x, 30, None), values_and_grads(obj.m_iwae, model, x, 30, "reference")
    assert va.dtype == torch.float32
    torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-4)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5)
