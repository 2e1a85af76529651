"""Bad input gives a clear ValueError/TypeError naming the argument; backend selection errors."""
import pytest
import torch

import mmvae_fast.objectives as obj
from mmvae_fast import ops
import toy


def _experts(M=2, K=3, B=4, L=5):
    return torch.randn(M, K, B, L), torch.randn(M, B, L), torch.rand(M, B, L) + 0.1


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: ops.importance_weights([1.0, 2.0]), TypeError, "lw"),
        (lambda: ops.importance_weights(torch.arange(3)), TypeError, "lw"),
        (lambda: ops.importance_weights(torch.zeros(3, 0), 1), ValueError, "lw"),
        (lambda: ops.importance_weights(torch.zeros(3, 2), 2), ValueError, "dim"),
        (lambda: ops.mixture_log_density(torch.zeros(2, 3, 4), *_experts()[1:]), ValueError, "z"),
        (lambda: ops.mixture_log_density(_experts()[0], torch.zeros(2, 4, 6), _experts()[2]), ValueError, "loc"),
        (lambda: ops.mixture_log_density(*_experts()[:2], torch.zeros(2, 4, 5)), ValueError, "scale"),
        (lambda: ops.mixture_log_density(*_experts()[:2], -torch.ones(2, 4, 5)), ValueError, "scale"),
        (lambda: ops.mixture_log_density(*_experts(), family="cauchy"), ValueError, "family"),
        (lambda: ops.mixture_log_density(*_experts(), mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        (lambda: ops.mixture_log_density(*_experts(), mask=torch.ones(2)), TypeError, "mask"),
        (lambda: ops.mixture_log_density(_experts()[0].double(), *_experts()[1:]), TypeError, "dtype"),
        (lambda: ops.importance_ratios(*_experts()[:2], torch.zeros(2, 4, 5)), ValueError, "scale"),
        (lambda: ops.likelihood_sum(torch.zeros(4, 3), torch.zeros(2, 4, 5), family="laplace", scale=1.0), ValueError, "params"),
        (lambda: ops.likelihood_sum(torch.zeros(4, 3), torch.zeros(2, 4, 3), family="laplace"), ValueError, "scale"),
        (lambda: ops.likelihood_sum(torch.zeros(4, 3), torch.zeros(2, 4, 3), family="laplace", scale=0.0), ValueError, "scale"),
        (lambda: ops.likelihood_sum(torch.zeros(4, 3), torch.zeros(2, 4, 3, 5), family="categorical"), TypeError, "x"),
        (lambda: ops.likelihood_sum(torch.zeros(4, 3), torch.zeros(2, 4, 3), family="poisson"), ValueError, "family"),
    ],
)
def test_bad_op_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_mismatched_devices_are_reported():
    z, loc, scale = _experts()
    with pytest.raises(ValueError, match="one device"):
        ops.mixture_log_density(z, loc.to("meta"), scale)


@pytest.mark.parametrize("K", [0, -1, 2.5, True])
@pytest.mark.parametrize("f", [obj.iwae, obj.dreg, obj.elbo])
def test_bad_K_single(f, K):
    model = toy.TinyVAE((3,), 2)
    with pytest.raises(ValueError, match="K"):
        f(model, toy.sample_batch(model, 2), K)


@pytest.mark.parametrize("f", [obj.m_iwae, obj.m_iwae_looser, obj.m_dreg, obj.m_dreg_looser, obj.m_elbo, obj.m_elbo_naive])
def test_bad_K_multi(f):
    model = toy.make_mmvae(2)
    with pytest.raises(ValueError, match="K"):
        f(model, toy.sample_batch(model, 2), 0)


def test_bad_grad_choice():
    model = toy.make_mmvae(2)
    with pytest.raises(ValueError, match="grad"):
        obj.m_dreg(model, toy.sample_batch(model, 2), 2, grad="eq9")


def test_unknown_and_unavailable_backends(monkeypatch):
    lw = torch.randn(3, 4)
    with pytest.raises(ValueError, match="backend"):
        ops.importance_weights(lw, backend="tpu")
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.importance_weights(lw, backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.importance_weights(lw, backend="cuda")
    monkeypatch.setenv("MMVAE_FAST_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError):
        ops.importance_weights(lw)
    monkeypatch.setenv("MMVAE_FAST_BACKEND", "reference")
    assert torch.allclose(ops.importance_weights(lw).bound, torch.logsumexp(lw, 0) - torch.log(torch.tensor(3.0)))


def test_objective_backend_argument_reaches_the_ops():
    model = toy.make_mmvae(2)
    x = toy.sample_batch(model, 2)
    with pytest.raises(ops.BackendUnavailableError):
        obj.m_iwae(model, x, 2, backend="triton")
