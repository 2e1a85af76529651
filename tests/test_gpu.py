"""What only a CUDA device can show: the compiled Triton kernels and the CUDA extension at sizes
that cross their real block sizes, torch.compile(fullgraph=True) over the GPU ops (the
interpreter cannot run it), opcheck of the CUDA-registered ops, and objectives on the GPU against
the reference backend. The grids of tests/test_<op>.py run on the CUDA backends too.

Skipped without a CUDA device (this project's CI has none); run on a GPU machine with
    MMVAE_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e . && pytest -q tests
"""
import pytest
import torch

import mmvae_fast.objectives as obj
import toy
from mmvae_fast import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_BACKENDS = [b for b in ("triton", "cuda") if torch.cuda.is_available() and b in ops.available_backends("cuda")]
DEV = "cuda"


def randn(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(DEV, dtype)


def experts(M, K, B, L, seed, dtype=torch.float32):
    z = randn(M, K, B, L, seed=seed, dtype=dtype).requires_grad_()
    loc = randn(M, B, L, seed=seed + 1, dtype=dtype).requires_grad_()
    scale = (0.3 + randn(M, B, L, seed=seed + 2).abs()).to(dtype).requires_grad_()
    return z, loc, scale


def all_outputs(backend, z, loc, scale, lw, x, params):
    return [
        *ops.importance_weights(lw, 1, backend=backend),
        *ops.mixture_log_density(z, loc, scale, family="laplace", return_pairwise=True, backend=backend),
        ops.importance_ratios(z * 0.1, loc * 0.1, scale, family="normal", backend=backend),  # finite ratios
        ops.likelihood_sum(x, params, family="laplace", scale=0.75, backend=backend),
    ]


def cotangents(ins):
    """Fixed random cotangents, one per output: not functions of the outputs, so float32 rounding in
    one output does not move the others' gradients."""
    return [randn(*o.shape, seed=100 + i) for i, o in enumerate(all_outputs("reference", *ins))]


def all_ops(backend, cots, *ins):
    """A scalar that reaches every output of every op."""
    return sum((o * c).sum() for o, c in zip(all_outputs(backend, *ins), cots))


def inputs(seed=0, M=3, K=37, B=5, L=11):
    z, loc, scale = experts(M, K, B, L, seed)
    lw = randn(B, 300, 2, seed=seed + 3, scale=5.0).requires_grad_()
    x = randn(B, 3, 19, seed=seed + 4).sigmoid()
    params = randn(K, B, 3, 19, seed=seed + 5).requires_grad_()
    return z, loc, scale, lw, x, params


def grads(val, ins):
    return torch.autograd.grad(val, [t for t in ins if t.requires_grad])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_every_op_matches_reference_on_gpu(backend):
    ins = inputs()
    cots = cotangents(ins)
    got, want = all_ops(backend, cots, *ins), all_ops("reference", cots, *ins)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)
    for a, b in zip(grads(got, ins), grads(want, ins)):  # float32 sums in different orders (atomics on cuda)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_matches_eager_on_gpu(backend):
    ins = inputs(seed=10)
    cots = cotangents(ins)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: all_ops(backend, cots, *t), fullgraph=True)
    got, want = compiled(*ins), all_ops(backend, cots, *ins)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    for a, b in zip(grads(got, ins), grads(want, ins)):  # the CUDA backward's atomics: any order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("M,K,B,L", [(2, 1000, 32, 64), (5, 1000, 8, 20), (1, 4097, 3, 1)])
def test_mixture_ops_at_real_block_sizes(backend, M, K, B, L):
    z, loc, scale = experts(M, K, B, L, seed=M + K)
    lq, a = ops.mixture_log_density(z, loc, scale, family="normal", return_pairwise=True, backend=backend)
    rz, rl, rs = (t.detach().double().requires_grad_() for t in (z, loc, scale))
    rlq, ra = ops.mixture_log_density(rz, rl, rs, family="normal", return_pairwise=True, backend="reference")
    torch.testing.assert_close(lq.double(), rlq, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(a.double(), ra, rtol=1e-5, atol=1e-3)
    cq, ca = randn(*lq.shape, seed=1), randn(*a.shape, seed=2)
    g = torch.autograd.grad((lq * cq).sum() + (a * ca).sum(), (z, loc, scale))
    r = torch.autograd.grad((rlq * cq.double()).sum() + (ra * ca.double()).sum(), (rz, rl, rs))
    for x, y in zip(g, r):  # float32 sums over up to K = 4097 terms, some cancelling
        torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=5e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("R,N", [(4, 100_000), (3000, 30), (7, 1)])
def test_importance_weights_at_real_block_sizes(backend, R, N):
    lw = randn(R, N, seed=R, scale=20.0).requires_grad_()
    out = ops.importance_weights(lw, 1, backend=backend)
    ref = ops.importance_weights(lw.detach().double().requires_grad_(), 1, backend="reference")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=1e-6)
    cot = [randn(*t.shape, seed=i) for i, t in enumerate(out)]
    (g,) = torch.autograd.grad(out, lw, cot)
    ref_lw = lw.detach().double().requires_grad_()
    (r,) = torch.autograd.grad(ops.importance_weights(ref_lw, 1, backend="reference"), ref_lw, [c.double() for c in cot])
    torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_likelihood_at_real_block_sizes(backend, family):
    K, B = 30, 16
    if family == "categorical":
        V = 1590
        x = torch.randint(0, V, (B, 32), generator=torch.Generator().manual_seed(0)).to(DEV)
        params = randn(K, B, 32, V, seed=1).requires_grad_()
    else:
        x = randn(B, 3, 32, 32, seed=0).sigmoid().round()
        params = randn(K, B, 3, 32, 32, seed=1).requires_grad_()
    out = ops.likelihood_sum(x, params, family=family, backend=backend)
    rp = params.detach().double().requires_grad_()
    ref = ops.likelihood_sum(x, rp, family=family, backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-2)
    cot = randn(*out.shape, seed=2)
    (g,) = torch.autograd.grad(out, params, cot)
    (r,) = torch.autograd.grad(ref, rp, cot.double())
    torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck_gpu_ops(backend):
    """Every opcheck test, the fake-tensor and AOT ones included, on the CUDA kernels
    (mmvae_fast::<op>) and on the compiled Triton ops (mmvae_fast_triton::<op>, the same schemas),
    which the interpreter cannot give fake tensors to."""
    if backend == "triton":
        from mmvae_fast.ops import _triton

        for op in ("importance_weights", "mixture_log_density", "importance_ratios", "likelihood_sum"):
            _triton._load(op)
    lib = torch.ops.mmvae_fast if backend == "cuda" else torch.ops.mmvae_fast_triton
    lw = randn(4, 33, 2, seed=0, dtype=torch.float64).requires_grad_()
    torch.library.opcheck(lib.importance_weights.default, (lw,))
    z, loc, scale = experts(2, 5, 3, 4, seed=1, dtype=torch.float64)
    torch.library.opcheck(lib.mixture_log_density.default, (z, loc, scale, "laplace", None))
    torch.library.opcheck(lib.mixture_log_density_pairwise.default, (z, loc, scale, "normal", None))
    torch.library.opcheck(lib.importance_ratios.default, (z, loc, scale, "normal"))
    x = randn(3, 7, seed=2, dtype=torch.float64)
    params = randn(2, 3, 7, seed=3, dtype=torch.float64).requires_grad_()
    scale = (0.5 + randn(1, 1, 7, seed=4, dtype=torch.float64).abs()).requires_grad_()
    torch.library.opcheck(lib.likelihood_sum.default, (x, params, scale, 0))  # normal
    torch.library.opcheck(lib.likelihood_sum.default, (x.sigmoid().round(), params, None, 2))  # bernoulli


OBJECTIVES = [
    (obj.m_iwae, {}), (obj.m_elbo, {}), (obj.m_dreg, dict(grad="eq8")), (obj.m_dreg, dict(grad="mixture")),
    (obj.m_dreg_looser, dict(grad="mixture")), (obj.m_dreg_looser, dict(grad="mixture-centred")),
    (obj.m_dreg_looser, dict(grad="mixture", k_chunk=2)),
]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("objective,kw", OBJECTIVES, ids=[f"{f.__name__}-{'-'.join(map(str, k.values()))}" for f, k in OBJECTIVES])
def test_objectives_on_gpu_match_reference(backend, objective, kw):
    model = toy.make_mmvae(3, "laplace", ["laplace", "bernoulli", "categorical"])
    x = [t.to(DEV) for t in toy.sample_batch(model, B=4)]
    model.to(DEV)
    res = []
    for b in (backend, "reference"):
        model.zero_grad()
        torch.manual_seed(0)
        val = objective(model, x, 5, backend=b, **kw)
        val.backward()
        res.append((val.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(res[0][0], res[1][0])
    assert len(res[0][1]) == len(res[1][1])
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b)
