"""mixture_log_density on every backend: the grid against torch.distributions, then the C++
kernels (gradcheck, any subset of gradients, opcheck, larger sizes, memory) and the Triton
kernels (under the interpreter) against the reference."""
import math

import pytest
import torch
from mmvae_fast.profiling import allocations
from helpers import (
    NAMESPACES,
    library,
    opcheck,
    DIST,
    FAMILIES,
    T,
    assert_grads,
    check_close,
    cpu_experts,
    cpu_mix,
    cpu_test,
    experts,
    grads,
    rand,
    ref_mix,
    triton_experts,
    triton_test,
)

from mmvae_fast import ops
from mmvae_fast import reference as ref

import numerics

# ------------------------------------------------------------------ every backend


def direct_pairwise(z, loc, scale, family):
    M = z.shape[0]
    return torch.stack([
        torch.stack([DIST[family](loc[m], scale[m]).log_prob(z[r]).sum(-1) for m in range(M)]) for r in range(M)
    ])


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


# ------------------------------------------------------------------ cpu


MASK = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)  # [M=3, B=3], each b has one


@cpu_test
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mask", [None, MASK], ids=["nomask", "mask"])
def test_cpu_gradcheck_mixture(family, mask):
    z, loc, scale = cpu_experts(3, 2, 3, 4, seed=1)
    assert torch.autograd.gradcheck(lambda *a: cpu_mix(*a, family, mask), (z, loc, scale))
    assert torch.autograd.gradcheck(lambda *a: cpu_mix(*a, family, mask, pairwise=True), (z, loc, scale))


@cpu_test
@pytest.mark.parametrize("use", ["lq", "a", "both"])
@pytest.mark.parametrize("wrt", [(0,), (1, 2), (0, 1, 2)], ids=["z", "params", "all"])
def test_cpu_any_subset_of_incoming_and_outgoing_grads(use, wrt):
    z, loc, scale = cpu_experts(3, 4, 5, 3, seed=3)
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


@NAMESPACES
@pytest.mark.parametrize("family", FAMILIES)
def test_opcheck_mixture_log_density(family, ns):
    z, loc, scale = cpu_experts(2, 3, 4, 5, seed=5)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    lib = library(ns, "mixture_log_density")
    for m in (None, mask):
        opcheck(lib.mixture_log_density.default, (z, loc, scale, family, m))
        opcheck(lib.mixture_log_density_pairwise.default, (z, loc, scale, family, m))
    d = [t.detach() for t in (z, loc, scale)]
    lq = lib.mixture_log_density(*d, family, mask)
    glq, ga = torch.randn_like(lq), torch.randn(2, 2, 3, 4, dtype=lq.dtype)
    opcheck(lib.mixture_log_density_backward.default, (glq, ga, *d, lq, family, mask, [True, False, True]))
    opcheck(lib.mixture_log_density_backward.default, (None, ga, *d, lq, family, None, [False, True, True]))


@cpu_test
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_larger_sizes_match_reference(family):
    M, K, B, L = 5, 100, 8, 64
    z, loc, scale = cpu_experts(M, K, B, L, seed=7, dtype=torch.float32)
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


@cpu_test
def test_cpu_mixture_never_materialises_pairwise_times_latent():
    """The backward must not keep or rebuild an M*M*K*B*L table: the saved tensors are inputs and lq."""
    z, loc, scale = cpu_experts(4, 50, 6, 40, seed=10, dtype=torch.float32)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cpu_mix(z, loc, scale, "normal").sum().backward()
    assert max(sizes) == z.numel() and sum(sizes) <= z.numel() + 2 * loc.numel() + 4 * 50 * 6
    # nor build one and free it inside either pass: every allocation of forward and backward, kernels'
    # included, is at most z's size (dz), and the peak is far below the table's
    table = 4 * 4 * 50 * 6 * 40 * z.element_size()
    for fn in (lambda: cpu_mix(z, loc, scale, "laplace", pairwise=True)[0].sum().backward(),
               lambda: ops.importance_ratios(z, loc, scale, family="normal", backend="cpu").sum().backward()):
        allocs, peak = allocations(fn)
        assert max(allocs) <= z.numel() * z.element_size() and peak < table / 2


@cpu_test
def test_cpu_nan_and_low_precision_gradients():
    z, loc, scale = cpu_experts(2, 3, 4, 5, seed=11)
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


# ------------------------------------------------------------------ triton
# interpreter blocks: BLOCK_B = 2 batch entries, K_CHUNK = 2 samples, BLOCK_L = next pow2 >= L


@triton_test
@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("M,K,B,L", [(3, 3, 5, 7), (1, 1, 1, 1), (2, 1, 3, 2), (1, 3, 2, 5)])
def test_triton_mixture_values_and_grads(family, M, K, B, L):
    g = torch.Generator().manual_seed(M * 100 + K * 10 + L)
    z, loc, scale = triton_experts(M, K, B, L, g)
    out = ops.mixture_log_density(z, loc, scale, family=family, return_pairwise=True, **T)
    assert_grads(out, ref.mixture_log_density(z, loc, scale, family, None, True), (z, loc, scale), g)
    lq = ops.mixture_log_density(z, loc, scale, family=family, **T)  # lq alone: no table written
    assert_grads((lq,), (ref.mixture_log_density(z, loc, scale, family),), (z, loc, scale), g)


@triton_test
def test_triton_mixture_mask_with_an_empty_batch_entry():
    g = torch.Generator().manual_seed(4)
    z, loc, scale = triton_experts(3, 3, 5, 3, g)
    mask = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 1, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)  # b=3: none
    lq = ops.mixture_log_density(z, loc, scale, family="laplace", mask=mask, **T)
    want = ref.mixture_log_density(z, loc, scale, "laplace", mask)
    assert (lq[:, :, 3] == -math.inf).all()
    live = [0, 1, 2, 4]
    assert_grads((lq[:, :, live],), (want[:, :, live],), (z, loc, scale), g)
    (gz, gl, gs) = torch.autograd.grad(lq.sum(), (z, loc, scale))  # the -inf entry: zero gradient
    assert not any(torch.isnan(t).any() for t in (gz, gl, gs)) and (gl[~mask] == 0).all()


@triton_test
def test_triton_mixture_pairwise_cotangent_alone_and_nan():
    g = torch.Generator().manual_seed(5)
    z, loc, scale = triton_experts(2, 3, 3, 4, g)
    _, a = ops.mixture_log_density(z, loc, scale, family="normal", return_pairwise=True, **T)
    _, ra = ref.mixture_log_density(z, loc, scale, "normal", None, True)
    assert_grads((a,), (ra,), (z, loc, scale), g)
    zn = z.detach().clone()
    zn[0, 1, 2, 0] = math.nan
    lq = ops.mixture_log_density(zn, loc.detach(), scale.detach(), **T)
    assert torch.isnan(lq[0, 1, 2]) and torch.isfinite(lq[1]).all() and torch.isfinite(lq[0, 0]).all()


@triton_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_mixture_half_inputs(dtype):
    g = torch.Generator().manual_seed(6)
    z, loc, scale = triton_experts(2, 3, 3, 5, g, dtype)
    out = ops.mixture_log_density(z, loc, scale, family="normal", return_pairwise=True, **T)
    assert all(o.dtype == torch.float32 for o in out)
    assert_grads(out, ref.mixture_log_density(z, loc, scale, "normal", None, True), (z, loc, scale), g, rtol=1e-4, atol=1e-4)


@triton_test
def test_triton_mixture_gradcheck_float64():
    z, loc, scale = triton_experts(2, 3, 3, 2, torch.Generator().manual_seed(7))  # K, B cross the blocks
    mask = torch.tensor([[True, False, True], [True, True, False]])
    f = lambda *t: ops.mixture_log_density(*t, family="laplace", mask=mask, return_pairwise=True, **T)  # noqa: E731
    assert torch.autograd.gradcheck(f, (z, loc, scale), fast_mode=True)


# issue 16: second-order gradients (the reference gives them, the fused backends refuse clearly)
# and docs/design.md section 2's NaN / inf policy at extreme inputs, on every backend
def test_mixture_log_density_second_order(backend):
    numerics.check_second_order("mixture_log_density", backend)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", numerics.MIXTURE_EXTREME_CASES)
def test_mixture_log_density_extreme_inputs_follow_the_nan_policy(backend, case, family):
    numerics.check_mixture_extreme(case, family, backend)


# docs/design.md section 2 at single points, float32
def _points(zs, locs, scales, family, backend):
    """lq, a and the inputs of experts m (loc, scale) with one sample z[m] each: M = len(locs)."""
    M = len(locs)
    z, loc, scale = (torch.tensor(v, dtype=torch.float32).reshape(M, *([1] * n)).requires_grad_()
                     for v, n in ((zs, 3), (locs, 2), (scales, 2)))
    lq, a = ops.mixture_log_density(z, loc, scale, family=family, return_pairwise=True, backend=backend)
    return lq, a, (z, loc, scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixture_log_density_overflowed_pairwise_entry_has_zero_gradient(backend, family):
    """An -inf (overflowed) entry of the pairwise table gives zero gradients whatever its own
    cotangent: expert 1 (scale 2e-38) at z_0 = 10 is u = 5e38, an overflow for both families."""
    lq, a, (z, loc, scale) = _points([10.0, 0.0], [0.0, 0.0], [1.0, 2e-38], family, backend)
    assert a[0, 1].item() == -math.inf and torch.isfinite(a[1]).all()
    gz, gl, gs = torch.autograd.grad(a, (z, loc, scale), torch.ones_like(a))
    normal = family == "normal"
    # a[0, 0] (u = 10) and a[1, 0], a[1, 1] (u = 0) alone
    torch.testing.assert_close(gz.flatten(), torch.tensor([-10.0 if normal else -1.0, 0.0]))
    torch.testing.assert_close(gl.flatten(), torch.tensor([10.0 if normal else 1.0, 0.0]))
    torch.testing.assert_close(gs.flatten(), torch.tensor([(99.0 if normal else 9.0) - 1.0, -1 / 2e-38]))


def test_mixture_log_density_normal_square_term_below_float32_max_is_finite(backend):
    """u = 2e19: u * u overflows float32 but the density's 0.5 u^2 = 2e38 does not: a finite lq."""
    lq, _, _ = _points([0.2], [0.0], [1e-20], "normal", backend)
    want = -2e38 - math.log(1e-20) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(lq.double().flatten(), torch.tensor([want], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixture_log_density_tied_experts_far_from_z(backend, family):
    """Three identical experts at |a| ~ 1e20, where lse = max + log 3 rounds to max in float32: the
    responsibilities are still 1/3 each (exp(a - max) / sum), so d lq / dz is one expert's."""
    far = 1e20 if family == "laplace" else 1e10  # Normal: u^2 / 2 ~ 5e19
    lq, _, (z, loc, scale) = _points([far, -2 * far, far], [0.0] * 3, [1.0] * 3, family, backend)
    gz, gl = torch.autograd.grad(lq.sum(), (z, loc))
    want_gz = torch.tensor([-1.0, 1.0, -1.0]) if family == "laplace" else torch.tensor([-far, 2 * far, -far])
    torch.testing.assert_close(gz.flatten(), want_gz)
    torch.testing.assert_close(gl.flatten(), -want_gz.sum().expand(3) / 3)
