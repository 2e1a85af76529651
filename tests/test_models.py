"""The MMVAE models: shapes of every architecture, the drop-in protocol, every objective runs."""
import math

import pytest
import torch
import torch.distributions as D

from mmvae_fast import objectives as O
from mmvae_fast.models import (
    DIGITS_LIK_SCALE,
    EXPERIMENTS,
    MMVAE,
    VAE,
    build_model,
    cub_feature_vae,
    cub_image_vae,
    cub_sentence_vae,
    default_llik_scaling,
    mnist_vae,
    svhn_vae,
)

SHAPES = {
    "digits": [(1, 16, 16), (3, 16, 16)],
    "mnist-svhn": [(1, 28, 28), (3, 32, 32)],
    "cub-features": [(2048,), (32,)],
    "cub-images-sentences": [(3, 64, 64), (32,)],
    "polydigits": [(3, 12, 12)] * 5,
    "polymnist": [(3, 28, 28)] * 5,
}
VOCAB = 37  # a small caption vocabulary keeps the CUB tests fast; the default (1590) is checked once
MULTI = ["m_elbo_naive", "m_elbo", "m_iwae", "m_iwae_looser", "m_dreg", "m_dreg_looser"]


def batch(experiment, B, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (B, *s), generator=g) if s == (32,) else torch.rand(B, *s, generator=g)
            for s in SHAPES[experiment]]


def lik_shape(px, data_shape):
    """Shape of the likelihood's parameter tensor, without a Categorical's vocabulary axis."""
    return tuple(px.logits.shape[:-1]) if isinstance(px, D.Categorical) else tuple(px.loc.shape)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {e: build_model(e, latent_dim=6, learn_prior=True, vocab_size=VOCAB) for e in EXPERIMENTS}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_forward_shapes(models, experiment):
    model, K, B, L = models[experiment], 3, 2, 6
    x = batch(experiment, B)
    qz_xs, px_zs, zss = model(x, K)
    M = len(SHAPES[experiment])
    assert len(qz_xs) == len(zss) == len(px_zs) == M
    for r in range(M):
        assert qz_xs[r].loc.shape == qz_xs[r].scale.shape == (B, L)
        assert bool((qz_xs[r].scale > 0).all())
        assert zss[r].shape == (K, B, L)
        assert tuple(model.vaes[r].qz_x_params[0].shape) == (B, L)
        for d in range(M):
            assert lik_shape(px_zs[r][d], SHAPES[experiment][d]) == (K, B, *SHAPES[experiment][d])
    loc, scale = model.pz_params
    assert loc.shape == scale.shape == (1, L) and bool((scale > 0).all())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("lead", [(), (4,), (3, 2)])
def test_decoders_take_any_leading_shape(models, experiment, lead):
    model = models[experiment].eval()
    B = 2
    z = torch.randn(*lead, B, 6)
    for d, vae in enumerate(model.vaes):
        out = vae.decode(z)
        assert lik_shape(out, SHAPES[experiment][d]) == (*lead, B, *SHAPES[experiment][d])
        # each latent decodes alone to the same thing: the leading dims are only a batch
        one = vae.decode(z.reshape(-1, 6)[:1])
        first = out.logits.reshape(-1, *out.logits.shape[-2:])[:1] if isinstance(out, D.Categorical) else out.loc.reshape(-1, *SHAPES[experiment][d])[:1]
        ref = one.logits if isinstance(one, D.Categorical) else one.loc
        torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
    model.train()


def test_batch_of_one():
    model = build_model("digits", latent_dim=5)
    qz_xs, px_zs, zss = model(batch("digits", 1), K=2)
    assert qz_xs[0].loc.shape == (1, 5) and zss[1].shape == (2, 1, 5)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("name", MULTI)
def test_every_objective_runs_on_every_model(models, experiment, name):
    model = models[experiment]
    model.zero_grad()
    x = batch(experiment, 3, seed=1)
    value = getattr(O, name)(model, x, K=2)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the encoders and decoders of both modalities and the learnable prior all get gradients
    for vae in model.vaes:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.enc.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.dec.parameters())
    assert model.prior.logvar.grad is not None


@pytest.mark.parametrize("grad", ["mixture", "released"])
def test_dreg_gradient_variants(models, grad):
    model = models["digits"]
    model.zero_grad()
    value = O.m_dreg_looser(model, batch("digits", 2), K=3, grad=grad)
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("make,shape", [
    (mnist_vae, (1, 28, 28)), (svhn_vae, (3, 32, 32)), (cub_feature_vae, (2048,)),
    (cub_image_vae, (3, 64, 64)), (lambda L: cub_sentence_vae(L, vocab_size=VOCAB), (32,)),
])
@pytest.mark.parametrize("name", ["elbo", "iwae", "dreg"])
def test_single_modality_vae_with_single_objectives(make, shape, name):
    torch.manual_seed(0)
    vae = make(4)
    assert isinstance(vae, VAE)
    x = torch.randint(0, VOCAB, (3, *shape)) if shape == (32,) else torch.rand(3, *shape)
    qz_x, px_z, zs = vae(x, K=2)
    assert zs.shape == (2, 3, 4)
    value = getattr(O, name)(vae, x, 2)
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)
    assert any(p.grad is not None for p in vae.enc.parameters())


def test_mmvae_equals_its_experts():
    """forward is the research code's: expert r's samples decoded by every decoder."""
    torch.manual_seed(0)
    model = build_model("digits", latent_dim=4).eval()
    x = batch("digits", 2)
    torch.manual_seed(1)
    qz_xs, px_zs, zss = model(x, K=3)
    for r, vae in enumerate(model.vaes):
        loc, scale = vae.encode(x[r])
        torch.testing.assert_close(qz_xs[r].loc, loc)
        torch.testing.assert_close(qz_xs[r].scale, scale)
        for d, dec_vae in enumerate(model.vaes):
            torch.testing.assert_close(px_zs[r][d].loc, dec_vae.decode(zss[r]).loc)


def test_scales_follow_the_paper_parameterisation():
    model = build_model("mnist-svhn", latent_dim=7)
    loc, scale = model.pz_params
    # softmax(0) * L + eta = 1 + eta for a zero-initialised prior logvar
    torch.testing.assert_close(scale, torch.full((1, 7), 1 + 1e-6))
    assert bool((loc == 0).all())
    x = batch("mnist-svhn", 3)
    _, raw = model.vaes[0].enc(x[0])
    _, s = model.vaes[0].encode(x[0])
    torch.testing.assert_close(s, torch.softmax(raw, -1) * 7 + 1e-6)
    cub = build_model("cub-features", latent_dim=5, vocab_size=VOCAB)
    torch.testing.assert_close(cub.pz_params[1], torch.full((1, 5), math.log(2) + 1e-6))
    assert cub.pz.family is D.Normal and cub.vaes[0].qz_x.family is D.Normal and model.pz.family is D.Laplace


@pytest.mark.parametrize("experiment,scale", [("mnist-svhn", 0.75), ("digits", DIGITS_LIK_SCALE)])
def test_image_likelihoods_and_means(experiment, scale):
    model = build_model(experiment, latent_dim=4)
    _, px_zs, _ = model(batch(experiment, 2), K=1)
    for d in range(2):
        px = px_zs[0][d]
        assert type(px) is D.Laplace
        assert bool((px.scale == scale).all())
        assert bool(((px.loc > 0) & (px.loc < 1)).all())  # sigmoid means


@pytest.mark.parametrize("learn", [False, True])
def test_learn_prior_and_shared_prior(learn):
    model = build_model("digits", latent_dim=4, learn_prior=learn)
    assert model.prior.logvar.requires_grad is learn
    assert not model.prior.loc.requires_grad
    for vae in model.vaes:
        assert vae.prior is model.prior
        assert vae.pz_params[1] is not None
        torch.testing.assert_close(vae.pz_params[1], model.pz_params[1])
    # each parameter counted once even though the prior is reachable from every VAE
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))


def test_llik_scaling_defaults_and_override():
    m = build_model("mnist-svhn")
    assert m.vaes[0].llik_scaling == pytest.approx(3072 / 784) and m.vaes[1].llik_scaling == 1.0
    assert build_model("cub-features", vocab_size=VOCAB).vaes[0].llik_scaling == pytest.approx(32 / 2048)
    assert default_llik_scaling("cub-images-sentences") == pytest.approx(32 / (3 * 64 * 64))
    assert build_model("digits").vaes[0].llik_scaling == pytest.approx(768 / 256)
    m = build_model("digits", llik_scaling=2.5)
    assert m.vaes[0].llik_scaling == 2.5 and m.vaes[1].llik_scaling == 1.0
    with pytest.raises(ValueError, match="llik_scaling"):
        build_model("digits", llik_scaling=-1)


def test_digits_model_fits_the_offline_data_and_keeps_table6_for_mnist_svhn():
    """The offline digits model uses MLPs sized to the data's shapes (models do not import data, so
    the two constants are checked here); MNIST-SVHN keeps Table 6's MLP + conv networks."""
    from mmvae_fast.data import digits as digits_data
    from mmvae_fast.models import DIGITS_SHAPES, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

    assert tuple(DIGITS_SHAPES) == tuple(digits_data.SHAPES)
    m = build_model("digits", latent_dim=5)
    for vae, shape in zip(m.vaes, DIGITS_SHAPES):
        assert isinstance(vae.enc, MLPEncoder) and isinstance(vae.dec, MLPDecoder)
        assert vae.enc.body[0].in_features == math.prod(shape) and vae.dec(torch.zeros(2, 3, 5)).shape == (2, 3, *shape)
    s = build_model("mnist-svhn")
    assert isinstance(s.vaes[0].dec, MLPDecoder) and isinstance(s.vaes[1].enc, ConvEncoder)
    assert isinstance(s.vaes[1].dec, ConvDecoder)


def test_default_caption_vocabulary_and_tied_embedding():
    vae = cub_sentence_vae(8)
    assert vae.enc.embedding.num_embeddings == 1590
    assert vae.dec.to_vocab.weight is vae.enc.embedding.weight
    logits = vae.decode(torch.randn(2, 8)).logits
    assert logits.shape == (2, 32, 1590)


def test_helpers_generate_reconstruct_latents(models):
    model = models["digits"]
    model.train()
    x = batch("digits", 5)
    gens = model.generate(7)
    assert [tuple(g.shape) for g in gens] == [(7, 1, 16, 16), (7, 3, 16, 16)]
    rec = model.reconstruct(x)
    assert [[tuple(t.shape) for t in row] for row in rec] == [[(5, 1, 16, 16), (5, 3, 16, 16)]] * 2
    z = model.latents(x)
    assert z.shape == (2, 5, 6)
    # reconstructions decode the posterior means
    torch.testing.assert_close(rec[1][0], model.vaes[0].decode(z[1]).loc)
    assert model.training  # helpers restore the mode
    assert not any(t.requires_grad for row in rec for t in row)
    cub = models["cub-features"]
    probs = cub.generate(3)[1]
    assert probs.shape == (3, 32, VOCAB)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 32))


def test_helpers_use_eval_mode_for_batchnorm(models):
    model = models["cub-images-sentences"]
    model.train()
    x = batch("cub-images-sentences", 4)
    bn = model.vaes[1].enc.body[1]
    before = bn.running_mean.clone()
    model.reconstruct(x)
    torch.testing.assert_close(bn.running_mean, before)  # no running-statistics update in eval


def test_unknown_experiment_and_bad_arguments():
    with pytest.raises(ValueError, match="experiment"):
        build_model("mnist")
    with pytest.raises(ValueError, match="latent_dim"):
        build_model("digits", latent_dim=0)
    with pytest.raises(ValueError, match="modalities"):
        build_model("digits")(batch("digits", 2)[:1])


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = build_model("digits", latent_dim=4, learn_prior=True)
    with torch.no_grad():
        a.prior.logvar.add_(0.3)
    b = build_model("digits", latent_dim=4, learn_prior=True)
    b.load_state_dict(a.state_dict())
    x = batch("digits", 2)
    torch.testing.assert_close(a.latents(x), b.latents(x))
    torch.testing.assert_close(a.pz_params[1], b.pz_params[1])
    assert isinstance(b, MMVAE)


def test_float64_model_and_an_expert_taken_out_of_the_mmvae():
    torch.manual_seed(0)
    model = build_model("digits", latent_dim=4, learn_prior=True).double()
    x = [t.double() for t in batch("digits", 2)]
    value = O.m_iwae(model, x, K=2)
    assert value.dtype == torch.float64 and torch.isfinite(value)
    _, px_zs, _ = model(x, K=1)
    assert px_zs[0][1].scale.dtype == torch.float64  # the fixed likelihood scale follows the dtype
    # each expert is a VAE of its own, with the joint (shared) prior
    svhn = model.vaes[1]
    v = O.dreg(svhn, x[1], 3)
    v.backward()
    assert torch.isfinite(v) and model.prior.logvar.grad is not None


@pytest.mark.parametrize("experiment", ["digits", "cub-features"])
def test_distributions_skip_argument_validation(models, experiment):
    """The models' distributions never validate their arguments: the checks read values, a
    host-device sync per distribution on a GPU (and they cost time on a CPU too)."""
    model, x = models[experiment], batch(experiment, 2)
    qz_xs, px_zs, _ = model(x, 2)
    dists = list(qz_xs) + [p for row in px_zs for p in row if p is not None] + [model.pz(*model.pz_params)]
    assert dists and all(d._validate_args is False for d in dists)
    for v in model.vaes:  # the objectives rebuild posteriors from detached parameters with qz_x
        assert v.qz_x(*[p.detach() for p in v.qz_x_params])._validate_args is False
