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

        for op in ("importance_weights", "mixture_log_density", "importance_ratios", "likelihood_sum", "moe_estimator"):
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
    z, loc, scale, ploc, pscale, lpx = moe_inputs(2, 5, 3, 4, seed=1, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]], device=DEV)
    zs = samples(z)
    for bound, estimator, m in [("looser", "mixture", mask), ("stratified", "eq8", None)]:
        args = (zs, loc, scale, ploc, pscale, lpx, "laplace", "normal", bound, estimator, m, None, None)
        torch.library.opcheck(lib.moe_estimator.default, args)
        d = [[t.detach() for t in zs]] + [t.detach() for t in args[1:6]]
        _b, lw, _zw, lq, stats = lib.moe_estimator(*d, *args[6:])
        g = torch.randn(z.shape[2], device=DEV, dtype=lw.dtype)
        torch.library.opcheck(lib.moe_estimator_backward.default,
                              (g, *d[:5], m, lw, lq, stats, "laplace", "normal", bound, estimator, None))


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


# ---- moe_estimator on CUDA: values and every input's gradient against the reference op

MOE_ESTIMATORS = ("iwae", "eq8", "mixture", "mixture-centred", "released")
MOE_BACKENDS = [b for b in GPU_BACKENDS if b in ops.available_backends("cuda") and
                ops._dispatch.available("moe_estimator", b, "cuda")] if torch.cuda.is_available() else []


def samples(z):
    """z [M, K, B, L] as the backends' ops take it: the list of the experts' samples, leaves each."""
    return [t.detach().clone().requires_grad_() for t in z.unbind(0)]


def moe_inputs(M, K, B, L, seed, dtype, family="laplace", mask=None):
    z = randn(M, K, B, L, seed=seed, dtype=dtype)
    loc = randn(M, B, L, seed=seed + 1, dtype=dtype, scale=0.7)
    scale = (0.5 + randn(M, B, L, seed=seed + 2).abs()).to(dtype)
    ploc = randn(B, L, seed=seed + 3, dtype=dtype, scale=0.2)
    pscale = (0.8 + randn(B, L, seed=seed + 4).abs()).to(dtype)
    lpx = randn(M, K, B, seed=seed + 5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return [t.requires_grad_() for t in (z, loc, scale, ploc, pscale, lpx)]


def moe_run(backend, ins, cot, **kw):
    """bound, lw, z_weight and the gradients of (bound * cot).sum() for the six inputs."""
    est = ops.moe_estimator(*ins, backend=backend, **kw)
    g = torch.autograd.grad((est.bound * cot).sum(), ins, allow_unused=True)
    return est, [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, ins)]


def moe_compare(backend, ins, cot, rtol, atol, **kw):
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    est, g = moe_run(backend, ins, cot, **kw)
    ref, rg = moe_run("reference", ref_ins, cot.double(), **kw)
    torch.testing.assert_close(est.bound.double(), ref.bound, rtol=rtol, atol=atol)
    torch.testing.assert_close(est.lw.double(), ref.lw, rtol=rtol, atol=atol)
    assert (est.z_weight is None) == (ref.z_weight is None)
    if ref.z_weight is not None:
        torch.testing.assert_close(est.z_weight.double(), ref.z_weight, rtol=rtol, atol=atol)
    for a, b, name in zip(g, rg, ("z", "loc", "scale", "prior_loc", "prior_scale", "lpx")):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("estimator", MOE_ESTIMATORS)
@pytest.mark.parametrize("bound", ["looser", "stratified"])
@pytest.mark.parametrize("M,family", [(1, "normal"), (2, "laplace"), (5, "normal"), (5, "laplace")])
def test_moe_estimator_matches_reference_on_gpu(backend, dtype, estimator, bound, M, family):
    ins = moe_inputs(M, 7, 3, 5, seed=M, dtype=dtype)
    cot = randn(3, seed=9, dtype=ins[-1].dtype)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    moe_compare(backend, ins, cot, family=family, bound=bound, estimator=estimator, **tol)


@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("estimator", MOE_ESTIMATORS)
@pytest.mark.parametrize("bound", ["looser", "stratified"])
def test_moe_estimator_masks_and_minus_inf_on_gpu(backend, estimator, bound):
    """Absent experts (one item with a single expert, one with none), NaN in an absent expert's
    parameters and samples, and -inf log-likelihoods: as the reference, in float64."""
    M, K, B, L = 5, 6, 4, 3
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool,
                        device=DEV)
    ins = moe_inputs(M, K, B, L, seed=3, dtype=torch.float64)
    with torch.no_grad():
        ins[1][2, 0] = float("nan")  # expert 2 is absent from item 0
        ins[0][2, :, 0] = float("nan")
        ins[5][0, 1, 0] = -float("inf")  # a sample the likelihood rules out
        ins[5][1, :, 3] = -float("inf")  # a whole group of item 3
    cot = randn(B, seed=9, dtype=torch.float64)
    est, g = moe_run(backend, ins, cot, family="laplace", bound=bound, estimator=estimator, mask=mask)
    ref, rg = moe_run("reference", [t.detach().requires_grad_() for t in ins], cot, family="laplace", bound=bound,
                      estimator=estimator, mask=mask)
    assert est.bound[2] == 0 and ref.bound[2] == 0  # no expert present: the bound is 0 on every face
    torch.testing.assert_close(est.bound, ref.bound, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(est.lw, ref.lw, rtol=1e-9, atol=1e-10)
    if ref.z_weight is not None:
        torch.testing.assert_close(est.z_weight, ref.z_weight, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, rg):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("estimator", ["mixture", "eq8"])
@pytest.mark.parametrize("bound", ["looser", "stratified"])
def test_moe_estimator_given_normalisers_on_gpu(backend, estimator, bound):
    """The large-K path's lse and num_samples (a chunk of K = 4 of a bound over 10 samples)."""
    ins = moe_inputs(2, 4, 3, 6, seed=5, dtype=torch.float64)
    lse = randn(*((2, 3, 2) if bound == "looser" else (3, 2)), seed=7, dtype=torch.float64, scale=3.0)  # (max, log-sum)
    cot = randn(3, seed=9, dtype=torch.float64)
    moe_compare(backend, ins, cot, rtol=1e-9, atol=1e-10, family="normal", bound=bound, estimator=estimator,
                lse=lse, num_samples=10)


@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("M,K,B,L", [(2, 2000, 64, 32), (5, 300, 64, 32), (5, 1000, 32, 64), (2, 30, 128, 20),
                                     (3, 50, 5, 200)])
def test_moe_estimator_at_real_sizes_on_gpu(backend, M, K, B, L):
    """Sizes that cross the kernels' blocks and k-chunks (and L > 128), float32 against float64."""
    ins = moe_inputs(M, K, B, L, seed=M + K, dtype=torch.float32)
    with torch.no_grad():  # samples near their experts, so the weights are not all on one sample
        ins[0].mul_(0.3).add_(ins[1][:, None])
    cot = randn(B, seed=9)
    moe_compare(backend, ins, cot, rtol=1e-3, atol=1e-3, family="laplace", bound="looser", estimator="mixture")


@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("estimator", ["mixture", "iwae"])
def test_moe_estimator_torch_compile_fullgraph_on_gpu(backend, estimator):
    ins = moe_inputs(3, 9, 4, 6, seed=11, dtype=torch.float32)
    cot = randn(4, seed=9)
    kw = dict(family="laplace", bound="stratified", estimator=estimator, backend=backend)

    def f(*t):
        est = ops.moe_estimator(*t, **kw)
        w = est.z_weight.sum() if est.z_weight is not None else 0.0
        return (est.bound * cot).sum(), est.lw, w

    torch._dynamo.reset()
    got, want = torch.compile(f, fullgraph=True)(*ins), f(*ins)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got[0], ins), torch.autograd.grad(want[0], ins)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_moe_estimator_cuda():
    if "cuda" not in MOE_BACKENDS:
        pytest.skip("no CUDA kernel of moe_estimator in this build")
    z, loc, scale, ploc, pscale, lpx = moe_inputs(2, 5, 3, 4, seed=1, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]], device=DEV)
    op = torch.ops.mmvae_fast.moe_estimator.default
    for bound, estimator, m in [("looser", "mixture", None), ("stratified", "iwae", mask),
                                ("looser", "mixture-centred", mask), ("stratified", "eq8", None)]:
        torch.library.opcheck(op, (samples(z), loc, scale, ploc, pscale, lpx, "laplace", "normal", bound, estimator,
                                   m, None, None))


def test_training_step_is_captured_in_a_cuda_graph():
    """A whole m_dreg_looser training step of the digits model (forward, backward into .grad) is
    captured by torch.cuda.graphs, which fails on any host-device sync (the models' distributions
    do not validate, the scale checks are asynchronous); replaying it from a seed gives the
    gradients of an eager step from the same seed."""
    if "cuda" not in MOE_BACKENDS:
        pytest.skip("no CUDA kernel of moe_estimator in this build")
    from mmvae_fast.models import build_model

    torch.manual_seed(0)
    model = build_model("digits", latent_dim=16, learn_prior=True).to(DEV)
    B, K = 8, 5
    x = [torch.rand(B, 1, 28, 28, device=DEV), torch.rand(B, 3, 32, 32, device=DEV)]

    def step():
        loss = -obj.m_dreg_looser(model, x, K, backend="cuda").sum()
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (autograd, allocator, lazy inits) off the capture
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    params = [p for p in model.parameters() if p.grad is not None]
    assert params, "the captured step wrote no gradients"
    static_grads = [p.grad for p in params]  # the graph's own memory, rewritten by every replay
    torch.manual_seed(123)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [g.clone() for g in static_grads]
    replayed_loss = static_loss.clone()
    torch.manual_seed(123)
    model.zero_grad(set_to_none=True)
    eager_loss = step()
    torch.testing.assert_close(replayed_loss, eager_loss.detach(), rtol=1e-4, atol=1e-3)
    for a, p in zip(replayed, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-4)
    torch.manual_seed(123)
    graph.replay()  # and again: the replay is repeatable (no atomics in the op's backward)
    torch.cuda.synchronize()
    for a, g in zip(replayed, static_grads):
        torch.testing.assert_close(a, g, rtol=0, atol=0)


# ------------------------------------------------------------------ moe_estimator

MOE_BACKENDS = [b for b in ("triton", "cuda") if torch.cuda.is_available() and b in ops.available_backends("cuda", op="moe_estimator")]


def moe_inputs_masked(M, K, B, L, seed):
    z, loc, scale = experts(M, K, B, L, seed)
    prior_loc = randn(B, L, seed=seed + 3, scale=0.2).requires_grad_()
    prior_scale = (0.5 + randn(B, L, seed=seed + 4).abs()).requires_grad_()
    lpx = randn(M, K, B, seed=seed + 5, scale=3.0).requires_grad_()
    mask = torch.ones(M, B, dtype=torch.bool, device=DEV)
    if M > 1:
        mask[1, ::3] = False  # some items without expert 1
    return [z, loc, scale, prior_loc, prior_scale, lpx], mask


def moe_value_and_grads(backend, ins, mask, bound, estimator, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in ins]
    est = ops.moe_estimator(*leaves, family="laplace", prior_family="normal", bound=bound, estimator=estimator,
                            mask=mask, backend=backend)
    cot = randn(*est.bound.shape, seed=7, dtype=dtype)
    grads = torch.autograd.grad((est.bound * cot).sum(), leaves, allow_unused=True)
    return est, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("M,K,B,L,bound,estimator", [
    (2, 1000, 32, 64, "looser", "mixture"), (5, 300, 64, 32, "looser", "mixture-centred"),
    (5, 300, 8, 20, "stratified", "iwae"), (1, 4097, 3, 1, "stratified", "eq8"), (2, 30, 128, 20, "looser", "released"),
])
def test_moe_estimator_at_real_block_sizes(backend, M, K, B, L, bound, estimator):
    """float32 on the GPU against the reference face in float64: value, lw, z_weight, every gradient."""
    ins, mask = moe_inputs_masked(M, K, B, L, seed=M + K)
    est, g = moe_value_and_grads(backend, ins, mask, bound, estimator, torch.float32)
    ref, r = moe_value_and_grads("reference", ins, mask, bound, estimator, torch.float64)
    torch.testing.assert_close(est.bound.double(), ref.bound, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(est.lw.double(), ref.lw, rtol=1e-4, atol=1e-3)
    if ref.z_weight is not None:
        torch.testing.assert_close(est.z_weight.double(), ref.z_weight, rtol=1e-3, atol=1e-4)
    for name, x, y in zip(("z", "loc", "scale", "prior_loc", "prior_scale", "lpx"), g, r):
        torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", MOE_BACKENDS)
def test_moe_estimator_compile_fullgraph_matches_eager(backend):
    ins, mask = moe_inputs_masked(3, 40, 6, 9, seed=3)

    def f(*t):
        est = ops.moe_estimator(*t, family="normal", bound="looser", estimator="mixture", mask=mask, backend=backend)
        return est.bound.sum() + (est.z_weight * est.lw.clamp_min(-1e4)).sum().detach()

    torch._dynamo.reset()
    got, want = torch.compile(f, fullgraph=True)(*ins), f(*ins)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(got, ins), torch.autograd.grad(want, ins)):  # deterministic sums
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
