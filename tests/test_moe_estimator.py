"""moe_estimator: the MoE bound and every gradient estimator in one op, on every backend.

Oracles: (1) the tensor-level estimators of `objectives` (iwae by autograd, `dreg_estimator`,
`mixture_dreg_estimator`), built from the other ops, for every estimator, both bounds, M = 1..5;
(2) the reference face of the op, for every backend, values and gradients in float64, masks and
-inf rows included; (3) with a mask, the op on the present experts alone, item by item.

The Triton backend runs under the interpreter in the `pytest -m triton` process, on a smaller grid
(the interpreter is slow): M = 1, 2 both families and M = 5 Laplace, both bounds, every estimator;
masks, NaN in absent experts, -inf rows and given normalisers against the reference face.
"""
import itertools
import math

import pytest
import torch

from helpers import HAVE_TRITON, library, opcheck, triton_test

from mmvae_fast import ops
from mmvae_fast import objectives as O
from mmvae_fast.ops import _dispatch

ESTIMATORS = ops.moe_estimator.__globals__["ESTIMATORS"]
BOUNDS = ("looser", "stratified")
CPU_BACKENDS = [b for b in ("reference", "cpu") if _dispatch.available("moe_estimator", b, "cpu")]
# (device, backend) for conftest's `backend` fixture: Triton on CPU tensors is its interpreter; where
# a CUDA device is present, CUDA tensors on every CUDA backend (the whole grid: no interpreter there)
TRITON = pytest.param(("cpu", "triton"), id="triton", marks=[
    pytest.mark.triton, pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton)")])
CUDA_BACKENDS = ops.available_backends("cuda", op="moe_estimator") if torch.cuda.is_available() else []
DEVICE_BACKENDS = [pytest.param(("cpu", b), id=b) for b in CPU_BACKENDS] + [
    pytest.param(("cuda", b), id=f"cuda-{b}") for b in CUDA_BACKENDS]
BACKENDS = DEVICE_BACKENDS + [TRITON]
ALL = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def grid(names, *values, triton=(), fused=False):
    """pytest params: backend x the product of values on the CPU backends; on Triton (the
    interpreter is slow) only the tuples of values in `triton`. fused: the kernels only (a check
    against the float64 reference that its plain-PyTorch float32 self does not pass)."""
    out = []
    for b in BACKENDS:
        if fused and b.values[0][1] == "reference":
            continue
        for case in itertools.product(*values) if b is not TRITON else triton:
            out.append(pytest.param(b.values[0], *case, marks=b.marks, id="-".join(map(str, (b.id, *case)))))
    return pytest.mark.parametrize("backend," + names, out, indirect=["backend"])


# Triton: every estimator and both bounds at M = 2, and M = 1 and 5 on a few
TRITON_GRID = [(e, bd, 2, "laplace") for e in ESTIMATORS for bd in BOUNDS] + [
    ("iwae", "looser", 1, "normal"), ("mixture", "stratified", 1, "normal"), ("mixture", "looser", 2, "normal"),
    ("eq8", "stratified", 2, "normal"), ("mixture", "looser", 5, "laplace"), ("mixture-centred", "stratified", 5, "laplace"),
]
TRITON_PAIRS = [("iwae", "looser"), ("mixture", "stratified"), ("mixture-centred", "looser"), ("eq8", "stratified")]


class Problem:
    """A small MoE model with every kind of parameter: experts (loc, scale), prior, decoder."""

    def __init__(self, M=2, K=3, B=4, L=5, family="laplace", seed=0, dtype=torch.float64, prior_shape=None):
        # drawn on the CPU (seeded), then moved to the test's device: every device sees the same inputs
        g, dev = torch.Generator().manual_seed(seed), torch.get_default_device()
        r = lambda *s: torch.randn(*s, generator=g, dtype=dtype, device="cpu").to(dev)  # noqa: E731
        self.M, self.K, self.B, self.L, self.family = M, K, B, L, family
        self.loc = (0.7 * r(M, B, L)).requires_grad_()
        self.log_scale = (0.3 * r(M, B, L)).requires_grad_()
        ps = prior_shape or (1, L)
        self.prior_loc = (0.2 * r(*ps)).requires_grad_()
        self.prior_log_scale = (0.2 * r(*ps)).requires_grad_()
        self.W = (0.5 * r(L, 3)).requires_grad_()
        self.x = r(B, 3)
        if family == "laplace":
            u = torch.rand(M, K, B, L, generator=g, dtype=dtype, device="cpu").to(dev) - 0.5
            self.eps = -torch.sign(u) * torch.log1p(-2 * u.abs())
        else:
            self.eps = r(M, K, B, L)

    def params(self):
        return [self.loc, self.log_scale, self.prior_loc, self.prior_log_scale, self.W]

    def sample(self):
        scale = self.log_scale.exp()
        zs = [self.loc[m] + scale[m] * self.eps[m] for m in range(self.M)]  # as a model samples them
        return zs, scale

    def lpx(self, z):  # a "decoder": reaches z and its own parameter W
        return -((z @ self.W - self.x) ** 2).sum(-1)


def grads(loss, p):
    return torch.autograd.grad(loss, p.params(), allow_unused=True)


def _estimate(p, bound, estimator, backend, mask):
    """The op on p's samples, its z path hooked on them."""
    zs, scale = p.sample()
    z = torch.stack(zs)
    est = ops.moe_estimator(
        z, p.loc, scale, p.prior_loc, p.prior_log_scale.exp(), p.lpx(z), family=p.family, bound=bound,
        estimator=estimator, mask=mask, backend=backend,
    )
    ops.apply_z_weight(zs, est.z_weight)
    return est


def fused(p, bound, estimator, backend, mask=None):
    est = _estimate(p, bound, estimator, backend, mask)
    return est, grads(est.bound.sum(), p)


def tensor_level(p, bound, estimator):
    """The same estimator from the tensor-level API (objectives.py, on the reference ops)."""
    zs, scale = p.sample()
    z = torch.stack(zs)
    log_joint = ops.log_density_sum(z, p.prior_loc, p.prior_log_scale.exp(), p.family) + p.lpx(z)
    dims = 1 if bound == "looser" else (0, 1)
    kw = dict(family=p.family, backend="reference")
    if estimator == "iwae":
        lw = log_joint - ops.mixture_log_density(z, p.loc, scale, **kw)
        est = O.iwae_bound(lw, dims, backend="reference")
    elif estimator in ("eq8", "released"):
        lw = log_joint - ops.mixture_log_density(z, p.loc.detach(), scale.detach(), **kw)
        est = O.dreg_estimator(lw, zs, dims, z_weight="one" if estimator == "released" else "wbar", backend="reference")
    else:
        est = O.mixture_dreg_estimator(log_joint, zs, p.loc, scale, dims, centred=estimator == "mixture-centred", **kw)
    value = est.mean(0) if bound == "looser" else est
    return value, grads(value.sum(), p)


def assert_grads_close(got, want, rtol=1e-9, atol=1e-11):
    for g, w, name in zip(got, want, ("loc", "log_scale", "prior_loc", "prior_log_scale", "W")):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        assert g is not None, f"no gradient for {name}"
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@grid("estimator,bound,M,family", ESTIMATORS, BOUNDS, (1, 2, 3, 5), ("laplace", "normal"), triton=TRITON_GRID)
def test_equals_the_tensor_level_estimators(backend, estimator, bound, M, family):
    small = dict(K=3, B=3) if backend == "triton" and M < 5 else dict(K=2, B=2) if backend == "triton" else {}
    p = Problem(M=M, family=family, seed=M, **small)
    est, got = fused(p, bound, estimator, backend)
    value, want = tensor_level(p, bound, estimator)
    torch.testing.assert_close(est.bound, value.detach(), rtol=1e-10, atol=1e-10)
    assert_grads_close(got, want)


@grid("estimator,bound", ESTIMATORS, BOUNDS, triton=[("mixture", "looser"), ("iwae", "stratified")])
def test_the_samples_as_a_list_equal_the_stacked_tensor(backend, estimator, bound):
    """z as the model makes it, M tensors [K, B, L] (what the objectives pass: the C++ kernels read
    them in place), gives the values and gradients of z stacked into [M, K, B, L]."""
    p = Problem(M=3, seed=5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)[:, :p.B]
    out = []
    for as_list in (False, True):
        zs, scale = p.sample()
        z = torch.stack(zs)
        est = ops.moe_estimator(
            list(zs) if as_list else z, p.loc, scale, p.prior_loc, p.prior_log_scale.exp(), p.lpx(z),
            family=p.family, bound=bound, estimator=estimator, mask=mask, backend=backend,
        )
        ops.apply_z_weight(zs, est.z_weight)
        out.append((est.bound, est.lw, grads(est.bound.sum(), p)))
    (b0, lw0, g0), (b1, lw1, g1) = out
    torch.testing.assert_close(b1, b0, rtol=0, atol=0)
    torch.testing.assert_close(lw1, lw0, rtol=0, atol=0)
    assert_grads_close(g1, g0, rtol=1e-12, atol=1e-14)


def test_samples_of_different_shapes_are_refused():
    p = Problem(M=2, seed=1)
    zs, scale = p.sample()
    args = (p.loc, scale, p.prior_loc, p.prior_log_scale.exp(), p.lpx(torch.stack(zs)))
    with pytest.raises(ValueError, match="one non-empty shape"):
        ops.moe_estimator([zs[0], zs[1][:1]], *args, family=p.family)
    with pytest.raises(TypeError, match="argument 'z'"):
        ops.moe_estimator([], *args, family=p.family)
    with pytest.raises(ValueError, match=r"argument 'loc' must have shape \(1, "):  # M from the list's length
        ops.moe_estimator([zs[0]], *args, family=p.family)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS, indirect=True)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bound", BOUNDS)
def test_mask_equals_the_present_experts_alone(backend, estimator, bound):
    """Item by item: the masked op equals the op on the present experts only (no mask); an item
    with one modality gets that expert's single-modality bound on the same samples."""
    M, B = 3, 5
    p = Problem(M=M, B=B, K=4, seed=7)
    mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    est, got = fused(p, bound, estimator, backend, mask=mask)
    for b in range(B):
        S = torch.nonzero(mask[:, b]).flatten()
        q = Problem(M=len(S), B=1, K=4, seed=7)
        with torch.no_grad():
            q.loc.copy_(p.loc[S, b : b + 1])
            q.log_scale.copy_(p.log_scale[S, b : b + 1])
            q.prior_loc.copy_(p.prior_loc)
            q.prior_log_scale.copy_(p.prior_log_scale)
            q.W.copy_(p.W)
        q.x, q.eps = p.x[b : b + 1], p.eps[S][:, :, b : b + 1]
        # the item's share of the full gradient: the op on item b alone (other items' bound not summed)
        est_b, g_b = fused_item(p, bound, estimator, backend, mask, b)
        sub, g_sub = fused(q, bound, estimator, backend)
        torch.testing.assert_close(est.bound[b], sub.bound[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g_b[0][S, b : b + 1], g_sub[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g_b[1][S, b : b + 1], g_sub[1], rtol=1e-9, atol=1e-11)
        absent = ~mask[:, b]
        assert torch.count_nonzero(g_b[0][absent]) == 0 and torch.count_nonzero(g_b[1][absent]) == 0
        for i in (2, 3, 4):  # prior and decoder
            torch.testing.assert_close(g_b[i], g_sub[i], rtol=1e-9, atol=1e-11)
    assert torch.isfinite(est.bound).all() and all(torch.isfinite(g).all() for g in got if g is not None)


def fused_item(p, bound, estimator, backend, mask, b):
    est = _estimate(p, bound, estimator, backend, mask)
    g = torch.autograd.grad(est.bound[b], p.params(), allow_unused=True)
    return est, [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, p.params())]


@grid("estimator", ESTIMATORS, triton=[("iwae",), ("mixture",)])
def test_nan_in_an_absent_expert_reaches_nothing(backend, estimator):
    """NaN in an absent expert's parameters, samples and log-likelihoods: finite bound, and the
    op's gradients are finite everywhere and zero for the absent entries."""
    p = Problem(M=3, B=2, seed=3)
    mask = torch.tensor([[1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    zs, scale = p.sample()
    z, loc, scale = (t.detach().clone() for t in (torch.stack(zs), p.loc, scale))
    lpx = p.lpx(z).detach()
    z[1, :, 0], loc[1, 0], scale[1, 0], lpx[1, :, 0] = math.nan, math.nan, math.nan, math.nan
    leaves = [t.requires_grad_() for t in (z, loc, scale, lpx)]
    est = ops.moe_estimator(z, loc, scale, p.prior_loc.detach(), p.prior_log_scale.exp().detach(), lpx,
                            family=p.family, bound="looser", estimator=estimator, mask=mask, backend=backend)
    assert torch.isfinite(est.bound).all()
    for g, t in zip(torch.autograd.grad(est.bound.sum(), leaves, allow_unused=True), ("z", "loc", "scale", "lpx")):
        if g is None:  # no gradient at all (eq8 and released: loc and scale only through z)
            continue
        assert torch.isfinite(g).all(), t
        assert torch.count_nonzero(g[1, 0] if t in ("loc", "scale") else g[1, :, 0]) == 0, t


@ALL
@pytest.mark.parametrize("bound", BOUNDS)
def test_minus_inf_log_likelihoods_are_zero_weights(backend, bound):
    """A sample with lpx = -inf has weight 0 (not NaN); a whole group of them gives a -inf bound
    (looser) and zero gradients from that group."""
    p = Problem(M=2, K=3, B=2, seed=5)
    zs, scale = p.sample()
    z = torch.stack(zs)
    lpx = p.lpx(z)
    minf = torch.zeros_like(lpx, dtype=torch.bool)
    minf[0, 1, 0] = True
    lpx = torch.where(minf, -math.inf, lpx)
    est = ops.moe_estimator(z, p.loc, scale, p.prior_loc, p.prior_log_scale.exp(), lpx, family=p.family,
                            bound=bound, estimator="mixture", backend=backend)
    ops.apply_z_weight(zs, est.z_weight)
    g = grads(est.bound.sum(), p)
    assert torch.isfinite(est.bound).all()
    assert all(torch.isfinite(t).all() for t in g if t is not None)
    assert est.lw[0, 1, 0] == -math.inf
    # all of group 0 of item 1 at -inf
    lpx2 = lpx.detach().clone()
    lpx2[0, :, 1] = -math.inf
    est2 = ops.moe_estimator(z.detach(), p.loc.detach(), scale.detach(), p.prior_loc, p.prior_log_scale.exp(),
                             lpx2, family=p.family, bound=bound, estimator="iwae", backend=backend)
    if bound == "looser":
        assert est2.bound[1] == -math.inf
    else:
        assert torch.isfinite(est2.bound[1])


@grid("estimator,bound", ESTIMATORS, BOUNDS, triton=[("iwae", "looser"), ("mixture-centred", "stratified")])
def test_given_normalisers_give_the_full_gradient_chunk_by_chunk(backend, estimator, bound):
    """The chunked path: with the normalisers of all K samples, the gradients of the chunks add up
    to the gradient of the whole (and the value is the whole's bound)."""
    p = Problem(M=3, K=6, B=3, seed=11)
    est, want = fused(p, bound, estimator, backend)
    lse = ops.slice_stats(est.lw, bound)
    total = None
    for sl in (slice(0, 4), slice(4, 6)):
        zs, scale = p.sample()
        zs = [z[sl] for z in zs]
        z = torch.stack(zs)
        e = ops.moe_estimator(z, p.loc, scale, p.prior_loc, p.prior_log_scale.exp(), p.lpx(z), family=p.family,
                              bound=bound, estimator=estimator, lse=lse, num_samples=6, backend=backend)
        torch.testing.assert_close(e.bound, est.bound, rtol=1e-10, atol=1e-10)
        ops.apply_z_weight(zs, e.z_weight)
        g = grads(e.bound.sum(), p)
        total = g if total is None else [a + b for a, b in zip(total, g)]
    assert_grads_close(total, want)


def test_prior_of_batch_shape_and_errors():
    p = Problem(M=2, B=4, prior_shape=(4, 5), seed=2)
    est, got = fused(p, "looser", "iwae", "reference")
    assert got[2].shape == (4, 5)
    zs, scale = p.sample()
    z = torch.stack(zs)
    args = (z, p.loc, scale, p.prior_loc, p.prior_log_scale.exp(), p.lpx(z))
    with pytest.raises(ValueError, match="estimator"):
        ops.moe_estimator(*args, estimator="dreg")
    with pytest.raises(ValueError, match="bound"):
        ops.moe_estimator(*args, bound="tight")
    with pytest.raises(ValueError, match="lpx"):
        ops.moe_estimator(*args[:5], p.lpx(z)[:, :2])
    with pytest.raises(ValueError, match="mask"):
        ops.moe_estimator(*args, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="prior_loc"):
        ops.moe_estimator(*args[:3], torch.zeros(3, 5), *args[4:])


def _op_args(mask=False, estimator="mixture", dtype=torch.float32):
    p = Problem(M=3, K=4, B=5, L=6, dtype=dtype, seed=13)
    zs, scale = p.sample()
    z = [t.detach().clone().requires_grad_() for t in zs]  # the backends take the experts' samples as a list
    leaves = [t.detach().clone().requires_grad_() for t in (p.loc, scale)]
    prior = [t.detach().expand(5, 6).contiguous().requires_grad_() for t in (p.prior_loc, p.prior_log_scale.exp())]
    lpx = p.lpx(torch.stack(z)).detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    m = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.bool) if mask else None
    return (z, *leaves, *prior, lpx, "laplace", "normal", "looser", estimator, m, None, None)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("mask", [False, True])
def test_opcheck_cpu(estimator, mask):
    torch.library.opcheck(torch.ops.mmvae_fast.moe_estimator.default, _op_args(mask, estimator))


@triton_test
@pytest.mark.parametrize("estimator", ["iwae", "mixture-centred"])
def test_opcheck_triton(estimator):
    """The Triton op's schema and autograd registration (its fake-tensor tests need a GPU: tests/test_gpu.py)."""
    opcheck(library("mmvae_fast_triton", "moe_estimator").moe_estimator.default, _op_args(True, estimator))


def _backward_args(lib, estimator, bound, mask):
    """moe_estimator_backward's arguments: the forward's saved tensors and an incoming gradient."""
    a = _op_args(mask, estimator)
    z = [t.detach() for t in a[0]]
    loc, scale, ploc, pscale, lpx = (t.detach() for t in a[1:6])
    _b, lw, _zw, lq, stats = lib.moe_estimator(z, loc, scale, ploc, pscale, lpx, "laplace", "normal", bound,
                                               estimator, a[10], None, None)
    g = torch.randn(z[0].shape[1], generator=torch.Generator().manual_seed(3), dtype=lw.dtype)
    return (g, z, loc, scale, ploc, pscale, a[10], lw, lq, stats, "laplace", "normal", bound, estimator, None)


BACKWARD_CASES = [("mixture", "looser", True), ("mixture-centred", "stratified", False), ("eq8", "looser", False),
                  ("iwae", "stratified", True)]


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("estimator,bound,mask", BACKWARD_CASES)
def test_opcheck_backward_cpu(estimator, bound, mask):
    lib = torch.ops.mmvae_fast
    torch.library.opcheck(lib.moe_estimator_backward.default, _backward_args(lib, estimator, bound, mask))


@triton_test
@pytest.mark.parametrize("estimator,bound,mask", BACKWARD_CASES[:2])
def test_opcheck_backward_triton(estimator, bound, mask):
    lib = library("mmvae_fast_triton", "moe_estimator")
    opcheck(lib.moe_estimator_backward.default, _backward_args(lib, estimator, bound, mask))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_compiles_fullgraph_with_the_eager_gradients():
    args = _op_args(True, "mixture-centred", torch.float64)
    M = len(args[0])
    leaves = [*args[0], *args[1:6]]

    def f(*ts):  # the samples as a list, as the objectives pass them
        return ops.moe_estimator(list(ts[:M]), *ts[M:], family="laplace", prior_family="normal",
                                 estimator="mixture-centred", mask=args[10], backend="cpu").bound.sum()

    want = torch.autograd.grad(f(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_second_order_gradients_raise_on_the_fused_backend():
    args = _op_args(False, "mixture", torch.float64)
    z = args[0]
    est = ops.moe_estimator(*args[:6], family="laplace", prior_family="normal", backend="cpu")
    gz = torch.autograd.grad(est.bound.sum(), z, create_graph=True)
    with pytest.raises(ops.DoubleBackwardError, match="moe_estimator"):
        torch.autograd.grad(sum((g**2).sum() for g in gz), z)


def test_reference_stratified_item_without_experts_has_bound_zero():  # as the CPU kernel and the docstring
    p = Problem(M=2, K=3, B=2, L=4)
    zs, scale = p.sample()
    z = torch.stack(zs)
    mask = torch.tensor([[True, False], [True, False]])
    est = ops.moe_estimator(z, p.loc, scale, p.prior_loc, p.prior_log_scale.exp(), p.lpx(z), family=p.family,
                            bound="stratified", estimator="mixture", mask=mask, backend="reference")
    assert est.bound[1] == 0


@grid("estimator,bound", ESTIMATORS, BOUNDS, triton=TRITON_PAIRS)
def test_masked_equals_the_reference_face(backend, estimator, bound):
    """With a mask (items with two experts out of three, one with one; tiles of items cut mid-batch
    under the interpreter): value, lw, z_weight and every gradient equal the reference face's."""
    p = Problem(M=3, K=3, B=3, seed=13)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    est, got = fused(p, bound, estimator, backend, mask=mask)
    ref, want = fused(p, bound, estimator, "reference", mask=mask)
    torch.testing.assert_close(est.bound, ref.bound, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(est.lw, ref.lw, rtol=1e-10, atol=1e-10)
    assert (est.z_weight is None) == (ref.z_weight is None)
    if ref.z_weight is not None:
        torch.testing.assert_close(est.z_weight, ref.z_weight, rtol=1e-10, atol=1e-10)
    assert_grads_close(got, want)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("B,K,L", [(1, 70, 4), (37, 5, 5), (70, 3, 3)])
def test_cpu_item_blocks_equal_the_reference_face(threads, B, K, L):
    """The CPU kernel walks blocks of adjacent items: one item with tiles of 32 samples cut at K, a
    last block shorter than the others, blocks wider than a tile of pairs; every thread count gives
    the reference face's values and gradients (masked, both bounds), and the same numbers."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for bound, estimator in (("looser", "mixture"), ("stratified", "mixture-centred"), ("looser", "iwae")):
            p = Problem(M=3, K=K, B=B, L=L, seed=B + K)
            mask = torch.rand(3, B, generator=torch.Generator().manual_seed(B)) < 0.7
            mask[0, 0] = True
            est, got = fused(p, bound, estimator, "cpu", mask=mask)
            ref, want = fused(p, bound, estimator, "reference", mask=mask)
            torch.testing.assert_close(est.bound, ref.bound, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(est.lw, ref.lw, rtol=1e-10, atol=1e-10)
            if ref.z_weight is not None:
                torch.testing.assert_close(est.z_weight, ref.z_weight, rtol=1e-10, atol=1e-10)
            assert_grads_close(got, want)
    finally:
        torch.set_num_threads(before)


def _no_expert_grid():
    for b in BACKENDS:
        for bound in BOUNDS:
            yield pytest.param(b.values[0], bound, marks=list(b.marks), id=f"{b.id}-{bound}")


@pytest.mark.parametrize("backend,bound", list(_no_expert_grid()), indirect=["backend"])
def test_an_item_with_no_expert_has_bound_zero(backend, bound):
    """An item whose experts are all absent: bound 0, lw -inf, z_weight 0, no gradient from it."""
    p = Problem(M=2, K=2, B=2, seed=17)
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    est, _ = fused(p, bound, "mixture", backend, mask=mask)
    assert est.bound[1] == 0 and torch.isfinite(est.bound[0])
    assert (est.lw[:, :, 1] == -math.inf).all() and (est.z_weight[:, :, 1] == 0).all()
    g = fused_item(p, bound, "mixture", backend, mask, 1)[1]
    assert all(torch.count_nonzero(t) == 0 for t in g)


# ---- numerics at any |lw|, collapsed experts, infinite and NaN log-likelihoods (every backend)


def _lw_offset_case(offset, K=10, dtype=torch.float32):
    """M = 2 identical experts and lpx = offset: every weight is 1 / K (looser) whatever the offset."""
    z = torch.zeros(2, K, 1, 1, dtype=dtype)
    loc, scale = torch.zeros(2, 1, 1, dtype=dtype), torch.ones(2, 1, 1, dtype=dtype)
    lpx = torch.full((2, K, 1), offset, dtype=dtype).requires_grad_()
    return z, loc, scale, lpx


@grid("offset", (-5e3, -1e5, -1e7, -1e20, 1e7, -3e38), triton=[(-1e7,), (-3e38,)])
def test_weights_are_exact_at_any_log_weight_offset(backend, offset):
    """d bound / d lpx = wbar / M = 1 / (M K) for equal log weights at any offset (a weight computed
    from one rounded float32 log-normaliser gave 0.0677 instead of 0.05 at -1e7)."""
    z, loc, scale, lpx = _lw_offset_case(offset)
    est = ops.moe_estimator(z, loc, scale, loc[0], scale[0], lpx, family="normal", estimator="iwae", backend=backend)
    (g,) = torch.autograd.grad(est.bound.sum(), lpx)
    torch.testing.assert_close(g, torch.full_like(g, 1 / 20), rtol=1e-5, atol=0)


@grid("estimator,u", ("iwae", "mixture"), (1e2, 1e4), triton=[("mixture", 1e4)], fused=True)
def test_responsibilities_are_exact_at_any_log_density(backend, estimator, u):
    """Two identical experts with samples u scales away: log q ~ -u^2 / 2 (-5e7 at u = 1e4), and each
    expert's responsibility is 1/2. From a float32 log-sum-exp (the saved lq, or one recomputed:
    rounded to a multiple of 4 there) they came out 1 each: the backward doubled d lq / dz (CPU until
    932289f, CUDA and Triton until this test) and the forward's z_weight used pi_own = 1. The kernels
    take pi = exp(a - max) / sum exp(a - max) from the row's log-densities. Float32 gradients and
    z_weight against the float64 reference face."""
    K, B, s = 3, 2, 1e-3
    loc = torch.zeros(2, B, 1, dtype=torch.float64)
    scale = torch.full((2, B, 1), s, dtype=torch.float64)
    z = (u * s * (1 + 0.1 * torch.arange(2 * K * B, dtype=torch.float64))).reshape(2, K, B, 1)
    lpx = torch.zeros(2, K, B, dtype=torch.float64)
    pl, ps = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)

    def run(dtype, backend):
        args = [t.to(dtype).requires_grad_() for t in (z, loc, scale, pl, ps, lpx)]
        est = ops.moe_estimator(*args, family="normal", estimator=estimator, backend=backend)
        zw = () if est.z_weight is None else (est.z_weight.detach(),)
        return torch.autograd.grad(est.bound.sum(), args) + zw

    for got, want in zip(run(torch.float32, backend), run(torch.float64, "reference"), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@grid("offset,bound", (-1e7, -1e20), BOUNDS, triton=[(-1e7, "looser")])
def test_given_normalisers_are_exact_at_any_offset(backend, offset, bound):
    """The chunked path: the slices' (max, log-sum) of the full lw, given to a chunk, keep its
    weights exact (one float32 log-normaliser did not: 0.0677 instead of 0.05 at -1e7)."""
    z, loc, scale, lpx = _lw_offset_case(offset)
    kw = dict(family="normal", estimator="iwae", bound=bound, backend=backend)
    full = ops.moe_estimator(z, loc, scale, loc[0], scale[0], lpx, **kw)
    stats = ops.slice_stats(full.lw, bound)
    half = ops.moe_estimator(z[:, :5], loc, scale, loc[0], scale[0], lpx[:, :5], lse=stats, num_samples=10, **kw)
    (g,) = torch.autograd.grad(half.bound.sum(), lpx)
    torch.testing.assert_close(g[:, :5], torch.full_like(g[:, :5], 1 / 20), rtol=1e-5, atol=0)
    torch.testing.assert_close(half.bound, full.bound.detach())


@grid("estimator,family", ESTIMATORS, ("normal", "laplace"), triton=[("iwae", "normal"), ("mixture", "laplace")])
def test_a_collapsed_expert_gives_finite_gradients(backend, estimator, family):
    """An expert of scale 1e-20 has log-density -inf at the other expert's sample, and there an
    infinite derivative: its zero responsibility must contribute 0, not 0 * inf = NaN."""
    z = torch.tensor([0.3, 1.0]).reshape(2, 1, 1, 1).requires_grad_()
    loc = torch.tensor([0.0, 1.0]).reshape(2, 1, 1).requires_grad_()
    scale = torch.tensor([1.0, 1e-20]).reshape(2, 1, 1).requires_grad_()
    ploc, pscale = torch.zeros(1, 1), torch.ones(1, 1)
    lpx = torch.zeros(2, 1, 1)
    est = ops.moe_estimator(z, loc, scale, ploc, pscale, lpx, family=family, bound="stratified", estimator=estimator,
                            backend=backend)
    assert torch.isfinite(est.bound).all()
    for g, name in zip(torch.autograd.grad(est.bound.sum(), (z, loc, scale), allow_unused=True), ("z", "loc", "scale")):
        assert g is None or not torch.isnan(g).any(), f"NaN in the gradient of {name}: {g.flatten().tolist()}"


@ALL
@pytest.mark.parametrize("bound", BOUNDS)
def test_infinite_and_nan_log_likelihoods(backend, bound):
    """lpx = +inf: the bound is +inf and the gradient NaN (the softmax is undefined there, and says
    so); lpx = NaN: NaN bound and NaN gradients (NaN in, NaN out); the other item is untouched."""
    p = Problem(M=2, K=3, B=2, seed=5)
    zs, scale = p.sample()
    z = torch.stack(zs).detach()
    for bad, want in ((math.inf, math.inf), (math.nan, math.nan)):
        lpx = p.lpx(z).detach().clone()
        lpx[0, 1, 0] = bad
        lpx.requires_grad_()
        est = ops.moe_estimator(z, p.loc.detach(), scale.detach(), p.prior_loc.detach(), p.prior_log_scale.exp().detach(),
                                lpx, family=p.family, bound=bound, estimator="iwae", backend=backend)
        assert est.bound[0].item() == want or (math.isnan(want) and est.bound[0].isnan()), (bad, est.bound)
        assert torch.isfinite(est.bound[1])
        (g,) = torch.autograd.grad(est.bound.sum(), lpx)
        assert g[0, 1, 0].isnan(), (bad, g[:, :, 0])
        assert torch.isfinite(g[:, :, 1]).all()


def test_chunk_normalisers_are_checked():
    """lse and num_samples go together, and lse must be the bound's own (max, log-sum) pairs: at
    M = B = 2 a stratified [B, 2] was silently read as looser [M, B] normalisers."""
    p = Problem(M=2, K=3, B=2, seed=1)
    zs, scale = p.sample()
    z = torch.stack(zs)
    args = (z, p.loc, scale, p.prior_loc, p.prior_log_scale.exp(), p.lpx(z))
    lw = ops.moe_estimator(*args, family=p.family, estimator="iwae").lw
    with pytest.raises(ValueError, match="go together"):
        ops.moe_estimator(*args, family=p.family, num_samples=100)
    with pytest.raises(ValueError, match="go together"):
        ops.moe_estimator(*args, family=p.family, lse=ops.slice_stats(lw, "looser"))
    with pytest.raises(ValueError, match="lse"):
        ops.moe_estimator(*args, family=p.family, bound="looser", lse=ops.slice_stats(lw, "stratified"), num_samples=3)
    with pytest.raises(ValueError, match="num_samples"):
        ops.moe_estimator(*args, family=p.family, lse=ops.slice_stats(lw, "looser"), num_samples=2)


@ALL
def test_looser_bound_near_the_float32_limit_does_not_overflow(backend):
    """The looser bound averages over experts: at lw ~ -3e38 the sum of two log-normalisers
    overflowed to -inf before the division (the stratified bound gave -3e38)."""
    z, loc, scale, lpx = _lw_offset_case(-3e38, K=4)
    for bound in BOUNDS:
        est = ops.moe_estimator(z, loc, scale, loc[0], scale[0], lpx, family="normal", bound=bound, backend=backend)
        assert torch.isfinite(est.bound).all(), (bound, est.bound)
        torch.testing.assert_close(est.bound.double(), torch.tensor([-3e38], dtype=torch.float64), rtol=1e-6, atol=0)
