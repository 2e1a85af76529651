"""importance_weights on every backend: the grid against a direct computation (every
backend that runs here, Triton under its interpreter in the `-m triton` process), then what
only one backend needs (the C++ kernels' gradcheck, opcheck and float32 accuracy; the Triton
kernels against the reference across their blocks)."""
import math

import pytest
import torch
from helpers import NAMESPACES, library, opcheck, T, assert_grads, check_close, cpu_test, gen, grads, rand, rnd, triton_test

from mmvae_fast import ops
from mmvae_fast import reference as ref

import numerics

# ------------------------------------------------------------------ every backend


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("offset", numerics.LW_OFFSETS)
def test_importance_weights_backward_large_offsets_grid(backend, offset, layout):
    numerics.check_weights_at_offset(backend, offset, layout)


def test_importance_weights_second_order(backend):
    numerics.check_second_order("importance_weights", backend)


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


@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_importance_weights_pos_inf_gives_an_inf_bound(backend, layout):
    """A +inf log weight: the bound is +inf, and the weight and the gradient at it NaN (the softmax
    is undefined there, and says so; docs/design.md section 2, as moe_estimator); with a NaN in the
    slice too, NaN. The other slices are untouched. 300 samples: the +inf of slice 0 is in the CPU
    row kernel's second chunk."""
    g = torch.Generator().manual_seed(4)
    lw = rand(3, 300, gen=g, scale=3.0)
    lw[0, 280] = math.inf
    lw[1, 10], lw[1, 20] = math.inf, math.nan
    x = (lw if layout == "rows" else lw.t().contiguous()).requires_grad_()
    dim = 1 if layout == "rows" else 0
    bound, w, _ = ops.importance_weights(x, dim, backend=backend)
    (gx,) = torch.autograd.grad(bound.sum(), x)
    w, gx = (w, gx) if layout == "rows" else (w.t(), gx.t())
    assert bound[0] == math.inf and torch.isnan(bound[1]), bound
    assert torch.isnan(w[0, 280]) and torch.isnan(gx[0, 280])
    check_close((bound[2], w[2], gx[2]), (direct_iw(lw[2:], (1,))[0][0], direct_iw(lw[2:], (1,))[1][0], w[2]))


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


# ------------------------------------------------------------------ cpu


@cpu_test
@pytest.mark.parametrize(
    "shape,dim", [((5, 7), 1), ((3, 4, 2), (0, 1)), ((2, 3, 4), 1), ((300,), 0), ((3, 5, 21), (0, 1)), ((2, 3, 4, 5), (1, 3))]
)
def test_cpu_importance_weights_gradcheck(shape, dim):
    lw = torch.randn(shape, generator=gen(0), dtype=torch.float64).mul(2).requires_grad_()
    for i in range(3):  # each output alone, then all of them together
        torch.autograd.gradcheck(lambda t: ops.importance_weights(t, dim, backend="cpu")[i], (lw,))
    torch.autograd.gradcheck(lambda t: tuple(ops.importance_weights(t, dim, backend="cpu")), (lw,))


@cpu_test
def test_cpu_importance_weights_any_subset_of_gradients_matches_reference():
    g = gen(1)
    lw = torch.randn(4, 9, generator=g, dtype=torch.float64).requires_grad_()
    cots = [torch.randn(4, generator=g, dtype=torch.float64)] + [torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(2)]
    out = ops.importance_weights(lw, 1, backend="cpu")
    ref = ops.importance_weights(lw, 1, backend="reference")
    for subset in ([0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]):
        (a,) = torch.autograd.grad([out[i] for i in subset], lw, [cots[i] for i in subset], retain_graph=True)
        (b,) = torch.autograd.grad([ref[i] for i in subset], lw, [cots[i] for i in subset], retain_graph=True)
        torch.testing.assert_close(a, b, msg=lambda m: f"outputs {subset}: {m}")


@cpu_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_importance_weights_low_precision_column_tiles(dtype):
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


@NAMESPACES
def test_opcheck_importance_weights(ns):
    lib = library(ns, "importance_weights")
    g = gen(4)
    for shape in ((4, 7, 1), (2, 7, 19)):  # rows, and column tiles (one full, one partial)
        lw = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        opcheck(lib.importance_weights.default, (lw,))
        lse = torch.logsumexp(lw.detach(), 1)
        gb, gw = torch.randn(lse.shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
        opcheck(lib.importance_weights_backward.default, (lw.detach(), lse, torch.zeros_like(lse), gb, None, gw))
    lw32 = torch.randn(3, 5, 2, generator=g).requires_grad_()
    opcheck(lib.importance_weights.default, (lw32,))


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


@cpu_test
def test_cpu_importance_weights_large_rows_float32():
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


@cpu_test
def test_cpu_fast_exp_over_its_whole_range():
    """exp(x - lse) for x from the max down to underflow: accurate where the result is a normal
    float, exact 0 for -inf; results below the smallest normal float are flushed to 0."""
    x = torch.cat([torch.zeros(1), torch.linspace(-87.0, 0.0, 4001), torch.linspace(-120.0, -87.0, 100), torch.tensor([-math.inf])])
    w = ops.importance_weights(x[None], 1, backend="cpu").wbar[0]
    ref = torch.softmax(x.double(), 0)
    assert_weights_accurate(w, x, ref)
    lse = torch.logsumexp(x.double(), 0)
    assert w[-1] == 0 and (w[x < -104] == 0).all() and (w[x - lse > -87] > 0).all()


# ------------------------------------------------------------------ triton
# interpreter blocks: BLOCK_R = 4 rows, BLOCK_N = 16 columns


@triton_test
@pytest.mark.parametrize("shape,dims", [((5, 37), (1,)), ((37, 5), (0,)), ((3, 4, 9), (0, 2)), ((1, 1), (1,)), ((6,), (0,))])
def test_triton_weights_values_and_grads(shape, dims):
    g = torch.Generator().manual_seed(len(shape))
    lw = rnd(*shape, gen=g, scale=3.0).requires_grad_()
    assert_grads(ops.importance_weights(lw, dims, **T), ref.importance_weights(lw, dims), lw, g)


@triton_test
def test_triton_weights_neg_inf_rows_nan_and_large_magnitudes():
    g = torch.Generator().manual_seed(1)
    lw = rnd(6, 21, gen=g, scale=2.0)
    lw[1] = -math.inf  # all -inf: bound -inf, weights 0, zero gradient
    lw[2, ::3] = -math.inf  # some -inf: weight 0 there
    lw[4] += 1e4
    lw[5] -= 1e4
    lw.requires_grad_()
    bound, w, w2 = ops.importance_weights(lw, 1, **T)
    assert bound[1] == -math.inf and (w[1] == 0).all() and (w[2, ::3] == 0).all()
    finite = [0, 2, 3, 4, 5]
    rb, rw, rw2 = ref.importance_weights(lw, 1)
    assert_grads((bound[finite], w, w2), (rb[finite], rw, rw2), lw, g)
    (gl,) = torch.autograd.grad(bound.sum() + w.sum(), lw)
    assert not torch.isnan(gl).any() and (gl[1] == 0).all()
    nan = lw.detach().clone()
    nan[3, 7] = math.nan
    b, w, _ = ops.importance_weights(nan, 1, **T)
    assert torch.isnan(b[3]) and torch.isnan(w[3]).all() and torch.isfinite(b[[0, 2, 4, 5]]).all()


@triton_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_weights_half_inputs_accumulate_in_float32(dtype):
    g = torch.Generator().manual_seed(2)
    lw = rnd(3, 50, gen=g, dtype=dtype, scale=2.0).requires_grad_()
    out = ops.importance_weights(lw, 1, **T)
    assert all(o.dtype == torch.float32 for o in out)
    assert_grads(out, ref.importance_weights(lw, 1), lw, g, rtol=1e-5, atol=1e-5)


@triton_test
def test_triton_weights_gradcheck_float64():
    lw = rnd(3, 18, gen=torch.Generator().manual_seed(3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.importance_weights(x, 1, **T), (lw,), fast_mode=True)
