"""What spans the ops of one backend: registration, torch.compile over several ops, relaunch
safety of the Triton kernels, the objectives on each backend against the reference, and the
Triton kernels compiled for the GPU without one."""
import math
import os
import subprocess
import sys

import pytest
import torch
import toy
from helpers import T, cpu_experts, cpu_mix, cpu_test, gen, rnd, triton_experts, triton_lik_inputs, triton_test

import mmvae_fast.objectives as obj
from mmvae_fast import ops
from mmvae_fast.ops import _dispatch, _triton

# ------------------------------------------------------------------ registration


@triton_test
def test_triton_registered_for_cuda_and_interpreter():
    for op in _triton._OPS:
        assert _dispatch.available(op, "triton", "cuda")
        assert _dispatch.available(op, "triton", "cpu")  # only because TRITON_INTERPRET=1
    assert _dispatch.resolve("importance_weights", None, "cuda") == "triton"
    assert _dispatch.resolve("importance_weights", None, "cpu") != "triton"  # auto never interprets



@cpu_test
def test_cpu_ops_run_their_autograd_in_cpp():
    """Every C++ op's autograd is C++ (csrc/autograd/<op>.cpp): its grad_fn is a C++ node, and its
    forward and backward, called eagerly, run no Python (torch.library's Python wrapper cost 60-100 us
    per call); the backward ops keep the first-order guard."""
    g = gen(3)
    z = torch.randn(2, 3, 4, 5, generator=g)
    loc = torch.randn(2, 4, 5, generator=g).requires_grad_()
    scale = (0.5 + torch.rand(2, 4, 5, generator=g)).requires_grad_()
    lpx = torch.randn(2, 3, 4, generator=g)
    outs = {
        "importance_weights": ops.importance_weights(lpx.requires_grad_(), (0, 1), backend="cpu").bound,
        "likelihood_sum": ops.likelihood_sum(z[0, 0].detach(), loc, family="normal", scale=scale, backend="cpu"),
        "mixture_log_density": ops.mixture_log_density(z, loc, scale, family="laplace", backend="cpu"),
        "importance_ratios": ops.importance_ratios(z, loc, scale, family="normal", backend="cpu"),
        "moe_estimator": ops.moe_estimator(z, loc, scale, loc[0], scale[0], lpx, family="normal", backend="cpu").bound,
    }
    assert set(outs) == set(_extension_ops())
    for op, out in outs.items():
        node = out.grad_fn
        while node is not None and "CppNode" not in node.name():  # reshapes and sums of the adapters
            node = node.next_functions[0][0] if node.next_functions else None
        assert node is not None, f"{op}: no C++ autograd node behind its output ({out.grad_fn.name()})"
        with torch.profiler.profile() as prof:
            torch.autograd.grad(out.sum(), [t for t in (loc, scale, lpx) if t.requires_grad], allow_unused=True)
        names = {e.name for e in prof.events()}
        assert f"mmvae_fast::{op}_backward" in names
        assert not any("GeneratedBackwardFor_mmvae_fast" in n for n in names), (op, names)


@triton_test
def test_triton_ops_run_eager_without_the_dispatcher():
    """In eager the Triton ops run as autograd Functions over their Python entries (no dispatcher,
    no torch.library wrapper per call: _autograd.EagerLibrary); torch.compile still sees the
    registered ops (test_gpu.py, opcheck). Forward and backward of each op, with create_graph's
    first-order guard intact."""
    g = gen(3)
    z = torch.randn(2, 3, 4, 5, generator=g)
    loc = torch.randn(2, 4, 5, generator=g).requires_grad_()
    scale = (0.5 + torch.rand(2, 4, 5, generator=g)).requires_grad_()
    lpx = torch.randn(2, 3, 4, generator=g).requires_grad_()
    run = {
        "importance_weights": lambda: ops.importance_weights(lpx, (0, 1), backend="triton").bound,
        "likelihood_sum": lambda: ops.likelihood_sum(z[0, 0], loc, family="normal", scale=scale, backend="triton"),
        "mixture_log_density": lambda: ops.mixture_log_density(z, loc, scale, family="laplace", backend="triton"),
        "importance_ratios": lambda: ops.importance_ratios(z, loc, scale, family="normal", backend="triton"),
        "moe_estimator": lambda: ops.moe_estimator(z, loc, scale, loc[0], scale[0], lpx, family="normal",
                                                   backend="triton").bound,
    }
    assert set(run) == set(_triton._OPS)
    for op, f in run.items():
        with torch.profiler.profile() as prof:
            out = f()
            torch.autograd.grad(out.sum(), [loc, scale, lpx], allow_unused=True)
        names = {e.name for e in prof.events()}
        assert not any(n.startswith("mmvae_fast_triton::") for n in names), (op, sorted(n for n in names if "mmvae" in n))
        node, seen = out.grad_fn, []
        while node is not None and not node.name().endswith("_eagerBackward"):
            seen.append(node.name())
            node = node.next_functions[0][0] if node.next_functions else None
        assert node is not None, (op, seen)
    (gl,) = torch.autograd.grad(run["moe_estimator"]().sum(), loc, create_graph=True)
    with pytest.raises(ops.DoubleBackwardError, match="moe_estimator"):
        torch.autograd.grad(gl.sum(), scale)


def _extension_ops():
    return [op for op in ("importance_weights", "likelihood_sum", "mixture_log_density", "importance_ratios",
                          "moe_estimator") if hasattr(torch.ops.mmvae_fast, op)]


# ------------------------------------------------------------------ torch.compile


@cpu_test
def test_cpu_weights_and_likelihood_compile_fullgraph_matches_eager():
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


@cpu_test
def test_cpu_mixture_ops_compile_fullgraph_matches_eager():
    z, loc, scale = cpu_experts(3, 4, 5, 6, seed=6)
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


# ------------------------------------------------------------------ relaunch safety


@triton_test
def test_triton_no_output_is_read_before_it_is_written(monkeypatch):
    """Every buffer the kernels get from torch.empty / empty_like is NaN-filled here (a GPU's caching
    allocator hands back old data): no result may change. Autotuning and inductor's benchmarking
    relaunch a kernel on the same buffers, so a kernel that reads an output it has not written (the
    mixture backward once accumulated dz into a zero-filled buffer) is wrong on a GPU alone."""
    g = torch.Generator().manual_seed(31)
    z, loc, scale = triton_experts(3, 5, 3, 4, g)
    lw = rnd(4, 9, gen=g).requires_grad_()
    x, params = triton_lik_inputs("categorical", (2,), 3, (5,), g)
    prior = [rnd(3, 4, gen=g).requires_grad_(), (0.5 + rnd(3, 4, gen=g).abs()).requires_grad_()]
    lpx = rnd(3, 5, 3, gen=g).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)

    def run():
        moe = ops.moe_estimator(z, loc, scale, *prior, lpx, family="laplace", estimator="mixture", mask=mask, **T)
        outs = [*ops.mixture_log_density(z, loc, scale, family="normal", return_pairwise=True, **T),
                ops.importance_ratios(z, loc, scale, family="laplace", **T),
                *ops.importance_weights(lw, 1, **T), ops.likelihood_sum(x, params, family="categorical", **T), moe.bound]
        cots = [torch.ones_like(o) for o in outs]
        return outs + [moe.lw, moe.z_weight] + list(torch.autograd.grad(outs, (z, loc, scale, lw, params, *prior, lpx), cots))

    want = run()
    empty, empty_like = torch.empty, torch.empty_like
    nan = lambda t: t.fill_(math.nan) if t.is_floating_point() else t  # noqa: E731
    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    for got, w in zip(run(), want):
        torch.testing.assert_close(got, w, equal_nan=False)


# ------------------------------------------------------------------ objectives on each backend against the reference


def values_and_grads(fn, model, x, K, backend, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)
    val = fn(model, x, K, backend=backend)
    val.backward()
    return val.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@cpu_test
@pytest.mark.parametrize("liks", [["laplace", "bernoulli", "categorical"], ["normal", "categorical"]])
@pytest.mark.parametrize("fn", [obj.m_iwae, obj.m_iwae_looser, obj.m_dreg_looser], ids=["m_iwae", "m_iwae_looser", "m_dreg_looser"])
def test_cpu_mm_objectives_cpu_equals_reference(fn, liks, monkeypatch):
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


@cpu_test
@pytest.mark.parametrize("family,lik", [("normal", "bernoulli"), ("laplace", "categorical"), ("laplace", "normal")])
@pytest.mark.parametrize("fn", [obj.iwae, obj.dreg], ids=["iwae", "dreg"])
def test_cpu_single_objectives_cpu_equals_reference(fn, family, lik, monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    torch.manual_seed(0)
    model = toy.TinyVAE((2, 3) if lik != "categorical" else (4,), 3, family, lik, llik_scaling=1.7).double()
    x = toy.sample_batch(model, B=5)
    (va, ga), (vb, gb) = values_and_grads(fn, model, x, 7, None), values_and_grads(fn, model, x, 7, "reference")
    torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-10)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-9, atol=1e-10)


@cpu_test
def test_cpu_float32_objective_cpu_close_to_reference(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    model = toy.make_mmvae(2, "laplace", ["laplace", "bernoulli"], dtype=torch.float32)
    x = [t.float() if t.is_floating_point() else t for t in toy.sample_batch(model, B=4)]
    (va, ga), (vb, gb) = values_and_grads(obj.m_iwae, model, x, 30, None), values_and_grads(obj.m_iwae, model, x, 30, "reference")
    assert va.dtype == torch.float32
    torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-4)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5)


def _run(fn, model, x, K, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)
    val = fn(model, x, K)
    val.backward()
    return val.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@cpu_test
@pytest.mark.parametrize("M,family", [(2, "laplace"), (3, "normal")])
@pytest.mark.parametrize(
    "objective",
    [lambda m, x, K: obj.m_dreg(m, x, K, grad="mixture"), lambda m, x, K: obj.m_dreg_looser(m, x, K, grad="mixture"), obj.m_elbo],
    ids=["m_dreg_mixture", "m_dreg_looser_mixture", "m_elbo"],
)
def test_cpu_objectives_cpu_mixture_ops_equal_reference(monkeypatch, M, family, objective):
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


@triton_test
@pytest.mark.parametrize("objective", [obj.m_dreg_looser, obj.m_iwae, obj.m_elbo])
def test_triton_objective_on_triton_matches_reference(objective):
    sys.path.insert(0, os.path.dirname(__file__))
    import toy

    model = toy.make_mmvae(3, "laplace", ["laplace", "bernoulli", "categorical"])
    x = toy.sample_batch(model, B=3)
    res = []
    for backend in ("triton", "reference"):
        model.zero_grad()
        torch.manual_seed(0)
        val = objective(model, x, 3, backend=backend)
        val.backward()
        res.append((val.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(res[0][0], res[1][0])
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ compiled mode, without a GPU


@triton_test
def test_triton_every_kernel_compiles_for_the_gpu():
    """What the interpreter skips (constexpr-only globals, static control flow, integer
    specialisation, register allocation): triton.compile for sm_90 in a fresh process."""

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "check_triton_compile.py"), "--quick"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "every kernel compiles" in res.stdout
