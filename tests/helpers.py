"""Helpers of the per-op test modules (tests/test_<op>.py): random inputs drawn on the CPU
(seeded), comparisons that fail when a backend returns no gradient where the reference returns
one, the marks of the backend-specific tests, and an allocation tracker that sees every tensor
torch's CPU allocator hands out, in forward and in backward (inside C++ kernels too)."""
import importlib.util
import os

import pytest
import torch
import torch.distributions as D

from mmvae_fast import _ext, ops

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def cpu_test(f):
    """A test of the C++ extension's CPU kernels (backend='cpu')."""
    return pytest.mark.skipif(not _ext.AVAILABLE, reason="the C++ extension is not built")(f)


def triton_test(f):
    """A test of the Triton kernels under Triton's CPU interpreter; runs in the `-m triton` process."""
    for mark in (
        pytest.mark.triton,
        pytest.mark.usefixtures("triton_interpreter"),
        pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton)"),
    ):
        f = mark(f)
    return f


# The namespaces of the backends' torch.library ops, one schema each: the C++ extension's
# (mmvae_fast::<op>, CPU kernels here) and Triton's (mmvae_fast_triton::<op>, under the
# interpreter in the `-m triton` process). opcheck runs on both.
NAMESPACES = pytest.mark.parametrize(
    "ns",
    [
        pytest.param("mmvae_fast", id="cpu", marks=pytest.mark.skipif(not _ext.AVAILABLE, reason="the C++ extension is not built")),
        pytest.param(
            "mmvae_fast_triton",
            id="triton",
            marks=[pytest.mark.triton, pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton)")],
        ),
    ],
)


def opcheck(op, args):
    """torch.library.opcheck of a backend op. Under Triton's interpreter the kernels run on the data
    of fake tensors (and fail), so there opcheck tests the schema (no mutation, no aliasing) and
    the autograd registration only; the fake-tensor and AOT tests of the Triton ops run on a GPU
    (tests/test_gpu.py)."""
    interpreted = op.namespace == "mmvae_fast_triton" and os.environ.get("TRITON_INTERPRET") == "1"
    utils = ("test_schema", "test_autograd_registration") if interpreted else torch.library._OPCHECK_DEFAULT_UTILS
    torch.library.opcheck(op, args, test_utils=utils)


def library(ns, *ops):
    """torch.ops.<ns>, with the Triton ops of `ops` defined (their kernels load lazily)."""
    if ns == "mmvae_fast_triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton ops run here under the interpreter: pytest -m triton")
        from mmvae_fast.ops import _triton

        for op in ops:
            _triton._load(op)
    return getattr(torch.ops, ns)


# ------------------------------------------------------------------ every backend (the grid)


DIST = {"normal": D.Normal, "laplace": D.Laplace}


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
    """A backend's outputs (or gradients) a against the reference's b, one by one. Where the
    reference has no gradient (None) the backend may have none or zeros; where the reference has
    one, the backend must have it too."""
    a, b = list(a), list(b)
    assert len(a) == len(b), f"{len(a)} results against the reference's {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if y is None:
            assert x is None or x.abs().max() == 0, f"result {i}: nonzero where the reference has no gradient"
        elif x is None:
            raise AssertionError(f"result {i}: no gradient where the reference has one")
        else:
            torch.testing.assert_close(x, y, **kw)


def experts(M, K, B, L, gen, dtype=torch.float64):
    z = rand(M, K, B, L, gen=gen, dtype=dtype).requires_grad_()
    loc = rand(M, B, L, gen=gen, dtype=dtype).requires_grad_()
    scale = (0.3 + urand(M, B, L, gen=gen)).to(dtype).requires_grad_()
    return z, loc, scale



# ------------------------------------------------------------------ allocations


# ------------------------------------------------------------------ cpu


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cpu_lik_inputs(family, S, B, E, V=5, g=None, dtype=torch.float64):
    if family == "categorical":
        x = torch.randint(0, V, (B, *E), generator=g)
        params = torch.randn(*S, B, *E, V, generator=g, dtype=torch.float64)
    else:
        x = torch.rand(B, *E, generator=g, dtype=torch.float64)  # soft targets for bernoulli
        params = torch.randn(*S, B, *E, generator=g, dtype=torch.float64)
    return x.to(dtype) if x.is_floating_point() else x, params.to(dtype).requires_grad_()


LIK = ("normal", "laplace", "bernoulli", "categorical")


FAMILIES = ["normal", "laplace"]


def cpu_experts(M, K, B, L, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(M, B, L, generator=g, dtype=torch.float64)
    scale = 0.4 + torch.rand(M, B, L, generator=g, dtype=torch.float64)
    z = loc[:, None] + scale[:, None] * torch.randn(M, K, B, L, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_() for t in (z, loc, scale))


def cpu_mix(z, loc, scale, family, mask=None, pairwise=False):
    return ops.mixture_log_density(z, loc, scale, family=family, mask=mask, return_pairwise=pairwise, backend="cpu")


def ref_mix(z, loc, scale, family, mask=None, pairwise=False):
    return ops.mixture_log_density(z, loc, scale, family=family, mask=mask, return_pairwise=pairwise, backend="reference")



# ------------------------------------------------------------------ triton (interpreter)


T = dict(backend="triton")


F64 = torch.float64


def rnd(*shape, gen, dtype=F64, scale=1.0):
    return (scale * torch.randn(shape, generator=gen, dtype=F64)).to(dtype)


def assert_grads(outs, refs, inputs, gen, **tol):
    """Same values, and same vector-Jacobian products for a random cotangent on every output."""
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, equal_nan=True, **tol)
    cots = [torch.where(torch.isfinite(r), rnd(*r.shape, gen=gen, dtype=r.dtype), 0) for r in refs]
    got = torch.autograd.grad(outs, inputs, cots, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(refs, inputs, cots, allow_unused=True, retain_graph=True)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is not None and w.dtype in (torch.float16, torch.bfloat16):
            tol = dict(rtol=1e-2, atol=1e-2) if w.dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
            g, w = g.float(), w.float()  # both rounded once from float32: allow one ulp
        if w is None:
            assert g is None or g.abs().max() == 0, f"input {i} should get no gradient"
        else:
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"input {i}: {m}")


def triton_experts(M, K, B, L, gen, dtype=F64):
    z = rnd(M, K, B, L, gen=gen, dtype=dtype).requires_grad_()
    loc = rnd(M, B, L, gen=gen, dtype=dtype).requires_grad_()
    scale = (0.3 + torch.rand(M, B, L, generator=gen, dtype=F64)).to(dtype).requires_grad_()
    return z, loc, scale


def triton_lik_inputs(family, S, B, E, gen, dtype=F64, V=131):
    if family == "categorical":
        return torch.randint(0, V, (B, *E), generator=gen), rnd(*S, B, *E, V, gen=gen, dtype=dtype).requires_grad_()
    x = torch.rand((B, *E), generator=gen, dtype=F64)
    return (x.round() if family == "bernoulli" else x), rnd(*S, B, *E, gen=gen, dtype=dtype).requires_grad_()

