"""likelihood_sum on every backend: the grid against torch.distributions, then the C++ kernels
(gradcheck, opcheck, float32 accuracy, large vocabularies) and the Triton kernels (under the
interpreter) against the reference."""
import math

import pytest
import torch
import torch.distributions as D
from helpers import (
    NAMESPACES,
    library,
    opcheck,
    F64,
    LIK,
    T,
    assert_grads,
    check_close,
    cpu_lik_inputs,
    cpu_test,
    gen,
    here,
    rand,
    triton_lik_inputs,
    triton_test,
    urand,
)

from mmvae_fast import ops
from mmvae_fast._numerics import LIKELIHOOD_CODES
from mmvae_fast import reference as ref

import numerics

# ------------------------------------------------------------------ every backend


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


# ------------------------------------------------------------------ cpu


@cpu_test
@pytest.mark.parametrize("family", LIK)
def test_cpu_likelihood_sum_gradcheck(family):
    x, params = cpu_lik_inputs(family, (2,), 3, (4,), g=gen(2))
    scale = 0.7 if family in ("normal", "laplace") else None
    torch.autograd.gradcheck(lambda p: ops.likelihood_sum(x, p, family=family, scale=scale, backend="cpu"), (params,))


@cpu_test
@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("scale_shape", [(), (1,), ("E",), (3, 1), (3, "E"), (2, 1, "E"), (2, 3, "E")])
@pytest.mark.parametrize("E", [3, 4, 8, 20])
def test_cpu_likelihood_sum_gradcheck_scale(family, scale_shape, E):
    """Every way a scale can broadcast to params [S=2, B=3, E]: shared over samples, batch,
    events or none (the kernel's per-thread and per-row scale-gradient paths), at event sizes the
    kernel walks flat (E <= 16: unrolled for 3, 4 and 8) and row by row (20)."""
    g = gen(3)
    scale_shape = tuple(E if n == "E" else n for n in scale_shape)
    x, params = cpu_lik_inputs(family, (2,), 3, (E,), g=g)
    scale = (0.5 + torch.rand(scale_shape, generator=g, dtype=torch.float64)).requires_grad_()
    f = lambda p, s: ops.likelihood_sum(x, p, family=family, scale=s, backend="cpu")  # noqa: E731
    torch.autograd.gradcheck(f, (params, scale))
    ref = ops.likelihood_sum(x, params, family=family, scale=scale, backend="reference")
    torch.testing.assert_close(f(params, scale), ref)


@NAMESPACES
@pytest.mark.parametrize("family", LIK)
def test_opcheck_likelihood_sum(family, ns):
    lib = library(ns, "likelihood_sum")
    code = {"normal": 0, "laplace": 1, "bernoulli": 2, "categorical": 3}[family]
    x, params = cpu_lik_inputs(family, (2,), 3, (5,), g=gen(5))
    x = x.reshape(3, 5)
    scale = None
    if code < 2:
        scale = (0.5 + torch.rand(1, 1, 5, generator=gen(6), dtype=torch.float64)).requires_grad_()
    opcheck(lib.likelihood_sum.default, (x, params, scale, code))
    grad = torch.randn(2, 3, generator=gen(7), dtype=torch.float64)
    args = (grad, x, params.detach(), None if scale is None else scale.detach(), code, True, scale is not None)
    opcheck(lib.likelihood_sum_backward.default, args)


@cpu_test
@pytest.mark.parametrize("family", LIK)
@pytest.mark.parametrize("E", [4, 50])
def test_cpu_likelihood_sum_float32_accuracy(family, E):
    g = gen(11)
    x, params = cpu_lik_inputs(family, (3,), 4, (E,), V=11, g=g)
    if family == "bernoulli":
        params = (params.detach() * 30).requires_grad_()  # saturated logits: log1p(exp(-|l|)) tiny
    scale = 0.3 if family in ("normal", "laplace") else None
    x32 = x.float() if x.is_floating_point() else x
    p32 = params.detach().float().requires_grad_()
    out = ops.likelihood_sum(x32, p32, family=family, scale=scale, backend="cpu")
    x64 = x32.double() if x.is_floating_point() else x
    ref = ops.likelihood_sum(x64, p32.detach().double().requires_grad_(), family=family, scale=scale, backend="reference")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-4)
    cot = torch.randn(out.shape, generator=g)
    (ga,) = torch.autograd.grad(out, p32, cot)
    p64 = p32.detach().double().requires_grad_()
    ref = ops.likelihood_sum(x32.double() if x.is_floating_point() else x, p64, family=family, scale=scale, backend="reference")
    (gb,) = torch.autograd.grad(ref, p64, cot.double())
    torch.testing.assert_close(ga.double(), gb, rtol=1e-5, atol=1e-6)


@cpu_test
@pytest.mark.parametrize("V", [1590, 2**15])
def test_cpu_categorical_large_vocabulary(V):
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


@cpu_test
def test_cpu_categorical_index_out_of_range_is_a_clear_error():
    """The public op refuses it first (test_likelihood_sum_class_index_out_of_range_is_a_clear_error);
    the C++ op still checks its own input."""
    logits = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="'x' holds class index 5 outside the vocabulary"):
        torch.ops.mmvae_fast.likelihood_sum(torch.full((3, 4), 5), logits, None, LIKELIHOOD_CODES["categorical"])


# ------------------------------------------------------------------ triton
# interpreter blocks: BLOCK_R = 4 rows (s, b), BLOCK_E = 8 event elements, BLOCK_V = 128 classes


@triton_test
@pytest.mark.parametrize("family", ["laplace", "normal", "bernoulli", "categorical"])
@pytest.mark.parametrize("S,B,E", [((3,), 5, (11,)), ((1,), 1, (1,)), ((2, 2), 3, (2, 3)), ((), 6, (3,))])
def test_triton_likelihood_values_and_grads(family, S, B, E):
    g = torch.Generator().manual_seed(20 + len(S) + B)
    x, params = triton_lik_inputs(family, S, B, E, g)
    scale = torch.tensor(0.75, dtype=F64) if family in ("laplace", "normal") else None
    out = ops.likelihood_sum(x, params, family=family, scale=scale, **T)
    assert out.shape == (*S, B)
    assert_grads((out,), (ref.likelihood_sum(x, params, family, scale),), (params,), g)


@triton_test
@pytest.mark.parametrize("family", ["laplace", "normal"])
def test_triton_likelihood_tensor_scale_gets_gradient(family):
    g = torch.Generator().manual_seed(30)
    x, params = triton_lik_inputs(family, (2,), 3, (9,), g)
    scale = (0.5 + torch.rand(9, generator=g, dtype=F64)).requires_grad_()
    out = ops.likelihood_sum(x, params, family=family, scale=scale, **T)
    assert_grads((out,), (ref.likelihood_sum(x, params, family, scale),), (params, scale), g)


@triton_test
def test_triton_likelihood_large_vocabulary_and_half_inputs():
    g = torch.Generator().manual_seed(31)
    x, params = triton_lik_inputs("categorical", (1,), 1, (1,), g, V=2**15)  # the vocabulary limit of the brief
    out = ops.likelihood_sum(x, params, family="categorical", **T)
    assert_grads((out,), (ref.likelihood_sum(x, params, "categorical"),), (params,), g)
    for fam in ("bernoulli", "laplace", "categorical"):
        for dt in (torch.float16, torch.bfloat16):
            x, params = triton_lik_inputs(fam, (3,), 5, (10,), g, dtype=dt)
            sc = 0.5 if fam == "laplace" else None
            out = ops.likelihood_sum(x, params, family=fam, scale=sc, **T)
            assert out.dtype == torch.float32
            want = ref.likelihood_sum(x, params, fam, None if sc is None else torch.tensor(sc, dtype=dt))
            assert_grads((out,), (want,), (params,), g, rtol=1e-3, atol=1e-3)


@triton_test
def test_triton_likelihood_nan_and_bad_class_index():
    x = torch.zeros(2, 3, dtype=F64)
    params = torch.zeros(2, 2, 3, dtype=F64)
    params[1, 0, 2] = math.nan
    for fam in ("laplace", "bernoulli"):
        out = ops.likelihood_sum(x, params, family=fam, scale=1.0 if fam == "laplace" else None, **T)
        assert torch.isnan(out[1, 0]) and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1])
    # the Triton op itself (the public op refuses the index first): class 4 of 4 gives NaN, not a number
    logits = torch.zeros(1, 2, 3, 4, dtype=F64)
    out = torch.ops.mmvae_fast_triton.likelihood_sum(
        torch.tensor([[0, 4, 1], [1, 2, 3]]), logits, None, LIKELIHOOD_CODES["categorical"])
    assert torch.isnan(out[0, 0]) and torch.isfinite(out[0, 1])


@triton_test
def test_triton_likelihood_gradcheck_float64():
    g = torch.Generator().manual_seed(32)
    x, params = triton_lik_inputs("categorical", (2,), 2, (3,), g, V=9)
    assert torch.autograd.gradcheck(lambda p: ops.likelihood_sum(x, p, family="categorical", **T), (params,), fast_mode=True)
    x, params = triton_lik_inputs("normal", (2,), 3, (3,), g)
    scale = (0.5 + torch.rand(3, generator=g, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, s: ops.likelihood_sum(x, p, family="normal", scale=s, **T), (params, scale), fast_mode=True)


# issue 16: second-order gradients (the reference gives them, the fused backends refuse clearly)
# and docs/design.md section 2's NaN / inf policy at extreme inputs, on every backend
def test_likelihood_sum_second_order(backend):
    numerics.check_second_order("likelihood_sum", backend)


def test_likelihood_sum_bernoulli_infinite_logits(backend):
    numerics.check_bernoulli_infinite_logits(backend)


@pytest.mark.parametrize("scale, match", [
    (0.0, "strictly positive"), (-1, "strictly positive"), (float("nan"), "strictly positive"),
    (torch.ones(5), "does not broadcast"), (torch.ones(1, 2, 3, 4), "does not broadcast"),
    (torch.zeros(4), "strictly positive"), (torch.tensor(0.0), "strictly positive"), (torch.tensor([-2.0]), "strictly positive"),
])
def test_likelihood_sum_bad_scale_is_a_clear_error(scale, match):
    x, params = torch.rand(3, 4), torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match=match):
        ops.likelihood_sum(x, params, family="laplace", scale=scale)


@pytest.mark.parametrize("family, dx, s", [("normal", 0.3, 1e-20), ("normal", 10.0, 2e-38), ("laplace", 10.0, 2e-38)])
def test_likelihood_sum_overflowed_density_has_zero_gradient(backend, family, dx, s):
    """docs/design.md section 2: where (x - params) / scale overflows the density (0.5 u^2 for the
    Normal, |u| for the Laplace) the log-likelihood is -inf with zero gradients, as every -inf log
    density, whatever the cotangent; the row's other element keeps its own (u = 0: d/dscale = -1/s)."""
    x = torch.tensor([[dx, 0.0]])  # B = 1, E = 2
    params = torch.zeros(1, 1, 2, requires_grad=True)
    scale = torch.tensor([s, s], requires_grad=True)
    out = ops.likelihood_sum(x, params, family=family, scale=scale, backend=backend)
    assert out.item() == -math.inf
    gp, gs = torch.autograd.grad(out.sum(), (params, scale))
    assert (gp == 0).all(), gp
    torch.testing.assert_close(gs, torch.tensor([0.0, -1 / s]))


@pytest.mark.parametrize("bad", [-1, 4])
def test_likelihood_sum_class_index_out_of_range_is_a_clear_error(backend, bad, monkeypatch):
    monkeypatch.setenv("MMVAE_FAST_SYNC_CHECKS", "1")  # on a GPU the check is otherwise asynchronous
    logits = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=rf"argument 'x' holds class index {bad}, outside the vocabulary \[0, 4\)"):
        ops.likelihood_sum(torch.tensor([0, bad, 1]), logits, family="categorical", backend=backend)


def test_likelihood_sum_bernoulli_nan_target_gives_nan(backend):
    """NaN in, NaN out: a NaN target gave log-likelihood 0 (both of its terms were dropped as
    zero-weight terms, since NaN < 1 and NaN > 0 are false)."""
    x = torch.tensor([[0.3, math.nan]])
    params = torch.zeros(1, 1, 2, requires_grad=True)
    out = ops.likelihood_sum(x, params, family="bernoulli", backend=backend)
    assert out.isnan().all(), out
    (g,) = torch.autograd.grad(out.sum(), params)
    assert g[0, 0, 1].isnan() and torch.isfinite(g[0, 0, 0])


@pytest.mark.parametrize("bad", [2.0, -0.5, math.inf])
def test_likelihood_sum_bernoulli_target_outside_the_unit_interval_is_an_error(backend, bad):
    with pytest.raises(ValueError, match=r"argument 'x' must hold Bernoulli targets in \[0, 1\]"):
        ops.likelihood_sum(torch.tensor([[0.5, bad]]), torch.zeros(1, 1, 2), family="bernoulli", backend=backend)


@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_likelihood_sum_scale_for_a_logit_family_is_an_error(backend, family):
    x = torch.tensor([[1, 0]]) if family == "categorical" else torch.tensor([[1.0, 0.0]])
    params = torch.zeros(1, 1, 2, 3) if family == "categorical" else torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="argument 'scale' applies to 'normal' and 'laplace' only"):
        ops.likelihood_sum(x, params, family=family, scale=2.0, backend=backend)
