"""The fused C++ CPU kernels of mixture_log_density and importance_ratios beyond the common grid
of test_ops.py: float64 gradcheck, opcheck, torch.compile, larger sizes, any subset of incoming
gradients, and the objectives that use them against the reference backend."""
import math

import pytest
import torch

import mmvae_fast.objectives as obj
from mmvae_fast import _ext, ops
from mmvae_fast.ops import _dispatch

import toy

pytestmark = pytest.mark.skipif(not _ext.AVAILABLE, reason="the C++ extension is not built")
FAMILIES = ["normal", "laplace"]


def experts(M, K, B, L, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(M, B, L, generator=g, dtype=torch.float64)
    scale = 0.4 + torch.rand(M, B, L, generator=g, dtype=torch.float64)
    z = loc[:, None] + scale[:, None] * torch.randn(M, K, B, L, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_() for t in (z, loc, scale))


def cpu_mix(z, loc, scale, family, mask=None, pairwise=False):
    return ops.mixture_log_density(z, loc, scale, family=family, mask=mask, return_pairwise=pairwise, backend="cpu")


def ref_mix(z, loc, scale, family, mask=None, pairwise=False):
    return ops.mixture_log_density(z, loc, scale, family=family, mask=mask, return_pairwise=pairwise, backend="reference")


MASK = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)  # [M=3, B=3], each b has one


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mask", [None, MASK], ids=["nomask", "mask"])
def test_gradcheck_mixture(family, mask):
    z, loc, scale = experts(3, 2, 3, 4, seed=1)
    assert torch.autograd.gradcheck(lambda *a: cpu_mix(*a, family, mask), (z, loc, scale))
    assert torch.autograd.gradcheck(lambda *a: cpu_mix(*a, family, mask, pairwise=True), (z, loc, scale))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck_ratios(family):
    """Row r of the ratios depends on expert r's parameters only through its numerators (its own
    denominators are a stop-gradient): finite differences in loc[r], scale[r] of row r check it."""
    z, loc, scale = (t.detach() for t in experts(3, 2, 3, 4, seed=2))
    for r in range(3):
        def row(loc_r, scale_r):
            lo, sc = loc.clone(), scale.clone()
            lo[r], sc[r] = loc_r, scale_r
            return ops.importance_ratios(z, lo, sc, family=family, backend="cpu")[r]

        assert torch.autograd.gradcheck(row, (loc[r].clone().requires_grad_(), scale[r].clone().requires_grad_()))


@pytest.mark.parametrize("use", ["lq", "a", "both"])
@pytest.mark.parametrize("wrt", [(0,), (1, 2), (0, 1, 2)], ids=["z", "params", "all"])
def test_any_subset_of_incoming_and_outgoing_grads(use, wrt):
    z, loc, scale = experts(3, 4, 5, 3, seed=3)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 0, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)  # b=3: none
    inputs = [t if i in wrt else t.detach() for i, t in enumerate((z, loc, scale))]
    targets = [inputs[i] for i in wrt]
    g = torch.Generator().manual_seed(4)
    results = []
    for fn in (cpu_mix, ref_mix):
        lq, a = fn(*inputs, "laplace", mask, pairwise=True)
        outs = {"lq": [lq], "a": [a], "both": [lq, a]}[use]
        g.manual_seed(4)
        cots = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
        if use != "a":  # the -inf rows (no expert present) take a gradient too: it must vanish
            assert (lq[:, :, 3] == -math.inf).all()
        results.append(torch.autograd.grad(outs, targets, cots))
    for x, y in zip(*results):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("family", FAMILIES)
def test_opcheck(family):
    z, loc, scale = experts(2, 3, 4, 5, seed=5)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    lib = torch.ops.mmvae_fast
    for m in (None, mask):
        torch.library.opcheck(lib.mixture_log_density.default, (z, loc, scale, family, m))
        torch.library.opcheck(lib.mixture_log_density_pairwise.default, (z, loc, scale, family, m))
    torch.library.opcheck(lib.importance_ratios.default, (z.detach(), loc, scale, family))
    d = [t.detach() for t in (z, loc, scale)]
    lq = lib.mixture_log_density(*d, family, mask)
    glq, ga = torch.randn_like(lq), torch.randn(2, 2, 3, 4, dtype=lq.dtype)
    torch.library.opcheck(lib.mixture_log_density_backward.default, (glq, ga, *d, lq, family, mask, [True, False, True]))
    torch.library.opcheck(lib.mixture_log_density_backward.default, (None, ga, *d, lq, family, None, [False, True, True]))
    ratio = lib.importance_ratios(*d, family)
    torch.library.opcheck(lib.importance_ratios_backward.default, (torch.randn_like(ratio), ratio, *d, family))


def test_torch_compile_fullgraph_matches_eager():
    z, loc, scale = experts(3, 4, 5, 6, seed=6)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)

    def f(z, loc, scale):
        lq, a = cpu_mix(z, loc, scale, "normal", mask, pairwise=True)
        lq2 = cpu_mix(z.detach(), loc, scale, "laplace")
        ratio = ops.importance_ratios(z, loc, scale, family="normal", backend="cpu")
        return lq.sum() + (a * a.detach().sin()).sum() + lq2.square().sum() + (ratio * ratio.detach().cos()).sum()

    def only_lq(z, loc, scale):  # the pairwise output unused: its gradient never arrives
        return cpu_mix(z, loc, scale, "normal", pairwise=True)[0].sum()

    for fn in (f, only_lq):
        compiled = torch.compile(fn, fullgraph=True)
        want = fn(z, loc, scale)
        got = compiled(z, loc, scale)
        torch.testing.assert_close(got, want)
        for x, y in zip(torch.autograd.grad(got, (z, loc, scale)), torch.autograd.grad(want, (z, loc, scale))):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("family", FAMILIES)
def test_larger_sizes_match_reference(family):
    M, K, B, L = 5, 100, 8, 64
    z, loc, scale = experts(M, K, B, L, seed=7, dtype=torch.float32)
    mask = torch.rand(M, B, generator=torch.Generator().manual_seed(8)) > 0.3
    mask[0] = True
    g = torch.Generator().manual_seed(9)
    cot_lq, cot_a = torch.randn(M, K, B, generator=g), torch.randn(M, M, K, B, generator=g)
    got, want = [], []
    for fn, sink in ((cpu_mix, got), (ref_mix, want)):
        lq, a = fn(z, loc, scale, family, mask, pairwise=True)
        sink += [lq, a, *torch.autograd.grad((lq, a), (z, loc, scale), (cot_lq, cot_a))]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-3)
    cot = torch.randn(M, M, K, B, generator=g)
    got = [ops.importance_ratios(z, loc, scale, family=family, backend=b) for b in ("cpu", "reference")]
    torch.testing.assert_close(got[0], got[1], rtol=2e-4, atol=1e-5)
    gl = [torch.autograd.grad(r, (loc, scale), cot) for r in got]
    for x, y in zip(*gl):
        torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-3)


def test_mixture_never_materialises_pairwise_times_latent():
    """The backward must not keep or rebuild an M*M*K*B*L table: the saved tensors are inputs and lq."""
    z, loc, scale = experts(4, 50, 6, 40, seed=10, dtype=torch.float32)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cpu_mix(z, loc, scale, "normal").sum().backward()
    assert max(sizes) == z.numel() and sum(sizes) <= z.numel() + 2 * loc.numel() + 4 * 50 * 6


def test_nan_and_low_precision_gradients():
    z, loc, scale = experts(2, 3, 4, 5, seed=11)
    zn = z.detach().clone()
    zn[1, 2, 3, 4] = math.nan
    zn.requires_grad_()
    (gz,) = torch.autograd.grad(cpu_mix(zn, loc, scale, "normal").sum(), zn)
    assert torch.isnan(gz[1, 2, 3]).all() and torch.isfinite(gz[0]).all()
    for dt in (torch.float16, torch.bfloat16):
        zh, lh, sh = (t.detach().to(dt).requires_grad_() for t in (z, loc, scale))
        gh = torch.autograd.grad(cpu_mix(zh, lh, sh, "laplace").sum(), (zh, lh, sh))
        zd, ld, sd = (t.detach().double().requires_grad_() for t in (zh, lh, sh))
        g64 = torch.autograd.grad(ref_mix(zd, ld, sd, "laplace").sum(), (zd, ld, sd))
        for x, y in zip(gh, g64):
            assert x.dtype == dt
            torch.testing.assert_close(x.double(), y, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ objectives


def _run(fn, model, x, K, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)
    val = fn(model, x, K)
    val.backward()
    return val.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("M,family", [(2, "laplace"), (3, "normal")])
@pytest.mark.parametrize(
    "objective",
    [lambda m, x, K: obj.m_dreg(m, x, K, grad="mixture"), lambda m, x, K: obj.m_dreg_looser(m, x, K, grad="mixture"), obj.m_elbo],
    ids=["m_dreg_mixture", "m_dreg_looser_mixture", "m_elbo"],
)
def test_objectives_cpu_mixture_ops_equal_reference(monkeypatch, M, family, objective):
    """`auto` runs the cpu backend wherever one is registered (here at least these two ops) and the
    reference elsewhere; MMVAE_FAST_BACKEND=reference runs the reference everywhere. Passing
    backend='cpu' would also reach ops whose cpu kernels live elsewhere, so the comparison goes
    through the environment variable instead."""
    model = toy.make_mmvae(M, family)
    x = toy.sample_batch(model, 4)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert _dispatch.resolve("mixture_log_density", None, "cpu") == "cpu"
    assert _dispatch.resolve("importance_ratios", None, "cpu") == "cpu"
    fast = _run(objective, model, x, 5)
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    slow = _run(objective, model, x, 5)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-8, atol=1e-10)
    assert fast[1].keys() == slow[1].keys() and len(fast[1]) > 0
    for n in fast[1]:
        torch.testing.assert_close(fast[1][n], slow[1][n], rtol=1e-8, atol=1e-10, msg=lambda m: f"{n}: {m}")

