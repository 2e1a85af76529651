"""The paper's MMVAE models per experiment (appendix Table 6 and the released code's settings).

    model = build_model("mnist-svhn", latent_dim=20, learn_prior=True)
    loss = -mmvae_fast.objectives.m_dreg_looser(model, [x_mnist, x_svhn], K=30)

| experiment            | modalities (data shape)                   | prior / posterior      | likelihoods                 | default llik_scaling |
|-----------------------|-------------------------------------------|------------------------|-----------------------------|----------------------|
| digits (offline)      | grey [1,16,16], colour [3,16,16] (MLPs)   | Laplace, softmax scale | Laplace(0.1), Laplace(0.1)  | 768/256, 1           |
| mnist-svhn            | MNIST [1,28,28], SVHN [3,32,32]           | Laplace, softmax scale | Laplace(0.75), Laplace(0.75)| 3072/784, 1          |
| cub-features          | ResNet-101 features [2048], caption [32]  | Normal, softplus scale | Laplace(0.01), Categorical  | 32/2048, 1           |
| cub-images-sentences  | image [3,64,64], caption [32]             | Laplace, softmax scale | Laplace(0.01), Categorical  | 32/(3*64*64), 1      |
| polydigits            | five styled digits [3,12,12] each         | Laplace, softmax scale | Laplace(0.75) x 5           | 1 (all)              |
| polymnist             | PolyMNIST, five [3,28,28]                 | Laplace, softmax scale | Laplace(0.75) x 5           | 1 (all)              |
"""
import math

import torch.distributions as D

from .nets import (  # noqa: F401
    ETA,
    ConvDecoder,
    ConvEncoder,
    FeatureDecoder,
    FeatureEncoder,
    MLPDecoder,
    MLPEncoder,
    SentenceDecoder,
    SentenceEncoder,
)
from .poly import poly_vae, poly_vaes
from .vae import MMVAE, VAE, ImageLikelihood, Prior, categorical, dist_mean, eval_mode, scale_from_raw  # noqa: F401

EXPERIMENTS = ("digits", "mnist-svhn", "cub-features", "cub-images-sentences", "polydigits", "polymnist")
POLY_EXPERIMENTS = ("polydigits", "polymnist")  # five modalities of one kind

MNIST_SHAPE, SVHN_SHAPE = (1, 28, 28), (3, 32, 32)
DIGITS_SHAPES = ((1, 16, 16), (3, 16, 16))  # mmvae_fast.data.digits.SHAPES (models do not import data)
DIGITS_HIDDEN = 400
DIGITS_LIK_SCALE = 0.1  # Laplace likelihood scale of the offline digits (MNIST-SVHN keeps 0.75)
CUB_FEATURES, CUB_IMAGE_SHAPE = 2048, (3, 64, 64)
VOCAB_SIZE, MAX_SENTENCE_LEN = 1590, 32


def mnist_vae(latent_dim=20, **kw):
    """MNIST (Table 6a): MLP 400, Laplace posterior, Laplace(0.75) likelihood on sigmoid means."""
    return VAE(MLPEncoder(latent_dim), MLPDecoder(latent_dim), latent_dim, posterior=D.Laplace, scale_fn="softmax",
               likelihood=ImageLikelihood(D.Laplace, 0.75), data_shape=MNIST_SHAPE, name="mnist", **kw)


def svhn_vae(latent_dim=20, **kw):
    """SVHN (Table 6b): convs 32-64-128, Laplace posterior, Laplace(0.75) likelihood on sigmoid means."""
    return VAE(ConvEncoder(latent_dim), ConvDecoder(latent_dim), latent_dim, posterior=D.Laplace, scale_fn="softmax",
               likelihood=ImageLikelihood(D.Laplace, 0.75), data_shape=SVHN_SHAPE, name="svhn", **kw)


def digits_vae(data_shape, latent_dim=20, hidden=DIGITS_HIDDEN, name="digits", **kw):
    """The offline digits (16x16 grey or colour): MNIST's Table 6a MLP (one hidden layer of 400)
    sized to the data, Laplace posterior, Laplace(DIGITS_LIK_SCALE) likelihood on sigmoid means (a
    sharper likelihood than the paper's 0.75 weighs the pixels more against the KL term)."""
    return VAE(MLPEncoder(latent_dim, data_shape, hidden), MLPDecoder(latent_dim, data_shape, hidden), latent_dim,
               posterior=D.Laplace, scale_fn="softmax", likelihood=ImageLikelihood(D.Laplace, DIGITS_LIK_SCALE),
               data_shape=tuple(data_shape), name=name, **kw)


def cub_feature_vae(latent_dim=64, **kw):
    """CUB image features (Table 6c): MLP 1024-512-256 ELU; Normal posterior (softplus scale) and a
    Laplace(0.01) likelihood on the 2048-d ResNet-101 features, as in the released code."""
    return VAE(FeatureEncoder(latent_dim), FeatureDecoder(latent_dim), latent_dim, posterior=D.Normal,
               scale_fn="softplus", likelihood=ImageLikelihood(D.Laplace, 0.01), data_shape=(CUB_FEATURES,),
               name="cub-features", **kw)


def cub_image_vae(latent_dim=64, **kw):
    """CUB raw images 3x64x64 (released code): convs 64-128-256-512, sigmoid means, Laplace(0.01)."""
    enc = ConvEncoder(latent_dim, channels=(64, 128, 256, 512))
    dec = ConvDecoder(latent_dim, channels=(512, 256, 128, 64))
    return VAE(enc, dec, latent_dim, posterior=D.Laplace, scale_fn="softmax",
               likelihood=ImageLikelihood(D.Laplace, 0.01), data_shape=CUB_IMAGE_SHAPE, name="cub-image", **kw)


def cub_sentence_vae(latent_dim=64, vocab_size=VOCAB_SIZE, posterior=D.Normal, scale_fn="softplus", **kw):
    """CUB captions (Table 6d): embedding + conv stack with BatchNorm, tied output embedding,
    Categorical over `vocab_size` words at each of 32 positions."""
    enc = SentenceEncoder(latent_dim, vocab_size)
    dec = SentenceDecoder(latent_dim, vocab_size, max_len=MAX_SENTENCE_LEN)
    dec.to_vocab.weight = enc.embedding.weight  # tied, as in the released code
    return VAE(enc, dec, latent_dim, posterior=posterior, scale_fn=scale_fn, likelihood=categorical,
               data_shape=(MAX_SENTENCE_LEN,), name="cub-sentences", **kw)


def _check_experiment(experiment):
    if experiment not in EXPERIMENTS:
        raise ValueError(f"argument 'experiment' must be one of {EXPERIMENTS}, got {experiment!r}")


def default_llik_scaling(experiment, vocab_size=VOCAB_SIZE):
    """The paper code's default scaling of the first modality (the second is 1): the ratio of the
    second modality's size to the first's, so both contribute similarly to the bound."""
    _check_experiment(experiment)
    if experiment in POLY_EXPERIMENTS:
        return 1.0
    if experiment == "digits":
        return math.prod(DIGITS_SHAPES[1]) / math.prod(DIGITS_SHAPES[0])
    if experiment == "mnist-svhn":
        return math.prod(SVHN_SHAPE) / math.prod(MNIST_SHAPE)
    if experiment == "cub-features":
        return MAX_SENTENCE_LEN / CUB_FEATURES
    return MAX_SENTENCE_LEN / math.prod(CUB_IMAGE_SHAPE)


def build_model(experiment, latent_dim=20, learn_prior=False, llik_scaling=None, *, vocab_size=VOCAB_SIZE):
    """The MMVAE of `experiment` (one of EXPERIMENTS).

    llik_scaling: None for the paper's default on the first modality (MNIST 3072/784; digits
    768/256; CUB image 32/size), or a number that replaces it; the second modality keeps 1. The
    five-modality experiments (POLY_EXPERIMENTS) use it for every modality (default 1). vocab_size: caption
    vocabulary (CUB; the released vocabulary has 1590 words)."""
    _check_experiment(experiment)
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"argument 'latent_dim' must be a positive integer, got {latent_dim!r}")
    scale1 = default_llik_scaling(experiment) if llik_scaling is None else float(llik_scaling)
    if not scale1 > 0 or not math.isfinite(scale1):
        raise ValueError(f"argument 'llik_scaling' must be a positive finite number, got {llik_scaling!r}")
    if experiment in POLY_EXPERIMENTS:
        prior = Prior(latent_dim, D.Laplace, "softmax", learn_prior)
        vaes = poly_vaes(experiment, latent_dim, prior, llik_scaling=scale1)
    elif experiment == "digits":
        prior = Prior(latent_dim, D.Laplace, "softmax", learn_prior)
        vaes = [digits_vae(DIGITS_SHAPES[0], latent_dim, prior=prior, llik_scaling=scale1, name="grey"),
                digits_vae(DIGITS_SHAPES[1], latent_dim, prior=prior, name="colour")]
    elif experiment == "mnist-svhn":
        prior = Prior(latent_dim, D.Laplace, "softmax", learn_prior)
        vaes = [mnist_vae(latent_dim, prior=prior, llik_scaling=scale1), svhn_vae(latent_dim, prior=prior)]
    elif experiment == "cub-features":
        prior = Prior(latent_dim, D.Normal, "softplus", learn_prior)
        vaes = [cub_feature_vae(latent_dim, prior=prior, llik_scaling=scale1),
                cub_sentence_vae(latent_dim, vocab_size, prior=prior)]
    else:
        # One posterior family for both experts (the released code mixed a Laplace image expert
        # with a Normal caption expert); Laplace with the softmax scale, like its prior.
        prior = Prior(latent_dim, D.Laplace, "softmax", learn_prior)
        vaes = [cub_image_vae(latent_dim, prior=prior, llik_scaling=scale1),
                cub_sentence_vae(latent_dim, vocab_size, posterior=D.Laplace, scale_fn="softmax", prior=prior)]
    return MMVAE(vaes, prior, name=experiment)


__all__ = [
    "EXPERIMENTS",
    "POLY_EXPERIMENTS",
    "build_model",
    "default_llik_scaling",
    "VAE",
    "MMVAE",
    "Prior",
    "digits_vae",
    "mnist_vae",
    "svhn_vae",
    "cub_feature_vae",
    "cub_image_vae",
    "cub_sentence_vae",
    "poly_vae",
]
