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


# ---- objective-level input checks: the mask and every modality's batch are checked before the model
# runs, with errors naming the argument (not torch's `where` / shape errors from deep inside)
def _no_model_work(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


MASK_CASES = [
    (torch.ones(2, 3, dtype=torch.int64), TypeError, "argument 'mask' must be a bool tensor"),
    (torch.ones(3, 2, dtype=torch.bool), ValueError, r"argument 'mask' must have shape \[M, B\] = \[2, 3\], got \(3, 2\)"),
    (torch.ones(2, dtype=torch.bool), ValueError, r"argument 'mask' must have shape \[M, B\] = \[2, 3\], got \(2,\)"),
]
MASK_OBJECTIVES = [(f, None) for f in (obj.m_iwae, obj.m_iwae_looser, obj.m_dreg, obj.m_dreg_looser, obj.m_elbo_naive)]
MASK_OBJECTIVES += [(f, 1) for f in (obj.m_iwae, obj.m_dreg_looser)]  # the chunked path (mmvae_fast.large_k)


@pytest.mark.parametrize("f, k_chunk", MASK_OBJECTIVES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("mask, exc, match", MASK_CASES, ids=["int", "transposed", "1-D"])
def test_objective_mask_is_checked_before_the_model_runs(f, k_chunk, mask, exc, match):
    model = toy.make_mmvae(2)
    x = toy.sample_batch(model, 3)
    calls = _no_model_work(model)
    with pytest.raises(exc, match=match):
        f(model, x, 2, mask=mask, **({} if k_chunk is None else dict(k_chunk=k_chunk)))
    assert not calls


def _digits():
    from mmvae_fast.models import build_model

    torch.manual_seed(0)
    return build_model("digits", latent_dim=4)  # modalities 'grey' [1, 16, 16] and 'colour' [3, 16, 16]


G, C = (lambda: torch.rand(3, 1, 16, 16)), (lambda: torch.rand(3, 3, 16, 16))
BAD_MODALITY = {
    "image size": (lambda: [torch.rand(3, 1, 8, 8), C()], ValueError,
                   r"'x\[0\]' \(modality 'grey'\) must have shape \[B, 1, 16, 16\] and dtype torch.float32, "
                   r"got shape \(3, 1, 8, 8\) and dtype torch.float32"),
    "channels last": (lambda: [G(), C().permute(0, 2, 3, 1)], ValueError,
                      r"'x\[1\]' \(modality 'colour'\) must have shape \[B, 3, 16, 16\].*got shape \(3, 16, 16, 3\)"),
    "uint8": (lambda: [(G() * 255).to(torch.uint8), C()], TypeError,
              r"'x\[0\]' \(modality 'grey'\).*dtype torch.float32, got shape \(3, 1, 16, 16\) and dtype torch.uint8"),
    "float64": (lambda: [G().double(), C().double()], TypeError, r"'x\[0\]'.*dtype torch.float32.*torch.float64"),
}


@pytest.mark.parametrize("f", [obj.m_elbo, obj.m_elbo_naive, obj.m_iwae, obj.m_dreg_looser])
@pytest.mark.parametrize("case", list(BAD_MODALITY))
def test_objective_names_a_modality_of_the_wrong_shape_or_dtype(f, case):
    model = _digits()
    make, exc, match = BAD_MODALITY[case]
    calls = _no_model_work(model)
    with pytest.raises(exc, match=match):
        f(model, make(), 2)
    assert not calls


def test_single_modality_objective_and_caption_modality_are_checked_too():
    model = _digits()
    with pytest.raises(ValueError, match=r"'x' \(modality 'grey'\) must have shape \[B, 1, 16, 16\]"):
        obj.iwae(model.vaes[0], torch.rand(3, 3, 16, 16), 2)
    from mmvae_fast.models import build_model

    cub = build_model("cub-features", latent_dim=4, vocab_size=20)
    feats, words = torch.rand(3, 2048), torch.randint(0, 20, (3, 32))
    with pytest.raises(TypeError, match=r"'x\[1\]' \(modality 'cub-sentences'\) must have shape \[B, 32\] and "
                                        r"integer class indices, got shape \(3, 32\) and dtype torch.float32"):
        obj.m_iwae(cub, [feats, words.float()], 2)
